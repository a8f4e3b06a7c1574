"""docs/answer.md: the answer paragraph, then tables and plots, then workload W.

:func:`write_document` takes the measurements (:mod:`.measure`) and their numbers
(:mod:`.analysis`) and writes the Markdown file, its plots and ``answer.csv`` (one row per quoted
figure) into the folder beside it. Nothing here measures anything.
"""

from __future__ import annotations

import csv
import math
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpo_lab.answer import analysis as an
from grpo_lab.objectives import LABELS
from grpo_lab.sweep import Estimate, GroupSummary, SweepSummary, plot_metric_curves
from grpo_lab.sweep.report import format_estimate, markdown_table
from grpo_lab.sweep.summary import phase_sorted

W_COMMAND = (
    "python benchmarks/step_bench.py --preset w0.5b "
    "--impls trl,grpo,ppo_head_matched,ppo_critic_matched"
)
SKIP_ARMS = ("grpo", "grpo_all_rows")  # the zero-advantage sweep: skipping, every row
W_HEADING = re.compile(r"^##+\s+Workload W\b", re.IGNORECASE)


@dataclass
class Inputs:
    """Everything the document is written from."""

    machine: str
    date: str
    load: tuple[
        float, float
    ]  # highest load average (1 min) at the start / end of a measuring invocation
    cores: int
    benefit: SweepSummary
    skipping: SweepSummary
    benches: list[dict[str, Any]]
    results_md: Path  # benchmarks/RESULTS.md
    command: str
    runs: Path  # where the measurements live


def pct(x: float | None) -> str:
    return "–" if x is None or math.isnan(x) else f"{100 * x:.1f}%"


def est_pct(e: Estimate | None) -> str:
    """An accuracy estimate in percent (points) with its interval."""
    if e is None:
        return "–"
    text = f"{100 * e.mean:.1f}"
    if not math.isnan(e.half_width):
        text += f" ± {100 * e.half_width:.1f}"
    return text + "%"


def est_x(e: Estimate | None) -> str:
    """A ratio estimate: 1.23× (95% CI 1.10–1.36)."""
    if e is None:
        return "–"
    if math.isnan(e.half_width):
        return f"{e.mean:.2f}×"
    return f"{e.mean:.2f}× (CI {e.mean - e.half_width:.2f}–{e.mean + e.half_width:.2f})"


def x(r: float | None) -> str:
    return "–" if r is None else f"{r:.2f}×"


def label(variant: str) -> str:
    return LABELS.get(variant, variant)


class Figures:
    """Quoted figures, kept for answer.csv as they are written into the text."""

    def __init__(self) -> None:
        self.rows: list[list[Any]] = []

    def add(self, quantity: str, e: Estimate | float | None, source: str) -> None:
        if isinstance(e, Estimate):
            self.rows.append([quantity, e.mean, e.half_width, e.n, source])
        elif e is not None:
            self.rows.append([quantity, e, "", 1, source])

    def write(self, path: Path) -> None:
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["quantity", "mean", "ci95_half_width", "n", "source"])
            for row in self.rows:
                w.writerow(["" if isinstance(v, float) and math.isnan(v) else v for v in row])


def workload_w(results_md: Path) -> tuple[str | None, list[str]]:
    """The ``## Workload W`` section of RESULTS.md when it holds a measurement, else None.

    A measurement is a section whose body names ``Device:`` and ``Date:`` (one line each) and
    holds a table; its body is copied. Returns (device, lines) or (None, []).
    """
    if not results_md.is_file():
        return None, []
    lines = results_md.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if W_HEADING.match(line):
            level = len(line) - len(line.lstrip("#"))
            body = []
            for nxt in lines[i + 1 :]:
                if nxt.startswith("#") and len(nxt) - len(nxt.lstrip("#")) <= level:
                    break
                body.append(nxt)
            device = next((b.split(":", 1)[1].strip() for b in body if b.startswith("Device:")), "")
            dated = any(b.startswith("Date:") for b in body)
            if device and dated and any(b.startswith("|") for b in body):
                return device, body
    return None, []


