"""The 100-action bandit of Tajwar et al. (2024), run through dftkern's fused losses.

Claim under test ("Preference Fine-Tuning of LLMs Should Leverage Suboptimal, On-Policy
Data", didactic bandit): objectives that sample on-policy or push probability *down* on some
responses (a "negative gradient": DPO, IPO, REINFORCE/RLOO, DFT's negatives) are
mode-seeking and relocate probability mass faster than maximum-likelihood objectives
(best-of-N SFT, RWR), most clearly when the reward's optimum lies where the reference
policy puts little mass.

Setup
-----
* Actions ``a in {0, ..., 99}``. The reference policy ``pi_ref`` is the histogram over
  ``[-1, 1]`` (100 equal bins) of ``tanh(x)``, ``x ~ Cauchy(-0.7, 0.4)``; it is computed
  *exactly* from the Cauchy CDF (the limit of the sampled histogram), so it is identical
  on every run. Its interior mode is at action 16; the Cauchy tails are squashed by
  ``tanh`` into the two end bins (``pi_ref(0) = 7.8 %``, ``pi_ref(99) = 4.2 %``).
* Rewards: ``R_far(a) = exp(-((a - 70) / 10)^2)`` (optimum where ``pi_ref`` is small) and
  ``R_near(a) = exp(-((a - 20) / 10)^2)`` (optimum at the reference mode).
* Policy: a categorical distribution over the 100 actions, initialised at ``pi_ref``:
  ``"logits"`` (the logits are the free parameters) or ``"mlp"`` (a tiny network).
  It is expressed as the input of the fused ops: every sampled action is a one-token
  "sequence" whose label is the action and whose hidden state ``h`` is constant, with
  ``weight [100, H]`` trainable, so ``log pi(a) = log_softmax(weight @ h)[a]`` is exactly the
  sequence log-probability the losses compute. All seeds of a run are trained together in
  one fused call: seed ``s`` owns block ``s`` of the hidden dimension (``h = e_s``, one-hot,
  for the logits policy, so ``weight[:, s]`` are seed ``s``'s logits; ``h = [tanh(A_s c_s +
  b_s), 1]`` in block ``s`` for the network), which gives each seed the gradient of its own
  run (see :class:`LogitPolicy`, :class:`MLPPolicy`). Everything is float64, and banks have
  power-of-two sizes, so a bank reproduces separate runs to float64 rounding (see
  :func:`train_seeds`).

Data and methods
----------------
Every gradient step sees a batch of ``groups`` groups of ``group_size`` (= n) actions,
drawn from ``pi_ref`` (regime ``offline``: an unlimited offline dataset, the most
favourable offline setting) or from the current policy (regime ``on_policy``). A batch is
redrawn every ``reuse`` steps (sample reuse). All methods see the same samples; they
differ only in the loss, always computed by :func:`dftkern.fused_preference_loss` or
:func:`dftkern.fused_dft_loss`:

=========  ================================================================================
bon_sft    best-of-n filtered SFT: ``-log pi(best of the group)``                 (``"sft"``)
rwr        reward-weighted regression over the whole group, temperature ``rwr_beta``  (``"rwr"``)
dpo        DPO on (chosen = best, rejected = worst) of the group, ``dpo_beta``      (``"dpo"``)
ipo        IPO on the same pairs, ``ipo_beta``                                      (``"ipo"``)
rloo       REINFORCE with the leave-one-out baseline over the group                (``"rloo"``)
dft        DFT: positive = best of the group, negatives = the other n - 1 samples,
           ``ref_logps = log pi_ref(negatives)``, ``tau = dft_tau``, ``gamma = dft_gamma``
dft2       DFT2 (no reference term), same groups, ``dft2_tau``, ``dft2_gamma``
reinforce  REINFORCE with the group-mean baseline (not run by default: its gradient is
           ``(n-1)/n`` times rloo's)                                          (``"reinforce"``)
dft_unse-  ablation of ``dft`` (not run by default): same positive, but the negatives are
lected     all n samples of the group, i.e. a sample of the sampler not selected by reward
=========  ================================================================================

Preferences are noiseless: "best"/"worst" are by the true reward (first one on ties). The
positive of DFT is the best of the group (not a fresh draw from the reward-tilted
distribution), so ``dft`` is exactly ``bon_sft`` plus a weighted negative gradient on the
rest of the group: the comparison isolates the negative term. DFT's moving-average state
has one entry per (seed, group slot), i.e. ``u`` of slot ``g`` averages over the batches
(the bandit has a single prompt, so every slot estimates the same quantity). Because the policy is a
categorical distribution, the expected reward ``sum_a pi(a) R(a)`` is computed exactly
after every step. Optimiser: Adam with the same learning rate for every method.

Run ``python -m dftkern.experiments.bandit --help``; ``--quick`` is the CI setting.

Modules: :mod:`.env` (actions, ``pi_ref``, rewards), :mod:`.policies` (policy banks),
:mod:`.methods` (the losses), :mod:`.config` (:class:`BanditConfig`), :mod:`.run` (training),
:mod:`.report` (tables, paired comparisons, figures), :mod:`.cli` (command line). Every public
name is importable from this package.
"""

from .cli import build_parser, config_from_args, main
from .config import QUICK_OVERRIDES, BanditConfig
from .env import (
    NUM_ACTIONS,
    REGIMES,
    REWARDS,
    bandit_reward,
    expected_reward,
    gaussian_reward,
    reference_policy,
)
from .methods import ALL_METHODS, METHOD_LABELS, METHODS, NEGATIVE_GRADIENT, method_loss
from .policies import POLICIES, LogitPolicy, MLPPolicy, make_policy, policy_probs
from .report import markdown_table, plot_curves, plot_final_policies, summarize, write_outputs
from .run import eval_steps, run_experiment, train_run, train_seeds

__all__ = [
    "NUM_ACTIONS",
    "METHODS",
    "ALL_METHODS",
    "METHOD_LABELS",
    "NEGATIVE_GRADIENT",
    "REGIMES",
    "REWARDS",
    "POLICIES",
    "BanditConfig",
    "QUICK_OVERRIDES",
    "reference_policy",
    "gaussian_reward",
    "bandit_reward",
    "expected_reward",
    "LogitPolicy",
    "MLPPolicy",
    "make_policy",
    "policy_probs",
    "method_loss",
    "train_seeds",
    "train_run",
    "eval_steps",
    "run_experiment",
    "summarize",
    "markdown_table",
    "plot_curves",
    "plot_final_policies",
    "write_outputs",
    "build_parser",
    "config_from_args",
    "main",
]
