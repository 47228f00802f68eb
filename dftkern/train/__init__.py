"""dftkern's reference trainer: a thin, readable pipeline around the fused losses.

``python -m dftkern.train --help`` documents every stage and option; ``docs/trainer.md`` walks
through the default run, a real-model recipe and a torchrun launch. One module per stage:

* :mod:`.generate`    — stage 1: K sampled negatives per prompt (resumable JSONL)
* :mod:`.ref_logps`   — stage 2: reference log-probs, cached by data hash
* :mod:`.trainer`     — stage 3: the training loop (AdamW, cosine, accumulation, non-finite steps)
* :mod:`.evaluate`    — stage 4: greedy task metric + log-prob of the good answers

and the parts they share:

* :mod:`.records`     — read and validate data files and negatives (errors name file, line, field)
* :mod:`.batching`    — tokenization with prompt masking, label shifting, batches, data order
  (:mod:`.data` re-exports both)
* :mod:`.objectives`  — which rows each loss sees, and the calls into dftkern's fused losses
  (sequence-level losses offline and on-policy; the token-level PPO/GRPO family on-policy)
* :mod:`.onpolicy`    — where examples come from (the ``ExampleSource`` protocol): the offline set,
  or fresh samples through a ``Sampler``; the online-DPO pair rule and the rows per loss family
* :mod:`.rewards`     — ``RewardFn``, the built-in rewards, resolving reward names
* :mod:`.model`       — ``ModelConfig``, model loading, attention choice, backbone + head + loss module
* :mod:`.options`     — options declared once (default, help, accepted values); validation and CLI
* :mod:`.checkpoint`, :mod:`.serialization`, :mod:`.resume` — atomic checkpoints without pickle,
  bit-exact resume that skips a damaged checkpoint
* :mod:`.distributed` — torchrun / FSDP2 plumbing
* :mod:`.prefix_sharing` — the prompt-shared layout (``--share-prompt``): the backbone runs
  once over each group's prompt
* :mod:`.plotting`    — metrics.jsonl -> PNG
* :mod:`.synthetic`   — the built-in addition task, char tokenizer, tiny Llama
* :mod:`.default_run` — the built-in experiment chaining all stages
* :mod:`.cli`         — the command line, generated from the stage configs

The stage functions are importable and take one config dataclass each, e.g.
``train(TrainConfig(model=..., data=..., out=..., loss="dft", negatives=...))``; configs compose
(``TrainConfig.model/.objective/.optim/.on_policy``) and still take the flat keywords.
"""

import importlib

# name -> the submodule that defines it. Imported on first use (PEP 562), so that
# `python -m dftkern.train.<module>` runs that module without importing it twice.
_EXPORTS = {
    "EvalConfig": ".evaluate", "evaluate_model": ".evaluate", "run_eval": ".evaluate",
    "GenerateConfig": ".generate", "SamplingConfig": ".generate", "generate_samples": ".generate",
    "ModelConfig": ".model",
    "LOSS_NAMES": ".objectives", "POLICY_LOSS_NAMES": ".objectives", "TRAIN_LOSS_NAMES": ".objectives",
    "ObjectiveConfig": ".objectives",
    "OnPolicyConfig": ".onpolicy",
    "DataError": ".records",
    "RefLogpsConfig": ".ref_logps", "compute_ref_logps": ".ref_logps",
    "RewardFn": ".rewards", "resolve_reward": ".rewards",
    "NonFiniteLossError": ".trainer", "OptimConfig": ".trainer", "TrainConfig": ".trainer", "TrainResult": ".trainer",
    "train": ".trainer",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
