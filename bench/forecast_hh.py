"""Which forecast ranks likelihood displacement best? CHES against learndyn's first-order forecasts, on HH.

    python bench/forecast_hh.py [--pairs 128] [--lr 5e-6] [--out bench-runs/forecast] [--filter [--arms A,B]]
                                [--train-seed 0] [--resume]

Every part keeps its results in --out; with --resume an interrupted run continues: the forecast from
its checkpoint (or its finished forecast.parquet), each DPO run reused when finished.

1. Forecast the first N pairs of the HH file on the built-in model (`forecast --cross`), timing each
   part; check the CountSketch against exact inner products on a subset (--exact-subset pairs).
2. Train one epoch of DPO on those pairs (AdamW at --lr, batch 8, beta 0.1) with the pairs' chosen
   responses tracked, and take each pair's actual change of log π(y⁺) over the epoch.
3. Print Spearman's ρ between the actual change and each score, with a bootstrap interval (pairs
   resampled). CHES is higher for more displacement, so its expected ρ is negative; the predicted
   changes', positive. "agreement" is ρ times the expected sign.
4. With --filter: DPO again without the top 10% of pairs by each score, by others_projected (what a
   pair's step does to the other pairs' chosen: the map's column sums) and without a random 10%
   (three seeds); the mean change of chosen on the pairs kept, against the full run on the same
   pairs (paired, with a bootstrap interval), and the map's forecast of that paired difference.
   --train-seed reruns the DPO epochs in another order of the pairs, beside the first seed's runs.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from learndyn import load_model
from learndyn.atomic import atomic_path, write_jsonl
from learndyn.data import load_preferences
from learndyn.dynamics.forecast import CountSketch, forecast_pairs
from learndyn.dynamics.sequences import encode_update
from learndyn.dynamics.step import rank_correlation
from learndyn.experiments.compare import train_once
from learndyn.experiments.forecast import HIGHER_DISPLACES, drop_top
from learndyn.probes.files import Probe, write_probes
from learndyn.report.signatures import bootstrap
from learndyn.training.recipes import TrainSettings
from learndyn.training.runs import read_metrics

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh_helpful_probes" / "train.jsonl"
# expected sign of ρ with the actual change: a displacing pair has a low predicted change, a high CHES
SCORES = {score: -1 if score in HIGHER_DISPLACES else 1
          for score in ("ches", "ches_normalized", "self_predicted", "cross_predicted")}


def spearman_interval(a: np.ndarray, b: np.ndarray, resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    rng = np.random.default_rng(seed)
    rho = rank_correlation(pd.Series(a), pd.Series(b))
    draws = []
    for _ in range(resamples):
        pick = rng.integers(0, len(a), len(a))
        value = rank_correlation(pd.Series(a[pick]), pd.Series(b[pick]))
        if value is not None:
            draws.append(value)
    low, high = np.percentile(draws, [2.5, 97.5])
    return rho, float(low), float(high)


def paired_difference(frame: pd.DataFrame, a: str, b: str, resamples: int = 2000, seed: int = 0):
    """Agreement (ρ times its expected sign) of score a minus that of score b, pairs resampled together."""
    def diff(rows: pd.DataFrame) -> float:
        rho = {s: rank_correlation(rows[s].reset_index(drop=True), rows["actual"].reset_index(drop=True)) for s in (a, b)}
        return SCORES[a] * rho[a] - SCORES[b] * rho[b]

    rng = np.random.default_rng(seed)
    draws = [diff(frame.iloc[rng.integers(0, len(frame), len(frame))]) for _ in range(resamples)]
    low, high = np.nanpercentile(np.array(draws, dtype=float), [2.5, 97.5])
    return diff(frame), float(low), float(high)


def exact_subset_agreement(model, tokenizer, pairs, dim: int, lr: float) -> dict:
    """Exact c_ij = −lr⟨u_i, g_j⟩ on a few pairs (their u_i kept in memory) against the sketch's."""
    from learndyn.dynamics.forecast import pair_gradients
    from learndyn.losses import get_loss

    spec = get_loss("sigmoid")
    params = [p for p in model.parameters() if p.requires_grad]
    sketch = CountSketch([p.shape for p in params], dim)
    chosen, steps, sketched_u, sketched_g = [], [], [], []
    for pref in pairs:
        seqs = encode_update([pref], tokenizer, pairwise=True, max_length=None)
        u, v, a, b, _ = pair_gradients(model, seqs, spec, 0.1)
        g = [a * x + b * y for x, y in zip(u, v)]
        chosen.append([x.detach().clone() for x in u])
        sketched_u.append(sketch(u))
        sketched_g.append(sketch(g))
        steps.append(g)  # kept: the subset is small
    n = len(pairs)
    exact = np.array([[-lr * float(sum((x.double() * y.double()).sum() for x, y in zip(chosen[i], steps[j])))
                       for j in range(n)] for i in range(n)])
    approx = -lr * (torch.stack(sketched_u) @ torch.stack(sketched_g).T).numpy()
    return {"pairs": n, "rank_correlation": rank_correlation(pd.Series(approx.ravel()), pd.Series(exact.ravel())),
            "max_relative_error": float(np.abs(approx - exact).max() / np.abs(exact).max())}


