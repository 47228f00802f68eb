"""Benchmarked shapes and the FLOP model.

FLOP model (the same for every implementation, so TFLOP/s compare like with like): one
forward+backward pass of a linear head ``[N, H] x [H, V]`` followed by a log-softmax costs

    6 * N * H * V   = 2NHV (logits) + 2NHV (grad of hidden) + 2NHV (grad of weight)

where ``N`` is every token row fed to the head (for the sequence losses ``N = rows * T``,
prompt and padding tokens included, as the naive code multiplies them too). Implementations that
recompute the logits in the backward pass (8NHV of real work) are *not* credited the extra 2NHV:
the model counts useful work, so recomputation shows up as a lower achieved rate.

Shape sets (env ``DFTKERN_BENCH_SHAPES``; default ``full`` on CUDA, ``cpu`` otherwise):
    full   CUDA: LM heads of Llama-3-8B, Qwen2.5-7B, Gemma-2-2B at N = 4k/16k/32k tokens (bf16),
           DFT at G=4, K=4, T=1024 and DPO at 4 pairs, T=1024 (Llama-3-8B head).
    small  as ``full`` with N = 4k only (a quick GPU pass).
    cpu    one small fp32 shape per operation that finishes in seconds on 2 cores.

The "lean engine" shapes (:func:`lean_token_shapes`, :func:`prompt_loss_shapes`) come on top:
ignored-token fractions (prompt/padding; CUDA 50% at Llama-3-8B N=16k, CPU 75%), TRL #7244's
shape (H=4096, V=151936, N=8192, bf16; CUDA only) and DFT with 0% / 50% prompt tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = [
    "MODEL_HEADS",
    "SHAPE_SET_ENV",
    "SHAPE_SETS",
    "TokenShape",
    "LossShape",
    "head_flops",
    "default_shape_set",
    "selected_shape_set",
    "token_shapes",
    "loss_shapes",
    "lean_token_shapes",
    "prompt_loss_shapes",
    "TRL_7244_HEAD",
]

SHAPE_SET_ENV = "DFTKERN_BENCH_SHAPES"
SHAPE_SETS = ("full", "small", "cpu")

# (hidden size H, vocabulary size V) of real LM heads.
MODEL_HEADS: dict[str, tuple[int, int]] = {
    "llama3-8b": (4096, 128256),
    "qwen2.5-7b": (3584, 152064),
    "gemma2-2b": (2304, 256000),
}

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def head_flops(tokens: int, hidden_size: int, vocab_size: int) -> int:
    """FLOPs of one forward+backward pass through a ``[H -> V]`` head over ``tokens`` rows: 6*N*H*V."""
    for name, value in (("tokens", tokens), ("hidden_size", hidden_size), ("vocab_size", vocab_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return 6 * tokens * hidden_size * vocab_size


def dtype_name(dtype: torch.dtype) -> str:
    """Short name (fp32/bf16/fp16) of a floating dtype used by the suite."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"unsupported benchmark dtype {dtype}; use one of {list(_DTYPE_NAMES)}") from None


@dataclass(frozen=True)
class TokenShape:
    """A token log-probs / cross-entropy problem.

    hidden ``[tokens, hidden_size]``, weight ``[vocab_size, hidden_size]`` (both ``dtype``), labels int64 ``[tokens]``;
    a fraction ``ignore_fraction`` of the labels (random positions) is ``IGNORE_INDEX`` (prompt/padding).
    """

    model: str
    hidden_size: int
    vocab_size: int
    tokens: int
    dtype: torch.dtype
    ignore_fraction: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.ignore_fraction < 1.0:
            raise ValueError(f"ignore_fraction must be in [0, 1), got {self.ignore_fraction!r}")

    @property
    def id(self) -> str:
        suffix = f"-ign{round(100 * self.ignore_fraction)}" if self.ignore_fraction else ""
        return f"{self.model}-N{self.tokens}{suffix}"

    @property
    def flops(self) -> int:
        return head_flops(self.tokens, self.hidden_size, self.vocab_size)

    @property
    def group(self) -> str:
        ignored = f", {round(100 * self.ignore_fraction)}% ignored" if self.ignore_fraction else ""
        return (f"token_logprobs fwd+bwd | {self.model} H={self.hidden_size} V={self.vocab_size} | "
                f"N={self.tokens}{ignored} {dtype_name(self.dtype)}")

    def describe(self) -> dict:
        return {"model": self.model, "tokens": self.tokens, "hidden_size": self.hidden_size,
                "vocab_size": self.vocab_size, "dtype": dtype_name(self.dtype),
                "ignore_fraction": self.ignore_fraction}


