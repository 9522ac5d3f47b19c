"""`learndyn digits`: the paper's Figure 1 story, exactly, on sklearn's bundled 8×8 digits (offline).

A small tanh MLP (64→64→10) learns the digits with plain SGD, one example per step, in float64.
(a) At `probe_step` one update example of `update_digit` (the training one the model is least sure
    about, π(y_u) closest to ½, so that G has mass to spend) is checked against Eq. 5: the predicted
    −η·A·K·G against the real change of log π over all 10 classes, for one held-out observation of
    every digit, with K's similarity per observed digit ("which term causes it").
(b) Every step, the real change of log π(y_o | x_o) of a fixed held-out observation set (`per_class`
    per digit) is averaged by (update digit, observed digit) into M.
Writes OUT/summary.json and OUT/digits_one_step.png, OUT/digits_influence.png, each atomically.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from learndyn.atomic import write_json
from learndyn.dynamics.classify import entk_cosine, one_step_many
from learndyn.errors import LearndynError
from learndyn.progress import progress as progress_bar
from learndyn.report.digits_figures import write_digits_figures

CLASSES = 10


def _load(seed: int, test_fraction: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(X (1797, 64) in [0, 1], y, train indices, test indices): a seeded random split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise LearndynError("`learndyn digits` needs scikit-learn: pip install scikit-learn") from err
    data = load_digits()
    X = torch.tensor(data.data / 16.0, dtype=torch.float64)  # (1797, 64)
    y = torch.tensor(data.target)  # (1797,)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    return X, y, perm[n_test:], perm[:n_test]


def _accuracy(model: nn.Module, X: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return (model(X).argmax(-1) == y).double().mean().item()


def _one_step(model: nn.Module, X: Tensor, y: Tensor, train: Tensor, observed: Tensor, update_digit: int,
              lr: float) -> dict[str, Any]:
    """Part (a): Eq. 5 for one update example of `update_digit` and one observation per digit."""
    candidates = train[y[train] == update_digit]
    with torch.no_grad():
        p = model(X[candidates]).softmax(-1)[:, update_digit]  # (n,)
    pick = int((p - 0.5).abs().argmin())
    u = int(candidates[pick])
    step = one_step_many(model, X[u], update_digit, X[observed], lr)
    cosine = entk_cosine(model, X[observed], X[u])  # (10,)
    rows = []
    for digit in range(CLASSES):
        top = step.actual[digit].abs().argsort(descending=True)[:3].tolist()
        rows.append({"digit": digit, "k_cosine": cosine[digit].item(), "k_norm": step.K[digit].norm().item(),
                     "own_class_change": step.actual[digit, digit].item(),
                     "moved_most": [{"class": c, "actual": step.actual[digit, c].item(),
                                     "predicted": step.predicted[digit, c].item()} for c in top]})
    return {"update_index": u, "update_digit": update_digit, "update_prob": p[pick].item(), "lr": lr,
            "relative_error": step.relative_error, "G": step.G.tolist(), "observed_indices": observed.tolist(),
            "logit_change": step.logit_change.tolist(), "predicted": step.predicted.tolist(),
            "actual": step.actual.tolist(), "observations": rows}


def _influence(total: Tensor, counts: Tensor) -> dict[str, Any]:
    """Part (b): the per-step means and the digit pairs that move each other most."""
    M = total / counts.clamp(min=1)[:, None]  # (10, 10) [update digit, observed digit]
    off = ~torch.eye(CLASSES, dtype=torch.bool)
    pairs = sorted(((a, b) for a in range(CLASSES) for b in range(a + 1, CLASSES)),
                   key=lambda ab: -(M[ab].abs() + M[ab[::-1]].abs()).item())
    return {"M": M.tolist(), "counts": counts.tolist(),
            "mean_diagonal": M.diag().mean().item(), "mean_off_diagonal": M[off].mean().item(),
            "strongest_pairs": [{"digits": [a, b], "a_on_b": M[a, b].item(), "b_on_a": M[b, a].item()}
                                for a, b in pairs[:5]]}


@contextmanager
def _one_thread() -> Iterator[None]:
    """64-wide layers only lose time to thread hand-offs (several times slower on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _train(model: nn.Module, X: Tensor, y: Tensor, order: Tensor, tracked: Tensor, lr: float,
           probe_step: int, probe: Callable[[], dict[str, Any]], progress: bool
           ) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Plain SGD, one example per step, in `order`; calls `probe` before step `probe_step`.
    Returns the sum of the tracked observations' change of log π(y_o | x_o) by (update digit,
    observed digit), the steps per update digit, and probe's result."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    total = torch.zeros(CLASSES, CLASSES, dtype=torch.float64)  # Σ Δ log π(y_o | x_o) by (c_u, c_o)
    counts = torch.zeros(CLASSES, dtype=torch.float64)
    y_o = y[tracked][:, None]  # (N, 1), sorted by digit, N/10 per digit
    with torch.no_grad():
        before = model(X[tracked]).log_softmax(-1)  # (N, 10)
    with progress_bar("Training on digits", len(order), enabled=progress) as advance, _one_thread():
        for step, i in enumerate(order.tolist()):
            if step == probe_step:
                probed = probe()
            loss = nn.functional.cross_entropy(model(X[i:i + 1]), y[i:i + 1])
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                after = model(X[tracked]).log_softmax(-1)  # (N, 10)
            change = after - before  # (N, 10)
            c_u = int(y[i])
            total[c_u] += change.gather(1, y_o)[:, 0].view(CLASSES, -1).mean(1)  # (10,)
            counts[c_u] += 1
            before = after
            advance(1)
    return total, counts, probed


