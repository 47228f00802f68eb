"""Every benchmarked implementation (one table row each) and the inputs they run on.

Three operations, each a scalar loss followed by ``.backward()``:

* ``token``  mean token cross-entropy ``-(1/n) sum_t log softmax(h_t W^T)[y_t]`` over the ``n``
             non-ignored of ``N`` tokens, from hidden ``[N, H]``, weight ``[V, H]``, labels ``[N]``.
* ``entropy`` the same with an entropy bonus, ``-(1/n) sum_t (logp_t + beta * H_t)``, ``H_t`` the
             entropy of the token's softmax (the RL token loss of TRL #7244); rows marked
             ``forward_only`` time the forward (log-probs and entropies, no gradient) alone.
* ``dft``    the DFT loss (Guo et al. 2025) over ``G`` groups of ``1 + K`` rows of ``T`` tokens.
* ``dpo``    the DPO loss over ``G`` (chosen, rejected) pairs of rows of ``T`` tokens.

An :class:`Implementation` knows whether it can run here (:meth:`Implementation.unavailable`
gives the skip reason), how to build a zero-argument loss closure for a problem, and a rough
upper estimate of its transient memory (used to skip rows that obviously cannot fit on the GPU
before allocating anything).

The naive rows are what most training code does: materialize ``logits = h @ W.T`` in the input
dtype, ``log_softmax`` in float32, ``gather`` the label column, sum per row, then the loss math
(for DFT this is the concatenated forward of the DFT reference code: all ``G*(1+K)`` rows in one
``[R, T, V]`` logits tensor).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .shapes import LossShape, TokenShape

__all__ = [
    "IGNORE_INDEX",
    "DPO_BETA",
    "ENTROPY_BETA",
    "DFT_TAU",
    "DFT_GAMMA",
    "TokenProblem",
    "LossProblem",
    "Implementation",
    "make_token_problem",
    "make_loss_problem",
    "naive_token_logprobs",
    "naive_entropy_loss",
    "naive_dft_loss",
    "naive_dpo_loss",
    "token_implementations",
    "entropy_implementations",
    "loss_implementations",
    "find_implementation",
    "package_version",
]

IGNORE_INDEX = -100
DPO_BETA = 0.1
DFT_TAU = 1.0
DFT_GAMMA = 0.85
ENTROPY_BETA = 0.01

LossClosure = Callable[[], torch.Tensor]
Built = tuple[LossClosure, tuple[torch.Tensor, ...]]
"""A zero-argument closure returning a scalar loss with a graph, and the leaf tensors whose
``.grad`` the backward pass fills (the harness clears them before every call)."""


# ---------------------------------------------------------------------------------------------
# Problems (inputs)
# ---------------------------------------------------------------------------------------------


@dataclass
class TokenProblem:
    """hidden ``[N, H]`` and weight ``[V, H]`` (leaves, requires_grad, shape dtype), labels int64 ``[N]``."""

    shape: TokenShape
    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor


@dataclass
class LossProblem:
    """A batch of ``R = G * rows_per_group`` rows of ``T`` tokens.

    hidden ``[R, T, H]`` and weight ``[V, H]`` are leaves (requires_grad, shape dtype); labels int64
    ``[R, T]`` hold ``IGNORE_INDEX`` on each row's prompt and padding. ``ref_logps`` is float32
    ``[G, K]`` for DFT (reference log-probs of the negatives) and ``[R]`` for DPO (per row).
    """

    shape: LossShape
    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    ref_logps: torch.Tensor


def _generator(device: torch.device, seed: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _leaf_randn(shape: tuple[int, ...], scale: float, dtype: torch.dtype, device: torch.device,
                gen: torch.Generator) -> torch.Tensor:
    values = torch.randn(shape, dtype=dtype, device=device, generator=gen)
    if scale != 1.0:
        values.mul_(scale)
    return values.requires_grad_(True)


def make_token_problem(shape: TokenShape, device: torch.device | str, seed: int = 0) -> TokenProblem:
    """Random inputs for the token op: N(0,1) hidden, N(0, 1/H) weight (logits of unit scale), uniform labels."""
    device = torch.device(device)
    gen = _generator(device, seed)
    hidden = _leaf_randn((shape.tokens, shape.hidden_size), 1.0, shape.dtype, device, gen)
    weight = _leaf_randn((shape.vocab_size, shape.hidden_size), shape.hidden_size ** -0.5, shape.dtype, device, gen)
    labels = torch.randint(0, shape.vocab_size, (shape.tokens,), device=device, generator=gen)
    if shape.ignore_fraction:
        ignored = torch.rand(shape.tokens, device=device, generator=gen) < shape.ignore_fraction
        labels = labels.masked_fill(ignored, IGNORE_INDEX)
    return TokenProblem(shape, hidden, weight, labels)


def make_loss_problem(shape: LossShape, device: torch.device | str, seed: int = 0) -> LossProblem:
    """Random inputs for a sequence loss.

    Every row has ``prompt_len`` ignored prompt tokens, a response of random length in
    ``[(T - P) / 2, T - P]`` and ignored padding after it. Reference log-probs are of the size a
    real model gives for such responses (about ``-len * log V``) plus noise.
    """
    device = torch.device(device)
    gen = _generator(device, seed)
    rows, seq_len, prompt = shape.rows, shape.seq_len, shape.prompt_len
    hidden = _leaf_randn((rows, seq_len, shape.hidden_size), 1.0, shape.dtype, device, gen)
    weight = _leaf_randn((shape.vocab_size, shape.hidden_size), shape.hidden_size ** -0.5, shape.dtype, device, gen)
    labels = torch.randint(0, shape.vocab_size, (rows, seq_len), device=device, generator=gen)
    max_response = seq_len - prompt
    response_len = torch.randint(max(1, max_response // 2), max_response + 1, (rows,), device=device, generator=gen)
    position = torch.arange(seq_len, device=device).unsqueeze(0)
    in_response = (position >= prompt) & (position < prompt + response_len.unsqueeze(1))
    labels = labels.masked_fill(~in_response, IGNORE_INDEX)
    noise = torch.randn(rows, device=device, generator=gen)
    ref_rows = -response_len.float() * math.log(shape.vocab_size) + noise * response_len.float().sqrt()
    if shape.loss == "dft":
        ref_logps = ref_rows.view(shape.groups, shape.rows_per_group)[:, 1:].contiguous()
    else:
        ref_logps = ref_rows
    return LossProblem(shape, hidden, weight, labels, ref_logps)


# ---------------------------------------------------------------------------------------------
# Naive reference math (materialized logits)
# ---------------------------------------------------------------------------------------------


def naive_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """float32 log-probs of ``labels`` (shape ``labels.shape``; 0 where ignored) via full logits.

    hidden ``[..., H]``, weight ``[V, H]`` in the same dtype; logits ``[..., V]`` are materialized
    in that dtype, then a float32 log_softmax and a gather.
    """
    logits = hidden @ weight.T
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(labels == ignore_index, 0.0)


def _valid_count(labels: torch.Tensor) -> torch.Tensor:
    return (labels != IGNORE_INDEX).sum().clamp_min(1)


def _naive_token_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return -naive_token_logprobs(hidden, weight, labels).sum() / _valid_count(labels)


def naive_entropy_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                       beta: float = ENTROPY_BETA, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``-(1/n) sum_t (logp_t + beta * H_t)`` over non-ignored tokens via full logits (input dtype),
    fp32 log_softmax, gather and ``H = -sum_v p_v log p_v``."""
    logp_all = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    picked = logp_all.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    keep = labels != ignore_index
    return -torch.where(keep, picked + beta * entropy, torch.zeros_like(picked)).sum() / _valid_count(labels)


