"""Figures of one explained step (`learndyn explain`), drawn from its stored tables alone.

changes: left, predicted against actual change of log π(y) per probe response (the first-order
         prediction is right when the points sit on the diagonal); right, per response type, the
         prediction split by cause (chosen residual, rejected residual, optimizer state; for GRPO
         the completions of positive and of negative advantage and the KL term) beside the actual change.
squeeze: per response type, the probability mass that moved onto each position's argmax token
         (summed over the response, predicted and actual) and the mean entropy change: squeezing
         shows as mass onto argmax tokens with falling entropy.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure

PARTS = (("predicted_from_chosen", "from chosen (G⁺)", "tab:green"),
         ("predicted_from_rejected", "from rejected (G⁻)", "tab:red"),
         ("predicted_from_positive", "from completions with A > 0", "tab:green"),
         ("predicted_from_negative", "from completions with A < 0", "tab:red"),
         ("predicted_from_kl", "from the KL term", "tab:purple"),
         ("predicted_from_state", "from optimizer state", "tab:gray"),
         ("actual", "actual", "black"))


def changes_figure(changes) -> Figure:
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    scatter, bars = fig.subplots(1, 2, width_ratios=(1, 1.6))
    for name, group in changes.groupby("response_type", sort=False):
        scatter.scatter(group["predicted"], group["actual"], s=18, label=name)
    lo = float(min(changes["predicted"].min(), changes["actual"].min()))
    hi = float(max(changes["predicted"].max(), changes["actual"].max()))
    scatter.plot([lo, hi], [lo, hi], color="gray", lw=0.8, ls="--")
    scatter.set(xlabel="predicted Δ log π(y)  (first order)", ylabel="actual Δ log π(y)",
                title="predicted vs actual, per probe response")
    scatter.legend(fontsize=7)
    means = changes.groupby("response_type", sort=False)[[p for p, _, _ in PARTS if p in changes]].mean()
    parts = [p for p in PARTS if p[0] == "actual" or (p[0] in means and means[p[0]].abs().max() > 0)]
    x, width = np.arange(len(means)), 0.8 / len(parts)
    for i, (col, label, color) in enumerate(parts):
        bars.bar(x + (i - (len(parts) - 1) / 2) * width, means[col], width, label=label, color=color)
    bars.axhline(0, color="gray", lw=0.6)
    bars.set_xticks(x, means.index, rotation=30, ha="right", fontsize=8)
    bars.set(ylabel="mean Δ log π(y)", title="the prediction split by cause, per response type")
    bars.legend(fontsize=7)
    return fig


def squeeze_figure(changes) -> Figure:
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    mass, entropy = fig.subplots(1, 2)
    means = changes.groupby("response_type", sort=False)[
        ["argmax_mass_predicted", "argmax_mass_actual", "entropy_predicted", "entropy_actual"]].mean()
    x = np.arange(len(means))
    for ax, stem, ylabel in ((mass, "argmax_mass", "Σ over positions of Δ π(argmax token)"),
                             (entropy, "entropy", "mean Δ entropy per position (nats)")):
        ax.bar(x - 0.2, means[f"{stem}_predicted"], 0.4, label="predicted", color="tab:blue")
        ax.bar(x + 0.2, means[f"{stem}_actual"], 0.4, label="actual", color="black")
        ax.axhline(0, color="gray", lw=0.6)
        ax.set_xticks(x, means.index, rotation=30, ha="right", fontsize=8)
        ax.set(ylabel=ylabel)
        ax.legend(fontsize=7)
    mass.set_title("mass moved onto argmax tokens (squeezing)")
    entropy.set_title("entropy change")
    return fig


def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()
