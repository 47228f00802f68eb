"""The policy losses (PPO-clip / GRPO / DAPO / Dr. GRPO): pure math and :func:`dftkern.fused_policy_loss`.

The float64 restatement (:func:`restate_policy`) follows the formulas of issue 13 token by token
with Python scalars' worth of tensor ops: ``r = exp(logp - old)``, ``surr = -min(r A, clip(r, 1 - eps,
1 + eps_high) A)``, ``kl = exp(ref - logp) - (ref - logp) - 1``, ``term = surr + kl_beta kl -
entropy_coef H``, then the aggregation by its definition (token mean; per-row mean then mean over
non-empty rows; sum / (R max_tokens)). Inputs put the ratios on both sides of both clip bounds and
give advantages of both signs.

* pure functions (:func:`dftkern.losses.formulas.policy_loss` and friends): values and gradients
  against the restatement in float64, the zero gradient of clipped tokens, ``old_logps=None``;
* the fused loss (needs the engine's ``fused_token_loss``; skipped with that reason otherwise):
  loss, gradients (hidden, weight, bias) and stats against a float64 full-logit reference, padded
  and packed, torch engine and Triton under ``TRITON_INTERPRET=1``; float64 gradients against central
  differences on the torch engine with KL and entropy (gradcheck's numerical half); the argument errors of the contract;
* TRL's GRPO loss (``GRPOTrainer._compute_loss``) for the loss types both define, when ``trl`` is
  importable (skipped with a reason otherwise).
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from _reference import GRAD_TOL, reference_token_logprobs, relative_error, transformed_logits

import dftkern
from dftkern.losses import formulas, fused_policy_loss, get_loss

F64 = torch.float64
IGNORE = -100
EPS, EPS_HIGH = 0.2, 0.28
# ratios well inside and outside both clip ranges (away from the kinks at 0.8, 1.2 and 1.28)
RATIOS = (0.5, 0.7, 0.9, 1.0, 1.1, 1.25, 1.5, 2.5)


def restate_policy(logp, entropy, adv, old, ref, valid, rows, n_rows, *, clip_eps, clip_eps_high, kl_beta,
                   entropy_coef, aggregation, max_tokens=None):
    """Flat float64 tensors ``[N]`` (``old``/``ref`` may be None); returns the scalar loss, differentiable."""
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    terms = {}
    for t in range(logp.numel()):
        if not bool(valid[t]):
            continue
        old_t = logp[t].detach() if old is None else old[t]
        r = torch.exp(logp[t] - old_t)
        a = float(adv[t])
        clipped = torch.clamp(r, 1 - clip_eps, 1 + eps_high)
        term = -torch.minimum(r * a, clipped * a)
        if kl_beta:
            x = ref[t] - logp[t]
            term = term + kl_beta * (torch.exp(x) - x - 1)
        if entropy_coef:
            term = term - entropy_coef * entropy[t]
        terms[t] = term
    if not terms:
        return logp.sum() * 0
    if aggregation == "token_mean":
        return sum(terms.values()) / len(terms)
    if aggregation == "constant":
        return sum(terms.values()) / (n_rows * max_tokens)
    per_row = defaultdict(list)
    for t, term in terms.items():
        per_row[int(rows[t])].append(term)
    return sum(sum(v) / len(v) for v in per_row.values()) / len(per_row)


def make_policy_batch(n_rows: int, seq_len: int, *, seed: int, empty_row: int | None = 1):
    """``logp [R, T]`` (float64, in (-6, -0.05)), entropy, valid mask (ragged, one empty row), advantages of both
    signs per row, old log-probs putting the ratios at :data:`RATIOS`, reference log-probs."""
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n_rows, seq_len, generator=gen, dtype=F64) * 6 - 0.05
    entropy = torch.rand(n_rows, seq_len, generator=gen, dtype=F64) * 3
    valid = torch.ones(n_rows, seq_len, dtype=torch.bool)
    for r in range(n_rows):
        valid[r, : int(torch.randint(0, 2, (1,), generator=gen))] = False
        valid[r, 1 + int(torch.randint(1, seq_len, (1,), generator=gen)):] = False
    if empty_row is not None:
        valid[empty_row] = False
    adv = torch.randn(n_rows, generator=gen, dtype=F64)
    adv[0], adv[-1] = abs(float(adv[0])) + 0.1, -abs(float(adv[-1])) - 0.1  # both signs for sure
    pick = torch.randint(0, len(RATIOS), (n_rows, seq_len), generator=gen)
    ratio = torch.tensor(RATIOS, dtype=F64)[pick]
    old = logp - torch.log(ratio)
    ref = logp + torch.randn(n_rows, seq_len, generator=gen, dtype=F64) * 0.5
    return logp, entropy, valid, adv, old, ref


AGG_CASES = {
    "ppo": dict(aggregation="token_mean", clip_eps_high=None, kl_beta=0.0, entropy_coef=0.0),
    "grpo": dict(aggregation="sequence_mean", clip_eps_high=None, kl_beta=0.04, entropy_coef=0.0),
    "dapo": dict(aggregation="token_mean", clip_eps_high=EPS_HIGH, kl_beta=0.0, entropy_coef=0.01),
    "dr_grpo": dict(aggregation="constant", clip_eps_high=None, kl_beta=0.1, entropy_coef=0.05, max_tokens=9),
}


# ---------------------------------------------------------------------------------------------
# pure math
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_token_adv", [False, True])
@pytest.mark.parametrize("case", list(AGG_CASES))
def test_pure_policy_loss_matches_restatement(case, per_token_adv):
    hp = dict(AGG_CASES[case], clip_eps=EPS)
    logp, entropy, valid, adv, old, ref = make_policy_batch(5, 7, seed=3)
    if per_token_adv:
        adv = adv[:, None] * torch.linspace(-1.0, 2.0, 7, dtype=F64)[None]
    adv_tok = adv[:, None].expand(5, 7) if adv.dim() == 1 else adv
    rows = torch.arange(5).repeat_interleave(7)
    lp = logp.clone().requires_grad_(True)
    ours = formulas.policy_loss(lp, advantages=adv, mask=valid, old_logps=old, ref_logps=ref, entropy=entropy, **hp)
    lp64 = logp.clone().requires_grad_(True)
    expected = restate_policy(lp64.reshape(-1), entropy.reshape(-1), adv_tok.reshape(-1), old.reshape(-1),
                              ref.reshape(-1), valid.reshape(-1), rows, 5, **hp)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    (g_ours,) = torch.autograd.grad(ours, lp)
    (g_exp,) = torch.autograd.grad(expected, lp64)
    torch.testing.assert_close(g_ours, g_exp, rtol=1e-12, atol=1e-12)
    assert bool((g_ours[~valid] == 0).all())
    # the registry entry of the same name: its defaults differ only where AGG_CASES sets them
    spec = get_loss(case)
    assert spec.fn is formulas.policy_loss and spec.defaults["aggregation"] == hp["aggregation"]


def test_clipped_tokens_have_no_surrogate_gradient():
    """d surr / d logp = -A r inside the clip range or on the side that does not clip; 0 where clipped."""
    ratios = torch.tensor([0.5, 0.5, 1.0, 1.0, 1.5, 1.5, 1.25, 1.25], dtype=F64)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0], dtype=F64)
    logp = torch.full((8,), -1.0, dtype=F64, requires_grad=True)
    old = logp.detach() - torch.log(ratios)
    terms = formulas.policy_token_terms(logp, advantages=adv, old_logps=old, clip_eps=EPS, clip_eps_high=EPS_HIGH)
    (grad,) = torch.autograd.grad(terms.sum(), logp)
    # r = 0.5 < 0.8: clipped (no gradient) only when A < 0; r = 1.5 > 1.28: clipped only when A > 0;
    # r = 1.25: inside [0.8, 1.28] thanks to clip-higher
    clipped = torch.tensor([False, True, False, False, True, False, False, False])
    expected = torch.where(clipped, torch.zeros(8, dtype=F64), -adv * ratios)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=0)
    clipped_value = -torch.minimum(ratios * adv, ratios.clamp(0.8, 1.28) * adv)
    torch.testing.assert_close(terms.detach(), clipped_value, rtol=1e-12, atol=0)
    # symmetric clip (no clip-higher): r = 1.25 > 1.2 with A > 0 is clipped
    sym = formulas.policy_token_terms(logp, advantages=adv, old_logps=old, clip_eps=EPS)
    (grad_sym,) = torch.autograd.grad(sym.sum(), logp)
    assert grad_sym[6].item() == 0.0 and grad_sym[7].item() == pytest.approx(1.25)


def test_on_policy_ratio_is_one_with_the_log_prob_gradient():
    logp = torch.tensor([-0.3, -2.0, -5.0], dtype=F64, requires_grad=True)
    adv = torch.tensor([0.5, -1.5, 2.0], dtype=F64)
    terms = formulas.policy_token_terms(logp, advantages=adv, clip_eps=EPS)
    torch.testing.assert_close(terms.detach(), -adv)
    (grad,) = torch.autograd.grad(terms.sum(), logp)
    torch.testing.assert_close(grad, -adv)


def test_kl_and_entropy_terms():
    logp = torch.tensor([-0.5, -1.0, -4.0], dtype=F64, requires_grad=True)
    ref = torch.tensor([-0.7, -1.0, -2.0], dtype=F64)
    entropy = torch.tensor([0.1, 1.0, 2.5], dtype=F64, requires_grad=True)
    zero_adv = torch.zeros(3, dtype=F64)
    terms = formulas.policy_token_terms(logp, advantages=zero_adv, ref_logps=ref, entropy=entropy, clip_eps=EPS,
                                        kl_beta=0.3, entropy_coef=0.02)
    x = ref - logp.detach()
    torch.testing.assert_close(terms.detach(), 0.3 * (torch.exp(x) - x - 1) - 0.02 * entropy.detach())
    g_logp, g_ent = torch.autograd.grad(terms.sum(), (logp, entropy))
    torch.testing.assert_close(g_logp, 0.3 * (1 - torch.exp(x)))  # d/dlogp of k3
    torch.testing.assert_close(g_ent, torch.full((3,), -0.02, dtype=F64))
    assert float(terms[1].detach()) == pytest.approx(-0.02 * 1.0), "k3 is 0 where logp == ref"
    with pytest.raises(ValueError, match="ref_logps"):
        formulas.policy_token_terms(logp, advantages=zero_adv, clip_eps=EPS, kl_beta=0.1)
    with pytest.raises(ValueError, match="entropy"):
        formulas.policy_token_terms(logp, advantages=zero_adv, clip_eps=EPS, entropy_coef=0.1)


def test_aggregation_weights_by_definition():
    valid = torch.tensor([True, True, False, True, False, False, True, True, True])
    rows = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3])  # row 2 has no valid token
    torch.testing.assert_close(formulas.aggregation_weights(valid, rows, 4, "token_mean"), valid.float() / 6)
    expected_seq = torch.tensor([1 / 2, 1 / 2, 0, 1, 0, 0, 1 / 3, 1 / 3, 1 / 3]) / 3  # 3 non-empty rows
    torch.testing.assert_close(formulas.aggregation_weights(valid, rows, 4, "sequence_mean"), expected_seq)
    torch.testing.assert_close(formulas.aggregation_weights(valid, rows, 4, "constant", 5), valid.float() / 20)
    none = torch.zeros(9, dtype=torch.bool)
    for agg in ("token_mean", "sequence_mean"):
        assert bool((formulas.aggregation_weights(none, rows, 4, agg) == 0).all())
    with pytest.raises(ValueError, match="max_tokens"):
        formulas.aggregation_weights(valid, rows, 4, "constant")
    with pytest.raises(ValueError, match="aggregation"):
        formulas.aggregation_weights(valid, rows, 4, "mean")


def test_pure_policy_loss_ignores_garbage_at_invalid_positions():
    logp, entropy, valid, adv, old, ref = make_policy_batch(3, 5, seed=8)
    garbage = lambda x: torch.where(valid, x, torch.full_like(x, float("nan")))  # noqa: E731
    hp = dict(clip_eps=EPS, clip_eps_high=None, kl_beta=0.1, entropy_coef=0.1, aggregation="sequence_mean")
    lp = garbage(logp).requires_grad_(True)
    value = formulas.policy_loss(lp, advantages=adv, mask=valid, old_logps=garbage(old), ref_logps=garbage(ref),
                                 entropy=garbage(entropy), **hp)
    clean = formulas.policy_loss(logp, advantages=adv, mask=valid, old_logps=old, ref_logps=ref, entropy=entropy,
                                 **hp)
    torch.testing.assert_close(value, clean)
    (grad,) = torch.autograd.grad(value, lp)
    assert bool(torch.isfinite(grad).all())


# ---------------------------------------------------------------------------------------------
# the fused loss
# ---------------------------------------------------------------------------------------------

needs_token_loss = pytest.mark.skipif(not hasattr(dftkern, "fused_token_loss"),
                                      reason="needs the engine's dftkern.fused_token_loss (not merged in this tree)")


def make_rows(n_rows, seq_len, hidden_size, vocab, *, seed, with_bias=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_rows, seq_len, hidden_size, generator=gen)
    weight = torch.randn(vocab, hidden_size, generator=gen) * (1.5 / hidden_size ** 0.5)
    labels = torch.randint(0, vocab, (n_rows, seq_len), generator=gen)
    _, _, valid, adv, _, _ = make_policy_batch(n_rows, seq_len, seed=seed + 1)
    labels[~valid] = IGNORE
    bias = torch.randn(vocab, generator=gen) * 0.5 if with_bias else None
    return hidden, weight, labels, bias, adv.float()


def reference_logp_entropy(hidden, weight, labels, bias, *, temperature=1.0, softcap=None):
    """float64 token log-probs and entropies of softmax(z) from full logits (differentiable)."""
    logp = reference_token_logprobs(hidden, weight, labels, bias=bias, temperature=temperature, softcap=softcap)
    z = transformed_logits(hidden.double(), weight.double(), bias=None if bias is None else bias.double(),
                           temperature=temperature, softcap=softcap)
    logq = torch.log_softmax(z, -1)
    return logp, -(logq.exp() * logq).sum(-1)


def ratio_inputs(logp64: torch.Tensor, labels: torch.Tensor, *, seed: int):
    """float32 old (ratios at RATIOS) and ref log-probs of labels' shape (0 at ignored positions)."""
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, len(RATIOS), labels.shape, generator=gen)
    old = logp64.detach() - torch.log(torch.tensor(RATIOS, dtype=F64)[pick])
    ref = logp64.detach() + torch.randn(labels.shape, generator=gen, dtype=F64) * 0.5
    valid = labels != IGNORE
    return torch.where(valid, old, 0.0).float(), torch.where(valid, ref, 0.0).float()