@dataclass(frozen=True)
class LossShape:
    """A grouped sequence loss: hidden ``[groups * rows_per_group, seq_len, hidden_size]``.

    ``loss`` is "dft" (rows_per_group = 1 + K: a positive then K negatives) or "dpo"
    (rows_per_group = 2: chosen, rejected interleaved).
    """

    loss: str
    model: str
    hidden_size: int
    vocab_size: int
    groups: int
    rows_per_group: int
    seq_len: int
    prompt_len: int
    dtype: torch.dtype

    def __post_init__(self):
        if self.loss not in ("dft", "dpo"):
            raise ValueError(f"loss must be 'dft' or 'dpo', got {self.loss!r}")
        if self.loss == "dpo" and self.rows_per_group != 2:
            raise ValueError(f"dpo needs rows_per_group=2, got {self.rows_per_group}")
        if self.loss == "dft" and self.rows_per_group < 2:
            raise ValueError(f"dft needs rows_per_group = 1 + K >= 2, got {self.rows_per_group}")
        if not 0 <= self.prompt_len < self.seq_len:
            raise ValueError(f"prompt_len must be in [0, seq_len), got {self.prompt_len} (seq_len={self.seq_len})")

    @property
    def rows(self) -> int:
        return self.groups * self.rows_per_group

    @property
    def tokens(self) -> int:
        return self.rows * self.seq_len

    @property
    def num_negatives(self) -> int:
        return self.rows_per_group - 1

    @property
    def prompt_percent(self) -> int:
        return round(100 * self.prompt_len / self.seq_len)

    @property
    def id(self) -> str:
        # the default prompt is T/4 (no suffix, as in earlier results); other prompt fractions are named
        suffix = "" if 4 * self.prompt_len == self.seq_len else f"-P{self.prompt_percent}"
        return f"{self.model}-G{self.groups}x{self.rows_per_group}-T{self.seq_len}{suffix}"

    @property
    def flops(self) -> int:
        return head_flops(self.tokens, self.hidden_size, self.vocab_size)

    @property
    def group(self) -> str:
        layout = (f"G={self.groups} K={self.num_negatives}" if self.loss == "dft"
                  else f"{self.groups} pairs")
        prompt = "" if 4 * self.prompt_len == self.seq_len else f", prompt {self.prompt_percent}%"
        return (f"{self.loss}_loss fwd+bwd | {self.model} H={self.hidden_size} V={self.vocab_size} | "
                f"{layout} T={self.seq_len} (N={self.tokens}){prompt} {dtype_name(self.dtype)}")

    def describe(self) -> dict:
        return {"model": self.model, "tokens": self.tokens, "hidden_size": self.hidden_size,
                "vocab_size": self.vocab_size, "dtype": dtype_name(self.dtype), "groups": self.groups,
                "rows_per_group": self.rows_per_group, "seq_len": self.seq_len, "prompt_len": self.prompt_len}


def default_shape_set(cuda_available: bool) -> str:
    return "full" if cuda_available else "cpu"


