"""The synthetic length tasks of Tajwar et al. (2024), in miniature, through dftkern's reference trainer.

Claim under test ("Preference Fine-Tuning of LLMs Should Leverage Suboptimal, On-Policy Data",
synthetic LLM experiments): sampling from the current policy (on-policy) and pushing probability
down on bad samples (a negative gradient) relocate mass faster than learning from samples drawn
once from the reference, most clearly when the reward's optimum lies where the reference puts
little mass.

Setup (``python -m dftkern.experiments.length_study [--quick] [--out DIR]``; details and results
in ``docs/length_study.md``)
-------------------------------------------------------------------------------------------------
1. **Reference model**: the trainer's tiny Llama (:func:`dftkern.train.synthetic.make_tiny_llama`,
   hidden size 128, 4 layers, character tokenizer) after a short SFT warm-up on the built-in
   addition task with operands of 1 to ``max_digits`` digits (:func:`dftkern.train.trainer.train`,
   loss ``sft``). It answers with 2-5 characters, practically never with nothing. Cached in
   ``<work>/reference`` and reused when the settings match.
2. **Rewards** (the trainer's :mod:`dftkern.train.rewards`, passed to it as callables; length =
   characters = tokens before EOS, correctness ignored):

   * ``min_length``: ``-len(response)``. Optimum: the empty response, where the reference has ~no mass.
   * ``mode_length``: ``exp(-((len(response) - mode) / width)^2)``, peaked at the modal response
     length of the reference model (measured on held-out prompts), ``width = 1`` by default.
3. **Losses**: ``rwr`` (reward-weighted regression: maximum likelihood, no negative gradient),
   ``dpo``, ``reinforce``, ``ppo`` and ``grpo`` (all push some samples down), and two on-policy
   variants: ``dpo_sampler`` (DPO whose reference is the moving sampler) and ``ppo_2ep`` (PPO with
   two updates per sampled window: the importance ratio moves and the clip acts; the same steps,
   half the samples). **Arms**, for each reward
   and loss, with the same prompts in the same order, the same number of gradient steps ``S``,
   prompts per step ``B`` and samples per prompt ``n`` (hence the same number of samples):

   * ``offline``: ``n`` samples per prompt drawn once from the reference model
     (:func:`dftkern.train.generate.generate_samples`) for ``S * B`` distinct prompts, one epoch;
   * ``on_policy``: ``train --on-policy``: every ``refresh_every`` steps the prompts of the coming
     steps get ``n`` fresh samples from the current policy (:mod:`dftkern.train.onpolicy`).

   ``ppo``, ``ppo_2ep``, ``grpo`` and ``dpo_sampler`` have only the on-policy arm (:func:`.config.arms_of`): the
   policy losses' importance ratio is to the sampler's per-token log-probs (offline they would be a
   fixed, ever staler sampler, a different method), and offline the sampler *is* the fixed
   reference, i.e. ``dpo``. The rows a loss sees are built by the same rule in both arms (the
   trainer's on-policy rule): ``rwr``/``reinforce``/``ppo``/``grpo``: the ``n`` samples with their
   rewards; ``dpo``: one pair per prompt by :func:`dftkern.train.onpolicy.online_pair` (chosen =
   the data's answer unless a sample has a strictly higher reward, rejected = the lowest-reward
   sample). ``dpo``'s reference log-probs are the initial (reference) model's in both arms
   (on-policy: ``--on-policy-reference initial``); ``dpo_sampler``'s are the current policy's.
4. **Evaluation**: the policy after 0, S/K, ..., S steps (``K = num_checkpoints``) samples
   ``eval_samples`` answers (temperature 1, fixed seeds) for each of ``eval_prompts`` held-out
   prompts; reported: mean reward and mean response length, mean ± sd over the seeds, and paired
   comparisons (each loss against ``rwr``, on-policy against offline).

Outputs in ``--out`` (default ``docs/length_study``): ``results.md`` (command, tables),
``results.json`` (every number, the settings, timings), ``reward_vs_steps.png``. The reference
model and the scratch runs go to ``--work`` (default ``runs/length_study``, git-ignored);
checkpoints are deleted once evaluated.

Modules: :mod:`.rewards` (the length rewards), :mod:`.config` (:class:`LengthStudyConfig`),
:mod:`.models` (reference model, sampling lengths), :mod:`.offline` (the offline arm's files),
:mod:`.study` (the runs), :mod:`.report` (table, figure), :mod:`.cli` (command line).
"""

from .cli import build_parser, main
from .config import (ARMS, LOSSES, MAXIMUM_LIKELIHOOD, ON_POLICY_ONLY, POLICY_LOSSES, VARIANTS, LengthStudyConfig,
                     arms_of)
from .models import build_reference, sample_lengths
from .offline import build_offline_files
from .report import format_paired, format_steps_to_optimum, format_table, format_train_metrics, plot_curves
from .rewards import LENGTH_REWARDS, length_reward, min_length_reward, modal_length, response_length
from .study import OPTIMUM_TOLERANCE, paired_comparisons, run_length_study, steps_to_optimum

__all__ = [
    "LENGTH_REWARDS",
    "LOSSES",
    "ARMS",
    "MAXIMUM_LIKELIHOOD",
    "ON_POLICY_ONLY",
    "VARIANTS",
    "POLICY_LOSSES",
    "OPTIMUM_TOLERANCE",
    "arms_of",
    "LengthStudyConfig",
    "response_length",
    "min_length_reward",
    "length_reward",
    "modal_length",
    "build_reference",
    "sample_lengths",
    "build_offline_files",
    "run_length_study",
    "format_table",
    "format_paired",
    "paired_comparisons",
    "steps_to_optimum",
    "format_steps_to_optimum",
    "format_train_metrics",
    "plot_curves",
    "build_parser",
    "main",
]
