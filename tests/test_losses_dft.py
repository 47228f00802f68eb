"""DFT / DFT2 (:func:`dftkern.fused_dft_loss`) against a float64 restatement of the formulas.

The reference (:func:`reference_dft`) materializes the full float64 logits, takes ``log_softmax``
and gathers: it shares nothing with the chunked kernels. Covered here:

* loss, gradients (hidden, weight, bias) and every ``return_stats`` entry, on the torch engine
  and on the Triton engine (run on CPU under ``TRITON_INTERPRET=1``), under both schedules,
  for K = 1 and K = 8, ragged responses and rows with no scored token;
* two consecutive steps with a :class:`dftkern.DFTState` (the ``u`` trajectory), ``gamma = 1``
  versus ``state=None``, the per-variant default ``tau``/``gamma``;
* the schedules: "fused" == "recompute", "auto" choosing between them by the chunk budget,
  "fused" over several chunks of groups == one chunk, "fused" refusing a too-small budget;
* the packed layout (``cu_seqlens``) == the padded one;
* argument errors, each naming the bad argument and leaving the state untouched.
"""

from __future__ import annotations

import math

import pytest
import torch
from _reference import GRAD_TOL, make_ragged_rows, reference_sequence_logprobs, relative_error

import dftkern.functional as functional
from dftkern import DFTState, fused_dft_loss
from dftkern.losses import DFT_DEFAULTS

IGNORE = -100
LOSS_RTOL = 1e-5
"""Loss error allowed, relative to the size of the terms it sums (see :func:`assert_loss_close`)."""


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------


def make_groups(n_groups: int, k: int, seq_len: int, hidden_size: int, vocab_size: int, *, seed: int,
                empty_rows: tuple[int, ...] = (), with_bias: bool = True):
    """Seeded padded DFT batch: ``hidden [G*(1+K), T, H]``, ``weight [V, H]``, ``labels``, ``bias [V] | None``.

    Every row gets a random prompt (0-2 ignored tokens) and a random response length >= 1 (the
    rest is padding = ``IGNORE``), so token counts differ from row to row; rows listed in
    ``empty_rows`` have every label ignored (no scored token at all).
    """
    return make_ragged_rows(n_groups * (1 + k), seq_len, hidden_size, vocab_size, seed=seed, empty_rows=empty_rows,
                            with_bias=with_bias, ignore_index=IGNORE)


def make_ref_logps(hidden, weight, labels, bias, k: int, *, seed: int, cu_seqlens=None) -> torch.Tensor:
    """float32 ``[G, K]`` reference log-probs of the negatives: the policy's own (float64) plus N(0, 1) noise."""
    with torch.no_grad():
        sums = reference_sequence_logprobs(hidden, weight, labels, bias=bias, cu_seqlens=cu_seqlens)
    sums = sums.reshape(-1, 1 + k)[:, 1:]
    noise = torch.randn(sums.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (sums + noise).float()


def count_tokens(labels: torch.Tensor, cu_seqlens=None) -> torch.Tensor:
    scored = (labels != IGNORE).to(torch.float64)
    if cu_seqlens is None:
        return scored.sum(-1)
    bounds = [int(b) for b in cu_seqlens]
    return torch.stack([scored[a:b].sum() for a, b in zip(bounds, bounds[1:])])


# ---------------------------------------------------------------------------------------------
# the float64 restatement
# ---------------------------------------------------------------------------------------------


def reference_dft(hidden, weight, labels, bias, *, k: int, variant: str, tau: float, gamma: float,
                  ref_logps=None, u_prev=None, cu_seqlens=None) -> dict:
    """DFT / DFT2 in float64 from full logits, with autograd gradients.

    ``u_prev`` (float ``[G]``) is the state's value for each group before the step, or None for
    the stateless batch estimate. The moving average is written in linear space,
    ``u = log((1 - gamma) exp(u_prev) + gamma * mean_j exp(d_ij))``, which is the
    documented log-space update. Returns float64 tensors: ``loss`` and the gradients
    ``grad_hidden``/``grad_weight``/``grad_bias`` plus every statistic ``fused_dft_loss``
    reports.
    """
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    b = None if bias is None else bias.detach().double().requires_grad_(True)
    sums = reference_sequence_logprobs(h, w, labels, bias=b, cu_seqlens=cu_seqlens)
    counts = count_tokens(labels, cu_seqlens)
    n_groups = sums.numel() // (1 + k)
    if variant == "dft":
        scores = sums.reshape(n_groups, 1 + k)
    else:
        means = torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros_like(sums))
        scores = means.reshape(n_groups, 1 + k)
    pos, neg = scores[:, 0], scores[:, 1:]
    d = neg.detach() / tau
    if variant == "dft":
        d = d - ref_logps.double()
    batch_mean = torch.exp(d).mean(dim=1)  # (1/K) sum_j exp(d_ij)
    if u_prev is None:
        u = torch.log(batch_mean)
    else:
        u = torch.log((1.0 - gamma) * torch.exp(u_prev.double()) + gamma * batch_mean)
    weights = torch.exp(d - u[:, None])
    group_losses = -pos + (weights * neg).mean(dim=1)
    loss = group_losses.mean()
    loss.backward()
    # size of the terms the loss sums: the fp32 error budget scales with it, not with the loss
    scale = (pos.abs() + (weights * neg.abs()).mean(dim=1)).mean().detach()
    return {"loss": loss.detach(), "grad_hidden": h.grad, "grad_weight": w.grad,
            "grad_bias": None if b is None else b.grad, "seq_logps": sums.detach(), "token_counts": counts,
            "scores": scores.detach(), "d": d, "u": u.detach(), "weights": weights.detach(),
            "group_losses": group_losses.detach(), "scale": float(scale)}


