"""The 100-action bandit of Tajwar et al. (2024), run on dftkern's loss registry.

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
  Every sampled action is a one-token "sequence", so its sequence log-probability is exactly
  ``log pi(a)``, and each loss is the registry's pure math (:mod:`dftkern.losses.formulas`)
  evaluated on those scores. All seeds of a run are trained together in one bank (seed ``s``
  owns its own parameters; the bank's loss is the sum of the per-seed losses); everything is
  float64, and a bank reproduces separate runs bit for bit (see :func:`train_seeds`).
  The policies can also be posed as inputs of the fused ops (:meth:`LogitPolicy.fused_inputs`:
  a test checks that ``fused_linear_logprobs`` gives the same ``log pi``).

Data and methods
----------------
Every gradient step sees a batch of ``groups`` groups of ``group_size`` (= n) actions,
drawn from ``pi_ref`` (regime ``offline``: an unlimited offline dataset, the most
favourable offline setting) or from the current policy (regime ``on_policy``). A batch is
redrawn every ``reuse`` steps (sample reuse). All methods see the same samples; they
differ only in the loss (:mod:`.methods`; the registry name in parentheses). Every registry
loss can be run (``--methods``); the default set is:

=========  ================================================================================
bon_sft    best-of-n filtered SFT: ``-log pi(best of the group)``                 (``"sft"``)
rwr        reward-weighted regression over the whole group, temperature ``rwr_beta``  (``"rwr"``)
dpo        DPO on (chosen = best, rejected = worst) of the group, ``dpo_beta``      (``"dpo"``)
ipo        IPO on the same pairs, ``ipo_beta``                                      (``"ipo"``)
rloo       REINFORCE with the leave-one-out baseline over the group                (``"rloo"``)
dft        DFT: positive = best of the group, negatives = the other n - 1 samples,
           ``ref = log pi_ref(negatives)``, ``tau = dft_tau``, ``gamma = dft_gamma`` (``"dft"``)
dft2       DFT2 (no reference term), same groups, ``dft2_tau``, ``dft2_gamma``    (``"dft2"``)
=========  ================================================================================

Also available (``--methods``): ``ppo`` (PPO-clip on all n samples, one token each:
advantages ``(R - mean) / std`` over the group, ratio against the sampler's log-probs, clip
0.2, no KL), ``grpo``, ``dapo``, ``dr_grpo`` (as ``ppo``, with the registry's defaults: GRPO
adds a 0.04 k3 KL to ``pi_ref``), ``reinforce`` (group-mean baseline; its gradient is
``(n-1)/n`` times rloo's), ``hinge``, ``simpo``, ``unlikelihood`` (on the DPO pairs), and
``dft_unselected``: an ablation of ``dft`` with the same positive but *all* n samples as
negatives, i.e. negatives not selected by reward.

Preferences are noiseless: "best"/"worst" are by the true reward (first one on ties). The
positive of DFT is the best of the group (not a fresh draw from the reward-tilted
distribution), so ``dft`` is exactly ``bon_sft`` plus a weighted negative gradient on the
rest of the group: the comparison isolates the negative term. DFT's moving-average state
has one entry per (seed, group slot), i.e. ``u`` of slot ``g`` averages over the batches
(the bandit has a single prompt, so every slot estimates the same quantity). Because the policy is a
categorical distribution, the expected reward ``sum_a pi(a) R(a)`` is computed exactly
after every step. Optimiser: Adam with the same learning rate for every method. With
``reuse = 1`` on-policy, PPO's ratio is 1 at every step (the samples come from the current
policy), so it is a policy gradient with normalised group advantages; its clipping acts
offline (ratio ``pi / pi_ref``) and with ``reuse > 1``.

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
