"""Signatures: the paper's observations, decided on stored metrics with a paired bootstrap.

Each signature is a claim the paper makes about how a phase moves per-type log-probabilities (Ren &
Sutherland, ICLR 2025, Sections 4-5): SFT raises y_u+ and other prompts' answers and lowers
non-human text; off-policy DPO pushes y_u- down harder than y_u+, lowers almost every other response,
and drags y_u+ up then down while the argmax path gains (squeezing); SFT on y_u+ and y_u- before DPO
("extended") makes DPO lower them less.

Why statistics: the change of a mean over 8-16 probes is noisy, and a strict sign test on it "holds"
on pure noise half the time. So every quantity is a change per probe example (its value at the
phase's last evaluation minus its first, so examples pair up across types and arms), its effect the
mean over examples, and its 95% interval the percentile interval of that mean over RESAMPLES
resamples of the examples with replacement (fixed seed: a report is reproducible). A claim "q > 0"
    held          when the interval lies above zero (or the claimed threshold),
    not held      when it lies below,
    inconclusive  when it straddles it,
so a flat noisy run holds a one-sided claim about 2.5% of the time. A signature of several claims
holds when all hold and fails when one fails; otherwise it is inconclusive. A result is
    {"name", "arm", "verdict", "held": True/False/None, "numbers": {quantity: effect},
     "estimates": [{"quantity", "claim", "effect", "low", "high", "level", "verdict"}], "description"}
with verdict one of held / not held / inconclusive / not applicable (a phase, a probe type or an
arm is missing) and held None unless the verdict is held or not held.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd

from learndyn.errors import LearndynError, first_line
from learndyn.report.arms import Arm, Segment

HELD, NOT_HELD, INCONCLUSIVE, NOT_APPLICABLE = "held", "not held", "inconclusive", "not applicable"
ALPHA = 0.05  # two-sided: a 95% interval
RESAMPLES = 4000
SEED = 0


@dataclass
class Estimate:
    """One claimed quantity: its effect (mean over examples), bootstrap interval and claimed side."""

    quantity: str
    sign: int  # +1: claimed above `null`, -1: claimed below, 0: no claim (a number reported with its interval)
    effect: float
    low: float
    high: float
    level: float = 1 - ALPHA
    null: float = 0.0
    required: bool = True  # False: reported beside the claim, not part of the verdict

    @property
    def verdict(self) -> str:
        if self.sign == 0:
            return NOT_APPLICABLE
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            return INCONCLUSIVE
        above, below = self.low > self.null, self.high < self.null
        if above or below:
            return HELD if above == (self.sign > 0) else NOT_HELD
        return INCONCLUSIVE

    def as_dict(self) -> dict[str, Any]:
        claim = ("reported only" if self.sign == 0 else
                 f"{'>' if self.sign > 0 else '<'} {self.null:g}" + ("" if self.required else " (reported only)"))
        return {"quantity": self.quantity, "claim": claim, "effect": _clean(self.effect), "low": _clean(self.low),
                "high": _clean(self.high), "level": round(self.level, 6), "verdict": self.verdict}


@dataclass
class Outcome:
    """What a check found: its estimates and, where the rule is not "all required claims hold", its verdict."""

    estimates: list[Estimate]
    verdict: str | None = None


Check = Callable[[Arm], "Outcome | str"]  # an outcome, or why the check does not apply


def combine(estimates: list[Estimate]) -> str:
    """Held when every required claim holds, not held when one fails, else inconclusive."""
    verdicts = [e.verdict for e in estimates if e.required]
    if NOT_HELD in verdicts:
        return NOT_HELD
    return HELD if verdicts and all(v == HELD for v in verdicts) else INCONCLUSIVE


# -- the bootstrap -------------------------------------------------------------------------------
def bootstrap(table: pd.DataFrame, alpha: float = ALPHA,
              statistic: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(effect, low, high) per column of `table` (examples x quantities, NaN where an example lacks one).

    Examples are resampled with replacement as whole rows, so quantities of one example stay paired.
    `statistic` maps column means (resamples x columns) to the reported numbers (default: the means).
    """
    values = table.to_numpy(dtype=float)
    n = len(values)
    present = ~np.isnan(values)
    filled = np.where(present, values, 0.0)
    counts = _resample_counts(n)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = (counts @ filled) / (counts @ present)
        full = filled.sum(0) / present.sum(0)
    statistic = statistic or (lambda m: m)
    stats, effect = statistic(means), statistic(full[None, :])[0]
    tail = expanded_tail(alpha, n)
    low, high = np.nanpercentile(stats, [100 * tail, 100 * (1 - tail)], axis=0)
    return np.atleast_1d(effect), np.atleast_1d(low), np.atleast_1d(high)


