"""The preference family (:func:`dftkern.fused_preference_loss`) against float64 restatements.

Each loss is restated in plain float64 PyTorch from the formulas in the module docstring of
:mod:`dftkern.losses.preference` (full logits, ``log_softmax``, gather), and compared for the
loss, the gradients w.r.t. hidden, weight and bias, and the reported statistics, on the torch
engine and on the Triton engine (CPU, ``TRITON_INTERPRET=1``), with ragged responses and rows
with no scored token. Also: ``average=True``, the REINFORCE baselines, fused == recompute,
the packed layout == the padded one (dpo, rloo), and argument errors naming the bad argument.
"""

from __future__ import annotations

import pytest
import torch
from _reference import (
    GRAD_TOL,
    make_ragged_rows,
    reference_sequence_logprobs,
    reference_token_logprobs,
    relative_error,
)

from dftkern import fused_preference_loss
from dftkern.losses import PREFERENCE_LOSSES

IGNORE = -100
LOSS_RTOL = 1e-5
PAIRWISE = ("dpo", "ipo", "hinge", "simpo", "unlikelihood")
GROUPED = ("rwr", "reinforce", "rloo")


def rows_per_group(loss: str, group_size: int = 3) -> int:
    return 1 if loss == "sft" else 2 if loss in PAIRWISE else group_size


def make_rows(n_rows: int, seq_len: int, hidden_size: int, vocab_size: int, *, seed: int,
              empty_rows: tuple[int, ...] = (), with_bias: bool = True):
    """Seeded padded rows with ragged prompts/responses; ``empty_rows`` have every label ignored."""
    return make_ragged_rows(n_rows, seq_len, hidden_size, vocab_size, seed=seed, empty_rows=empty_rows,
                            with_bias=with_bias, ignore_index=IGNORE)


def loss_inputs(loss: str, n_groups: int, *, seed: int, group_size: int = 3):
    """``(ref_logps [R] | None, rewards [G, n] | None)`` as the loss takes them."""
    gen = torch.Generator().manual_seed(seed)
    n = rows_per_group(loss, group_size)
    ref = torch.randn(n_groups * n, generator=gen) * 3 - 20 if loss in ("dpo", "ipo", "hinge") else None
    rewards = torch.randn(n_groups, n, generator=gen) if loss in GROUPED else None
    return ref, rewards


# ---------------------------------------------------------------------------------------------
# float64 restatement of the module docstring
# ---------------------------------------------------------------------------------------------


