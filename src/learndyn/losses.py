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

Policy-gradient losses (`policy_gradient`, the `loss_type`s of TRL's GRPOTrainer) act on groups of
completions sampled for one prompt, each with its advantage A_i (`SCALE_REWARDS`; dynamics/groups.py
computes it as TRL does). At the first iteration of a generation batch (num_iterations = 1) the
importance ratio is exactly 1 and its clipping has no effect on the gradient, so per token

    ℓ_it = −A_i · exp(log π_it − sg[log π_it])  [+ β · k3_it,  k3 = π_ref/π − log(π_ref/π) − 1]
    L = Σ_i w_i Σ_t ℓ_it,    `weights` = w (one token weight per completion i of the batch of B):

    grpo     w_i = 1 / (B · |y_i|)                 mean over each completion's tokens, then over completions
    dr_grpo  w_i = 1 / (B · max_completion_length)
    dapo     w_i = 1 / Σ_j |y_j|                    tokens of the whole batch (one process, no accumulation)
    bnpo     w_i = 1 / Σ_j |y_j|                    the same for one batch

TRL's other loss types (cispo, sapo, luspo, vespo) train (`train grpo`) but have no `weights`
here, so `explain` refuses them. Callers select the kind they need: `pairwise=True` for DPO,
`policy_gradient=True` for GRPO (None, the default: any kind).

Adding a TRL loss to training and explain is one entry in LOSSES (see the README's contributor notes).
Torch is imported inside the functions, so that listing the names (CLI help) stays light.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from learndyn.errors import LearndynError

Curve = Callable[[Any, float], Any]  # (margin tensor h, beta) -> tensor
Weights = Callable[[Any, "int | None"], Any]  # (tokens per completion (B,), max_completion_length) -> w (B,)
SCALE_REWARDS = ("group", "batch", "none")  # TRL's scale_rewards: the std an advantage is divided by


@dataclass(frozen=True)
class Loss:
    """A loss by its TRL name; `value`/`slope` are ℓ(h, β) and ℓ'(h, β) where explain supports it."""

    name: str
    pairwise: bool = True
    value: Curve | None = None
    slope: Curve | None = None
    per_token: bool = False  # each side's log-ratio is divided by its completion length first
    online: bool = False  # TRL's OnlineDPOTrainer implements it (train dpo --on-policy)
    policy_gradient: bool = False  # a GRPOTrainer loss_type (train grpo): advantage-weighted, not pairwise
    weights: Weights | None = None  # policy gradient: each completion's token weight w_i, where explain has it

    @property
    def default_beta(self) -> float:
        """TRL's default β: DPOConfig's 0.1; GRPOConfig's 0.0 (no KL term, no reference model)."""
        return 0.0 if self.policy_gradient else 0.1

    @property
    def explained(self) -> bool:
        """Whether `explain` has its residual."""
        if self.policy_gradient:
            return self.weights is not None
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


def _per_completion(lengths: Any, max_completion_length: int | None) -> Any:
    """grpo: each completion's token mean, then the mean over completions (TRL clamps |y| at 1)."""
    import torch

    return 1 / (len(lengths) * lengths.clamp(min=1).to(torch.float64))


def _per_constant(lengths: Any, max_completion_length: int | None) -> Any:
    """dr_grpo: one constant, B · max_completion_length, so that long completions weigh no less per token."""
    import torch

    if not max_completion_length:
        raise LearndynError("loss dr_grpo divides by max_completion_length (--max-new-tokens); give it")
    return torch.full(lengths.shape, 1 / (len(lengths) * max_completion_length), dtype=torch.float64)


def _per_batch_token(lengths: Any, max_completion_length: int | None) -> Any:
    """dapo, bnpo: the mean over every completion token of the batch."""
    import torch

    return torch.full(lengths.shape, 1 / max(int(lengths.sum()), 1), dtype=torch.float64)


_WEIGHTS: dict[str, Weights] = {"dapo": _per_batch_token, "grpo": _per_completion, "dr_grpo": _per_constant,
                                "bnpo": _per_batch_token}


LOSSES: dict[str, Loss] = {
    "sft": Loss("sft", pairwise=False),
    "sigmoid": Loss("sigmoid", value=_sigmoid_value, slope=_sigmoid_slope, online=True),
    "ipo": Loss("ipo", value=_ipo_value, slope=_ipo_slope, per_token=True, online=True),
    "hinge": Loss("hinge", value=_hinge_value, slope=_hinge_slope),
    "sigmoid_norm": Loss("sigmoid_norm", value=_sigmoid_value, slope=_sigmoid_slope, per_token=True),
    **{name: Loss(name) for name in ("exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                                     "aot_unpaired", "apo_zero", "apo_down", "discopop")},
    **{name: Loss(name, pairwise=False, policy_gradient=True, weights=_WEIGHTS.get(name))
       for name in ("dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo")},
}
ALIASES = {"dpo": "sigmoid"}  # the name explain took before the registry followed TRL


def names(*, pairwise: bool | None = None, explained: bool | None = None, online: bool | None = None,
          policy_gradient: bool | None = None) -> list[str]:
    """The registry's names with the given properties (None: either), in registry order."""
    return [n for n, loss in LOSSES.items()
            if (pairwise is None or loss.pairwise == pairwise) and (explained is None or loss.explained == explained)
            and (online is None or loss.online == online)
            and (policy_gradient is None or loss.policy_gradient == policy_gradient)]


def get_loss(loss: str | Loss, *, pairwise: bool | None = None, explained: bool = False, online: bool = False,
             policy_gradient: bool | None = None) -> Loss:
    """The Loss for a name (or the Loss itself), checked for what the caller needs; one line otherwise."""
    if isinstance(loss, Loss):
        found = loss
    else:
        key = ALIASES.get(loss, loss)
        valid = names(pairwise=pairwise, explained=explained or None, online=online or None,
                      policy_gradient=policy_gradient)
        if key not in LOSSES or key not in valid:
            what = ("explain" if explained else "on-policy DPO (TRL's OnlineDPOTrainer)" if online
                    else "GRPO" if policy_gradient else "DPO" if pairwise else "learndyn")
            problem = f"{what} does not support loss '{key}'" if key in LOSSES else f"unknown loss '{loss}' for {what}"
            raise LearndynError(f"{problem}; valid: {', '.join(valid)}")
        found = LOSSES[key]
    if explained and not found.explained:
        raise LearndynError(f"explain has no residual for loss '{found.name}'; it explains {', '.join(names(explained=True))}")
    return found
