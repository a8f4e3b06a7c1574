"""grpo_lab.sweep.stats: confidence intervals, moving averages, time to target, ratios."""

import math
import statistics

import pytest

from grpo_lab.sweep.stats import (
    Estimate,
    TargetHit,
    mean_ci,
    moving_average,
    paired_ratio,
    ratio,
    time_to_target,
)


@pytest.mark.parametrize(
    ("p", "df", "expected"),
    [
        # Standard two-sided 95 % / 90 % / 99 % critical values (any printed t table).
        (0.975, 1, 12.7062047),
        (0.975, 2, 4.3026527),
        (0.975, 3, 3.1824463),
        (0.975, 4, 2.7764451),
        (0.975, 9, 2.2621572),
        (0.975, 30, 2.0422725),
        (0.975, 100, 1.9839715),
        (0.95, 5, 2.0150484),
        (0.995, 4, 4.6040949),
    ],
)
def test_mean_ci_half_width_uses_the_tabled_t_quantile(p, df, expected):
    # values 0..df: n = df + 1, half-width = t_{p, df} * s / sqrt(n) at confidence 2p - 1.
    values = [float(v) for v in range(df + 1)]
    s = statistics.stdev(values)
    mean, half = mean_ci(values, confidence=2 * p - 1)
    assert mean == pytest.approx(df / 2)
    assert half / (s / math.sqrt(df + 1)) == pytest.approx(expected, rel=1e-7)


def test_mean_ci_hand_values():
    # [1, 2, 3]: mean 2, s = sqrt(((1-2)^2 + 0 + (3-2)^2) / 2) = 1, t_{0.975,2} = 4.302653,
    # half-width = 4.302653 * 1 / sqrt(3) = 2.484138.
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert half == pytest.approx(2.484138, abs=1e-6)
    # [2, 4] at 90 %: mean 3, s = sqrt 2, t_{0.95,1} = 6.313752, half = 6.313752 * sqrt2 / sqrt2.
    mean, half = mean_ci([2.0, 4.0], confidence=0.90)
    assert mean == 3.0
    assert half == pytest.approx(6.313752, abs=1e-6)
    # Identical values: s = 0, so no spread.
    assert mean_ci([5.0, 5.0, 5.0]) == (5.0, 0.0)


def test_mean_ci_single_value_has_no_interval_and_empty_is_an_error():
    mean, half = mean_ci([0.7])
    assert mean == 0.7
    assert math.isnan(half)
    with pytest.raises(ValueError):
        mean_ci([])


def test_moving_average_hand_values_and_loop_reference():
    # window 3 over [3, 6, 9, 0]: [3/1, 9/2, 18/3, 15/3].
    assert moving_average([3.0, 6.0, 9.0, 0.0], 3) == [3.0, 4.5, 6.0, 5.0]
    values = [0.1 * ((7 * i) % 11) for i in range(40)]
    for window in (1, 4, 10, 50):
        loop = [
            sum(values[max(0, i - window + 1) : i + 1])
            / len(values[max(0, i - window + 1) : i + 1])
            for i in range(len(values))
        ]
        assert moving_average(values, window) == pytest.approx(loop)
    with pytest.raises(ValueError):
        moving_average(values, 0)


def test_time_to_target_counts_only_full_windows():
    steps = list(range(1, 16))
    wall = [2.0 * s for s in steps]
    # Five zeros then ten ones: the 10-step mean at index 9 (step 10) is 5/10 = 0.5 -> reaches 0.5
    # exactly there; 0.51 needs 6 ones -> index 10 (step 11, wall 22).
    acc = [0.0] * 5 + [1.0] * 10
    assert time_to_target(steps, acc, 0.5, wall_s=wall) == TargetHit(10, 20.0)
    assert time_to_target(steps, acc, 0.51, wall_s=wall) == TargetHit(11, 22.0)
    assert time_to_target(steps, acc, 0.51) == TargetHit(11, None)
    # A perfect first step alone does not count: the first full window (steps 1-10) averages 0.1.
    lucky = [1.0] + [0.0] * 14
    assert time_to_target(steps, lucky, 0.5) is None
    # Fewer steps than the window: never reached.
    assert time_to_target([1, 2, 3], [1.0, 1.0, 1.0], 0.5) is None
    with pytest.raises(ValueError):
        time_to_target([1, 2], [1.0], 0.5)


def test_ratio():
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(1.0, 0.0) is None
    assert ratio(None, 1.0) is None
    assert ratio(1.0, None) is None
    assert ratio(math.nan, 1.0) is None


def test_paired_ratio_is_the_mean_of_per_seed_ratios_over_shared_seeds():
    # seeds 0, 1 shared: ratios 2/1 = 2 and 6/2 = 3, mean 2.5; s = sqrt(0.5), n = 2,
    # half-width = 12.7062047 * sqrt(0.5) / sqrt(2) = 6.35310235. Seed 2 has no baseline.
    e = paired_ratio({0: 2.0, 1: 6.0, 2: 9.0}, {0: 1.0, 1: 2.0})
    assert isinstance(e, Estimate) and e.n == 2
    assert e.mean == pytest.approx(2.5)
    assert e.half_width == pytest.approx(6.35310235, rel=1e-7)
    assert paired_ratio({0: None}, {0: 1.0}) is None