def reference_policy(hidden, weight, labels, bias, adv, old, ref, cu_seqlens=None, **hp) -> dict:
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    b = None if bias is None else bias.detach().double().requires_grad_(True)
    logp, ent = reference_logp_entropy(h, w, labels, b)
    flat_valid = (labels != IGNORE).reshape(-1)
    if cu_seqlens is None:
        n_rows, t = labels.shape
        rows = torch.arange(n_rows).repeat_interleave(t)
    else:
        n_rows = len(cu_seqlens) - 1
        rows = torch.cat([torch.full((b1 - b0,), r) for r, (b0, b1) in enumerate(zip(cu_seqlens, cu_seqlens[1:]))])
    adv_tok = adv.double()[rows] if adv.dim() == 1 and adv.numel() == n_rows else adv.double().reshape(-1)
    loss = restate_policy(logp.reshape(-1), ent.reshape(-1), adv_tok, old.double().reshape(-1),
                          None if ref is None else ref.double().reshape(-1), flat_valid, rows, n_rows, **hp)
    loss.backward()
    v = flat_valid.double()
    ratio = torch.exp(logp.detach().reshape(-1) - old.double().reshape(-1))
    eps_high = hp["clip_eps"] if hp["clip_eps_high"] is None else hp["clip_eps_high"]
    stats = {"clip_fraction_low": ((ratio < 1 - hp["clip_eps"]) & (adv_tok < 0)).double() @ v / v.sum(),
             "clip_fraction_high": ((ratio > 1 + eps_high) & (adv_tok > 0)).double() @ v / v.sum(),
             "ratio_mean": ratio @ v / v.sum(), "entropy_mean": ent.detach().reshape(-1) @ v / v.sum()}
    if ref is not None:
        x = ref.double().reshape(-1) - logp.detach().reshape(-1)
        stats["kl_mean"] = (torch.exp(x) - x - 1) @ v / v.sum()
    return dict(loss=loss.detach(), grad_hidden=h.grad, grad_weight=w.grad, grad_bias=None if b is None else b.grad,
                stats=stats)


