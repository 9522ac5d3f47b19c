"""Squeezing on a real model: one DPO step with an off-policy vs an on-policy rejected response.

    python bench/squeeze_real.py [--rows 4] [--optimizer sgd] [--lr 1e-4]

For each of the first `--rows` example-data pairs, explains one DPO step twice on the built-in model:
off-policy (the data's rejected response, usually unlikely under the model: a valley) and on-policy
(the model's own greedy response as the rejected one: a peak). Observations are that prompt's probe
responses (every type the example probes have). Prints, per row and on average, log π of the
rejected response before the step, and the probability mass the step moves onto each position's
argmax token (predicted and actual, summed over all probe positions and per token), the mean
entropy change and the change of log π(chosen).
"""

from __future__ import annotations

import argparse

import pandas as pd

from learndyn import build_probes, load_model, load_preferences
from learndyn.dynamics.step import explain_step
from learndyn.dynamics.updates import OptimizerRule
from learndyn.experiments.explain import with_greedy_rejected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--optimizer", default="sgd")
    parser.add_argument("--lr", type=float, default=1e-4)
    args = parser.parse_args()

    model, tokenizer = load_model()
    prefs = load_preferences("example")[: args.rows]
    probes = build_probes(load_preferences("example")[: max(args.rows, 2)], held_out=load_preferences("example:test"))
    on_policy = with_greedy_rejected(model, tokenizer, prefs, max_new_tokens=64)
    rule = OptimizerRule(args.optimizer, args.lr)
    rows = []
    for i, (off, on) in enumerate(zip(prefs, on_policy)):
        for policy, pair in (("off", off), ("on", on)):
            got = explain_step(model, tokenizer, [pair], [probes[i]], loss="dpo", rule=rule)
            pos, ch = got.positions, got.changes.set_index("response_type")
            rows.append({
                "row": i, "policy": policy,
                "rejected_logp": got.summary["update"]["sequences"][1]["logp_sum"],
                "rejected_tokens": len(tokenizer(pair.rejected)["input_ids"]) + 1,
                "mass_pred_sum": pos["argmax_prob_predicted"].sum(), "mass_act_sum": pos["argmax_prob_actual"].sum(),
                "mass_act_per_token": pos["argmax_prob_actual"].mean(),
                "chosen_change": ch.loc["chosen", "actual"],
                "entropy_act": pos["entropy_actual"].mean(),
                "rel_error": got.summary["relative_error"],
            })
    table = pd.DataFrame(rows)
    pd.set_option("display.width", 200)
    print(f"one DPO step ({args.optimizer}, lr {args.lr:g}, beta 0.1), built-in model, observations: each prompt's probes")
    print(table.round(4).to_string(index=False))
    print("\nmeans by policy:")
    print(table.drop(columns="row").groupby("policy", sort=False).mean().round(4).to_string())


if __name__ == "__main__":
    main()
