"""Statistics over seeds: confidence intervals, moving averages, time to a target, ratios.

Conventions used by every table and plot of a sweep:

- A confidence interval over seeds is mean +- t_{(1+c)/2, n-1} * s / sqrt(n), with s the sample
  standard deviation (ddof=1) and the Student t quantile from scipy. One seed gives no interval
  (half-width NaN, drawn as no band, written as blank).
- A moving average is trailing: entry i is the mean of the last ``window`` values up to and
  including i (fewer at the start). Time to target only counts full windows.
- A ratio is the variant's mean divided by the baseline's mean at the same grid point; a paired
  ratio is the mean (with its interval) of per-seed ratios.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from scipy import stats as _scipy_stats

TARGET_WINDOW = 10
CONFIDENCE = 0.95


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """(mean, half-width) of the two-sided t confidence interval of the mean.

    half-width = t_{(1+confidence)/2, n-1} * s / sqrt(n), s the sample std (ddof=1). With one value
    the half-width is NaN (no interval); an empty sequence is an error.
    """
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci of no values")
    mean = math.fsum(values) / n
    if n == 1:
        return mean, math.nan
    s = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    t = float(_scipy_stats.t.ppf(0.5 + 0.5 * confidence, n - 1))
    return mean, t * s / math.sqrt(n)


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average: entry i is the mean of values[max(0, i - window + 1) : i + 1]."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


@dataclass(frozen=True)
class TargetHit:
    """Where a run first reached the target: its optimizer step and cumulative wall-clock."""

    step: int
    wall_s: float | None


def time_to_target(
    steps: Sequence[int],
    accuracy: Sequence[float],
    target: float,
    *,
    wall_s: Sequence[float | None] | None = None,
    window: int = TARGET_WINDOW,
) -> TargetHit | None:
    """First step whose trailing ``window``-step mean accuracy is >= ``target``, else None.

    ``steps``, ``accuracy`` and ``wall_s`` are aligned (one entry per logged training step, in
    order). Only full windows count, so a lucky first step cannot reach the target alone.
    """
    if not len(steps) == len(accuracy) == (len(wall_s) if wall_s is not None else len(steps)):
        raise ValueError("steps, accuracy and wall_s must have the same length")
    averaged = moving_average(accuracy, window)
    for i in range(window - 1, len(averaged)):
        if averaged[i] >= target:
            return TargetHit(int(steps[i]), None if wall_s is None else wall_s[i])
    return None


def ratio(value: float | None, baseline: float | None) -> float | None:
    """value / baseline; None when either is missing or NaN, or the baseline is 0."""
    if value is None or baseline is None or math.isnan(value) or math.isnan(baseline):
        return None
    if baseline == 0:
        return None
    return value / baseline


@dataclass(frozen=True)
class Estimate:
    """Mean over seeds with its confidence half-width (NaN for one seed) and the seed count."""

    mean: float
    half_width: float
    n: int


def estimate(values: Iterable[float | None], confidence: float = CONFIDENCE) -> Estimate | None:
    """:func:`mean_ci` of the values that are not None; None when there are none."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    mean, half = mean_ci(present, confidence)
    return Estimate(mean, half, len(present))


def paired_ratio(
    values: dict[int, float | None], baseline: dict[int, float | None]
) -> Estimate | None:
    """Mean and interval of per-seed ratios ``values[seed] / baseline[seed]`` over shared seeds.

    Pairing by seed removes what the two arms share (the seed's problems, the machine's load at
    the time both ran); seeds where either value is missing are left out.
    """
    return estimate(ratio(values[s], baseline[s]) for s in values if s in baseline)
