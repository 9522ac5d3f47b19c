"""Throughput of the probe scorer against the plain loop, on the built-in model and the shared HH probes.

    python bench/score_throughput.py [--prompts 32] [--batch-tokens 256,512,1024]

Scores the first N prompts x 12 response types twice in one run: with `learndyn.scoring` and with
the plain loop (one sequence at a time, full prompt+response forward, fp32 log-softmax over the
whole vocabulary). Prints responses/s, the ratio, the largest relative difference of logp_sum, the
achieved GFLOP/s against the FLOP floor of the work, and where our time goes.

FLOP floor: 2 x non-embedding parameters per token that must be computed (each prompt once, each
response once) + 2 x hidden x vocab for the LM head at response positions only.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import learndyn.lm as lm
import learndyn.scoring as scoring
from learndyn import load_model, read_probes

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh_helpful_probes" / "train.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probes", type=Path, default=HH,
                        help="HH probe file (default: ../shared/data/hh_helpful_probes/train.jsonl)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-tokens", default="256,1024", help="comma-separated sizes to compare")
    parser.add_argument("--skip-plain", action="store_true", help="time only our scorer")
    args = parser.parse_args()
    if not args.probes.is_file():
        raise SystemExit(f"probe file not found: {args.probes}")

    model, tokenizer = load_model(device="cpu")
    encoded = scoring.encode_probes(read_probes(args.probes, limit=args.prompts), tokenizer)
    n_resp = sum(len(e.responses) for e in encoded)
    prompt_tokens = sum(len(e.prompt_ids) for e in encoded)
    resp_tokens = sum(len(ids) for e in encoded for _, ids, _ in e.responses)
    cfg = model.config
    embed = cfg.vocab_size * cfg.hidden_size
    body = sum(p.numel() for p in model.parameters()) - embed * (1 if cfg.tie_word_embeddings else 2)
    head_flops = 2 * cfg.hidden_size * cfg.vocab_size
    floor = 2 * body * (prompt_tokens + resp_tokens) + head_flops * resp_tokens
    plain_flops = (2 * body + head_flops) * sum(len(e.prompt_ids) + len(ids) for e in encoded for _, ids, _ in e.responses)
    print(f"{len(encoded)} prompts, {n_resp} responses; mean prompt {prompt_tokens / len(encoded):.0f} tokens, "
          f"mean response {resp_tokens / n_resp:.1f} tokens; torch threads {torch.get_num_threads()}")
    print(f"FLOP floor of the work: {floor / 1e9:.0f} GFLOP (the plain loop computes {plain_flops / 1e9:.0f})")
    peak = matmul_peak()
    print(f"fp32 matmul peak measured now: {peak:.0f} GFLOP/s")

    baseline = None
    if not args.skip_plain:
        start = time.perf_counter()
        baseline = scoring.score_plain(model, encoded, dtype=torch.float32)
        plain_s = time.perf_counter() - start
        print(f"\nplain loop: {plain_s:.1f} s, {n_resp / plain_s:.2f} responses/s, "
              f"{plain_flops / plain_s / 1e9:.0f} GFLOP/s on its own (larger) work")

    for batch_tokens in [int(b) for b in args.batch_tokens.split(",")]:
        timer = PhaseTimer(model)
        start = time.perf_counter()
        with timer:
            fast = scoring.score_encoded(model, encoded, batch_tokens=batch_tokens, progress=None)
        fast_s = time.perf_counter() - start
        print(f"\nlearndyn, batch_tokens={batch_tokens}: {fast_s:.1f} s, {n_resp / fast_s:.2f} responses/s, "
              f"{floor / fast_s / 1e9:.0f} GFLOP/s achieved on the floor ({floor / fast_s / 1e9 / peak:.0%} of peak)")
        if baseline is not None:
            rel = ((fast["logp_sum"] - baseline["logp_sum"]).abs() / baseline["logp_sum"].abs()).max()
            print(f"  speed-up over the plain loop: {plain_s / fast_s:.2f}x; largest relative difference of "
                  f"logp_sum: {rel:.1e}")
        other = fast_s - timer.prompt - timer.response - timer.stats
        print(f"  time: prompt passes {timer.prompt:.1f} s, response passes {timer.response:.1f} s, "
              f"LM head + statistics {timer.stats:.1f} s, bookkeeping {other:.1f} s; "
              f"padding {1 - timer.real / timer.fed:.1%} of {timer.fed} tokens fed")


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


class PhaseTimer:
    """Wall time of the prompt passes, the response passes and the statistics, by wrapping them."""

    def __init__(self, model):
        self.model, self.prompt, self.response, self.stats, self.fed, self.real = model, 0.0, 0.0, 0.0, 0, 0
        lm.split_model(model).shares_cache()  # the one-time checks are not part of the timed work
        self.body = model.base_model if lm.split_model(model).fused else model
        self.cache_name = lm.split_model(model).cache_name

    def __enter__(self):
        forward, stats = self.body.forward, scoring.token_stats

        def timed_forward(*args, **kwargs):
            cache = kwargs.get(self.cache_name)  # the prompt pass starts from an empty cache
            phase = "response" if cache is not None and cache.get_seq_length() > 0 else "prompt"
            start = time.perf_counter()
            out = forward(*args, **kwargs)
            setattr(self, phase, getattr(self, phase) + time.perf_counter() - start)
            ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
            self.fed += ids.numel()
            self.real += int(mask[:, -ids.shape[1]:].sum())
            return out

        def timed_stats(*args, **kwargs):
            start = time.perf_counter()
            out = stats(*args, **kwargs)
            self.stats += time.perf_counter() - start
            return out

        self._stats = stats
        self.body.forward, scoring.token_stats = timed_forward, timed_stats
        return self

    def __exit__(self, *exc):
        del self.body.forward  # back to the class's method
        scoring.token_stats = self._stats


if __name__ == "__main__":
    main()
