"""dftkern's reference trainer: a thin, readable pipeline around the fused losses.

``python -m dftkern.train --help`` documents every stage and option; ``docs/trainer.md`` walks
through the default run, a real-model recipe and a torchrun launch. One module per stage:

* :mod:`.records`     — read and validate records (JSONL/Parquet) and negatives (errors name file, line, field)
* :mod:`.batching`    — tokenization with prompt masking, label shifting, batches, data order
  (:mod:`.data` re-exports both)
* :mod:`.generate`    — stage 1: K sampled negatives per prompt (resumable JSONL)
* :mod:`.ref_logps`   — stage 2: reference log-probs, cached by data hash
* :mod:`.trainer`     — stage 3: the training loop (AdamW, cosine, accumulation, checkpoints)
* :mod:`.evaluate`    — stage 4: greedy task metric + log-prob of the good answers
* :mod:`.objectives`  — which rows each loss sees, and the calls into dftkern's fused losses
* :mod:`.onpolicy`    — where examples come from: the offline set, or ``--on-policy`` fresh samples
* :mod:`.model`       — model loading, attention choice, backbone + head + loss module
* :mod:`.distributed` — torchrun / FSDP2 plumbing
* :mod:`.checkpoint`  — atomic checkpoints for bit-exact resume
* :mod:`.plotting`    — metrics.jsonl -> PNG
* :mod:`.synthetic`   — the built-in addition task, char tokenizer, tiny Llama
* :mod:`.default_run` — the built-in experiment chaining all stages
* :mod:`.cli`         — the command line

The stage functions are importable and take one config dataclass each, e.g.
``train(TrainConfig(model=..., data=..., out=..., loss="dft", negatives=...))``.
"""

from .records import DataError
from .evaluate import EvalConfig, evaluate_model, run_eval
from .generate import GenerateConfig, SamplingConfig, generate_samples
from .objectives import LOSS_NAMES
from .ref_logps import RefLogpsConfig, compute_ref_logps
from .trainer import TrainConfig, TrainResult, train

__all__ = [
    "DataError",
    "LOSS_NAMES",
    "GenerateConfig",
    "SamplingConfig",
    "generate_samples",
    "RefLogpsConfig",
    "compute_ref_logps",
    "TrainConfig",
    "TrainResult",
    "train",
    "EvalConfig",
    "evaluate_model",
    "run_eval",
]
