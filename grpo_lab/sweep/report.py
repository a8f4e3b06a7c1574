"""A sweep's report: ``report.md``, ``summary.csv`` and PNG plots from the run folders.

:func:`aggregate_sweep` reads every run (:mod:`.summary`), draws the plots (:mod:`.plots`) and
writes the Markdown report: the result table, time per phase, memory, throughput, the plots, the
runs and how they were launched.
"""

from __future__ import annotations

import json
import math
import os
import shlex
from pathlib import Path

from grpo_lab.sweep.plan import LOG, MANIFEST, SweepError
from grpo_lab.sweep.plots import write_plots
from grpo_lab.sweep.stats import CONFIDENCE, TARGET_WINDOW, Estimate, paired_ratio
from grpo_lab.sweep.summary import (
    FINAL_TRAIN_FRACTION,
    GroupSummary,
    RunStats,
    SweepSummary,
    add_ratios,
    discover_runs,
    phase_sorted,
    summarise_group,
    summarise_run,
    write_csv,
)


def aggregate_sweep(
    output_dir: str | os.PathLike,
    *,
    baseline: str | None = None,
    target_accuracy: float | None = None,
) -> SweepSummary:
    """Read every run under ``output_dir``; write ``report.md``, ``summary.csv`` and PNG plots.

    Runs come from ``manifest.json`` (written by :func:`run_sweep`) when present, else from the
    folders ``<group>/seed<k>/metrics.jsonl``. Only finished runs enter the statistics; the others
    are listed in the report. ``baseline`` and ``target_accuracy`` default to the manifest's,
    else the first variant and no target.
    """
    out = Path(output_dir)
    manifest, entries = _planned_runs(out)
    name = out.name
    if manifest is not None:
        spec = manifest.get("spec", {})
        baseline = baseline or spec.get("baseline")
        if target_accuracy is None:
            target_accuracy = spec.get("target_accuracy")
        name = spec.get("name", out.name)
    if not entries:
        raise SweepError(
            f"{out}: no runs found (expected {MANIFEST} or <variant>/seed<k>/metrics.jsonl)"
        )

    runs = [
        summarise_run(d, group=g, variant=v, grid=grid, seed=s, target_accuracy=target_accuracy)
        for g, v, grid, s, d in entries
    ]
    order = list(dict.fromkeys(r.group for r in runs))
    variants = list(dict.fromkeys(r.variant for r in runs))
    if baseline is None:
        baseline = variants[0]
    if baseline not in variants:
        raise SweepError(
            f"{out}: baseline: unknown variant {baseline!r}; variants: {', '.join(variants)}"
        )
    groups = [
        summarise_group(
            [r for r in runs if r.group == g and r.status == "finished"],
            [r for r in runs if r.group == g][0],
        )
        for g in order
    ]
    groups = [g for g in groups if g.runs]
    if not groups:
        raise SweepError(f"{out}: no finished runs yet ({len(runs)} found)")
    add_ratios(groups, baseline)

    csv_path = out / "summary.csv"
    write_csv(csv_path, groups)
    plots, plot_note = write_plots(out, groups, target_accuracy)
    summary = SweepSummary(
        output_dir=out,
        name=name,
        baseline=baseline,
        target_accuracy=target_accuracy,
        groups=groups,
        runs=runs,
        report_path=out / "report.md",
        csv_path=csv_path,
        plots=plots,
        manifest=manifest,
    )
    summary.report_path.write_text(_report(summary, plot_note), encoding="utf-8")
    return summary


def _planned_runs(out: Path) -> tuple[dict | None, list[tuple[str, str, dict, int, Path]]]:
    """(the manifest or None, its runs as (group, variant, grid, seed, folder)).

    Without ``manifest.json`` the runs are the ``<group>/seed<k>/metrics.jsonl`` folders found.
    """
    if not (out / MANIFEST).is_file():
        return None, discover_runs(out)
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    entries = [
        (r["group"], r["variant"], r["grid"], int(r["seed"]), out / r["group"] / f"seed{r['seed']}")
        for r in manifest["runs"]
    ]
    return manifest, entries


def _decimals(x: float, digits: int = 3) -> int:
    if x == 0 or not math.isfinite(x):
        return 2
    return max(0, digits - 1 - math.floor(math.log10(abs(x))))


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or math.isnan(x):
        return "–"
    return f"{x:.{_decimals(x, digits)}f}"