def run_fused(hidden, weight, labels, bias, **kwargs):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    b = None if bias is None else bias.detach().clone().requires_grad_(True)
    loss, stats = fused_policy_loss(h, w, labels, bias=b, return_stats=True, **kwargs)
    loss.backward()
    return dict(loss=loss.detach(), grad_hidden=h.grad, grad_weight=w.grad, grad_bias=None if b is None else b.grad,
                stats=stats)


def assert_policy_matches(ours, ref):
    assert ours["loss"].dtype == torch.float32 and ours["loss"].dim() == 0
    torch.testing.assert_close(ours["loss"].double(), ref["loss"], rtol=1e-5, atol=1e-6)
    for name in ("grad_hidden", "grad_weight", "grad_bias"):
        if ref[name] is None:
            assert ours[name] is None
            continue
        err = relative_error(ours[name], ref[name])
        assert err <= GRAD_TOL, f"{name} relative error {err:.3e}"
    for name, value in ref["stats"].items():
        assert ours["stats"][name].dtype == torch.float32 and ours["stats"][name].dim() == 0
        torch.testing.assert_close(ours["stats"][name].double(), value, rtol=1e-5, atol=1e-6, msg=name)


@needs_token_loss
@pytest.mark.parametrize("case", list(AGG_CASES))
def test_fused_matches_float64_reference(backend, case):
    hp = dict(AGG_CASES[case], clip_eps=EPS)
    hidden, weight, labels, bias, adv = make_rows(4, 6, 16, 97, seed=20)
    logp64, _ = reference_logp_entropy(hidden, weight, labels, bias)
    old, ref = ratio_inputs(logp64, labels, seed=21)
    ours = run_fused(hidden, weight, labels, bias, advantages=adv, old_logps=old, ref_logps=ref, backend=backend,
                     **hp)
    expected = reference_policy(hidden, weight, labels, bias, adv, old, ref, **hp)
    assert_policy_matches(ours, expected)
    assert bool((ours["grad_hidden"][1] == 0).all()), "the empty row gets no gradient"
    assert 0 < float(ours["stats"]["clip_fraction_low"]) + float(ours["stats"]["clip_fraction_high"]) < 1


