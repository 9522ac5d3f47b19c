"""The HTML report: one self-contained page (figures embedded as data URIs, no scripts, no links
outside it), so it opens offline and survives being mailed or attached to an issue."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from typing import Any

from learndyn.report.arms import Arm
from learndyn.report.signatures import explained_text
from learndyn.vocab import RESPONSE_TYPES

# Settings a reader checks first, in this order; every other config key follows.
MAIN_SETTINGS = ("phase", "model", "from", "learning_rate", "epochs", "loss", "beta", "extend")
MARKS = {"held": ("✓ held", "mark held"), "not held": ("✗ not held", "mark failed"),
         "inconclusive": ("? inconclusive", "mark na"), "not applicable": ("– n/a", "mark na")}
CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.mark { text-align: center; font-size: 1.2em; }
.held { color: #1a7f37; } .failed { color: #cf222e; } .na { color: #888; }
img { max-width: 100%; }
code { font-size: 0.95em; }
"""


def render(arms: list[Arm], signatures: list[dict[str, Any]], figures: dict[str, tuple[str, bytes]],
           sections: Sequence[tuple[str, str]] = ()) -> str:
    """The page: arms, extra sections ((title, HTML)), signatures, figures (name -> (caption, PNG
    bytes)), settings, vocabulary."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>learndyn report</title>',
        f"<style>{CSS}</style></head><body>",
        "<h1>learndyn report</h1>",
        "<p>Learning dynamics of finetuning (Ren &amp; Sutherland, ICLR 2025): how each probe response's "
        "mean log-probability (<code>logp_sum</code>, teacher-forced, averaged over examples) moves during "
        "training.</p>",
        "<h2>Arms</h2>", _arms(arms),
        *(part for title, body in sections for part in (f"<h2>{html.escape(title)}</h2>", body)),
        "<h2>Signatures</h2>", _signatures(signatures),
        "<h2>Figures</h2>",
    ]
    for name, (caption, png) in figures.items():
        data = base64.b64encode(png).decode("ascii")
        parts.append(f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts += ["<h2>Settings</h2>", _settings(arms), "<h2>Probe vocabulary</h2>", _vocabulary(arms),
              "</body></html>"]
    return "\n".join(parts)


def html_table(header: list[str], rows: list[list[str]]) -> str:
    """An HTML table; cells are already escaped HTML."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def cell(text: Any, cls: str = "") -> str:
    attr = f' class="{cls}"' if cls else ""
    return f"<td{attr}>{html.escape(str(text))}</td>"


def _arms(arms: list[Arm]) -> str:
    rows = [[cell(arm.label), cell(arm.kind), cell(" → ".join(f"{s.phase.upper()}: {s.run}" for s in arm.segments))]
            for arm in arms]
    return html_table(["arm", "kind", "phases and runs, in training order"], rows)


def _signatures(signatures: list[dict[str, Any]]) -> str:
    rows = []
    for sig in signatures:
        mark, cls = MARKS[sig["verdict"]]
        numbers = ([estimate_text(e) for e in sig["estimates"]] + [explained_text(s) for s in sig.get("explained_steps", [])]
                   + ([f"reading: {sig['reading']}"] if sig.get("reading") else []))
        rows.append([cell(sig["name"]), cell(mark, cls), cell("; ".join(numbers)), cell(sig["description"])])
    return html_table(["signature", "verdict", "effect [interval], claim", "what the paper predicts"], rows)


def estimate_text(e: dict[str, Any]) -> str:
    """'quantity = effect [low, high] (claim)': the interval at its level when that is not 95%."""
    level = "" if abs(e["level"] - 0.95) < 1e-9 else f" at {e['level']:.1%}"
    return f"{e['quantity']} = {fmt(e['effect'])} [{fmt(e['low'])}, {fmt(e['high'])}{level}] ({e['claim']})"


def _settings(arms: list[Arm]) -> str:
    runs: dict[str, dict[str, Any]] = {}
    for arm in arms:
        for seg in arm.segments:
            runs.setdefault(f"{seg.run.name} ({arm.label})", seg.config)
    keys = [k for k in MAIN_SETTINGS if any(k in c for c in runs.values())]
    keys += list(dict.fromkeys(k for c in runs.values() for k in c if k not in keys))
    rows = [[cell(key)] + [cell(fmt(config.get(key, ""))) for config in runs.values()] for key in keys]
    return html_table(["setting", *(html.escape(name) for name in runs)], rows)


def _vocabulary(arms: list[Arm]) -> str:
    present = set().union(*(arm.types() for arm in arms))
    rows = [[cell(name), cell(symbol), cell(how)] for name, (symbol, how) in RESPONSE_TYPES.items() if name in present]
    return html_table(["response type", "paper symbol", "how it is made"], rows)


def fmt(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    return str(value)
