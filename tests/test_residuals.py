"""The hand-written residuals G = ∂L/∂z equal autograd's, for every loss and margin regime."""

import pytest
import torch

from learndyn.dynamics.residuals import loss_value, residual, sequence_logps
from learndyn.errors import LearndynError
from learndyn.losses import LOSSES, Loss, get_loss, names

EXPLAINED = names(explained=True, policy_gradient=False)  # GRPO's: tests/test_explain_grpo.py


def _batch(n_pairs=3, vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 5, (2 * n_pairs,), generator=g)
    seq = torch.repeat_interleave(torch.arange(2 * n_pairs), lengths)
    logits = torch.randn(len(seq), vocab, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, vocab, (len(seq),), generator=g)
    return logits, labels, seq, 2 * n_pairs


@pytest.mark.parametrize("name", EXPLAINED)
@pytest.mark.parametrize("seed", range(4))
def test_residual_equals_autograd(name, seed):
    name = LOSSES[name]
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
    assert residual(LOSSES["hinge"], logits, labels, seq, n_seq, beta=1.0, ref_logps=far_ref).abs().max() == 0
    assert residual(LOSSES["sigmoid"], logits, labels, seq, n_seq, beta=1.0, ref_logps=far_ref).abs().max() < 1e-30


def test_pairwise_residual_pulls_chosen_up_and_pushes_rejected_down():
    logits, labels, seq, n_seq = _batch()
    g = residual(LOSSES["sigmoid"], logits, labels, seq, n_seq, beta=0.1)
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
    sig, ipo, hinge, sig_norm = [], [], [], []
    for i in range(p):
        c, r = per_seq[i] - ref[i], per_seq[p + i] - ref[p + i]
        sig.append(-torch.nn.functional.logsigmoid(beta * (c - r)))
        hinge.append(torch.relu(1 - beta * (c - r)))
        ipo.append((c / length[i] - r / length[p + i] - 1 / (2 * beta)) ** 2)
        sig_norm.append(-torch.nn.functional.logsigmoid(beta * (c / length[i] - r / length[p + i])))
    out |= {"sigmoid": torch.stack(sig).mean(), "ipo": torch.stack(ipo).mean(), "hinge": torch.stack(hinge).mean(),
            "sigmoid_norm": torch.stack(sig_norm).mean()}
    return out


@pytest.mark.parametrize("seed", range(3))
def test_losses_are_the_ones_trl_trains(seed):
    logits, labels, seq, n_seq = _batch(seed=seed)
    ref = torch.randn(n_seq, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) * 3
    expected = _reference_losses(logits, labels, seq, n_seq, 0.5, ref)
    assert set(expected) == set(EXPLAINED)
    for name, value in expected.items():
        torch.testing.assert_close(loss_value(LOSSES[name], logits, labels, seq, n_seq, beta=0.5, ref_logps=ref), value,
                                   rtol=1e-12, atol=1e-12, msg=name)


def test_names_resolve_once_to_the_registry_entry_and_bad_ones_are_one_line():
    assert get_loss("dpo") is get_loss("sigmoid") is LOSSES["sigmoid"]  # explain's old name still reads
    assert get_loss(LOSSES["ipo"], explained=True) is LOSSES["ipo"]
    with pytest.raises(LearndynError, match="unknown loss 'kto' for explain; valid: sft, sigmoid, ipo, hinge, sigmoid_norm, dapo, grpo, dr_grpo, bnpo$"):
        get_loss("kto", explained=True)
    with pytest.raises(LearndynError, match="^explain does not support loss 'apo_zero'; valid: sft, sigmoid"):
        get_loss("apo_zero", explained=True)
    with pytest.raises(LearndynError, match="explain has no residual for loss 'robust'"):
        get_loss(LOSSES["robust"], explained=True)
    with pytest.raises(LearndynError, match="on-policy DPO .*valid: sigmoid, ipo$"):
        get_loss("hinge", pairwise=True, online=True)
    with pytest.raises(LearndynError, match="^DPO does not support loss .sft.; valid: sigmoid, ipo, hinge, sigmoid_norm, exo_pair"):
        get_loss("sft", pairwise=True)


def test_every_pairwise_loss_is_one_trl_accepts():
    """The registry's names are what `train dpo --loss` hands TRL: each must be a loss_type TRL lists
    (DPOConfig validates nothing; its field's help is TRL's list of the names its trainer accepts)."""
    import dataclasses

    from trl import DPOConfig

    documented = next(f for f in dataclasses.fields(DPOConfig) if f.name == "loss_type").metadata["help"]
    for name in names(pairwise=True):
        assert f"`'{name}'`" in documented, name


def test_a_new_margin_loss_is_one_entry():
    """What the README's contributor notes promise: a Loss with value and slope is explained at once."""
    squared = Loss("squared", value=lambda h, b: (b * h - 1) ** 2, slope=lambda h, b: 2 * b * (b * h - 1))
    logits, labels, seq, n_seq = _batch()
    z = logits.clone().requires_grad_()
    (expected,) = torch.autograd.grad(loss_value(squared, z, labels, seq, n_seq, beta=0.3), z)
    torch.testing.assert_close(residual(squared, logits, labels, seq, n_seq, beta=0.3), expected, rtol=1e-10, atol=1e-12)
