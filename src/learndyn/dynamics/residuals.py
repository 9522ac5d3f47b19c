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

The policy-gradient losses (GRPO's loss types; the sequences are the B completions of the batch,
with advantages A (B,) and token weights w = loss.weights(|y|, max_completion_length), see losses.py):

    policy  L = Σ_i w_i Σ_t [−A_i · exp(log π_it − sg[log π_it]) + β·k3_it],   ∂L/∂log π_it = −A_i w_i + β w_i (1 − r_it)
            G_it = A_i w_i (π_it − e_{y_it})  +  β w_i (r_it − 1)(π_it − e_{y_it}),   r_it = π_ref(y_it)/π(y_it)
(∂ log π(y)/∂z = e_y − π). The KL part vanishes where π_ref = π (no reference model: the first step).

`residual_parts` splits G by cause, the split explain reports (`parts` names them in order):
    sft      chosen (all of G)
    pairs    chosen (G on y⁺: the pull-up), rejected (G on y⁻: the push-down)
    policy   positive (completions with A > 0: pulled up), negative (A < 0: pushed down), and kl
             (the β term, on every completion) when β ≠ 0; completions with A = 0 give no policy part.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class Terms:
    """What a loss needs beyond the logits: β, the reference's log-probs (per sequence (S,) for the
    pairwise losses, per token (N,) for the policy-gradient ones, whose KL term is per token), and for
    the policy-gradient losses the advantages (S,) and TRL's max_completion_length (dr_grpo)."""

    beta: float = 0.1
    ref_logps: Tensor | None = None
    advantages: Tensor | None = None
    max_completion_length: int | None = None


def kind(loss: Loss) -> str:
    """The row of the tables below that holds `loss`'s formulas."""
    return "policy" if loss.policy_gradient else "pairs" if loss.pairwise else "sft"


def parts(loss: Loss, beta: float) -> tuple[str, ...]:
    """The causes a step's prediction is split into, in the order `residual_parts` returns them."""
    return _PARTS[kind(loss)] + (("kl",) if loss.policy_gradient and beta else ())


def loss_value(loss: Loss, logits: Tensor, labels: Tensor, seq: Tensor, n_seq: int,
               beta: float = 0.1, ref_logps: Tensor | None = None, **terms) -> Tensor:
    """The scalar loss that `residual` differentiates (for reporting and for the autograd tests);
    `terms` are the further fields of `Terms` (advantages, max_completion_length)."""
    return _VALUES[kind(loss)](loss, logits, labels, seq, n_seq, Terms(beta, ref_logps, **terms))


def residual(loss: Loss, logits: Tensor, labels: Tensor, seq: Tensor, n_seq: int,
             beta: float = 0.1, ref_logps: Tensor | None = None, **terms) -> Tensor:
    """G = ∂L/∂z at every position (N, V), from the closed forms in the module docstring."""
    return sum(residual_parts(loss, logits, labels, seq, n_seq, beta, ref_logps, **terms).values())


def residual_parts(loss: Loss, logits: Tensor, labels: Tensor, seq: Tensor, n_seq: int,
                   beta: float = 0.1, ref_logps: Tensor | None = None, **terms) -> dict[str, Tensor]:
    """G split by cause (module docstring), each part (N, V), named as `parts` names them; they sum to G."""
    return _RESIDUALS[kind(loss)](loss, logits, labels, seq, n_seq, Terms(beta, ref_logps, **terms))


def _sft_value(loss: Loss, logits, labels, seq, n_seq, terms: Terms) -> Tensor:
    return -wide(logits).log_softmax(-1).gather(-1, labels[:, None]).mean()


def _sft_parts(loss: Loss, logits, labels, seq, n_seq, terms: Terms) -> dict[str, Tensor]:
    return {"chosen": token_residual(logits, labels) / len(labels)}


