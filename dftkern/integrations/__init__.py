"""Integrations: use dftkern's fused LM head from Hugging Face Transformers and TRL.

* :mod:`dftkern.integrations.transformers` — :func:`~dftkern.integrations.transformers.patch_causal_lm`,
  one call that makes any supported ``*ForCausalLM`` compute its loss (or per-token log-probs)
  with dftkern instead of materializing ``[B, T, V]`` logits.
* :mod:`dftkern.integrations.trl` — ``DFTTrainer``/``DFTConfig`` (Discriminative Fine-Tuning on
  TRL's dataset conventions) and fused drop-ins for TRL's ``DPOTrainer``, ``SFTTrainer``,
  ``GRPOTrainer`` and ``RLOOTrainer``
  (needs the optional ``trl`` extra: ``pip install "dftkern[trl]"``).

Nothing here is imported by ``import dftkern``; each submodule imports its framework lazily.
"""