def naive_dft_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ref_logps: torch.Tensor,
                   u_prev: torch.Tensor, *, num_negatives: int, tau: float = DFT_TAU,
                   gamma: float = DFT_GAMMA) -> tuple[torch.Tensor, torch.Tensor]:
    """DFT loss with one concatenated forward over all rows (the reference code's way).

    hidden ``[G*(1+K), T, H]``, labels ``[G*(1+K), T]``, ref_logps float32 ``[G, K]``, u_prev
    float32 ``[G]``. Returns ``(loss scalar float32, u_new [G] detached)``.
    """
    k = num_negatives
    seq = naive_token_logprobs(hidden, weight, labels).sum(dim=-1).view(-1, 1 + k)
    pos, neg = seq[:, 0], seq[:, 1:]
    d = neg.detach() / tau - ref_logps
    u_new = torch.logaddexp(math.log1p(-gamma) + u_prev, math.log(gamma) + torch.logsumexp(d, dim=1) - math.log(k))
    omega = torch.exp(d - u_new.unsqueeze(1))
    loss = (-pos + (omega * neg).mean(dim=1)).mean()
    return loss, u_new.detach()


def naive_dpo_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ref_logps: torch.Tensor,
                   *, beta: float = DPO_BETA) -> torch.Tensor:
    """DPO ``mean -log sigmoid(beta * ((s_c - r_c) - (s_r - r_r)))``; rows interleaved (chosen, rejected).

    hidden ``[2G, T, H]``, labels ``[2G, T]``, ref_logps float32 ``[2G]``.
    """
    seq = naive_token_logprobs(hidden, weight, labels).sum(dim=-1)
    logratio = (seq - ref_logps).view(-1, 2)
    return -F.logsigmoid(beta * (logratio[:, 0] - logratio[:, 1])).mean()