def reference_preference(hidden, weight, labels, bias, *, loss: str, n: int, beta: float = 0.1,
                         ref_logps=None, rewards=None, average: bool = False, simpo_gamma: float = 0.5,
                         unlikelihood_alpha: float = 1.0, baseline="mean", cu_seqlens=None) -> dict:
    """The documented formula of ``loss`` in float64 with autograd gradients.

    Returns ``loss``, ``grad_hidden``/``grad_weight``/``grad_bias``, ``scores [R]``,
    ``group_losses [G]``, ``margins [G]`` (pairwise), ``advantages [R]`` (reinforce/rloo) and
    ``scale`` (size of the summed terms, for the fp32 error budget).
    """
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    b = None if bias is None else bias.detach().double().requires_grad_(True)
    use_mean = average or loss == "simpo"
    s = reference_sequence_logprobs(h, w, labels, bias=b, average=use_mean, cu_seqlens=cu_seqlens)
    n_groups = s.numel() // n
    sg = s.reshape(n_groups, n)
    out: dict = {}
    r = (ref_logps.double().reshape(n_groups, n) if ref_logps is not None
         else torch.zeros(n_groups, n, dtype=torch.float64))
    if loss == "sft":
        per_group = -sg[:, 0]
    elif loss in ("dpo", "ipo", "hinge"):
        margin = (sg[:, 0] - r[:, 0]) - (sg[:, 1] - r[:, 1])
        if loss == "dpo":
            per_group = -torch.log(torch.sigmoid(beta * margin))
        elif loss == "ipo":
            per_group = (margin - 1.0 / (2.0 * beta)) ** 2
        else:
            per_group = torch.clamp(1.0 - beta * margin, min=0.0)
        out["margins"] = margin.detach()
    elif loss == "simpo":
        margin = sg[:, 0] - sg[:, 1]
        per_group = -torch.log(torch.sigmoid(beta * margin - simpo_gamma))
        out["margins"] = margin.detach()
    elif loss == "unlikelihood":
        token_logp = reference_token_logprobs(h, w, labels, bias=b)
        scored = labels != IGNORE
        # ignored tokens have logp = 0, where log(1 - p) is -inf: substitute before the log so that no
        # inf (and no NaN gradient) appears, then zero them
        safe_logp = torch.where(scored, token_logp, torch.full_like(token_logp, -1.0))
        one_minus_p = torch.where(scored, torch.log1p(-torch.exp(safe_logp)), torch.zeros_like(token_logp))
        if cu_seqlens is None:
            row_terms = one_minus_p.sum(-1)
        else:
            bounds = [int(x) for x in cu_seqlens]
            row_terms = torch.stack([one_minus_p[a:c].sum() for a, c in zip(bounds, bounds[1:])])
        per_group = -sg[:, 0] - unlikelihood_alpha * row_terms.reshape(n_groups, n)[:, 1]
    else:
        rew = rewards.double()
        if loss == "rwr":
            coef = torch.exp(rew / beta) / torch.exp(rew / beta).sum(1, keepdim=True)
            per_group = -(coef * sg).sum(1)
        else:
            if loss == "rloo":
                others = torch.stack([torch.cat([rew[:, :j], rew[:, j + 1:]], 1).mean(1) for j in range(n)], 1)
                adv = rew - others
            elif baseline == "mean":
                adv = rew - rew.mean(1, keepdim=True)
            elif baseline == "none":
                adv = rew
            else:
                adv = rew - baseline
            per_group = -(adv * sg).sum(1) / n
            out["advantages"] = adv.reshape(-1)
    total = per_group.mean()
    h.grad = w.grad = None
    total.backward()
    out.update(loss=total.detach(), grad_hidden=h.grad, grad_weight=w.grad,
               grad_bias=None if b is None else b.grad, scores=s.detach(), group_losses=per_group.detach(),
               scale=float(s.detach().abs().mean() + per_group.detach().abs().mean()))
    return out


def run_loss(hidden, weight, labels, bias, **kwargs) -> dict:
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    b = None if bias is None else bias.detach().clone().requires_grad_(True)
    total, stats = fused_preference_loss(h, w, labels, bias=b, return_stats=True, **kwargs)
    total.backward()
    return dict(stats, loss=total.detach(), grad_hidden=h.grad, grad_weight=w.grad,
                grad_bias=None if b is None else b.grad)


def assert_matches(ours: dict, ref: dict):
    assert ours["loss"].dtype == torch.float32 and ours["loss"].dim() == 0
    tol = LOSS_RTOL * max(ref["scale"], 1.0)
    for name in ("loss", "scores", "group_losses", "margins", "advantages"):
        if name not in ref:
            continue
        assert name in ours, f"missing stat {name}"
        err = (ours[name].double() - ref[name]).abs().max().item()
        assert err <= tol, f"{name} error {err:.3e} > {tol:.3e}"
    for name in ("grad_hidden", "grad_weight", "grad_bias"):
        if ref[name] is None:
            assert ours[name] is None
            continue
        err = relative_error(ours[name], ref[name])
        assert err <= GRAD_TOL, f"{name} relative error {err:.3e} > {GRAD_TOL}"


