"""Forecasting likelihood displacement before training: which preference pairs will drag chosen down.

For pair i (prompt x, chosen y⁺, rejected y⁻) let u_i = ∇θ log π(y⁺_i) and v_i = ∇θ log π(y⁻_i) at
the starting model, and L_i = ℓ(h_i) the pair's loss (learndyn.losses; the reference is the
starting model, so h_i = 0, as at the first step of a DPO run). Its gradient is
g_i = a_i u_i + b_i v_i with a_i = ∂L_i/∂log π(y⁺), b_i = ∂L_i/∂log π(y⁻) (for DPO a_i = −β/2 = −b_i).
To first order, an SGD step of size η on pair j changes log π(y⁺_i) by

    c_ij = −η ⟨u_i, g_j⟩                         (the A·K·G term of pair j on response y⁺_i)

    self_predicted_i  = c_ii                     one step on the pair alone: exact, per pair
    cross_predicted_i = Σ_j c_ij = −η ⟨u_i, G⟩   one pass over all pairs, G = Σ_j g_j: exact, from a
                                                 second pass that dots each u_i with G
    top_displacers_i  = the j with the most negative c_ij, from projected gradients
    others_projected_j = Σ_{i≠j} c_ij            what a step on pair j does to the other pairs' chosen
                                                 (a column sum of the map: the question a filter asks,
                                                 where cross_predicted, a row sum, asks what all do to i)

The N×N map c_ij cannot be formed from exact gradients (each has as many entries as the model), so
u_i and g_j are compressed by a CountSketch S (each coordinate of each parameter tensor hashed to
one of `projection_dim` buckets with a random sign; E⟨Su, Sg⟩ = ⟨u, g⟩, seeded, no matrix stored):
c_ij ≈ −η ⟨Su_i, Sg_j⟩. Its row sums (cross_projected) estimate cross_predicted; their rank agreement
with the exact values is reported with every forecast, so a map too noisy to read says so. Its column
sums (others_projected) have no such exact check: it would take each pair's rejected gradient again
in pass 2.

CHES (Razin et al., ICLR 2025) is computed from the same forward: with H the sum of the last-layer
hidden states at the positions that predict the response tokens (the last prompt token through the
second-to-last response token), CHES = ⟨H⁺, H⁻⟩ − ‖H⁺‖², and its length-normalised form
⟨H⁺, H⁻⟩/(|y⁺||y⁻|) − ‖H⁺‖²/|y⁺|². Higher means more displacement; `self_predicted` is the exact
quantity CHES approximates (lower means more displacement).

Pairs are tokenized as TRL tokenizes them for `train dpo` (`sequences.encode_update`), cut at the
run's `max_length` when given. A pair that cannot be scored (an empty response, its prompt fills
max_length, it is longer than the model's context) is kept with NaN scores and a `note`, never dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from learndyn.data import Preference, empty_sides, fit_prompts
from learndyn.dynamics.residuals import margin, sequence_logps
from learndyn.dynamics.sequences import encode_update, full_inputs
from learndyn.atomic import atomic_path
from learndyn.errors import LearndynError, first_line
from learndyn.lm import split_model
from learndyn.losses import Loss, get_loss
from learndyn.models import eval_mode
from learndyn.progress import tracked
from learndyn.scoring import context_length

__all__ = ["CountSketch", "Forecast", "forecast_pairs", "ches_scores", "pair_gradients"]

COLUMNS = ("example_id", "ches", "ches_normalized", "self_predicted", "cross_predicted", "cross_projected",
           "others_projected", "logp_chosen", "logp_rejected", "n_chosen", "n_rejected", "top_displacers", "note")


@dataclass
class Forecast:
    """Per-pair rows (COLUMNS) and, with `cross`, the projected map `kernel` (N, N): kernel[i, j] =
    c_ij, the first-order change of log π(y⁺_i) from one step on pair j (NaN rows for noted pairs)."""

    pairs: Any  # pandas DataFrame
    kernel: np.ndarray | None
    summary: dict[str, Any]


class CountSketch:
    """A seeded CountSketch of a list of parameter tensors into `dim` buckets.

    Coordinate k of tensor t goes to bucket h_t(k) with sign s_t(k), both drawn from a generator
    seeded by (seed, t), so the same coordinates always meet the same buckets without storing a
    projection matrix; the drawn indices are cached while they fit in `cache_bytes` (4 bytes per
    coordinate) and drawn again otherwise."""

    def __init__(self, shapes: Sequence[torch.Size], dim: int, seed: int = 0, cache_bytes: int = 2**30):
        if dim < 1:
            raise LearndynError(f"projection_dim must be at least 1, got {dim}")
        self.shapes, self.dim, self.seed = list(shapes), dim, seed
        self.cache = sum(s.numel() for s in self.shapes) * 4 <= cache_bytes
        self._index: dict[int, Tensor] = {}

    def _signed_bucket(self, t: int) -> Tensor:
        """Per coordinate, an index into 2·dim slots: bucket b with sign + is b, with sign − is dim + b."""
        if t in self._index:
            return self._index[t]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + t)
        index = torch.randint(0, 2 * self.dim, (self.shapes[t].numel(),), generator=generator, dtype=torch.int32)
        if self.cache:
            self._index[t] = index
        return index

    def __call__(self, tensors: Sequence[Tensor]) -> Tensor:
        """S·x for x the concatenation of `tensors`, as float64 (dim,)."""
        dtype = torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32
        slots = torch.zeros(2 * self.dim, dtype=dtype)
        for t, x in enumerate(tensors):  # no float64 copy of a model-sized vector: float32 sums of ~n/dim terms
            slots.index_add_(0, self._signed_bucket(t), x.detach().reshape(-1).to("cpu", dtype))
        return (slots[: self.dim] - slots[self.dim:]).double()


def ches_scores(h_chosen: Tensor, h_rejected: Tensor) -> tuple[float, float]:
    """(CHES, length-normalised CHES) from the hidden states (n⁺, D) and (n⁻, D) at the positions that
    predict each response's tokens."""
    a, b = h_chosen.double().sum(0), h_rejected.double().sum(0)
    n_a, n_b = len(h_chosen), len(h_rejected)
    cross, own = float(a @ b), float(a @ a)
    return cross - own, cross / (n_a * n_b) - own / n_a**2