# ---------------------------------------------------------------------------------------------
# Implementation registry
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Implementation:
    """One benchmark row kind.

    Attributes:
        name: row label (also the pytest id), e.g. ``dftkern-triton-fused``.
        family: "dftkern", "naive" or "peer" (peers and naive rows form the "best peer" baseline).
        description: one line for the docs/report.
        check: returns a skip reason (missing package, wrong device) or None when runnable.
        builder: ``builder(problem) -> (loss_closure, leaves)``.
        workspace: ``workspace(shape) -> bytes``, a rough upper bound of transient memory beyond
            the inputs and their gradients (only used to skip hopeless rows before allocating).
        compiles: uses torch.compile (expensive first call; skipped in CPU smoke runs).
        options: engine/schedule/impl settings recorded in the row's extra_info.
        forward_only: the step is the forward alone (no gradient; own group, FLOPs 2NHV).
    """

    name: str
    family: str
    description: str
    check: Callable[[torch.device], str | None]
    builder: Callable[[object], Built]
    workspace: Callable[[object], int]
    compiles: bool = False
    options: dict = field(default_factory=dict)
    forward_only: bool = False

    def unavailable(self, device: torch.device) -> str | None:
        return self.check(torch.device(device))

    def build(self, problem) -> Built:
        return self.builder(problem)


def package_version(dist_name: str) -> str | None:
    """Installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _import_error(module: str) -> str | None:
    """None when ``module`` imports; else "not installed" or "not importable (<error>)"."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            return "not installed"
        return f"not importable (ModuleNotFoundError: {exc})"
    except Exception as exc:  # a broken install can raise anything
        return f"not importable ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
    return None


def _needs(module: str, pip_name: str) -> Callable[[torch.device], str | None]:
    def check(device: torch.device) -> str | None:
        err = _import_error(module)
        return None if err is None else f"{pip_name} {err}"
    return check


def _needs_cuda(module: str, pip_name: str, why: str) -> Callable[[torch.device], str | None]:
    installed = _needs(module, pip_name)

    def check(device: torch.device) -> str | None:
        reason = installed(device)
        if reason is not None:
            return reason
        if device.type != "cuda":
            return f"{pip_name} needs CUDA ({why})"
        return None
    return check


def _always(device: torch.device) -> str | None:
    return None


def _dftkern_check(backend: str) -> Callable[[torch.device], str | None]:
    def check(device: torch.device) -> str | None:
        err = _import_error("dftkern")
        if err is not None:
            return f"dftkern {err}"
        if backend == "triton":
            if device.type != "cuda":
                return "dftkern's Triton engine needs CUDA (the CPU interpreter is not a speed measure)"
            triton_err = _import_error("triton")
            if triton_err is not None:
                return f"triton {triton_err}"
        return None
    return check


def _dftkern_loss_check(backend: str, function: str) -> Callable[[torch.device], str | None]:
    base = _dftkern_check(backend)

    def check(device: torch.device) -> str | None:
        reason = base(device)
        if reason is not None:
            return reason
        import dftkern

        fn = getattr(dftkern, function, None)
        if fn is None:
            return f"dftkern has no {function} yet"
        params = inspect.signature(fn).parameters
        missing = [p for p in ("backend", "schedule", "chunk_bytes") if p not in params]
        if missing and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return f"dftkern.{function} does not take {', '.join(missing)}"
        return None
    return check


def _elem_bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


_GIB = 1 << 30


def _default_chunk_bytes(device_is_cuda: bool) -> int:
    return _GIB if device_is_cuda else 256 << 20


