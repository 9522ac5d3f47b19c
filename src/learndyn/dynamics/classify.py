"""The exact classification case of Δ log π = −η · A · K · G (Ren & Sutherland, Eq. 5, Sec. 3.1).

For any torch classifier with logits z(x) ∈ R^C and π = softmax(z), one SGD step of learning rate η
on an update example (x_u, y_u) with loss L changes the log-probabilities of an observed input x_o by

    Δ log π(x_o) = −η · A(x_o) · K(x_o, x_u) · G(x_u, y_u) + O(η²)

    A(x_o)      = I − 1 π(x_o)ᵀ            (C, C)  ∂ log π / ∂z: row i is e_iᵀ − πᵀ, so A·1 = 0
    K(x_o, x_u) = J(x_o) J(x_u)ᵀ            (C, C)  the empirical NTK, J = ∂z/∂θ (C, P)
    G(x_u, y_u) = ∂L/∂z(x_u)                (C,)    ce: π − e_y (pull y up); neg: −(π − e_y) (push y down)

In the paper's story K says *which* observations move (how alike their gradients are to the update's),
G says *in which direction* (up on y_u, down on whatever the model currently believes instead), and A
turns a logit push into a change of log-probabilities (a push on a class the observation already
believes in moves its log π little).

Everything here runs in float64 on detached copies of the trainable parameters through
`torch.func.functional_call`, so no function changes the model and first-order agreement is clean.
Inputs are single examples without a batch dimension (`x` has the model's per-example shape); the
model should be deterministic (eval mode, or no dropout/batch norm).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev

from learndyn.dynamics.residuals import token_residual
from learndyn.errors import LearndynError

__all__ = ["LOSSES", "OneStep", "entk", "entk_cosine", "jacobian", "loss_value", "one_step", "one_step_many",
           "residual", "softmax_jacobian"]

# Classifier losses of the digits experiment (one label, no pairs), not the LLM losses of
# learndyn/losses.py: loss name -> sign s of L = s · (−log π(y)); G = s · (π − e_y).
# "neg" is the negative gradient of DPO's push-down on y⁻ (+log π(y)): it squeezes mass into the argmax.
LOSSES: dict[str, float] = {"ce": 1.0, "sft": 1.0, "neg": -1.0}

Params = dict[str, Tensor]


def _sign(loss: str) -> float:
    if loss not in LOSSES:
        raise LearndynError(f"unknown classification loss '{loss}'; valid: {', '.join(LOSSES)}")
    return LOSSES[loss]


def _check_label(label: int, n_classes: int) -> int:
    label = int(label)
    if not 0 <= label < n_classes:
        raise LearndynError(f"label {label} is out of range for {n_classes} classes")
    return label


def softmax_jacobian(probs: Tensor) -> Tensor:
    """A = I − 1πᵀ = ∂ log softmax(z)/∂z, the A of Eq. 5; batched over leading dims. (..., C) -> (..., C, C)"""
    eye = torch.eye(probs.shape[-1], dtype=probs.dtype, device=probs.device)  # (C, C)
    return eye - probs.unsqueeze(-2)  # (..., C, C): row i is e_iᵀ − πᵀ


def loss_value(logits: Tensor, label: int, loss: str = "ce") -> Tensor:
    """The scalar L(z, y) whose ∂L/∂z `residual` writes out: s · (−log π(y)). logits (C,) -> ()"""
    return -_sign(loss) * logits.log_softmax(-1)[_check_label(label, logits.shape[-1])]


def residual(logits: Tensor, label: int, loss: str = "ce") -> Tensor:
    """G = ∂L/∂z of one example, the G of Eq. 5: ±(π − e_y) by hand (not autograd). (C,) -> (C,)"""
    label = _check_label(label, logits.shape[-1])
    g = token_residual(logits[None], torch.tensor([label]))[0]  # (C,) π − e_y, computed in float32
    return _sign(loss) * g.to(logits.dtype)


def _state(model: nn.Module) -> tuple[Params, Params]:
    """float64 detached copies: (trainable parameters, everything else the forward needs)."""
    params = {k: v.detach().to(torch.float64) for k, v in model.named_parameters() if v.requires_grad}
    rest = {k: v.detach().to(torch.float64) for k, v in model.named_parameters() if not v.requires_grad}
    rest |= {k: v.detach().to(torch.float64) if v.is_floating_point() else v for k, v in model.named_buffers()}
    return params, rest


def _logits(model: nn.Module, params: Params, rest: Params, X: Tensor) -> Tensor:
    return functional_call(model, (params, rest), (X.to(torch.float64),))  # (N, C)


def _jacobians(model: nn.Module, params: Params, rest: Params, X: Tensor) -> Tensor:
    """J = ∂z/∂θ of each input in X, flattened over all trainable parameters. (N, C, P)"""
    jac = jacrev(lambda p: _logits(model, p, rest, X))(params)  # {name: (N, C, *shape)}
    return torch.cat([j.flatten(2) for j in jac.values()], dim=2)  # (N, C, P)


def jacobian(model: nn.Module, x: Tensor) -> Tensor:
    """J(x) = ∂z(x)/∂θ over the trainable parameters in `named_parameters` order, float64. (C, P)"""
    return _jacobians(model, *_state(model), x[None])[0]


def entk(model: nn.Module, x_o: Tensor, x_u: Tensor) -> Tensor:
    """K(x_o, x_u) = J(x_o) J(x_u)ᵀ, the eNTK of Eq. 5 between two inputs' logits. (C, C)"""
    params, rest = _state(model)
    J = _jacobians(model, params, rest, torch.stack([x_o, x_u]))  # (2, C, P)
    return J[0] @ J[1].T  # (C, C)


