"""How good is the first-order prediction on a real model? Built-in model, three learning rates.

    python bench/explain_accuracy.py [--responses 32] [--loss dpo] [--optimizer sgd] [--lrs 1e-3,1e-4,1e-5]

Explains one step on the first example-data pair against the first `--responses` probe responses
(example probe set, held-out answers included) at each learning rate, and prints the relative error
‖predicted − actual‖ / ‖actual‖ over responses (sequence-level Δ log π(y)), the rank correlation
between predicted and actual changes, and the same two numbers per token. The error should fall
roughly in proportion to the learning rate until float32 rounding of the actual change takes over.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from learndyn import build_probes, load_model, load_preferences
from learndyn.dynamics.explain import explain_step, rank_correlation
from learndyn.dynamics.updates import OptimizerRule

sys.path.insert(0, str(Path(__file__).parent))
from explain_cost import first_responses  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--responses", type=int, default=32)
    parser.add_argument("--loss", default="dpo")
    parser.add_argument("--optimizer", default="sgd")
    parser.add_argument("--lrs", default="1e-3,1e-4,1e-5")
    args = parser.parse_args()

    model, tokenizer = load_model()
    prefs = load_preferences("example")
    probes = first_responses(build_probes(prefs[:8], held_out=load_preferences("example:test")), args.responses)
    print(f"{args.loss} step on example pair 0 ({args.optimizer}), {sum(len(p.responses) for p in probes)} probe responses")
    print(f"{'lr':>8} {'rel. error':>11} {'rank corr.':>11} {'token rel. error':>17} {'token rank corr.':>17} "
          f"{'max |actual|':>13} {'time':>7}")
    for lr in (float(x) for x in args.lrs.split(",")):
        start = time.perf_counter()
        got = explain_step(model, tokenizer, prefs[:1], probes, loss=args.loss, rule=OptimizerRule(args.optimizer, lr))
        pos = got.positions
        token_err = ((pos["predicted"] - pos["actual"]) ** 2).sum() ** 0.5 / (pos["actual"] ** 2).sum() ** 0.5
        print(f"{lr:>8g} {got.summary['relative_error']:>11.3g} {got.summary['rank_correlation']:>11.4f} "
              f"{token_err:>17.3g} {rank_correlation(pos['predicted'], pos['actual']):>17.4f} "
              f"{got.changes['actual'].abs().max():>13.3g} {time.perf_counter() - start:>6.0f}s")


if __name__ == "__main__":
    main()
