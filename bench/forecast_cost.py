"""What a forecast costs as N grows: the per-pair passes on the built-in model, the N × N map measured.

    python bench/forecast_cost.py [--map-sizes 128 512 2048 10000] [--projection-dim 32768]
    python bench/forecast_cost.py --pairs 512 [--data HH] [--checkpoint bench-runs/forecast-cost512.pt]

The forecast's cost has two parts (learndyn.dynamics.forecast):
- per pair, independent of N: pass 1 (a forward and a backward per side: self_predicted, CHES), the
  sketching of u_i and g_i, pass 2 (chosen's forward and backward, dotted with the summed gradient);
- over all pairs: the N × N map c_ij = −lr⟨Su_i, Sg_j⟩ from the float32 store of 2N sketches.

`--map-sizes` times the map through the forecast's own `_kernel` on random sketches of the default
size, each N in a fresh process, and prints its time, the store's size and the process's peak memory
above the store. `--pairs N` forecasts the first N HH pairs with `--cross` on the built-in model and
prints each part per pair; with --checkpoint an interrupted run continues (its timings then cover the
resumed part only and are not divided per pair).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh_helpful_probes" / "train.jsonl"


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def one_map(n: int, dim: int) -> dict:
    """Time the map on N random sketch pairs (run in its own process: the peak is this map's)."""
    import torch

    from learndyn.dynamics.forecast import _kernel

    gen = torch.Generator().manual_seed(0)
    chosen = [torch.randn(dim, generator=gen) for _ in range(n)]
    steps = [torch.randn(dim, generator=gen) for _ in range(n)]
    before = peak_rss_bytes()
    start = time.perf_counter()
    kernel = _kernel(chosen, steps, lr=1e-6, exact=False)
    seconds = time.perf_counter() - start
    return {"n": n, "seconds": seconds, "store_bytes": 2 * n * dim * 4, "result_bytes": kernel.nbytes,
            "peak_above_store_bytes": max(0, peak_rss_bytes() - before)}


def map_table(sizes: list[int], dim: int) -> None:
    import torch

    print(f"N x N map from {dim}-bucket float32 sketches ({torch.get_num_threads()} threads), each N in a fresh "
          "process:")
    print("  N | map time | store (2N sketches) | result | peak memory above the store")
    for n in sizes:
        out = subprocess.run([sys.executable, __file__, "--one-map", str(n), "--projection-dim", str(dim)],
                             capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {n} | {row['seconds']:.2f} s | {row['store_bytes'] / 2**20:.0f} MiB | "
              f"{row['result_bytes'] / 2**20:.1f} MiB | {row['peak_above_store_bytes'] / 2**20:.0f} MiB")


def pass_costs(data: Path, n: int, dim: int, checkpoint: Path | None) -> None:
    from learndyn import load_model
    from learndyn.data import load_preferences
    from learndyn.dynamics.forecast import forecast_pairs

    pairs = load_preferences(str(data), limit=n, keep_empty=True)  # HH has blank turns: noted, as forecast does
    model, tokenizer = load_model("smollm2-135m-instruct", dtype="float32")
    resumed = checkpoint is not None and checkpoint.exists()
    start = time.perf_counter()
    result = forecast_pairs(model, tokenizer, pairs, lr=5e-6, cross=True, projection_dim=dim, max_length=512,
                            progress=True, checkpoint=checkpoint)
    wall = time.perf_counter() - start
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)  # finished: a rerun measures afresh
    t, scored = result.summary["timings"], result.summary["scored"]
    print(f"forecast --cross of {len(pairs)} HH pairs ({scored} scored, the rest noted) on the built-in model "
          f"(max_length 512, {dim} buckets) in {wall:.0f} s:")
    if resumed:
        print("  (resumed from the checkpoint: the times cover this run's part only, so none is given per pair)")
    for part, text in (("pass_1", "pass 1 (self_predicted, CHES)"), ("sketch", "sketching"),
                       ("pass_2", "pass 2 (exact cross_predicted)")):
        print(f"  {text}: {t[part]:.0f} s" + ("" if resumed else f", {t[part] / scored:.2f} s per scored pair"))
    print(f"  N x N map: {t['kernel']:.3f} s; projected store {result.summary['projected_store_bytes'] / 2**20:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--map-sizes", type=int, nargs="*", default=[128, 512, 2048, 10000])
    parser.add_argument("--projection-dim", type=int, default=32768)
    parser.add_argument("--pairs", type=int, help="also forecast this many HH pairs on the built-in model")
    parser.add_argument("--data", type=Path, default=HH, help="HH probe file for --pairs")
    parser.add_argument("--checkpoint", type=Path, help="--pairs: keep finished pairs here and resume from them")
    parser.add_argument("--one-map", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_map:
        print(json.dumps(one_map(args.one_map, args.projection_dim)))
        return
    if args.map_sizes:
        map_table(args.map_sizes, args.projection_dim)
    if args.pairs:
        if not args.data.is_file():
            raise SystemExit(f"HH probe file not found: {args.data}")
        pass_costs(args.data, args.pairs, args.projection_dim, args.checkpoint)


if __name__ == "__main__":
    main()
