"""Tests of the bandit experiment (``python -m dftkern.experiments.bandit``).

* the problem definition: pi_ref (exact histogram vs a Monte Carlo one), the two rewards;
* the policies as inputs of the fused ops (initialised at pi_ref, log-probs = log_softmax);
* every method's loss *and gradient* against a plain float64 PyTorch restatement written from
  the formulas (independent of dftkern), including DFT's state update;
* training bookkeeping (curves, sample reuse, determinism), configuration errors;
* ``--quick`` end to end through the command line.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dftkern import fused_linear_logprobs
from dftkern.experiments import bandit
from dftkern.experiments.bandit import (
    ALL_METHODS,
    METHODS,
    BanditConfig,
    LogitPolicy,
    MLPPolicy,
    bandit_reward,
    expected_reward,
    method_loss,
    reference_policy,
    train_run,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------
# problem definition
# --------------------------------------------------------------------------------------


def test_reference_policy_is_a_distribution_with_mode_near_action_20():
    probs = reference_policy()
    assert probs.shape == (100,) and probs.dtype == torch.float64
    assert abs(float(probs.sum()) - 1.0) < 1e-12
    assert bool((probs > 0).all())
    # interior mode (the end bins collect the squashed Cauchy tails, see the docstring)
    interior_mode = int(probs[1:-1].argmax()) + 1
    assert 14 <= interior_mode <= 22, interior_mode
    assert interior_mode == 16
    # unimodal inside: increasing up to the interior mode (after the first bins), decreasing to
    # the minimum at action 81, then rising into the right tail bin
    assert bool((probs[4:interior_mode].diff() > 0).all())
    assert bool((probs[interior_mode:82].diff() < 0).all())
    assert bool((probs[81:].diff() > 0).all())
    # little mass where R_far peaks: ~0.2 % per action around 70, vs 2.7 % at the mode
    assert float(probs[65:76].sum()) < 0.04
    assert float(probs[interior_mode]) > 8 * float(probs[70])


def test_reference_policy_matches_monte_carlo_histogram():
    """The exact CDF construction equals the histogram of tanh(Cauchy(-0.7, 0.4)) samples."""
    generator = torch.Generator().manual_seed(0)
    n = 400_000
    uniform = torch.rand(n, generator=generator, dtype=torch.float64)
    samples = torch.tanh(-0.7 + 0.4 * torch.tan(math.pi * (uniform - 0.5)))  # Cauchy by inversion
    bins = torch.clamp(((samples + 1.0) / 2.0 * 100).floor().long(), 0, 99)
    hist = torch.bincount(bins, minlength=100).double() / n
    exact = reference_policy()
    # binomial std of a bin is at most sqrt(0.08 / n) ~ 4.5e-4: 5 sigma
    assert float((hist - exact).abs().max()) < 2.5e-3
    assert abs(float(exact[0]) - (0.5 + math.atan((math.atanh(-0.98) + 0.7) / 0.4) / math.pi)) < 1e-12


def test_reference_policy_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_actions"):
        reference_policy(num_actions=1)
    with pytest.raises(ValueError, match="scale"):
        reference_policy(scale=0.0)


@pytest.mark.parametrize("name, center", [("far", 70), ("near", 20)])
def test_rewards(name, center):
    reward = bandit_reward(name)
    assert reward.shape == (100,) and reward.dtype == torch.float64
    assert int(reward.argmax()) == center and float(reward[center]) == 1.0
    for offset in (-10, 10):  # one width away: exp(-1)
        assert abs(float(reward[center + offset]) - math.exp(-1.0)) < 1e-12
    a = 37
    assert abs(float(reward[a]) - math.exp(-(((a - center) / 10.0) ** 2))) < 1e-12
    assert bool((reward[:center].diff() > 0).all()) and bool((reward[center:].diff() < 0).all())


def test_reward_rejects_unknown_name():
    with pytest.raises(ValueError, match="reward"):
        bandit_reward("middle")


def test_expected_reward_under_reference():
    probs = reference_policy()
    for name, expected in (("far", 0.0390), ("near", 0.3772)):
        reward = bandit_reward(name)
        plain = sum(float(probs[a]) * math.exp(-(((a - bandit.REWARDS[name]) / 10.0) ** 2)) for a in range(100))
        assert abs(expected_reward(probs, reward) - plain) < 1e-12
        assert abs(plain - expected) < 5e-4
    with pytest.raises(ValueError, match="same length"):
        expected_reward(probs[:10], bandit_reward("far"))


# --------------------------------------------------------------------------------------
# policies as fused-op inputs
# --------------------------------------------------------------------------------------


def _policy(kind: str, seed: int = 0, perturb: float = 0.0, num_seeds: int = 1):
    log_ref = reference_policy().log().float()
    if kind == "logits":
        policy = LogitPolicy(log_ref, num_seeds=num_seeds)
    else:
        policy = MLPPolicy(log_ref, seeds=range(seed, seed + num_seeds), hidden_size=6)
    if perturb:
        generator = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            policy.weight.add_(perturb * torch.randn(policy.weight.shape, generator=generator))
    return policy


@pytest.mark.parametrize("kind", ["logits", "mlp"])
def test_policy_starts_at_reference(kind):
    policy = _policy(kind, num_seeds=3)
    probs = bandit.policy_probs(policy)
    assert probs.shape == (3, 100)
    assert float((probs - reference_policy()).abs().max()) < 1e-6


@pytest.mark.parametrize("kind", ["logits", "mlp"])
def test_fused_logprobs_of_policy_inputs_are_log_pi(kind):
    """One-token rows with label a give log pi(a): the fused op sees the policy's logits."""
    policy = _policy(kind, perturb=0.3, num_seeds=2)
    hidden, weight, bias = policy.fused_inputs(100)  # rows 0..99: seed 0, rows 100..199: seed 1
    labels = torch.arange(100).repeat(2).reshape(200, 1)
    logps = fused_linear_logprobs(hidden, weight, labels, bias=bias)
    expected = torch.log_softmax(policy.logits().detach().double(), dim=-1).reshape(200)
    assert logps.shape == (200, 1)
    assert float((expected[:100] - expected[100:]).abs().max()) > 1e-2  # the two seeds differ
    torch.testing.assert_close(logps[:, 0].detach().double(), expected, rtol=0, atol=2e-5)