def write_document(inp: Inputs, out: Path) -> Path:
    """Write ``out`` (docs/answer.md), and plots plus CSVs into ``out``'s sibling folder.

    The numbers are computed once (:func:`_numbers`); each section is a function returning its
    Markdown lines, in the order they appear.
    """
    assets = out.with_suffix("")
    assets.mkdir(parents=True, exist_ok=True)
    n = _numbers(inp)
    sections = [
        _answer(inp, n),
        _cost_per_step(inp, n, assets.name),
        _zero_advantage_rows(n, assets),
        _learning(n, assets.name),
        _baseline_quality(n, assets),
        _workload_w_section(inp.results_md),
        _how_it_was_made(inp, n, assets.name),
    ]
    _copy_sweep_files(inp.benefit.output_dir, assets)
    _quoted_figures(n).write(assets / "answer.csv")
    lines = [line for section in sections for line in section]
    out.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return out


@dataclass
class Numbers:
    """What the document quotes, computed once from the measurements by :mod:`.analysis`.

    Ratios between objectives are paired by seed: ``time_*`` of median step time, ``static_*``
    of static memory, ``rss_*`` of peak RSS, all over GRPO; ``epochs_*`` is the standard PPO
    recipe over its matched-update variant (the cost of PPO's extra epochs).
    """

    facts: list[an.RunFacts]  # benefit sweep
    skip_facts: list[an.RunFacts]  # zero-advantage sweep
    arms: list[an.BenchArm]  # step benchmark
    variants: list[str]  # the benefit sweep's objectives, in its order
    groups: dict[str, GroupSummary]
    seeds: list[int]
    target: float | None  # training accuracy to reach
    budget: float  # seconds of training per run
    time_head: Estimate | None
    time_critic: Estimate | None
    time_head_std: Estimate | None
    time_critic_std: Estimate | None
    epochs_head: Estimate | None
    epochs_critic: Estimate | None
    static_head: Estimate | None
    static_critic: Estimate | None
    rss_head: Estimate | None
    rss_critic: Estimate | None
    # zero-advantage sweep: GRPO's share of zero-std groups, update time per arm, their ratio
    zero_std: Estimate | None
    update_s: dict[str, Estimate | None]
    update_ratio: Estimate | None
    step_ratio_all_rows: Estimate | None
    bins: list[an.SkipBin]
    # benefit sweep, per objective
    gains: dict[str, Estimate | None]
    afters: dict[str, Estimate | None]
    before: Estimate | None
    steps_in_budget: dict[str, Estimate | None]
    evs: dict[str, an.ExplainedVariance | None]


def _numbers(inp: Inputs) -> Numbers:
    """Every number the document quotes, from the two sweeps and the step benchmark."""
    facts = an.run_facts(inp.benefit)
    skip_facts = an.run_facts(inp.skipping)
    variants = [g.variant for g in inp.benefit.groups]

    def ratio(variant: str, baseline: str, attr: str) -> Estimate | None:
        return an.paired(facts, variant, baseline, attr)

    def each(attr: str) -> dict[str, Estimate | None]:
        return {v: an.over_seeds(facts, v, attr) for v in variants}

    return Numbers(
        facts=facts,
        skip_facts=skip_facts,
        arms=an.bench_arms(inp.benches),
        variants=variants,
        groups={g.variant: g for g in inp.benefit.groups},
        seeds=sorted({f.seed for f in facts}),
        target=inp.benefit.target_accuracy,
        budget=_budget(inp.benefit),
        time_head=ratio("ppo_head_matched", "grpo", "median_step_s"),
        time_critic=ratio("ppo_critic_matched", "grpo", "median_step_s"),
        time_head_std=ratio("ppo_head", "grpo", "median_step_s"),
        time_critic_std=ratio("ppo_critic", "grpo", "median_step_s"),
        epochs_head=ratio("ppo_head", "ppo_head_matched", "median_step_s"),
        epochs_critic=ratio("ppo_critic", "ppo_critic_matched", "median_step_s"),
        static_head=ratio("ppo_head_matched", "grpo", "static_gib"),
        static_critic=ratio("ppo_critic_matched", "grpo", "static_gib"),
        rss_head=ratio("ppo_head_matched", "grpo", "peak_rss_gib"),
        rss_critic=ratio("ppo_critic_matched", "grpo", "peak_rss_gib"),
        zero_std=an.per_step_estimate(skip_facts, "grpo", "reward/zero_std_groups"),
        update_s={a: an.per_step_estimate(skip_facts, a, "time/update_s") for a in SKIP_ARMS},
        update_ratio=an.paired_per_step(skip_facts, "grpo", "grpo_all_rows", "time/update_s"),
        step_ratio_all_rows=an.paired(skip_facts, "grpo_all_rows", "grpo", "median_step_s"),
        bins=an.skip_bins(skip_facts, SKIP_ARMS),
        gains=each("heldout_gain"),
        afters=each("heldout_after"),
        before=an.over_seeds(facts, "grpo", "heldout_before"),
        steps_in_budget=each("steps"),
        evs={v: an.explained_variance(facts, v) for v in variants},
    )


