"""The losses learndyn trains and explains: one registry, keyed by the names TRL uses.

A `Loss` is resolved once, where a name comes in (the CLI, a settings file, a library call), and
the object is passed down: training hands `name` to TRL as its `loss_type`, and `explain` takes
`value` and `slope` for its residual G = ∂L/∂z (dynamics/residuals.py). Pairwise losses act on the
margin of a preference pair,

    h = [log π(y⁺) − log π_ref(y⁺)] − [log π(y⁻) − log π_ref(y⁻)]     (each log-ratio divided by
                                                                       |y| when `per_token`)
    L = mean over pairs of ℓ(h, β),   `value` = ℓ,   `slope` = ℓ' = dℓ/dh.

    sft           mean token −log π(y) over the batch (not pairwise)
    sigmoid       ℓ = −log σ(βh)            ℓ' = −β σ(−βh)            (DPO)
    ipo           ℓ = (h − 1/(2β))²         ℓ' = 2 (h − 1/(2β))        per token, as TRL's ipo
    hinge         ℓ = max(0, 1 − βh)        ℓ' = −β · [βh < 1]         (SLiC)
    sigmoid_norm  ℓ = −log σ(βh)            ℓ' = −β σ(−βh)             per token (length-normalised DPO)

The other TRL losses train (`train dpo --loss`) but have no residual here yet: they are not a
function of the margin alone (apo_*, sppo_hard, nca_pair, aot*), need running state (bco_pair) or
extra parameters (robust, exo_pair, discopop), so `explain` refuses them by name.

Adding a TRL loss to training and explain is one entry in LOSSES (see the README's contributor notes).
Torch is imported inside the functions, so that listing the names (CLI help) stays light.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from learndyn.errors import LearndynError

Curve = Callable[[Any, float], Any]  # (margin tensor h, beta) -> tensor


@dataclass(frozen=True)
class Loss:
    """A loss by its TRL name; `value`/`slope` are ℓ(h, β) and ℓ'(h, β) where explain supports it."""

    name: str
    pairwise: bool = True
    value: Curve | None = None
    slope: Curve | None = None
    per_token: bool = False  # each side's log-ratio is divided by its completion length first
    online: bool = False  # TRL's OnlineDPOTrainer implements it (train dpo --on-policy)

    @property
    def explained(self) -> bool:
        """Whether `explain` has its residual."""
        return not self.pairwise or (self.value is not None and self.slope is not None)


def _sigmoid_value(h: Any, beta: float) -> Any:
    from torch.nn.functional import logsigmoid

    return -logsigmoid(beta * h)


def _sigmoid_slope(h: Any, beta: float) -> Any:
    import torch

    return -beta * torch.sigmoid(-beta * h)


def _ipo_value(h: Any, beta: float) -> Any:
    return (h - 1 / (2 * beta)) ** 2


def _ipo_slope(h: Any, beta: float) -> Any:
    return 2 * (h - 1 / (2 * beta))


def _hinge_value(h: Any, beta: float) -> Any:
    import torch

    return torch.relu(1 - beta * h)


def _hinge_slope(h: Any, beta: float) -> Any:
    return -beta * (beta * h < 1).to(h.dtype)


LOSSES: dict[str, Loss] = {
    "sft": Loss("sft", pairwise=False),
    "sigmoid": Loss("sigmoid", value=_sigmoid_value, slope=_sigmoid_slope, online=True),
    "ipo": Loss("ipo", value=_ipo_value, slope=_ipo_slope, per_token=True, online=True),
    "hinge": Loss("hinge", value=_hinge_value, slope=_hinge_slope),
    "sigmoid_norm": Loss("sigmoid_norm", value=_sigmoid_value, slope=_sigmoid_slope, per_token=True),
    **{name: Loss(name) for name in ("exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                                     "aot_unpaired", "apo_zero", "apo_down", "discopop")},
}
ALIASES = {"dpo": "sigmoid"}  # the name explain took before the registry followed TRL


def names(*, pairwise: bool | None = None, explained: bool | None = None, online: bool | None = None) -> list[str]:
    """The registry's names with the given properties (None: either), in registry order."""
    return [n for n, loss in LOSSES.items()
            if (pairwise is None or loss.pairwise == pairwise) and (explained is None or loss.explained == explained)
            and (online is None or loss.online == online)]


def get_loss(loss: str | Loss, *, pairwise: bool | None = None, explained: bool = False, online: bool = False) -> Loss:
    """The Loss for a name (or the Loss itself), checked for what the caller needs; one line otherwise."""
    if isinstance(loss, Loss):
        found = loss
    else:
        key = ALIASES.get(loss, loss)
        valid = names(pairwise=pairwise, explained=explained or None, online=online or None)
        if key not in LOSSES or key not in valid:
            what = ("explain" if explained else "on-policy DPO (TRL's OnlineDPOTrainer)" if online
                    else "DPO" if pairwise else "learndyn")
            problem = f"{what} does not support loss '{key}'" if key in LOSSES else f"unknown loss '{loss}' for {what}"
            raise LearndynError(f"{problem}; valid: {', '.join(valid)}")
        found = LOSSES[key]
    if explained and not found.explained:
        raise LearndynError(f"explain has no residual for loss '{found.name}'; it explains {', '.join(names(explained=True))}")
    return found