@dataclass
class _Progress:
    """What a forecast has finished, saved to its checkpoint so that an interrupted forecast resumes:
    pass 1's rows, sketches and summed gradient, and how many pairs pass 2 has crossed."""

    key: dict[str, Any]  # settings and pair ids: a checkpoint of another forecast is refused
    rows: list[dict[str, Any]]
    chosen: list[Any]  # per pair: its sketch (or exact vectors), None when not scored
    steps: list[Any]
    total: list[Tensor] | None  # G = Σ_j g_j (with cross)
    crossed: int = 0

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            torch.save(self.__dict__, tmp)

    @classmethod
    def load(cls, path: Path, key: dict[str, Any]) -> _Progress:
        try:
            saved = cls(**torch.load(path, weights_only=True))
        except Exception as err:  # noqa: BLE001  a damaged or foreign file
            raise LearndynError(f"{path}: not a forecast checkpoint ({first_line(err)}); pass --overwrite to "
                                "start again") from None
        if saved.key != key:
            raise LearndynError(f"{path} holds a forecast with other settings or pairs; pass --overwrite to start "
                                "again") from None
        return saved


def forecast_pairs(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[Preference],
    *,
    loss: str | Loss = "sigmoid",
    beta: float = 0.1,
    lr: float = 1e-6,
    cross: bool = False,
    projection_dim: int | None = 32768,
    top: int = 3,
    max_length: int | None = None,
    seed: int = 0,
    progress: bool = False,
    checkpoint: str | Path | None = None,
    every: int = 16,
) -> Forecast:
    """Forecast every pair (module docstring). `projection_dim=None` keeps exact gradients for the map
    (tiny models only: N·2 vectors of the model's size). With `checkpoint`, what is finished is saved
    there every `every` pairs and on any interruption, and a forecast with the same settings and pairs
    continues from it. The model is never modified."""
    spec = get_loss(loss, explained=True)
    if not spec.pairwise:
        raise LearndynError(f"forecast needs a pairwise loss (sigmoid, ipo, ...), not '{spec.name}'")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise LearndynError("the model has no trainable parameters")
    if max_length is not None:
        pairs, _ = fit_prompts(list(pairs), tokenizer, max_length)
    key = {"loss": spec.name, "beta": beta, "lr": lr, "cross": cross, "projection_dim": projection_dim, "seed": seed,
           "max_length": max_length, "pairs": [p.example_id for p in pairs]}
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    if checkpoint is not None and checkpoint.exists():
        state = _Progress.load(checkpoint, key)
    else:
        state = _Progress(key, [], [], [], [torch.zeros_like(p, dtype=torch.float32) for p in params] if cross else None)
    sketch = (CountSketch([p.shape for p in params], projection_dim, seed)
              if cross and projection_dim is not None else None)
    timings = {"pass_1": 0.0, "pass_2": 0.0, "sketch": 0.0, "kernel": 0.0}
    try:
        with eval_mode(model):
            _first_pass(model, tokenizer, pairs, state, spec, beta, lr, sketch, max_length, timings, progress,
                        checkpoint, every)
            kernel = None
            if cross:
                start = time.perf_counter()
                kernel = _kernel(state.chosen, state.steps, lr, exact=sketch is None)
                timings["kernel"] = time.perf_counter() - start
                _second_pass(model, tokenizer, pairs, state, lr, max_length, timings, progress, checkpoint, every)
    except BaseException:
        if checkpoint is not None:
            state.save(checkpoint)
        raise
    return _result(state, kernel, spec, beta, lr, cross, projection_dim, top, timings)