def format_estimate(e: Estimate | None, unit: str = "") -> str:
    if e is None:
        return "–"
    d = _decimals(e.mean)
    text = f"{e.mean:.{d}f}"
    if not math.isnan(e.half_width):
        text += f" ± {e.half_width:.{d}f}"
    return text + unit


def _fmt_ratio(r: float | None) -> str:
    return "" if r is None else f" ({r:.2f}×)"


_SOURCE = {
    "eval": "held-out greedy",
    "train": f"train reward/accuracy, last {FINAL_TRAIN_FRACTION:.0%} of steps",
    "mixed": "mixed (see runs)",
}


# (what the ratio isolates, numerator variant, denominator variant)
DECOMPOSITION = (
    ("value head at matched updates", "ppo_head_matched", "grpo"),
    ("critic at matched updates", "ppo_critic_matched", "grpo"),
    ("PPO's extra epochs, value head", "ppo_head", "ppo_head_matched"),
    ("PPO's extra epochs, critic", "ppo_critic", "ppo_critic_matched"),
)


def _decomposition(groups: list[GroupSummary]) -> list[str]:
    """Step-time and peak-memory ratios that separate the value model from PPO's extra epochs.

    Written when the sweep has the objectives of :mod:`grpo_lab.objectives` by those names and
    no grid; each ratio is the mean of per-seed ratios (both arms of a seed ran on one machine).
    """
    if any(g.grid for g in groups):
        return []
    by = {g.variant: g for g in groups}

    def per_seed(g: GroupSummary, attr: str) -> dict[int, float | None]:
        return {r.seed: getattr(r, attr) for r in g.runs}

    rows = []
    for what, num, den in DECOMPOSITION:
        if num in by and den in by:
            cells = [what, f"`{num}` / `{den}`"]
            for attr in ("median_step_s", "peak_mem_gib"):
                e = paired_ratio(per_seed(by[num], attr), per_seed(by[den], attr))
                cells.append(format_estimate(e, "×"))
            rows.append(cells)
    if not rows:
        return []
    return [
        "",
        "## What the cost is made of",
        "",
        *markdown_table(["isolates", "ratio", "median step time", "peak memory"], rows),
        "",
        "Each ratio is the mean over seeds of the per-seed ratio. `*_matched` is PPO at GRPO's "
        "one epoch x one minibatch per batch (`grpo_lab/objectives.py`), so over `grpo` it is "
        "the value model's cost at equal updates, and the standard recipe over it is the cost of "
        "PPO's extra epochs.",
    ]


def _report(s: SweepSummary, plot_note: str | None) -> str:
    """report.md: its sections in order, each a list of Markdown lines."""
    lines = [
        *_intro(s),
        *_result(s),
        *_decomposition(s.groups),
        *_time_per_phase(s.groups),
        *_memory(s.groups),
        *_throughput(s.groups),
        *_plots(s.plots, plot_note),
        *_runs(s.runs),
        *_how_it_was_run(s),
    ]
    return "\n".join(lines) + "\n"


def _intro(s: SweepSummary) -> list[str]:
    """Title, then what was run and how to read the numbers."""
    n_finished = sum(r.status == "finished" for r in s.runs)
    seeds = sorted({r.seed for r in s.runs})
    conf = f"{CONFIDENCE:.0%}"
    return [
        f"# Sweep `{s.name}`",
        "",
        f"{len(s.groups)} configurations ({', '.join(f'`{g.group}`' for g in s.groups)}), "
        f"seeds {', '.join(map(str, seeds))}: {n_finished} of {len(s.runs)} runs finished. "
        f"Values are the mean over seeds ± the half-width of a {conf} Student-t confidence "
        "interval (no interval for a single seed); the ratio in brackets is the mean divided by "
        f"the baseline **{s.baseline}**'s mean at the same grid point.",
        "",
    ]


def _memory_definition(groups: list[GroupSummary]) -> str:
    """What "peak memory" means for these groups: CUDA allocation, RSS, or a mix."""
    kinds = {g.peak_mem_kind for g in groups}
    if kinds == {"cuda"}:
        return "CUDA peak allocated memory over the run"
    if kinds == {"cpu"}:
        return "process peak resident memory (RSS) over the run"
    return "CUDA peak allocated where available, else peak RSS"