def _naive_workspace(shape) -> int:
    # logits (input dtype) + fp32 copy + fp32 log_softmax in forward; in backward the saved fp32
    # log-probs, the dense fp32 gather gradient, the fp32 log_softmax gradient and its cast.
    e = _elem_bytes(shape.dtype)
    per_entry = 12 + e if e != 4 else 12
    return per_entry * shape.tokens * shape.vocab_size


def _compiled_workspace(shape) -> int:
    # inductor fuses log_softmax+gather: logits kept for backward and one dense logits gradient
    e = _elem_bytes(shape.dtype)
    return (2 * e + 4) * shape.tokens * shape.vocab_size


def _chunked_workspace(shape) -> int:
    # chunked/fused kernels: a bounded logits chunk, an fp32 weight-gradient accumulator and
    # per-token scratch
    e = _elem_bytes(shape.dtype)
    return _GIB + 4 * shape.vocab_size * shape.hidden_size + 4 * shape.tokens * shape.hidden_size * e


# ---- token op -------------------------------------------------------------------------------

_COMPILED: dict[str, Callable] = {}


def _compiled(key: str, fn: Callable) -> Callable:
    """One ``torch.compile(dynamic=True)`` wrapper per function per process.

    Dynamic shapes: one compilation serves all 9 GPU shapes (static shapes would recompile as
    N, H and V change, ~30 s each, most of the GPU run's time budget).
    """
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, dynamic=True)
    return _COMPILED[key]


def _build_dftkern_token(backend: str) -> Callable[[TokenProblem], Built]:
    def build(p: TokenProblem) -> Built:
        from dftkern import fused_linear_logprobs

        n = _valid_count(p.labels)

        def loss() -> torch.Tensor:
            return -(fused_linear_logprobs(p.hidden, p.weight, p.labels, backend=backend).sum() / n)
        return loss, (p.hidden, p.weight)
    return build


def _build_dftkern_ce(backend: str, accum_dtype: str = "fp32",
                      chunk_bytes: int | None = None) -> Callable[[TokenProblem], Built]:
    def build(p: TokenProblem) -> Built:
        from dftkern import fused_linear_cross_entropy

        def loss() -> torch.Tensor:
            return fused_linear_cross_entropy(p.hidden, p.weight, p.labels, reduction="mean", backend=backend,
                                              accum_dtype=accum_dtype, chunk_bytes=chunk_bytes)
        return loss, (p.hidden, p.weight)
    return build


def _naive_builders(fn: Callable, key: str) -> tuple[Callable[[TokenProblem], Built], Callable[[TokenProblem], Built]]:
    """Builders of ``fn(hidden, weight, labels)`` as is, and of its ``torch.compile``."""
    def plain(p: TokenProblem) -> Built:
        return (lambda: fn(p.hidden, p.weight, p.labels)), (p.hidden, p.weight)

    def compiled(p: TokenProblem) -> Built:
        compiled_fn = _compiled(key, fn)
        return (lambda: compiled_fn(p.hidden, p.weight, p.labels)), (p.hidden, p.weight)
    return plain, compiled


_build_naive_token, _build_compiled_token = _naive_builders(_naive_token_loss, "naive_token_loss")


def _torch_lce_check(device: torch.device) -> str | None:
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return (f"torch {torch.__version__} lacks F.linear_cross_entropy with LinearCrossEntropyOptions "
                "(its chunked path; torch >= 2.13)")
    return None


def _build_torch_lce(p: TokenProblem) -> Built:
    options = torch.nn.LinearCrossEntropyOptions()  # chunked path, per-(device, dtype) auto policy

    def loss() -> torch.Tensor:
        return F.linear_cross_entropy(p.hidden, p.weight, p.labels, reduction="mean",
                                      ignore_index=IGNORE_INDEX, options=options)
    return loss, (p.hidden, p.weight)


def _build_liger_flce(p: TokenProblem) -> Built:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    module = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="mean")
    return (lambda: module(p.weight, p.hidden, p.labels)), (p.hidden, p.weight)


def _cce_kwargs(exact: bool) -> dict:
    """CCE's exact mode: impl "cce_exact" where the installed version has it, else filter_eps=None
    (no gradient filtering; the same computation in cut-cross-entropy 25.1.x)."""
    if not exact:
        return {"impl": "cce"}
    from cut_cross_entropy import LinearCrossEntropyImpl

    if "CCE_EXACT" in LinearCrossEntropyImpl.__members__:
        return {"impl": "cce_exact"}
    return {"impl": "cce", "filter_eps": None}