# --------------------------------------------------------------------------------------
# losses against a plain restatement
# --------------------------------------------------------------------------------------


def plain_loss(method, log_pi, actions, rewards, log_ref, config, u_prev=None, old=None):
    """Float64 restatement of every method from its formula (``log_pi`` [V] differentiable).

    ``old`` [V]: the sampler's log-probs (token-level methods; None = the current policy, ratio 1).
    The losses not given a knob by BanditConfig use the published defaults written out here.
    Returns ``(loss, u)`` (u: DFT's updated state, else None).
    """
    s = log_pi[actions]  # [G, n] sequence log-probs of one-token sequences
    ref = log_ref.double()[actions]
    r = rewards.double()
    num_groups, n = actions.shape
    best, worst = r.argmax(1), r.argmin(1)
    rows = torch.arange(num_groups)
    if method == "bon_sft":
        return -s[rows, best].mean(), None
    if method in ("dpo", "ipo"):
        margin = (s[rows, best] - ref[rows, best]) - (s[rows, worst] - ref[rows, worst])
        if method == "dpo":
            return -F.logsigmoid(config.dpo_beta * margin).mean(), None
        return ((margin - 1 / (2 * config.ipo_beta)) ** 2).mean(), None
    if method == "hinge":  # SLiC, beta 0.1
        margin = (s[rows, best] - ref[rows, best]) - (s[rows, worst] - ref[rows, worst])
        return torch.clamp(1 - 0.1 * margin, min=0).mean(), None
    if method == "simpo":  # beta 0.1, gamma 0.5, reference-free (one token: mean = sum)
        return -F.logsigmoid(0.1 * (s[rows, best] - s[rows, worst]) - 0.5).mean(), None
    if method == "unlikelihood":  # alpha 1: -log p(chosen) - log(1 - p(rejected))
        return (-s[rows, best] - torch.log1p(-torch.exp(s[rows, worst]))).mean(), None
    if method in ("ppo", "grpo", "dapo", "dr_grpo"):
        # clip 0.2 (DAPO: 0.2 below, 0.28 above); GRPO adds 0.04 x the k3 KL to pi_ref; advantages
        # (R - mean) / (unbiased std + 1e-4), Dr. GRPO R - mean; one token per row, so every
        # aggregation is the mean over the G * n rows
        centered = r - r.mean(1, keepdim=True)
        adv = centered if method == "dr_grpo" else centered / (r.std(1, keepdim=True) + 1e-4)
        old_s = s.detach() if old is None else old.double()[actions]
        ratio = torch.exp(s - old_s)
        high = 1.28 if method == "dapo" else 1.2
        terms = -torch.minimum(ratio * adv, torch.clamp(ratio, 0.8, high) * adv)
        if method == "grpo":
            delta = ref - s
            terms = terms + 0.04 * (torch.exp(delta) - delta - 1)
        return terms.mean(), None
    if method == "rwr":
        w = torch.softmax(r / config.rwr_beta, dim=1)
        return -(w * s).sum(1).mean(), None
    if method in ("rloo", "reinforce"):
        if method == "rloo":
            adv = torch.stack([r[:, j] - (r.sum(1) - r[:, j]) / (n - 1) for j in range(n)], dim=1)
        else:
            adv = r - r.mean(1, keepdim=True)
        return -(adv * s).mean(), None
    if method in ("dft", "dft2", "dft_unselected"):
        tau, gamma = (config.dft2_tau, config.dft2_gamma) if method == "dft2" else (config.dft_tau, config.dft_gamma)
        losses, us = [], []
        for g in range(num_groups):
            if method == "dft_unselected":  # every sample of the group is a negative
                neg_idx = list(range(n))
            else:
                neg_idx = [j for j in range(n) if j != int(best[g])]
            s_neg = s[g, neg_idx]
            d = s_neg.detach() / tau - (0.0 if method == "dft2" else ref[g, neg_idx])
            k = len(neg_idx)
            batch_est = math.log(gamma) + torch.logsumexp(d, 0) - math.log(k)
            u = torch.logaddexp(torch.tensor(math.log(1 - gamma), dtype=torch.float64) + u_prev[g], batch_est)
            omega = torch.exp(d - u)
            losses.append(-s[g, best[g]] + (omega * s_neg).sum() / k)
            us.append(u)
        return torch.stack(losses).mean(), torch.stack(us)
    raise AssertionError(method)