def _quoted_figures(n: Numbers) -> Figures:
    """answer.csv: every figure the text quotes, with its interval and where it comes from."""
    figs = Figures()
    for name, e in [
        ("step time ratio ppo_head_matched/grpo (sweep)", n.time_head),
        ("step time ratio ppo_critic_matched/grpo (sweep)", n.time_critic),
        ("step time ratio ppo_head/grpo (sweep)", n.time_head_std),
        ("step time ratio ppo_critic/grpo (sweep)", n.time_critic_std),
        ("step time ratio ppo_head/ppo_head_matched (extra epochs)", n.epochs_head),
        ("step time ratio ppo_critic/ppo_critic_matched (extra epochs)", n.epochs_critic),
        ("static memory ratio ppo_head_matched/grpo", n.static_head),
        ("static memory ratio ppo_critic_matched/grpo", n.static_critic),
        ("peak RSS ratio ppo_head_matched/grpo", n.rss_head),
        ("peak RSS ratio ppo_critic_matched/grpo", n.rss_critic),
    ]:
        figs.add(name, e, "benefit sweep, paired by seed")
    for a in n.arms:
        figs.add(f"step time ratio {a.objective}/grpo ({a.run})", a.time_ratio, "step_bench")
        figs.add(f"memory ratio {a.objective}/grpo ({a.run})", a.memory_ratio, "step_bench")
    figs.add("fraction of zero-std groups (GRPO, tiny)", n.zero_std, "zero-advantage sweep")
    figs.add("update time ratio grpo/grpo_all_rows", n.update_ratio, "zero-advantage sweep")
    figs.add("step time ratio grpo_all_rows/grpo", n.step_ratio_all_rows, "zero-advantage sweep")
    for v in n.variants:
        figs.add(f"held-out greedy gain {v} ({n.budget} s budget)", n.gains[v], "benefit sweep")
        figs.add(f"held-out greedy after {v}", n.afters[v], "benefit sweep")
        g = n.groups[v]
        figs.add(f"steps to {n.target} {v}", g.metrics.get("target_steps"), "benefit sweep")
        figs.add(f"seconds to {n.target} {v}", g.metrics.get("target_wall_s"), "benefit sweep")
    for v, e in n.evs.items():
        if e is not None:
            figs.add(f"explained variance early {v}", e.early, "benefit sweep")
            figs.add(f"explained variance late {v}", e.late, "benefit sweep")
    return figs


def _reach(n: Numbers, v: str, key: str, unit: str) -> str:
    """Steps or seconds to the target accuracy, with how many seeds got there when not all."""
    g = n.groups.get(v)
    if g is None or g.target_reached == 0:
        return "not reached"
    part = "" if g.target_reached == g.n_seeds else f" [{g.target_reached}/{g.n_seeds} seeds]"
    return format_estimate(g.metrics[key]) + unit + part


def _answer(inp: Inputs, n: Numbers) -> list[str]:
    """Title, the conditions of the measurement, and the answer paragraph."""
    noisy = max(inp.load) > 0.75 * inp.cores
    if noisy:
        conditions = (
            f"; the CPU was shared with other jobs (load average up to {inp.load[0]:.1f} at the "
            f"start, {inp.load[1]:.1f} at the end, on {inp.cores} cores), so absolute times are "
            "noisy and the ratios' intervals are wide.*"
        )
    else:
        conditions = f"; load average {inp.load[0]:.1f} → {inp.load[1]:.1f} on {inp.cores} cores.*"
    return [
        "# What does PPO's value model really cost over GRPO?",
        "",
        f"*Generated by `{inp.command}` on a {inp.machine}, {inp.date}" + conditions,
        "",
        _answer_paragraph(n),
        "",
        "Memory on this 125k-parameter model is dominated by the Python process itself, so the "
        "peak-RSS ratios are near 1 whatever the objective; the static footprint is the part "
        "that scales with the model. Workload W (below) is where the memory half of the "
        "question is decided.",
        "",
    ]


