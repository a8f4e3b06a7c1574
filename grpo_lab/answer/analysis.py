"""The numbers of docs/answer.md, computed from the measurements (no formatting here).

Every interval is a 95 % Student-t interval over seeds (:mod:`grpo_lab.sweep.stats`); every
ratio between two objectives of a sweep is paired by seed (the mean of per-seed ratios), since
both arms of a seed ran on the same problems one after the other on the same machine.
Step-benchmark ratios are taken within one benchmark run, against that run's GRPO.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpo_lab.sweep import Estimate, SweepSummary, estimate, paired_ratio, read_metrics
from grpo_lab.sweep.stats import moving_average
from grpo_lab.sweep.summary import _num

EV_KEY = "value/explained_variance"
EDGE_FRACTION = 0.1  # "early" and "late" explained variance: the first / last 10 % of steps


@dataclass
class RunFacts:
    """What one finished run of the benefit or zero-advantage sweep measured."""

    variant: str
    seed: int
    steps: int
    spent_s: float | None  # cumulative training-step time (time/total_s)
    median_step_s: float | None
    heldout_before: float | None
    heldout_after: float | None
    peak_rss_gib: float | None
    static_gib: float | None  # parameters + gradients + optimizer state, every model
    per_step: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def heldout_gain(self) -> float | None:
        if self.heldout_before is None or self.heldout_after is None:
            return None
        return self.heldout_after - self.heldout_before


PER_STEP_KEYS = (
    EV_KEY,
    "reward/accuracy",
    "reward/zero_std_groups",
    "update/zero_advantage_rows_skipped",
    "time/update_s",
    "time/step_s",
    "time/total_s",
)


def run_facts(summary: SweepSummary) -> list[RunFacts]:
    """:class:`RunFacts` of every finished run of a sweep, from its metrics.jsonl."""
    facts = []
    for r in summary.runs:
        if r.status != "finished":
            continue
        train, evals = read_metrics(Path(r.dir) / "metrics.jsonl")
        held = [(int(e["step"]), v) for e in evals if (v := _num(e, "eval/greedy_acc")) is not None]
        statics = [v for row in train if (v := _num(row, "mem/static/total_gib")) is not None]
        facts.append(
            RunFacts(
                variant=r.variant,
                seed=r.seed,
                steps=r.steps,
                spent_s=r.total_s,
                median_step_s=r.median_step_s,
                heldout_before=next((v for s, v in held if s == 0), None),
                heldout_after=held[-1][1] if held and held[-1][0] == r.steps else None,
                peak_rss_gib=r.peak_mem_gib,
                static_gib=statics[0] if statics else None,
                per_step={
                    k: [(int(row["step"]), v) for row in train if (v := _num(row, k)) is not None]
                    for k in PER_STEP_KEYS
                },
            )
        )
    return facts


def by_seed(facts: list[RunFacts], variant: str, attr: str) -> dict[int, float | None]:
    return {f.seed: getattr(f, attr) for f in facts if f.variant == variant}


def over_seeds(facts: list[RunFacts], variant: str, attr: str) -> Estimate | None:
    return estimate(by_seed(facts, variant, attr).values())


def paired(facts: list[RunFacts], variant: str, baseline: str, attr: str) -> Estimate | None:
    """Per-seed ``attr`` of ``variant`` over ``baseline``'s, mean and interval."""
    return paired_ratio(by_seed(facts, variant, attr), by_seed(facts, baseline, attr))


def per_step_mean(f: RunFacts, key: str) -> float | None:
    values = [v for _, v in f.per_step.get(key, [])]
    return statistics.fmean(values) if values else None


def per_step_estimate(facts: list[RunFacts], variant: str, key: str) -> Estimate | None:
    """Each seed's mean of a per-step metric, then mean and interval over seeds."""
    return estimate(per_step_mean(f, key) for f in facts if f.variant == variant)


def paired_per_step(
    facts: list[RunFacts], variant: str, baseline: str, key: str
) -> Estimate | None:
    """Per-seed ratio of a per-step metric's run means, ``variant`` over ``baseline``."""
    return paired_ratio(
        {f.seed: per_step_mean(f, key) for f in facts if f.variant == variant},
        {f.seed: per_step_mean(f, key) for f in facts if f.variant == baseline},
    )


def edge_mean(f: RunFacts, key: str, late: bool) -> float | None:
    """Mean of ``key`` over the first (or last) EDGE_FRACTION of a run's logged steps."""
    values = [v for _, v in f.per_step.get(key, [])]
    if not values:
        return None
    n = max(1, math.ceil(EDGE_FRACTION * len(values)))
    return statistics.fmean(values[-n:] if late else values[:n])


@dataclass(frozen=True)
class ExplainedVariance:
    """The value model's explained variance of the returns in one objective's runs."""

    variant: str
    early: Estimate | None  # mean over the first 10 % of steps, over seeds
    late: Estimate | None  # last 10 %
    positive_late: Estimate | None  # fraction of the last 10 % of steps with EV > 0


