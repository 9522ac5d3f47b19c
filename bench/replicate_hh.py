"""Validation on real data: SFT -> DPO with the built-in model on the shared HH probe set.

    python bench/replicate_hh.py [--examples 64] [--probes 16] [--out bench-runs/hh]

Trains on the first N prompts of ../shared/data/hh_helpful_probes/train.jsonl (HH transcripts; the
authors' probe columns are ignored by training), tracks all twelve response types of the first P of
those prompts (their chosen responses are trained on), writes the report and prints the signatures.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from learndyn.report import build_report, evaluate_signatures
from learndyn.training.recipes import TrainSettings, train

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh_helpful_probes" / "train.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HH,
                        help="HH probe file (default: ../shared/data/hh_helpful_probes/train.jsonl)")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--probes", type=int, default=16)
    parser.add_argument("--sft-epochs", type=float, default=2.0)
    parser.add_argument("--dpo-epochs", type=float, default=2.0)
    parser.add_argument("--sft-lr", type=float, default=5e-5)
    parser.add_argument("--dpo-lr", type=float, default=2e-5)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("bench-runs/hh"))
    args = parser.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"HH probe file not found: {args.data}")

    common = dict(data=str(args.data), probes=str(args.data), limit=args.examples, probe_limit=args.probes,
                  every=args.every, batch_size=8, max_length=512)
    start = time.perf_counter()
    sft = train(TrainSettings(phase="sft", out=str(args.out / "sft"), epochs=args.sft_epochs,
                              learning_rate=args.sft_lr, **common), overwrite=True)
    dpo = train(TrainSettings(phase="dpo", out=str(args.out / "dpo"), from_run=str(sft), epochs=args.dpo_epochs,
                              learning_rate=args.dpo_lr, **common), overwrite=True)
    page = build_report([sft, dpo], args.out)
    print(f"SFT -> DPO on {args.examples} HH prompts, {args.probes} tracked, in {time.perf_counter() - start:.0f} s")
    for sig in evaluate_signatures([sft, dpo]):
        mark = {True: "held", False: "did NOT hold", None: "n/a"}[sig["held"]]
        numbers = ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in sig["numbers"].items())
        print(f"  {sig['name']}: {mark} ({numbers})")
    print(f"report: {page}")


if __name__ == "__main__":
    main()
