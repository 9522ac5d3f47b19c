"""Optimizer rules: Δθ = scale ⊙ g + offset reproduces torch.optim's step, fresh or mid-run."""

import pytest
import torch

from learndyn.dynamics.updates import OptimizerRule, plan_step, state_from_optimizer
from learndyn.errors import LearndynError

_TORCH = {
    "sgd": lambda p, r: torch.optim.SGD(p, lr=r.lr),
    "adam": lambda p, r: torch.optim.Adam(p, lr=r.lr, betas=r.betas, eps=r.eps),
    "adamw": lambda p, r: torch.optim.AdamW(p, lr=r.lr, betas=r.betas, eps=r.eps, weight_decay=r.weight_decay),
    "rmsprop": lambda p, r: torch.optim.RMSprop(p, lr=r.lr, alpha=r.alpha, eps=r.eps),
}


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()


def _grads(model, seed):
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    model.zero_grad()
    model(x).pow(2).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop"])
@pytest.mark.parametrize("warm", [False, True])
def test_step_matches_torch_optim(name, warm):
    rule = OptimizerRule(name, lr=0.01, weight_decay=0.1 if name == "adamw" else 0.0)
    model = _model()
    opt = _TORCH[name](model.parameters(), rule)
    if warm:  # one earlier step, so momentum and second moments are non-zero
        _grads(model, seed=1)
        opt.step()
    state = state_from_optimizer(opt, model) if warm else None
    grads = _grads(model, seed=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step = plan_step(rule, before, grads, state)
    predicted = step.apply(grads)
    if step.offset is not None:
        predicted = {n: d + step.offset[n] for n, d in predicted.items()}
    opt.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(predicted[n], p.detach() - before[n], rtol=1e-9, atol=1e-12)
    assert (step.offset is not None) == (name == "adamw" or (warm and name in ("adam", "adamw")))


def test_split_parts_add_up_to_the_full_step():
    rule = OptimizerRule("adam", lr=0.01)
    model = _model()
    g1, g2 = _grads(model, 1), _grads(model, 2)
    full = {n: g1[n] + g2[n] for n in g1}
    step = plan_step(rule, dict(model.named_parameters()), full)
    parts = step.apply(g1), step.apply(g2)
    whole = step.apply(full)
    for n in full:
        torch.testing.assert_close(parts[0][n] + parts[1][n], whole[n])


def test_bad_rule_is_refused():
    with pytest.raises(LearndynError, match="valid: sgd, adam, adamw, rmsprop"):
        OptimizerRule("lion")
    with pytest.raises(LearndynError, match="positive"):
        OptimizerRule("sgd", lr=0)
