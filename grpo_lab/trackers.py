"""Experiment trackers (``harness.report_to``): checked at start-up, and tables sent to them.

accelerate drops a tracker whose package is missing without a word, so a run asked to log to
TensorBoard would train normally and write nothing. :func:`require_trackers` stops such a run
before it starts, naming the extra to install::

    pip install 'grpo_lab[tensorboard]'     # also: wandb, trackio

Scalars reach the trackers through ``Accelerator.log`` (see :class:`grpo_lab.harness.MetricsWriter`).
Tables (the completion samples) go through :func:`log_table`: a wandb ``Table`` with accelerate's
``WandBTracker.log_table``, and a markdown table in TensorBoard's Text tab. Other trackers get no
table.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from accelerate.tracking import get_available_trackers
from accelerate.utils import LoggerType

from grpo_lab.config import ConfigError

#: Trackers with an extra of their own in pyproject.toml.
EXTRAS = ("tensorboard", "wandb", "trackio")
#: Every tracker name accelerate knows (besides "all": every installed one).
KNOWN = tuple(name for name in LoggerType.list() if name != "all")


def require_trackers(names: Sequence[str]) -> None:
    """Raise :class:`ConfigError` for a tracker accelerate does not know or would drop.

    A tracker is dropped when accelerate finds none of its packages installed; the message
    names the extra (``pip install 'grpo_lab[tensorboard]'``) or the package to install.
    """
    available = {str(t.value) for t in get_available_trackers()}
    for name in names:
        if name == "all":
            continue
        if name not in KNOWN:
            raise ConfigError(
                f"harness.report_to: unknown tracker {name!r}; valid: {list(KNOWN)} or 'all'",
                ["harness.report_to"],
            )
        if name not in available:
            install = f"'grpo_lab[{name}]'" if name in EXTRAS else name
            raise ConfigError(
                f"harness.report_to: tracker {name!r} is not installed; "
                f"pip install {install} or remove it from harness.report_to",
                ["harness.report_to"],
            )


def init_kwargs(names: Sequence[str], output_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Per-tracker ``Accelerator.init_trackers`` arguments: wandb keeps its files in the run
    folder and names the run after it."""
    out = Path(output_dir)
    if "wandb" in names or "all" in names:
        return {"wandb": {"dir": str(out), "name": out.name}}
    return {}


def log_table(
    accelerator: Any, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int
) -> None:
    """Send a table to every tracker of ``accelerator`` that can show one."""
    for tracker in getattr(accelerator, "trackers", None) or ():
        if tracker.name == "wandb":
            tracker.log_table(name, columns=list(columns), data=[list(r) for r in rows], step=step)
        elif tracker.name == "tensorboard":
            tracker.log({name: markdown_table(columns, rows)}, step=step)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table (TensorBoard's Text tab renders it); newlines and pipes in cells kept
    visible as ``\\n`` and ``\\|``."""

    def cell(value: Any) -> str:
        text = "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
        return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "\\n")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
