"""What explaining one update costs, against the naive route, on the built-in model.

    python bench/explain_cost.py [--responses 32] [--loss dpo] [--optimizer sgd] [--lr 1e-4] [--probes FILE]

Explains one DPO (or SFT) step on the first example-data pair against the first `--responses` probe
responses of the example probe set, then takes the naive route in the same run: one backward pass
per probe response for ∇θ log π(y), then its dot product with the same Δθ. Prints both times (the
update gradient, shared by both routes, is counted in both), their ratio, and the agreement of the
two predictions. The cost is also given in units of one plain forward pass over the probes, every
(prompt + response) sequence in full; the explainer itself runs each prompt once and its responses on
the prompt's KV cache, and the forward in that layout is printed too.
"""

from __future__ import annotations

import argparse
import time

import torch

from learndyn import build_probes, load_model, load_preferences, read_probes
from learndyn.dynamics.step import explain_step, predict_naive
from learndyn.dynamics.sequences import (
    ResponseLogits,
    SharedPromptLogits,
    full_inputs,
    probe_batch,
    probe_batches,
    probe_sequences,
)
from learndyn.dynamics.updates import OptimizerRule
from learndyn.probes.files import Probe
from learndyn.lm import pack_runs


def first_responses(probes: list[Probe], n: int) -> list[Probe]:
    """The first `n` (probe, response type) pairs, in file order."""
    kept, left = [], n
    for probe in probes:
        if left <= 0:
            break
        names = list(probe.responses)[:left]
        kept.append(Probe(probe.example_id, probe.prompt, {k: probe.responses[k] for k in names}))
        left -= len(names)
    return kept


def forward_time(model, tokenizer, probes, budget: int = 1024) -> tuple[float, float]:
    """One plain no-grad forward over the probes (eager attention, as the explainer runs): every
    sequence in full (length-sorted batches), then each prompt once with its responses on its cache."""
    obs = probe_sequences(probes, tokenizer, None, None)
    order = sorted(range(len(obs.ids)), key=lambda i: len(obs.ids[i]))
    attn = model.config._attn_implementation
    model.set_attn_implementation("eager")
    with torch.no_grad():
        start = time.perf_counter()
        full = ResponseLogits(model)
        for lo, hi in pack_runs([len(obs.ids[i]) for i in order], budget):
            full(*full_inputs(obs, order[lo:hi], model.device)[:4])
        full_s = time.perf_counter() - start
        start = time.perf_counter()
        shared = SharedPromptLogits(model)
        for groups in probe_batches(obs, budget):
            shared(probe_batch(obs, groups, budget, model.device))
        shared_s = time.perf_counter() - start
    model.set_attn_implementation(attn)
    return full_s, shared_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--responses", type=int, default=32)
    parser.add_argument("--loss", default="dpo")
    parser.add_argument("--optimizer", default="sgd")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--probes", help="A probe file (e.g. the HH probes in ../shared/data, whose prompts are "
                                         "long transcripts) instead of the example probe set.")
    args = parser.parse_args()

    model, tokenizer = load_model()
    prefs = load_preferences("example")
    built = read_probes(args.probes) if args.probes else build_probes(prefs[:8], held_out=load_preferences("example:test"))
    probes = first_responses(built, args.responses)
    n = sum(len(p.responses) for p in probes)
    rule = OptimizerRule(args.optimizer, args.lr)

    start = time.perf_counter()
    got = explain_step(model, tokenizer, prefs[:1], probes, loss=args.loss, rule=rule, keep_delta=True)
    ours = time.perf_counter() - start
    update_s = got.summary["timings"]["update_gradient_s"]
    start = time.perf_counter()
    naive = predict_naive(model, tokenizer, probes, got.delta)
    naive_s = time.perf_counter() - start + update_s
    fwd, fwd_shared = forward_time(model, tokenizer, probes)

    merged = got.changes.merge(naive, on=["example_id", "response_type"], suffixes=("", "_naive"))
    diff = (merged["predicted"] - merged["predicted_naive"]).abs()
    scale = merged["predicted_naive"].abs().max()
    print(f"{args.loss} step ({args.optimizer}, lr {args.lr:g}) explained against {n} probe responses "
          f"({got.summary['positions']} positions), built-in model, {torch.get_num_threads()} threads")
    print(f"explain_step: {ours:.1f} s (update gradient {update_s:.1f} s, probes {got.summary['timings']['probes_s']:.1f} s)"
          f" = {ours / fwd:.1f} probe forwards")
    print(f"naive route:  {naive_s:.1f} s (update gradient {update_s:.1f} s + {n} backward passes)"
          f" = {naive_s / fwd:.1f} probe forwards")
    print(f"ratio naive / explain_step: {naive_s / ours:.2f}x; one plain forward over the probes: {fwd:.2f} s "
          f"(each prompt once: {fwd_shared:.2f} s)")
    print(f"agreement: max |ours - naive| = {diff.max():.3g} (largest |prediction| {scale:.3g}); "
          f"rank correlation {merged['predicted'].rank().corr(merged['predicted_naive'].rank()):.4f}")
    print(f"first-order vs actual: relative error {got.summary['relative_error']:.3g}, "
          f"rank correlation {got.summary['rank_correlation']:.3f}")


if __name__ == "__main__":
    main()
