"""The hand-written residuals G = ∂L/∂z equal autograd's, for every loss and margin regime."""

import pytest
import torch

from learndyn.dynamics.residuals import LOSSES, loss_value, residual, sequence_logps
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


def _reference_losses(logits, labels, seq, n_seq, beta, ref):
    """The losses as TRL's DPOTrainer writes them (loss_type sigmoid, ipo, hinge), one pair at a time
    in plain Python, and the SFT loss as the mean token negative log-likelihood."""
    logp = torch.log_softmax(logits, -1)[torch.arange(len(labels)), labels]
    per_seq = [logp[seq == s].sum() for s in range(n_seq)]
    length = [int((seq == s).sum()) for s in range(n_seq)]
    p = n_seq // 2
    out = {"sft": logp.mean().neg()}
    sig, ipo, hinge = [], [], []
    for i in range(p):
        c, r = per_seq[i] - ref[i], per_seq[p + i] - ref[p + i]
        sig.append(-torch.nn.functional.logsigmoid(beta * (c - r)))
        hinge.append(torch.relu(1 - beta * (c - r)))
        ipo.append((c / length[i] - r / length[p + i] - 1 / (2 * beta)) ** 2)
    out |= {"dpo": torch.stack(sig).mean(), "ipo": torch.stack(ipo).mean(), "hinge": torch.stack(hinge).mean()}
    return out


@pytest.mark.parametrize("seed", range(3))
def test_losses_are_the_ones_trl_trains(seed):
    logits, labels, seq, n_seq = _batch(seed=seed)
    ref = torch.randn(n_seq, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) * 3
    expected = _reference_losses(logits, labels, seq, n_seq, 0.5, ref)
    assert set(expected) == set(LOSSES)
    for name, value in expected.items():
        torch.testing.assert_close(loss_value(name, logits, labels, seq, n_seq, beta=0.5, ref_logps=ref), value,
                                   rtol=1e-12, atol=1e-12, msg=name)


def test_unknown_loss_lists_valid_names():
    with pytest.raises(LearndynError, match="valid: sft, dpo, ipo, hinge"):
        residual("kto", *_batch())