def _batch(seed=0, groups=5, n=4, with_ties=True, num_seeds=None):
    generator = torch.Generator().manual_seed(seed)
    shape = (groups, n) if num_seeds is None else (num_seeds, groups, n)
    actions = torch.randint(0, 100, shape, generator=generator)
    if with_ties:
        first = actions if num_seeds is None else actions[-1]
        first[0] = torch.tensor([80, 60, 10, 99])  # 80 and 60 tie for R_far (exp(-1)), as best
        first[1] = torch.tensor([33, 70, 33, 70])  # duplicated actions: ties for best and worst
    rewards = bandit_reward("far").float()[actions]
    return actions, rewards


@pytest.mark.parametrize("kind", ["logits", "mlp"])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_method_loss_and_gradient_match_plain_restatement(method, kind):
    from dftkern import DFTState

    config = BanditConfig(dpo_beta=0.3, ipo_beta=0.2, rwr_beta=0.25, dft_tau=0.9, dft_gamma=0.8)
    num_seeds, groups = 2, 5
    actions, rewards = _batch(seed=1, groups=groups, num_seeds=num_seeds)
    log_ref = reference_policy().log().float()
    policy = _policy(kind, seed=3, perturb=0.5, num_seeds=num_seeds)
    u_init = -0.4
    state = DFTState(num_seeds * groups, init=u_init) if method in ("dft", "dft2", "dft_unselected") else None

    loss = method_loss(method, policy, actions, rewards, log_ref, config, state)
    params = [p for p in policy.parameters()]
    grads = torch.autograd.grad(loss, params)

    # plain: each seed separately, from its own logits; the bank's loss is the sum over seeds
    plain_policy = _policy(kind, seed=3, perturb=0.5, num_seeds=num_seeds)
    plain_params = [p for p in plain_policy.parameters()]
    log_pi = torch.log_softmax(plain_policy.logits().double(), dim=-1)
    u_prev = torch.full((groups,), u_init, dtype=torch.float64)
    per_seed = [plain_loss(method, log_pi[i], actions[i], rewards[i], log_ref, config, u_prev)
                for i in range(num_seeds)]
    expected = sum(loss_i for loss_i, _ in per_seed)
    expected_u = torch.cat([u for _, u in per_seed]) if state is not None else None
    expected_grads = torch.autograd.grad(expected, plain_params)

    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected_grads):
        assert float(want.abs().max()) > 0 or kind == "mlp"  # every logit gradient is non-trivial
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-5)
    if state is not None:
        torch.testing.assert_close(state.u.double(), expected_u.detach(), rtol=1e-5, atol=1e-5)
        assert state.num_updates.tolist() == [1] * (num_seeds * groups)


