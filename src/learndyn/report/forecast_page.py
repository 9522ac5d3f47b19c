"""The forecast's page (`learndyn forecast`): one self-contained HTML file, like report.html.

Scores: each pair's forecast scores against each other (CHES is higher for more displacement, the
predicted changes lower). The most displacing pairs, with their texts. The displacement map: c_ij,
the first-order change of pair i's chosen log-probability from one step on pair j (projected).
"""

from __future__ import annotations

import base64
import html
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from learndyn.report.explain_figures import png
from learndyn.report.page import CSS, cell, fmt, html_table

SHOWN = 12  # pairs in the table
EXCERPT = 160  # characters of each text


def render(frame: Any, kernel: np.ndarray | None, pairs: list, summary: dict[str, Any]) -> str:
    score = summary["ranking_score"]
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8"><title>learndyn forecast</title>',
             f"<style>{CSS}</style></head><body>", "<h1>learndyn forecast: likelihood displacement</h1>",
             f"<p>{summary['scored']} of {summary['pairs']} pairs scored; loss {html.escape(summary['loss'])}, "
             f"beta {fmt(summary['beta'])}, lr {fmt(summary['lr'])}. Ranking score: <code>{score}</code>, the "
             "first-order change of log π(chosen) (more negative: more displacement). "
             f"{_negative(summary)}</p>",
             "<h2>Scores</h2>", _img(_scores_figure(frame))]
    if summary.get("notes"):
        parts += ["<h2>Notes</h2>", html_table(["pair", "note"], [[cell(k), cell(v)] for k, v in summary["notes"].items()])]
    parts += ["<h2>Most displacing pairs</h2>", _top_table(frame, pairs, score)]
    if kernel is not None:
        agreement = summary.get("projection_rank_agreement")
        parts += ["<h2>Displacement map</h2>",
                  f"<p>c<sub>ij</sub> from gradients compressed to {summary.get('projection_dim') or 'no'} dimensions; "
                  f"its row sums agree with the exact cross_predicted at rank correlation "
                  f"{'n/a' if agreement is None else f'{agreement:.3f}'}.</p>", _img(_map_figure(kernel))]
    parts.append("</body></html>")
    return "\n".join(parts)


def _negative(summary: dict[str, Any]) -> str:
    key = "cross_predicted_negative" if "cross_predicted_negative" in summary else "self_predicted_negative"
    return f"Forecast to lower their own chosen: {summary[key]} of {summary['scored']}."


def _img(fig: Figure) -> str:
    return f'<figure><img alt="" src="data:image/png;base64,{base64.b64encode(png(fig)).decode()}"></figure>'


def _scores_figure(frame: Any) -> Figure:
    columns = [c for c in ("ches", "ches_normalized", "self_predicted", "cross_predicted", "others_projected")
               if c in frame.columns]
    fig = Figure(figsize=(4 * len(columns), 3.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(columns)))
    for ax, column in zip(axes, columns):
        values = frame[column].dropna()
        ax.hist(values, bins=min(30, max(5, len(values) // 3)), color="tab:blue")
        ax.set(title=column, xlabel="score", ylabel="pairs")
    return fig


def _map_figure(kernel: np.ndarray) -> Figure:
    fig = Figure(figsize=(6, 5), layout="constrained")
    ax = fig.subplots()
    bound = float(np.nanmax(np.abs(kernel))) if np.isfinite(kernel).any() else 1.0
    image = ax.imshow(kernel, cmap="RdBu", vmin=-bound, vmax=bound, interpolation="nearest")
    ax.set(xlabel="pair j (the step)", ylabel="pair i (whose chosen moves)",
           title="first-order change of log π(y⁺_i) from a step on pair j")
    fig.colorbar(image, ax=ax)
    return fig


def _top_table(frame: Any, pairs: list, score: str) -> str:
    texts = {p.example_id: p for p in pairs}
    rows = []
    for row in frame.dropna(subset=[score]).sort_values(score, kind="stable").head(SHOWN).itertuples():
        pref = texts[row.example_id]
        displacers = ", ".join(getattr(row, "top_displacers", None) or [])
        rows.append([cell(row.example_id), cell(fmt(getattr(row, score))), cell(fmt(row.ches_normalized)),
                     cell(_excerpt(pref.prompt)), cell(_excerpt(pref.chosen)), cell(_excerpt(pref.rejected)),
                     cell(displacers)])
    return html_table(["pair", score, "ches_normalized", "prompt", "chosen", "rejected", "top displacers"], rows)


def _excerpt(value: Any) -> str:
    text = value if isinstance(value, str) else " / ".join(m["content"] for m in value)
    return text if len(text) <= EXCERPT else text[: EXCERPT - 1] + "…"
