"""Seed intervals: Student-t quantiles against published table values, the interval of a mean
by its closed form, and the smallest difference two groups of seeds can resolve."""

from __future__ import annotations

import math
import random

import pytest

from saelab.evaluation.bench.intervals import (
    difference_interval,
    mean_interval,
    smallest_resolvable_difference,
    t_cdf,
    t_quantile,
)

# Two-sided 95 % critical values t(0.975, df) from the standard tables.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 10: 2.228, 30: 2.042}


@pytest.mark.parametrize("df", sorted(T_975))
def test_t_quantiles_match_the_tables(df):
    assert t_quantile(0.975, df) == pytest.approx(T_975[df], abs=5e-4)


def test_t_quantile_other_levels_and_limits():
    assert t_quantile(0.995, 5) == pytest.approx(4.032, abs=5e-4)  # 99 % two-sided
    assert t_quantile(0.95, 12) == pytest.approx(1.782, abs=5e-4)
    assert t_quantile(0.025, 4) == pytest.approx(-2.776, abs=5e-4)  # symmetric
    assert t_quantile(0.975, math.inf) == pytest.approx(1.959964, abs=1e-5)
    assert t_quantile(0.975, 1e6) == pytest.approx(1.959964, abs=1e-4)
    # df = 1 is the Cauchy distribution: a closed-form quantile.
    assert t_quantile(0.9, 1) == pytest.approx(math.tan(math.pi * 0.4), rel=1e-9)
    for df in (1, 3, 7.5):
        assert t_cdf(t_quantile(0.8, df), df) == pytest.approx(0.8, abs=1e-10)
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)


def test_mean_interval_is_t_times_the_standard_error():
    values = [0.81, 0.84, 0.83]
    mean, half = mean_interval(values)
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    assert mean == pytest.approx(sum(values) / 3)
    assert half == pytest.approx(4.302652729749 * s / math.sqrt(3), rel=1e-9)
    assert mean_interval([2.0, 2.0, 2.0]) == (2.0, 0.0)
    one = mean_interval([5.0])
    assert one[0] == 5.0 and math.isnan(one[1])  # one seed: spread unknown
    assert mean_interval([1.0, float("nan"), 3.0])[0] == 2.0  # a failed run is left out


def test_intervals_shrink_as_seeds_are_added():
    rng = random.Random(0)
    draws = [rng.gauss(0.5, 0.1) for _ in range(200)]
    widths = [mean_interval(draws[:n])[1] for n in (3, 10, 50, 200)]
    assert widths == sorted(widths, reverse=True)
    # Coverage on a known mean: ~95 % of 3-seed intervals hold it.
    hits = 0
    for _ in range(2000):
        xs = [rng.gauss(1.0, 0.2) for _ in range(3)]
        mean, half = mean_interval(xs)
        hits += abs(mean - 1.0) <= half
    assert 0.93 <= hits / 2000 <= 0.97


def test_smallest_resolvable_difference_pools_the_spread():
    a, b = [1.0, 2.0, 3.0], [2.0, 3.0, 4.0]  # both s = 1, n = 3, df = 4
    expected = 2.776445105 * 1.0 * math.sqrt(2 / 3)
    assert smallest_resolvable_difference(a, b) == pytest.approx(expected, rel=1e-8)
    assert smallest_resolvable_difference(a) == pytest.approx(4.302652729 * math.sqrt(2 / 3))
    assert math.isnan(smallest_resolvable_difference([1.0], [2.0]))
    diff, half = difference_interval(a, b)
    assert diff == -1.0 and half == pytest.approx(
        expected, rel=1e-8
    )  # equal spreads: Welch = pooled
    assert abs(diff) < half  # one unit apart with s = 1 over 3 seeds: not resolved
    diff, half = difference_interval([1.0, 1.1, 0.9], [2.0, 2.1, 1.9])
    assert abs(diff) > half
