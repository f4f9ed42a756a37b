"""Shared chart style: one colour per batch size across every chart of a report, the
"not enough data" panel, and figure → bytes.

Importing this module changes nothing in matplotlib: figures are built from
`matplotlib.figure.Figure` (no pyplot, so no backend is chosen and no window can open;
`savefig` renders PNG with Agg and SVG with its own writer), and the report's look
(`RC`) applies only inside `rc_context()`, which the chart rendering enters. A notebook
or program that imports batchscope keeps its own backend and rcParams."""

from __future__ import annotations

import io
import textwrap
from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Literal

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.layout_engine import TightLayoutEngine
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullLocator

from batchscope.analysis.text import compact

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType

ImageFormat = Literal["png", "svg"]
MIME = {"png": "image/png", "svg": "image/svg+xml"}

PANEL_SIZE = (4.6, 3.6)  # inches per panel
DPI = 100
FIT_COLOR = "#d62728"
REFERENCE_COLOR = "0.45"
EMPTY_COLOR = "0.35"
NOTE_BOX = {"facecolor": "white", "alpha": 0.85, "linewidth": 0, "pad": 2}  # notes stay legible over lines

# The report's look: applied by `rc_context()` while charts are drawn and saved, never globally.
RC: dict[RcKeyType, Any] = {
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 10.5,
    "axes.labelsize": 9.5,
    "xtick.labelsize": 8.5,
    "ytick.labelsize": 8.5,
    "legend.fontsize": 8,
    # A light box: legends placed over data stay readable.
    "legend.frameon": True,
    "legend.framealpha": 0.85,
    "legend.edgecolor": "none",
    "svg.fonttype": "none",
}


def rc_context() -> AbstractContextManager[Any]:
    """The report's rcParams for the figures drawn and saved inside it; the caller's come back after."""
    return matplotlib.rc_context(RC)


class BatchColors:
    """A fixed colour per batch size, ordered along a sequential colour map by log2(B), so the
    same batch size has the same colour in every chart (and every study of a comparison)."""

    def __init__(self, batch_sizes: Iterable[float]) -> None:
        unique = sorted({int(b) for b in batch_sizes if b is not None and np.isfinite(b)})
        self.batch_sizes = unique
        cmap = matplotlib.colormaps["viridis"]
        # Stop before viridis' pale yellow end, which is unreadable on white.
        positions = np.linspace(0.0, 0.88, max(len(unique), 1))
        self._colors = {b: cmap(p) for b, p in zip(unique, positions, strict=False)}

    def __call__(self, batch_size: float) -> tuple[float, float, float, float]:
        return self._colors.get(int(batch_size), (0.5, 0.5, 0.5, 1.0))

    def legend_handles(self, batch_sizes: Iterable[float]) -> list[Line2D]:
        present = sorted({int(b) for b in batch_sizes})
        return [Line2D([], [], color=self(b), marker="o", markersize=5, label=f"B={b}") for b in present]


def figure(n_panels: int, *, rows: int = 1) -> tuple[Figure, list[Axes]]:
    cols = int(np.ceil(n_panels / rows))
    # A Figure of its own, not pyplot's: nothing to close, no backend, no window.
    fig = Figure(figsize=(PANEL_SIZE[0] * cols, PANEL_SIZE[1] * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, list(axes.ravel())


def empty_panel(ax: Axes, title: str, message: str) -> None:
    """A panel that says why there is nothing to draw, instead of an empty axes."""
    ax.clear()
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_color("0.8")
        spine.set_linestyle((0, (4, 3)))
    wrapped = "\n".join(textwrap.fill(line, 44) for line in message.splitlines())
    ax.text(
        0.5,
        0.5,
        wrapped,
        ha="center",
        va="center",
        color=EMPTY_COLOR,
        fontsize=9.5,
        transform=ax.transAxes,
    )


def _header(fig: Figure, title: str, legend_handles: list[Line2D]) -> float:
    """Title at the top left and, below it, the batch-size colour legend, in a band above
    the panels; returns the height of that band as a fraction of the figure."""
    width, height = fig.get_size_inches()
    title_in, row_in, entry_in = 0.3, 0.22, 0.8  # inches
    fig.suptitle(title, fontsize=12, x=0.01, y=1 - 0.04 / height, ha="left", va="top")
    rows = 0
    if legend_handles:
        ncol = max(1, min(len(legend_handles), int((width - 0.4) / entry_in)))
        rows = int(np.ceil(len(legend_handles) / ncol))
        fig.legend(
            handles=legend_handles,
            frameon=False,
            loc="upper left",
            bbox_to_anchor=(0.005, 1 - title_in / height),
            ncol=ncol,
            handletextpad=0.3,
            columnspacing=1.0,
            borderaxespad=0.0,
        )
    return (title_in + row_in * rows) / height


def proxy(label: str, *, color: str = "0.6", marker: str = "o", ls: str = "") -> Line2D:
    """A legend entry for artists drawn in many colours (e.g. "all runs")."""
    return Line2D([], [], color=color, marker=marker, ls=ls, markersize=5, label=label)


def _tidy_log_axes(fig: Figure) -> None:
    """Log axes labelled 0.2, 0.5, 1, 2 (not 2×10⁰), without minor labels.

    Matplotlib's default labels log axes in scientific notation and labels minor ticks on
    short ranges, which is hard to read and most of the rendering time.
    """
    for ax in fig.axes:
        for axis, lims in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            if axis.get_scale() != "log" or isinstance(axis.get_major_locator(), FixedLocator):
                continue
            low, high = sorted(abs(v) for v in lims)
            decades = np.log10(high / low) if low > 0 else np.inf
            subs = (1.0, 2.0, 5.0) if decades <= 2.2 else (1.0, 3.0) if decades <= 4 else (1.0,)
            axis.set_major_locator(LogLocator(base=10, subs=subs, numticks=8))
            axis.set_major_formatter(FuncFormatter(lambda value, _pos: compact(value)))
            # No minor ticks: each is several artists, and log axes have dozens per panel.
            axis.set_minor_locator(NullLocator())


def to_bytes(
    fig: Figure,
    image_format: ImageFormat = "png",
    *,
    title: str = "",
    legend_handles: list[Line2D] | None = None,
) -> bytes:
    """Render the figure; with a title (and a batch-size legend) in a top band."""
    if image_format not in MIME:
        raise ValueError(f"image_format must be 'png' or 'svg', but got {image_format=}.")
    _tidy_log_axes(fig)
    band = _header(fig, title, legend_handles or []) if title or legend_handles else 0.0
    buffer = io.BytesIO()
    # The engine run once, not Figure.tight_layout: that leaves a placeholder layout engine set,
    # for which savefig runs a second full layout draw before drawing (a fifth of the charts' time).
    TightLayoutEngine(rect=(0, 0, 1, 1 - band)).execute(fig)
    fig.savefig(buffer, format=image_format, dpi=DPI)
    return buffer.getvalue()
