"""Δθ from a gradient under an optimizer rule, split by cause.

With the preconditioner held at the value the full step uses, every rule here is affine in the
gradient g:  Δθ = scale ⊙ g + offset.  So the step taken on g = g⁺ + g⁻ (the chosen and rejected
parts of the update's gradient) splits exactly into scale⊙g⁺ + scale⊙g⁻ + offset, where `offset`
holds what the rule adds on its own (momentum from earlier steps, decoupled weight decay).

    sgd      Δθ = −η g
    rmsprop  v' = α v + (1−α) g²                         Δθ = −η g / (√v' + ε)
    adam     m' = β₁ m + (1−β₁) g,  v' = β₂ v + (1−β₂) g²,  t' = t + 1
             Δθ = −η (m' / (1−β₁^t')) / (√(v' / (1−β₂^t')) + ε)
    adamw    adam, plus −η λ θ                            (decoupled weight decay)
Weight decay on sgd, adam and rmsprop is torch's L2 form: g becomes g + λθ before the rule, so
λθ's share of the step joins the offset. Gradient-norm clipping (what the transformers Trainer does
before every step, max_grad_norm = 1.0 by default) multiplies the whole gradient by
c = min(1, max_norm / (‖g‖ + 1e-6)), ‖g‖ over all parameters given; c is fixed by the full
gradient like the preconditioner, so each part is scaled by it too. These match torch.optim and
torch.nn.utils.clip_grad_norm_ (tests compare them). State is fresh unless given, keyed by
parameter name with torch's names: exp_avg, exp_avg_sq, step (adam, adamw), square_avg (rmsprop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from learndyn.errors import LearndynError

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")


@dataclass(frozen=True)
class OptimizerRule:
    """An optimizer's update rule and hyperparameters (torch.optim's defaults)."""

    name: str = "sgd"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0  # decoupled for adamw, L2 (added to the gradient) for the others
    alpha: float = 0.99  # rmsprop
    max_grad_norm: float | None = None  # clip the gradient's total norm first, as the Trainer does

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise LearndynError(f"unknown optimizer '{self.name}'; valid: {', '.join(OPTIMIZERS)}")
        if not self.lr > 0:
            raise LearndynError(f"learning rate must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise LearndynError(f"weight decay must not be negative, got {self.weight_decay}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise LearndynError(f"max_grad_norm must be positive (or None for no clipping), got {self.max_grad_norm}")


@dataclass
class Step:
    """Δθ = scale ⊙ g + offset for each named parameter; `offset` is None when the rule adds nothing."""

    scale: dict[str, Tensor | float]
    offset: dict[str, Tensor] | None
    clip: float = 1.0  # the gradient-norm clipping factor folded into `scale` (1: no clip bit)

    def apply(self, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        """scale ⊙ g: the part of Δθ caused by the gradient `grads` (a part of the full gradient)."""
        return {n: g * self.scale[n] for n, g in grads.items()}


def plan_step(rule: OptimizerRule, params: dict[str, Tensor], grad: dict[str, Tensor],
              state: dict[str, dict[str, Any]] | None = None) -> Step:
    """The affine form of `rule`'s step for the full gradient `grad` at parameters `params`."""
    state = state or {}
    lr, clip = rule.lr, clip_coefficient(grad, rule.max_grad_norm)
    l2 = rule.weight_decay if rule.name != "adamw" else 0.0
    grad = {n: clip * g + l2 * params[n].detach() if l2 else clip * g for n, g in grad.items()}  # what the rule sees
    if rule.name == "sgd":
        scale: dict[str, Tensor | float] = {n: -lr for n in grad}
        offset: dict[str, Tensor] = {}
    elif rule.name == "rmsprop":
        scale, offset = {}, {}
        for n, g in grad.items():
            v = rule.alpha * _state(state, n, "square_avg", g) + (1 - rule.alpha) * g * g
            scale[n] = -lr / (v.sqrt() + rule.eps)
    else:
        b1, b2 = rule.betas
        scale, offset = {}, {}
        for n, g in grad.items():
            t = float(state.get(n, {}).get("step", 0)) + 1
            m = _state(state, n, "exp_avg", g)
            v = b2 * _state(state, n, "exp_avg_sq", g) + (1 - b2) * g * g
            denom = (v / (1 - b2**t)).sqrt() + rule.eps
            scale[n] = -lr * (1 - b1) / ((1 - b1**t) * denom)
            offset[n] = -lr * b1 * m / ((1 - b1**t) * denom)
            if rule.name == "adamw" and rule.weight_decay:
                offset[n] = offset[n] - lr * rule.weight_decay * params[n].detach()
    if l2:  # the decay term's share of the step: scale ⊙ λθ
        for n in grad:
            offset[n] = offset.get(n, 0) + scale[n] * l2 * params[n].detach()
    offset = {n: o for n, o in offset.items() if torch.is_tensor(o)}
    has_offset = any(bool(o.any()) for o in offset.values())
    return Step({n: s * clip for n, s in scale.items()}, offset if has_offset else None, clip)


def clip_coefficient(grad: dict[str, Tensor], max_norm: float | None) -> float:
    """torch.nn.utils.clip_grad_norm_'s factor: min(1, max_norm / (‖g‖ + 1e-6)), ‖g‖ over all of `grad`."""
    if max_norm is None or not grad:
        return 1.0
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().double()) for g in grad.values()]))
    return min(1.0, max_norm / (float(total) + 1e-6))


def state_from_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """A live torch optimizer's state keyed by parameter name (e.g. `trainer.optimizer` mid-run)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: dict(s) for p, s in optimizer.state.items() if id(p) in names}


def _state(state: dict[str, dict[str, Any]], name: str, key: str, like: Tensor) -> Tensor:
    value = state.get(name, {}).get(key)
    return torch.zeros_like(like) if value is None else value.to(like)
