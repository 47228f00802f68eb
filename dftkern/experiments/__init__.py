"""Reproducible experiments built on dftkern's fused losses.

Each experiment is a runnable module:

* :mod:`dftkern.experiments.bandit` — the 100-action bandit of Tajwar et al. (2024),
  comparing maximum-likelihood objectives (best-of-N SFT, RWR) with on-policy and
  negative-gradient objectives (DPO, IPO, RLOO, DFT), offline and on-policy
  (``python -m dftkern.experiments.bandit``; see ``docs/bandit.md``).
* :mod:`dftkern.experiments.length_study` — the paper's length tasks on the tiny default model:
  offline vs on-policy DPO and REINFORCE through the reference trainer
  (``python -m dftkern.experiments.length_study``; see ``docs/length_study.md``).
"""
