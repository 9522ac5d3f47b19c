"""Report: figures, the paper's signatures and a self-contained HTML page, from stored metrics only.

    path = build_report(["runs/sft", "runs/dpo"])    # -> runs/dpo/report.html
    for sig in evaluate_signatures(["runs/sft", "runs/dpo"]): print(sig["name"], sig["verdict"])

`explained` names folders written by `learndyn explain`: the probability mass each explained step
moved onto argmax tokens is reported beside the squeezing signature (not part of its verdict).

Runs chain into arms (an SFT run and the DPO run started from it share one epoch axis; see arms.py);
a baseline and an extended arm are overlaid. This layer never imports torch or a model: any report
can be rebuilt from RUN/metrics/ alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from learndyn.atomic import write_bytes, write_json
from learndyn.report import figures, page, reward_figures
from learndyn.report.arms import load_arms
from learndyn.report.signatures import attach_explained, evaluate, read_explained

__all__ = ["build_report", "evaluate_signatures"]

FIGURES = {  # file stem -> (caption, plots change from step 0?)
    "logp_sum": ("Per-type mean logp_sum against epochs; colour = response type, line style = arm, "
                 "dashed grey line = phase boundary.", False),
    "logp_change": ("Per-type change in mean logp_sum since the arm's step 0 (greedy: since its own run's "
                    "start, as each run decodes its own).", True),
}

REWARDS_CAPTION = ("GRPO: mean reward per optimizer step, from every sampled completion's kept reward, and the share "
                   "of prompt groups whose samples all got the same reward (a zero advantage: no gradient).")


def evaluate_signatures(runs: list[str | Path], explained: Sequence[str | Path] = ()) -> list[dict[str, Any]]:
    """The paper's observations checked on `runs`: dicts with name, arm, verdict, estimates and
    description (see learndyn.report.signatures)."""
    return attach_explained(evaluate(load_arms(runs)), [read_explained(f) for f in explained])


def build_report(runs: list[str | Path], out: str | Path | None = None, *,
                 sections: Sequence[tuple[str, str]] = (), explained: Sequence[str | Path] = ()) -> Path:
    """Write OUT/figures/*.png, OUT/signatures.json and OUT/report.html (OUT defaults to the last
    run's folder), each atomically; return the path of report.html. `sections` are (title, HTML)
    parts placed before the signatures (the comparison's win rates, for one)."""
    arms = load_arms(runs)
    steps = [read_explained(f) for f in explained]
    out = Path(out) if out is not None else Path(runs[-1])
    signatures = attach_explained(evaluate(arms), steps)
    pngs = {}
    for stem, (caption, change) in FIGURES.items():
        png = figures.render(arms, change=change)
        write_bytes(out / "figures" / f"{stem}.png", png)
        pngs[stem] = (caption, png)
    rewards = reward_figures.render(arms)
    if rewards is not None:
        write_bytes(out / "figures" / "rewards.png", rewards)
        pngs["rewards"] = (REWARDS_CAPTION, rewards)
    write_json(out / "signatures.json", signatures)
    write_bytes(out / "report.html", page.render(arms, signatures, pngs, sections).encode("utf-8"))
    return out / "report.html"