@needs_token_loss
def test_fused_per_token_advantages_and_on_policy():
    hidden, weight, labels, bias, adv = make_rows(3, 5, 8, 50, seed=30)
    per_token = adv[:, None] * torch.linspace(-1, 1, 5)[None]
    hp = dict(clip_eps=EPS, clip_eps_high=None, kl_beta=0.0, entropy_coef=0.0, aggregation="token_mean")
    logp64, _ = reference_logp_entropy(hidden, weight, labels, bias)
    ours = run_fused(hidden, weight, labels, bias, advantages=per_token, backend="torch", **hp)
    expected = reference_policy(hidden, weight, labels, bias, per_token, logp64.detach().float(), None, **hp)
    assert_policy_matches(ours, expected)
    assert float(ours["stats"]["ratio_mean"]) == 1.0 and float(ours["stats"]["kl_mean"]) == 0.0


@needs_token_loss
@pytest.mark.parametrize("case", ["grpo", "dr_grpo"])
def test_fused_packed_equals_reference(backend, case):
    hp = dict(AGG_CASES[case], clip_eps=EPS)
    hidden, weight, labels, bias, adv = make_rows(4, 6, 8, 61, seed=40)
    lengths = [6, 3, 0, 5]
    cu = [0, 6, 9, 9, 14]
    packed_h = torch.cat([hidden[r, :n] for r, n in enumerate(lengths)])
    packed_l = torch.cat([labels[r, :n] for r, n in enumerate(lengths)])
    logp64, _ = reference_logp_entropy(packed_h, weight, packed_l, bias)
    old, ref = ratio_inputs(logp64, packed_l, seed=41)
    ours = run_fused(packed_h, weight, packed_l, bias, advantages=adv, old_logps=old, ref_logps=ref,
                     cu_seqlens=torch.tensor(cu), backend=backend, **hp)
    expected = reference_policy(packed_h, weight, packed_l, bias, adv, old, ref, cu_seqlens=cu, **hp)
    assert_policy_matches(ours, expected)


