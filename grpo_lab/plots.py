"""Line plots of metrics, the one way grpo_lab draws curves: ``grpo-lab show --plot``, the sweep
report and docs/answer.md all go through :func:`line_plot`.

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


@dataclass(frozen=True)
class Panel:
    """One set of axes of a :func:`line_plot`: its lines, its y label and a reference line.

    ``hline`` draws a dashed grey horizontal line at that y (e.g. a target accuracy).
    """

    lines: Sequence[Line]
    ylabel: str
    hline: float | None = None
    hline_label: str | None = None


def line_plot(
    Figure: Any,
    path: str | Path,
    panels: Sequence[Panel],
    *,
    xlabel: str,
    title: str | None = None,
    size: tuple[float, float] = (7, 4.2),
    integer_x: bool = False,
) -> Path:
    """Draw each panel on its own axes, stacked top to bottom, and save the PNG at ``path``.

    The x label goes under the last panel; ``title`` above the axes of a single panel, above
    the figure for several. ``integer_x`` puts x ticks on whole numbers only (steps).
    Returns ``path``.
    """
    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels):
        _draw_panel(ax, panel, integer_x)
    axes[-1].set_xlabel(xlabel)
    if title and len(panels) == 1:
        axes[0].set_title(title)
    elif title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def _draw_panel(ax: Any, panel: Panel, integer_x: bool) -> None:
    """The panel's lines (and confidence bands), reference line, y label, grid and legend."""
    for line in panel.lines:
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
    if panel.hline is not None:
        ax.axhline(panel.hline, color="grey", linestyle="--", linewidth=1, label=panel.hline_label)
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)
    if integer_x:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if any(line.label for line in panel.lines) or panel.hline_label:
        ax.legend(fontsize=8)