def _pair_value(loss: Loss, logits, labels, seq, n_seq, terms: Terms) -> Tensor:
    h = margin(sequence_logps(logits, labels, seq, n_seq), terms.ref_logps, _lengths(loss, seq, n_seq))
    return loss.value(h, terms.beta).mean()


def _pair_parts(loss: Loss, logits, labels, seq, n_seq, terms: Terms) -> dict[str, Tensor]:
    g = token_residual(logits, labels)  # (N, V)
    n_pairs, lengths = n_seq // 2, _lengths(loss, seq, n_seq)
    with torch.no_grad():
        h = margin(sequence_logps(logits, labels, seq, n_seq), terms.ref_logps, lengths)  # (P,)
        slope = loss.slope(h, terms.beta) / n_pairs  # (P,)
    chosen = seq < n_pairs
    sign = torch.where(chosen, -1.0, 1.0).to(g.dtype)  # pull y⁺ up, push y⁻ down
    weight = sign * slope[seq % n_pairs]
    if lengths is not None:
        weight = weight / lengths[seq].to(weight.dtype)
    g = g * weight[:, None]
    return {"chosen": g * chosen[:, None].to(g.dtype), "rejected": g * (~chosen)[:, None].to(g.dtype)}


def _policy_weights(loss: Loss, seq: Tensor, n_seq: int, terms: Terms) -> tuple[Tensor, Tensor]:
    """(A_i, w_i) at every position (N,) each, in float64."""
    if terms.advantages is None:
        raise ValueError(f"loss {loss.name} needs the completions' advantages")
    w = loss.weights(torch.bincount(seq, minlength=n_seq), terms.max_completion_length).to(seq.device)  # (S,)
    return terms.advantages.to(w)[seq], w[seq]


def _token_logps(logits: Tensor, labels: Tensor) -> Tensor:
    return wide(logits).log_softmax(-1).gather(-1, labels[:, None])[:, 0]  # (N,)


def _policy_value(loss: Loss, logits, labels, seq, n_seq, terms: Terms) -> Tensor:
    a, w = _policy_weights(loss, seq, n_seq, terms)
    logp = _token_logps(logits, labels)  # (N,)
    per_token = -a.to(logp) * torch.exp(logp - logp.detach())  # the importance ratio, exactly 1 in value
    if terms.beta:
        d = _reference(terms, logp) - logp  # log π_ref − log π
        per_token = per_token + terms.beta * (torch.exp(d) - d - 1)
    return (w.to(logp) * per_token).sum()


def _policy_parts(loss: Loss, logits, labels, seq, n_seq, terms: Terms) -> dict[str, Tensor]:
    g = token_residual(logits, labels)  # (N, V)
    a, w = _policy_weights(loss, seq, n_seq, terms)
    a, w = a.to(g.dtype), w.to(g.dtype)
    out = {"positive": g * (a.clamp(min=0) * w)[:, None], "negative": g * (a.clamp(max=0) * w)[:, None]}
    if terms.beta:
        with torch.no_grad():
            logp = _token_logps(logits, labels)
            r = torch.exp(_reference(terms, logp) - logp)  # π_ref(y)/π(y)
        out["kl"] = g * (terms.beta * w * (r - 1).to(g.dtype))[:, None]
    return out


def _reference(terms: Terms, logp: Tensor) -> Tensor:
    """Per-token log π_ref; without a reference, the current model's own (no KL pull)."""
    return logp.detach() if terms.ref_logps is None else terms.ref_logps.to(logp)


_VALUES = {"sft": _sft_value, "pairs": _pair_value, "policy": _policy_value}
_RESIDUALS = {"sft": _sft_parts, "pairs": _pair_parts, "policy": _policy_parts}
_PARTS = {"sft": ("chosen",), "pairs": ("chosen", "rejected"), "policy": ("positive", "negative")}


def _lengths(loss: Loss, seq: Tensor, n_seq: int) -> Tensor | None:
    """Tokens per sequence, for the losses whose margin is per token; else None."""
    return torch.bincount(seq, minlength=n_seq) if loss.per_token else None
