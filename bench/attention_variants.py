"""Windowed attention at real scale: the scorer against the plain loop on a Gemma-3-1B-shaped model.

    python bench/attention_variants.py [--layers 6] [--prompts 8] [--batch-tokens 1024,4096]

A random model with Gemma-3-1B's attention shape (hidden 1152, 4 query heads, 1 key-value head of
256, a 512-token sliding window on five layers of six, global attention on the sixth), a 32k
vocabulary to keep it quick, and prompts of 440-500 tokens: long enough that a response's window
reaches back into its prompt, where right padding or a cropped cache used to put pad slots. Prints
the largest relative difference of each metric against `score_plain` (float64 statistics, one
sequence at a time) and how many responses are off by more than 1e-5. The tiny-model version of
this check, on 16 families, is tests/test_attention_variants.py.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from learndyn.scoring import METRICS, EncodedPrompt, score_encoded, score_plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--batch-tokens", default="1024,4096")
    args = parser.parse_args()

    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    vocab = 32_000
    config = Gemma3TextConfig(vocab_size=vocab, hidden_size=1152, intermediate_size=6912, num_hidden_layers=args.layers,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                              max_position_embeddings=32_768, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).float().eval()
    print(f"layers: {config.layer_types}")
    rng = random.Random(0)
    encoded = [EncodedPrompt(str(i), [rng.randrange(3, vocab) for _ in range(rng.randint(440, 500))],
                             [(t, [rng.randrange(3, vocab) for _ in range(rng.randint(40, 80))], False)
                              for t in ("chosen", "rejected")]) for i in range(args.prompts)]
    start = time.perf_counter()
    plain = score_plain(model, encoded)
    print(f"plain loop: {time.perf_counter() - start:.1f} s for {len(plain)} responses")
    for budget in (int(b) for b in args.batch_tokens.split(",")):
        start = time.perf_counter()
        fast = score_encoded(model, encoded, batch_tokens=budget, progress=None)
        took = time.perf_counter() - start
        rel = {m: ((fast[m] - plain[m]).abs() / plain[m].abs().clip(lower=1e-6)) for m in METRICS if m != "n_tokens"}
        off = int((rel["logp_sum"] > 1e-5).sum())
        worst = ", ".join(f"{m} {r.max():.1e}" for m, r in rel.items())
        print(f"batch_tokens={budget}: {took:.1f} s; {off} of {len(fast)} responses off by > 1e-5 on logp_sum; max rel: {worst}")


if __name__ == "__main__":
    main()