@pytest.mark.parametrize("kind", ["logits", "mlp"])
@pytest.mark.parametrize("method", ["ppo", "dapo", "grpo", "dr_grpo"])
def test_token_level_methods_clip_against_the_sampler(method, kind):
    """Importance ratios against the sampler's log-probs, inside and outside the clip range, both
    advantage signs: loss and gradient match the plain restatement."""
    config = BanditConfig()
    num_seeds, groups = 2, 6
    actions, rewards = _batch(seed=4, groups=groups, num_seeds=num_seeds)
    log_ref = reference_policy().log()
    policy = _policy(kind, seed=5, perturb=0.4, num_seeds=num_seeds).double()
    # the sampler: the current policy moved by up to +-0.5 nats per action (ratios 0.6 .. 1.6)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        old = torch.log_softmax(policy.logits() + torch.empty(num_seeds, 100, dtype=torch.float64).uniform_(
            -0.5, 0.5, generator=generator), dim=-1)
    loss = method_loss(method, policy, actions, rewards.double(), log_ref, config, old_log_probs=old)
    grads = torch.autograd.grad(loss, list(policy.parameters()))

    log_pi = torch.log_softmax(policy.logits(), dim=-1)
    ratio = torch.exp(log_pi.detach() - old).gather(1, actions.reshape(num_seeds, -1))
    assert bool((ratio < 0.8).any()) and bool((ratio > 1.28).any()) and bool(((ratio > 0.8) & (ratio < 1.2)).any())
    expected = sum(plain_loss(method, log_pi[i], actions[i], rewards[i], log_ref, config, old=old[i])[0]
                   for i in range(num_seeds))
    expected_grads = torch.autograd.grad(expected, list(policy.parameters()))
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_dft_is_best_of_n_sft_plus_a_negative_term():
    """With all omegas at 0 weight (K negatives of vanishing ratio) DFT's gradient is SFT's."""
    config = BanditConfig()
    actions, rewards = _batch(seed=2, with_ties=False)
    log_ref = reference_policy().log().float()
    policy = _policy("logits", perturb=0.2)
    sft = method_loss("bon_sft", policy, actions, rewards, log_ref, config)
    # a huge reference log-prob makes d -> -inf relative to u (state u fixed at 0 with gamma -> small)
    huge_ref = log_ref + 80.0
    from dftkern import DFTState

    dft = method_loss("dft", policy, actions, rewards, huge_ref, replace_cfg(config, dft_gamma=1e-6),
                      DFTState(actions.shape[0], init=0.0))
    torch.testing.assert_close(dft, sft, rtol=1e-6, atol=1e-6)


def replace_cfg(config, **changes):
    from dataclasses import replace

    return replace(config, **changes)


