"""Line plots of metrics against steps, shared by the sweep report and ``grpo-lab show --plot``.

matplotlib is optional (``pip install 'grpo_lab[bench]'``): :func:`figure_class` returns None
without it and callers say so. Figures are drawn with matplotlib's object API (no pyplot, no
global state), so plotting works in any thread and without a display.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: What to tell a user whose plots were skipped.
MISSING = "matplotlib is not installed (`pip install 'grpo_lab[bench]'`)"


def figure_class() -> Any:
    """``matplotlib.figure.Figure``, or None when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure


@dataclass(frozen=True)
class Line:
    """One series of a line plot.

    ``half_width`` draws a shaded band ``y ± half_width`` where it is not NaN; ``marker`` draws
    points instead of a line (e.g. sparse evaluations).
    """

    label: str | None
    x: Sequence[float]
    y: Sequence[float]
    half_width: Sequence[float] | None = None
    color: str | None = None
    alpha: float = 1.0
    linewidth: float = 1.5
    marker: str | None = None


def line_plot(
    Figure: Any,
    path: str | Path,
    lines: Sequence[Line],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    hline: float | None = None,
    hline_label: str | None = None,
    size: tuple[float, float] = (7, 4.2),
    integer_x: bool = False,
) -> Path:
    """Draw ``lines`` on one set of axes and save the PNG at ``path``; returns ``path``.

    ``integer_x`` puts x ticks on whole numbers only (steps).
    """
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.subplots()
    for line in lines:
        ax.plot(
            line.x,
            line.y,
            color=line.color,
            label=line.label,
            alpha=line.alpha,
            linewidth=0 if line.marker else line.linewidth,
            marker=line.marker,
        )
        if line.half_width is not None:
            band = [
                (x, y - h, y + h)
                for x, y, h in zip(line.x, line.y, line.half_width)
                if not math.isnan(h)
            ]
            if band:
                bx, lo, hi = zip(*band)
                ax.fill_between(bx, lo, hi, color=line.color, alpha=0.2, linewidth=0)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--", linewidth=1, label=hline_label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if integer_x:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if any(line.label for line in lines) or hline_label:
        ax.legend(fontsize=8)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