def _answer_paragraph(n: Numbers) -> str:
    """The answer in one paragraph: cost at matched and standard updates, skipping, benefit."""
    return (
        f"**Answer (embedded tiny arithmetic task, {len(n.seeds)} seeds, 95 % CIs).** "
        f"At matched updates (one epoch, one minibatch per rollout batch, as GRPO), PPO with a "
        f"value head on the shared trunk takes {est_x(n.time_head)} GRPO's step time and "
        f"{est_x(n.static_head)} its static memory (parameters, gradients, optimizer state; "
        f"process peak RSS {est_x(n.rss_head)}); a separate critic takes {est_x(n.time_critic)} "
        f"the time and {est_x(n.static_critic)} the static memory.{_bench_note(n.arms)} "
        f"At the recipes' standard settings (2 epochs × 2 minibatches) PPO-head takes "
        f"{est_x(n.time_head_std)} and PPO-critic {est_x(n.time_critic_std)} GRPO's step time; "
        f"PPO's extra epochs alone account for {est_x(n.epochs_head)} (head) and "
        f"{est_x(n.epochs_critic)} (critic). "
        f"Part of GRPO's lead is its group baseline: at this task's {est_pct(n.zero_std)} of "
        f"groups with all-equal rewards, skipping their rows makes GRPO's update take "
        f"{est_x(n.update_ratio)} the time of running every row{_bin_note(n.bins)}. Per step, "
        f"GRPO reaches a training accuracy of {n.target:g} in "
        f"{_reach(n, 'grpo', 'target_steps', ' steps')} against "
        f"{_reach(n, 'ppo_head_matched', 'target_steps', ' steps')} for matched PPO-head; per "
        f"second, in {_reach(n, 'grpo', 'target_wall_s', ' s')} against "
        f"{_reach(n, 'ppo_head_matched', 'target_wall_s', ' s')}. With the same {n.budget:g} s "
        f"of training each, held-out greedy accuracy goes from {est_pct(n.before)} to "
        + ", ".join(f"{est_pct(n.afters[v])} ({label(v)})" for v in n.variants)
        + "."
    )


def _bench_note(arms: list[an.BenchArm]) -> str:
    """The step benchmark's matched-update ratios, as a sentence (memory only beyond tiny)."""
    bh = next((a for a in arms if a.objective == "ppo_head_matched"), None)
    bc = next((a for a in arms if a.objective == "ppo_critic_matched"), None)
    if bh is None:
        return ""
    if bh.preset == "tiny":
        # The tiny preset's memory figure (an RSS difference of a few MiB) does not compare.
        return (
            f" In the step benchmark (`step_bench --preset tiny`, one run) the head costs "
            f"{x(bh.time_ratio)} GRPO's step time"
            + (f", the critic {x(bc.time_ratio)}" if bc is not None else "")
            + "."
        )
    return (
        f" In the step benchmark (`step_bench --preset {bh.preset}`, one run) the head costs "
        f"{x(bh.time_ratio)} GRPO's step time and {x(bh.memory_ratio)} its memory"
        + (f", the critic {x(bc.time_ratio)} and {x(bc.memory_ratio)}" if bc is not None else "")
        + "."
    )


def _bin_note(bins: list[an.SkipBin]) -> str:
    """Skipping's update-time ratio at the fewest and the most zero-std groups."""
    if len(bins) < 2:
        return ""
    lo, hi = bins[0], bins[-1]
    return (
        f" ({x(lo.update_s['grpo'] / lo.update_s['grpo_all_rows'])} in steps with "
        f"{pct(lo.fraction)} such groups, "
        f"{x(hi.update_s['grpo'] / hi.update_s['grpo_all_rows'])} with {pct(hi.fraction)})"
    )


