"""The squeezing effect in a linear softmax model (Ren & Sutherland, Section 3.3 and its Appendix lemma).

One input x (d,), weights W (d, V), logits z = Wᵀx and π = softmax(z). One SGD step on x raises the
objective J = Σ_v c_v log π(v) for a vector of class weights c (V,):

    ∇_W log π(y) = x (e_y − π)ᵀ                  so   ∇_W J = x (c − (Σ_v c_v) π)ᵀ
    W' = W + η ∇_W J                              so   z' = z + η‖x‖² (c − (Σ_v c_v) π)

positive  c = e_{y⁺}          an SFT step on y⁺
negative  c = −e_ȳ            gradient ascent on −log π(ȳ), the push-down of DPO's rejected response
both      c = e_{y⁺} − e_ȳ    DPO-like; Σ c = 0, so the π terms cancel: only the logits of y⁺ and ȳ move

The claim (the squeezing effect): a negative step gives z'_v = z_v + η‖x‖² π_v for every v ≠ ȳ, so

    π'_v / π_v = exp(η‖x‖² π_v) / Z      for v ≠ ȳ, with one normaliser Z

π(ȳ) falls; mass moves to the other classes in proportion to exp(η‖x‖² π_v): the already likely
gain most, the unlikely lose, the argmax of the other classes always gains. Peakier π (and smaller
π(ȳ)) squeeze harder: with one dominant class, every other class falls. Float64 throughout, so the
toy's numbers are clean; the tests check the closed-form gradient against autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

INITS = ("uniform", "flat", "peaky")
PEAK_CLASSES = 5  # classes the peaky initialisation puts its target mass on
PEAK_LR = 10.0  # the peaky step size: with ‖x‖² = 4 it lifts the target classes by up to 8 logits


def draw_input(dim: int, generator: torch.Generator) -> Tensor:
    """x: a random direction of length 2, so ‖x‖² = 4 and one learning rate η moves the logits by the
    same 4η in every case and for every seed (with x ~ N(0, I) in R⁴, ‖x‖² varies tenfold by seed)."""
    x = torch.randn(dim, generator=generator, dtype=torch.float64)  # (d,)
    return 2.0 * x / x.norm()


def probs(x: Tensor, W: Tensor) -> Tensor:
    """π = softmax(Wᵀx). (V,)"""
    return (x @ W).softmax(-1)  # (d,) @ (d, V) -> (V,)


def objective_grad(x: Tensor, W: Tensor, c: Tensor) -> Tensor:
    """∇_W Σ_v c_v log π(v) = x (c − (Σc) π)ᵀ, in closed form. (d, V)"""
    residual = c - c.sum() * probs(x, W)  # (V,)
    return torch.outer(x, residual)  # (d, V)


def class_weights(n_classes: int, positive: int | None, negative: int | None) -> Tensor:
    """c of the module docstring: +1 on the class pulled up, −1 on the class pushed down. (V,)"""
    c = torch.zeros(n_classes, dtype=torch.float64)
    if positive is not None:
        c[positive] += 1.0
    if negative is not None:
        c[negative] -= 1.0
    return c


def sgd_step(x: Tensor, W: Tensor, positive: int | None, negative: int | None, lr: float) -> Tensor:
    """W after one SGD step that raises log π(positive) and lowers log π(negative) (either may be None)."""
    c = class_weights(W.shape[1], positive, negative)  # (V,)
    return W + lr * objective_grad(x, W, c)  # (d, V)


def init_weights(kind: str, x: Tensor, n_classes: int, generator: torch.Generator) -> Tensor:
    """W (d, V) whose π at x is spread like the paper's three starting points.

    uniform  W ~ N(0, 1): a random, moderately spread π
    flat     W = 1 + 0.05·N(0, 1): logits nearly equal, π close to 1/V
    peaky    uniform, then one large step towards a multi-hot target on a few random classes (the
             pretrained-model case: mass concentrated on few classes). It needs x: the step is taken
             on the input whose π it shapes.
    """
    from learndyn.errors import LearndynError

    dim = x.shape[0]
    W = torch.randn(dim, n_classes, generator=generator, dtype=torch.float64)  # (d, V)
    if kind == "uniform":
        return W
    if kind == "flat":
        return 1.0 + 0.05 * W
    if kind == "peaky":
        peaks = torch.randperm(n_classes, generator=generator)[:PEAK_CLASSES]
        target = torch.zeros(n_classes, dtype=torch.float64)
        target[peaks] = 1.0 / PEAK_CLASSES  # a distribution: mass on a few classes
        return W + PEAK_LR * objective_grad(x, W, target)
    raise LearndynError(f"unknown initialisation '{kind}'; valid: {', '.join(INITS)}")


def entropy(p: Tensor) -> Tensor:
    """Shannon entropy in nats of a distribution (V,), 0·log 0 taken as 0."""
    return -(p * p.clamp_min(1e-300).log()).sum(-1)
