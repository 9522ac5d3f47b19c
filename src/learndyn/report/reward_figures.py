"""The reward figure of GRPO runs: what TRL logs as means, drawn from every sample's kept reward.

Per optimizer step: the mean reward over the step's samples (a band of ± one standard error over its
prompt groups) and the share of groups whose samples all got the same reward, which trained nothing.
Drawn with matplotlib's object API, returned as PNG bytes, like figures.py.
"""

from __future__ import annotations

import io

import pandas as pd
from matplotlib.figure import Figure

from learndyn.report.arms import Arm
from learndyn.report.figures import STYLES, plain
from learndyn.report.rl_signatures import groups
from learndyn.training.runs import read_rewards


def reward_tables(arms: list[Arm]) -> dict[str, pd.DataFrame]:
    """Arm label -> per-step table (step, mean, sem, no_variance) for arms with a GRPO phase."""
    tables = {}
    for arm in arms:
        seg = arm.phase("grpo")
        rewards = read_rewards(seg.run) if seg is not None else None
        if rewards is None or rewards.empty:
            continue
        per_group = groups(rewards)
        per_step = per_group.groupby("step").agg(mean=("mean", "mean"), sem=("mean", "sem"),
                                                 no_variance=("varied", lambda v: 1 - v.mean()))
        tables[arm.label] = per_step.reset_index().fillna({"sem": 0.0})
    return tables


def render(arms: list[Arm]) -> bytes | None:
    """The reward figure as PNG bytes, or None when no arm kept rewards."""
    tables = reward_tables(arms)
    if not tables:
        return None
    fig = Figure(figsize=(10.4, 3.8), layout="constrained")
    reward_ax, flat_ax = fig.subplots(1, 2)
    for i, (label, table) in enumerate(tables.items()):
        style = STYLES[i % len(STYLES)]
        reward_ax.plot(table["step"], table["mean"], color="C0", linestyle=style, label=plain(label))
        reward_ax.fill_between(table["step"], table["mean"] - table["sem"], table["mean"] + table["sem"],
                               color="C0", alpha=0.2)
        flat_ax.plot(table["step"], table["no_variance"], color="C3", linestyle=style, label=plain(label))
    reward_ax.set(title="mean reward per step (± s.e. over prompt groups)", xlabel="optimizer step",
                  ylabel="reward")
    flat_ax.set(title="share of groups without reward variance (no gradient)", xlabel="optimizer step",
                ylabel="share", ylim=(-0.02, 1.02))
    for ax in (reward_ax, flat_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()
