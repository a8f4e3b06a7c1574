"""What a sweep measured: one :class:`RunStats` per run folder, one :class:`GroupSummary` per
variant x grid point (means over seeds with confidence intervals, ratios to the baseline), and
the ``summary.csv`` written from them. Metrics are read from each run's ``metrics.jsonl``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpo_lab.harness import MetricsWriter
from grpo_lab.sweep.plan import FAILED, SweepError, is_finished
from grpo_lab.sweep.stats import (
    TARGET_WINDOW,
    Estimate,
    TargetHit,
    estimate,
    moving_average,
    ratio,
    time_to_target,
)

FINAL_TRAIN_FRACTION = 0.1

# Phases in the order a training step runs them; unknown phases follow, sorted.
PHASE_ORDER = ("rollout", "reward", "old_logprob", "ref", "values", "update")


def read_metrics(path: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """(training rows, evaluation rows) of a metrics.jsonl, each sorted by step, one per step.

    An evaluation row has ``eval/*`` keys and no ``reward/*`` key; every other row with a
    ``step`` is a training row. When a step appears twice (a resumed run rewrites the steps after
    its checkpoint) the row written last wins. Lines are read by :meth:`MetricsWriter.read`: a torn
    last line is skipped, a bad line elsewhere raises ValueError naming file and line.
    """
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    for row in MetricsWriter.read(path):
        step = row.get("step")
        if isinstance(step, bool) or not isinstance(step, int | float):
            continue
        is_eval = any(k.startswith("eval/") for k in row) and not any(
            k.startswith("reward/") for k in row
        )
        (evals if is_eval else train)[int(step)] = row
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]


def _num(row: dict, key: str) -> float | None:
    """A finite number at ``key``, else None (absent, null, NaN, not a number)."""
    v = row.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def _phase_names(keys: Iterable[str], prefix: str, suffix: str, exclude: set[str]) -> list[str]:
    names = {
        k[len(prefix) : -len(suffix)]
        for k in keys
        if k.startswith(prefix) and k.endswith(suffix) and "/" not in k[len(prefix) : -len(suffix)]
    } - exclude
    return phase_sorted(names)


def phase_sorted(names: Iterable[str]) -> list[str]:
    names = set(names)
    known = [p for p in PHASE_ORDER if p in names]
    return known + sorted(names - set(PHASE_ORDER))


@dataclass
class RunStats:
    """What one run contributes to the report (None: the run did not log it)."""

    group: str
    variant: str
    grid: dict[str, Any]
    seed: int
    dir: Path
    status: str  # finished | failed | partial | not started
    steps: int = 0
    total_s: float | None = None
    peak_mem_gib: float | None = None
    peak_mem_kind: str | None = None  # "cuda" (peak allocated) or "cpu" (peak RSS)
    peak_reserved_gib: float | None = None
    median_step_s: float | None = None
    final_acc: float | None = None
    final_acc_source: str | None = None  # "eval" or "train"
    target: TargetHit | None = None
    phase_s: dict[str, float] = field(default_factory=dict)  # mean seconds per step
    other_s: float | None = None  # step time outside every phase
    phase_peak_gib: dict[str, float] = field(default_factory=dict)
    static_gib: dict[str, float] = field(default_factory=dict)
    rates: dict[str, float] = field(default_factory=dict)  # perf/* means
    curve_metric: str | None = None
    curve_steps: list[int] = field(default_factory=list)
    curve_values: list[float] = field(default_factory=list)  # moving average, TARGET_WINDOW
    curve_wall_s: list[float | None] = field(default_factory=list)


def summarise_run(
    run_dir: Path,
    *,
    group: str,
    variant: str,
    grid: dict[str, Any],
    seed: int,
    target_accuracy: float | None,
) -> RunStats:
    """Read one run folder into :class:`RunStats` (see the report for each definition)."""
    status = (
        "finished"
        if is_finished(run_dir)
        else "failed"
        if (run_dir / FAILED).exists()
        else "partial"
        if (run_dir / "metrics.jsonl").exists()
        else "not started"
    )
    stats = RunStats(group, variant, grid, seed, run_dir, status)
    if not (run_dir / "metrics.jsonl").exists():
        return stats
    try:
        train, evals = read_metrics(run_dir / "metrics.jsonl")
    except ValueError as e:
        raise SweepError(str(e)) from None
    keys = {k for row in train for k in row}
    if train:
        stats.steps = int(train[-1]["step"])
        totals = [t for row in train if (t := _num(row, "time/total_s")) is not None]
        stats.total_s = totals[-1] if totals else None

    alloc = [v for row in train if (v := _num(row, "mem/peak_alloc_gib")) is not None]
    rss = [v for row in train if (v := _num(row, "mem/rss_peak_gib")) is not None]
    if alloc:
        stats.peak_mem_gib, stats.peak_mem_kind = max(alloc), "cuda"
    elif rss:
        stats.peak_mem_gib, stats.peak_mem_kind = max(rss), "cpu"
    reserved = [v for row in train if (v := _num(row, "mem/peak_reserved_gib")) is not None]
    stats.peak_reserved_gib = max(reserved) if reserved else None
    for phase in _phase_names(keys, "mem/", "_peak_gib", {"rss"}):
        peaks = [v for row in train if (v := _num(row, f"mem/{phase}_peak_gib")) is not None]
        stats.phase_peak_gib[phase] = max(peaks)
    for key in sorted(k for k in keys if k.startswith("mem/static/")):
        values = [v for row in train if (v := _num(row, key)) is not None]
        if values:
            stats.static_gib[key.removeprefix("mem/static/").removesuffix("_gib")] = values[-1]

    step_times = [v for row in train if (v := _num(row, "time/step_s")) is not None]
    stats.median_step_s = statistics.median(step_times) if step_times else None
    timed = [row for row in train if _num(row, "time/step_s") is not None]
    # A phase that did not run in a step counts as 0 s there, so phases add up to the step.
    for phase in _phase_names(keys, "time/", "_s", {"step", "total"}):
        stats.phase_s[phase] = statistics.fmean(_num(r, f"time/{phase}_s") or 0.0 for r in timed)
    if timed:
        stats.other_s = max(0.0, statistics.fmean(step_times) - sum(stats.phase_s.values()))
    for key in ("gen_tokens_per_s", "train_tokens_per_s", "samples_per_s", "mfu"):
        values = [v for row in train if (v := _num(row, f"perf/{key}")) is not None]
        if values:
            stats.rates[key] = statistics.fmean(values)

    acc_rows = [row for row in train if _num(row, "reward/accuracy") is not None]
    accuracy = [_num(row, "reward/accuracy") for row in acc_rows]
    final_eval = [row for row in evals if _num(row, "eval/greedy_acc") is not None]
    # The last eval counts only when it is the end-of-run evaluation, not the one at step 0.
    if final_eval and (not train or final_eval[-1]["step"] >= stats.steps):
        stats.final_acc, stats.final_acc_source = _num(final_eval[-1], "eval/greedy_acc"), "eval"
    elif accuracy:
        tail = max(1, math.ceil(FINAL_TRAIN_FRACTION * len(accuracy)))
        stats.final_acc, stats.final_acc_source = statistics.fmean(accuracy[-tail:]), "train"
    if accuracy and target_accuracy is not None:
        stats.target = time_to_target(
            [int(row["step"]) for row in acc_rows],
            accuracy,
            target_accuracy,
            wall_s=[_num(row, "time/total_s") for row in acc_rows],
        )

    metric = "reward/accuracy" if accuracy else "reward/mean" if "reward/mean" in keys else None
    if metric is not None:
        rows = [row for row in train if _num(row, metric) is not None]
        stats.curve_metric = metric
        stats.curve_steps = [int(row["step"]) for row in rows]
        stats.curve_values = moving_average([_num(row, metric) for row in rows], TARGET_WINDOW)
        stats.curve_wall_s = [_num(row, "time/total_s") for row in rows]
    return stats


@dataclass
class GroupSummary:
    """One variant at one grid point, over its finished seeds."""

    group: str
    variant: str
    grid: dict[str, Any]
    runs: list[RunStats]
    # peak_mem_gib, step_time_s, final_acc, target_steps, target_wall_s, gen_tokens_per_s,
    # train_tokens_per_s, samples_per_s, mfu
    metrics: dict[str, Estimate | None]
    ratios: dict[str, float | None]  # same keys: mean / the baseline group's mean
    peak_mem_kind: str | None
    final_acc_source: str | None  # "eval", "train", "mixed" or None
    target_reached: int
    phase_s: dict[str, Estimate]
    other_s: Estimate | None
    phase_peak_gib: dict[str, Estimate]
    peak_reserved_gib: Estimate | None
    static_gib: dict[str, Estimate]

    @property
    def n_seeds(self) -> int:
        return len(self.runs)


@dataclass
class SweepSummary:
    """The aggregate of a sweep folder and the files written from it."""

    output_dir: Path
    name: str
    baseline: str
    target_accuracy: float | None
    groups: list[GroupSummary]
    runs: list[RunStats]  # every planned or found run, finished or not
    report_path: Path
    csv_path: Path
    plots: list[Path]
    manifest: dict | None


def discover_runs(out: Path) -> list[tuple[str, str, dict, int, Path]]:
    entries = []
    for metrics in sorted(out.glob("*/seed*/metrics.jsonl")):
        run_dir = metrics.parent
        m = re.fullmatch(r"seed(-?\d+)", run_dir.name)
        if m is None:
            continue
        group = run_dir.parent.name
        variant, *parts = group.split("__")
        grid = dict(p.partition("=")[::2] for p in parts)
        entries.append((group, variant, grid, int(m.group(1)), run_dir))
    entries.sort(key=lambda e: (e[0], e[3]))
    return entries