def run_digits(out: Path, seed: int = 0, steps: int = 4000, lr: float = 0.03, progress: bool = True, *,
               update_digit: int = 4, probe_step: int | None = None, per_class: int = 10,
               hidden: int = 64) -> dict[str, Any]:
    """Train, measure (a) one step's exact influence and (b) the influence accumulated over training,
    write the figures and summary.json into `out`; return the summary. `probe_step` defaults to
    steps // 8, early enough that the model is decent but not saturated."""
    probe_step = steps // 8 if probe_step is None else probe_step
    if steps < 1 or not 0 <= probe_step < steps or not lr > 0 or not 0 <= update_digit < CLASSES:
        raise LearndynError(f"need steps ≥ 1, 0 ≤ probe_step < steps, lr > 0 and a digit 0-9; got steps={steps}, "
                            f"probe_step={probe_step}, lr={lr}, update_digit={update_digit}")
    settings = {"seed": seed, "steps": steps, "lr": lr, "update_digit": update_digit, "probe_step": probe_step,
                "per_class": per_class, "hidden": hidden, "batch_size": 1, "test_fraction": 0.3}
    X, y, train, test = _load(seed, settings["test_fraction"])
    if not 1 <= per_class <= min(int((y[test] == c).sum()) for c in range(CLASSES)):
        raise LearndynError(f"per_class must be between 1 and the held-out count of the rarest digit, got {per_class}")
    tracked = torch.cat([test[y[test] == c][:per_class] for c in range(CLASSES)])  # (10·per_class,) by digit
    observed = tracked[::per_class]  # (10,) one held-out observation per digit, for (a)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, CLASSES)).double()
    gen = torch.Generator().manual_seed(seed + 1)
    order = torch.cat([train[torch.randperm(len(train), generator=gen)] for _ in range(steps // len(train) + 1)])

    def probe() -> dict[str, Any]:
        return {"step": probe_step, "test_accuracy": _accuracy(model, X[test], y[test]),
                **_one_step(model, X, y, train, observed, update_digit, lr)}

    total, counts, one = _train(model, X, y, order[:steps], tracked, lr, probe_step, probe, progress)
    summary = {"settings": settings, "test_accuracy": _accuracy(model, X[test], y[test]),
               "train_accuracy": _accuracy(model, X[train], y[train]), "relative_error": one["relative_error"],
               "one_step": one, "influence": _influence(total, counts)}
    out = Path(out)
    summary["figures"] = [p.name for p in write_digits_figures(summary, out)]
    write_json(out / "summary.json", summary, indent=1)
    return summary