def _build_cce(exact: bool) -> Callable[[TokenProblem], Built]:
    def build(p: TokenProblem) -> Built:
        from cut_cross_entropy import linear_cross_entropy

        kwargs = _cce_kwargs(exact)

        def loss() -> torch.Tensor:
            return linear_cross_entropy(p.hidden, p.weight, p.labels, ignore_index=IGNORE_INDEX,
                                        reduction="mean", **kwargs)
        return loss, (p.hidden, p.weight)
    return build


def token_implementations() -> list[Implementation]:
    """All rows of the token log-probs / cross-entropy benchmark, in table order."""
    rows = [
        Implementation(f"dftkern-{backend}", "dftkern",
                       f"dftkern.fused_linear_logprobs(backend='{backend}'), mean of -logp",
                       _dftkern_check(backend), _build_dftkern_token(backend), _chunked_workspace,
                       options={"backend": backend})
        for backend in ("triton", "torch")
    ]
    rows += [
        Implementation(f"dftkern-{backend}-ce", "dftkern",
                       f"dftkern.fused_linear_cross_entropy(backend='{backend}'): mean CE, gradients in the "
                       "forward (6NHV)",
                       _dftkern_check(backend), _build_dftkern_ce(backend), _chunked_workspace,
                       options={"backend": backend, "schedule": "fused"})
        for backend in ("triton", "torch")
    ]
    rows += [
        Implementation(f"dftkern-{backend}-ce-wacc", "dftkern",
                       f"dftkern.fused_linear_cross_entropy(backend='{backend}', accum_dtype='weight'): dW "
                       "accumulated across chunks in the weight's dtype (no fp32 [V, H] buffer)",
                       _dftkern_check(backend), _build_dftkern_ce(backend, "weight"), _chunked_workspace,
                       options={"backend": backend, "schedule": "fused", "accum_dtype": "weight"})
        for backend in ("triton", "torch")
    ]
    # a smaller chunk budget than the CE default (4 GiB on CUDA): the memory/time trade-off that
    # the defaults should be chosen from (CUDA only: on CPU the default is already 256 MiB)
    rows += [
        Implementation(f"dftkern-triton-ce-{acc_name}-512M", "dftkern",
                       f"dftkern.fused_linear_cross_entropy(backend='triton', accum_dtype='{accum}', "
                       "chunk_bytes=512 MiB)",
                       _dftkern_check("triton"), _build_dftkern_ce("triton", accum, 512 << 20),
                       _chunked_workspace, options={"backend": "triton", "schedule": "fused",
                                                    "accum_dtype": accum, "chunk_bytes": 512 << 20})
        for acc_name, accum in (("fp32acc", "fp32"), ("wacc", "weight"))
    ]
    rows += [
        Implementation("naive", "naive", "logits = h @ W.T (input dtype), fp32 log_softmax, gather",
                       _always, _build_naive_token, _naive_workspace),
        Implementation("naive-compile", "naive", "torch.compile(dynamic=True) of the naive code",
                       _always, _build_compiled_token, _compiled_workspace, compiles=True),
        Implementation("torch-lce", "peer",
                       "torch.nn.functional.linear_cross_entropy(options=LinearCrossEntropyOptions())",
                       _torch_lce_check, _build_torch_lce, _chunked_workspace,
                       options={"options": "LinearCrossEntropyOptions() (auto chunking/acc policy)"}),
        Implementation("liger-flce", "peer", "Liger-Kernel LigerFusedLinearCrossEntropyLoss",
                       _needs_cuda("liger_kernel.transformers", "liger-kernel", "its fused linear CE is Triton-only"),
                       _build_liger_flce, _chunked_workspace),
        Implementation("cce", "peer", "cut_cross_entropy.linear_cross_entropy(impl='cce')",
                       _needs_cuda("cut_cross_entropy", "cut-cross-entropy", "Triton kernels"),
                       _build_cce(False), _chunked_workspace, options={"impl": "cce"}),
        Implementation("cce-exact", "peer",
                       "cut_cross_entropy.linear_cross_entropy, exact mode (no gradient filtering)",
                       _needs_cuda("cut_cross_entropy", "cut-cross-entropy", "Triton kernels"),
                       _build_cce(True), _chunked_workspace, options={"impl": "cce_exact"}),
    ]
    return rows