def test_method_loss_rejects_bad_inputs():
    policy = _policy("logits")
    log_ref = reference_policy().log().float()
    actions, rewards = _batch()
    with pytest.raises(ValueError, match="method"):
        method_loss("sac", policy, actions, rewards, log_ref, BanditConfig())
    with pytest.raises(ValueError, match=r"G, n\]"):
        method_loss("dpo", policy, actions.reshape(-1), rewards.reshape(-1), log_ref, BanditConfig())
    with pytest.raises(TypeError, match="int64"):
        method_loss("dpo", policy, actions.int(), rewards, log_ref, BanditConfig())


# --------------------------------------------------------------------------------------
# training loop and configuration
# --------------------------------------------------------------------------------------


def test_train_run_bookkeeping_and_determinism():
    config = BanditConfig(steps=6, groups=4, reuse=4)
    run = train_run("dft", "on_policy", "far", seed=0, config=config)
    assert run["curve"].shape == (7,)
    assert abs(float(run["curve"][0]) - expected_reward(reference_policy(), bandit_reward("far"))) < 1e-6
    assert run["samples"] == 2 * 4 * 4  # batches drawn at steps 0 and 4
    assert abs(float(run["final_probs"].sum()) - 1.0) < 1e-9
    again = train_run("dft", "on_policy", "far", seed=0, config=config)
    assert torch.equal(run["curve"], again["curve"])
    other_seed = train_run("dft", "on_policy", "far", seed=1, config=config)
    assert not torch.equal(run["curve"], other_seed["curve"])

    # a bank of seeds trains each seed exactly as its own run would (float64: ~1e-12 or better)
    assert run["curve"].dtype == torch.float64
    bank = bandit.train_seeds("dft", "on_policy", "far", [1, 0], config)
    torch.testing.assert_close(bank["curves"][1], run["curve"], rtol=0, atol=1e-12)
    torch.testing.assert_close(bank["curves"][0], other_seed["curve"], rtol=0, atol=1e-12)
    mlp_config = replace_cfg(config, policy="mlp", hidden_size=4)
    mlp_bank = bandit.train_seeds("dpo", "on_policy", "far", [0, 1], mlp_config)
    mlp_single = train_run("dpo", "on_policy", "far", seed=1, config=mlp_config)
    torch.testing.assert_close(mlp_bank["curves"][1], mlp_single["curve"], rtol=0, atol=1e-12)
    assert float(mlp_single["curve"][-1]) != float(mlp_single["curve"][0])
    # a bank whose size is not a power of two, with enough groups and steps that Adam amplifies
    # any rounding difference on the zero-gradient logits of unsampled actions (RLOO offline)
    wide = replace_cfg(config, groups=32, reuse=1, steps=8)
    odd_bank = bandit.train_seeds("rloo", "offline", "near", [2, 0, 1], wide)
    for row, seed in enumerate([2, 0, 1]):
        alone = train_run("rloo", "offline", "near", seed=seed, config=wide)
        torch.testing.assert_close(odd_bank["curves"][row], alone["curve"], rtol=0, atol=1e-12)
    mlp_wide = replace_cfg(wide, policy="mlp", hidden_size=4, reuse=2)
    mlp_odd = bandit.train_seeds("ppo", "on_policy", "far", [2, 0, 1], mlp_wide)
    alone = train_run("ppo", "on_policy", "far", seed=1, config=mlp_wide)
    torch.testing.assert_close(mlp_odd["curves"][2], alone["curve"], rtol=0, atol=1e-12)

    sparse = train_run("rloo", "offline", "near", seed=0, config=replace_cfg(config, eval_every=4))
    assert bandit.eval_steps(replace_cfg(config, eval_every=4)) == [0, 4, 6]
    assert sparse["curve"].shape == (3,)


def test_training_raises_expected_reward_on_near_reward():
    config = BanditConfig(steps=15, groups=8)
    base = expected_reward(reference_policy(), bandit_reward("near"))
    for method in ("bon_sft", "dpo", "dft"):
        curve = train_run(method, "on_policy", "near", seed=0, config=config)["curve"]
        assert float(curve[-1]) > base + 0.1, (method, curve[-1])


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"steps": 0}, "steps"),
        ({"group_size": 1}, "group_size"),
        ({"reuse": 0}, "reuse"),
        ({"lr": -1.0}, "lr"),
        ({"dft_gamma": 1.5}, "dft_gamma"),
        ({"policy": "transformer"}, "policy"),
        ({"methods": ("dpo", "sac")}, "methods"),
        ({"methods": ()}, "methods"),
        ({"regimes": ("online",)}, "regimes"),
        ({"rewards": ("far", "far")}, "rewards"),
        ({"threshold": 0.0}, "threshold"),
    ],
)
def test_config_validation_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        BanditConfig(**changes).validate()