def central_differences(fn, tensors, eps: float = 1e-6) -> list[torch.Tensor]:
    """Numerical gradient of the scalar ``fn(*tensors)`` w.r.t. every entry of every tensor (float64).

    Independent of autograd (``torch.autograd.gradcheck`` is run as well, below: in float64 the
    in-forward gradients can be backpropagated several times, as it needs).
    """
    grads = []
    with torch.no_grad():
        for tensor in tensors:
            grad = torch.zeros_like(tensor)
            flat, gflat = tensor.view(-1), grad.view(-1)
            for i in range(flat.numel()):
                orig = float(flat[i])
                flat[i] = orig + eps
                plus = float(fn(*tensors))
                flat[i] = orig - eps
                minus = float(fn(*tensors))
                flat[i] = orig
                gflat[i] = (plus - minus) / (2 * eps)
            grads.append(grad)
    return grads


def float64_case(rows: int, seq_len: int, hidden_size: int, vocab: int, *, seed: int, ignored):
    """float64 ``(hidden, weight, bias, labels, old_logps, ref_logps)`` for the gradient checks; ``ignored``:
    the (row, t) positions whose label is ignored."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, seq_len, hidden_size, generator=gen, dtype=F64)
    weight = torch.randn(vocab, hidden_size, generator=gen, dtype=F64) * 0.5
    bias = torch.randn(vocab, generator=gen, dtype=F64) * 0.3
    labels = torch.randint(0, vocab, (rows, seq_len), generator=gen)
    for r, t in ignored:
        labels[r, t] = IGNORE
    logp64, _ = reference_logp_entropy(hidden, weight, labels, bias)
    old, ref = ratio_inputs(logp64, labels, seed=seed + 1)
    return hidden, weight, bias, labels, old, ref


@needs_token_loss
def test_fused_gradients_match_finite_differences_float64_torch_engine():
    """gradcheck in float64 on the torch engine: analytical (6NHV, in-forward) vs central differences."""
    hidden, weight, bias, labels, old, ref = float64_case(3, 4, 5, 11, seed=50, ignored=[(0, 0), (2, 3)])
    adv = torch.tensor([1.0, -0.7, 0.4], dtype=F64)

    def fn(h, w, b):
        return fused_policy_loss(h, w, labels, bias=b, advantages=adv, old_logps=old.double(), ref_logps=ref.double(),
                                 clip_eps=EPS, clip_eps_high=EPS_HIGH, kl_beta=0.2, entropy_coef=0.05,
                                 aggregation="sequence_mean", backend="torch")

    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss = fn(*leaves)
    assert loss.dtype == F64
    loss.backward()
    numerical = central_differences(fn, [hidden.clone(), weight.clone(), bias.clone()])
    for leaf, num, name in zip(leaves, numerical, ("hidden", "weight", "bias")):
        torch.testing.assert_close(leaf.grad, num, rtol=1e-5, atol=1e-7, msg=name)


@needs_token_loss
@pytest.mark.parametrize("op", ["policy-token_mean", "policy-sequence_mean", "policy-constant", "cross_entropy",
                                "token_loss", "dpo", "dft2"])
def test_torch_autograd_gradcheck_float64(op):
    """``torch.autograd.gradcheck`` (several backward passes through one graph) on every fused loss family."""
    hidden, weight, bias, labels, old, ref = float64_case(4, 3, 5, 9, seed=52, ignored=[(0, 0), (2, 2)])
    adv = torch.tensor([1.0, -0.7, 0.4, 0.1], dtype=F64)

    def fn(h, w, b):
        if op.startswith("policy"):
            agg = op.split("-")[1]
            return fused_policy_loss(h, w, labels, bias=b, advantages=adv, old_logps=old.double(),
                                     ref_logps=ref.double(), clip_eps=EPS, kl_beta=0.2, entropy_coef=0.05,
                                     aggregation=agg, max_tokens=3 if agg == "constant" else None, backend="torch")
        if op == "cross_entropy":
            return dftkern.fused_linear_cross_entropy(h, w, labels, bias=b, backend="torch")
        if op == "token_loss":
            return dftkern.fused_token_loss(h, w, labels, bias=b, backend="torch",
                                            token_loss=lambda lp, ent, idx: (lp.square() - 0.3 * ent).sum())
        if op == "dpo":
            return dftkern.fused_preference_loss(h, w, labels, bias=b, loss="dpo", backend="torch",
                                                 ref_logps=torch.tensor([-7.0, -6.5, -8.0, -5.0], dtype=F64))
        return dftkern.fused_dft_loss(h, w, labels, bias=b, num_negatives=1, variant="dft2", backend="torch")

    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


@needs_token_loss
def test_fused_without_valid_tokens_is_zero():
    hidden, weight, labels, bias, adv = make_rows(2, 4, 8, 30, seed=60)
    labels = torch.full_like(labels, IGNORE)
    for agg, extra in (("token_mean", {}), ("sequence_mean", {}), ("constant", {"max_tokens": 4})):
        loss = fused_policy_loss(hidden, weight, labels, bias=bias, advantages=adv, aggregation=agg, backend="torch",
                                 **extra)
        assert loss.item() == 0.0


# ---------------------------------------------------------------------------------------------
# argument errors (checked before the LM head runs)
# ---------------------------------------------------------------------------------------------

def _error_inputs():
    hidden, weight, labels, bias, adv = make_rows(3, 4, 8, 30, seed=70)
    return hidden, weight, labels, adv


ERRORS = {
    # name: (overrides, exception, match)
    "advantages-wrong-shape": ({"advantages": torch.zeros(4)}, ValueError, r"advantages must have shape \[R=3\]"),
    "advantages-2d-wrong": ({"advantages": torch.zeros(3, 5)}, ValueError, "advantages"),
    "advantages-nan": ({"advantages": torch.tensor([0.0, float("nan"), 1.0])}, ValueError, "advantages"),
    "advantages-inf-per-token": ({"advantages": torch.full((3, 4), float("inf"))}, ValueError, "advantages"),
    "advantages-list": ({"advantages": [0.0, 1.0, 2.0]}, TypeError, "advantages"),
    "advantages-int": ({"advantages": torch.zeros(3, dtype=torch.int64)}, TypeError, "advantages"),
    "old_logps-wrong-shape": ({"old_logps": torch.zeros(3)}, ValueError, "old_logps"),
    "old_logps-nan": ({"old_logps": torch.full((3, 4), float("nan"))}, ValueError, "old_logps"),
    "ref_logps-wrong-shape": ({"ref_logps": torch.zeros(3, 5), "kl_beta": 0.1}, ValueError, "ref_logps"),
    "kl_beta-without-ref": ({"kl_beta": 0.1}, ValueError, "ref_logps"),
    "clip_eps-zero": ({"clip_eps": 0.0}, ValueError, "clip_eps"),
    "clip_eps-negative": ({"clip_eps": -0.2}, ValueError, "clip_eps"),
    "clip_eps-string": ({"clip_eps": "0.2"}, TypeError, "clip_eps"),
    "clip_eps_high-negative": ({"clip_eps_high": -0.01}, ValueError, "clip_eps_high"),
    "kl_beta-negative": ({"kl_beta": -0.1}, ValueError, "kl_beta"),
    "entropy_coef-nan": ({"entropy_coef": float("nan")}, ValueError, "entropy_coef"),
    "aggregation-unknown": ({"aggregation": "mean"}, ValueError, "aggregation"),
    "constant-without-max_tokens": ({"aggregation": "constant"}, ValueError, "max_tokens"),
    "max_tokens-zero-with-token_mean": ({"max_tokens": 0}, ValueError, "max_tokens"),
    "max_tokens-float-with-sequence_mean": ({"aggregation": "sequence_mean", "max_tokens": 8.5}, TypeError,
                                            "max_tokens"),
    "max_tokens-zero": ({"aggregation": "constant", "max_tokens": 0}, ValueError, "max_tokens"),
    "return_stats-not-bool": ({"return_stats": 1}, TypeError, "return_stats must be a bool"),
    "labels-shape": ({"labels": torch.zeros(3, 5, dtype=torch.int64)}, ValueError, "labels"),
    "cu_seqlens-with-padded": ({"cu_seqlens": [0, 4, 8, 12]}, ValueError, "packed layout is expected"),
    "hidden-list": ({"hidden": [[0.0]]}, TypeError, "hidden"),
}


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
def test_max_tokens_is_accepted_and_unused_outside_constant(aggregation):
    """One setting (a trainer's max completion length) can be passed for every aggregation."""
    hidden, weight, labels, adv = _error_inputs()
    base = fused_policy_loss(hidden, weight, labels, advantages=adv, aggregation=aggregation, backend="torch")
    with_max = fused_policy_loss(hidden, weight, labels, advantages=adv, aggregation=aggregation, max_tokens=8,
                                 backend="torch")
    assert torch.equal(base, with_max)


@pytest.mark.parametrize("case", list(ERRORS.values()), ids=list(ERRORS))
def test_bad_arguments_raise(case):
    overrides, exc, match = case
    hidden, weight, labels, adv = _error_inputs()
    kwargs = dict(hidden=hidden, weight=weight, labels=labels, advantages=adv, backend="torch")
    kwargs.update(overrides)
    with pytest.raises(exc, match=match):
        fused_policy_loss(kwargs.pop("hidden"), kwargs.pop("weight"), kwargs.pop("labels"), **kwargs)


# ---------------------------------------------------------------------------------------------
# TRL's GRPO loss math (optional)
# ---------------------------------------------------------------------------------------------


def trl_grpo_loss(loss_type, logp, entropy, mask, adv, old, ref, *, eps, eps_high, beta, entropy_coef, max_len):
    """TRL's ``GRPOTrainer._compute_loss`` run on given per-token log-probs (a minimal stand-in trainer)."""
    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer", reason="trl is not installed (optional extra)")

    class Accelerator:
        num_processes = 1
        sync_gradients = True

        def gather(self, x):
            return x

        gather_for_metrics = gather

        def reduce(self, x, reduction="sum"):
            return x

    n_rows, seq_len = logp.shape
    stub = SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        loss_type=loss_type, epsilon_low=eps, epsilon_high=eps_high, use_vllm=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, max_completion_length=max_len,
        accelerator=Accelerator(), _entropy_bonus_enabled=entropy_coef != 0.0, entropy_coef=entropy_coef,
        use_adaptive_entropy=False, aux_loss_enabled=False, _metrics={"train": defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logp, entropy, None))
    inputs = {"prompt_ids": torch.zeros(n_rows, 1, dtype=torch.int64), "prompt_mask": torch.ones(n_rows, 1),
              "completion_ids": torch.zeros(n_rows, seq_len, dtype=torch.int64), "completion_mask": mask.to(logp.dtype),
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum().to(logp.dtype)}
    try:
        loss = trl_grpo.GRPOTrainer._compute_loss(stub, None, inputs)
    except (AttributeError, KeyError) as exc:  # a TRL version whose loss reads other trainer state
        import trl
        pytest.skip(f"TRL {trl.__version__}'s _compute_loss needs state this stand-in lacks: {exc!r}")
    return loss, stub._metrics["train"]


