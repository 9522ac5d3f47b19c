"""Signatures: the paper's observations, checked on stored metrics.

Each is a yes/no question about per-type mean logp_sum (the paper's quantity) whose answer the
paper predicts (Ren & Sutherland, ICLR 2025, Sections 4-5): SFT raises y_u+ and other prompts'
answers and lowers non-human text; off-policy DPO pushes y_u- down harder than y_u+, then drags
y_u+ down from its peak while the argmax response rises (squeezing); SFT on both y_u+ and y_u-
before DPO ("extended") keeps both higher. A result is
    {"name", "arm", "held": True/False/None, "numbers": {...}, "description"}
with held None when the question does not apply (a phase, a probe type or an arm is missing).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from learndyn.report.arms import Arm, Segment

Check = Callable[[Arm], "tuple[bool, dict[str, float]] | str"]  # (held, numbers), or why not applicable


def _ends(seg: Segment | None, response_type: str, metric: str = "logp_sum") -> tuple[float, float] | None:
    """(value at the segment's first step, value at its last step), or None without data."""
    if seg is None:
        return None
    values = seg.curve(response_type, metric)["value"].dropna()
    if values.empty:
        return None
    return float(values.iloc[0]), float(values.iloc[-1])


def _phase_rises(phase: str, response_type: str, rises: bool) -> Check:
    def check(arm: Arm) -> tuple[bool, dict[str, float]] | str:
        if arm.phase(phase) is None:
            return f"no {phase.upper()} phase"
        ends = _ends(arm.phase(phase), response_type)
        if ends is None:
            return f"no {response_type} probes"
        start, end = ends
        return (end > start) if rises else (end < start), {"start": start, "end": end, "change": end - start}
    return check


def _sft_lowers_shuffled(arm: Arm) -> tuple[bool, dict[str, float]] | str:
    sft = arm.phase("sft")
    if sft is None:
        return "no SFT phase"
    numbers, falls = {}, []
    for t in ("shuffled_chosen", "shuffled_other"):
        if (ends := _ends(sft, t)) is not None:
            numbers |= {f"{t}_start": ends[0], f"{t}_end": ends[1]}
            falls.append(ends[1] < ends[0])
    if not falls:
        return "no shuffled_chosen or shuffled_other probes"
    return all(falls), numbers


def _dpo_lowers_rejected(arm: Arm) -> tuple[bool, dict[str, float]] | str:
    dpo = arm.phase("dpo")
    if dpo is None:
        return "no DPO phase"
    rejected, chosen = _ends(dpo, "rejected"), _ends(dpo, "chosen")
    if rejected is None or chosen is None:
        return "no chosen or rejected probes"
    r, c = rejected[1] - rejected[0], chosen[1] - chosen[0]
    return r < 0 and r < c, {"rejected_change": r, "chosen_change": c}


def _dpo_chosen_ends_below_peak(arm: Arm) -> tuple[bool, dict[str, float]] | str:
    dpo = arm.phase("dpo")
    if dpo is None:
        return "no DPO phase"
    values = dpo.curve("chosen")["value"].dropna()
    if values.empty:
        return "no chosen probes"
    peak, end = float(values.max()), float(values.iloc[-1])
    return end < peak, {"peak": peak, "end": end}


def _dpo_squeezing(arm: Arm) -> tuple[bool, dict[str, float]] | str:
    if arm.phase("dpo") is None:
        return "no DPO phase"
    ends = _ends(arm.phase("dpo"), "chosen", "argmax_logp")
    if ends is None:
        return "no argmax_logp of chosen"
    return ends[1] > ends[0], {"start": ends[0], "end": ends[1], "change": ends[1] - ends[0]}


# name -> (what the paper predicts, check on one arm)
PER_ARM: dict[str, tuple[str, Check]] = {
    "sft_raises_chosen": ("SFT raises chosen (y_u+): mean logp_sum at the last SFT step exceeds step 0.",
                          _phase_rises("sft", "chosen", True)),
    "sft_raises_other_train": ("SFT raises other prompts' chosen answers (other_train): the hallucination "
                               "mechanism.", _phase_rises("sft", "other_train", True)),
    "sft_lowers_shuffled": ("SFT lowers non-human text: shuffled_chosen and shuffled_other both end below "
                            "their step-0 values.", _sft_lowers_shuffled),
    "dpo_lowers_rejected": ("DPO pushes rejected (y_u-) down, by more than it moves chosen (changes from "
                            "the DPO start).", _dpo_lowers_rejected),
    "dpo_chosen_ends_below_peak": ("DPO eventually drags chosen down too: its final value is below the "
                                   "highest value seen during DPO.", _dpo_chosen_ends_below_peak),
    "dpo_squeezing": ("Squeezing: argmax_logp of chosen (the teacher-forced y*) rises during DPO as mass "
                      "piles onto the argmax token.", _dpo_squeezing),
}
EXTENDED_KEEPS = "extended_keeps_chosen_and_rejected_higher"
ON_POLICY_LESS = "on_policy_squeezes_less"
ON_POLICY_DESCRIPTION = ("On-policy negatives squeeze less: during DPO the on-policy arm's argmax_logp of chosen "
                         "rises less, and its chosen logp_sum falls less, than the off-policy arm's.")
EXTENDED_DESCRIPTION = ("Dataset extension (SFT on chosen and rejected) before DPO: at the end of DPO the "
                        "extended arm's chosen and rejected are both above the baseline arm's.")


def evaluate(arms: list[Arm]) -> list[dict[str, Any]]:
    """Every signature for every arm, then the baseline-vs-extended comparison."""
    results = []
    for arm in arms:
        for name, (description, check) in PER_ARM.items():
            results.append(_result(f"{name} [{arm.label}]", arm.label, description, check(arm)))
    results.append(_result(EXTENDED_KEEPS, None, EXTENDED_DESCRIPTION, _extended_keeps(arms)))
    if any(arm.on_policy for arm in arms):
        results.append(_result(ON_POLICY_LESS, None, ON_POLICY_DESCRIPTION, _on_policy_squeezes_less(arms)))
    return results


def _extended_keeps(arms: list[Arm]) -> tuple[bool, dict[str, float]] | str:
    pick = {kind: next((a for a in arms if a.kind == kind and not a.on_policy and a.phase("dpo") is not None), None)
            for kind in ("baseline", "extended")}
    if None in pick.values():
        return "needs a baseline and an extended arm, both with a DPO phase"
    numbers, above = {}, []
    for t in ("chosen", "rejected"):
        ends = {kind: _ends(arm.phase("dpo"), t) for kind, arm in pick.items()}
        if None in ends.values():
            return f"no {t} probes in both arms"
        numbers |= {f"{t}_{kind}": e[1] for kind, e in ends.items()}
        above.append(ends["extended"][1] > ends["baseline"][1])
    return all(above), numbers


def _on_policy_squeezes_less(arms: list[Arm]) -> tuple[bool, dict[str, float]] | str:
    """Compare DPO's change of chosen's argmax_logp and logp_sum between an off- and an on-policy arm
    of the same kind (the same SFT model, so the starting points agree)."""
    on = next((a for a in arms if a.on_policy and a.phase("dpo") is not None), None)
    off = next((a for a in arms if on is not None and not a.on_policy and a.kind == on.kind
                and a.phase("dpo") is not None), None)
    if on is None or off is None:
        return "needs an off-policy and an on-policy DPO arm of the same kind"
    numbers = {}
    for label, arm in (("off", off), ("on", on)):
        for metric, short in (("argmax_logp", "argmax"), ("logp_sum", "chosen")):
            ends = _ends(arm.phase("dpo"), "chosen", metric)
            if ends is None:
                return f"no chosen {metric} in the {label}-policy arm"
            numbers[f"{short}_change_{label}"] = ends[1] - ends[0]
    held = (numbers["argmax_change_on"] < numbers["argmax_change_off"]
            and numbers["chosen_change_on"] > numbers["chosen_change_off"])
    return held, numbers


def _result(name: str, arm: str | None, description: str, outcome: tuple | str) -> dict[str, Any]:
    if isinstance(outcome, str):
        return {"name": name, "arm": arm, "held": None, "numbers": {},
                "description": f"{description} (not applicable: {outcome})"}
    held, numbers = outcome
    return {"name": name, "arm": arm, "held": bool(held), "numbers": {k: _clean(v) for k, v in numbers.items()},
            "description": description}


def _clean(value: float) -> float | None:
    """JSON-safe: NaN/inf become None, numbers keep 6 significant digits."""
    value = float(value)
    return float(f"{value:.6g}") if math.isfinite(value) else None
