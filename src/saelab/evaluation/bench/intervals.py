"""Seed noise: the mean of a metric over seeds with its 95 % confidence interval (Student t),
and the smallest difference between two groups of seeds that the noise lets one call real.

With ``n`` seeds of a metric, sample standard deviation ``s``, the 95 % interval of the mean is
``mean ± t(0.975, n-1) · s / √n``. Two configurations (groups of seeds) differ for real at the
5 % level when their means differ by more than the Welch half-width
``t(0.975, ν) · √(s_a²/n_a + s_b²/n_b)``; with one spread pooled over all groups that is
``t(0.975, Σ(n_i-1)) · s_pooled · √(1/n_a + 1/n_b)``: the resolution of a table of results.

Example:
    >>> mean, half = mean_interval([0.81, 0.84, 0.83])    # 0.8267 ± 0.0379
    >>> round(t_quantile(0.975, 2), 3)
    4.303
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` (> 0) degrees of freedom, by bisection on
    :func:`t_cdf` (exact to ~1e-12); ``df = inf`` gives the normal quantile."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"quantile p must be in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if math.isinf(df):
        return math.sqrt(2.0) * _erfinv(2.0 * p - 1.0)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def _erfinv(y: float) -> float:
    """Inverse error function by bisection on :func:`math.erf`."""
    lo, hi = -10.0, 10.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if math.erf(mid) < y:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _finite(values: Sequence[float]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def sample_std(values: Sequence[float]) -> float:
    """Sample standard deviation (``n - 1`` in the denominator); 0 for fewer than two values."""
    xs = _finite(values)
    if len(xs) < 2:
        return 0.0
    mean = sum(xs) / len(xs)
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """``(mean, half_width)``: the mean of ``values`` (one per seed) and the half-width of its
    ``level`` confidence interval by Student t, ``t(1-(1-level)/2, n-1) · s / √n``. One value has
    an unknown spread: half-width ``nan``. Non-finite values (a failed run) are left out."""
    xs = _finite(values)
    if not xs:
        return math.nan, math.nan
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, math.nan
    t = t_quantile(1.0 - (1.0 - level) / 2.0, len(xs) - 1)
    return mean, t * sample_std(xs) / math.sqrt(len(xs))


def difference_interval(
    a: Sequence[float], b: Sequence[float], level: float = 0.95
) -> tuple[float, float]:
    """``(mean(a) - mean(b), half_width)`` by Welch's t (unequal spreads, Welch–Satterthwaite
    degrees of freedom): the difference is real at ``level`` when ``|diff| > half_width``."""
    xa, xb = _finite(a), _finite(b)
    if len(xa) < 2 or len(xb) < 2:
        diff = (sum(xa) / len(xa) - sum(xb) / len(xb)) if xa and xb else math.nan
        return diff, math.nan
    diff = sum(xa) / len(xa) - sum(xb) / len(xb)
    va, vb = sample_std(xa) ** 2 / len(xa), sample_std(xb) ** 2 / len(xb)
    se2 = va + vb
    if se2 == 0.0:
        return diff, 0.0
    df = se2**2 / ((va**2 / (len(xa) - 1) if va else 0.0) + (vb**2 / (len(xb) - 1) if vb else 0.0))
    return diff, t_quantile(1.0 - (1.0 - level) / 2.0, df) * math.sqrt(se2)


def smallest_resolvable_difference(*groups: Sequence[float], level: float = 0.95) -> float:
    """The smallest difference between the means of two of ``groups`` (each: one configuration's
    values over seeds) that is real at ``level``: ``t(ν) · s_pooled · √(1/n_a + 1/n_b)`` with the
    spread pooled over all groups (each around its own mean), ``ν = Σ(n_i - 1)``, and ``n_a, n_b``
    the two smallest group sizes (the worst pair). One group stands for two of its size.
    ``nan`` when no group has two values."""
    gs = [g for g in (_finite(g) for g in groups) if len(g) >= 2]
    if not gs:
        return math.nan
    df = sum(len(g) - 1 for g in gs)
    pooled = math.sqrt(sum(sample_std(g) ** 2 * (len(g) - 1) for g in gs) / df)
    sizes = sorted(len(g) for g in gs)
    n_a, n_b = (sizes[0], sizes[1]) if len(sizes) > 1 else (sizes[0], sizes[0])
    return t_quantile(1.0 - (1.0 - level) / 2.0, df) * pooled * math.sqrt(1 / n_a + 1 / n_b)