# per loss: its hyper-parameters (beta chosen so the loss is far from saturation on these inputs)
LOSS_KWARGS = {
    "sft": {},
    "dpo": {"beta": 0.3},
    "ipo": {"beta": 0.5},
    "simpo": {"beta": 2.0, "simpo_gamma": 0.4},
    "hinge": {"beta": 0.05},
    "rwr": {"beta": 0.7},
    "reinforce": {},
    "rloo": {},
    "unlikelihood": {"unlikelihood_alpha": 0.6},
}


def test_every_documented_loss_is_covered():
    assert set(PREFERENCE_LOSSES) == set(LOSS_KWARGS)


@pytest.mark.parametrize("loss", list(LOSS_KWARGS))
def test_matches_float64_reference(backend, loss):
    n = rows_per_group(loss)
    n_groups = 3
    hidden, weight, labels, bias = make_rows(n_groups * n, 6, 16, 131, seed=100 + len(loss),
                                             empty_rows=(1, n + 0) if n > 1 else (1,))
    ref_logps, rewards = loss_inputs(loss, n_groups, seed=7)
    kwargs = dict(LOSS_KWARGS[loss], ref_logps=ref_logps, rewards=rewards)
    ours = run_loss(hidden, weight, labels, bias, loss=loss, backend=backend, **kwargs)
    ref = reference_preference(hidden, weight, labels, bias, loss=loss, n=n, **kwargs)
    assert_matches(ours, ref)
    assert bool((ours["grad_hidden"][1] == 0).all()), "a row without scored tokens gets no gradient"
    assert ours["token_counts"][1].item() == 0 and ours["scores"][1].item() == 0.0


@pytest.mark.parametrize("loss", [name for name in LOSS_KWARGS if name != "simpo"])
def test_average_uses_mean_token_logprobs(loss):
    n = rows_per_group(loss)
    hidden, weight, labels, bias = make_rows(2 * n, 7, 12, 90, seed=200 + len(loss), empty_rows=(0,))
    ref_logps, rewards = loss_inputs(loss, 2, seed=8)
    kwargs = dict(LOSS_KWARGS[loss], ref_logps=ref_logps, rewards=rewards, average=True)
    ours = run_loss(hidden, weight, labels, bias, loss=loss, backend="torch", **kwargs)
    ref = reference_preference(hidden, weight, labels, bias, loss=loss, n=n, **kwargs)
    assert_matches(ours, ref)
    counts = (labels != IGNORE).sum(-1).clamp_min(1)
    torch.testing.assert_close(ours["scores"], ours["seq_logps"] / counts, rtol=1e-6, atol=1e-6)


def test_simpo_ignores_average_flag():
    hidden, weight, labels, bias = make_rows(4, 6, 8, 50, seed=5)
    common = dict(loss="simpo", beta=2.0, simpo_gamma=0.3, bias=bias, backend="torch")
    torch.testing.assert_close(fused_preference_loss(hidden, weight, labels, average=True, **common),
                               fused_preference_loss(hidden, weight, labels, average=False, **common))


@pytest.mark.parametrize("baseline", ["mean", "none", 0.7, -2])
def test_reinforce_baselines(baseline):
    n = 4
    hidden, weight, labels, bias = make_rows(2 * n, 6, 8, 60, seed=9, empty_rows=(5,))
    rewards = torch.randn(2, n, generator=torch.Generator().manual_seed(3))
    ours = run_loss(hidden, weight, labels, bias, loss="reinforce", rewards=rewards, baseline=baseline,
                    backend="torch")
    ref = reference_preference(hidden, weight, labels, bias, loss="reinforce", n=n, rewards=rewards,
                               baseline=baseline)
    assert_matches(ours, ref)


def test_rloo_with_two_samples_is_reward_difference():
    """n = 2: the leave-one-out baseline of each sample is the other's reward."""
    hidden, weight, labels, bias = make_rows(4, 5, 8, 40, seed=12)
    rewards = torch.tensor([[1.0, -0.5], [0.25, 2.0]])
    _, stats = fused_preference_loss(hidden, weight, labels, loss="rloo", rewards=rewards, bias=bias,
                                     return_stats=True, backend="torch")
    expected = torch.stack([rewards[:, 0] - rewards[:, 1], rewards[:, 1] - rewards[:, 0]], 1).reshape(-1)
    torch.testing.assert_close(stats["advantages"], expected)