# TRL loss type -> our aggregation (TRL's "bnpo" and "dapo" both divide by the number of valid tokens
# of the batch: our "token_mean" for one micro-batch)
TRL_TYPES = {"grpo": "sequence_mean", "bnpo": "token_mean", "dapo": "token_mean", "dr_grpo": "constant"}


@pytest.mark.parametrize("with_kl", [False, True])
@pytest.mark.parametrize("loss_type", list(TRL_TYPES))
def test_agrees_with_trl_grpo_loss(loss_type, with_kl):
    logp, entropy, valid, adv, old, ref = make_policy_batch(5, 7, seed=90, empty_row=None)
    beta = 0.04 if with_kl else 0.0
    lp_trl = logp.clone().requires_grad_(True)
    trl_loss, metrics = trl_grpo_loss(loss_type, lp_trl, entropy, valid, adv, old, ref, eps=EPS, eps_high=EPS_HIGH,
                                      beta=beta, entropy_coef=0.0, max_len=7)
    lp = logp.clone().requires_grad_(True)
    ours = formulas.policy_loss(lp, advantages=adv, mask=valid, old_logps=old, ref_logps=ref, clip_eps=EPS,
                                clip_eps_high=EPS_HIGH, kl_beta=beta, entropy_coef=0.0,
                                aggregation=TRL_TYPES[loss_type], max_tokens=7 if loss_type == "dr_grpo" else None)
    torch.testing.assert_close(ours, trl_loss, rtol=1e-12, atol=1e-12)
    g_ours, g_trl = torch.autograd.grad(ours, lp)[0], torch.autograd.grad(trl_loss, lp_trl)[0]
    torch.testing.assert_close(g_ours, g_trl, rtol=1e-12, atol=1e-12)
    # clip fractions as TRL logs them: tokens where the lower (A < 0) / upper (A > 0) clip is active
    ratio = torch.exp(logp - old)
    a = adv[:, None].expand_as(ratio)
    low = ((ratio < 1 - EPS) & (a < 0) & valid).sum() / valid.sum()
    high = ((ratio > 1 + EPS_HIGH) & (a > 0) & valid).sum() / valid.sum()
    assert metrics["clip_ratio/low_mean"][-1] == pytest.approx(float(low))
    assert metrics["clip_ratio/high_mean"][-1] == pytest.approx(float(high))