def summarise_group(runs: list[RunStats], first: RunStats) -> GroupSummary:
    est = estimate

    reached = [r.target for r in runs if r.target is not None]
    metrics = {
        "peak_mem_gib": est(r.peak_mem_gib for r in runs),
        "step_time_s": est(r.median_step_s for r in runs),
        "final_acc": est(r.final_acc for r in runs),
        "target_steps": est(float(t.step) for t in reached),
        "target_wall_s": est(t.wall_s for t in reached),
        **{
            f"{k}": est(r.rates.get(k) for r in runs)
            for k in ("gen_tokens_per_s", "train_tokens_per_s", "samples_per_s", "mfu")
        },
    }
    kinds = {r.peak_mem_kind for r in runs} - {None}
    sources = {r.final_acc_source for r in runs} - {None}
    phases = phase_sorted(p for r in runs for p in r.phase_s)
    peak_phases = phase_sorted(p for r in runs for p in r.phase_peak_gib)
    static = sorted({k for r in runs for k in r.static_gib})
    return GroupSummary(
        group=first.group,
        variant=first.variant,
        grid=first.grid,
        runs=runs,
        metrics=metrics,
        ratios={},
        peak_mem_kind=kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else None),
        final_acc_source=sources.pop() if len(sources) == 1 else ("mixed" if sources else None),
        target_reached=len(reached),
        phase_s={p: est(r.phase_s.get(p, 0.0) for r in runs) for p in phases},
        other_s=est(r.other_s for r in runs),
        phase_peak_gib={p: est(r.phase_peak_gib.get(p) for r in runs) for p in peak_phases},
        peak_reserved_gib=est(r.peak_reserved_gib for r in runs),
        static_gib={k: est(r.static_gib.get(k) for r in runs) for k in static},
    )


