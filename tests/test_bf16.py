"""bf16 models (the GPU default): the model runs in bf16, but the statistics built on its logits
(log-softmax, entropy, residual norm) are taken in fp32, since bf16's 8-bit mantissa would add
~1% error per token on top of the model's own rounding. (Explain's Δz sums: tests/test_explain.py.)"""

from __future__ import annotations

import torch

from learndyn.probes.files import Probe
from learndyn.scoring import token_stats, encode_probes, score_encoded

PROBES = [
    Probe("a", "Human: How do I make tea? Assistant:", {"chosen": " Boil the water, then steep.", "rejected": " No."}),
    Probe("b", "Human: Is the fox quick? Assistant:", {"chosen": " Yes, it jumps over the lazy dog."}),
]


def testtoken_stats_of_bf16_logits_are_exact_to_float32():
    """Given the same bf16 logits, the statistics equal float64 definitions to fp32 precision: a
    bf16 log-softmax would be off by ~1e-2 here."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 320, bias=False).to(torch.bfloat16)
    states = (3 * torch.randn(40, 16)).to(torch.bfloat16)
    targets = torch.randint(0, 320, (40,))
    with torch.no_grad():
        got = token_stats(states, targets, head, chunk_rows=16)
        logp = head(states).double().log_softmax(-1)  # (40, V), from the very same bf16 logits
    for name, want in (("logp", logp.gather(1, targets[:, None])[:, 0]), ("argmax_logp", logp.max(-1).values),
                       ("entropy", -(logp.exp() * logp).sum(-1))):
        assert got[name].dtype == torch.float32, name
        torch.testing.assert_close(got[name].double(), want, rtol=1e-5, atol=1e-5, msg=name)


def test_bf16_model_scores_track_the_float32_model(tiny_llama):
    """End to end: the bf16 model's sequence log-probs stay within bf16 forward rounding of fp32's."""
    model, tok = tiny_llama
    encoded = encode_probes(PROBES, tok)
    ref = score_encoded(model, encoded, progress=None)
    half = score_encoded(model.to(torch.bfloat16), encoded, progress=None)
    for col in ("logp_sum", "entropy", "argmax_logp"):
        got, want = torch.tensor(half[col].values), torch.tensor(ref[col].values)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2, msg=col)
