"""Optimizer rules: Δθ = scale ⊙ g + offset reproduces torch.optim's step, fresh or mid-run."""

import pytest
import torch

from learndyn.dynamics.updates import OptimizerRule, plan_step, state_from_optimizer
from learndyn.errors import LearndynError

_TORCH = {
    "sgd": lambda p, r: torch.optim.SGD(p, lr=r.lr, weight_decay=r.weight_decay),
    "adam": lambda p, r: torch.optim.Adam(p, lr=r.lr, betas=r.betas, eps=r.eps, weight_decay=r.weight_decay),
    "adamw": lambda p, r: torch.optim.AdamW(p, lr=r.lr, betas=r.betas, eps=r.eps, weight_decay=r.weight_decay),
    "rmsprop": lambda p, r: torch.optim.RMSprop(p, lr=r.lr, alpha=r.alpha, eps=r.eps, weight_decay=r.weight_decay),
}


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()


def _grads(model, seed):
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    model.zero_grad()
    model(x).pow(2).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _torch_step(model, opt, grads, max_norm):
    """The real step: set the gradient, clip it as the Trainer does, step; return Δθ."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    opt.step()
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop"])
@pytest.mark.parametrize("warm", [False, True])
@pytest.mark.parametrize("weight_decay, max_norm", [(0.0, None), (0.1, None), (0.1, 0.05)])
def test_step_matches_torch_optim(name, warm, weight_decay, max_norm):
    rule = OptimizerRule(name, lr=0.01, weight_decay=weight_decay, max_grad_norm=max_norm)
    model = _model()
    opt = _TORCH[name](model.parameters(), rule)
    if warm:  # one earlier step, so momentum and second moments are non-zero
        _torch_step(model, opt, _grads(model, seed=1), max_norm)
    state = state_from_optimizer(opt, model) if warm else None
    grads = _grads(model, seed=2)
    if max_norm is not None:  # the clipping must bite for the test to mean anything
        assert sum(g.pow(2).sum() for g in grads.values()).sqrt() > 2 * max_norm
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    step = plan_step(rule, params, grads, state)
    predicted = step.apply(grads)
    if step.offset is not None:
        predicted = {n: d + step.offset[n] for n, d in predicted.items()}
    actual = _torch_step(model, opt, grads, max_norm)
    for n in actual:
        torch.testing.assert_close(predicted[n], actual[n], rtol=1e-9, atol=1e-12)
    adds_own = weight_decay > 0 or (warm and name in ("adam", "adamw"))
    assert (step.offset is not None) == adds_own


def test_parts_of_the_gradient_and_the_offset_make_the_real_step():
    """Δθ of g1 + g2 splits into a part per gradient and the rule's own part; here each is compared
    with the real clipped AdamW step on the whole, and the parts are not the steps each alone would take."""
    rule = OptimizerRule("adamw", lr=0.01, weight_decay=0.1, max_grad_norm=0.05)
    model = _model()
    opt = _TORCH["adamw"](model.parameters(), rule)
    _torch_step(model, opt, _grads(model, 1), rule.max_grad_norm)
    g1, g2 = _grads(model, 2), _grads(model, 3)
    full = {n: g1[n] + g2[n] for n in g1}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    step = plan_step(rule, params, full, state_from_optimizer(opt, model))
    one, two = step.apply(g1), step.apply(g2)
    alone = plan_step(rule, params, g1, state_from_optimizer(opt, model)).apply(g1)
    actual = _torch_step(model, opt, full, rule.max_grad_norm)
    for n in actual:
        torch.testing.assert_close(one[n] + two[n] + step.offset[n], actual[n], rtol=1e-9, atol=1e-12)
    assert any(not torch.allclose(one[n], alone[n]) for n in one)  # the full step's preconditioner and clip


def test_bad_rule_is_refused():
    with pytest.raises(LearndynError, match="valid: sgd, adam, adamw, rmsprop"):
        OptimizerRule("lion")
    with pytest.raises(LearndynError, match="positive"):
        OptimizerRule("sgd", lr=0)
    with pytest.raises(LearndynError, match="max_grad_norm"):
        OptimizerRule("adam", max_grad_norm=0.0)
    with pytest.raises(LearndynError, match="weight decay"):
        OptimizerRule("adam", weight_decay=-1.0)
