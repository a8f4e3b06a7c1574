"""Sweeps: one recipe over objectives x grid points x seeds, compared in one report.

    grpo-lab sweep recipes/sweeps/grpo_vs_ppo_tiny.yaml [key=value ...] [--dry-run] [--report-only]

A sweep file names a base recipe, the *variants* to compare (each may switch recipe and add
overrides), an optional grid of dotted keys and the seeds. Every combination is one ordinary
training run, launched as its own subprocess (``python -m grpo_lab.train`` or, with ``launch``,
``accelerate launch --config_file LAUNCH -m grpo_lab.train``), one after another, into

    <output_dir>/<variant>[__<dotted.key>=<value>...]/seed<k>/

which holds the trainer's ``config.yaml``, ``metrics.jsonl`` and ``final/``, plus the sweep's
``train.log`` (the run's console output, appended per attempt) and a ``DONE`` or ``FAILED``
marker. Restarting a sweep skips finished runs (``DONE`` or ``final/``), reruns a started but
unfinished one with ``resume=auto`` and starts the others. Every run's config is loaded and
validated before the first one starts; a run that fails later does not stop the sweep, which then
exits non-zero listing the failures. At the end :func:`aggregate_sweep` writes ``report.md``,
``summary.csv`` and PNG plots into ``output_dir``.

Sweep file keys. Paths written in the file are relative to the file's folder; paths given on the
command line are relative to the current directory; ``output_dir`` is relative to the current
directory, like a recipe's.

    name             str; default: the file's stem
    output_dir       str; default ``runs/sweeps/<name>``
    base             the recipe every variant starts from (required)
    launch           null, or an accelerate config file to launch every run with
    seeds            non-empty list of distinct ints; default [0]
    overrides        {dotted.key: value} applied to every run; default {}
    variants         {name: {objective: name, recipe: path, overrides: {...}}}, all optional;
                     default {<base stem>: {}}. ``objective`` names one of
                     grpo_lab.objectives (grpo, ppo_head, ppo_head_matched, ...): its recipe
                     for the base's task (<task>_<objective>.yaml beside the base) and its
                     overrides, under the variant's own overrides
    grid             {dotted.key: [value, ...]}, cartesian product; default {}
    baseline         the variant every ratio is taken against; default the first variant
    target_accuracy  number in [0, 1] or null: report steps and wall-clock to reach it

The package, one module per job:

- :mod:`.plan`: the sweep file (:func:`load_sweep`) and its runs (:func:`plan_runs`);
- :mod:`.run`: running them (:func:`run_sweep`);
- :mod:`.stats`: confidence intervals, moving averages, time to target, ratios;
- :mod:`.summary`: each run's metrics and each variant's means over seeds (:class:`RunStats`,
  :class:`GroupSummary`) and ``summary.csv``;
- :mod:`.plots`: the PNG plots, and :func:`plot_metric_curves` for any metrics.jsonl records;
- :mod:`.report`: ``report.md`` (:func:`aggregate_sweep`).
"""

from grpo_lab.sweep.plan import (
    CLI_SWEEP_KEYS,
    DONE,
    FAILED,
    LOG,
    MANIFEST,
    RUN_OWNED_KEYS,
    SWEEP_KEYS,
    VARIANT_KEYS,
    RunPlan,
    SweepError,
    SweepSpec,
    Variant,
    check_runs,
    is_finished,
    load_sweep,
    plan_runs,
)
from grpo_lab.sweep.plots import plot_metric_curves
from grpo_lab.sweep.report import aggregate_sweep
from grpo_lab.sweep.run import SweepResult, run_command, run_sweep
from grpo_lab.sweep.stats import (
    CONFIDENCE,
    TARGET_WINDOW,
    Estimate,
    TargetHit,
    estimate,
    mean_ci,
    moving_average,
    paired_ratio,
    ratio,
    time_to_target,
)
from grpo_lab.sweep.summary import (
    FINAL_TRAIN_FRACTION,
    GroupSummary,
    RunStats,
    SweepSummary,
    read_metrics,
    summarise_run,
)

__all__ = [
    "CLI_SWEEP_KEYS",
    "CONFIDENCE",
    "DONE",
    "FAILED",
    "FINAL_TRAIN_FRACTION",
    "LOG",
    "MANIFEST",
    "RUN_OWNED_KEYS",
    "SWEEP_KEYS",
    "TARGET_WINDOW",
    "VARIANT_KEYS",
    "Estimate",
    "GroupSummary",
    "RunPlan",
    "RunStats",
    "SweepError",
    "SweepResult",
    "SweepSpec",
    "SweepSummary",
    "TargetHit",
    "Variant",
    "aggregate_sweep",
    "check_runs",
    "estimate",
    "is_finished",
    "load_sweep",
    "mean_ci",
    "moving_average",
    "paired_ratio",
    "plan_runs",
    "plot_metric_curves",
    "ratio",
    "read_metrics",
    "run_command",
    "run_sweep",
    "summarise_run",
    "time_to_target",
]
