"""Reproducible experiments built on dftkern's fused losses.

Each experiment is a runnable package (its ``__init__`` re-exports every public name):

* :mod:`dftkern.experiments.bandit` — the 100-action bandit of Tajwar et al. (2024),
  comparing maximum-likelihood objectives (best-of-N SFT, RWR) with on-policy and
  negative-gradient objectives (DPO, IPO, RLOO, DFT), offline and on-policy
  (``python -m dftkern.experiments.bandit``; see ``docs/bandit.md``).
* :mod:`dftkern.experiments.length_study` — the paper's length tasks on the tiny default model:
  offline vs on-policy data through the reference trainer
  (``python -m dftkern.experiments.length_study``; see ``docs/length_study.md``).

Their tables and figures use the shared helpers of :mod:`dftkern.train.plotting`.
"""
