"""What tracking costs in GRPO: the same short run with and without the LearningDynamicsCallback.

    python bench/grpo_overhead.py [--prompts 8] [--probes 8] [--every 2] [--generations 4]

Built-in model, built-in arithmetic task, TRL's GRPOTrainer as `learndyn train grpo` builds it. Prints
both wall times and their ratio; where the tracked run's time went (sampling, reward, scoring the
probes, and the rest: log-probabilities, the loss, backward and the optimizer); and the callback's
scoring throughput against the standalone scorer on the same probes and trained model in the same
run (they must match: the callback tokenizes once and never copies the model).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from tracking_overhead import time_evaluations

from learndyn import build_probes, load_model, load_preferences
from learndyn.scoring import encode_probes, score_encoded
from learndyn.training.callback import LearningDynamicsCallback
from learndyn.training.recipes import TrainSettings, build_trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()

    prefs = load_preferences(f"arithmetic[0:{args.prompts}]")
    probes = build_probes(load_preferences(f"arithmetic[0:{args.probes}]"))
    n_responses = sum(len(p.responses) for p in probes)
    with tempfile.TemporaryDirectory() as tmp:
        plain_s, plain_parts, _, _ = grpo_run(prefs, Path(tmp) / "plain", None, args)
        callback = LearningDynamicsCallback(probes, out=Path(tmp) / "tracked", every=args.every, phase="grpo")
        timings = time_evaluations(callback)
        tracked_s, parts, model, tokenizer = grpo_run(prefs, Path(tmp) / "tracked", callback, args)
        encoded = encode_probes(probes, tokenizer)
        start = time.perf_counter()
        score_encoded(model, encoded, progress=None)
        standalone_s = time.perf_counter() - start

    scoring_s = sum(timings)
    per_eval = scoring_s / len(timings)
    steps = args.prompts * args.generations // (2 * args.generations)
    print(f"GRPO on {args.prompts} arithmetic prompts x {args.generations} samples ({steps} steps, "
          f"{args.max_new_tokens} new tokens at most); {n_responses} probe responses scored {len(timings)} times "
          f"(every {args.every} steps, plus start and end)")
    print(f"without callback: {plain_s:.1f} s (sampling {plain_parts['sampling']:.1f} s); with callback: "
          f"{tracked_s:.1f} s; ratio {tracked_s / plain_s:.2f}x")
    rest = tracked_s - parts["sampling"] - parts["reward"] - scoring_s
    print("tracked run: " + ", ".join(f"{name} {s:.1f} s = {s / tracked_s:.0%}" for name, s in
                                      (("sampling", parts["sampling"]), ("reward", parts["reward"]),
                                       ("scoring probes", scoring_s), ("training and the rest", rest))))
    print(f"callback scoring: {n_responses / per_eval:.2f} responses/s per evaluation; standalone scorer on the "
          f"same model: {n_responses / standalone_s:.2f} responses/s (ratio {standalone_s / per_eval:.2f})")


def grpo_run(prefs, run: Path, callback, args) -> tuple[float, dict[str, float], object, object]:
    """One GRPO epoch (2 prompts per step) on a freshly loaded built-in model; returns (wall seconds,
    seconds in sampling and in the reward, trained model, tokenizer)."""
    model, tokenizer = load_model(device="cpu", dtype="float32")
    model.config.use_cache = False
    settings = TrainSettings(phase="grpo", data="arithmetic", probes="-", out=str(run), reward="arithmetic",
                             epochs=1, batch_size=2 * args.generations, num_generations=args.generations,
                             learning_rate=1e-5, max_new_tokens=args.max_new_tokens, every=args.every)
    trainer = build_trainer(settings, model, tokenizer, prefs, run)
    parts = {"sampling": 0.0, "reward": 0.0}
    trainer._generate = _timed(trainer._generate, parts, "sampling")
    trainer.reward_funcs = [_timed(f, parts, "reward") for f in trainer.reward_funcs]
    if callback is not None:
        trainer.add_callback(callback)
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start, parts, model, tokenizer


def _timed(function, parts: dict[str, float], name: str):
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            parts[name] += time.perf_counter() - start

    timed.__name__ = getattr(function, "__name__", name)
    return timed


if __name__ == "__main__":
    main()
