"""The comparison's own report sections: judged win rates and the intrinsic measures of each
checkpoint's answers, from a `learndyn compare` summary (experiments/compare.py) alone."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from matplotlib.figure import Figure

from learndyn.judging.winrate import rate_text
from learndyn.report.figures import plain
from learndyn.report.page import fmt, html_table, cell

# Intrinsic measures shown, in this order: (summary key, column header).
MEASURES = (("mean_words", "words"), ("mean_tokens", "tokens"), ("distinct_1", "distinct-1"),
            ("distinct_2", "distinct-2"), ("repetition_3", "repetition-3"), ("empty_responses", "empty"),
            ("chosen_logp_sum", "held-out chosen logp_sum"), ("chosen_logp_mean", "… per token"),
            ("chosen_argmax_logp", "held-out argmax_logp"))


def win_rate_figure(win_rates: list[dict[str, Any]]) -> bytes:
    """Each pair's win rate of A with its Wilson interval, against the 0.5 of equal quality."""
    rows = [r for r in win_rates if r["win_rate"] is not None]
    fig = Figure(figsize=(7.5, 0.55 * max(len(rows), 1) + 1.3), layout="constrained")
    ax = fig.subplots()
    for y, row in enumerate(rows):
        ax.errorbar(row["win_rate"], y, xerr=[[row["win_rate"] - row["ci_low"]], [row["ci_high"] - row["win_rate"]]],
                    fmt="o", color="tab:blue", capsize=4)
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(rows)), [plain(f"{r['a']} vs {r['b']}") for r in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("win rate of the first (ties count half), 95% Wilson interval")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def sections(summary: dict[str, Any], figure: bytes | None = None) -> list[tuple[str, str]]:
    """(title, HTML) sections for the report page: win rates (table and figure) and intrinsic measures."""
    return [("Win rates", _win_rates(summary, figure)), ("Intrinsic measures of the answers", _intrinsic(summary))]


def _win_rates(summary: dict[str, Any], figure: bytes | None) -> str:
    rows = []
    for r in summary["win_rates"]:
        rows.append([cell(r["a"]), cell(r["b"]), cell(rate_text(r)), cell(r["wins"]), cell(r["losses"]), cell(r["ties"]),
                     cell(r["unparsed"]), cell(r["inconsistent"])])
    settings = summary["settings"]
    intro = (f"<p>{summary['held_out_prompts']} held-out prompts of <code>{html.escape(settings['eval_data'])}</code>, "
             f"answered greedily (at most {settings['max_new_tokens']} new tokens) by each checkpoint and judged "
             f"by <code>{html.escape(summary['judge'])}</code> in both orders. The win rate of A counts ties as "
             "half; unparsed pairs are left out; \"orders disagreed\" counts pairs whose two orders named "
             "opposite winners (position bias).</p>")
    table = html_table(["A", "B", "win rate of A [95% CI]", "A wins", "B wins", "ties", "unparsed", "orders disagreed"],
                   rows)
    img = ""
    if figure is not None:
        data = base64.b64encode(figure).decode("ascii")
        img = f'<figure><img alt="win rates" src="data:image/png;base64,{data}"></figure>'
    return intro + table + img


def _intrinsic(summary: dict[str, Any]) -> str:
    shown = [(key, header) for key, header in MEASURES if any(key in m for m in summary["intrinsic"].values())]
    rows = [[cell(name), *(cell(fmt(m.get(key))) for key, _ in shown)] for name, m in summary["intrinsic"].items()]
    intro = ("<p>Per checkpoint: answer length, distinct-1/2 over all answers, the mean within-answer repetition "
             "rate of 3-grams (loops), and the teacher-forced log-probability and argmax_logp of the held-out "
             "chosen responses. Off-policy DPO is predicted to lower held-out chosen, raise argmax_logp and "
             "make answers repeat; extension is predicted to soften this.</p>")
    return intro + html_table(["checkpoint", *(html.escape(h) for _, h in shown)], rows)
