"""The squeezing-effect toy (Ren & Sutherland, Section 3.3): one update of a linear softmax model.

Each case starts a model from one initialisation (uniform, flat, peaky; see dynamics.toy) and takes
one SGD step: positive (SFT on y⁺), negative (push down ȳ) or both (DPO-like). The large case is the
negative step on 1,000 classes. Every case of one seed starts from the same x and the same random
draw of W, so cases differ only in what their names say. Classes are chosen by rank:

    y⁺  the class at rank V/4: likely enough to be a plausible answer, far from the argmax
    ȳ   the class at rank 9V/10: an unlikely class, as an off-policy rejected response is

Writes OUT/<case>.png, OUT/summary.json (the numbers) and OUT/distributions.json (π before and
after per case, from which every figure can be redrawn), each atomically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from learndyn.atomic import write_bytes, write_json
from learndyn.dynamics import toy
from learndyn.errors import LearndynError
from learndyn.report.squeeze_figures import render_case

LEARNING_RATE = 1.0  # with ‖x‖² = 4, a step of 4 on ȳ's logit: the squeezing shows in one update
UPDATES = {"positive": (True, False), "negative": (False, True), "both": (True, True)}


@dataclass(frozen=True)
class Case:
    """One toy experiment: an initialisation, an update, and the model's size."""

    name: str
    init: str
    update: str
    dim: int = 4
    n_classes: int = 50


_CASES = [Case(f"{init}-{update}", init, update) for init in toy.INITS for update in UPDATES]
_CASES.append(Case("large-negative", "uniform", "negative", dim=50, n_classes=1000))
CASES: tuple[str, ...] = tuple(c.name for c in _CASES)
_BY_NAME = {c.name: c for c in _CASES}


def get_case(name: str) -> Case:
    """The case called `name`; a LearndynError listing the valid names otherwise."""
    if name not in _BY_NAME:
        raise LearndynError(f"unknown case '{name}'; valid: {', '.join(CASES)}")
    return _BY_NAME[name]


def run_squeeze(out: Path, case: str | None = None, seed: int = 0, lr: float = LEARNING_RATE) -> dict[str, Any]:
    """Run one case (or all, in CASES order), write figures and JSON into `out`, return the summary
    {"cases": {name: numbers}, "seed": seed, "learning_rate": lr}."""
    cases = [get_case(case)] if case is not None else _CASES
    out = Path(out)
    summary: dict[str, Any] = {"cases": {}, "seed": seed, "learning_rate": lr}
    distributions = {}
    for c in cases:
        before, after, numbers = run_case(c, seed, lr)
        summary["cases"][c.name] = numbers
        distributions[c.name] = {"before": before, "after": after}
        marks = {"argmax_before": numbers["argmax_before"]["class"], "argmax_after": numbers["argmax_after"]["class"],
                 **{role: p["class"] for role, p in numbers["pushed"].items()}}
        write_bytes(out / f"{c.name}.png", render_case(before, after, marks, _title(c.name, numbers, lr)))
    write_json(out / "summary.json", summary)
    write_json(out / "distributions.json", distributions, indent=None)
    return summary


def run_case(case: Case, seed: int, lr: float) -> tuple[list[float], list[float], dict[str, Any]]:
    """π before and after the case's update, and its numbers for summary.json."""
    g = torch.Generator().manual_seed(seed)
    x = toy.draw_input(case.dim, g)  # (d,)
    W = toy.init_weights(case.init, x, case.n_classes, g)  # (d, V)
    p0 = toy.probs(x, W)  # (V,)
    order = p0.argsort(descending=True)
    up, down = UPDATES[case.update]
    positive = int(order[case.n_classes // 4]) if up else None
    negative = int(order[9 * case.n_classes // 10]) if down else None
    p1 = toy.probs(x, toy.sgd_step(x, W, positive, negative, lr))  # (V,)

    def track(v: int) -> dict[str, Any]:
        return {"class": v, "prob_before": float(p0[v]), "prob_after": float(p1[v])}

    numbers = {
        "init": case.init, "update": case.update, "dim": case.dim, "n_classes": case.n_classes,
        "logit_step": lr * float(x @ x),  # η‖x‖²: how far one unit of residual moves a logit
        "argmax_before": track(int(p0.argmax())),
        "argmax_after": track(int(p1.argmax())),
        "pushed": {role: track(v) for role, v in (("positive", positive), ("negative", negative)) if v is not None},
        "rose": int((p1 > p0).sum()),
        "entropy_before": float(toy.entropy(p0)),
        "entropy_after": float(toy.entropy(p1)),
    }
    return p0.tolist(), p1.tolist(), numbers


def table_rows(summary: dict[str, Any]) -> list[dict[str, str]]:
    """One row of printable strings per case: argmax, y⁺ and ȳ as 'class: before → after', and how
    many classes rose."""
    rows = []
    for name, n in summary["cases"].items():
        a0, a1 = n["argmax_before"], n["argmax_after"]
        argmax = _change(a0) if a0["class"] == a1["class"] else f"{_change(a0)}; now {_change(a1)}"
        pushed = n["pushed"]
        rows.append({"case": name, "argmax": argmax,
                     "y⁺": _change(pushed["positive"]) if "positive" in pushed else "—",
                     "ȳ": _change(pushed["negative"]) if "negative" in pushed else "—",
                     "rose": f"{n['rose']}/{n['n_classes']}"})
    return rows


def _change(p: dict[str, Any]) -> str:
    return f"{p['class']}: {p['prob_before']:.3g} → {p['prob_after']:.3g}"


def _title(name: str, n: dict[str, Any], lr: float) -> str:
    pushed = ", ".join(f"{'y⁺' if role == 'positive' else 'ȳ'} {_change(p)}" for role, p in n["pushed"].items())
    return (f"{name} (η = {lr:g}, η‖x‖² = {n['logit_step']:.3g}): argmax {_change(n['argmax_before'])}; "
            f"{pushed}; {n['rose']}/{n['n_classes']} classes rose")