def _cost_per_step(inp: Inputs, n: Numbers, rel: str) -> list[str]:
    """Section 1: the step benchmark (when run), then every objective of the benefit sweep."""
    lines = ["## 1. Cost per step", ""]
    if n.arms:
        lines += _step_benchmark(inp.benches, n.arms)
    lines += [
        "### Tiny task, every objective with the same budget",
        "",
        f"From the benefit sweep ({len(n.seeds)} seeds): the median step time of each run, as a "
        "ratio to GRPO's run of the same seed; static memory is parameters + gradients + "
        "optimizer state of every model.",
        "",
    ]
    rows = []
    for v in n.variants:
        row = [label(v)]
        for attr in ("median_step_s", "static_gib", "peak_rss_gib"):
            row += [
                format_estimate(an.over_seeds(n.facts, v, attr)),
                est_x(an.paired(n.facts, v, "grpo", attr)),
            ]
        rows.append(row)
    head = ["objective", "median step (s)", "× GRPO", "static memory (GiB)", "× GRPO"]
    lines += markdown_table([*head, "peak RSS (GiB)", "× GRPO"], rows)
    return [
        *lines,
        "",
        f"PPO's extra epochs (standard ÷ matched, same value model): head "
        f"{est_x(n.epochs_head)}, critic {est_x(n.epochs_critic)}.",
        "",
        f"![Step time by phase]({rel}/step_time.png)",
        "",
    ]


def _step_benchmark(benches: list[dict[str, Any]], arms: list[an.BenchArm]) -> list[str]:
    """Each step_bench implementation's step time, memory and phases, and the commands."""
    lines = [
        "### Step benchmark",
        "",
        "Ratios within one run of `benchmarks/step_bench.py`, against that run's GRPO "
        "(`--rounds` alternate the order of the implementations).",
        "",
    ]
    phases = phase_sorted(p for a in arms for p in a.phases_s)
    rows = [
        [
            f"`{a.run}`",
            label(a.objective),
            "–" if a.step_s is None else f"{a.step_s:.4f}",
            x(a.time_ratio),
            "–" if a.mem_gib is None else f"{a.mem_gib:.3f}",
            x(a.memory_ratio),
            *(f"{a.phases_s[p]:.4f}" if p in a.phases_s else "–" for p in phases),
        ]
        for a in arms
    ]
    head = ["run", "objective", "median step (s)", "× GRPO", "memory (GiB)", "× GRPO"]
    lines += markdown_table(head + [f"{p} (s)" for p in phases], rows)
    metrics = {str(b.get("memory_metric", "")) for b in benches} - {""}
    memory = "Memory: " + ("; ".join(sorted(metrics)) or "as step_bench reports it") + "."
    if any(a.preset == "tiny" for a in arms):
        memory += (
            " At the tiny preset that is a few MiB of allocator noise in one shared process, "
            "so its memory ratios do not compare; the static footprint below does."
        )
    lines += ["", memory]
    for b in benches:
        found = _zero_std_fields(b)
        if found:
            lines += [
                "",
                f"`{b.get('bench_run', '')}` records its groups with all-equal rewards: "
                + ", ".join(f"`{k}` = {v}" for k, v in found.items())
                + ".",
            ]
    lines += ["", "Commands:", "", "```bash"]
    lines += [shlex.join(["python", *b.get("argv", [])]) for b in benches]
    return [*lines, "```", ""]


