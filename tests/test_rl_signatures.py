"""The RL signatures of a GRPO phase, decided on synthetic metrics and reward logs built on purpose."""

from __future__ import annotations

import numpy as np
import pandas as pd
from test_signatures import segment, verdicts

from learndyn.report.arms import Arm
from learndyn.report.signatures import HELD, INCONCLUSIVE, NOT_APPLICABLE, NOT_HELD, evaluate

GRPO = {"chosen": [-9, -7, -5], "sample_rewarded": [-12, -10, -8], "sample_unrewarded": [-20, -24, -28],
        "greedy": [-10, -9, -8]}
ARGMAX = {"chosen": [-6, -4, -2]}
TRAINED = [f"{i}" for i in range(8)]  # probe examples 0..7 are trained, 8..15 never


def grpo_arm(run, curves=GRPO, *, argmax=ARGMAX, entropy_drop=0.5, rng=None) -> Arm:
    seg = segment("grpo", curves, argmax=argmax, run=str(run), rng=rng)
    seg.frame["example_id"] = seg.frame["example_id"].astype(str)
    step_index = seg.frame["step"] // 5
    noise = (rng or np.random.default_rng(1)).normal(0, 0.05, len(seg.frame))
    seg.frame["entropy"] = 2.0 - entropy_drop * step_index + noise
    return Arm("GRPO", "baseline", [seg])


def write_rewards(run, means_per_visit: list[float], *, prompts=TRAINED, generations=4, rng=None) -> None:
    """Each prompt visited once per entry of `means_per_visit`; its samples rewarded 1 with that chance."""
    rng = rng if rng is not None else np.random.default_rng(2)
    rows = []
    for visit, p in enumerate(means_per_visit):
        for i, eid in enumerate(prompts):
            for g in range(generations):
                rows.append({"step": 1 + visit * len(prompts) + i, "example_id": eid, "generation": g,
                             "reward": float(rng.random() < p), "completion_tokens": 5})
    (run / "rewards").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(run / "rewards" / "grpo-step00000099.parquet", index=False)


def test_a_grpo_run_that_learns_holds_every_rl_signature(tmp_path):
    write_rewards(tmp_path, [0.1, 0.4, 0.8])
    results = evaluate([grpo_arm(tmp_path)])
    found = verdicts(results)
    assert found == {"grpo_reward_rises": HELD, "grpo_raises_correct": HELD, "grpo_lowers_unrewarded": HELD,
                     "grpo_squeezing": HELD, "grpo_entropy_falls": HELD}  # no SFT/DPO rows for a GRPO-only arm
    rise = next(r for r in results if r["name"].startswith("grpo_reward_rises"))
    quantities = [e["quantity"] for e in rise["estimates"]]
    assert quantities[0] == "reward change per prompt (last visit - first)"
    reported = {e["quantity"]: e for e in rise["estimates"][1:]}
    assert all(e["claim"] == "reported only" for e in reported.values())
    assert 0.3 < reported["mean reward"]["effect"] < 0.6
    squeeze = next(r for r in results if r["name"].startswith("grpo_squeezing"))
    assert squeeze["estimates"][0]["quantity"] == "chosen argmax_logp change, prompts never trained"
    assert "reading" not in next(r for r in results if r["name"].startswith("grpo_raises_correct"))


def test_reward_rising_while_correct_responses_fall_reads_as_lazy_likelihood_displacement(tmp_path):
    write_rewards(tmp_path, [0.1, 0.5, 0.9])
    falling = {**GRPO, "chosen": [-9, -11, -13], "sample_rewarded": [-12, -13, -15]}
    results = evaluate([grpo_arm(tmp_path, falling)])
    correct = next(r for r in results if r["name"].startswith("grpo_raises_correct"))
    assert correct["verdict"] == NOT_HELD and correct["reading"] == (
        "lazy likelihood displacement: the reward rose while log π of correct responses did not (chosen not held, "
        "sample_rewarded not held)")


def test_flat_rewards_are_not_a_rise(tmp_path):
    held = 0
    for seed in range(30):
        run = tmp_path / f"r{seed}"
        write_rewards(run, [0.4, 0.4, 0.4], rng=np.random.default_rng(seed))
        held += verdicts(evaluate([grpo_arm(run)]))["grpo_reward_rises"] == HELD
    assert held <= 3  # a one-sided claim holds on noise about 2.5% of the time


def test_one_visit_per_prompt_compares_later_steps_with_earlier_ones(tmp_path):
    prompts = [f"p{i}" for i in range(24)]
    rng = np.random.default_rng(3)
    rows = [{"step": 1 + i, "example_id": eid, "generation": g, "reward": float(rng.random() < 0.1 + 0.035 * i),
             "completion_tokens": 5} for i, eid in enumerate(prompts) for g in range(4)]
    (tmp_path / "rewards").mkdir()
    pd.DataFrame(rows).to_parquet(tmp_path / "rewards" / "grpo-step00000024.parquet", index=False)
    rise = next(r for r in evaluate([grpo_arm(tmp_path)]) if r["name"].startswith("grpo_reward_rises"))
    first = rise["estimates"][0]
    assert first["quantity"] == "mean group reward, later half of the steps - earlier half"
    assert first["verdict"] == HELD and first["low"] > 0


def test_without_kept_rewards_or_rl_probes_the_checks_say_why(tmp_path):
    arm = grpo_arm(tmp_path, {"chosen": [-9, -9.1, -9]}, argmax={})
    results = {r["name"].split(" [")[0]: r for r in evaluate([arm])}
    assert results["grpo_reward_rises"]["verdict"] == NOT_APPLICABLE
    assert "no rewards kept" in results["grpo_reward_rises"]["description"]
    assert results["grpo_lowers_unrewarded"]["verdict"] == NOT_APPLICABLE
    assert "probes build --reward" in results["grpo_lowers_unrewarded"]["description"]
    # no reward log: no probe prompt is known to be untrained, and there is no other_test
    assert results["grpo_squeezing"]["verdict"] == NOT_APPLICABLE
    assert results["grpo_raises_correct"]["verdict"] == INCONCLUSIVE
