"""RL signatures: what a GRPO phase does, decided with the same statistics as the DPO signatures.

The claims follow the paper's outlook and its follow-ups on RL finetuning with verifiable rewards:

    grpo_reward_rises          the reward rises (per prompt: its group's mean reward at its last visit
                               minus its first; one visit per prompt: the later half of the groups
                               against the earlier half, unpaired)
    grpo_raises_correct        log π of correct responses rises (chosen, the reference answer, and
                               sample_rewarded, the model's own rewarded sample); when the reward rises
                               but this does not hold, that is "lazy likelihood displacement"
    grpo_lowers_unrewarded     log π of the model's own unrewarded sample falls (negative advantages push)
    grpo_squeezing             the argmax path gains on prompts never trained (probe prompts absent
                               from the run's reward log; else other_test, answers never trained on)
    grpo_entropy_falls         the policy's entropy along its own responses (greedy, sample_*) falls

Probe claims use the per-example change over the phase and the paired bootstrap of signatures.py. The
reward claim reads RUN/rewards/ (training/grpo.py); beside it, reported only: the mean reward, the
spread of rewards within groups, and the share of groups without reward variance (those trained
nothing). Like the rest of the report layer this module reads files only.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from learndyn.report.arms import Arm, Segment
from learndyn.report.signatures import (
    ALPHA,
    INCONCLUSIVE,
    RESAMPLES,
    SEED,
    Check,
    Estimate,
    Outcome,
    bootstrap,
    changes,
    estimates,
    expanded_tail,
)
from learndyn.training.runs import read_rewards

OWN_TYPES = ("greedy", "sample_rewarded", "sample_unrewarded")
LAZY = "lazy likelihood displacement"


def groups(rewards: pd.DataFrame) -> pd.DataFrame:
    """One row per (step, example_id) group: its mean reward, reward std and whether rewards varied."""
    grouped = rewards.groupby(["step", "example_id"])["reward"]
    out = grouped.agg(mean="mean", std="std", low="min", high="max").reset_index()
    out["varied"] = out["high"] > out["low"]
    return out


def _rewards(seg: Segment) -> pd.DataFrame | None:
    rewards = read_rewards(seg.run)
    return None if rewards is None or rewards.empty else rewards


def _reward_rises(arm: Arm) -> Outcome | str:
    seg = arm.phase("grpo")
    if seg is None:
        return "no GRPO phase"
    rewards = _rewards(seg)
    if rewards is None:
        return f"no rewards kept in {seg.run / 'rewards'}"
    table = groups(rewards)
    visits = table.sort_values("step").groupby("example_id")["mean"]
    revisited = visits.count()[lambda n: n >= 2].index
    if len(revisited) >= 3:
        change = (visits.last() - visits.first())[revisited]
        rise = estimates(pd.DataFrame({"reward change per prompt (last visit - first)": change}),
                         {"reward change per prompt (last visit - first)": 1})
    else:
        rise = [_later_minus_earlier(table)]
    return Outcome(rise + _reported(table))


def _later_minus_earlier(table: pd.DataFrame) -> Estimate:
    """Mean group reward of the later half of the steps minus the earlier half: two independent
    samples of groups, each resampled with replacement (fixed seed)."""
    steps = sorted(table["step"].unique())
    cut = steps[len(steps) // 2] if len(steps) > 1 else math.inf
    early = table.loc[table["step"] < cut, "mean"].to_numpy()
    late = table.loc[table["step"] >= cut, "mean"].to_numpy()
    name = "mean group reward, later half of the steps - earlier half"
    if len(early) < 2 or len(late) < 2:
        return Estimate(name, 1, math.nan, math.nan, math.nan)
    rng = np.random.default_rng(SEED)
    diffs = (rng.choice(late, (RESAMPLES, len(late))).mean(1) - rng.choice(early, (RESAMPLES, len(early))).mean(1))
    tail = expanded_tail(ALPHA, min(len(early), len(late)))
    low, high = np.percentile(diffs, [100 * tail, 100 * (1 - tail)])
    return Estimate(name, 1, float(late.mean() - early.mean()), float(low), float(high))


def _reported(table: pd.DataFrame) -> list[Estimate]:
    """Mean reward, within-group spread and the share of groups without variance, with intervals
    over groups; reported beside the claim, not part of it."""
    frame = pd.DataFrame({"mean reward": table["mean"], "reward std within a group": table["std"],
                          "share of groups without reward variance": (~table["varied"]).astype(float)})
    effect, low, high = bootstrap(frame)
    return [Estimate(q, 0, float(e), float(lo), float(hi), required=False)
            for q, e, lo, hi in zip(frame.columns, effect, low, high)]


def _raises_correct(arm: Arm) -> Outcome | str:
    seg = arm.phase("grpo")
    if seg is None:
        return "no GRPO phase"
    table = changes(seg, ["chosen", "sample_rewarded"])
    if table.empty:
        return "no chosen or sample_rewarded probes"
    return Outcome(estimates(table.rename(columns=lambda t: f"{t} change"),
                             {f"{t} change": 1 for t in table.columns}))


def _lowers_unrewarded(arm: Arm) -> Outcome | str:
    seg = arm.phase("grpo")
    if seg is None:
        return "no GRPO phase"
    table = changes(seg, ["sample_unrewarded"])
    if table.empty:
        return "no sample_unrewarded probes (probes build --reward makes them)"
    return Outcome(estimates(table.rename(columns={"sample_unrewarded": "sample_unrewarded change"}),
                             {"sample_unrewarded change": -1}))


def _squeezing(arm: Arm) -> Outcome | str:
    seg = arm.phase("grpo")
    if seg is None:
        return "no GRPO phase"
    rewards = _rewards(seg)
    trained = set(rewards["example_id"]) if rewards is not None else set()
    argmax = changes(seg, ["chosen"], "argmax_logp")
    untrained = argmax.loc[[e for e in argmax.index if e not in trained]] if rewards is not None else argmax.iloc[:0]
    if len(untrained) >= 2:
        table = untrained.rename(columns={"chosen": "chosen argmax_logp change, prompts never trained"})
    else:
        table = changes(seg, ["other_test"], "argmax_logp").rename(
            columns={"other_test": "other_test argmax_logp change"})
    if table.empty:
        return "no probe prompt absent from training and no other_test probes"
    return Outcome(estimates(table, {q: 1 for q in table.columns}))


def _entropy_falls(arm: Arm) -> Outcome | str:
    seg = arm.phase("grpo")
    if seg is None:
        return "no GRPO phase"
    table = changes(seg, list(OWN_TYPES), "entropy")
    if table.empty:
        return "no greedy or sample_* probes"
    quantity = f"entropy change along own responses ({', '.join(table.columns)})"
    return Outcome(estimates(pd.DataFrame({quantity: table.mean(axis=1)}), {quantity: -1}))


# name -> (the claim, check on one arm)
CHECKS: dict[str, tuple[str, Check]] = {
    "grpo_reward_rises": ("GRPO raises the reward (per prompt, paired across its visits; the mean reward, its "
                          "spread within groups and the share of groups without variance reported beside).",
                          _reward_rises),
    "grpo_raises_correct": ("GRPO raises log π of correct responses (chosen, the reference answer, and the "
                            f"model's own rewarded sample); not held while the reward rises is {LAZY}.",
                            _raises_correct),
    "grpo_lowers_unrewarded": ("GRPO lowers log π of the model's own unrewarded sample (the push of negative "
                               "advantages).", _lowers_unrewarded),
    "grpo_squeezing": ("Squeezing: the teacher-forced argmax path gains on prompts never trained (chosen's "
                       "argmax_logp rises), or on answers never trained (other_test).", _squeezing),
    "grpo_entropy_falls": ("The policy's entropy along its own responses falls.", _entropy_falls),
}


def lazy_displacement(results: list[dict]) -> str | None:
    """The reading of a held reward rise beside correct responses whose log π did not rise, naming them."""
    by_name = {r["name"].split(" [")[0]: r for r in results}
    rise, correct = by_name.get("grpo_reward_rises"), by_name.get("grpo_raises_correct")
    if rise is None or correct is None or rise["verdict"] != "held" or correct["verdict"] not in ("not held",
                                                                                              INCONCLUSIVE):
        return None
    lagging = [f"{e['quantity'].removesuffix(' change')} {e['verdict']}" for e in correct["estimates"]
               if e["verdict"] != "held"]
    return f"{LAZY}: the reward rose while log π of correct responses did not ({', '.join(lagging)})"