def _result(s: SweepSummary) -> list[str]:
    """The result table (memory, step time, accuracy, time to target) and its definitions."""
    target = s.target_accuracy
    head = [
        "objective",
        "seeds",
        "peak memory (GiB)",
        "median step time (s)",
        "final accuracy",
        "accuracy from",
    ]
    if target is not None:
        head += [f"steps to {target:g}", f"wall-clock to {target:g} (s)"]
    rows = []
    for g in s.groups:
        m, r = g.metrics, g.ratios
        name = f"**{g.group}** (baseline)" if g.variant == s.baseline else f"**{g.group}**"
        row = [
            name,
            str(g.n_seeds),
            format_estimate(m["peak_mem_gib"]) + _fmt_ratio(r["peak_mem_gib"]),
            format_estimate(m["step_time_s"]) + _fmt_ratio(r["step_time_s"]),
            format_estimate(m["final_acc"]) + _fmt_ratio(r["final_acc"]),
            _SOURCE.get(g.final_acc_source, "–"),
        ]
        if target is not None:
            row += [_to_target(g, key) for key in ("target_steps", "target_wall_s")]
        rows.append(row)
    lines = ["## Result", "", *markdown_table(head, rows)]
    lines += [
        "",
        f"- *Peak memory*: {_memory_definition(s.groups)}.",
        "- *Median step time*: the median of a run's `time/step_s`.",
        "- *Final accuracy*: the run's end-of-run held-out greedy accuracy (`eval/greedy_acc`) "
        f"when it was evaluated, else the mean `reward/accuracy` of its last "
        f"{FINAL_TRAIN_FRACTION:.0%} of steps (training samples, not held out).",
    ]
    if target is not None:
        lines.append(
            f"- *To {target:g}*: the first step whose trailing {TARGET_WINDOW}-step mean of "
            "`reward/accuracy` reaches the target, and the run's cumulative step time "
            "(`time/total_s`) there. When only some seeds got there, the mean is over those "
            "(shown as [k/n seeds]), which flatters the configuration."
        )
    return lines


def _to_target(g: GroupSummary, key: str) -> str:
    """A steps- or seconds-to-target cell: mean over the seeds that got there, and how many."""
    if g.target_reached == 0:
        return "not reached"
    partial = "" if g.target_reached == g.n_seeds else f" [{g.target_reached}/{g.n_seeds} seeds]"
    return format_estimate(g.metrics[key]) + _fmt_ratio(g.ratios[key]) + partial


def _time_per_phase(groups: list[GroupSummary]) -> list[str]:
    """Seconds per step in each timed phase, with its share of the mean step."""
    lines = ["", "## Time per step by phase", ""]
    phases = phase_sorted(p for g in groups for p in g.phase_s)
    if not phases:
        return [*lines, "No per-phase timings were logged."]
    rows = []
    for g in groups:
        total = g.metrics["step_time_s"]
        mean_total = sum(e.mean for e in g.phase_s.values()) + (g.other_s.mean if g.other_s else 0)
        cells = [g.group]
        for p in phases:
            e = g.phase_s.get(p)
            share = f" ({e.mean / mean_total:.0%})" if e and mean_total > 0 else ""
            cells.append(format_estimate(e) + share)
        cells += [format_estimate(g.other_s), _fmt(mean_total), format_estimate(total)]
        rows.append(cells)
    lines += markdown_table(["objective", *phases, "other", "mean step", "median step"], rows)
    return [
        *lines,
        "",
        "Seconds per step, mean over steps (a phase that did not run counts 0 s) "
        "then over seeds; *other* is step time outside every timed phase.",
    ]


def _memory(groups: list[GroupSummary]) -> list[str]:
    """Peak memory, reserved memory, per-phase peaks and static sizes per group."""
    peak_phases = phase_sorted(p for g in groups for p in g.phase_peak_gib)
    static = sorted({k for g in groups for k in g.static_gib})
    reserved = any(x.peak_reserved_gib for x in groups)
    rows = []
    for g in groups:
        cells = [
            g.group,
            format_estimate(g.metrics["peak_mem_gib"]) + _fmt_ratio(g.ratios["peak_mem_gib"]),
        ]
        if reserved:
            cells.append(format_estimate(g.peak_reserved_gib))
        cells += [format_estimate(g.phase_peak_gib.get(p)) for p in peak_phases]
        cells += [format_estimate(g.static_gib.get(k)) for k in static]
        rows.append(cells)
    head = ["objective", "peak (GiB)"]
    if reserved:
        head.append("peak reserved")
    head += [f"{p} peak" for p in peak_phases] + [f"static {k}" for k in static]
    notes = [f"*Peak*: {_memory_definition(groups)}."]
    if peak_phases:
        notes.append("*<phase> peak*: the highest CUDA allocation while that phase ran.")
    if static:
        notes.append(
            "*static*: parameter, gradient and optimizer-state sizes of each model after step 1."
        )
    return ["", "## Memory", "", *markdown_table(head, rows), "", " ".join(notes)]