@pytest.mark.parametrize("loss_type", list(TRL_TYPES))
def test_entropy_bonus_differs_from_trl_only_in_its_normalization(loss_type):
    """TRL subtracts ``coef * (token mean of H over the batch)`` for every loss type; here the entropy
    term is part of each token's term, so it is aggregated like the loss (equal for token-mean types)."""
    logp, entropy, valid, adv, old, ref = make_policy_batch(5, 7, seed=91, empty_row=None)
    coef = 0.05
    trl_loss, _ = trl_grpo_loss(loss_type, logp, entropy, valid, adv, old, ref, eps=EPS, eps_high=EPS_HIGH,
                                beta=0.0, entropy_coef=coef, max_len=7)
    common = dict(advantages=adv, mask=valid, old_logps=old, clip_eps=EPS, clip_eps_high=EPS_HIGH, kl_beta=0.0,
                  aggregation=TRL_TYPES[loss_type], max_tokens=7 if loss_type == "dr_grpo" else None)
    ours = formulas.policy_loss(logp, entropy=entropy, entropy_coef=coef, **common)
    without = formulas.policy_loss(logp, entropy_coef=0.0, **common)
    token_mean_entropy = (entropy * valid).sum() / valid.sum()
    torch.testing.assert_close(trl_loss, without - coef * token_mean_entropy, rtol=1e-12, atol=1e-12)
    if TRL_TYPES[loss_type] == "token_mean":
        torch.testing.assert_close(ours, trl_loss, rtol=1e-12, atol=1e-12)
    else:
        assert not math.isclose(float(ours), float(trl_loss), rel_tol=1e-9)
