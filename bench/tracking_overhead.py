"""What tracking costs: the same short SFT run with and without the LearningDynamicsCallback.

    python bench/tracking_overhead.py [--examples 16] [--probes 8] [--every 2]

Built-in model, example data. Prints both wall times, their ratio, the share of the tracked run spent
scoring, and the callback's scoring throughput against the standalone scorer on the same probes and
model in the same run (they must match: the callback tokenizes once and never copies the model).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from learndyn import build_probes, load_model, load_preferences
from learndyn.scoring import encode_probes, score_encoded
from learndyn.training.callback import LearningDynamicsCallback
from learndyn.training.recipes import TrainSettings, build_trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument("--every", type=int, default=2)
    args = parser.parse_args()

    prefs = load_preferences("example", limit=args.examples)
    probes = build_probes(prefs[: args.probes])
    n_responses = sum(len(p.responses) for p in probes)
    with tempfile.TemporaryDirectory() as tmp:
        plain_s, _, _ = sft_run(prefs, Path(tmp) / "plain", None)
        callback = LearningDynamicsCallback(probes, out=Path(tmp) / "tracked", every=args.every)
        timings = time_evaluations(callback)
        tracked_s, model, tokenizer = sft_run(prefs, Path(tmp) / "tracked", callback)
        encoded = encode_probes(probes, tokenizer)
        start = time.perf_counter()
        score_encoded(model, encoded, progress=None)
        standalone_s = time.perf_counter() - start

    scoring_s = sum(timings)
    per_eval = scoring_s / len(timings)
    print(f"SFT on {args.examples} examples, {n_responses} probe responses scored {len(timings)} times "
          f"(every {args.every} steps, plus start and end)")
    print(f"without callback: {plain_s:.1f} s; with callback: {tracked_s:.1f} s; ratio {tracked_s / plain_s:.2f}x")
    print(f"scoring share of the tracked run: {scoring_s:.1f} s = {scoring_s / tracked_s:.0%}")
    print(f"callback scoring: {n_responses / per_eval:.2f} responses/s per evaluation; standalone scorer on the "
          f"same model: {n_responses / standalone_s:.2f} responses/s (ratio {standalone_s / per_eval:.2f})")


def sft_run(prefs, run: Path, callback) -> tuple[float, object, object]:
    """One SFT run on a freshly loaded built-in model; returns (wall seconds, trained model, tokenizer)."""
    model, tokenizer = load_model(device="cpu", dtype="float32")
    model.config.use_cache = False
    settings = TrainSettings(phase="sft", data="example", probes="-", out=str(run), epochs=1, batch_size=8,
                             learning_rate=5e-5, max_length=256)
    trainer = build_trainer(settings, model, tokenizer, prefs, run)
    if callback is not None:
        trainer.add_callback(callback)
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start, model, tokenizer


def time_evaluations(callback: LearningDynamicsCallback) -> list[float]:
    """Wrap the callback's evaluation to record how long each one takes."""
    timings: list[float] = []
    evaluate = callback._evaluate

    def timed(*args, **kwargs):
        start = time.perf_counter()
        before = len(callback.done)
        evaluate(*args, **kwargs)
        if len(callback.done) > before:  # an evaluation ran (not a skipped step)
            timings.append(time.perf_counter() - start)

    callback._evaluate = timed
    return timings


if __name__ == "__main__":
    main()
