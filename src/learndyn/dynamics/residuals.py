"""Loss residuals G = ∂L/∂z, the G of Δ log π = −η·A·K·G (Ren & Sutherland, Eq. 5 and Appendix B).

Written out by hand, not taken from autograd, so that an explanation can say which part of the
update (the pull-up on y⁺ or the push-down on y⁻) caused a change; tests check each against autograd.

Positions are flattened: `logits` (N, V) holds the logits that predict the N response tokens
`labels` (N,) of S sequences, and `seq` (N,) says which sequence each position belongs to. For the
pairwise losses sequences 0..P−1 are the chosen responses and P..2P−1 the rejected ones of P pairs.

    sft    L = mean over all tokens of −log π(y_l)             G_l = (π_l − e_{y_l}) / N
    pairs  L = mean over pairs of ℓ(h),  h = [log π(y⁺) − log π_ref(y⁺)] − [log π(y⁻) − log π_ref(y⁻)]
           G_l = −ℓ'(h)·(π_l − e_{y_l}) / P  on y⁺     G_l = +ℓ'(h)·(π_l − e_{y_l}) / P  on y⁻
with ℓ and ℓ' from the loss's entry in learndyn/losses.py (the registry keyed by TRL's names).
log π of a sequence is the sum over its tokens, except for the `per_token` losses (TRL's ipo and
sigmoid_norm), which divide each side's log-ratio by its completion length |y| first, so
h = [log π(y⁺) − log π_ref(y⁺)]/|y⁺| − [...]/|y⁻| and G on a token of y carries a further 1/|y|.
"""

from __future__ import annotations

import torch
from torch import Tensor

from learndyn.losses import Loss


def wide(t: Tensor) -> Tensor:
    """At least float32 for softmax arithmetic (bf16 logits lose too much); float64 stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def token_residual(logits: Tensor, labels: Tensor) -> Tensor:
    """π − e_y at every position: ∂(−log π(y))/∂z, the SFT residual of one token."""
    g = wide(logits).softmax(-1)  # (N, V)
    g[torch.arange(len(labels)), labels] -= 1
    return g


def sequence_logps(logits: Tensor, labels: Tensor, seq: Tensor, n_seq: int) -> Tensor:
    """log π(y) of each sequence: the sum of its tokens' log-probabilities. (S,)"""
    token = wide(logits).log_softmax(-1).gather(-1, labels[:, None])[:, 0]  # (N,)
    return torch.zeros(n_seq, dtype=token.dtype, device=token.device).index_add(0, seq, token)


def margin(seq_logps: Tensor, ref_logps: Tensor | None, lengths: Tensor | None = None) -> Tensor:
    """h per pair from the 2P sequence log-probs (chosen first) and the reference's; with `lengths`
    (tokens per sequence) each log-ratio is first divided by its length. (P,)"""
    ratios = seq_logps if ref_logps is None else seq_logps - ref_logps
    if lengths is not None:
        ratios = ratios / lengths.clamp(min=1).to(ratios.dtype)
    chosen, rejected = ratios.chunk(2)
    return chosen - rejected


def loss_value(loss: Loss, logits: Tensor, labels: Tensor, seq: Tensor, n_seq: int,
               beta: float = 0.1, ref_logps: Tensor | None = None) -> Tensor:
    """The scalar loss that `residual` differentiates (for reporting and for the autograd tests)."""
    if not loss.pairwise:
        return -wide(logits).log_softmax(-1).gather(-1, labels[:, None]).mean()
    h = margin(sequence_logps(logits, labels, seq, n_seq), ref_logps, _lengths(loss, seq, n_seq))
    return loss.value(h, beta).mean()


def residual(loss: Loss, logits: Tensor, labels: Tensor, seq: Tensor, n_seq: int,
             beta: float = 0.1, ref_logps: Tensor | None = None) -> Tensor:
    """G = ∂L/∂z at every position (N, V), from the closed forms in the module docstring."""
    g = token_residual(logits, labels)  # (N, V)
    if not loss.pairwise:
        return g / len(labels)
    n_pairs, lengths = n_seq // 2, _lengths(loss, seq, n_seq)
    with torch.no_grad():
        h = margin(sequence_logps(logits, labels, seq, n_seq), ref_logps, lengths)  # (P,)
        slope = loss.slope(h, beta) / n_pairs  # (P,)
    sign = torch.where(seq < n_pairs, -1.0, 1.0).to(g.dtype)  # pull y⁺ up, push y⁻ down
    weight = sign * slope[seq % n_pairs]
    if lengths is not None:
        weight = weight / lengths[seq].to(weight.dtype)
    return g * weight[:, None]


def _lengths(loss: Loss, seq: Tensor, n_seq: int) -> Tensor | None:
    """Tokens per sequence, for the losses whose margin is per token; else None."""
    return torch.bincount(seq, minlength=n_seq) if loss.per_token else None
