"""Figures of the squeezing toy: one distribution before and after one update, linear and log scale.

The linear panel shows where the mass goes (the argmax grows after a negative step); the log panel
shows the tail, where the squeezing is visible as almost every class falling. Classes are ranked by
their probability before the update, so the grey curve falls monotonically and the blue one shows
who gained: after a negative step the gain grows with rank (the richer the class, the more it gets),
which a plot in class-index order hides among 1,000 classes. Drawn with matplotlib's object API
on the Agg canvas, no pyplot state, from plain numbers: this module never sees a model or a tensor.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

BEFORE, AFTER = "#9a9a9a", "#1f5fa8"
LINEAR_RANKS = 100  # the linear panel shows at most this many top-ranked classes
MARKS = {  # role -> (colour, marker, legend label)
    "argmax": ("black", "v", "argmax before and after"),
    "argmax_before": ("black", "v", "argmax before"),
    "argmax_after": ("#e08a00", "v", "argmax after"),
    "positive": ("#2a9d3a", "^", "y⁺ (pulled up)"),
    "negative": ("#c0282d", "^", "ȳ (pushed down)"),
}


def render_case(before: Sequence[float], after: Sequence[float], marks: dict[str, int | None],
                title: str) -> bytes:
    """The figure of `draw_case` as PNG bytes."""
    buf = io.BytesIO()
    draw_case(before, after, marks, title).savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def draw_case(before: Sequence[float], after: Sequence[float], marks: dict[str, int | None],
              title: str) -> Figure:
    """Two panels (linear, log) of π before (grey, filled) and after (blue outline) over the classes
    ranked by π before; `marks` maps a role of MARKS to a class index (None: not drawn)."""
    order = np.argsort(-np.asarray(before, dtype=float), kind="stable")  # rank -> class
    p0, p1 = np.asarray(before, dtype=float)[order], np.asarray(after, dtype=float)[order]
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))  # class -> rank
    marks = dict(marks)
    if marks.get("argmax_before") is not None and marks.get("argmax_before") == marks.get("argmax_after"):
        marks["argmax"] = marks.pop("argmax_before")
        marks.pop("argmax_after")
    edges = np.arange(len(p0) + 1) - 0.5  # one bin per class, centred on its rank
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    lin, log = fig.subplots(1, 2)
    lin.stairs(p0, edges, fill=True, color=BEFORE, alpha=0.6, label="before")
    lin.stairs(p1, edges, color=AFTER, linewidth=1.4, label="after")
    floor = max(min(p0.min(), p1.min()), 1e-300) / 3  # log axis: every class visible, none at 0
    log.stairs(p0, edges, baseline=floor, color=BEFORE, linewidth=1.2, label="before")
    log.stairs(p1, edges, baseline=floor, color=AFTER, linewidth=1.2, label="after")
    log.set_yscale("log")
    log.set_ylim(floor, 1.5)
    lin.set_ylim(0, 1.12 * max(p0.max(), p1.max()))
    shown = min(len(p0), LINEAR_RANKS)  # the mass sits in the top ranks; the log panel shows the rest
    for ax, scale, n in ((lin, "linear", shown), (log, "log", len(p0))):
        _mark(ax, p0, p1, {role: v for role, v in marks.items() if v is not None and rank[v] < n}, rank)
        ax.set_xlim(edges[0], edges[n])
        top = "" if n == len(p0) else f" (top {n} of {len(p0)})"
        ax.set_xlabel(f"classes ranked by π before the update{top}")
        ax.set_ylabel(f"π(class)  ({scale} scale)")
    log.legend(loc="upper right", fontsize=8)  # the log panel has every mark; its top right is empty
    fig.suptitle(title)
    return fig


def _mark(ax, p0: np.ndarray, p1: np.ndarray, marks: dict[str, int | None], rank: np.ndarray) -> None:
    """A dotted line at each marked class, a hollow marker at its height before, a filled one after;
    the legend names the class."""
    for role, (colour, marker, label) in MARKS.items():
        v = marks.get(role)
        if v is None:
            continue
        r = rank[v]
        ax.axvline(r, color=colour, linestyle=":", linewidth=1.0)
        ax.plot([r], [p0[r]], marker=marker, color=colour, markerfacecolor="none", linestyle="none",
                markersize=7)
        ax.plot([r], [p1[r]], marker=marker, color=colour, linestyle="none", markersize=7,
                label=f"{label}: class {v}")
