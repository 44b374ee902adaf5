"""Charts of the pipeline, drawn with matplotlib: bare :class:`~matplotlib.figure.Figure` objects on the Agg
canvas (no pyplot, no global backend switch: safe in a sweep's threads), saved as PNG for MLflow or inlined as
SVG in the HTML report.

A series is ``{"label", "x": [...], "y": [...], "linestyle"?, "marker"?}``; a None or non-finite y (or, on a log
axis, a y <= 0) is skipped and breaks the line.
"""

from __future__ import annotations

import io
import math
import re
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["LEGEND_MAX", "line_chart", "new_figure", "svg_markup"]

LEGEND_MAX = 24


def new_figure(width: float, height: float) -> "Figure":
    """An empty figure on the Agg canvas (inches at 100 dpi)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _y_values(ys: Sequence[Any], log_y: bool) -> list[float]:
    out = []
    for y in ys:
        v = math.nan if y is None else float(y)
        out.append(v if math.isfinite(v) and (v > 0 or not log_y) else math.nan)
    return out


def _plain(label: str) -> str:
    """Text drawn as is: a '$' never starts mathtext."""
    return label.replace("$", r"\$")


def line_chart(series: Sequence[dict[str, Any]], *, title: str, xlabel: str, ylabel: str, log_y: bool = False,
               integer_x: bool = False, hlines: Sequence[tuple[float | None, str]] = (),
               size: tuple[float, float] = (11.0, 3.8)) -> "Figure":
    """Lines with markers, one per series, dashed reference lines (``hlines``: (y, label)), the legend beside
    the axes (at most :data:`LEGEND_MAX` entries); "no data" when nothing is finite."""
    from matplotlib.ticker import LogFormatter, MaxNLocator

    fig = new_figure(*size)
    ax = fig.add_subplot(1, 1, 1)
    drawn = 0
    for i, s in enumerate(series):
        ys = _y_values(s["y"], log_y)
        drawn += sum(math.isfinite(y) for y in ys)
        (line,) = ax.plot([float(x) for x in s["x"]], ys, linestyle=s.get("linestyle", "-"),
                          marker=s.get("marker", "o"), markersize=3.5, linewidth=1.6, label=_plain(s["label"]))
        line.set_gid(f"series-{i}")
    for value, label in hlines:
        if value is not None and math.isfinite(value) and (value > 0 or not log_y):
            ax.axhline(value, color="#333", linestyle="--", linewidth=1.0, label=_plain(label))
    if not drawn:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="#777")
    elif log_y:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(LogFormatter())  # 20, 30, 50: no 2 x 10^1
        ax.yaxis.set_minor_formatter(LogFormatter(minor_thresholds=(1, 0.5)))
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(_plain(title), loc="left", fontweight="bold")
    ax.set(xlabel=_plain(xlabel), ylabel=_plain(ylabel) + (" (log scale)" if log_y and drawn else ""))
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles[:LEGEND_MAX], labels[:LEGEND_MAX], loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  fontsize="small", frameon=False,
                  title=f"+{len(handles) - LEGEND_MAX} more" if len(handles) > LEGEND_MAX else None)
    fig.tight_layout()
    return fig


def svg_markup(fig: "Figure") -> str:
    """The figure as an inline ``<svg>`` element: text kept as text, ids stable between runs, no metadata, and
    as wide as the page allows."""
    from matplotlib import rc_context

    buf = io.StringIO()
    with rc_context({"svg.fonttype": "none", "svg.hashsalt": "dlp"}):
        fig.savefig(buf, format="svg", metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    return re.sub(r'width="([\d.]+)pt" height="([\d.]+)pt"', r'width="100%" style="max-width:\1pt;height:auto"',
                  text, count=1)