def test_hinge_without_ref_uses_zero_reference():
    hidden, weight, labels, bias = make_rows(4, 5, 8, 40, seed=13)
    with_zero = fused_preference_loss(hidden, weight, labels, loss="hinge", beta=0.05, ref_logps=torch.zeros(4),
                                      bias=bias, backend="torch")
    without = fused_preference_loss(hidden, weight, labels, loss="hinge", beta=0.05, bias=bias, backend="torch")
    torch.testing.assert_close(with_zero, without)


@pytest.mark.parametrize("loss", ["dpo", "rloo", "unlikelihood"])
def test_fused_equals_recompute(loss):
    n = rows_per_group(loss)
    hidden, weight, labels, bias = make_rows(4 * n, 6, 8, 64, seed=300, empty_rows=(3,))
    ref_logps, rewards = loss_inputs(loss, 4, seed=9)
    common = dict(LOSS_KWARGS[loss], loss=loss, ref_logps=ref_logps, rewards=rewards, backend="torch")
    fused = run_loss(hidden, weight, labels, bias, schedule="fused", **common)
    recompute = run_loss(hidden, weight, labels, bias, schedule="recompute", **common)
    # several chunks of whole groups under the fused schedule (bias: 8 bytes per logit on the torch engine)
    chunked = run_loss(hidden, weight, labels, bias, schedule="fused", chunk_bytes=8 * 64 * 6 * n + 1, **common)
    for other in (recompute, chunked):
        for name in ("loss", "grad_hidden", "grad_weight", "grad_bias", "scores", "group_losses"):
            torch.testing.assert_close(other[name], fused[name], rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------
# packed layout
# ---------------------------------------------------------------------------------------------


def pack(hidden: torch.Tensor, labels: torch.Tensor, lengths: list[int]):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return (torch.cat([hidden[r, :n] for r, n in enumerate(lengths)]),
            torch.cat([labels[r, :n] for r, n in enumerate(lengths)]), cu)


@pytest.mark.parametrize(("backend", "loss", "average"),
                         [("torch", "dpo", False), ("torch", "dpo", True), ("torch", "rloo", False),
                          ("torch", "unlikelihood", False), ("triton", "rloo", True)], indirect=["backend"])
def test_packed_equals_padded(backend, loss, average):
    n = rows_per_group(loss)
    hidden, weight, labels, bias = make_rows(3 * n, 7, 8, 70, seed=400, empty_rows=(2,))
    lengths = [int((row != IGNORE).nonzero().max()) + 1 if bool((row != IGNORE).any()) else 0 for row in labels]
    assert 0 in lengths
    packed_h, packed_l, cu = pack(hidden, labels, lengths)
    ref_logps, rewards = loss_inputs(loss, 3, seed=10)
    common = dict(LOSS_KWARGS[loss], loss=loss, ref_logps=ref_logps, rewards=rewards, average=average,
                  backend=backend)
    padded = run_loss(hidden, weight, labels, bias, **common)
    packed = run_loss(packed_h, weight, packed_l, bias, cu_seqlens=torch.tensor(cu), **common)
    for name in ("loss", "grad_weight", "grad_bias", "scores", "seq_logps", "token_counts", "group_losses"):
        torch.testing.assert_close(packed[name], padded[name], rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(packed["grad_hidden"], pack(padded["grad_hidden"], labels, lengths)[0],
                               rtol=1e-5, atol=1e-6)
    ref = reference_preference(packed_h, weight, packed_l, bias, loss=loss, n=n, cu_seqlens=cu,
                               **{k: v for k, v in common.items() if k not in ("loss", "backend")})
    assert_matches(packed, ref)


# ---------------------------------------------------------------------------------------------
# argument errors
# ---------------------------------------------------------------------------------------------

ERROR_CASES = {
    # name: (loss, rows, kwargs, exception, match)
    "unknown-loss": ("kto", 4, {}, ValueError, "loss"),
    "beta-zero": ("dpo", 4, {"beta": 0.0, "ref_logps": torch.zeros(4)}, ValueError, "beta"),
    "beta-negative": ("rwr", 4, {"beta": -1.0, "rewards": torch.zeros(2, 2)}, ValueError, "beta"),
    "dpo-missing-ref_logps": ("dpo", 4, {}, ValueError, "ref_logps"),
    "ipo-missing-ref_logps": ("ipo", 4, {}, ValueError, "ref_logps"),
    "ref_logps-nan": ("dpo", 4, {"ref_logps": torch.tensor([0.0, float("nan"), 1.0, 2.0])}, ValueError,
                      "ref_logps"),
    "ref_logps-per-group-not-per-row": ("dpo", 4, {"ref_logps": torch.zeros(2)}, ValueError, "ref_logps"),
    "ref_logps-for-sft": ("sft", 4, {"ref_logps": torch.zeros(4)}, ValueError, "ref_logps"),
    "ref_logps-for-simpo": ("simpo", 4, {"ref_logps": torch.zeros(4)}, ValueError, "ref_logps"),
    "odd-rows-for-pairwise": ("dpo", 5, {"ref_logps": torch.zeros(5)}, ValueError, "rows"),
    "rewards-missing": ("rloo", 4, {}, ValueError, "rewards"),
    "rewards-1d": ("reinforce", 4, {"rewards": torch.zeros(4)}, ValueError, "rewards"),
    "rewards-too-many-groups": ("rwr", 6, {"rewards": torch.zeros(3, 3)}, ValueError, "rewards"),
    "rewards-group-size-does-not-divide-rows": ("reinforce", 6, {"rewards": torch.zeros(1, 4)}, ValueError,
                                                "rewards"),
    "rewards-nan": ("rwr", 4, {"rewards": torch.tensor([[0.0, float("nan")], [1.0, 2.0]])}, ValueError,
                    "rewards"),
    "rewards-integer": ("reinforce", 4, {"rewards": torch.zeros(2, 2, dtype=torch.int64)}, TypeError, "rewards"),
    "rewards-for-pairwise": ("dpo", 4, {"ref_logps": torch.zeros(4), "rewards": torch.zeros(2, 2)}, ValueError,
                             "rewards"),
    "rloo-single-sample": ("rloo", 4, {"rewards": torch.zeros(4, 1)}, ValueError, "rewards"),
    "baseline-unknown": ("reinforce", 4, {"rewards": torch.zeros(2, 2), "baseline": "median"}, ValueError,
                         "baseline"),
    "simpo_gamma-nan": ("simpo", 4, {"simpo_gamma": float("nan")}, ValueError, "simpo_gamma"),
    "unlikelihood_alpha-negative": ("unlikelihood", 4, {"unlikelihood_alpha": -0.5}, ValueError,
                                    "unlikelihood_alpha"),
    "schedule-unknown": ("sft", 4, {"schedule": "eager"}, ValueError, "schedule"),
    # strict arguments (issue 9): flags are bools, hyper-parameters finite and in their documented range
    "average-not-bool": ("sft", 4, {"average": "yes"}, TypeError, "average must be a bool"),
    "average-int": ("dpo", 4, {"average": 1, "ref_logps": torch.zeros(4)}, TypeError, "average"),
    "return_stats-not-bool": ("sft", 4, {"return_stats": "yes"}, TypeError, "return_stats must be a bool"),
    "baseline-bool": ("reinforce", 4, {"rewards": torch.zeros(2, 2), "baseline": True}, TypeError, "baseline"),
    "baseline-nan": ("reinforce", 4, {"rewards": torch.zeros(2, 2), "baseline": float("nan")}, ValueError,
                     "baseline"),
    "baseline-huge": ("reinforce", 4, {"rewards": torch.zeros(2, 2), "baseline": 1e300}, ValueError,
                      r"baseline must be 'mean', 'none' or a finite number in \[-1e\+09, 1e\+09\]"),
    "ipo-beta-tiny": ("ipo", 4, {"beta": 1e-30, "ref_logps": torch.zeros(4)}, ValueError,
                      r"beta must be a finite number in \[1e-06, 1e\+06\]"),
    "dpo-beta-huge": ("dpo", 4, {"beta": 1e300, "ref_logps": torch.zeros(4)}, ValueError, r"1e\+06\]"),
    "beta-string": ("dpo", 4, {"beta": "0.1", "ref_logps": torch.zeros(4)}, TypeError, "beta"),
    "beta-inf": ("rwr", 4, {"beta": float("inf"), "rewards": torch.zeros(2, 2)}, ValueError, "beta"),
    "unlikelihood_alpha-bool": ("unlikelihood", 4, {"unlikelihood_alpha": True}, TypeError, "unlikelihood_alpha"),
    "rewards-list": ("rloo", 4, {"rewards": [[0.0, 1.0], [1.0, 0.0]]}, TypeError, "rewards"),
    "ref_logps-list": ("dpo", 4, {"ref_logps": [0.0, 0.0, 0.0, 0.0]}, TypeError, "ref_logps"),
    "loss-not-a-string": ("sft", 4, {"loss": None}, ValueError, "loss must be one of"),
    "loss-from-another-family": ("sft", 4, {"loss": "dft"}, ValueError, "loss must be one of"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES.values()), ids=list(ERROR_CASES))
def test_bad_arguments_raise(case):
    loss, n_rows, kwargs, exc, match = case
    hidden, weight, labels, _ = make_rows(n_rows, 4, 8, 30, seed=1)
    kwargs = dict({"loss": loss}, **kwargs)
    with pytest.raises(exc, match=match):
        fused_preference_loss(hidden, weight, labels, backend="torch", **kwargs)


def test_non_tensor_inputs_and_layout_mistakes_name_the_argument():
    hidden, weight, labels, _ = make_rows(4, 5, 8, 30, seed=2)
    with pytest.raises(TypeError, match="hidden must be a torch.Tensor"):
        fused_preference_loss(hidden.tolist(), weight, labels, loss="sft")
    with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
        fused_preference_loss(hidden, weight, labels.tolist(), loss="sft")
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        fused_preference_loss(hidden, weight.tolist(), labels, loss="sft")
    # padded hidden with cu_seqlens: the message says the packed layout was expected
    with pytest.raises(ValueError, match=r"cu_seqlens is given, so the packed layout is expected: hidden \[N, H\]"):
        fused_preference_loss(hidden, weight, labels, loss="sft", cu_seqlens=[0, 5, 10, 15, 20])
    # packed hidden without cu_seqlens: the message says so
    packed_h, packed_l = hidden.reshape(20, 8), labels.reshape(20)
    with pytest.raises(ValueError, match=r"packed layout \[N, H\] but cu_seqlens is None"):
        fused_preference_loss(packed_h, weight, packed_l, loss="sft")
    with pytest.raises(ValueError, match=r"packed layout \(cu_seqlens given\) expects labels \[N\]"):
        fused_preference_loss(packed_h, weight, labels, loss="sft", cu_seqlens=[0, 5, 10, 15, 20])
    with pytest.raises(ValueError, match=r"padded layout \(no cu_seqlens\) expects labels \[R, T\]"):
        fused_preference_loss(hidden, weight, packed_l, loss="sft")
    with pytest.raises(TypeError, match="cu_seqlens"):
        fused_preference_loss(packed_h, weight, packed_l, loss="sft", cu_seqlens=torch.tensor([0.0, 20.0]))
    with pytest.raises(TypeError, match="cu_seqlens"):
        fused_preference_loss(packed_h, weight, packed_l, loss="sft", cu_seqlens="0,20")