def _zero_advantage_rows(n: Numbers, assets: Path) -> list[str]:
    """Section 2: GRPO with and without skipping the rows of all-equal-reward groups."""
    skip_seeds = len({f.seed for f in n.skip_facts})
    lines = [
        "## 2. What GRPO saves by skipping zero-advantage rows",
        "",
        "A group whose rewards are all equal has advantage exactly 0 under GRPO's group "
        "baseline, so its rows contribute no gradient and grpo_lab skips their forward and "
        "backward passes; PPO's learned baseline gives those rows non-zero advantages, so it "
        "never can. GRPO as shipped against GRPO running every row "
        f"(`trainer.skip_zero_advantage=false`), {skip_seeds} seeds:",
        "",
    ]
    rows = [
        [
            label(a) if a in LABELS else f"`{a}`",
            est_pct(an.per_step_estimate(n.skip_facts, a, "reward/zero_std_groups")),
            est_pct(an.per_step_estimate(n.skip_facts, a, "update/zero_advantage_rows_skipped")),
            format_estimate(n.update_s[a]),
            format_estimate(an.over_seeds(n.skip_facts, a, "median_step_s")),
        ]
        for a in SKIP_ARMS
    ]
    lines += markdown_table(
        ["arm", "zero-std groups", "rows skipped", "update (s)", "median step (s)"], rows
    )
    if n.bins:
        lines += _skip_bins(n.bins, assets)
    return [
        *lines,
        "",
        "Without skipping, the update's cost is the same whatever the rewards; with it, the "
        "update shrinks in proportion to the fraction of groups with signal, plus a fixed part.",
        "",
    ]


def _skip_bins(bins: list[an.SkipBin], assets: Path) -> list[str]:
    """Update time by the step's fraction of zero-std groups: a table and its plot."""
    lines = [
        "",
        "By the step's fraction of zero-std groups (steps pooled over seeds; fractions with "
        "at least 20 steps in both arms):",
        "",
    ]
    lines += markdown_table(
        ["zero-std groups", "steps", "update skipping (s)", "update all rows (s)", "ratio"],
        [
            [
                pct(b.fraction),
                f"{b.steps['grpo']} / {b.steps['grpo_all_rows']}",
                f"{b.update_s['grpo']:.4f}",
                f"{b.update_s['grpo_all_rows']:.4f}",
                x(b.update_s["grpo"] / b.update_s["grpo_all_rows"]),
            ]
            for b in bins
        ],
    )
    records = {
        "GRPO, zero-advantage rows skipped": [
            {"zero-std fraction": b.fraction, "update s": b.update_s["grpo"]} for b in bins
        ],
        "GRPO, every row": [
            {"zero-std fraction": b.fraction, "update s": b.update_s["grpo_all_rows"]} for b in bins
        ],
    }
    path = assets / "update_vs_zero_std.png"
    if plot_metric_curves(records, ["update s"], path, x="zero-std fraction"):
        lines += ["", f"![Update time against zero-std groups]({assets.name}/{path.name})"]
    return lines


def _learning(n: Numbers, rel: str) -> list[str]:
    """Section 3: held-out accuracy before / after the same budget, and time to the target."""
    lines = [
        "## 3. Learning per step and per second",
        "",
        f"Every run trains for the same {n.budget:g} s of step time (`trainer.max_time_s`; "
        "start-up and evaluation excluded), so the objectives differ in steps, not in compute: "
        "this is the equal-compute view. Held-out greedy accuracy is exact match on the 512 "
        f"held-out problems before and after; the target is a trailing 10-step mean training "
        f"accuracy of {n.target:g} (sampled at temperature 1).",
        "",
    ]
    rows = [
        [
            label(v),
            format_estimate(n.steps_in_budget[v]),
            est_pct(an.over_seeds(n.facts, v, "heldout_before")),
            est_pct(n.afters[v]),
            est_pct(n.gains[v]),
            _reach(n, v, "target_steps", ""),
            _reach(n, v, "target_wall_s", ""),
        ]
        for v in n.variants
    ]
    head = ["objective", "steps in budget", "held-out before", "held-out after", "gain (points)"]
    lines += markdown_table([*head, f"steps to {n.target:g}", f"seconds to {n.target:g}"], rows)
    return [
        *lines,
        "",
        "When only some seeds reached the target the mean is over those ([k/n seeds]), which "
        "flatters that objective.",
        "",
        f"![Training accuracy against optimizer step]({rel}/accuracy_vs_step.png)",
        "",
        f"![Training accuracy against wall-clock]({rel}/accuracy_vs_wallclock.png)",
        "",
    ]