def run_dft(hidden, weight, labels, bias, **kwargs) -> dict:
    """``fused_dft_loss`` on fresh leaf copies; backprop the loss; return loss, grads and stats."""
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    b = None if bias is None else bias.detach().clone().requires_grad_(True)
    loss, stats = fused_dft_loss(h, w, labels, bias=b, return_stats=True, **kwargs)
    loss.backward()
    return dict(stats, loss=loss.detach(), grad_hidden=h.grad, grad_weight=w.grad,
                grad_bias=None if b is None else b.grad)


def assert_loss_close(actual: torch.Tensor, expected: torch.Tensor, scale: float, rtol: float = LOSS_RTOL):
    """``|actual - expected| <= rtol * scale`` (the loss is a difference of sums of many log-probs)."""
    assert actual.shape == expected.shape
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= rtol * max(scale, 1.0), f"loss error {err:.3e} > {rtol} * {scale:.3e}"


def assert_grads_close(ours: dict, ref: dict, tol: float = GRAD_TOL):
    for name in ("grad_hidden", "grad_weight", "grad_bias"):
        if ref[name] is None:
            assert ours[name] is None, f"unexpected {name}"
            continue
        assert ours[name] is not None, f"missing {name}"
        assert ours[name].dtype == torch.float32
        err = relative_error(ours[name], ref[name])
        assert err <= tol, f"{name} relative error {err:.3e} > {tol}"


def assert_stats_match(ours: dict, ref: dict):
    """Every statistic of ``return_stats`` against the float64 reference."""
    scale = ref["scale"]
    for name in ("seq_logps", "scores", "group_losses"):
        assert_loss_close(ours[name], ref[name], scale)
    torch.testing.assert_close(ours["token_counts"].double(), ref["token_counts"], rtol=0, atol=0)
    for name in ("d", "u"):  # log-space quantities: absolute error
        torch.testing.assert_close(ours[name].double(), ref[name], rtol=0, atol=1e-4)
    err = relative_error(ours["weights"], ref["weights"])
    assert err <= 1e-4, f"weights relative error {err:.3e}"


# ---------------------------------------------------------------------------------------------
# loss, gradients and statistics vs float64
# ---------------------------------------------------------------------------------------------

# (G, K, T, H, V, rows without any scored token): a zero-token negative and a zero-token positive
CASES = {
    "K1": (3, 1, 7, 16, 131, (3,)),
    "K8": (2, 8, 6, 16, 257, (0, 5, 13)),
}


