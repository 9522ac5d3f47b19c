"""Figures: per-type mean logp_sum against epochs, one panel per group of probes (paper Figs. 3-5).

Colour is the response type (fixed within a panel), line style is the arm (solid baseline, dashed
extended), and a dashed grey line marks where an arm's SFT phase hands over to DPO. Figures are drawn
with matplotlib's object API on the Agg canvas (no pyplot state, no display needed) and returned as
PNG bytes, so the HTML page can embed exactly what is written to figures/.
"""

from __future__ import annotations

import io

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from learndyn.report.arms import Arm


def _logp(*types: str) -> list[tuple[str, str, str]]:
    return [(t, "logp_sum", t) for t in types]


# panel title -> [(response_type, metric, legend label)], in the probe vocabulary's names
GROUPS: dict[str, list[tuple[str, str, str]]] = {
    "chosen and its rephrases": _logp("chosen", "chosen_semantic", "chosen_format"),
    "rejected and its rephrases": _logp("rejected", "rejected_semantic", "rejected_format"),
    "other responses": _logp("other_train", "other_test", "fluent_random", "base_sample"),
    "shuffled": _logp("shuffled_chosen", "shuffled_other"),
    "argmax / greedy": [("chosen", "argmax_logp", "argmax of chosen (y*)"), ("greedy", "logp_sum", "greedy")],
    "own samples at the start (RL)": _logp("sample_rewarded", "sample_unrewarded"),
}
STYLES = ("-", "--", ":", "-.")
# Types re-made at the start of every run (each run decodes its own greedy response): their change is
# measured from the start of their own segment, not from the start of the arm.
PER_RUN_TYPES = frozenset({"greedy"})


def plain(text: str) -> str:
    """`text` as matplotlib shows it literally: a `$` would start mathtext, which renders a run named
    `a$x$` in italics and fails on `$\\frac$` (a crash, not a report). Only for text we did not write."""
    return text.replace("$", r"\$")


def render(arms: list[Arm], change: bool = False) -> bytes:
    """The figure of `draw` as PNG bytes."""
    buf = io.BytesIO()
    draw(arms, change).savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def draw(arms: list[Arm], change: bool = False) -> Figure:
    """A panel per group that has data; `change` plots value minus its step-0 value."""
    panels = [(title, lines) for title, lines in GROUPS.items()
              if any(not arm.series(t, m).empty for arm in arms for t, m, _ in lines)]
    ncols = min(3, max(1, len(panels)))
    nrows = -(-len(panels) // ncols) or 1
    fig = Figure(figsize=(5.2 * ncols, 3.8 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    right = max(seg.end_x for arm in arms for seg in arm.segments) or 1.0  # a run with only step 0: 0
    for ax, (title, lines) in zip(axes, panels):
        _panel(ax, arms, lines, change)
        ax.set_title(title)
        ax.set_xlim(-0.02 * right, 1.02 * right)  # one epoch axis for every panel
    for ax in axes[len(panels):]:
        fig.delaxes(ax)  # the grid's unused cells
    what = "change in mean logp_sum since step 0" if change else "mean logp_sum per response type"
    fig.suptitle(f"{what} ({'; '.join(plain(a.label) for a in arms)})")
    if len(arms) > 1:
        handles = [Line2D([], [], color="black", linestyle=STYLES[i % len(STYLES)], label=plain(arm.label))
                   for i, arm in enumerate(arms)]
        fig.legend(handles=handles, loc="outside lower center", ncols=len(arms), title="arm")
    return fig


def _panel(ax, arms: list[Arm], lines: list[tuple[str, str, str]], change: bool) -> None:
    labelled = set()
    for i, arm in enumerate(arms):
        for colour, (rtype, metric, label) in enumerate(lines):
            series = arm.series(rtype, metric).dropna(subset=["value"])
            if series.empty:
                continue
            if change:
                series = _change(series, per_segment=rtype in PER_RUN_TYPES)
            # Segments are drawn apart: the end of one run and the start of the next are one model,
            # but a per-run probe (greedy) is a different response on each side of the divider.
            for _, seg in series.groupby("segment", sort=True):
                ax.plot(seg["x"], seg["value"], color=f"C{colour}", linestyle=STYLES[i % len(STYLES)],
                        marker="o" if len(seg) < 3 else None, markersize=3,
                        label=None if label in labelled else label)
                labelled.add(label)
    drawn = set()
    for arm in arms:
        for x, text in arm.boundaries():
            if round(x, 6) in drawn:
                continue
            drawn.add(round(x, 6))
            ax.axvline(x, color="grey", linestyle="--", linewidth=0.9)
            ax.text(x, 0.98, text, transform=ax.get_xaxis_transform(), ha="center", va="top", fontsize=8,
                    color="dimgrey", bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
    ax.set_xlabel("epoch")
    metrics = " / ".join(dict.fromkeys(m for _, m, _ in lines))
    ax.set_ylabel(f"{metrics} − step-0 value" if change else f"mean {metrics}")
    if change:
        ax.axhline(0.0, color="black", linewidth=0.5)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)


def _change(series, per_segment: bool):
    """Subtract the first value (of the arm, or of each segment for per-run probes)."""
    if per_segment:
        first = series.groupby("segment")["value"].transform("first")
    else:
        first = series["value"].iloc[0]
    return series.assign(value=series["value"] - first)
