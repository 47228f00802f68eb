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

from .evaluate import EvalConfig, evaluate_model, run_eval
from .generate import GenerateConfig, SamplingConfig, generate_samples
from .model import ModelConfig
from .objectives import LOSS_NAMES, POLICY_LOSS_NAMES, TRAIN_LOSS_NAMES, ObjectiveConfig
from .onpolicy import OnPolicyConfig
from .records import DataError
from .ref_logps import RefLogpsConfig, compute_ref_logps
from .rewards import RewardFn, resolve_reward
from .trainer import NonFiniteLossError, OptimConfig, TrainConfig, TrainResult, train

__all__ = [
    "DataError",
    "LOSS_NAMES",
    "POLICY_LOSS_NAMES",
    "TRAIN_LOSS_NAMES",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "OnPolicyConfig",
    "RewardFn",
    "resolve_reward",
    "GenerateConfig",
    "SamplingConfig",
    "generate_samples",
    "RefLogpsConfig",
    "compute_ref_logps",
    "TrainConfig",
    "TrainResult",
    "NonFiniteLossError",
    "train",
    "EvalConfig",
    "evaluate_model",
    "run_eval",
]
