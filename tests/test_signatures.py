"""The paper's signatures decided with a paired bootstrap: held, not held or inconclusive.

Arms are built in memory: each response type's mean follows a given curve over evaluations, and each
of N examples adds its own offset plus independent noise at every evaluation, so a signature can be
made to hold, fail or be pure noise on purpose.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from learndyn.report.arms import Arm, Segment
from learndyn.report.signatures import (EXTENDED_LESS, HELD, INCONCLUSIVE, NOT_APPLICABLE, NOT_HELD, ON_POLICY_LESS,
                                        PER_ARM, bootstrap, evaluate)

SFT = {"chosen": [-50, -40, -30], "rejected": [-60, -58, -55], "other_train": [-70, -65, -62],
       "shuffled_chosen": [-90, -95, -99], "shuffled_other": [-95, -97, -100], "greedy": [-10, -12, -14]}
DPO = {"chosen": [-30, -27, -33], "rejected": [-55, -70, -90], "other_train": [-62, -64, -67],
       "other_test": [-70, -72, -74], "shuffled_chosen": [-99, -101, -104], "greedy": [-14, -15, -17]}
DPO_ARGMAX = {"chosen": [-8, -6, -3], "other_test": [-9, -7, -4]}


def segment(phase: str, curves: dict[str, list[float]], *, n: int = 16, noise: float = 1.0, rng=None,
            argmax: dict[str, list[float]] | None = None, run: str = "run") -> Segment:
    """One phase: example i of type t at evaluation s has logp_sum curves[t][s] + offset_i + noise."""
    rng = rng if rng is not None else np.random.default_rng(0)
    argmax = argmax or {}
    columns: dict[str, list] = {k: [] for k in ("step", "epoch", "response_type", "logp_sum", "argmax_logp")}
    for t, values in curves.items():
        offsets = rng.normal(0, 5, n)
        for s, value in enumerate(values):
            top = argmax[t][s] if t in argmax else value + 1
            columns["step"].append(np.full(n, 5 * s))
            columns["epoch"].append(np.full(n, s / (len(values) - 1)))
            columns["response_type"].append(np.full(n, t, dtype=object))
            columns["logp_sum"].append(value + offsets + rng.normal(0, noise, n))
            columns["argmax_logp"].append(top + offsets + rng.normal(0, noise, n))
    rows = pd.DataFrame({k: np.concatenate(v) for k, v in columns.items()})
    rows.insert(0, "example_id", np.tile(np.arange(n), len(rows) // n))
    rows.insert(0, "phase", phase)
    return Segment(Path(run), phase, {"phase": phase}, rows)


def arm(sft: dict | None = SFT, dpo: dict | None = DPO, *, kind: str = "baseline", on_policy: bool = False,
        argmax: dict | None = None, **kw) -> Arm:
    segs = []
    if sft is not None:
        segs.append(segment("sft", sft, **kw))
    if dpo is not None:
        segs.append(segment("dpo", dpo, argmax=DPO_ARGMAX if argmax is None else argmax, **kw))
    return Arm(kind if not on_policy else f"{kind}, on-policy DPO", kind, segs, on_policy)


def verdicts(results: list[dict]) -> dict[str, str]:
    return {r["name"].split(" [")[0]: r["verdict"] for r in results}


def test_the_papers_shapes_with_noise_hold():
    found = verdicts(evaluate([arm()]))
    assert {name: found[name] for name in PER_ARM} == {name: HELD for name in PER_ARM}
    assert found[EXTENDED_LESS] == NOT_APPLICABLE  # one arm only


def test_contrary_shapes_do_not_hold():
    sft = {"chosen": [-30, -40, -50], "other_train": [-60, -65, -70], "shuffled_chosen": [-90, -85, -80]}
    dpo = {"chosen": [-50, -45, -40], "rejected": [-60, -55, -50], "other_train": [-60, -55, -50],
           "other_test": [-70, -65, -60]}
    found = verdicts(evaluate([arm(sft, dpo, argmax={"chosen": [-30, -40, -50], "other_test": [-9, -12, -15]})]))
    assert {name: found[name] for name in PER_ARM} == {name: NOT_HELD for name in PER_ARM}


@pytest.mark.parametrize("steps", [3, 6])
def test_flat_noisy_runs_rarely_hold(steps):
    """100 seeded runs in which nothing moves, with per-evaluation noise of about a nat per example:
    no signature may hold more often than chance allows (5%; 10 of 100 is the binomial 99% bound)."""
    flat = {t: [-50.0] * steps for t in ("chosen", "rejected", "other_train", "other_test", "shuffled_chosen",
                                         "shuffled_other", "greedy")}
    held: dict[str, int] = {}
    for seed in range(100):
        rng = np.random.default_rng(seed)
        arms = [arm(flat, flat, argmax={t: [-40.0] * steps for t in flat}, rng=rng, n=12),
                arm(flat, flat, kind="extended", argmax={t: [-40.0] * steps for t in flat}, rng=rng, n=12)]
        for r in evaluate(arms):
            held[r["name"]] = held.get(r["name"], 0) + (r["verdict"] == HELD)
    assert len(held) == 2 * len(PER_ARM) + 1
    assert max(held.values()) <= 10, held


def test_a_mean_change_smaller_than_its_spread_is_inconclusive():
    """Half the examples rise by 2, half fall by 1.8: the mean rises, but not beyond its interval."""
    rows = [{"phase": "sft", "step": s, "epoch": s, "example_id": f"ex{i}", "response_type": "chosen",
             "logp_sum": -50.0 + s * (2.0 if i % 2 else -1.8)} for i in range(12) for s in (0, 1)]
    one = Arm("baseline", "baseline", [Segment(Path("run"), "sft", {}, pd.DataFrame(rows))])
    result = evaluate([one])[0]
    assert result["verdict"] == INCONCLUSIVE and result["held"] is None
    assert result["estimates"][0]["effect"] == pytest.approx(0.1)
    assert result["estimates"][0]["low"] < 0 < result["estimates"][0]["high"]


def test_rise_then_fall_needs_both_a_rise_and_a_fall():
    only_falls = verdicts(evaluate([arm(None, {"chosen": [-30, -35, -40, -45], "rejected": [-50, -60, -70, -80]},
                                        argmax={})]))
    assert only_falls["dpo_chosen_rises_then_falls"] == NOT_HELD  # the old "ends below its peak" said held
    only_rises = verdicts(evaluate([arm(None, {"chosen": [-30, -25, -20, -15], "rejected": [-50, -60, -70, -80]},
                                        argmax={})]))
    assert only_rises["dpo_chosen_rises_then_falls"] == NOT_HELD
    late_peak = evaluate([arm(None, {"chosen": [-30, -31, -20, -26], "rejected": [-50, -60, -70, -80]}, argmax={})])
    result = next(r for r in late_peak if r["name"].startswith("dpo_chosen_rises_then_falls"))
    assert result["verdict"] == HELD
    assert [e["quantity"] for e in result["estimates"]] == ["rise to step 10", "fall from step 10 to the end"]
    assert result["estimates"][0]["level"] == pytest.approx(1 - 0.05 / 2)  # two interior steps searched


def test_squeezing_is_not_chosen_becoming_the_argmax():
    """Chosen's argmax_logp rises because chosen's own tokens become the argmax: the gap shrinks."""
    dpo = {"chosen": [-30, -20, -10], "rejected": [-50, -60, -70]}
    found = verdicts(evaluate([arm(None, dpo, argmax={"chosen": [-15, -12, -10]})]))
    assert found["dpo_squeezing"] == NOT_HELD


def test_dpo_lowers_most_others_counts_types():
    most_rise = {"chosen": [-30, -30], "rejected": [-50, -60], "other_train": [-60, -50], "other_test": [-60, -50],
                 "greedy": [-10, -5]}
    assert verdicts(evaluate([arm(None, most_rise)]))["dpo_lowers_most_others"] == NOT_HELD
    result = next(r for r in evaluate([arm()]) if r["name"].startswith("dpo_lowers_most_others"))
    assert result["estimates"][0]["effect"] == 1.0 and result["estimates"][0]["claim"] == "> 0.5"


def test_extended_is_judged_on_dpo_changes_not_end_values():
    base = arm()
    higher = {t: [v + 20 for v in values] for t, values in DPO.items()}  # starts higher, falls as much
    found = verdicts(evaluate([base, arm(dpo=higher, kind="extended", rng=np.random.default_rng(1))]))
    assert found[EXTENDED_LESS] != HELD
    gentler = {t: [values[0]] * 3 for t, values in DPO.items()}  # DPO moves nothing in the extended arm
    results = evaluate([base, arm(dpo=gentler, kind="extended", rng=np.random.default_rng(1))])
    ext = next(r for r in results if r["name"] == EXTENDED_LESS)
    assert ext["verdict"] == HELD
    assert [e["claim"] for e in ext["estimates"]] == ["> 0", "> 0", "< 0 (reported only)"]


@pytest.mark.parametrize("argmax, chosen, expected", [
    ([-8, -7.5, -7], [-30, -29, -29], HELD),       # argmax rises 1 (off: 5), chosen rises (off: falls 3)
    ([-8, -4, 2], [-30, -29, -29], NOT_HELD),      # argmax rises more than off-policy
    ([-8, -7.5, -7], [-30, -35, -40], NOT_HELD),   # chosen falls more than off-policy
])
def test_on_policy_squeezes_less(argmax, chosen, expected):
    off = arm()
    on = arm(dpo={**DPO, "chosen": chosen}, on_policy=True, argmax={"chosen": argmax}, rng=np.random.default_rng(2))
    result = next(r for r in evaluate([off, on]) if r["name"] == ON_POLICY_LESS)
    assert result["verdict"] == expected


def test_bootstrap_interval_covers_the_mean_and_narrows_with_more_examples():
    rng = np.random.default_rng(3)
    small, large = (pd.DataFrame({"x": rng.normal(1.0, 2.0, n)}) for n in (10, 1000))
    (e1,), (lo1,), (hi1,) = bootstrap(small)
    (e2,), (lo2,), (hi2,) = bootstrap(large)
    assert lo1 < e1 < hi1 and lo2 < 1.0 < hi2
    assert (hi2 - lo2) < (hi1 - lo1) / 5
    # the percentile interval of a mean is about mean ± 1.96 standard errors
    assert (hi2 - lo2) == pytest.approx(2 * 1.96 * large["x"].std() / np.sqrt(1000), rel=0.1)


def test_bootstrap_keeps_an_examples_quantities_paired():
    """Two quantities that differ per example by exactly 1 differ by exactly 1 in every resample."""
    rng = np.random.default_rng(4)
    x = rng.normal(0, 10, 20)
    effect, low, high = bootstrap(pd.DataFrame({"d": (x + 1) - x}))
    assert low[0] == pytest.approx(1.0) and high[0] == pytest.approx(1.0)