def expanded_tail(alpha: float, n: int) -> float:
    """The tail probability that makes the percentile interval of a mean of n examples cover as a t
    interval would (Hesterberg's expanded percentile interval): Phi(-sqrt(n/(n-1)) t_{1-alpha/2, n-1}).

    The plain percentile interval is too narrow for small n (about 92% coverage at n = 12), which
    would let a flat noisy run "hold" a one-sided claim 4-5% of the time instead of 2.5%.
    """
    if n < 2:
        return alpha / 2
    z, nu = NormalDist().inv_cdf(1 - alpha / 2), n - 1
    # Cornish-Fisher expansion of Student's t quantile (within 0.5% of the exact value for nu >= 3)
    t = (z + (z**3 + z) / (4 * nu) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * nu**2)
         + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * nu**3))
    return NormalDist().cdf(-math.sqrt(n / (n - 1)) * t)


@functools.lru_cache(maxsize=16)
def _resample_counts(n: int) -> np.ndarray:
    """How often each of n examples is drawn in each resample (RESAMPLES x n); fixed by SEED."""
    counts = np.random.default_rng(SEED).multinomial(n, np.full(n, 1.0 / n), size=RESAMPLES).astype(float)
    counts.flags.writeable = False
    return counts


def estimates(table: pd.DataFrame, signs: dict[str, int], alpha: float = ALPHA,
              required: dict[str, bool] | None = None) -> list[Estimate]:
    """One Estimate per column of `table` named in `signs` (the claimed side)."""
    table = table[list(signs)]
    effect, low, high = bootstrap(table, alpha)
    return [Estimate(q, signs[q], float(e), float(lo), float(hi), 1 - alpha, required=(required or {}).get(q, True))
            for q, e, lo, hi in zip(signs, effect, low, high)]


# -- per-example data ----------------------------------------------------------------------------
def steps_table(seg: Segment | None, response_type: str, metric: str = "logp_sum") -> pd.DataFrame | None:
    """Examples x evaluation steps of one type's metric (examples scored at every step only), or None."""
    table = seg.per_example(response_type, metric) if seg is not None else None
    return None if table is None or table.shape[1] < 2 else table


def changes(seg: Segment | None, response_types: list[str], metric: str = "logp_sum") -> pd.DataFrame:
    """Per-example change over the segment (last evaluation minus first), one column per type present."""
    columns = {}
    for t in response_types:
        table = steps_table(seg, t, metric)
        if table is not None:
            columns[t] = table.iloc[:, -1] - table.iloc[:, 0]
    return pd.DataFrame(columns)


# -- checks on one arm ---------------------------------------------------------------------------
def _phase_moves(phase: str, claims: dict[str, int]) -> Check:
    """Each named type's change over the phase is on the claimed side (types absent are skipped)."""
    def check(arm: Arm) -> Outcome | str:
        seg = arm.phase(phase)
        if seg is None:
            return f"no {phase.upper()} phase"
        table = changes(seg, list(claims))
        if table.empty:
            return f"no {' or '.join(claims)} probes"
        return Outcome(estimates(table.rename(columns=lambda t: f"{t} change"),
                                 {f"{t} change": claims[t] for t in table.columns}))
    return check


def _dpo_lowers_rejected(arm: Arm) -> Outcome | str:
    if arm.phase("dpo") is None:
        return "no DPO phase"
    table = changes(arm.phase("dpo"), ["rejected", "chosen"])
    if set(table.columns) != {"rejected", "chosen"}:
        return "no chosen or rejected probes"
    table = pd.DataFrame({"rejected change": table["rejected"],
                          "rejected change - chosen change": table["rejected"] - table["chosen"]})
    return Outcome(estimates(table, {"rejected change": -1, "rejected change - chosen change": -1}))