# ---- token loss with entropy (TRL #7244) -------------------------------------------------------


def _build_dftkern_entropy(backend: str, fused: bool) -> Callable[[TokenProblem], Built]:
    def build(p: TokenProblem) -> Built:
        import dftkern

        n = _valid_count(p.labels)
        if fused:
            def token_loss(logp, entropy, index):
                return -(logp + ENTROPY_BETA * entropy) / n.to(logp.dtype)

            def loss() -> torch.Tensor:
                return dftkern.fused_token_loss(p.hidden, p.weight, p.labels, token_loss=token_loss, backend=backend)
        else:
            def loss() -> torch.Tensor:
                logp, entropy = dftkern.fused_linear_logprobs(p.hidden, p.weight, p.labels, backend=backend,
                                                              return_entropy=True)
                return -(logp.sum() + ENTROPY_BETA * entropy.sum()) / n
        return loss, (p.hidden, p.weight)
    return build


def _build_dftkern_entropy_forward(backend: str) -> Callable[[TokenProblem], Built]:
    def build(p: TokenProblem) -> Built:
        import dftkern

        def forward() -> torch.Tensor:
            with torch.no_grad():
                logp, entropy = dftkern.fused_linear_logprobs(p.hidden, p.weight, p.labels, backend=backend,
                                                              return_entropy=True)
            return logp.sum() + entropy.sum()
        return forward, (p.hidden, p.weight)
    return build


_build_naive_entropy, _build_compiled_entropy = _naive_builders(naive_entropy_loss, "naive_entropy_loss")


def _build_naive_entropy_forward(p: TokenProblem) -> Built:
    def forward() -> torch.Tensor:
        with torch.no_grad():
            return naive_entropy_loss(p.hidden, p.weight, p.labels)
    return forward, (p.hidden, p.weight)