@pytest.mark.parametrize("schedule", ["fused", "recompute"])
@pytest.mark.parametrize("variant", ["dft", "dft2"])
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_matches_float64_reference(backend, case, variant, schedule):
    n_groups, k, seq_len, hidden_size, vocab, empty = case
    hidden, weight, labels, bias = make_groups(n_groups, k, seq_len, hidden_size, vocab, seed=11 + k,
                                               empty_rows=empty, with_bias=(k == 8))
    tau = 0.7 if variant == "dft" else 0.3
    ref_logps = make_ref_logps(hidden, weight, labels, bias, k, seed=5) if variant == "dft" else None
    ours = run_dft(hidden, weight, labels, bias, num_negatives=k, ref_logps=ref_logps, tau=tau, variant=variant,
                   backend=backend, schedule=schedule)
    ref = reference_dft(hidden, weight, labels, bias, k=k, variant=variant, tau=tau, gamma=0.85,
                        ref_logps=ref_logps)
    assert ours["loss"].dtype == torch.float32 and ours["loss"].dim() == 0
    assert_loss_close(ours["loss"], ref["loss"], ref["scale"])
    assert_grads_close(ours, ref)
    assert_stats_match(ours, ref)
    # rows without a scored token: s = 0 (DFT) / s̄ = 0 (DFT2) and no gradient reaches them
    flat_scores = ours["scores"].reshape(-1)
    for row in empty:
        assert flat_scores[row].item() == 0.0 and ours["seq_logps"][row].item() == 0.0
        assert ours["token_counts"][row].item() == 0
        assert bool((ours["grad_hidden"][row] == 0).all())


def test_stats_contents_shapes_and_detached():
    n_groups, k = 3, 2
    hidden, weight, labels, bias = make_groups(n_groups, k, 5, 8, 40, seed=3)
    ref_logps = make_ref_logps(hidden, weight, labels, bias, k, seed=1)
    h = hidden.clone().requires_grad_(True)
    loss, stats = fused_dft_loss(h, weight, labels, num_negatives=k, ref_logps=ref_logps, bias=bias,
                                 return_stats=True, backend="torch")
    expected_shapes = {"seq_logps": (9,), "token_counts": (9,), "scores": (3, 3), "d": (3, 2),
                       "weights": (3, 2), "u": (3,), "group_losses": (3,), "skipped_groups": ()}
    assert set(stats) == set(expected_shapes)
    for name, shape in expected_shapes.items():
        assert tuple(stats[name].shape) == shape, name
        assert not stats[name].requires_grad, f"{name} must be detached"
        assert stats[name].dtype == (torch.int64 if name == "skipped_groups" else torch.float32), name
    assert int(stats["skipped_groups"]) == 0
    torch.testing.assert_close(loss.detach(), stats["group_losses"].mean())
    # without return_stats: just the scalar, the same value
    plain = fused_dft_loss(h, weight, labels, num_negatives=k, ref_logps=ref_logps, bias=bias, backend="torch")
    assert isinstance(plain, torch.Tensor) and plain.dim() == 0
    torch.testing.assert_close(plain, loss)


# ---------------------------------------------------------------------------------------------
# the moving-average state
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("backend", "variant"), [("torch", "dft"), ("torch", "dft2"), ("triton", "dft2")],
                         indirect=["backend"])
