"""The exact classification decomposition Δ log π = −η·A·K·G and the `learndyn digits` recipe.

Tiny tanh MLPs on random data in float64; each term is checked against plain autograd, and the
first-order prediction against a real SGD step.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from learndyn.dynamics.classify import (LOSSES, entk, entk_cosine, jacobian, loss_value, one_step, one_step_many,
                                        residual, softmax_jacobian)
from learndyn.errors import LearndynError

C = 4


@pytest.fixture
def net(one_thread) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, C)).double()


@pytest.fixture
def xs() -> torch.Tensor:
    return torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def test_softmax_jacobian_is_autograd_of_log_softmax_and_kills_ones():
    z = torch.randn(3, C, dtype=torch.float64)
    A = softmax_jacobian(z.softmax(-1))  # (3, C, C)
    for n in range(3):
        assert torch.allclose(A[n], torch.autograd.functional.jacobian(lambda v: v.log_softmax(-1), z[n]))
    assert torch.allclose(A @ torch.ones(C, dtype=torch.float64), torch.zeros(3, C, dtype=torch.float64))


def test_entk_on_one_input_is_symmetric_psd(net, xs):
    K = entk(net, xs[0], xs[0])
    assert torch.allclose(K, K.T)
    assert torch.linalg.eigvalsh(K).min() > -1e-10


def test_entk_equals_per_logit_autograd_loop(net, xs):
    net[0].bias.requires_grad_(False)  # frozen parameters are not part of θ
    trainable = [p for p in net.parameters() if p.requires_grad]

    def slow_jacobian(x):
        z = net(x[None])[0]
        rows = [torch.cat([g.flatten() for g in torch.autograd.grad(z[c], trainable, retain_graph=True)])
                for c in range(C)]
        return torch.stack(rows)  # (C, P)

    J_o, J_u = slow_jacobian(xs[1]), slow_jacobian(xs[2])
    assert J_o.shape == (C, sum(p.numel() for p in trainable))
    assert torch.allclose(jacobian(net, xs[1]), J_o)
    assert torch.allclose(entk(net, xs[1], xs[2]), J_o @ J_u.T)
    cosine = (J_o * J_u).sum() / (J_o.norm() * J_u.norm())
    assert entk_cosine(net, xs[1:2], xs[2])[0].item() == pytest.approx(cosine.item())


@pytest.mark.parametrize("loss", ["ce", "sft", "neg"])
def test_residual_equals_autograd_of_loss(loss):
    z = torch.randn(C, dtype=torch.float64, requires_grad=True)
    sign = -1.0 if loss == "neg" else 1.0  # neg: L = +log π(y), the push-down of DPO's rejected side
    (sign * nn.functional.cross_entropy(z[None], torch.tensor([2]))).backward()
    assert torch.allclose(residual(z.detach(), 2, loss), z.grad, atol=1e-7)  # π − e_y is taken in float32
    assert loss_value(z.detach(), 2, loss).item() == pytest.approx(
        sign * nn.functional.cross_entropy(z.detach()[None], torch.tensor([2])).item())


def test_unknown_loss_and_bad_inputs_are_user_errors(net, xs):
    with pytest.raises(LearndynError, match="valid: " + ", ".join(LOSSES)):
        residual(torch.zeros(C), 0, "dpo")
    with pytest.raises(LearndynError, match="out of range"):
        residual(torch.zeros(C), C, "ce")
    with pytest.raises(LearndynError, match="lr must be positive"):
        one_step(net, xs[0], 1, xs[1], lr=0.0)


@pytest.mark.parametrize("loss", ["ce", "neg"])
def test_relative_error_falls_linearly_with_lr(net, xs, loss):
    big, small = (one_step(net, xs[0], 1, xs[1], lr, loss).relative_error for lr in (1e-2, 1e-3))
    assert 1e-5 < small < big < 0.1
    assert 5 < big / small < 20  # the O(η²) remainder over an O(η) change


def test_one_step_predicts_the_real_step_and_its_direction(net, xs):
    ce, neg = (one_step(net, xs[0], 1, xs[0], 1e-3, loss) for loss in ("ce", "neg"))
    assert ce.actual[1] > 0 > neg.actual[1]  # learning y raises its own log π; the negative gradient lowers it
    assert torch.allclose(ce.G, -neg.G) and torch.allclose(ce.K, neg.K) and torch.allclose(ce.A, neg.A)
    assert torch.allclose(ce.predicted, -1e-3 * ce.A @ ce.K @ ce.G)
    assert torch.allclose(ce.logit_change, -1e-3 * ce.K @ ce.G)
    assert ce.relative_error < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # float32 is worked on as a float64 copy
def test_one_step_does_not_change_the_model(xs, dtype):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, C)).to(dtype)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    step = one_step_many(net, xs[0], 1, xs[1:], lr=0.5)
    assert step.predicted.dtype == torch.float64 and step.actual.abs().max() > 1e-3
    for k, v in net.state_dict().items():
        assert v.dtype == dtype and torch.equal(v, before[k]), k
    assert all(p.grad is None for p in net.parameters())


def test_one_step_many_equals_one_step_per_observation(net, xs):
    many = one_step_many(net, xs[0], 3, xs[1:], 1e-2)
    for n in range(len(xs) - 1):
        single = one_step(net, xs[0], 3, xs[n + 1], 1e-2)
        assert torch.allclose(many.K[n], single.K) and torch.allclose(many.actual[n], single.actual)
        assert torch.allclose(many.predicted[n], single.predicted)


def test_run_digits_writes_summary_and_figures(tmp_path, one_thread):
    from learndyn.experiments.digits import run_digits

    summary = run_digits(tmp_path, steps=600, progress=False)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    for name in ("digits_one_step.png", "digits_influence.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 0 < summary["relative_error"] < 0.1
    assert summary["test_accuracy"] > 0.7
    M = torch.tensor(summary["influence"]["M"])
    assert M.shape == (10, 10)
    off = M[~torch.eye(10, dtype=torch.bool)].mean()
    assert M.diag().mean() > 0 and M.diag().mean() > off
    assert (M.diag() > 0).all()  # learning a digit raises its own held-out examples, every digit
    assert len(summary["one_step"]["observations"]) == 10