def _baseline_quality(n: Numbers, assets: Path) -> list[str]:
    """Section 4: the value model's explained variance of the returns, early and late."""
    lines = [
        "## 4. Does the value model learn a useful baseline?",
        "",
        "Explained variance of the returns by the rollout's values, 1 − Var(returns − values) / "
        "Var(returns), over each batch's completion tokens (`value/explained_variance`). 1 is a "
        "perfect baseline; 0 is no better than the batch mean; below 0 is worse than the batch "
        "mean. Early / late: the first / last 10 % of each run's steps.",
        "",
    ]
    rows = [
        [label(v), format_estimate(e.early), format_estimate(e.late), est_pct(e.positive_late)]
        for v, e in n.evs.items()
        if e is not None
    ]
    lines += markdown_table(["objective", "early", "late", "late steps with EV > 0"], rows)
    records = {
        label(v): an.mean_curve(n.facts, v, an.EV_KEY, window=10) for v, e in n.evs.items() if e
    }
    path = assets / "explained_variance.png"
    if plot_metric_curves(
        records,
        [an.EV_KEY],
        path,
        title="Explained variance, 10-step moving average,\nmean over the seeds that got to each step (at least half)",
    ):
        lines += ["", f"![Explained variance over training]({assets.name}/{path.name})"]
    return [*lines, ""]


def _workload_w_section(results_md: Path) -> list[str]:
    """Section 5: workload W copied from RESULTS.md, or how to measure it."""
    device, body = workload_w(results_md)
    lines = ["## 5. Workload W (Qwen2.5-0.5B shape, one GPU)", ""]
    if device:
        return [*lines, f"From `benchmarks/RESULTS.md` (device: {device}):", "", *body, ""]
    return [
        *lines,
        "**Not measured yet.** Every figure above comes from a CPU; the memory half of the "
        "question (a 0.5B model's weights, gradients and optimizer state against the value "
        "head's few kilobytes or a second 0.5B critic) needs workload W on a GPU. Measure it "
        "with",
        "",
        "```bash",
        W_COMMAND,
        "```",
        "",
        "and record it in `benchmarks/RESULTS.md` under a `## Workload W` heading with "
        "`Device:` and `Date:` lines and the result table; `make answer` then copies it here.",
        "",
    ]


def _how_it_was_made(inp: Inputs, n: Numbers, rel: str) -> list[str]:
    """The command, the sweeps behind the numbers, and the CSVs beside the document."""
    return [
        "## How this was made",
        "",
        f"`{inp.command}` runs, skipping what is already finished under `{inp.runs}/`:",
        "",
        "- the step benchmark (commands above; its JSON is kept beside the runs);",
        f"- `grpo-lab sweep recipes/sweeps/answer_tiny.yaml` ({len(n.facts)} runs; its own "
        f"report is `{inp.benefit.report_path}`);",
        f"- `grpo-lab sweep recipes/sweeps/zero_advantage_tiny.yaml` ({len(n.skip_facts)} runs).",
        "",
        f"Per-objective tables: [`{rel}/summary.csv`]({rel}/summary.csv); every figure quoted "
        f"here with its interval: [`{rel}/answer.csv`]({rel}/answer.csv).",
        "",
    ]


def _copy_sweep_files(sweep_dir: Path, assets: Path) -> None:
    """The benefit sweep's accuracy and step-time plots and its summary.csv, renamed."""
    for name, target_name in (
        ("reward_vs_step.png", "accuracy_vs_step.png"),
        ("reward_vs_wallclock.png", "accuracy_vs_wallclock.png"),
        ("step_time.png", "step_time.png"),
        ("summary.csv", "summary.csv"),
    ):
        src = sweep_dir / name
        if src.is_file():
            shutil.copyfile(src, assets / target_name)


def _budget(summary: SweepSummary) -> float:
    spec = (summary.manifest or {}).get("spec", {})
    for item in [*spec.get("extra_overrides", [])][::-1]:
        if item.startswith("trainer.max_time_s="):
            return float(item.partition("=")[2])
    value = spec.get("overrides", {}).get("trainer.max_time_s")
    return float(value) if value is not None else math.nan


def _zero_std_fields(data: dict[str, Any], prefix: str = "", depth: int = 2) -> dict[str, Any]:
    """Scalar fields whose name mentions zero-std groups, two levels deep (results excluded)."""
    found: dict[str, Any] = {}
    for key, value in data.items():
        if key == "results":
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict) and depth > 1:
            found.update(_zero_std_fields(value, f"{name}.", depth - 1))
        elif "zero_std" in key and isinstance(value, int | float | str):
            found[name] = value
    return found