def entk_cosine(model: nn.Module, X_o: Tensor, x_u: Tensor) -> Tensor:
    """tr K(x_o, x_u) / √(tr K(x_o, x_o) · tr K(x_u, x_u)): how alike the inputs look to the network,
    in [−1, 1] and free of gradient scale, one per row of X_o. (N,)"""
    params, rest = _state(model)
    J = _jacobians(model, params, rest, torch.cat([X_o, x_u[None]]))  # (N+1, C, P)
    J_o, J_u = J[:-1].flatten(1), J[-1].flatten()  # (N, C·P), (C·P,)
    return (J_o @ J_u) / (J_o.norm(dim=1) * J_u.norm())  # (N,)


@dataclass(frozen=True)
class OneStep:
    """One SGD step's first-order prediction against the real change (float64). For `one_step_many`
    every field but G and relative_error gains a leading observation dimension N."""

    A: Tensor  # (C, C) softmax Jacobian at x_o
    K: Tensor  # (C, C) eNTK between x_o and x_u
    G: Tensor  # (C,)   loss residual at (x_u, y_u)
    logit_change: Tensor  # (C,) −η · K · G: the push on x_o's logits, before A turns it into Δ log π
    predicted: Tensor  # (C,) −η · A · K · G
    actual: Tensor  # (C,)    log π(x_o) after the step minus before
    relative_error: float  # ‖predicted − actual‖ / ‖actual‖ over all entries


def one_step_many(model: nn.Module, x_u: Tensor, y_u: int, X_o: Tensor, lr: float, loss: str = "ce") -> OneStep:
    """Eq. 5 for N observations X_o (N, ...) at once, against one real SGD step θ ← θ − η ∇θ L(x_u, y_u)
    taken on a float64 copy of the parameters (the model is not changed)."""
    if not lr > 0:
        raise LearndynError(f"lr must be positive, got {lr}")
    _sign(loss)  # an unknown loss name fails before any work
    params, rest = _state(model)
    J = _jacobians(model, params, rest, torch.cat([X_o, x_u[None]]))  # (N+1, C, P)
    J_o, J_u = J[:-1], J[-1]  # (N, C, P), (C, P)
    with torch.no_grad():
        z_u = _logits(model, params, rest, x_u[None])[0]  # (C,)
        logp_before = _logits(model, params, rest, X_o).log_softmax(-1)  # (N, C)
    A = softmax_jacobian(logp_before.exp())  # (N, C, C)
    K = J_o @ J_u.T  # (N, C, C)
    G = residual(z_u, y_u, loss)  # (C,)
    logit_change = -lr * K @ G  # (N, C)
    predicted = torch.einsum("nij,nj->ni", A, logit_change)  # (N, C) −η·A·K·G

    # the real step, from autograd of the loss itself (not from our G): an independent check
    grads = grad(lambda p: loss_value(_logits(model, p, rest, x_u[None])[0], y_u, loss))(params)
    stepped = {k: v - lr * grads[k] for k, v in params.items()}
    with torch.no_grad():
        actual = _logits(model, stepped, rest, X_o).log_softmax(-1) - logp_before  # (N, C)
    error = ((predicted - actual).norm() / actual.norm()).item()
    return OneStep(A=A, K=K, G=G, logit_change=logit_change, predicted=predicted, actual=actual,
                   relative_error=error)


def one_step(model: nn.Module, x_u: Tensor, y_u: int, x_o: Tensor, lr: float, loss: str = "ce") -> OneStep:
    """Eq. 5 for one observation x_o: predicted −η·A·K·G against the real change of log π(x_o) after
    one SGD step on (x_u, y_u); the model is not changed."""
    many = one_step_many(model, x_u, y_u, x_o[None], lr, loss)
    return OneStep(A=many.A[0], K=many.K[0], G=many.G, logit_change=many.logit_change[0],
                   predicted=many.predicted[0], actual=many.actual[0], relative_error=many.relative_error)