def test_command_line_parsing():
    parser = bandit.build_parser()
    quick = bandit.config_from_args(parser.parse_args(["--quick"]))
    assert (quick.steps, quick.seeds, quick.groups) == (40, 2, 16)
    assert quick.methods == METHODS
    explicit = bandit.config_from_args(parser.parse_args(["--quick", "--steps", "7", "--methods", "dpo", "dft"]))
    assert explicit.steps == 7 and explicit.seeds == 2 and explicit.methods == ("dpo", "dft")
    with pytest.raises(SystemExit):
        bandit.main(["--methods", "sac", "--out", "unused"])


def test_quick_command_line_end_to_end(tmp_path):
    out = tmp_path / "bandit"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "dftkern.experiments.bandit", "--quick", "--quiet", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"bandit --quick took {elapsed:.1f} s")  # a speed figure, not a test condition (timeout above)

    for name in ("reward_curves.png", "final_policies.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    table = (out / "results.md").read_text()
    assert "--quick" in table and "R_far" in table and "R_near" in table
    assert table.count("| DFT |") == 4  # 2 rewards x 2 regimes

    payload = json.loads((out / "results.json").read_text())
    assert payload["config"]["steps"] == 40 and payload["config"]["seeds"] == 2
    assert payload["curve_steps"] == list(range(41))
    summary = payload["summary"]
    assert len(summary) == 2 * 2 * len(METHODS)
    bases = {name: expected_reward(reference_policy(), bandit_reward(name)) for name in ("far", "near")}
    for key, curve in payload["mean_curves"].items():
        method, regime, reward_name = key.split("/")
        assert len(curve) == 41 and abs(curve[0] - bases[reward_name]) < 1e-4
        assert all(0.0 <= v <= 1.0 for v in curve)
    for row in summary:  # every method improves the near reward within 40 steps
        if row["reward"] == "near":
            assert row["final_mean"] > bases["near"] + 0.2, row


def test_paired_comparisons_pair_the_same_seeds():
    """Differences are taken seed by seed (common random numbers), against best-of-N SFT and across regimes."""
    config = BanditConfig(seeds=3, methods=("bon_sft", "dft"), rewards=("far",))
    finals = {("bon_sft", "offline"): [0.1, 0.2, 0.3], ("dft", "offline"): [0.15, 0.22, 0.36],
              ("bon_sft", "on_policy"): [0.9, 0.8, 0.95], ("dft", "on_policy"): [0.85, 0.79, 0.9]}
    curves = {(m, r, "far"): torch.tensor([[0.04, v] for v in values], dtype=torch.float64)
              for (m, r), values in finals.items()}
    rows = bandit.report.paired_comparisons({"config": config, "curves": curves})
    by_key = {(row["method"], row["regime"]): row for row in rows}
    assert set(by_key) == {("dft", "offline"), ("dft", "on_policy"), ("bon_sft", "on_policy - offline"),
                           ("dft", "on_policy - offline")}
    row = by_key[("dft", "offline")]
    d = [0.05, 0.02, 0.06]
    assert row["vs"] == "bon_sft" and row["final"]["wins"] == 3 and row["final"]["n"] == 3
    assert row["final"]["mean"] == pytest.approx(sum(d) / 3)
    assert row["final"]["sd"] == pytest.approx(torch.tensor(d).std().item())
    assert row["auc"]["mean"] == pytest.approx(sum(d) / 6)  # curves [0.04, final]: the mean moves by half
    assert by_key[("dft", "on_policy")]["final"]["wins"] == 0
    assert by_key[("dft", "on_policy - offline")]["final"]["mean"] == pytest.approx((0.7 + 0.57 + 0.54) / 3)