def selected_shape_set(cuda_available: bool | None = None) -> str:
    """The shape set named by ``DFTKERN_BENCH_SHAPES`` (default: ``full`` on CUDA, ``cpu`` otherwise)."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    raw = os.environ.get(SHAPE_SET_ENV, "").strip().lower()
    if not raw:
        return default_shape_set(cuda_available)
    if raw not in SHAPE_SETS:
        raise ValueError(f"{SHAPE_SET_ENV}={raw!r} is not a shape set; choose one of {SHAPE_SETS}")
    return raw


def token_shapes(shape_set: str) -> list[TokenShape]:
    """Token log-probs shapes of a shape set (see module docstring)."""
    if shape_set == "cpu":
        return [TokenShape("cpu-small", 256, 8192, 512, torch.float32)]
    if shape_set not in ("full", "small"):
        raise ValueError(f"unknown shape set {shape_set!r}; choose one of {SHAPE_SETS}")
    token_counts = (4096,) if shape_set == "small" else (4096, 16384, 32768)
    # smallest N first for every model: when the time budget cuts a run short, the largest N go
    return [TokenShape(model, hidden, vocab, n, torch.bfloat16)
            for n in token_counts for model, (hidden, vocab) in MODEL_HEADS.items()]


def loss_shapes(shape_set: str, loss: str) -> list[LossShape]:
    """Sequence-loss shapes ("dft" or "dpo") of a shape set."""
    if loss not in ("dft", "dpo"):
        raise ValueError(f"loss must be 'dft' or 'dpo', got {loss!r}")
    rows_per_group = 5 if loss == "dft" else 2  # DFT: 1 positive + K=4 negatives (CPU: K=3)
    if shape_set == "cpu":
        if loss == "dft":
            return [LossShape("dft", "cpu-small", 256, 8192, 2, 4, 64, 16, torch.float32)]
        return [LossShape("dpo", "cpu-small", 256, 8192, 4, 2, 64, 16, torch.float32)]
    if shape_set not in ("full", "small"):
        raise ValueError(f"unknown shape set {shape_set!r}; choose one of {SHAPE_SETS}")
    hidden, vocab = MODEL_HEADS["llama3-8b"]
    return [LossShape(loss, "llama3-8b", hidden, vocab, 4, rows_per_group, 1024, 256, torch.bfloat16)]


TRL_7244_HEAD = (4096, 151936)
"""(H, V) of TRL issue #7244's measurement (H100, bf16, 8192 tokens): Qwen-size vocabulary."""


def lean_token_shapes(shape_set: str) -> list[TokenShape]:
    """Token shapes of the lean-engine rows: ignored-token fractions and TRL #7244's shape.

    cpu: the CPU token shape with 0% and 75% ignored labels (the compaction row). full/small:
    Llama-3-8B at N=16384 with 50% ignored (N=4096 for small), and TRL #7244's H=4096,
    V=151936, N=8192.
    """
    if shape_set == "cpu":
        base = token_shapes("cpu")[0]
        return [TokenShape(base.model, base.hidden_size, base.vocab_size, base.tokens, base.dtype, fraction)
                for fraction in (0.0, 0.75)]
    if shape_set not in ("full", "small"):
        raise ValueError(f"unknown shape set {shape_set!r}; choose one of {SHAPE_SETS}")
    hidden, vocab = MODEL_HEADS["llama3-8b"]
    n = 4096 if shape_set == "small" else 16384
    trl_hidden, trl_vocab = TRL_7244_HEAD
    return [TokenShape("llama3-8b", hidden, vocab, n, torch.bfloat16, 0.5),
            TokenShape("trl7244", trl_hidden, trl_vocab, 8192, torch.bfloat16)]


def prompt_loss_shapes(shape_set: str, loss: str) -> list[LossShape]:
    """The sequence-loss shape of a set at 0% and 50% prompt tokens (the default is 25%)."""
    base = loss_shapes(shape_set, loss)[0]
    return [LossShape(base.loss, base.model, base.hidden_size, base.vocab_size, base.groups, base.rows_per_group,
                      base.seq_len, prompt, base.dtype) for prompt in (0, base.seq_len // 2)]
