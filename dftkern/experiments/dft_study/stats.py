"""The study's statistics: the shared ones of :mod:`dftkern.train.plotting`, under the study's names
and in the layout of its ``results.json``. No formula is defined here.

* :func:`mean_sd`, :func:`regularized_incomplete_beta` — :mod:`dftkern.train.plotting`'s;
* :func:`t_two_sided_p`, :func:`t_quantile` — :func:`~dftkern.train.plotting.student_t_two_sided_p`
  and :func:`~dftkern.train.plotting.student_t_quantile` (integer ``df >= 1``);
* :func:`paired_t_test` — :func:`~dftkern.train.plotting.paired_difference` of ``b - a`` with its 95%
  confidence interval, as ``{"n", "mean_diff", "sd_diff", "t", "df", "p", "ci95"}``;
* :func:`sign_test` — :func:`~dftkern.train.plotting.sign_test` of ``b - a``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from dftkern.train import plotting
from dftkern.train.plotting import mean_sd, regularized_incomplete_beta
from dftkern.train.plotting import student_t_quantile as t_quantile
from dftkern.train.plotting import student_t_two_sided_p as t_two_sided_p

__all__ = ["mean_sd", "regularized_incomplete_beta", "t_two_sided_p", "t_quantile", "paired_t_test", "sign_test"]


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> dict:
    """Paired t-test of ``d_i = b_i - a_i`` against mean 0 (at least 2 pairs).

    Returns ``{"n", "mean_diff", "sd_diff", "t", "df", "p", "ci95": [lo, hi]}``; ``p`` is two-sided.
    With identical differences (sd 0): ``p = 1`` when they are all 0, else ``p = 0`` and ``t = ±inf``.
    """
    if len(a) != len(b):
        raise ValueError(f"paired samples must have the same length, got {len(a)} and {len(b)}")
    if len(a) < 2:
        raise ValueError(f"a paired t-test needs at least 2 pairs, got {len(a)}")
    test = plotting.paired_difference(b, a, confidence=0.95)
    t = math.copysign(math.inf, test["mean"]) if test["t"] is None else test["t"]
    return {"n": test["n"], "mean_diff": test["mean"], "sd_diff": test["sd"], "t": t, "df": test["n"] - 1,
            "p": test["p"], "ci95": test["ci"]}


def sign_test(a: Sequence[float], b: Sequence[float]) -> dict:
    """Exact two-sided sign test of ``b_i - a_i`` (ties dropped): ``{"n_pos", "n_neg", "n_ties", "p"}``
    (``n_pos``: pairs with ``b_i > a_i``)."""
    return plotting.sign_test(b, a)