def _first_pass(model, tokenizer, pairs, state: _Progress, spec: Loss, beta: float, lr: float, sketch, max_length,
                timings: dict, progress: bool, checkpoint: Path | None, every: int) -> None:
    """Per pair: CHES, the log-probs, self_predicted; with cross, the summed gradient and the sketches."""
    context = context_length(model)
    todo = pairs[len(state.rows):]
    label = ("Forecast (pass 1 of 2)" if state.total is not None else "Forecast") if progress else None
    start = time.perf_counter()
    for pref in tracked(todo, label, len(todo)):
        row = {"example_id": pref.example_id, "note": ""}
        try:
            if empty := empty_sides(pref):
                raise LearndynError(f"the {' and the '.join(empty)} response{' is' if len(empty) == 1 else 's are'} "
                                    "empty")
            seqs = encode_update([pref], tokenizer, pairwise=True, max_length=context, truncate=max_length)
        except LearndynError as err:
            u = step = None
            row["note"] = f"not scored: {err}"
        else:
            u, v, a, b, stats = pair_gradients(model, seqs, spec, beta)
            step = [a * x + b * y for x, y in zip(u, v)]  # g = ∇L
            row.update(stats, self_predicted=-lr * _dot(u, step))
            if seqs.ids[0] == seqs.ids[1]:
                row["note"] = "chosen and rejected are the same tokens: the pair has no gradient"
        if state.total is not None:
            sketched = time.perf_counter()
            if step is not None:
                for acc, g in zip(state.total, step):
                    acc += g.float()
            keep = (lambda xs: sketch(xs).float()) if sketch else _copies  # float32 sketches: half the store
            state.chosen.append(None if u is None else keep(u))
            state.steps.append(None if step is None else keep(step))
            timings["sketch"] += time.perf_counter() - sketched
        state.rows.append(row)
        if checkpoint is not None and len(state.rows) % every == 0:
            state.save(checkpoint)
    timings["pass_1"] = time.perf_counter() - start - timings["sketch"]


def _second_pass(model, tokenizer, pairs, state: _Progress, lr: float, max_length, timings: dict, progress: bool,
                 checkpoint: Path | None, every: int) -> None:
    """cross_predicted_i = −lr ⟨u_i, G⟩, exact: each chosen's gradient again, dotted with the summed one."""
    context = context_length(model)
    todo = list(range(state.crossed, len(pairs)))
    start = time.perf_counter()
    for i in tracked(todo, "Forecast (pass 2 of 2)" if progress else None, len(todo)):
        if not state.rows[i]["note"].startswith("not scored"):
            seqs = encode_update([pairs[i]], tokenizer, pairwise=True, max_length=context, truncate=max_length)
            state.rows[i]["cross_predicted"] = -lr * _dot(_chosen_gradient(model, seqs), state.total)
        state.crossed = i + 1
        if checkpoint is not None and state.crossed % every == 0:
            state.save(checkpoint)
    timings["pass_2"] = time.perf_counter() - start


def _result(state: _Progress, kernel, spec: Loss, beta: float, lr: float, cross: bool, projection_dim, top: int,
            timings: dict) -> Forecast:
    import pandas as pd

    frame = pd.DataFrame(state.rows)
    if kernel is not None:
        frame["cross_projected"] = np.nansum(kernel, axis=1)
        frame.loc[np.isnan(kernel).all(axis=1), "cross_projected"] = np.nan
        frame["others_projected"] = _others(kernel)
        ids = list(frame["example_id"])
        frame["top_displacers"] = [_most_negative(row, ids, top) for row in kernel]
    frame = frame.reindex(columns=[c for c in COLUMNS if c in frame.columns])
    summary = _summary(frame, spec, beta, lr, cross, projection_dim)
    summary["timings"] = timings
    if cross:
        summary["projected_store_bytes"] = sum(v.numel() * v.element_size() for v in state.chosen + state.steps
                                               if isinstance(v, Tensor))
    return Forecast(frame, kernel, summary)


