"""Small-sample statistics for the study, in plain float64 Python (no SciPy needed).

* :func:`mean_sd` — mean and sample standard deviation (``ddof = 1``);
* :func:`regularized_incomplete_beta` — ``I_x(a, b)`` by its continued fraction (DLMF 8.17.22),
  evaluated with the modified Lentz method, using the symmetry ``I_x(a, b) = 1 - I_{1-x}(b, a)``
  where the fraction converges slowly;
* :func:`t_two_sided_p` — ``P(|T_df| >= |t|)`` for Student's t, ``= I_{df/(df+t^2)}(df/2, 1/2)``;
* :func:`t_quantile` — the inverse of the t CDF by bisection (for confidence intervals);
* :func:`paired_t_test` — the paired t-test of two equal-length samples (``b - a``);
* :func:`sign_test` — the exact two-sided binomial sign test on the paired differences (ties dropped).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["mean_sd", "regularized_incomplete_beta", "t_two_sided_p", "t_quantile", "paired_t_test", "sign_test"]


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """``(mean, sample standard deviation)``; the deviation is 0.0 for a single value."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_sd needs at least one value")
    mean = math.fsum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """``I_x(a, b) = B(x; a, b) / B(a, b)`` for ``0 <= x <= 1``, ``a, b > 0`` (float64, ~1e-14 relative)."""
    if not (a > 0 and b > 0):
        raise ValueError(f"a and b must be > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x == 0.0 or x == 1.0:
        return x
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only below this point
        return 1.0 - regularized_incomplete_beta(1.0 - x, b, a)
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    return math.exp(log_front) / a * _lentz(x, a, b)


def _lentz(x: float, a: float, b: float) -> float:
    """``1 / (1 + d1/(1 + d2/(1 + ...)))`` with DLMF 8.17.22's coefficients, by the modified Lentz method."""
    tiny, eps = 1e-300, 1e-16
    # evaluate the fraction b0 + a1/(b1 + a2/(b2 + ...)) with b0 = 0, a1 = 1, b_n = 1, a_{n+1} = d_n
    f = tiny
    c, d = f, 0.0
    for n in range(1, 20_000):
        if n == 1:
            coef = 1.0
        else:
            k = n - 1  # d_k
            m = k // 2
            if k % 2:  # d_{2m+1}
                coef = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
            else:      # d_{2m}
                coef = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + coef * d
        d = tiny if abs(d) < tiny else d
        c = 1.0 + coef / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = c * d
        f *= delta
        if n > 1 and abs(delta - 1.0) < eps:
            return f
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (x={x}, a={a}, b={b})")


def t_two_sided_p(t: float, df: float) -> float:
    """Two-sided tail probability ``P(|T| >= |t|)`` of Student's t with ``df > 0`` degrees of freedom."""
    if not df > 0:
        raise ValueError(f"df must be > 0, got {df}")
    if math.isinf(t):
        return 0.0
    if math.isnan(t):
        raise ValueError("t is NaN")
    return regularized_incomplete_beta(df / (df + t * t), df / 2.0, 0.5)


def t_quantile(p: float, df: float) -> float:
    """``q`` with ``P(T <= q) = p`` (``0 < p < 1``), by bisection on :func:`t_two_sided_p` (1e-12 in q)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p == 0.5:
        return 0.0
    tail = 2.0 * min(p, 1.0 - p)  # two-sided tail of |q|
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > tail:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_two_sided_p(mid, df) > tail:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    q = 0.5 * (lo + hi)
    return q if p > 0.5 else -q


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> dict:
    """Paired t-test of ``d_i = b_i - a_i`` against mean 0.

    Returns ``{"n", "mean_diff", "sd_diff", "t", "df", "p", "ci95": [lo, hi]}``; ``p`` is two-sided.
    With identical differences (sd 0): ``p = 1`` when they are all 0, else ``p = 0`` and ``t = ±inf``.
    """
    if len(a) != len(b):
        raise ValueError(f"paired samples must have the same length, got {len(a)} and {len(b)}")
    if len(a) < 2:
        raise ValueError(f"a paired t-test needs at least 2 pairs, got {len(a)}")
    diffs = [float(y) - float(x) for x, y in zip(a, b)]
    mean, sd = mean_sd(diffs)
    n, df = len(diffs), len(diffs) - 1
    if sd == 0.0:
        t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
        return {"n": n, "mean_diff": mean, "sd_diff": 0.0, "t": t, "df": df, "p": 1.0 if mean == 0.0 else 0.0,
                "ci95": [mean, mean]}
    se = sd / math.sqrt(n)
    t = mean / se
    half = t_quantile(0.975, df) * se
    return {"n": n, "mean_diff": mean, "sd_diff": sd, "t": t, "df": df, "p": t_two_sided_p(t, df),
            "ci95": [mean - half, mean + half]}


def sign_test(a: Sequence[float], b: Sequence[float]) -> dict:
    """Exact two-sided sign test of ``b_i - a_i`` (ties dropped): ``{"n_pos", "n_neg", "n_ties", "p"}``.

    ``p = min(1, 2 * P(X <= min(n_pos, n_neg)))`` with ``X ~ Binomial(n_pos + n_neg, 1/2)``; 1.0 when
    every pair is a tie.
    """
    if len(a) != len(b):
        raise ValueError(f"paired samples must have the same length, got {len(a)} and {len(b)}")
    diffs = [float(y) - float(x) for x, y in zip(a, b)]
    pos, neg = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    n = pos + neg
    if n == 0:
        return {"n_pos": 0, "n_neg": 0, "n_ties": len(diffs), "p": 1.0}
    tail = sum(math.comb(n, i) for i in range(min(pos, neg) + 1)) / 2.0 ** n
    return {"n_pos": pos, "n_neg": neg, "n_ties": len(diffs) - n, "p": min(1.0, 2.0 * tail)}
