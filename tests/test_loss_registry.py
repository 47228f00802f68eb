"""The loss registry (:mod:`dftkern.losses.registry`) and the pure loss math (:mod:`dftkern.losses.formulas`).

Every pure function is compared with a float64 restatement of its documented formula, written
here with plain Python loops / elementary tensor ops (``log(1 + exp(-x))`` for ``-log sigmoid``,
explicit sums over the group, the linear-space form of DFT's moving average): values for float32
and float64 scores, and gradients w.r.t. the scores. Also: the registry's contents (families,
rows, inputs, defaults inside their documented ranges, papers), the derived public names
(``DFT_DEFAULTS``, ``PREFERENCE_LOSSES``), the hyper-parameter checks, and that a new registry
entry is all :func:`dftkern.fused_preference_loss` needs to run a new loss.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from dftkern import fused_dft_loss, fused_preference_loss
from dftkern.losses import DFT_DEFAULTS, PREFERENCE_LOSSES, formulas, fused_policy_loss, registry
from dftkern.losses.registry import HYPERPARAMETERS, LOSSES, LossSpec, get_loss, loss_names

F64 = torch.float64


def _scores(n_groups: int, n: int, *, seed: int, scale: float = 4.0, offset: float = -10.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n_groups, n, generator=gen, dtype=F64) * scale + offset


def _neg_log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return torch.log1p(torch.exp(-x))


# ---------------------------------------------------------------------------------------------
# float64 restatements of the sequence-level formulas
# ---------------------------------------------------------------------------------------------


def restate(name: str, s: torch.Tensor, *, ref=None, rewards=None, token_term_sums=None, **hp) -> torch.Tensor:
    """The formula of ``name`` (registry ``formula`` field) in float64, one group at a time."""
    out = []
    for g in range(s.shape[0]):
        sg = s[g]
        rg = ref[g] if ref is not None else torch.zeros_like(sg)
        if name == "sft":
            out.append(-sg[0])
            continue
        if name in ("dpo", "ipo", "hinge"):
            margin = (sg[0] - rg[0]) - (sg[1] - rg[1])
            if name == "dpo":
                out.append(_neg_log_sigmoid(hp["beta"] * margin))
            elif name == "ipo":
                out.append((margin - 1.0 / (2.0 * hp["beta"])) ** 2)
            else:
                out.append(torch.clamp(1.0 - hp["beta"] * margin, min=0.0))
        elif name == "simpo":
            out.append(_neg_log_sigmoid(hp["beta"] * (sg[0] - sg[1]) - hp["simpo_gamma"]))
        elif name == "unlikelihood":
            out.append(-sg[0] - hp["unlikelihood_alpha"] * token_term_sums[g, 1])
        else:
            rew = rewards[g]
            n = rew.numel()
            if name == "rwr":
                z = sum(math.exp(float(rew[k]) / hp["beta"]) for k in range(n))
                out.append(-sum(math.exp(float(rew[j]) / hp["beta"]) / z * sg[j] for j in range(n)))
            elif name == "reinforce":
                b = hp["baseline"]
                base = float(rew.mean()) if b == "mean" else 0.0 if b == "none" else float(b)
                out.append(-sum((float(rew[j]) - base) * sg[j] for j in range(n)) / n)
            elif name == "rloo":
                loo = [sum(float(rew[k]) for k in range(n) if k != j) / (n - 1) for j in range(n)]
                out.append(-sum((float(rew[j]) - loo[j]) * sg[j] for j in range(n)) / n)
            else:
                raise AssertionError(name)
    return torch.stack(out)


SEQUENCE_CASES = {
    # name: (rows per group, hyper-parameters, inputs)
    "sft": (1, {}, ()),
    "dpo": (2, {"beta": 0.3}, ("ref",)),
    "ipo": (2, {"beta": 0.5}, ("ref",)),
    "hinge": (2, {"beta": 0.05}, ("ref",)),
    "simpo": (2, {"beta": 2.0, "simpo_gamma": 0.4}, ()),
    "unlikelihood": (2, {"unlikelihood_alpha": 0.6}, ("token_term_sums",)),
    "rwr": (4, {"beta": 0.7}, ("rewards",)),
    "reinforce": (4, {"baseline": "mean"}, ("rewards",)),
    "rloo": (4, {}, ("rewards",)),
}


def _inputs(needs: tuple[str, ...], n_groups: int, n: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    if "ref" in needs:
        out["ref"] = torch.randn(n_groups, n, generator=gen, dtype=F64) * 3 - 10
    if "rewards" in needs:
        out["rewards"] = torch.randn(n_groups, n, generator=gen, dtype=F64)
    if "token_term_sums" in needs:
        out["token_term_sums"] = -torch.rand(n_groups, n, generator=gen, dtype=F64) * 5
    return out


def test_every_sequence_loss_has_a_restatement():
    sequence_level = {n for n, s in LOSSES.items() if s.level == "sequence" and s.family != "dft"}
    assert sequence_level == set(SEQUENCE_CASES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(SEQUENCE_CASES))
def test_pure_function_matches_float64_restatement(name, dtype):
    n, hp, needs = SEQUENCE_CASES[name]
    scores64 = _scores(5, n, seed=len(name))
    inputs64 = _inputs(needs, 5, n, seed=3)
    expected = restate(name, scores64, **inputs64, **hp)
    spec = get_loss(name)
    scores = scores64.to(dtype).requires_grad_(True)
    inputs = {k: v.to(dtype) for k, v in inputs64.items()}
    ours = spec.fn(scores, **inputs, **hp)
    assert ours.dtype == dtype and ours.shape == (5,)
    tol = 1e-12 if dtype == F64 else 2e-6
    torch.testing.assert_close(ours.double(), expected, rtol=tol, atol=tol * float(expected.abs().max() + 1))
    # gradients w.r.t. the scores
    s64 = scores64.clone().requires_grad_(True)
    (g_expected,) = torch.autograd.grad(restate(name, s64, **inputs64, **hp).sum(), s64)
    (g_ours,) = torch.autograd.grad(ours.sum(), scores)
    torch.testing.assert_close(g_ours.double(), g_expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("baseline", ["mean", "none", 0.7, -2])
def test_reinforce_baselines_match_restatement(baseline):
    scores, rewards = _scores(3, 5, seed=1), _inputs(("rewards",), 3, 5, seed=2)["rewards"]
    torch.testing.assert_close(formulas.reinforce_loss(scores, rewards=rewards, baseline=baseline),
                               restate("reinforce", scores, rewards=rewards, baseline=baseline), rtol=1e-12,
                               atol=1e-12)


def test_hinge_without_ref_is_zero_reference():
    scores = _scores(4, 2, seed=5)
    torch.testing.assert_close(formulas.hinge_loss(scores, beta=0.05),
                               formulas.hinge_loss(scores, ref=torch.zeros_like(scores), beta=0.05))


def test_simpo_ignores_ref():
    scores = _scores(4, 2, seed=6, scale=0.5, offset=-2)
    with_ref = formulas.simpo_loss(scores, ref=torch.randn(4, 2, dtype=F64), beta=2.0, simpo_gamma=0.3)
    torch.testing.assert_close(with_ref, restate("simpo", scores, beta=2.0, simpo_gamma=0.3))


def test_unlikelihood_token_term_and_missing_sums():
    logp = torch.tensor([-1e-9, -1e-3, -0.5, -3.0, -40.0], dtype=F64)
    ours = formulas.unlikelihood_token_term(logp)
    p = torch.exp(logp.clamp(max=-1e-6))
    torch.testing.assert_close(ours, torch.log(1 - p), rtol=1e-9, atol=0)
    assert bool(torch.isfinite(ours).all())
    with pytest.raises(ValueError, match="token_term_sums"):
        formulas.unlikelihood_loss(_scores(2, 2, seed=1), unlikelihood_alpha=1.0, token_term_sums=None)
    assert get_loss("unlikelihood").token_term is formulas.unlikelihood_token_term


def test_advantage_helpers():
    rewards = torch.tensor([[1.0, 2.0, 4.0], [0.5, 0.5, 0.5]], dtype=F64)
    torch.testing.assert_close(formulas.rloo_advantages(rewards),
                               torch.tensor([[-2.0, -0.5, 2.5], [0.0, 0.0, 0.0]], dtype=F64))
    torch.testing.assert_close(formulas.reinforce_advantages(rewards, 1.0), rewards - 1.0)
    with pytest.raises(ValueError, match="baseline"):
        formulas.reinforce_advantages(rewards, "median")
    # group advantages: unbiased std (as statistics.stdev), eps 1e-4; Dr. GRPO: centered only
    import statistics
    std0 = statistics.stdev([1.0, 2.0, 4.0])
    expected = torch.tensor([[(r - 7 / 3) / (std0 + 1e-4) for r in (1.0, 2.0, 4.0)], [0.0, 0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(formulas.group_advantages(rewards), expected)
    torch.testing.assert_close(formulas.group_advantages(rewards, scale="none"),
                               rewards - rewards.mean(1, keepdim=True))
    torch.testing.assert_close(formulas.group_advantages(torch.tensor([[3.0]])), torch.zeros(1, 1))
    with pytest.raises(ValueError, match="scale"):
        formulas.group_advantages(rewards, scale="max")


# ---------------------------------------------------------------------------------------------
# DFT as a pure function
# ---------------------------------------------------------------------------------------------


def restate_dft(scores, ref, tau, gamma, u_prev):
    """float64, linear space: u = log((1 - gamma) e^{u_prev} + gamma * mean_j e^{d_j}) (no state: log mean)."""
    d = scores[:, 1:].detach() / tau
    if ref is not None:
        d = d - ref
    mean_exp = torch.exp(d).mean(1)
    u = torch.log(mean_exp) if u_prev is None else torch.log((1 - gamma) * torch.exp(u_prev) + gamma * mean_exp)
    w = torch.exp(d - u[:, None])
    per_group = torch.stack([-scores[g, 0] + sum(w[g, j] * scores[g, 1 + j] for j in range(d.shape[1])) / d.shape[1]
                             for g in range(scores.shape[0])])
    return per_group, u, w, d


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("variant", ["dft", "dft2"])
def test_dft_step_matches_restatement(variant, with_state):
    k, tau, gamma = 3, (1.0 if variant == "dft" else 0.3), 0.7
    scores64 = _scores(4, 1 + k, seed=11, scale=2.0, offset=-8.0 if variant == "dft" else -2.0)
    ref = torch.randn(4, k, generator=torch.Generator().manual_seed(2), dtype=F64) - 8 if variant == "dft" else None
    u_prev = torch.tensor([-1.0, 0.5, 2.0, -3.0], dtype=F64) if with_state else None
    expected = restate_dft(scores64, ref, tau, gamma, u_prev)
    for dtype, tol in ((F64, 1e-12), (torch.float32, 2e-5)):
        scores = scores64.to(dtype).requires_grad_(True)
        step = formulas.dft_step(scores, ref=None if ref is None else ref.to(dtype), tau=tau, gamma=gamma,
                                 u_prev=None if u_prev is None else u_prev.to(dtype))
        for ours, exp, name in zip((step.per_group, step.u, step.weights, step.d), expected, "puwd"):
            torch.testing.assert_close(ours.double(), exp.detach(), rtol=tol, atol=tol, msg=name)
        assert not step.u.requires_grad and not step.weights.requires_grad and not step.d.requires_grad
        assert bool(step.update.all())
        # gradient: only through -s(y) and the negatives' scores, weights constant
        (grad,) = torch.autograd.grad(step.per_group.sum(), scores)
        expected_grad = torch.cat([-torch.ones(4, 1, dtype=F64), expected[2] / k], 1)
        torch.testing.assert_close(grad.double(), expected_grad, rtol=tol, atol=tol)
        # the registry's fn is the per-group loss of the same step
        fn_value = get_loss(variant).fn(scores.detach(), ref=None if ref is None else ref.to(dtype), tau=tau,
                                        gamma=gamma, u_prev=None if u_prev is None else u_prev.to(dtype))
        torch.testing.assert_close(fn_value, step.per_group.detach(), rtol=0, atol=0)


def test_dft_gamma_one_and_replayed_u():
    scores, ref = _scores(3, 3, seed=4), torch.zeros(3, 2, dtype=F64)
    stateless = formulas.dft_step(scores, ref=ref, tau=1.0, gamma=0.5)
    gamma_one = formulas.dft_step(scores, ref=ref, tau=1.0, gamma=1.0, u_prev=torch.full((3,), 50.0, dtype=F64))
    torch.testing.assert_close(gamma_one.u, stateless.u)
    fixed = torch.tensor([0.0, -1.0, 3.0], dtype=F64)
    replay = formulas.dft_step(scores, ref=ref, tau=1.0, gamma=0.5, u_prev=torch.zeros(3, dtype=F64), u=fixed)
    torch.testing.assert_close(replay.u, fixed)
    torch.testing.assert_close(replay.weights, torch.exp(replay.d - fixed[:, None]))


def test_dft_update_mask_flags_non_finite_and_empty_groups():
    scores = _scores(4, 3, seed=9)
    scores[1, 2] = float("nan")  # a negative's score
    scores[2, 0] = float("inf")  # the positive's score
    counts = torch.tensor([[3, 2, 1], [1, 1, 1], [2, 2, 2], [4, 0, 0]], dtype=F64)  # group 3: no negative token
    step = formulas.dft_step(scores, ref=torch.zeros(4, 2, dtype=F64), counts=counts, tau=1.0, gamma=0.9,
                             u_prev=torch.zeros(4, dtype=F64))
    assert step.update.tolist() == [True, False, False, False]
    assert bool(torch.isfinite(step.weights[3]).all()), "an empty group still gets finite weights (times s = 0)"
    without_counts = formulas.dft_step(scores, ref=torch.zeros(4, 2, dtype=F64), tau=1.0, gamma=0.9)
    assert without_counts.update.tolist() == [True, False, False, True]


# ---------------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------------


def test_registry_contents():
    assert loss_names() == tuple(LOSSES)
    assert loss_names("sft") == ("sft",)
    assert loss_names("pairwise") == ("dpo", "ipo", "hinge", "simpo", "unlikelihood")
    assert loss_names("group") == ("rwr", "reinforce", "rloo")
    assert loss_names("dft") == ("dft", "dft2")
    assert loss_names("policy") == ("ppo", "grpo", "dapo", "dr_grpo")
    for name, spec in LOSSES.items():
        assert spec.name == name and get_loss(name) is spec
        assert spec.paper and spec.formula and spec.rows
        assert spec.level == ("token" if spec.family == "policy" else "sequence")
        for hp, value in spec.defaults.items():
            assert HYPERPARAMETERS[hp].check(hp, value) == value
        if spec.rows_per_group is not None:
            assert spec.rows_per_group >= spec.min_rows_per_group
        assert spec.needs_rewards == (spec.family in ("group", "policy"))
        assert spec.needs_negatives == (spec.family in ("pairwise", "group", "dft"))
        assert spec.needs_old_logps == (spec.family == "policy")
        assert (spec.advantage is not None) == (spec.family == "policy")
    needing_ref = {n for n, s in LOSSES.items() if s.needs_ref}
    assert needing_ref == {"dpo", "ipo", "hinge", "dft", "grpo"}
    assert [n for n, s in LOSSES.items() if s.ref_optional] == ["hinge"]
    assert [n for n, s in LOSSES.items() if s.mean_scores] == ["simpo", "dft2"]
    assert [n for n, s in LOSSES.items() if s.token_term is not None] == ["unlikelihood"]
    assert get_loss("rloo").min_rows_per_group == 2
    # the policy family's settings and papers
    assert get_loss("ppo").defaults["aggregation"] == "token_mean" and "Schulman" in get_loss("ppo").paper
    assert get_loss("grpo").defaults["aggregation"] == "sequence_mean" and "Shao" in get_loss("grpo").paper
    assert get_loss("grpo").defaults["kl_beta"] == 0.04
    assert get_loss("dapo").defaults["clip_eps_high"] == 0.28 and "Yu" in get_loss("dapo").paper
    assert get_loss("dr_grpo").defaults["aggregation"] == "constant" and "Liu" in get_loss("dr_grpo").paper
    assert get_loss("dr_grpo").advantage == "none" and get_loss("grpo").advantage == "std"


def test_public_names_are_derived_from_the_registry():
    assert PREFERENCE_LOSSES == loss_names("sft") + loss_names("pairwise") + loss_names("group")
    assert DFT_DEFAULTS == {"dft": {"tau": 1.0, "gamma": 0.85}, "dft2": {"tau": 0.3, "gamma": 0.9}}


def test_fused_signature_defaults_equal_registry_defaults():
    params = inspect.signature(fused_preference_loss).parameters
    for name in PREFERENCE_LOSSES:
        for hp, value in get_loss(name).defaults.items():
            assert params[hp].default == value, (name, hp)
    policy_params = inspect.signature(fused_policy_loss).parameters
    for hp, value in get_loss("ppo").defaults.items():
        assert policy_params[hp].default == value, hp
    assert inspect.signature(fused_dft_loss).parameters["tau"].default is None  # None = the registry's


def test_get_loss_and_loss_names_errors():
    with pytest.raises(ValueError, match="loss must be one of"):
        get_loss("kto")
    with pytest.raises(ValueError, match="loss must be one of"):
        get_loss(None)
    with pytest.raises(ValueError, match="family"):
        loss_names("rl")
    with pytest.raises(TypeError):
        LOSSES["new"] = LOSSES["sft"]  # read-only
    with pytest.raises(TypeError):
        get_loss("dpo").defaults["beta"] = 1.0  # read-only


def test_spec_call_fills_defaults_and_checks_ranges():
    scores, ref = _scores(3, 2, seed=1), torch.zeros(3, 2, dtype=F64)
    dpo = get_loss("dpo")
    torch.testing.assert_close(dpo(scores, ref=ref), formulas.dpo_loss(scores, ref=ref, beta=0.1))
    torch.testing.assert_close(dpo(scores, ref=ref, beta=0.3), formulas.dpo_loss(scores, ref=ref, beta=0.3))
    with pytest.raises(ValueError, match=r"beta must be a finite number in \[1e-06, 1e\+06\]"):
        get_loss("ipo")(scores, ref=ref, beta=1e-30)
    with pytest.raises(TypeError, match="no hyper-parameter"):
        dpo.hyperparameters(tau=1.0)
    with pytest.raises(TypeError, match="beta"):
        dpo.hyperparameters(beta="0.1")


HYPERPARAMETER_ERRORS = {
    # (name, value): (exception, message fragment)
    ("beta", 0.0): (ValueError, r"\[1e-06, 1e\+06\]"),
    ("beta", 1e-30): (ValueError, r"\[1e-06"),
    ("beta", 1e30): (ValueError, r"1e\+06\]"),
    ("beta", float("nan")): (ValueError, "finite"),
    ("beta", True): (TypeError, "bool"),
    ("beta", None): (TypeError, "NoneType"),
    ("baseline", True): (TypeError, "'mean', 'none' or a finite number"),
    ("baseline", float("nan")): (ValueError, "baseline"),
    ("baseline", "median"): (ValueError, "'mean', 'none'"),
    ("gamma", 0.0): (ValueError, r"\(0, 1\]"),
    ("gamma", 1.5): (ValueError, r"\(0, 1\]"),
    ("tau", -1.0): (ValueError, "tau"),
    ("unlikelihood_alpha", -0.5): (ValueError, r"\[0, "),
    ("simpo_gamma", float("inf")): (ValueError, "simpo_gamma"),
    ("clip_eps", 0.0): (ValueError, r"\(0, "),
    ("clip_eps_high", -0.1): (ValueError, r"\[0, "),
    ("kl_beta", -1.0): (ValueError, "kl_beta"),
    ("aggregation", "mean"): (ValueError, "'token_mean', 'sequence_mean' or 'constant'"),
    ("aggregation", 1): (TypeError, "aggregation"),
    ("max_tokens", 0): (ValueError, "max_tokens"),
    ("max_tokens", 2.0): (TypeError, "max_tokens"),
}


@pytest.mark.parametrize(("name", "value"), list(HYPERPARAMETER_ERRORS), ids=[f"{n}={v!r}" for n, v in
                                                                             HYPERPARAMETER_ERRORS])
def test_hyperparameter_checks(name, value):
    exc, match = HYPERPARAMETER_ERRORS[(name, value)]
    with pytest.raises(exc, match=match) as info:
        registry.check_hyperparameter(name, value)
    assert name in str(info.value)


def test_hyperparameter_accepts_its_forms():
    assert registry.check_hyperparameter("baseline", "none") == "none"
    assert registry.check_hyperparameter("baseline", -2) == -2.0
    assert registry.check_hyperparameter("clip_eps_high", None) is None
    assert registry.check_hyperparameter("max_tokens", 7) == 7
    assert registry.check_hyperparameter("gamma", 1) == 1.0


def test_bad_registry_entries_are_rejected():
    with pytest.raises(ValueError, match="family"):
        LossSpec("x", "rl", formulas.sft_loss, "p", "f", 1, "r")
    with pytest.raises(ValueError, match="HYPERPARAMETERS"):
        LossSpec("x", "sft", formulas.sft_loss, "p", "f", 1, "r", {"lr": 1.0})
    with pytest.raises(ValueError, match="beta"):
        LossSpec("x", "pairwise", formulas.dpo_loss, "p", "f", 2, "r", {"beta": -1.0})


def test_a_new_registry_entry_is_all_fused_preference_loss_needs(monkeypatch):
    """Adding a loss = one function + one registry entry: a made-up "odds" loss runs through the fused path."""

    def odds_loss(scores, *, ref=None, rewards=None, counts=None, token_term_sums=None, beta):
        return torch.nn.functional.softplus(-beta * (scores[:, 0] - scores[:, 1]))

    spec = LossSpec("odds", "pairwise", odds_loss, "made up for this test", "softplus(-beta (s_c - s_r))", 2,
                    "(chosen, rejected)", {"beta": 0.1}, needs_negatives=True)
    monkeypatch.setattr(registry, "LOSSES", dict(LOSSES, odds=spec))
    gen = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(4, 3, 8, generator=gen), torch.randn(20, 8, generator=gen)
    labels = torch.randint(0, 20, (4, 3), generator=gen)
    loss, stats = fused_preference_loss(hidden, weight, labels, loss="odds", beta=0.5, return_stats=True,
                                        backend="torch")
    s = stats["seq_logps"].double().reshape(2, 2)
    torch.testing.assert_close(loss.double(), _neg_log_sigmoid(0.5 * (s[:, 0] - s[:, 1])).mean(), rtol=1e-6, atol=1e-6)