def _bare_gemm_loss(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (hidden @ weight.T).sum()


def _build_bare_gemm(p: TokenProblem) -> Built:
    return (lambda: _bare_gemm_loss(p.hidden, p.weight)), (p.hidden, p.weight)


def _build_bare_gemm_forward(p: TokenProblem) -> Built:
    def forward() -> torch.Tensor:
        with torch.no_grad():
            return (p.hidden @ p.weight.T).sum()
    return forward, (p.hidden, p.weight)


def _logits_workspace(shape) -> int:
    return _elem_bytes(shape.dtype) * shape.tokens * shape.vocab_size * 2


def entropy_implementations() -> list[Implementation]:
    """Rows of the entropy benchmark (loss ``-(1/n) sum (logp + beta H)``), in table order.

    Family "floor" (the bare head GEMM, the same products without any softmax) is shown for
    reference and is not a peer.
    """
    rows = []
    for backend in ("triton", "torch"):
        rows += [
            Implementation(f"dftkern-{backend}-entropy", "dftkern",
                           f"dftkern.fused_linear_logprobs(return_entropy=True, backend='{backend}') + autograd (8NHV)",
                           _dftkern_check(backend), _build_dftkern_entropy(backend, fused=False), _chunked_workspace,
                           options={"backend": backend}),
            Implementation(f"dftkern-{backend}-token-loss", "dftkern",
                           f"dftkern.fused_token_loss(backend='{backend}'): entropy-bonus loss, gradients in the "
                           "forward (6NHV)",
                           _dftkern_check(backend), _build_dftkern_entropy(backend, fused=True), _chunked_workspace,
                           options={"backend": backend, "schedule": "fused"}),
            Implementation(f"dftkern-{backend}-entropy-fwd", "dftkern",
                           f"forward only: fused_linear_logprobs(return_entropy=True, backend='{backend}'), no grad",
                           _dftkern_check(backend), _build_dftkern_entropy_forward(backend), _chunked_workspace,
                           options={"backend": backend}, forward_only=True),
        ]
    rows += [
        Implementation("naive", "naive", "logits = h @ W.T (input dtype), fp32 log_softmax, gather, entropy",
                       _always, _build_naive_entropy, _naive_workspace),
        Implementation("naive-compile", "naive", "torch.compile(dynamic=True) of the naive entropy code",
                       _always, _build_compiled_entropy, _compiled_workspace, compiles=True),
        Implementation("bare-gemm", "floor", "logits = h @ W.T and logits.sum().backward(): the head's products alone",
                       _always, _build_bare_gemm, _logits_workspace),
        Implementation("naive-fwd", "naive", "forward only: logits, fp32 log_softmax, gather, entropy (no grad)",
                       _always, _build_naive_entropy_forward, _naive_workspace, forward_only=True),
        Implementation("bare-gemm-fwd", "floor", "forward only: logits = h @ W.T (the bare forward GEMM)",
                       _always, _build_bare_gemm_forward, _logits_workspace, forward_only=True),
    ]
    return rows


# ---- sequence losses ------------------------------------------------------------------------

SCHEDULES = ("fused", "recompute")


def fused_schedule_chunk_bytes(shape: LossShape, device_is_cuda: bool) -> int:
    """A chunk budget large enough for one whole group (so the "fused" schedule applies).

    A token row needs at most 8 bytes per vocabulary entry (fp32 logits + a gradient buffer);
    never below dftkern's device default.
    """
    group_tokens = shape.rows_per_group * shape.seq_len
    needed = group_tokens * shape.vocab_size * 8
    needed = -(-needed // (1 << 20)) * (1 << 20)  # round up to MiB
    return max(needed, _default_chunk_bytes(device_is_cuda))


def _dftkern_loss_workspace(schedule: str) -> Callable[[LossShape], int]:
    def workspace(shape: LossShape) -> int:
        base = _chunked_workspace(shape)
        if schedule == "fused":
            base += fused_schedule_chunk_bytes(shape, True)
        return base
    return workspace


def _build_dftkern_loss(backend: str, schedule: str) -> Callable[[LossProblem], Built]:
    def build(p: LossProblem) -> Built:
        import dftkern

        shape = p.shape
        kwargs = {"backend": backend, "schedule": schedule}
        if schedule == "fused":
            kwargs["chunk_bytes"] = fused_schedule_chunk_bytes(shape, p.hidden.device.type == "cuda")
        if shape.loss == "dft":
            state = dftkern.DFTState(shape.groups).to(p.hidden.device)
            ids = torch.arange(shape.groups, device=p.hidden.device)

            def loss() -> torch.Tensor:
                return dftkern.fused_dft_loss(p.hidden, p.weight, p.labels, num_negatives=shape.num_negatives,
                                              ids=ids, state=state, ref_logps=p.ref_logps, tau=DFT_TAU,
                                              gamma=DFT_GAMMA, variant="dft", **kwargs)
        else:
            def loss() -> torch.Tensor:
                return dftkern.fused_preference_loss(p.hidden, p.weight, p.labels, loss="dpo", beta=DPO_BETA,
                                                     ref_logps=p.ref_logps, **kwargs)
        return loss, (p.hidden, p.weight)
    return build


def _dpo_group_loss(ref_logps: torch.Tensor):
    def group_loss(seq_sums, counts, g0, g1):
        logratio = (seq_sums.float() - ref_logps[2 * g0:2 * g1]).view(-1, 2)
        return -F.logsigmoid(DPO_BETA * (logratio[:, 0] - logratio[:, 1])), {}
    return group_loss


def _build_dftkern_dpo_pair_chunks(backend: str, accum_dtype: str) -> Callable[[LossProblem], Built]:
    """DPO through ``grouped_sequence_loss`` with one pair per chunk (the smallest fused budget), so
    that ``dW`` is accumulated across chunks in ``accum_dtype``."""
    def build(p: LossProblem) -> Built:
        import dftkern

        shape = p.shape
        budget = 2 * shape.seq_len * shape.vocab_size * 4  # one pair's fp32 logits

        def loss() -> torch.Tensor:
            return dftkern.grouped_sequence_loss(p.hidden, p.weight, p.labels, rows_per_group=2,
                                                 group_loss=_dpo_group_loss(p.ref_logps), backend=backend,
                                                 schedule="fused", chunk_bytes=budget, accum_dtype=accum_dtype)[0]
        return loss, (p.hidden, p.weight)
    return build


def _build_naive_loss(p: LossProblem) -> Built:
    shape = p.shape
    if shape.loss == "dft":
        u = torch.zeros(shape.groups, dtype=torch.float32, device=p.hidden.device)  # DFTState init=0.0

        def loss() -> torch.Tensor:
            nonlocal u
            value, u = naive_dft_loss(p.hidden, p.weight, p.labels, p.ref_logps, u,
                                      num_negatives=shape.num_negatives)
            return value
    else:
        def loss() -> torch.Tensor:
            return naive_dpo_loss(p.hidden, p.weight, p.labels, p.ref_logps)
    return loss, (p.hidden, p.weight)


LIGER_DPO_COMPILED = True
"""Liger's default (torch.compile of its per-chunk step); the self-tests turn it off for speed."""


def _build_liger_dpo(p: LossProblem) -> Built:
    """Liger's chunked DPO wants chosen rows first, then rejected ([2G, T, H]); the reordered hidden
    is its own leaf. It has no precomputed-reference input (only a reference *model*), so it runs
    with use_ref_model=False: reference log-probs 0, the same compute as subtracting given ones."""
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    order = torch.cat([torch.arange(0, p.shape.rows, 2), torch.arange(1, p.shape.rows, 2)]).to(p.hidden.device)
    hidden = p.hidden.detach()[order].clone().requires_grad_(True)
    labels = p.labels[order].contiguous()
    module = LigerFusedLinearDPOLoss(ignore_index=IGNORE_INDEX, beta=DPO_BETA, compute_nll_loss=False,
                                     compiled=LIGER_DPO_COMPILED, use_ref_model=False, average_log_prob=False)

    def loss() -> torch.Tensor:
        out = module(p.weight, hidden, labels)
        return out[0] if isinstance(out, tuple) else out
    return loss, (hidden, p.weight)


def _liger_dpo_workspace(shape: LossShape) -> int:
    # one pair per chunk: fp32 logits and their gradient for 2*T tokens, plus fp32 grad accumulators
    return 3 * 4 * 2 * shape.seq_len * shape.vocab_size + 4 * shape.vocab_size * shape.hidden_size + _GIB


def loss_implementations(loss: str) -> list[Implementation]:
    """All rows of a sequence-loss benchmark ("dft" or "dpo"), in table order."""
    if loss not in ("dft", "dpo"):
        raise ValueError(f"loss must be 'dft' or 'dpo', got {loss!r}")
    function = "fused_dft_loss" if loss == "dft" else "fused_preference_loss"
    rows = [
        Implementation(f"dftkern-{backend}-{schedule}", "dftkern",
                       f"dftkern.{function}(backend='{backend}', schedule='{schedule}')",
                       _dftkern_loss_check(backend, function), _build_dftkern_loss(backend, schedule),
                       _dftkern_loss_workspace(schedule), options={"backend": backend, "schedule": schedule})
        for backend in ("triton", "torch") for schedule in SCHEDULES
    ]
    if loss == "dpo":
        rows += [
            Implementation(f"dftkern-triton-pairchunks-{name}", "dftkern",
                           f"dftkern.grouped_sequence_loss (DPO), one pair per chunk, accum_dtype='{accum}'",
                           _dftkern_check("triton"), _build_dftkern_dpo_pair_chunks("triton", accum),
                           _dftkern_loss_workspace("fused"),
                           options={"backend": "triton", "schedule": "fused", "accum_dtype": accum,
                                    "chunk": "one pair"})
            for name, accum in (("fp32acc", "fp32"), ("wacc", "weight"))
        ]
    rows.append(Implementation("naive", "naive",
                               "concatenated forward: full logits, fp32 log_softmax, gather, sum per row, loss math",
                               _always, _build_naive_loss, _naive_workspace))
    if loss == "dpo":
        rows.append(Implementation("liger-dpo", "peer",
                                   "Liger-Kernel LigerFusedLinearDPOLoss (chunked, torch.compile, no ref model)",
                                   _needs("liger_kernel.chunked_loss", "liger-kernel"), _build_liger_dpo,
                                   _liger_dpo_workspace, compiles=True,
                                   options={"chunk_size": 1, "compiled": True, "use_ref_model": False}))
    return rows


def find_implementation(operation: str, name: str) -> Implementation:
    """The implementation ``name`` of ``operation`` ("token", "entropy", "dft" or "dpo")."""
    if operation == "token":
        rows = token_implementations()
    elif operation == "entropy":
        rows = entropy_implementations()
    elif operation in ("dft", "dpo"):
        rows = loss_implementations(operation)
    else:
        raise ValueError(f"operation must be 'token', 'entropy', 'dft' or 'dpo', got {operation!r}")
    for impl in rows:
        if impl.name == name:
            return impl
    raise ValueError(f"no implementation {name!r} for operation {operation!r}; have {[r.name for r in rows]}")
