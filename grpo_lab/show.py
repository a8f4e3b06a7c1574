"""``grpo-lab show RUN``: where a run is, and what its model writes.

Reads a run folder (finished or still being written) and prints

- its status: step out of ``trainer.max_steps``, reward, accuracy, entropy, KL, step time and
  memory at the start and now, with a sparkline of each over the run, held-out accuracy, time
  left at the recent step time;
- the latest completion samples (``samples.jsonl``): each prompt with its G completions, their
  status, reward, advantage, length and answer against the gold.

``--plot`` writes one PNG per curve (reward, accuracy, entropy, KL, clip fraction, step time,
memory) against steps into ``RUN/plots/``, drawn with :func:`grpo_lab.plots.line_plot`, the
helper the sweep report draws with. Metrics are read with ``MetricsWriter.read``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpo_lab.config import Config, load_config
from grpo_lab.harness import MetricsWriter, format_duration
from grpo_lab.plots import MISSING, Line, Panel, figure_class, line_plot
from grpo_lab.samples import SAMPLES_FILE
from grpo_lab.sweep import moving_average

SPARK = "▁▂▃▄▅▆▇█"
STATUS_STYLE = {
    "correct": "green",
    "wrong": "red",
    "no_answer": "yellow",
    "hedged": "magenta",
    "timeout": "bold red",
    "parse_error": "bold red",
}

# (label, metric keys: the first one present is shown, format)
STATUS_ROWS = (
    ("reward", ("reward/mean",), "{:.3f}"),
    ("accuracy (train)", ("reward/accuracy",), "{:.3f}"),
    ("completion length", ("rollout/completion_len_mean",), "{:.1f}"),
    ("truncated", ("rollout/truncated_frac",), "{:.2f}"),
    ("entropy", ("policy/entropy",), "{:.3f}"),
    ("KL to reference", ("policy/kl_ref",), "{:.4f}"),
    ("KL to behaviour", ("policy/approx_kl",), "{:.4f}"),
    ("clip fraction", ("policy/clipfrac",), "{:.3f}"),
    ("step time (s)", ("time/step_s",), "{:.2f}"),
    ("GPU peak allocated (GiB)", ("mem/peak_alloc_gib",), "{:.2f}"),
    ("process RSS (GiB)", ("mem/rss_gib",), "{:.2f}"),
)

# (file, title, y label, keys drawn when present, smoothed): noisy per-step curves get a moving
# average over the raw values; memory is drawn as logged.
PLOTS = (
    ("reward.png", "Reward", "reward/mean", ("reward/mean",), True),
    ("accuracy.png", "Accuracy", "accuracy", ("reward/accuracy", "eval/greedy_acc"), True),
    ("entropy.png", "Policy entropy", "nats / token", ("policy/entropy",), True),
    ("kl.png", "KL", "KL / token", ("policy/kl_ref", "policy/approx_kl"), True),
    ("clip_fraction.png", "Clip fraction", "fraction of tokens", ("policy/clipfrac",), True),
    ("step_time.png", "Step time", "seconds", ("time/step_s",), True),
    (
        "memory.png",
        "Memory",
        "GiB",
        ("mem/peak_alloc_gib", "mem/peak_reserved_gib", "mem/rss_gib", "mem/rss_peak_gib"),
        False,
    ),
)


class RunFolderError(ValueError):
    """The folder is not a run grpo-lab can show (the message says why and what to pass)."""


@dataclass
class Run:
    """What a run folder holds right now."""

    path: Path
    cfg: Config
    train: list[dict[str, Any]]  # training rows, by step
    evals: list[dict[str, Any]]  # held-out evaluation rows, by step
    samples: list[dict[str, Any]]  # the latest sampled step's records
    finished: bool  # final/ is written
    updated_s_ago: float | None  # since metrics.jsonl was last written

    @property
    def step(self) -> int:
        return self.train[-1]["step"] if self.train else 0


def load_run(path: str | Path) -> Run:
    """Read a run folder; :class:`RunFolderError` when it is not one."""
    path = Path(path)
    if not path.is_dir():
        raise RunFolderError(f"{path}: no such folder; pass a training run's output_dir")
    if not (path / "config.yaml").is_file():
        raise RunFolderError(
            f"{path} is not a run folder (no config.yaml); pass a training run's output_dir"
        )
    cfg = load_config(path / "config.yaml")
    metrics = path / "metrics.jsonl"
    rows, updated = [], None
    try:
        if metrics.is_file():
            rows = MetricsWriter.read(metrics)
            updated = max(0.0, time.time() - metrics.stat().st_mtime)
        samples_file = path / SAMPLES_FILE
        samples = MetricsWriter.read(samples_file) if samples_file.is_file() else []
    except ValueError as e:
        raise RunFolderError(str(e)) from None
    last = max((r["step"] for r in samples), default=None)
    return Run(
        path=path,
        cfg=cfg,
        train=[r for r in rows if "reward/mean" in r],
        evals=[r for r in rows if "eval/greedy_acc" in r],
        samples=[r for r in samples if r["step"] == last],
        finished=(path / "final").is_dir(),
        updated_s_ago=updated,
    )


def series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` over ``rows``, leaving out rows where it is absent or null."""
    pairs = [(r["step"], float(r[key])) for r in rows if isinstance(r.get(key), int | float)]
    return [s for s, _ in pairs], [v for _, v in pairs]