def _dpo_chosen_rises_then_falls(arm: Arm) -> Outcome | str:
    """Some evaluation t inside DPO sits above the start and above the end, each beyond its interval.

    Searching k interior steps for one that works is k tries, so each interval is widened to level
    1 - ALPHA/k (Bonferroni); otherwise a flat noisy curve would find a "peak" by chance.
    """
    if arm.phase("dpo") is None:
        return "no DPO phase"
    table = steps_table(arm.phase("dpo"), "chosen")
    if table is None:
        return "no chosen probes"
    if table.shape[1] < 3:
        return "DPO has fewer than three evaluations"
    start, end, interior = table.iloc[:, 0], table.iloc[:, -1], list(table.columns[1:-1])
    parts = {}
    for t in interior:
        parts[f"rise to step {t}"] = table[t] - start
        parts[f"fall from step {t} to the end"] = end - table[t]
    signs = {q: (1 if q.startswith("rise") else -1) for q in parts}
    found = estimates(pd.DataFrame(parts), signs, alpha=ALPHA / len(interior))
    pairs = list(zip(found[::2], found[1::2]))
    held = [p for p in pairs if p[0].verdict == HELD and p[1].verdict == HELD]
    if held:
        return Outcome(list(max(held, key=lambda p: min(p[0].low, -p[1].high))), HELD)
    peak = pairs[int(np.argmax(table[interior].mean().to_numpy()))]
    no_rise = all(p[0].verdict == NOT_HELD for p in pairs)  # every interior point is below the start
    no_fall = all(p[1].verdict == NOT_HELD for p in pairs)  # the end is above every interior point
    return Outcome(list(peak), NOT_HELD if no_rise or no_fall else INCONCLUSIVE)


def _dpo_lowers_most_others(arm: Arm) -> Outcome | str:
    """More than half of the response types other than chosen fall during DPO (the share, bootstrapped)."""
    seg = arm.phase("dpo")
    if seg is None:
        return "no DPO phase"
    types = sorted(set(seg.frame["response_type"]) - {"chosen"})
    table = changes(seg, types)
    if table.shape[1] < 2:
        return "fewer than two response types besides chosen"

    def share(means: np.ndarray) -> np.ndarray:
        return np.nanmean(np.where(np.isnan(means), np.nan, means < 0), axis=1)[:, None]

    effect, low, high = bootstrap(table, statistic=share)
    return Outcome([Estimate(f"share of {table.shape[1]} other types that fall", 1, float(effect[0]),
                             float(low[0]), float(high[0]), null=0.5)])


def _dpo_squeezing(arm: Arm) -> Outcome | str:
    """The argmax path gains on chosen (the gap argmax_logp - logp_sum grows) and on responses never
    trained on (other_test's argmax_logp rises). A rise of chosen's own argmax_logp alone is no
    evidence: it also rises when chosen's tokens become the argmax, which shrinks the gap instead."""
    seg = arm.phase("dpo")
    if seg is None:
        return "no DPO phase"
    argmax, logp = steps_table(seg, "chosen", "argmax_logp"), steps_table(seg, "chosen")
    if argmax is None or logp is None:
        return "no argmax_logp of chosen"
    gap = argmax - logp
    table = pd.DataFrame({"chosen gap argmax_logp - logp_sum change": gap.iloc[:, -1] - gap.iloc[:, 0]})
    held_out = changes(seg, ["other_test"], "argmax_logp")
    if not held_out.empty:
        table = table.join(held_out.rename(columns={"other_test": "other_test argmax_logp change"}), how="outer")
    return Outcome(estimates(table, {q: 1 for q in table.columns}))


