"""Loss residuals G = ∂L/∂z, the G of Δ log π = −η·A·K·G (Ren & Sutherland, Eq. 5 and Appendix B).

Written out by hand, not taken from autograd, so that an explanation can say which part of the
update (the pull-up on y⁺ or the push-down on y⁻) caused a change; tests check each against autograd.

Positions are flattened: `logits` (N, V) holds the logits that predict the N response tokens
`labels` (N,) of S sequences, and `seq` (N,) says which sequence each position belongs to. For the
pairwise losses sequences 0..P−1 are the chosen responses and P..2P−1 the rejected ones of P pairs.

    sft    L = mean over all tokens of −log π(y_l)             G_l = (π_l − e_{y_l}) / N
    pairs  L = mean over pairs of ℓ(h),  h = [log π(y⁺) − log π_ref(y⁺)] − [log π(y⁻) − log π_ref(y⁻)]
           G_l = −ℓ'(h)·(π_l − e_{y_l}) / P  on y⁺     G_l = +ℓ'(h)·(π_l − e_{y_l}) / P  on y⁻
    dpo    ℓ = −log σ(βh)            ℓ' = −β σ(−βh)
    ipo    ℓ = (h − 1/(2β))²         ℓ' = 2 (h − 1/(2β))     h from per-token means (below)
    hinge  ℓ = max(0, 1 − βh)        ℓ' = −β · [βh < 1]   (SLiC)
log π of a sequence is the sum over its tokens (as in the DPO and SLiC papers), except for ipo:
TRL's `ipo`, which `train dpo --loss ipo` runs, divides each side's log-ratio by its completion
length |y| (the IPO authors' normalised form), so h = [log π(y⁺) − log π_ref(y⁺)]/|y⁺| − [...]/|y⁻|
and G on a token of y carries a further 1/|y|.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.functional import logsigmoid


@dataclass(frozen=True)
class Loss:
    """A loss by name: pairwise losses act on the margin h, `value` is ℓ(h, β) and `slope` is ℓ'(h, β)."""

    name: str
    pairwise: bool
    value: Callable[[Tensor, float], Tensor] | None = None
    slope: Callable[[Tensor, float], Tensor] | None = None
    per_token: bool = False  # the margin uses log-ratios divided by the completion length (TRL's ipo)


LOSSES: dict[str, Loss] = {
    "sft": Loss("sft", pairwise=False),
    "dpo": Loss("dpo", True, lambda h, b: -logsigmoid(b * h), lambda h, b: -b * torch.sigmoid(-b * h)),
    "ipo": Loss("ipo", True, lambda h, b: (h - 1 / (2 * b)) ** 2, lambda h, b: 2 * (h - 1 / (2 * b)), per_token=True),
    "hinge": Loss("hinge", True, lambda h, b: torch.relu(1 - b * h), lambda h, b: -b * (b * h < 1).to(h.dtype)),
}


def get_loss(name: str) -> Loss:
    from learndyn.errors import LearndynError

    if name not in LOSSES:
        raise LearndynError(f"unknown loss '{name}'; valid: {', '.join(LOSSES)}")
    return LOSSES[name]


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


def loss_value(name: str, logits: Tensor, labels: Tensor, seq: Tensor, n_seq: int,
               beta: float = 0.1, ref_logps: Tensor | None = None) -> Tensor:
    """The scalar loss that `residual` differentiates (for reporting and for the autograd tests)."""
    loss = get_loss(name)
    if not loss.pairwise:
        return -wide(logits).log_softmax(-1).gather(-1, labels[:, None]).mean()
    h = margin(sequence_logps(logits, labels, seq, n_seq), ref_logps, _lengths(loss, seq, n_seq))
    return loss.value(h, beta).mean()


def residual(name: str, logits: Tensor, labels: Tensor, seq: Tensor, n_seq: int,
             beta: float = 0.1, ref_logps: Tensor | None = None) -> Tensor:
    """G = ∂L/∂z at every position (N, V), from the closed forms in the module docstring."""
    loss = get_loss(name)
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