def test_two_steps_with_state_follow_the_u_recursion(backend, variant):
    k, u_init, gamma = 3, -1.5, 0.6
    tau = 1.0 if variant == "dft" else 0.3
    state = DFTState(10, init=u_init)
    ids_per_step = [torch.tensor([7, 2]), torch.tensor([2, 9])]  # example 2 is seen twice
    expected_u = torch.full((10,), u_init, dtype=torch.float64)
    expected_updates = torch.zeros(10, dtype=torch.int64)
    for step, ids in enumerate(ids_per_step):
        hidden, weight, labels, bias = make_groups(2, k, 6, 12, 97, seed=40 + step, empty_rows=(2,))
        ref_logps = make_ref_logps(hidden, weight, labels, bias, k, seed=step) if variant == "dft" else None
        kwargs = dict(num_negatives=k, ref_logps=ref_logps, tau=tau, gamma=gamma, variant=variant)
        ours = run_dft(hidden, weight, labels, bias, ids=ids, state=state, backend=backend, **kwargs)
        ref = reference_dft(hidden, weight, labels, bias, k=k, variant=variant, tau=tau, gamma=gamma,
                            ref_logps=ref_logps, u_prev=expected_u[ids])
        expected_u[ids] = ref["u"]
        expected_updates[ids] += 1
        assert_loss_close(ours["loss"], ref["loss"], ref["scale"])
        assert_grads_close(ours, ref)
        assert_stats_match(ours, ref)
        assert state.u.dtype == torch.float32
        torch.testing.assert_close(state.u.double(), expected_u, rtol=0, atol=1e-4)
        torch.testing.assert_close(state.u[ids], ours["u"], rtol=0, atol=0)
        assert torch.equal(state.num_updates, expected_updates)
    untouched = [i for i in range(10) if i not in (2, 7, 9)]
    assert bool((state.u[untouched] == u_init).all())


def test_u_update_matches_log_space_formula():
    """The literal documented recursion: u <- logaddexp(log(1-g) + u_prev, log(g) + lse_j d_ij - log K)."""
    k, gamma, tau = 4, 0.85, 1.0
    hidden, weight, labels, bias = make_groups(2, k, 5, 8, 50, seed=8)
    ref_logps = make_ref_logps(hidden, weight, labels, bias, k, seed=2)
    state = DFTState(4, init=0.25)
    state.u[torch.tensor([1])] = -3.0  # a non-uniform previous state
    ids = torch.tensor([1, 3])
    u_prev = state.u[ids].double().clone()
    _, stats = fused_dft_loss(hidden, weight, labels, num_negatives=k, ids=ids, state=state, ref_logps=ref_logps,
                              bias=bias, tau=tau, gamma=gamma, return_stats=True, backend="torch")
    d = stats["d"].double()
    expected = torch.logaddexp(math.log(1 - gamma) + u_prev, math.log(gamma) + torch.logsumexp(d, 1) - math.log(k))
    torch.testing.assert_close(state.u[ids].double(), expected, rtol=0, atol=1e-5)
    # d itself: s(y'_ij) / tau - ref_ij
    torch.testing.assert_close(d, stats["scores"][:, 1:].double() / tau - ref_logps.double(), rtol=0, atol=1e-5)
    torch.testing.assert_close(stats["weights"], torch.exp(stats["d"] - stats["u"][:, None]))