def pair_gradients(model: Any, seqs, spec: Loss, beta: float):
    """u = ∇log π(y⁺), v = ∇log π(y⁻), and a, b = ∂L/∂log π(y±) at h = 0, with CHES and the log-probs.
    Each side runs alone (a backward pass through a batch of both would cost both sides twice)."""
    (u, logp_plus, h_plus), (v, logp_minus, h_minus) = (_side(model, seqs, k) for k in (0, 1))
    leaf = torch.tensor([logp_plus, logp_minus], dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([len(h_plus), len(h_minus)]) if spec.per_token else None
    value = spec.value(margin(leaf, leaf.detach(), lengths), beta).sum()  # the pair's own loss, h = 0
    a, b = torch.autograd.grad(value, leaf)[0].tolist()
    ches, ches_normalized = ches_scores(h_plus, h_minus)
    stats = {"ches": ches, "ches_normalized": ches_normalized, "logp_chosen": logp_plus,
             "logp_rejected": logp_minus, "n_chosen": len(h_plus), "n_rejected": len(h_minus)}
    return u, v, a, b, stats


def _side(model: Any, seqs, k: int) -> tuple[tuple[Tensor, ...], float, Tensor]:
    """(∇θ log π(y), log π(y), the hidden states that predict y's tokens) of sequence k."""
    params = [p for p in model.parameters() if p.requires_grad]
    ids, mask, rows, cols, labels, seq = full_inputs(seqs, [k], model.device)
    hidden, logits = _response_states(model, ids, mask, rows, cols)
    logp = sequence_logps(logits, labels, seq, 1)[0]
    grads = torch.autograd.grad(logp, params, allow_unused=True, materialize_grads=True)
    return grads, float(logp.detach()), hidden.detach()


def _chosen_gradient(model: Any, seqs) -> tuple[Tensor, ...]:
    return _side(model, seqs, 0)[0]


def _response_states(model: Any, ids: Tensor, mask: Tensor, rows: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
    """Last-layer hidden states (N, D) and logits (N, V) at the positions that predict response tokens."""
    split = split_model(model)
    if split.fused:
        states, _ = split.body(input_ids=ids, attention_mask=mask, use_cache=False)
        hidden = states[rows, cols]
        return hidden, split.head(hidden)
    out = model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
    return out.hidden_states[-1][rows, cols], out.logits[rows, cols]


def _copies(tensors: Sequence[Tensor]) -> list[Tensor]:
    return [x.detach().clone() for x in tensors]


def _dot(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> float:
    """⟨x, y⟩ over all tensors, summed in float64 (products in the tensors' own precision)."""
    return float(sum(torch.sum(x * y, dtype=torch.float64) for x, y in zip(xs, ys)))


def _kernel(chosen: list, steps: list, lr: float, exact: bool, block: int = 1024) -> np.ndarray:
    """c_ij = −lr ⟨u_i, g_j⟩ from sketches (or exact vectors); NaN where a pair was not scored.

    Sketches are multiplied in float64, `block` × `block` tiles at a time: beside the float32 store
    and the N × N result, a tile pair (2 × 1024 × k doubles, 0.5 GB at k = 32768) is all it holds,
    where stacking the whole store in float64 would take 4× the store."""
    n = len(chosen)
    kernel = np.full((n, n), np.nan)
    live = [i for i in range(n) if chosen[i] is not None]
    if not live:
        return kernel
    if exact:
        for i in live:
            for j in live:
                kernel[i, j] = -lr * _dot(chosen[i], steps[j])
        return kernel
    tiles = [live[start:start + block] for start in range(0, len(live), block)]
    for rows in tiles:
        u = torch.stack([chosen[i] for i in rows]).double()
        for cols in tiles:
            g = torch.stack([steps[j] for j in cols]).double()
            kernel[np.ix_(rows, cols)] = -lr * (u @ g.T).numpy()
    return kernel


def _others(kernel: np.ndarray) -> np.ndarray:
    """Σ_{i≠j} c_ij per column j; NaN for an unscored pair (the map's NaN rows and columns are skipped)."""
    off = np.where(np.eye(len(kernel), dtype=bool), 0.0, kernel)
    sums = np.nansum(off, axis=0)
    sums[np.isnan(np.diag(kernel))] = np.nan
    return sums


def _most_negative(row: np.ndarray, ids: list[str], top: int) -> list[str]:
    order = [j for j in np.argsort(row) if np.isfinite(row[j]) and row[j] < 0]
    return [ids[j] for j in order[:top]]


def _summary(frame: Any, spec: Loss, beta: float, lr: float, cross: bool, projection_dim: int | None) -> dict:
    from learndyn.dynamics.step import rank_correlation

    scored = frame[~frame["note"].str.startswith("not scored")]
    summary = {"loss": spec.name, "beta": beta, "lr": lr, "pairs": len(frame), "scored": len(scored),
               "notes": {row.example_id: row.note for row in frame.itertuples() if row.note},
               "self_predicted_negative": int((scored["self_predicted"] < 0).sum())}
    if cross:
        summary.update(projection_dim=projection_dim,
                       cross_predicted_negative=int((scored["cross_predicted"] < 0).sum()),
                       projection_rank_agreement=rank_correlation(scored["cross_projected"], scored["cross_predicted"]))
    return summary
