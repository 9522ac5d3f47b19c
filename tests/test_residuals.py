"""The hand-written residuals G = ∂L/∂z equal autograd's, for every loss and margin regime."""

import pytest
import torch

from learndyn.dynamics.residuals import LOSSES, loss_value, residual, sequence_logps, token_residual
from learndyn.errors import LearndynError


def _batch(n_pairs=3, vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 5, (2 * n_pairs,), generator=g)
    seq = torch.repeat_interleave(torch.arange(2 * n_pairs), lengths)
    logits = torch.randn(len(seq), vocab, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, vocab, (len(seq),), generator=g)
    return logits, labels, seq, 2 * n_pairs


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("seed", range(4))
def test_residual_equals_autograd(name, seed):
    logits, labels, seq, n_seq = _batch(seed=seed)
    ref = torch.randn(n_seq, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + seed)) * 3
    beta = 0.5
    z = logits.clone().requires_grad_()
    (expected,) = torch.autograd.grad(loss_value(name, z, labels, seq, n_seq, beta=beta, ref_logps=ref), z)
    got = residual(name, logits, labels, seq, n_seq, beta=beta, ref_logps=ref)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_hinge_residual_vanishes_once_the_margin_is_met():
    logits, labels, seq, n_seq = _batch()
    logps = sequence_logps(logits, labels, seq, n_seq)
    far_ref = logps.clone()
    far_ref[n_seq // 2:] += 100  # reference made the rejected far likelier: the margin h is huge
    assert residual("hinge", logits, labels, seq, n_seq, beta=1.0, ref_logps=far_ref).abs().max() == 0
    assert residual("dpo", logits, labels, seq, n_seq, beta=1.0, ref_logps=far_ref).abs().max() < 1e-30


def test_pairwise_residual_pulls_chosen_up_and_pushes_rejected_down():
    logits, labels, seq, n_seq = _batch()
    g = residual("dpo", logits, labels, seq, n_seq, beta=0.1)
    at_label = g.gather(-1, labels[:, None])[:, 0]  # a descent step moves z_y by −η·G_y
    assert (at_label[seq < n_seq // 2] < 0).all() and (at_label[seq >= n_seq // 2] > 0).all()


def test_sft_residual_rows_sum_to_zero_and_are_scaled_by_token_count():
    logits, labels, seq, n_seq = _batch()
    g = residual("sft", logits, labels, seq, n_seq)
    torch.testing.assert_close(g.sum(-1), torch.zeros(len(labels), dtype=g.dtype), atol=1e-12, rtol=0)
    torch.testing.assert_close(g * len(labels), token_residual(logits, labels))


def test_unknown_loss_lists_valid_names():
    with pytest.raises(LearndynError, match="valid: sft, dpo, ipo, hinge"):
        residual("kto", *_batch())