def add_ratios(groups: list[GroupSummary], baseline: str) -> None:
    """Each group's means over the baseline variant's at the same grid point."""
    base = {
        json.dumps(g.grid, sort_keys=True, default=str): g for g in groups if g.variant == baseline
    }
    for g in groups:
        ref = base.get(json.dumps(g.grid, sort_keys=True, default=str))
        for key, e in g.metrics.items():
            r = ref.metrics.get(key) if ref is not None else None
            g.ratios[key] = ratio(e.mean if e else None, r.mean if r else None)


def write_csv(path: Path, groups: list[GroupSummary]) -> None:
    """One row per group: mean, CI half-width and ratio to baseline of every metric."""
    phases = phase_sorted(p for g in groups for p in g.phase_s)
    peaks = phase_sorted(p for g in groups for p in g.phase_peak_gib)
    header = [
        "group",
        "variant",
        "grid",
        "n_seeds",
        "peak_mem_source",
        "final_acc_source",
        "target_reached",
    ]
    for key in groups[0].metrics:
        header += [f"{key}_mean", f"{key}_ci95", f"{key}_ratio"]
    header += [f"time_{p}_s_mean" for p in phases] + ["time_other_s_mean"]
    header += [f"mem_{p}_peak_gib_mean" for p in peaks] + ["mem_peak_reserved_gib_mean"]

    def cell(x):
        return "" if x is None or (isinstance(x, float) and math.isnan(x)) else repr(float(x))

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for g in groups:
            row = [
                g.group,
                g.variant,
                json.dumps(g.grid, default=str) if g.grid else "",
                g.n_seeds,
                g.peak_mem_kind or "",
                g.final_acc_source or "",
                g.target_reached,
            ]
            for key, e in g.metrics.items():
                row += [cell(e and e.mean), cell(e and e.half_width), cell(g.ratios.get(key))]
            row += [cell(g.phase_s[p].mean if p in g.phase_s else None) for p in phases]
            row += [cell(g.other_s and g.other_s.mean)]
            row += [
                cell(g.phase_peak_gib[p].mean if g.phase_peak_gib.get(p) else None) for p in peaks
            ]
            row += [cell(g.peak_reserved_gib and g.peak_reserved_gib.mean)]
            writer.writerow(row)