def explained_variance(facts: list[RunFacts], variant: str) -> ExplainedVariance | None:
    runs = [f for f in facts if f.variant == variant and f.per_step.get(EV_KEY)]
    if not runs:
        return None

    def positive_late(f: RunFacts) -> float:
        values = [v for _, v in f.per_step[EV_KEY]]
        tail = values[-max(1, math.ceil(EDGE_FRACTION * len(values))) :]
        return sum(v > 0 for v in tail) / len(tail)

    return ExplainedVariance(
        variant,
        estimate(edge_mean(f, EV_KEY, late=False) for f in runs),
        estimate(edge_mean(f, EV_KEY, late=True) for f in runs),
        estimate(positive_late(f) for f in runs),
    )


def mean_curve(
    facts: list[RunFacts], variant: str, key: str, window: int = 1
) -> list[dict[str, float]]:
    """Seeds' (moving-averaged) ``key`` averaged at each step that at least half the seeds
    logged (runs on a time budget end at different steps), as records."""
    curves = []
    for f in facts:
        if f.variant == variant and f.per_step.get(key):
            steps, values = zip(*f.per_step[key])
            curves.append(dict(zip(steps, moving_average(values, window))))
    if not curves:
        return []
    counts: dict[int, int] = {}
    for c in curves:
        for s in c:
            counts[s] = counts.get(s, 0) + 1
    kept = sorted(s for s, n in counts.items() if 2 * n >= len(curves))
    return [{"step": s, key: statistics.fmean(c[s] for c in curves if s in c)} for s in kept]


@dataclass(frozen=True)
class SkipBin:
    """Steps whose fraction of zero-std groups is ``fraction``: mean update time per arm."""

    fraction: float
    steps: dict[str, int]  # arm -> steps pooled over seeds
    update_s: dict[str, float]  # arm -> mean update seconds


def skip_bins(facts: list[RunFacts], arms: tuple[str, str], min_steps: int = 20) -> list[SkipBin]:
    """Update time against the step's fraction of zero-std groups, pooled over seeds.

    Only fractions with at least ``min_steps`` steps in both arms are kept.
    """
    pooled: dict[str, dict[float, list[float]]] = {a: {} for a in arms}
    for f in facts:
        if f.variant not in arms:
            continue
        fractions = dict(f.per_step.get("reward/zero_std_groups", []))
        for step, update in f.per_step.get("time/update_s", []):
            if step in fractions:
                pooled[f.variant].setdefault(round(fractions[step], 6), []).append(update)
    bins = []
    for frac in sorted(set.intersection(*(set(p) for p in pooled.values()))):
        counts = {a: len(pooled[a][frac]) for a in arms}
        if min(counts.values()) >= min_steps:
            means = {a: statistics.fmean(pooled[a][frac]) for a in arms}
            bins.append(SkipBin(frac, counts, means))
    return bins


# ---------------------------------------------------------------------------------- benchmark


@dataclass(frozen=True)
class BenchArm:
    """One implementation of one step_bench run, with ratios to that run's GRPO."""

    objective: str
    run: str
    preset: str
    step_s: float | None
    mem_gib: float | None
    time_ratio: float | None
    memory_ratio: float | None
    phases_s: dict[str, float]


def _median_step(result: dict[str, Any]) -> float | None:
    summary = result.get("step_s_summary") or {}
    if isinstance(summary.get("median"), int | float):
        return float(summary["median"])
    steps = result.get("step_s") or []
    return statistics.median(steps) if steps else None


def bench_arms(benches: list[dict[str, Any]]) -> list[BenchArm]:
    """Every implementation of every step_bench run, GRPO of the same run as 1.0."""
    arms = []
    for data in benches:
        results = data.get("results", {})
        base = results.get("grpo", {})
        base_t, base_m = _median_step(base), _memory(base)
        # The benchmark's own ratios (``ratios.<impl>.time`` / ``.memory``, against its anchor)
        # give the ratio to GRPO where a figure itself is missing.
        anchor = data.get("ratios") or {}
        for impl, result in results.items():
            t, m = _median_step(result), _memory(result)
            arms.append(
                BenchArm(
                    objective=impl,
                    run=data.get("bench_run", ""),
                    preset=str(data.get("preset", "")),
                    step_s=t,
                    mem_gib=m,
                    time_ratio=t / base_t if t and base_t else _anchored(anchor, impl, "time"),
                    memory_ratio=m / base_m if m and base_m else _anchored(anchor, impl, "memory"),
                    phases_s=dict(result.get("phases_median_s") or {}),
                )
            )
    return arms


def _memory(result: dict[str, Any]) -> float | None:
    value = result.get("mem_gib")
    return float(value) if isinstance(value, int | float) and value > 0 else None


def _anchored(ratios: dict[str, Any], impl: str, key: str) -> float | None:
    """ratios[impl][key] / ratios["grpo"][key]: two ratios to one anchor, as a ratio to GRPO."""
    mine, grpo = ratios.get(impl) or {}, ratios.get("grpo") or {}
    a, b = mine.get(key), grpo.get(key)
    ok = all(isinstance(v, int | float) and v > 0 for v in (a, b))
    return a / b if ok else None