def sparkline(values: Sequence[float], width: int = 24) -> str:
    """``values`` in at most ``width`` characters (bucket means), scaled min..max."""
    if not values:
        return ""
    n = min(width, len(values))
    buckets = [values[i * len(values) // n : (i + 1) * len(values) // n] for i in range(n)]
    means = [sum(b) / len(b) for b in buckets]
    lo, hi = min(means), max(means)
    if hi - lo < 1e-12:
        return SPARK[3] * n
    return "".join(SPARK[round((m - lo) / (hi - lo) * (len(SPARK) - 1))] for m in means)


def status_renderables(run: Run) -> list[Any]:
    """The run's status: a header line and a table of metrics at the start and now."""
    from rich.table import Table
    from rich.text import Text

    cfg, total = run.cfg, run.cfg.trainer.max_steps
    state = (
        "finished"
        if run.finished
        else "no metrics yet"
        if run.updated_s_ago is None
        else f"in progress or stopped: last step written {format_duration(run.updated_s_ago)} ago"
    )
    head = Text.assemble(
        (f"{run.path}", "bold"),
        f"  {cfg.algorithm}"
        + (f" ({cfg.ppo.value})" if cfg.algorithm == "ppo" else "")
        + f" · {cfg.data.name} · {cfg.model.name_or_path}\n",
        (f"step {run.step} / {total}", "bold"),
        f"  ·  {state}",
    )
    out: list[Any] = [head]
    if not run.train:
        out.append(Text("No training step logged yet."))
        return out
    steps, step_s = series(run.train, "time/step_s")
    last = run.train[-1]
    line = []
    if isinstance(last.get("time/total_s"), int | float):
        line.append(f"elapsed {format_duration(last['time/total_s'])} of step time")
    if step_s and run.step < total:
        recent = sorted(step_s[-10:])[len(step_s[-10:]) // 2]
        line.append(
            f"about {format_duration(recent * (total - run.step))} left at {recent:.2f} s/step"
        )
    if line:
        out.append(Text("  ·  ".join(line)))

    window = max(1, min(10, len(run.train) // 4))
    table = Table(title=None, box=None, pad_edge=False, header_style="bold")
    table.add_column("metric")
    table.add_column(f"first {window}", justify="right")
    table.add_column(f"last {window}", justify="right")
    table.add_column("over the run")
    for label, keys, fmt in STATUS_ROWS:
        key = next((k for k in keys if series(run.train, k)[1]), None)
        if key is None:
            continue
        values = series(run.train, key)[1]
        first = sum(values[:window]) / len(values[:window])
        now = sum(values[-window:]) / len(values[-window:])
        table.add_row(label, fmt.format(first), fmt.format(now), sparkline(values))
    eval_steps, eval_acc = series(run.evals, "eval/greedy_acc")
    if eval_acc:
        n = int(run.evals[-1].get("eval/n") or 0)
        table.add_row(
            f"held-out greedy acc (n={n})",
            f"{eval_acc[0]:.3f} @{eval_steps[0]}",
            f"{eval_acc[-1]:.3f} @{eval_steps[-1]}",
            sparkline(eval_acc),
        )
    out.append(table)
    return out


def _clip(text: str, limit: int) -> str:
    """One line: newlines shown as ⏎; longer than ``limit`` keeps the start and the end."""
    text = text.replace("\n", "⏎")
    if len(text) <= limit:
        return text
    head = limit // 3
    return text[:head] + " … " + text[-(limit - head - 3) :]


def samples_renderables(records: Sequence[dict[str, Any]], *, chars: int = 240) -> list[Any]:
    """The records of one sampled step: per prompt, a table of its completions."""
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    if not records:
        return [Text("No completion samples yet (samples.jsonl; harness.sample_every).")]
    step = records[0]["step"]
    groups: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(r["group"], []).append(r)
    out: list[Any] = [Text(f"\nSamples at step {step}", style="bold")]
    for group in sorted(groups):
        rows = groups[group]
        first = rows[0]
        table = Table(
            title=f"prompt {group}: {escape(_clip(first['prompt'], chars))}   gold {first['gold']}",
            title_justify="left",
            header_style="bold",
            expand=True,
        )
        table.add_column("#", justify="right", no_wrap=True)
        table.add_column("status", no_wrap=True)
        table.add_column("reward", justify="right", no_wrap=True)
        table.add_column("adv", justify="right", no_wrap=True)
        table.add_column("len", justify="right", no_wrap=True)
        table.add_column("answer", no_wrap=True)
        table.add_column("completion", ratio=1)
        for r in rows:
            status = Text(r["status"], style=STATUS_STYLE.get(r["status"], ""))
            if r["truncated"]:
                status.append(" truncated", style="dim")
            adv = r["advantage"]
            table.add_row(
                str(r["sample"]),
                status,
                f"{r['reward']:.2f}",
                "nan" if adv is None else f"{adv:+.2f}",
                str(r["length"]),
                "—" if r["extracted"] is None else str(r["extracted"]),
                Text(_clip(r["completion"], chars)),
            )
        out.append(table)
    return out


def write_plots(run: Run, out_dir: Path) -> list[Path]:
    """One PNG per curve of :data:`PLOTS` that the run logged; returns the files written."""
    Figure = figure_class()
    if Figure is None:
        raise RunFolderError(f"cannot plot: {MISSING}")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, title, ylabel, keys, smooth in PLOTS:
        lines = []
        for i, key in enumerate(keys):
            rows = run.evals if key.startswith("eval/") else run.train
            steps, values = series(rows, key)
            if not values:
                continue
            color = f"C{i}"
            if key.startswith("eval/"):
                lines.append(Line(f"{key} (held-out)", steps, values, color=color, marker="o"))
                continue
            window = max(1, min(10, len(values) // 10)) if smooth else 1
            if window == 1:
                lines.append(Line(key, steps, values, color=color))
            else:
                lines.append(Line(None, steps, values, color=color, alpha=0.3, linewidth=1))
                smooth = moving_average(values, window)
                lines.append(Line(f"{key} ({window}-step moving avg)", steps, smooth, color=color))
        if lines:
            written.append(
                line_plot(
                    Figure,
                    out_dir / name,
                    [Panel(lines, ylabel)],
                    xlabel="optimizer step",
                    title=f"{title}: {run.path.name}",
                    integer_x=True,
                )
            )
    return written


def show(
    path: str | Path,
    *,
    plot: bool = False,
    plot_dir: str | Path | None = None,
    chars: int = 240,
    console: Any = None,
) -> list[Path]:
    """Print a run's status and latest samples; with ``plot``, write its curves (returned)."""
    from rich.console import Console

    console = console or Console()
    run = load_run(path)
    for item in status_renderables(run):
        console.print(item)
    for item in samples_renderables(run.samples, chars=chars):
        console.print(item)
    if not plot:
        return []
    files = write_plots(run, Path(plot_dir) if plot_dir else run.path / "plots")
    if files:
        console.print(f"\nwrote {len(files)} plots: " + ", ".join(str(f) for f in files))
    else:
        console.print("\nnothing to plot yet: no training step logged")
    return files