# name -> (what the paper predicts, check on one arm)
PER_ARM: dict[str, tuple[str, Check]] = {
    "sft_raises_chosen": ("SFT raises chosen (y_u+): its change over SFT is above zero.",
                          _phase_moves("sft", {"chosen": 1})),
    "sft_raises_other_train": ("SFT raises other prompts' chosen answers (other_train): the hallucination "
                               "mechanism.", _phase_moves("sft", {"other_train": 1})),
    "sft_lowers_shuffled": ("SFT lowers non-human text: shuffled_chosen and shuffled_other (those present) "
                            "both fall.", _phase_moves("sft", {"shuffled_chosen": -1, "shuffled_other": -1})),
    "dpo_lowers_rejected": ("DPO pushes rejected (y_u-) down, and by more than it moves chosen (paired per "
                            "example).", _dpo_lowers_rejected),
    "dpo_lowers_most_others": ("DPO lowers almost every other response: more than half of the response types "
                               "besides chosen fall.", _dpo_lowers_most_others),
    "dpo_chosen_rises_then_falls": ("DPO first raises chosen, then drags it down: some evaluation inside DPO "
                                    "is above both the start and the end.", _dpo_chosen_rises_then_falls),
    "dpo_squeezing": ("Squeezing: the teacher-forced argmax path gains on chosen (argmax_logp - logp_sum "
                      "grows) and on held-out answers never trained on (other_test argmax_logp rises).",
                      _dpo_squeezing),
}
EXTENDED_LESS = "extended_dpo_lowers_less"
ON_POLICY_LESS = "on_policy_squeezes_less"
EXTENDED_DESCRIPTION = ("Dataset extension (SFT on chosen and rejected) before DPO: during DPO the extended "
                        "arm lowers chosen and rejected less than the baseline arm (DPO-phase changes, paired "
                        "per example; its argmax rise is reported beside).")
ON_POLICY_DESCRIPTION = ("On-policy negatives squeeze less: during DPO the on-policy arm's argmax_logp of chosen "
                         "rises less, and its chosen logp_sum falls less, than the off-policy arm's.")


def evaluate(arms: list[Arm]) -> list[dict[str, Any]]:
    """Every signature for every arm (an arm with a GRPO phase adds the RL ones of rl_signatures.py
    and keeps only the SFT/DPO ones of the phases it has), then the baseline-vs-extended comparison
    (unless every arm is RL without DPO) and the on-policy one."""
    from learndyn.report import rl_signatures

    results = []
    for arm in arms:
        rl = arm.phase("grpo") is not None
        checks = {n: c for n, c in PER_ARM.items() if not rl or arm.phase(n.split("_")[0]) is not None}
        checks |= rl_signatures.CHECKS if rl else {}
        mine = [_result(f"{name} [{arm.label}]", arm.label, description, check(arm))
                for name, (description, check) in checks.items()]
        reading = rl_signatures.lazy_displacement(mine) if rl else None
        for result in mine:
            if reading and result["name"].startswith("grpo_raises_correct"):
                result["reading"] = reading
        results += mine
    if not all(arm.phase("grpo") is not None and arm.phase("dpo") is None for arm in arms):
        results.append(_result(EXTENDED_LESS, None, EXTENDED_DESCRIPTION, _extended_lowers_less(arms)))
    if any(arm.on_policy for arm in arms):
        results.append(_result(ON_POLICY_LESS, None, ON_POLICY_DESCRIPTION, _on_policy_squeezes_less(arms)))
    return results


def read_explained(folder: str | Path) -> dict[str, Any]:
    """What one `learndyn explain` folder says about squeezing: the step and the probability mass it
    moved onto each position's argmax token (summed over the probe positions; > 0: mass went there)."""
    import json

    path = Path(folder) / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        mass = summary["argmax_mass"]
        return {"folder": str(folder), "loss": summary["loss"], "optimizer": summary["optimizer"],
                "lr": summary["lr"], "positions": summary["positions"], "argmax_mass_predicted": mass["predicted_sum"],
                "argmax_mass_actual": mass["actual_sum"]}
    except FileNotFoundError:
        raise LearndynError(f"{folder}: not an explain folder (no summary.json)") from None
    except (ValueError, KeyError, TypeError) as err:
        raise LearndynError(f"{path}: not a summary written by learndyn explain ({first_line(err)})") from None


