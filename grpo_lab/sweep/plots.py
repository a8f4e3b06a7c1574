"""PNG plots of a sweep, drawn with matplotlib's object API (no pyplot state, no display).

:func:`plot_metric_curves` is the general one: metric curves against step (or any logged x such
as cumulative step time) from metrics.jsonl records, one line per run. The others draw a sweep's
groups: mean curves over seeds with confidence bands, and bars of memory, step time by phase and
throughput. Every curve is drawn by :func:`grpo_lab.plots.line_plot`. Without matplotlib every
function returns nothing and writes no file.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from grpo_lab.plots import MISSING, Line, Panel, figure_class, line_plot
from grpo_lab.sweep.stats import TARGET_WINDOW, mean_ci, moving_average
from grpo_lab.sweep.summary import GroupSummary, RunStats, _num, phase_sorted

NO_MATPLOTLIB = f"Plots skipped: {MISSING}."


def plot_metric_curves(
    runs: Mapping[str, Sequence[Mapping]],
    metrics: Sequence[str],
    path: str | Path,
    *,
    x: str = "step",
    window: int = 1,
    title: str | None = None,
) -> Path | None:
    """Plot ``metrics`` against ``x`` for each run: one panel per metric, one line per run.

    ``runs`` maps a label to that run's metrics.jsonl records (``MetricsWriter.read``); a record
    enters a panel when it holds finite numbers at both ``x`` and the metric, so evaluation
    records draw their own curve under ``eval/*`` keys. ``window`` > 1 draws the trailing moving
    average. Drawn by :func:`grpo_lab.plots.line_plot`. Returns the written file, or None when
    matplotlib is missing or nothing was logged.
    """
    Figure = figure_class()
    if Figure is None or not metrics:
        return None
    panels = []
    for metric in metrics:
        lines = []
        for i, (label, records) in enumerate(runs.items()):
            points = [
                (xv, yv)
                for r in records
                if (xv := _num(r, x)) is not None and (yv := _num(r, metric)) is not None
            ]
            if points:
                xs, ys = zip(*points)
                lines.append(Line(label, xs, moving_average(ys, window), color=f"C{i % 10}"))
        ylabel = metric if window == 1 else f"{metric}\n({window}-step moving avg)"
        panels.append(Panel(lines, ylabel))
    if not any(panel.lines for panel in panels):
        return None
    size = (7, 2.6 * len(metrics) + 0.6)
    return line_plot(Figure, path, panels, xlabel=x, title=title, size=size)


def write_plots(
    out: Path, groups: list[GroupSummary], target: float | None
) -> tuple[list[Path], str | None]:
    """A sweep's PNG plots next to its report; (files, a note when plotting was not possible)."""
    Figure = figure_class()
    if Figure is None:
        return [], NO_MATPLOTLIB
    colors = {g.group: f"C{i % 10}" for i, g in enumerate(groups)}
    plots = []
    for x in ("step", "wallclock"):
        path = out / f"reward_vs_{x}.png"
        if _plot_curves(Figure, path, groups, colors, x, target):
            plots.append(path)
    for fn, name in (
        (_plot_memory, "memory_per_phase.png"),
        (_plot_step_time, "step_time.png"),
        (_plot_tokens, "tokens_per_s.png"),
    ):
        if fn(Figure, out / name, groups, colors):
            plots.append(out / name)
    return plots, None


def _mean_curve(runs: list[RunStats]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Seeds aligned by step: (steps, mean wall-clock, mean value, CI half-width) per step.

    Only steps that at least half the seeds logged are kept: runs on a wall-clock budget end at
    different steps, and a mean over the last one or two would be drawn as the group's.
    """
    by_step: dict[int, list[tuple[float, float | None]]] = {}
    for r in runs:
        for s, v, w in zip(r.curve_steps, r.curve_values, r.curve_wall_s):
            by_step.setdefault(s, []).append((v, w))
    steps, walls, means, halves = [], [], [], []
    for s in sorted(by_step):
        if 2 * len(by_step[s]) < len(runs):
            continue
        values = [v for v, _ in by_step[s]]
        wall = [w for _, w in by_step[s] if w is not None]
        mean, half = mean_ci(values)
        steps.append(s)
        walls.append(statistics.fmean(wall) if wall else math.nan)
        means.append(mean)
        halves.append(half)
    return steps, walls, means, halves


def _plot_curves(Figure, path, groups, colors, x: str, target: float | None) -> bool:
    metrics = {r.curve_metric for g in groups for r in g.runs} - {None}
    if not metrics:
        return False
    metric = "reward/accuracy" if "reward/accuracy" in metrics else metrics.pop()
    lines = []
    for g in groups:
        steps, walls, means, halves = _mean_curve([r for r in g.runs if r.curve_metric == metric])
        xs = steps if x == "step" else walls
        lines.append(Line(f"{g.group} (n={g.n_seeds})", xs, means, halves, color=colors[g.group]))
    show_target = target is not None and metric == "reward/accuracy"
    panel = Panel(
        lines,
        ylabel=f"{metric} ({TARGET_WINDOW}-step moving avg)",
        hline=target if show_target else None,
        hline_label=f"target {target:g}" if show_target else None,
    )
    line_plot(
        Figure,
        path,
        [panel],
        xlabel="optimizer step" if x == "step" else "wall-clock (s, cumulative step time)",
        title=f"{metric} vs {'step' if x == 'step' else 'wall-clock'}: mean ± 95% CI over seeds",
    )
    return True


def _grouped_bars(ax, categories, groups, colors, value_of) -> None:
    """One cluster per category, one bar per group (mean), CI whiskers where defined."""
    width = 0.8 / max(1, len(groups))
    for i, g in enumerate(groups):
        xs, heights, errs = [], [], []
        for j, cat in enumerate(categories):
            e = value_of(g, cat)
            if e is None:
                continue
            xs.append(j - 0.4 + width * (i + 0.5))
            heights.append(e.mean)
            errs.append(0.0 if math.isnan(e.half_width) else e.half_width)
        ax.bar(xs, heights, width, yerr=errs, capsize=3, color=colors[g.group], label=g.group)
    ax.set_xticks(range(len(categories)), categories)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def _plot_memory(Figure, path, groups, colors) -> bool:
    phases = phase_sorted(p for g in groups for p in g.phase_peak_gib)
    if phases:

        def value_of(g, p):
            return g.phase_peak_gib.get(p)

        label = "CUDA peak allocated per phase (GiB)"
    elif any(g.metrics["peak_mem_gib"] for g in groups):
        phases = ["peak RSS"]

        def value_of(g, p):
            return g.metrics["peak_mem_gib"]

        label = "process peak RSS (GiB)"
    else:
        return False
    fig = Figure(
        figsize=(max(5, 1.3 * len(phases) * max(1, len(groups)) / 2 + 3), 4), layout="constrained"
    )
    ax = fig.subplots()
    _grouped_bars(ax, phases, groups, colors, value_of)
    ax.set_ylabel(label)
    ax.set_title("Peak memory: mean over seeds, 95% CI whiskers")
    fig.savefig(path, dpi=110)
    return True


def _plot_step_time(Figure, path, groups, colors) -> bool:
    phases = phase_sorted(p for g in groups for p in g.phase_s)
    if not phases:
        return False
    parts = [*phases, "other"]
    fig = Figure(figsize=(max(5, 1.2 * len(groups) + 3), 4), layout="constrained")
    ax = fig.subplots()
    bottoms = [0.0] * len(groups)
    for k, part in enumerate(parts):
        heights = []
        for g in groups:
            e = g.other_s if part == "other" else g.phase_s.get(part)
            heights.append(e.mean if e else 0.0)
        ax.bar(
            range(len(groups)),
            heights,
            0.6,
            bottom=bottoms,
            label=part,
            color="lightgrey" if part == "other" else f"C{k % 10}",
        )
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    ax.set_xticks(range(len(groups)), [g.group for g in groups], rotation=15)
    ax.set_ylabel("mean seconds per step")
    ax.set_title("Step time by phase (mean over steps, then seeds)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    return True


def _plot_tokens(Figure, path, groups, colors) -> bool:
    cats = [
        c
        for c in ("gen_tokens_per_s", "train_tokens_per_s")
        if any(g.metrics.get(c) for g in groups)
    ]
    if not cats:
        return False
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    _grouped_bars(ax, cats, groups, colors, lambda g, c: g.metrics.get(c))
    ax.set_xticks(range(len(cats)), [c.replace("_tokens_per_s", "") for c in cats])
    ax.set_ylabel("tokens / s (mean over steps, then seeds)")
    ax.set_title("Throughput: generated tokens / rollout s, trained tokens / update s")
    fig.savefig(path, dpi=110)
    return True
