"""Sizes, grids and settings of the DFT-vs-SFT study (one dataclass, ``quick=True`` for CI)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["METHODS", "ABLATIONS", "ARMS", "SamplingSpec", "StudyConfig", "resolve_study_device"]

#: the five methods of the headline table, all started from the same base model
METHODS = ("sft", "sft_mean", "dft", "dft2", "sft_dpo")
#: DFT with other negatives: T = 1 samples from the reference (the zero-signal case), and verifier-filtered
ABLATIONS = ("exact_sampling", "filtered")
#: one-stage arms: name -> (trainer loss, token-mean average, negatives variant or None)
ARMS = {
    "sft": ("sft", False, None),
    "sft_mean": ("sft", True, None),
    "dft": ("dft", False, "main"),
    "dft2": ("dft2", False, "main"),
    "exact_sampling": ("dft", False, "exact"),
    "filtered": ("dft", False, "filtered"),
}


@dataclass(frozen=True)
class SamplingSpec:
    """How negatives are drawn from the base model. Scoring (reference log-probs) never uses these:
    it is always the training prompt at temperature 1."""

    temperature: float
    top_k: int = 0
    top_p: float = 1.0


def _default_grids() -> dict:
    return {"sft": (3e-4, 1e-3, 3e-3), "sft_mean": (3e-4, 1e-3, 3e-3), "dft": (3e-4, 1e-3, 3e-3),
            "dft2": (3e-4, 1e-3, 3e-3), "exact_sampling": (3e-4, 1e-3, 3e-3), "filtered": (3e-4, 1e-3, 3e-3),
            "sft_dpo": (1e-5, 3e-5, 1e-4)}


@dataclass(frozen=True)
class StudyConfig:
    """Everything that determines the study's numbers (recorded in ``results.json["config"]``).

    Data: ``num_pretrain + num_train + num_val + num_test + num_probe`` distinct 2-digit addition
    problems, drawn once with ``data_seed`` and split in that order after a shuffle, so the splits are
    disjoint and identically distributed; the split does not depend on the study seed.
    """

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    data_seed: int = 1234
    max_digits: int = 2
    num_pretrain: int = 4000
    num_train: int = 1000
    num_val: int = 500
    num_test: int = 1000
    num_probe: int = 300
    # model (a random-init Llama, char tokenizer)
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    batch_size: int = 32
    # base model: SFT on the pretraining problems, stopped when the probe accuracy reaches base_stop_at
    base_lr: float = 2e-3
    base_max_steps: int = 1000
    base_probe_every: int = 20
    base_stop_at: float = 0.25
    base_band: tuple[float, float] = (0.20, 0.50)
    # one-stage methods
    epochs: int = 3
    warmup_ratio: float = 0.1
    num_negatives: int = 2
    pool_size: int = 8
    sampling: SamplingSpec = SamplingSpec(temperature=0.7, top_k=50)
    exact_sampling: SamplingSpec = SamplingSpec(temperature=1.0)
    lr_grid: dict = field(default_factory=_default_grids)
    # SFT -> DPO
    dpo_samples: int = 4
    dpo_beta: float = 0.1
    dpo_epochs: int = 1
    # evaluation
    pass1_samples: int = 2
    pass1_temperature: float = 0.7
    # execution: ``device`` is "cpu", "cuda", "cuda:N" or "auto" (resolved by :func:`resolve_study_device`
    # when the study starts); ``threads``: torch intra-op threads per worker process, 0 = torch's default.
    # The committed numbers are CPU numbers with one thread per worker: other settings change the
    # floating-point results (another device: every number).
    workers: int = 2
    keep_models: bool = False
    quick: bool = False
    device: str = "cpu"
    threads: int = 1

    def __post_init__(self):
        if len(set(self.seeds)) != len(self.seeds) or not self.seeds:
            raise ValueError(f"seeds must be distinct and non-empty, got {self.seeds}")
        if self.pool_size < self.num_negatives:
            raise ValueError(f"pool_size ({self.pool_size}) must be >= num_negatives ({self.num_negatives})")
        missing = set(ARMS) - set(self.lr_grid) | ({"sft_dpo"} - set(self.lr_grid))
        if missing:
            raise ValueError(f"lr_grid lacks {sorted(missing)}")
        for name in ("num_train", "num_val", "num_test", "num_probe", "num_pretrain", "epochs", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise ValueError(f"threads must be an integer >= 0 (0 = torch's default), got {self.threads!r}")
        _device_type(self.device)

    @property
    def max_new_tokens(self) -> int:
        """Answer digits (at most max_digits + 1) plus EOS."""
        return self.max_digits + 2

    @property
    def steps_per_epoch(self) -> int:
        return self.num_train // self.batch_size

    @classmethod
    def quick_preset(cls, **overrides) -> StudyConfig:
        """The same pipeline at toy sizes (seconds per seed, for CI): 2 seeds, one lr per arm (two for sft)."""
        grids = {name: grid[1:2] for name, grid in _default_grids().items()}
        grids["sft"] = _default_grids()["sft"][:2]  # two values: the selection and the DPO dependency still run
        settings = dict(seeds=(0, 1), num_pretrain=256, num_train=64, num_val=32, num_test=48, num_probe=32,
                        hidden_size=32, num_layers=2, batch_size=16, base_max_steps=20, base_probe_every=10,
                        epochs=2, pool_size=4, dpo_samples=2, pass1_samples=1, lr_grid=grids, quick=True)
        settings.update(overrides)
        return cls(**settings)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["lr_grid"] = {k: list(v) for k, v in self.lr_grid.items()}
        return out


def _device_type(device: str) -> str:
    """``"auto"``, ``"cpu"`` or ``"cuda"``; a ValueError for any other device string."""
    if device == "auto":
        return device
    import torch

    try:
        kind = torch.device(device).type if isinstance(device, str) else None
    except (RuntimeError, ValueError):
        kind = None
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")
    return kind


def resolve_study_device(device: str) -> str:
    """The concrete device the study runs on: ``"auto"`` -> ``"cuda"`` when CUDA is available, else
    ``"cpu"``. Raises a ValueError naming the device when it is CUDA and this machine has none (or
    fewer devices than its index), so that a CUDA run never silently becomes a CPU run."""
    import torch

    from dftkern.train.model import cuda_device_problem

    kind = _device_type(device)
    if kind == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    problem = cuda_device_problem(torch.device(device))
    if problem:
        raise ValueError(f"device {device!r}: {problem}")
    return device
