"""Figures of `learndyn digits`, drawn from its summary.json alone (no torch, no model).

one_step   Eq. 5 term by term for one SGD step on a digit: G (which classes the update pushes), K's
           similarity per observed digit (which observations feel it), −η·K·G (the logit push before
           A), the predicted −η·A·K·G and the actual Δ log π, as observed digit × class heat maps.
influence  M[update digit, observed digit]: the mean change per SGD step of log π(y_o | x_o), the
           observation's own label, over training.
Heat maps use a diverging colormap centred at 0. Drawn with matplotlib's object API (no pyplot state).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from learndyn.atomic import atomic_path

CMAP = "RdBu_r"  # red: log π rises, blue: it falls


def _heatmap(ax: Axes, values: np.ndarray, title: str, xlabel: str, ylabel: str, vmax: float,
             scale: float = 1.0) -> Any:
    """A 10×10 diverging heat map centred at 0, each cell annotated with value × scale."""
    image = ax.imshow(values, cmap=CMAP, norm=Normalize(-vmax, vmax))
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, f"{v * scale:.1f}", ha="center", va="center", fontsize=6.5,
                color="white" if abs(v) > 0.6 * vmax else "black")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel, xticks=range(values.shape[1]), yticks=range(values.shape[0]))
    return image


def one_step_figure(one: dict[str, Any]) -> Figure:
    """Part (a) of the digits recipe from summary["one_step"]."""
    G = np.asarray(one["G"])
    cosine = [o["k_cosine"] for o in one["observations"]]
    push, predicted, actual = (np.asarray(one[k]) for k in ("logit_change", "predicted", "actual"))
    fig = Figure(figsize=(15, 9), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1, 1.9])
    ax_g, ax_k = top.subplots(1, 2)
    ax_g.bar(range(len(G)), -G, color=["tab:red" if g < 0 else "tab:blue" for g in G])
    ax_g.set(title=f"−G = e_y − π at the update example (a {one['update_digit']}, "
                   f"π(y) = {one['update_prob']:.2f}):\nthe classes the step pushes up (red) and down (blue)",
             xlabel="class", xticks=range(len(G)))
    ax_k.bar(range(len(cosine)), cosine, color="tab:gray")
    ax_k.bar(one["update_digit"], cosine[one["update_digit"]], color="tab:purple")
    ax_k.set(title="K: eNTK similarity tr K(x_o, x_u) / √(tr K_oo tr K_uu)\nof one held-out observation per digit",
             xlabel="observed digit", xticks=range(len(cosine)))
    ax_k.axhline(0, color="black", lw=0.5)
    scale = 10 ** -np.floor(np.log10(np.abs(actual).max() or 1.0))  # annotate in units that read well
    vmax = max(np.abs(push).max(), np.abs(actual).max())
    axes = bottom.subplots(1, 3)
    panels = [(push, "−η·K·G: the push on the logits"), (predicted, "predicted Δ log π = −η·A·K·G"),
              (actual, f"actual Δ log π (relative error {one['relative_error']:.1%})")]
    for ax, (values, title) in zip(axes, panels):
        image = _heatmap(ax, values, title, "class", "observed digit", vmax, scale)
    bottom.colorbar(image, ax=axes, shrink=0.8, label=f"change (cells annotated × {scale:g})")
    fig.suptitle(f"One SGD step (η = {one['lr']:g}) on a {one['update_digit']} at step {one['step']} "
                 f"(test accuracy {one['test_accuracy']:.1%}): Δ log π = −η·A·K·G")
    return fig


def influence_figure(influence: dict[str, Any]) -> Figure:
    """Part (b) of the digits recipe from summary["influence"]; colours clip at the largest
    off-diagonal value so that the pairs show (the diagonal is annotated)."""
    M = np.asarray(influence["M"])  # (10, 10) [update digit, observed digit]
    off = ~np.eye(len(M), dtype=bool)
    fig = Figure(figsize=(8, 6.4), layout="constrained")
    ax = fig.subplots()
    image = _heatmap(ax, M, "", "observed digit (held out)", "update digit (learned)", np.abs(M[off]).max(), 1e3)
    fig.colorbar(image, ax=ax, shrink=0.8, label="mean Δ log π(y_o | x_o) per SGD step (cells × 1e3;\n"
                                                 "colours clip at the largest off-diagonal value)")
    fig.suptitle("Influence accumulated over training: learning one digit moves the held-out\n"
                 f"digits (mean per step: diagonal {influence['mean_diagonal']:.3g}, "
                 f"off-diagonal {influence['mean_off_diagonal']:.2g})")
    return fig


def write_digits_figures(summary: dict[str, Any], out: str | Path) -> list[Path]:
    """Write OUT/digits_one_step.png and OUT/digits_influence.png atomically; return their paths."""
    paths = []
    for name, fig in (("digits_one_step.png", one_step_figure(summary["one_step"])),
                      ("digits_influence.png", influence_figure(summary["influence"]))):
        path = Path(out) / name
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=90)
        paths.append(path)
    return paths