# the filter arms, those that decide the goal first (each is half an hour here), so that a run cut short says most
ARMS = ("cross_predicted", "random0", "ches", "self_predicted", "random1", "ches_normalized", "random2",
        "others_projected")


def write_pairs(pairs, path: Path) -> None:
    write_jsonl(path, [{"example_id": p.example_id, "prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
                       for p in pairs])


def chosen_probes(pairs, path: Path) -> None:
    write_probes([Probe(p.example_id, p.prompt, {"chosen": p.chosen}) for p in pairs], path)


def dpo_changes(data: Path, probes: Path, out: Path, n: int, lr: float, seed: int, resume: bool) -> pd.Series:
    """One DPO epoch on `data` (every row), chosen of `probes` tracked at the start and the end."""
    steps = -(-n // 8)
    settings = TrainSettings(phase="dpo", data=str(data), probes=str(probes), out=str(out), learning_rate=lr, epochs=1,
                             batch_size=8, every=steps, max_length=512, seed=seed, save_model=False)
    run, trained = train_once(settings, resume=resume)
    if not trained:
        print(f"reused the finished run {run}")
    table = read_metrics(run).pivot_table(index="example_id", columns="step", values="logp_sum")
    return table[table.columns[-1]] - table[table.columns[0]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HH,
                        help="HH probe file (default: ../shared/data/hh_helpful_probes/train.jsonl)")
    parser.add_argument("--pairs", type=int, default=128, help="the first N pairs of --data (default 128)")
    parser.add_argument("--lr", type=float, default=5e-6,
                        help="learning rate of the forecast (an SGD step) and of every DPO epoch (AdamW; default 5e-6)")
    parser.add_argument("--projection-dim", type=int, default=32768, help="sketch buckets (default 32768)")
    parser.add_argument("--exact-subset", type=int, default=6,
                        help="check the sketch against exact inner products on the first N pairs (about 1 GB of "
                             "memory a pair; 0 skips it; default 6)")
    parser.add_argument("--filter", action="store_true",
                        help="also DPO without the top 10%% by each score and without a random 10%% (three seeds): "
                             "eight more epochs (--arms picks them)")
    parser.add_argument("--arms", default=",".join(ARMS),
                        help="with --filter, the arms to run, in this order (default: all, those that decide the goal "
                             f"first: {','.join(ARMS)})")
    parser.add_argument("--train-seed", type=int, default=0,
                        help="seed of every DPO epoch (the order of the pairs); runs of seed S > 0 go to folders "
                             "ending in -seedS beside those of seed 0 (default 0)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    parser.add_argument("--out", type=Path, default=Path("bench-runs/forecast"))
    args = parser.parse_args()
    args.arms = [arm.strip() for arm in args.arms.split(",") if arm.strip()]
    args.seeded = f"-seed{args.train_seed}" if args.train_seed else ""
    if unknown := sorted(set(args.arms) - set(ARMS)):
        parser.error(f"--arms: unknown arm(s) {', '.join(unknown)}; choose from {','.join(ARMS)}")
    if not args.data.is_file():
        raise SystemExit(f"HH probe file not found: {args.data}")
    torch.manual_seed(0)
    pairs = load_preferences(str(args.data), limit=args.pairs)
    model, tokenizer = load_model("smollm2-135m-instruct", dtype="float32")

    args.out.mkdir(parents=True, exist_ok=True)
    finished = args.out / "forecast.parquet"
    if args.resume and finished.is_file():
        print(f"forecast reused: {finished}")
        frame = pd.read_parquet(finished)
    else:
        start = time.perf_counter()
        result = forecast_pairs(model, tokenizer, pairs, lr=args.lr, cross=True, projection_dim=args.projection_dim,
                                max_length=512, progress=True, checkpoint=args.out / "forecast-state.pt")
        t = result.summary["timings"]
        n = len(pairs)
        print(f"forecast of {n} pairs in {time.perf_counter() - start:.0f} s: pass 1 (self, CHES) "
              f"{t['pass_1'] / n:.2f} s/pair, sketching {t['sketch'] / n:.2f} s/pair, pass 2 (exact cross) "
              f"{t['pass_2'] / n:.2f} s/pair, N×N map {t['kernel']:.3f} s; projected store "
              f"{result.summary['projected_store_bytes'] / 2**20:.1f} MiB (a resumed forecast times its last part only)")
        print(f"  sketch row sums vs exact cross_predicted: rank correlation "
              f"{result.summary['projection_rank_agreement']:.3f}")
        frame = result.pairs
        with atomic_path(args.out / "displacement.npy") as tmp, open(tmp, "wb") as file:
            np.save(file, result.kernel)
        frame.to_parquet(finished, index=False)
        if args.exact_subset:
            check = exact_subset_agreement(model, tokenizer, pairs[: args.exact_subset], args.projection_dim, args.lr)
            print(f"  sketch vs exact c_ij on {check['pairs']} pairs ({check['pairs']**2} entries): rank correlation "
                  f"{check['rank_correlation']:.3f}, max error {check['max_relative_error']:.3f} of the largest entry")
    del model
    n = len(pairs)

    probes, data = args.out / "probes.jsonl", args.out / "pairs.jsonl"
    chosen_probes(pairs, probes)
    write_pairs(pairs, data)
    start = time.perf_counter()
    actual = dpo_changes(data, probes, args.out / f"dpo{args.seeded}", n, args.lr, seed=args.train_seed,
                         resume=args.resume).rename("actual")
    print(f"one DPO epoch on {n} pairs (AdamW lr {args.lr:g}, seed {args.train_seed}) in "
          f"{time.perf_counter() - start:.0f} s: {int((actual < 0).sum())} of {n} chosen responses fell, mean "
          f"change {actual.mean():+.2f}")
    both = frame.set_index("example_id").join(actual, how="inner")
    for score, sign in SCORES.items():
        ok = both[[score, "actual"]].dropna()
        rho, low, high = spearman_interval(ok[score].to_numpy(), ok["actual"].to_numpy())
        print(f"  {score:16s} ρ = {rho:+.3f} [{low:+.3f}, {high:+.3f}]  agreement {sign * rho:+.3f} (n={len(ok)})")
    for score in ("self_predicted", "cross_predicted"):
        effect, low, high = paired_difference(both.dropna(subset=[score, "ches", "actual"]), score, "ches")
        print(f"  agreement of {score} minus that of ches: {effect:+.3f} [{low:+.3f}, {high:+.3f}] (paired bootstrap)")

    if args.filter:
        filter_experiment(args, pairs, both)


def filter_experiment(args, pairs, both: pd.DataFrame) -> None:
    """DPO without the top 10% by each score (and a random 10%, three seeds): mean change of chosen kept.

    The mean over the kept pairs alone favours any score that names pairs whose chosen falls, whether
    or not dropping them helps the rest (the fallers are simply not counted). So each arm is also
    compared, pair by pair, with the full run on the same kept pairs: the mean of (change without the
    dropped pairs − change with them), with the signatures' bootstrap interval over the kept pairs.

    The map forecasts that difference before training: dropping the set D removes Σ_{j∈D} c_ij from
    kept pair i, so the forecast is the mean over the kept of −Σ_{j∈D} c_ij. c_ij is one SGD step's
    change; to read it in the DPO run's units it is multiplied by the slope of the actual change
    regressed on cross_predicted (a calibration on the full run, not a forecast)."""
    scored = both.rename_axis("example_id").reset_index()
    if not (args.out / "displacement.npy").is_file() or "others_projected" not in scored:
        raise SystemExit(f"{args.out / 'forecast.parquet'} comes from an older forecast_hh without the map "
                         "(displacement.npy, others_projected); remove it and forecast again")
    kernel = np.load(args.out / "displacement.npy")
    index = {p.example_id: k for k, p in enumerate(pairs)}  # the map's rows and columns
    fit = both[["cross_predicted", "actual"]].dropna()
    slope = float(np.polyfit(fit["cross_predicted"], fit["actual"], 1)[0])
    print(f"filter arms; the map's forecast of each paired difference is in the run's units: times {slope:.1f}, "
          "the slope of the actual change on cross_predicted")

    def forecast(dropped: list[str]) -> float:
        columns = [index[e] for e in dropped]
        rows = sorted(set(range(len(pairs))) - set(columns))
        return -slope * float(np.nanmean(np.nansum(kernel[np.ix_(rows, columns)], axis=1)))

    drops = {score: drop_top(scored, 10, score) for score in (*SCORES, "others_projected")}  # the most displacing end
    count = len(drops["cross_predicted"])
    labels = {score: f"the top {len(dropped)} by {score}" for score, dropped in drops.items()}
    for seed in range(3):
        drops[f"random (seed {seed})"] = random.Random(seed).sample([p.example_id for p in pairs], count)
        labels[f"random (seed {seed})"] = f"a random {count} (seed {seed})"
    for arm in args.arms:
        name = arm if arm in drops else f"random (seed {arm.removeprefix('random')})"
        dropped = drops[name]
        kept = [p for p in pairs if p.example_id not in set(dropped)]
        slug = name.replace(" ", "_").replace("(", "").replace(")", "")
        # one data and probe file per arm: a resumed arm is checked against the content it was trained on
        data = args.out / f"kept-{slug}-{len(dropped)}.jsonl"
        write_pairs(kept, data)
        probes = args.out / f"probes-kept-{slug}.jsonl"
        chosen_probes(kept, probes)
        change = dpo_changes(data, probes, args.out / f"dpo-without-{name.replace(' ', '_')}{args.seeded}", len(kept),
                             args.lr, seed=args.train_seed, resume=args.resume)
        (effect,), (low,), (high,) = bootstrap((change - both["actual"].reindex(change.index)).to_frame())
        print(f"  without {labels[name]} (their chosen changed {both['actual'].reindex(dropped).mean():+.2f} on "
              f"average in the full run): mean change of chosen on the {len(kept)} kept {change.mean():+.2f} "
              f"({int((change < 0).sum())} fell); against the full run on the same pairs {effect:+.2f} "
              f"[{low:+.2f}, {high:+.2f}], the map forecast {forecast(dropped):+.2f}")


if __name__ == "__main__":
    main()
