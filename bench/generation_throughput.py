"""Throughput of batched generation against a one-at-a-time loop, on the built-in model.

    python bench/generation_throughput.py [--prompts 16] [--max-new-tokens 64] [--batch-sizes 8,16]

Answers the first K held-out prompts of the example data (`example:test`, chat prompts) in one run,
greedy with the same `max_new_tokens`: prompt by prompt (batch size 1, KV-cached decoding), then
with `learndyn.generation.generate` at each batch size (prompts of similar length batched, left
padding, KV cache; what `learndyn generate` runs). Prints responses/s and new tokens/s (counted by
re-tokenizing the responses) of each, the speed-up over the loop, and how many of the K greedy
responses equal the loop's (batched fp32 matmuls round differently from single-row ones, so a
near-tie between two tokens can flip and the texts diverge from there; the tests check exact
equality on tiny models).
"""

from __future__ import annotations

import argparse
import time

import torch

from learndyn import load_model, load_preferences
from learndyn.data import render_prompt
from learndyn.generation import generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16, help="K held-out prompts (example:test has 16)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="8,16", help="comma-separated batch sizes to compare")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: GPU if present)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.batch_sizes.split(",")]

    model, tokenizer = load_model(device=args.device)
    prompts = [p.prompt for p in load_preferences("example:test", limit=args.prompts, need_rejected=False)]
    lengths = [len(tokenizer(render_prompt(p, tokenizer), add_special_tokens=isinstance(p, str))["input_ids"])
               for p in prompts]
    print(f"{len(prompts)} prompts ({min(lengths)}-{max(lengths)} tokens), greedy, max_new_tokens "
          f"{args.max_new_tokens}; device {model.device}, dtype {model.dtype}, torch threads {torch.get_num_threads()}")
    settings = dict(max_new_tokens=args.max_new_tokens, progress=None)
    generate(model, tokenizer, prompts[:1], max_new_tokens=4, progress=None)  # warm-up: first-call costs

    start = time.perf_counter()
    single = [generate(model, tokenizer, [p], batch_size=1, **settings)[0] for p in prompts]
    single_s = time.perf_counter() - start
    report("one at a time", single, single_s, single_s, single, tokenizer)
    for size in sizes:
        start = time.perf_counter()
        batched = generate(model, tokenizer, prompts, batch_size=size, **settings)
        report(f"batched ({size})", batched, time.perf_counter() - start, single_s, single, tokenizer)


def report(name: str, texts: list[str], seconds: float, single_s: float, single: list[str], tokenizer) -> None:
    """One line of figures, then where each response that differs from the loop's diverges."""
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    same = sum(a == b for a, b in zip(texts, single))
    print(f"{name:>15}: {seconds:6.1f} s, {len(texts) / seconds:5.2f} responses/s, {tokens / seconds:6.1f} new "
          f"tokens/s ({tokens / len(texts):.1f} per response), speed-up {single_s / seconds:.2f}x, "
          f"identical to one-at-a-time: {same} of {len(texts)}")
    for index, (a, b) in enumerate(zip(texts, single)):
        if a != b:
            wa, wb = a.split(), b.split()
            first = next((i for i, (x, y) in enumerate(zip(wa, wb)) if x != y), min(len(wa), len(wb)))
            print(f"    prompt {index}: same first {first} words, then {' '.join(wa[first:first + 6])!r} "
                  f"vs {' '.join(wb[first:first + 6])!r}")


if __name__ == "__main__":
    main()