_RATES = {
    "gen_tokens_per_s": "generated tokens per rollout second",
    "train_tokens_per_s": "trained tokens per update second",
    "samples_per_s": "sequences per step second",
    "mfu": "model FLOPs utilisation",
}


def _throughput(groups: list[GroupSummary]) -> list[str]:
    """Each logged rate (tokens, samples per second, MFU) per group, with its meaning."""
    lines = ["", "## Throughput", ""]
    rate_keys = [k for k in _RATES if any(g.metrics.get(k) for g in groups)]
    if not rate_keys:
        return [*lines, "No throughput was logged."]
    rows = [
        [g.group, *(format_estimate(g.metrics[k]) + _fmt_ratio(g.ratios[k]) for k in rate_keys)]
        for g in groups
    ]
    return [
        *lines,
        *markdown_table(["objective", *rate_keys], rows),
        "",
        "; ".join(f"*{k}*: {_RATES[k]}" for k in rate_keys) + ". Mean over steps, then over seeds.",
    ]


_CAPTIONS = {
    "reward_vs_step.png": "Training accuracy (or reward) against optimizer step",
    "reward_vs_wallclock.png": "The same against wall-clock (mean cumulative step time at each step)",
    "memory_per_phase.png": "Peak memory",
    "step_time.png": "Step time by phase",
    "tokens_per_s.png": "Throughput",
}


def _plots(plots: list[Path], plot_note: str | None) -> list[str]:
    """The plots as images, or why there are none."""
    lines = ["", "## Plots", ""]
    for p in plots:
        lines += [f"![{_CAPTIONS.get(p.name, p.stem)}]({p.name})", ""]
    if plot_note:
        lines += [plot_note, ""]
    if not plots and not plot_note:
        lines += ["Nothing to plot.", ""]
    return lines


def _runs(runs: list[RunStats]) -> list[str]:
    """Every planned or found run, finished or not, with its own numbers."""
    rows = [
        [
            f"`{r.group}/seed{r.seed}`",
            r.status,
            str(r.steps),
            _fmt(r.total_s),
            _fmt(r.median_step_s),
            _fmt(r.final_acc) + (f" ({r.final_acc_source})" if r.final_acc_source else ""),
            "–" if r.target is None else str(r.target.step),
        ]
        for r in runs
    ]
    head = [
        "run",
        "status",
        "steps",
        "total step time (s)",
        "median step (s)",
        "final accuracy",
        "step at target",
    ]
    return [
        "## Runs",
        "",
        *markdown_table(head, rows),
        "",
        f"Only *finished* runs enter the tables above; a failed run's output is in its `{LOG}`.",
    ]


def _how_it_was_run(s: SweepSummary) -> list[str]:
    """The sweep command, file and run commands from the manifest, else the runs' configs."""
    lines = ["", "## How it was run", ""]
    if not s.manifest:
        return [
            *lines,
            "No manifest.json (the runs were not started by `grpo-lab sweep`); each run's "
            "resolved config is its `config.yaml`:",
            "",
            *(f"- `{r.dir / 'config.yaml'}`" for r in s.runs),
        ]
    m = s.manifest
    extra = m["spec"].get("extra_overrides") or []
    return [
        *lines,
        f"From `{m['cwd']}`: `grpo-lab sweep {m['sweep_file']}"
        f"{' ' + shlex.join(extra) if extra else ''}`. The sweep file:",
        "",
        "```yaml",
        m["sweep_text"].rstrip(),
        "```",
        "",
        "Each run's command:",
        "",
        "```bash",
        *(shlex.join(r["command"]) for r in m["runs"]),
        "```",
        "",
        "A rerun of a started run adds `resume=auto`. Each run's resolved config is "
        "its `config.yaml`.",
    ]


def markdown_table(head: list[str], rows: list[list[str]]) -> list[str]:
    def esc(cell: str) -> str:
        return cell.replace("|", "\\|")

    out = ["| " + " | ".join(map(esc, head)) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(map(esc, row)) + " |" for row in rows]
    return out