def attach_explained(results: list[dict[str, Any]], steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Put the explained steps beside every squeezing result (reported, not part of its verdict)."""
    if steps:
        for result in results:
            if result["name"].startswith("dpo_squeezing"):
                result["explained_steps"] = steps
    return results


def explained_text(step: dict[str, Any]) -> str:
    return (f"explained step {Path(step['folder']).name} ({step['loss']}, {step['optimizer']} lr {step['lr']:g}): "
            f"mass onto argmax tokens {step['argmax_mass_actual']:+.4g} actual, {step['argmax_mass_predicted']:+.4g} "
            f"predicted, over {step['positions']} positions")


def _paired_dpo_changes(a: Arm, b: Arm, metrics: dict[str, tuple[str, str]]) -> pd.DataFrame | str:
    """Per-example DPO-phase change in arm b minus arm a, for each (type, metric), on the shared examples."""
    columns = {}
    for quantity, (response_type, metric) in metrics.items():
        one, two = (changes(arm.phase("dpo"), [response_type], metric) for arm in (a, b))
        if one.empty or two.empty:
            return f"no {response_type} {metric} in both arms"
        columns[quantity] = two[response_type] - one[response_type]
    table = pd.DataFrame(columns).dropna(how="all")
    return table if not table.empty else "the arms share no probe examples"


def _extended_lowers_less(arms: list[Arm]) -> Outcome | str:
    pick = {kind: next((a for a in arms if a.kind == kind and not a.on_policy and a.phase("dpo") is not None), None)
            for kind in ("baseline", "extended")}
    if None in pick.values():
        return "needs a baseline and an extended arm, both with a DPO phase"
    table = _paired_dpo_changes(pick["baseline"], pick["extended"], {
        "chosen change, extended - baseline": ("chosen", "logp_sum"),
        "rejected change, extended - baseline": ("rejected", "logp_sum")})
    if isinstance(table, str):
        return table
    signs, required = {q: 1 for q in table.columns}, {}
    argmax = _paired_dpo_changes(pick["baseline"], pick["extended"],
                                 {"chosen argmax_logp change, extended - baseline": ("chosen", "argmax_logp")})
    if not isinstance(argmax, str):
        table = table.join(argmax, how="outer")
        signs |= {q: -1 for q in argmax.columns}
        required = {q: False for q in argmax.columns}
    return Outcome(estimates(table, signs, required=required))


def _on_policy_squeezes_less(arms: list[Arm]) -> Outcome | str:
    """The off- and on-policy arms of the same kind start DPO from the same SFT model, so their DPO-phase
    changes compare directly, paired per example."""
    on = next((a for a in arms if a.on_policy and a.phase("dpo") is not None), None)
    off = next((a for a in arms if on is not None and not a.on_policy and a.kind == on.kind
                and a.phase("dpo") is not None), None)
    if on is None or off is None:
        return "needs an off-policy and an on-policy DPO arm of the same kind"
    table = _paired_dpo_changes(off, on, {"chosen argmax_logp change, on - off": ("chosen", "argmax_logp"),
                                          "chosen change, on - off": ("chosen", "logp_sum")})
    if isinstance(table, str):
        return table
    return Outcome(estimates(table, {"chosen argmax_logp change, on - off": -1, "chosen change, on - off": 1}))


def _result(name: str, arm: str | None, description: str, outcome: Outcome | str) -> dict[str, Any]:
    if isinstance(outcome, str):
        return {"name": name, "arm": arm, "verdict": NOT_APPLICABLE, "held": None, "numbers": {}, "estimates": [],
                "description": f"{description} (not applicable: {outcome})"}
    verdict = outcome.verdict or combine(outcome.estimates)
    return {"name": name, "arm": arm, "verdict": verdict, "held": {HELD: True, NOT_HELD: False}.get(verdict),
            "numbers": {e.quantity: _clean(e.effect) for e in outcome.estimates},
            "estimates": [e.as_dict() for e in outcome.estimates], "description": description}


def _clean(value: float) -> float | None:
    """JSON-safe: NaN/inf become None, numbers keep 6 significant digits."""
    value = float(value)
    return float(f"{value:.6g}") if math.isfinite(value) else None