@pytest.mark.parametrize("variant", ["dft", "dft2"])
def test_gamma_one_equals_stateless(variant):
    k = 2
    hidden, weight, labels, bias = make_groups(3, k, 6, 8, 60, seed=21)
    ref_logps = make_ref_logps(hidden, weight, labels, bias, k, seed=3) if variant == "dft" else None
    kwargs = dict(num_negatives=k, ref_logps=ref_logps, variant=variant, tau=0.5, backend="torch")
    stateless = run_dft(hidden, weight, labels, bias, **kwargs)
    state = DFTState(5, init=7.0)  # a far-off previous value must not matter when gamma = 1
    ids = torch.tensor([4, 0, 2])
    with_state = run_dft(hidden, weight, labels, bias, ids=ids, state=state, gamma=1.0, **kwargs)
    for name in ("loss", "grad_hidden", "grad_weight", "grad_bias", "u", "weights", "d"):
        torch.testing.assert_close(with_state[name], stateless[name], rtol=1e-6, atol=1e-6, msg=name)
    torch.testing.assert_close(state.u[ids], stateless["u"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", ["dft", "dft2"])
def test_default_tau_and_gamma_follow_the_variant(variant):
    """Without tau/gamma, each variant uses the paper's values (DFT 1.0/0.85, DFT2 0.3/0.9)."""
    k = 2
    hidden, weight, labels, bias = make_groups(2, k, 5, 8, 40, seed=31)
    ref_logps = make_ref_logps(hidden, weight, labels, bias, k, seed=4) if variant == "dft" else None
    defaults = DFT_DEFAULTS[variant]
    assert defaults == ({"tau": 1.0, "gamma": 0.85} if variant == "dft" else {"tau": 0.3, "gamma": 0.9})
    ids = torch.tensor([0, 1])
    implicit_state, explicit_state = DFTState(2, init=-1.0), DFTState(2, init=-1.0)
    common = dict(num_negatives=k, ids=ids, ref_logps=ref_logps, variant=variant, bias=bias, backend="torch")
    implicit = fused_dft_loss(hidden, weight, labels, state=implicit_state, **common)
    explicit = fused_dft_loss(hidden, weight, labels, state=explicit_state, tau=defaults["tau"],
                              gamma=defaults["gamma"], **common)
    torch.testing.assert_close(implicit, explicit, rtol=0, atol=0)
    torch.testing.assert_close(implicit_state.u, explicit_state.u, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def fused_spy(monkeypatch):
    """Records the token ranges of every in-forward-gradient pass (one list per fused call)."""
    calls: list[list[tuple[int, int]]] = []
    original = functional.forward_with_grad

    def spy(hidden, weight, bias, labels, tf, engine, chunk_ranges, head, **kwargs):
        calls.append(list(chunk_ranges))
        return original(hidden, weight, bias, labels, tf, engine, chunk_ranges, head, **kwargs)

    monkeypatch.setattr(functional, "forward_with_grad", spy)
    return calls


def _group_budget(vocab: int, group_tokens: int, groups: float) -> int:
    """chunk_bytes holding ``groups`` groups on the torch engine (fp32, no bias: 4 bytes per logit)."""
    return int(4 * vocab * group_tokens * groups)


@pytest.mark.parametrize("variant", ["dft", "dft2"])
def test_fused_equals_recompute(variant, fused_spy):
    k = 3
    hidden, weight, labels, bias = make_groups(4, k, 6, 16, 120, seed=50, empty_rows=(6,))
    ref_logps = make_ref_logps(hidden, weight, labels, bias, k, seed=6) if variant == "dft" else None
    state_f, state_r = DFTState(6, init=-2.0), DFTState(6, init=-2.0)
    ids = torch.tensor([5, 1, 0, 3])
    common = dict(num_negatives=k, ids=ids, ref_logps=ref_logps, variant=variant, backend="torch")
    fused = run_dft(hidden, weight, labels, bias, state=state_f, schedule="fused", **common)
    assert len(fused_spy) == 1
    recompute = run_dft(hidden, weight, labels, bias, state=state_r, schedule="recompute", **common)
    assert len(fused_spy) == 1, "schedule='recompute' must not take the in-forward-gradient path"
    for name in ("loss", "grad_hidden", "grad_weight", "grad_bias", "u", "weights", "seq_logps"):
        torch.testing.assert_close(fused[name], recompute[name], rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(state_f.u, state_r.u, rtol=0, atol=1e-6)


def test_auto_schedule_follows_the_chunk_budget(fused_spy):
    k, seq_len, vocab = 2, 6, 64
    group_tokens = (1 + k) * seq_len
    hidden, weight, labels, _ = make_groups(3, k, seq_len, 8, vocab, seed=60, with_bias=False)
    ref_logps = make_ref_logps(hidden, weight, labels, None, k, seed=7)
    common = dict(num_negatives=k, ref_logps=ref_logps, backend="torch", schedule="auto")
    roomy = run_dft(hidden, weight, labels, None, **common)
    assert len(fused_spy) == 1, "auto must take the fused schedule when every group fits"
    assert fused_spy[0] == [(0, 3 * group_tokens)], "one chunk with the default budget"
    tight = run_dft(hidden, weight, labels, None, chunk_bytes=_group_budget(vocab, group_tokens, 0.5), **common)
    assert len(fused_spy) == 1, "auto must fall back to recompute when a group does not fit"
    for name in ("loss", "grad_hidden", "grad_weight"):
        torch.testing.assert_close(tight[name], roomy[name], rtol=1e-5, atol=1e-6, msg=name)
    # a budget of exactly one group still fuses
    run_dft(hidden, weight, labels, None, chunk_bytes=_group_budget(vocab, group_tokens, 1), **common)
    assert len(fused_spy) == 2 and len(fused_spy[1]) == 3
    # no gradient needed: a plain forward, never the fused pass
    with torch.no_grad():
        fused_dft_loss(hidden, weight, labels, **common)
    assert len(fused_spy) == 2


def test_fused_with_too_small_budget_raises_and_keeps_state():
    k, seq_len, vocab = 2, 6, 64
    hidden, weight, labels, _ = make_groups(2, k, seq_len, 8, vocab, seed=61, with_bias=False)
    ref_logps = make_ref_logps(hidden, weight, labels, None, k, seed=8)
    state = DFTState(3, init=0.5)
    h = hidden.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="chunk_bytes"):
        fused_dft_loss(h, weight, labels, num_negatives=k, ids=torch.tensor([0, 2]), state=state,
                       ref_logps=ref_logps, backend="torch", schedule="fused",
                       chunk_bytes=_group_budget(vocab, (1 + k) * seq_len, 1) - 1)
    assert bool((state.u == 0.5).all()) and int(state.num_updates.sum()) == 0


@pytest.mark.parametrize(("backend", "groups_per_chunk"), [("torch", 1), ("torch", 2), ("triton", 2)],
                         indirect=["backend"])
def test_fused_several_chunks_equal_one_chunk(backend, groups_per_chunk, fused_spy):
    k, seq_len, vocab, n_groups = 2, 5, 64, 5
    group_tokens = (1 + k) * seq_len
    hidden, weight, labels, _ = make_groups(n_groups, k, seq_len, 8, vocab, seed=70, empty_rows=(4,),
                                            with_bias=False)
    ref_logps = make_ref_logps(hidden, weight, labels, None, k, seed=9)
    ids = torch.tensor([9, 3, 0, 4, 7])
    one_state, many_state = DFTState(10, init=-1.0), DFTState(10, init=-1.0)
    common = dict(num_negatives=k, ids=ids, ref_logps=ref_logps, backend=backend, schedule="fused")
    one = run_dft(hidden, weight, labels, None, state=one_state, **common)
    # 1.5 (2.5) groups' worth of budget: chunks of 1 (2) whole groups
    budget = _group_budget(vocab, group_tokens, groups_per_chunk + 0.5)
    many = run_dft(hidden, weight, labels, None, state=many_state, chunk_bytes=budget, **common)
    assert len(fused_spy[0]) == 1
    expected_chunks = [(g0 * group_tokens, min(g0 + groups_per_chunk, n_groups) * group_tokens)
                       for g0 in range(0, n_groups, groups_per_chunk)]
    assert fused_spy[1] == expected_chunks
    for name in ("loss", "grad_hidden", "grad_weight", "u", "weights", "scores", "group_losses", "seq_logps"):
        torch.testing.assert_close(many[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(many_state.u, one_state.u, rtol=0, atol=1e-6)
    assert torch.equal(many_state.num_updates, one_state.num_updates)
    assert int(many_state.num_updates.sum()) == n_groups, "each group's u is written exactly once"


def test_no_grad_forward_matches_and_updates_state_once():
    k = 2
    hidden, weight, labels, bias = make_groups(2, k, 5, 8, 40, seed=71)
    ref_logps = make_ref_logps(hidden, weight, labels, bias, k, seed=10)
    ids = torch.tensor([1, 0])
    s_grad, s_nograd = DFTState(2), DFTState(2)
    with_grad = run_dft(hidden, weight, labels, bias, num_negatives=k, ids=ids, state=s_grad, ref_logps=ref_logps,
                        backend="torch")
    with torch.no_grad():
        loss = fused_dft_loss(hidden, weight, labels, num_negatives=k, ids=ids, state=s_nograd,
                              ref_logps=ref_logps, bias=bias, backend="torch")
    torch.testing.assert_close(loss, with_grad["loss"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s_nograd.u, s_grad.u, rtol=0, atol=1e-6)
    assert s_nograd.num_updates.tolist() == [1, 1]


# ---------------------------------------------------------------------------------------------
# packed layout
# ---------------------------------------------------------------------------------------------


def pack(hidden: torch.Tensor, labels: torch.Tensor, lengths: list[int]):
    """Keep the first ``lengths[r]`` positions of each padded row: ``hidden [N, H]``, ``labels [N]``, cu_seqlens."""
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    packed_h = torch.cat([hidden[r, :n] for r, n in enumerate(lengths)])
    packed_l = torch.cat([labels[r, :n] for r, n in enumerate(lengths)])
    return packed_h, packed_l, cu


def ragged_lengths(labels: torch.Tensor) -> list[int]:
    """Each row's length up to its last scored token (0 for a row with none)."""
    lengths = []
    for row in labels:
        scored = (row != IGNORE).nonzero()
        lengths.append(int(scored.max()) + 1 if scored.numel() else 0)
    return lengths


@pytest.mark.parametrize(("backend", "variant", "schedule"),
                         [("torch", "dft", "fused"), ("torch", "dft", "recompute"), ("torch", "dft2", "fused"),
                          ("torch", "dft2", "recompute"), ("triton", "dft", "fused")], indirect=["backend"])
def test_packed_equals_padded(backend, variant, schedule):
    k = 2
    hidden, weight, labels, bias = make_groups(3, k, 7, 8, 70, seed=80, empty_rows=(4,))
    lengths = ragged_lengths(labels)
    assert 0 in lengths and len(set(lengths)) > 2  # an empty packed row and ragged rows
    packed_h, packed_l, cu = pack(hidden, labels, lengths)
    ref_logps = make_ref_logps(hidden, weight, labels, bias, k, seed=11) if variant == "dft" else None
    ids = torch.tensor([2, 0, 1])
    padded_state, packed_state = DFTState(3, init=-1.0), DFTState(3, init=-1.0)
    common = dict(num_negatives=k, ids=ids, ref_logps=ref_logps, variant=variant, tau=0.5, gamma=0.85, backend=backend,
                  schedule=schedule)
    padded = run_dft(hidden, weight, labels, bias, state=padded_state, **common)
    packed = run_dft(packed_h, weight, packed_l, bias, state=packed_state,
                     cu_seqlens=torch.tensor(cu, dtype=torch.int32), **common)
    for name in ("loss", "grad_weight", "grad_bias", "u", "weights", "scores", "seq_logps", "token_counts"):
        torch.testing.assert_close(packed[name], padded[name], rtol=1e-5, atol=1e-5, msg=name)
    padded_grad_packed, _, _ = pack(padded["grad_hidden"], labels, lengths)
    torch.testing.assert_close(packed["grad_hidden"], padded_grad_packed, rtol=1e-5, atol=1e-6)
    for r, n in enumerate(lengths):  # positions cut off by packing get no gradient
        assert bool((padded["grad_hidden"][r, n:] == 0).all())
    torch.testing.assert_close(packed_state.u, padded_state.u, rtol=0, atol=1e-5)
    # and against float64 directly, with cu_seqlens given as a plain list
    ref = reference_dft(packed_h, weight, packed_l, bias, k=k, variant=variant, tau=0.5, gamma=0.85,
                        ref_logps=ref_logps, u_prev=torch.full((3,), -1.0), cu_seqlens=cu)
    as_list = run_dft(packed_h, weight, packed_l, bias, state=DFTState(3, init=-1.0), cu_seqlens=cu, **common)
    assert_loss_close(as_list["loss"], ref["loss"], ref["scale"])
    assert_grads_close(as_list, ref)
    assert_stats_match(as_list, ref)


# ---------------------------------------------------------------------------------------------
# argument errors: a clear message naming the argument, and the state untouched
# ---------------------------------------------------------------------------------------------


def _error_case_inputs():
    k = 2
    hidden, weight, labels, bias = make_groups(2, k, 4, 8, 30, seed=90)
    ref_logps = torch.randn(2, k) - 10.0
    return hidden, weight, labels, bias, ref_logps, k


ERROR_CASES = {
    # name: (kwargs overrides, exception type, match)
    "rows-not-multiple-of-1+K": (dict(num_negatives=3), ValueError, "num_negatives"),
    "num_negatives-zero": (dict(num_negatives=0), ValueError, "num_negatives"),
    "ids-out-of-range": (dict(ids=torch.tensor([0, 8])), ValueError, "ids"),
    "ids-negative": (dict(ids=torch.tensor([-1, 2])), ValueError, "ids"),
    "ids-duplicated": (dict(ids=torch.tensor([3, 3])), ValueError, "ids"),
    "ids-wrong-shape": (dict(ids=torch.tensor([0, 1, 2])), ValueError, "ids"),
    "ids-float": (dict(ids=torch.tensor([0.0, 1.0])), TypeError, "ids"),
    "ids-missing-with-state": (dict(ids=None), ValueError, "ids"),
    "ref_logps-missing-for-dft": (dict(ref_logps=None), ValueError, "ref_logps"),
    "ref_logps-nan": (dict(ref_logps=torch.tensor([[0.0, float("nan")], [1.0, 2.0]])), ValueError, "ref_logps"),
    "ref_logps-inf": (dict(ref_logps=torch.tensor([[0.0, -float("inf")], [1.0, 2.0]])), ValueError, "ref_logps"),
    "ref_logps-wrong-shape": (dict(ref_logps=torch.zeros(2, 3)), ValueError, "ref_logps"),
    "ref_logps-given-for-dft2": (dict(variant="dft2"), ValueError, "ref_logps"),
    "tau-zero": (dict(tau=0.0), ValueError, "tau"),
    "tau-negative": (dict(tau=-1.0), ValueError, "tau"),
    "gamma-zero": (dict(gamma=0.0), ValueError, "gamma"),
    "gamma-above-one": (dict(gamma=1.5), ValueError, "gamma"),
    "unknown-variant": (dict(variant="dpo"), ValueError, "variant"),
    "state-wrong-type": (dict(state="u"), TypeError, "state"),
    "schedule-unknown": (dict(schedule="eager"), ValueError, "schedule"),
    "label-out-of-vocabulary": (dict(labels_fill=30), ValueError, "labels"),
    # strict arguments (issue 9)
    "return_stats-not-bool": (dict(return_stats="yes"), TypeError, "return_stats must be a bool"),
    "num_negatives-string": (dict(num_negatives="2"), TypeError, "num_negatives"),
    "num_negatives-bool": (dict(num_negatives=True), TypeError, "num_negatives"),
    "tau-tiny": (dict(tau=1e-30), ValueError, r"tau must be a finite number in \[1e-06, 1e\+06\]"),
    "tau-bool": (dict(tau=True), TypeError, "tau"),
    "gamma-nan": (dict(gamma=float("nan")), ValueError, r"gamma must be a finite number in \(0, 1\]"),
    "ref_logps-list": (dict(ref_logps=[[0.0, 0.0], [0.0, 0.0]]), TypeError, "ref_logps"),
    "ids-list": (dict(ids=[3, 5]), TypeError, "ids"),
    "cu_seqlens-with-padded-hidden": (dict(cu_seqlens=[0, 4, 8, 12, 16, 20, 24]), ValueError,
                                      "cu_seqlens is given, so the packed layout is expected"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES.values()), ids=list(ERROR_CASES))
def test_bad_arguments_raise_and_leave_state_untouched(case):
    overrides, exc, match = case
    hidden, weight, labels, bias, ref_logps, k = _error_case_inputs()
    state = DFTState(8, init=-0.5)
    state.u[3] = 1.25
    u_before, updates_before = state.u.clone(), state.num_updates.clone()
    kwargs = dict(num_negatives=k, ids=torch.tensor([3, 5]), state=state, ref_logps=ref_logps, bias=bias,
                  backend="torch")
    overrides = dict(overrides)
    if "labels_fill" in overrides:
        labels = labels.clone()
        labels[1, 2] = overrides.pop("labels_fill")
    kwargs.update(overrides)
    h = hidden.clone().requires_grad_(True)
    with pytest.raises(exc, match=match):
        fused_dft_loss(h, weight, labels, **kwargs)
    assert torch.equal(state.u, u_before)
    assert torch.equal(state.num_updates, updates_before)
