"""Explain one LLM update step: predicted vs actual change of every probe response, per position.

For an update batch u with loss L and an optimizer rule giving Δθ, the first-order change of the
log-probability of an observed token y_l (Ren & Sutherland, Eq. 5) is

    Δ log π(y_l) ≈ ⟨∇θ log π(y_l), Δθ⟩ = [A_l · Δz_l]_{y_l},   Δz_l = J_l Δθ,   A_l = I − 1π_lᵀ

Δθ is affine in the update's gradient g = Σ_u J_uᵀ G_u (see `updates.py`), and g splits into the
part from the chosen residual G⁺ and the part from the rejected residual G⁻, so the prediction
splits the same way: columns predicted_from_chosen and predicted_from_rejected (and
predicted_from_state, what the optimizer adds itself). For GRPO's loss types the update is a batch
of `groups.Group`s (completions of a prompt with rewards, advantages A as TRL computes them) and the
parts are the residual on completions with A > 0 (predicted_from_positive: what the step pulls up),
on those with A < 0 (predicted_from_negative: what it pushes down) and, when β ≠ 0, the KL term
(predicted_from_kl); see `residuals.py`. Nothing of size V×V (the eNTK) or (probes × parameters) is ever formed:
    one forward + one backward per residual part on the update batch gives g⁺ and g⁻;
    one forward-mode pass (jvp, vmapped over the parts) over the probes gives Δz = J·Δθ at every position;
    one plain forward at θ + Δθ gives the actual change.
Probes have many responses per prompt, so on the probe side each prompt runs once per batch and its
responses run on its KV cache (which carries the tangents inside the jvp), as in `scoring.py`.
A K summary per token is `kernel` = ⟨∇θ log π(y_l), −g⟩ = [A K G]_{y_l}: how strongly plain
gradient descent on u pulls y_l up per unit learning rate (for SGD, predicted = η · kernel).

Where the probability mass went (squeezing): at each position the predicted first-order change of
the whole distribution, Δπ = π ⊙ (A Δz), and the actual one, summarised by the change of the
argmax token's probability, the entropy change and the tokens that gained most.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call, jvp, vmap

from learndyn.data import Preference, fit_prompts
from learndyn.dynamics.positions import PositionsSink, positions_sink
from learndyn.dynamics.groups import Group, advantages, encode_groups
from learndyn.dynamics.residuals import loss_value, parts, residual_parts, sequence_logps, wide
from learndyn.dynamics.sequences import (
    ProbeBatch,
    ResponseLogits,
    Sequences,
    SharedPromptLogits,
    check_tokenizer,
    encode_update,
    full_inputs,
    probe_batch,
    probe_batches,
    probe_sequences,
)
from learndyn.dynamics.updates import OptimizerRule, plan_step
from learndyn.errors import LearndynError
from learndyn.losses import Loss, get_loss
from learndyn.models import eval_mode
from learndyn.memory import check_fits
from learndyn.probes.files import Probe
from learndyn.progress import tracked
from learndyn.lm import can_pad_prompts, split_model
from learndyn.scoring import context_length

# Positions reduced at once. (128, V) float32 blocks (25 MB at V=49k) stay under glibc's largest mmap
# threshold, so the temporaries are reused instead of faulted in afresh: on CPU 2x faster than 256 rows.
_ROWS = 128
# Columns summed over a response's positions (log π(y) is a sum), around the loss's parts; the ones averaged.
_SUMMED = ["logp", "actual", "predicted", "kernel", "argmax_prob_predicted", "argmax_prob_actual"]
_AVERAGED = ["entropy_predicted", "entropy_actual"]


def part_columns(loss: Loss, beta: float) -> list[str]:
    """The prediction's split by cause, as columns: the residual's parts, then the optimizer state.
    SFT's table keeps an all-zero predicted_from_rejected: every SFT and DPO table has the same columns."""
    names = parts(loss, beta) if loss.policy_gradient else ("chosen", "rejected")
    return [f"predicted_from_{part}" for part in (*names, "state")]


@dataclass
class Explanation:
    """The result: `changes` per (example_id, response_type), `positions` per token, a `summary` dict."""

    changes: Any  # pandas DataFrame
    positions: Any  # what the positions sink returned: a pandas DataFrame (in memory) or the Parquet file's path
    summary: dict
    delta: dict[str, Tensor] | None = None  # Δθ by parameter name, when asked for (keep_delta=True)


def explain_step(
    model: Any,
    tokenizer: Any,
    update: Sequence[Preference] | Sequence[Group],
    probes: Sequence[Probe],
    *,
    loss: str | Loss = "sft",
    rule: OptimizerRule | None = None,
    beta: float | None = None,
    ref_model: Any = None,
    scale_rewards: str = "group",
    max_completion_length: int | None = None,
    state: dict | None = None,
    types: Sequence[str] | None = None,
    chunk_tokens: int = 1024,
    max_length: int | None = None,
    top_k: int = 3,
    progress: bool = False,
    keep_delta: bool = False,
    positions_out: PositionsSink | str | Path | None = None,
) -> Explanation:
    """Explain one optimizer step on `update` against every response of `probes`.

    `rule` defaults to SGD at lr 1e-4 with fresh state; `state` is an optimizer state keyed by
    parameter name (`updates.state_from_optimizer`). The reference model of DPO-style losses
    defaults to the current model (the first step of a DPO run). Probes go through the model about
    `chunk_tokens` tokens at a time (each prompt once, then its responses), so memory stays bounded
    for any probe set: each chunk's per-position rows go to `positions_out` as soon as they exist
    (None: kept in memory and returned as a DataFrame; a path: streamed to that Parquet file, see
    `dynamics.positions`), and the per-response and summary totals accumulate chunk by chunk.
    `max_length` is a training run's: the update is cut as `train` cuts it (a long prompt keeps its
    last tokens, then each sequence its first `max_length` tokens, as TRL does) and the probes are
    scored within it, as the run's callback scores them. The model is never modified.

    For GRPO's loss types (grpo, dr_grpo, dapo, bnpo) `update` holds `Group`s; their advantages
    follow TRL's `scale_rewards` and dr_grpo divides by `max_completion_length`. `beta` defaults to
    TRL's (0.1 for the preference losses, 0 for GRPO); the reference model of the KL term (β > 0)
    defaults to the model itself, as at a run's first step, where the term has no gradient.
    """
    rule = rule or OptimizerRule()
    spec = get_loss(loss, explained=True)  # resolved here once; the object goes down
    beta = spec.default_beta if beta is None else beta
    limit = context_length(model)
    check_tokenizer(model, tokenizer)
    if not split_model(model).shares_cache():
        raise LearndynError(f"explain runs each probe's responses on its prompt's KV cache, and a "
                            f"{model.config.model_type} model keeps a recurrent state that cannot be shared that way "
                            "(score and train work on it; explain does not yet)")
    _check_unique_ids(probes)
    upd, terms, group_info = _encode(update, tokenizer, spec, limit, max_length, scale_rewards, max_completion_length)
    obs = probe_sequences(probes, tokenizer, types, min((n for n in (limit, max_length) if n), default=None))
    timings: dict[str, float] = {}
    params = {f"lm.{n}": p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise LearndynError("the model has no trainable parameters")
    check_fits(model, "explain", tokens=chunk_tokens, causes=_n_causes(len(parts(spec, beta)), rule, state))
    sink = positions_sink(positions_out)

    with explain_mode(model), explain_mode(ref_model):
        t0 = time.perf_counter()
        grads, update_info = _update_gradients(ResponseLogits(model), params, upd, spec, beta, ref_model, terms)
        update_info.update(group_info)
        full = {n: sum(part[n] for part in grads.values()) for n in params}
        step = plan_step(rule, {n: p.detach() for n, p in params.items()}, full,
                         {f"lm.{n}": s for n, s in (state or {}).items()})
        update_info["clip_coefficient"] = step.clip  # 1: the clip did not bite
        tangents = {f"from_{side}": step.apply(g) for side, g in grads.items()}  # Δθ by cause
        del grads
        if step.offset is not None:
            tangents["from_state"] = step.offset
        if rule.name != "sgd" or step.offset is not None:  # else kernel = predicted / η, no extra pass
            tangents["kernel"] = {n: g.neg_() for n, g in full.items()}
        del full
        after, kept, step_sq = {}, {}, 0.0  # θ + Δθ; Δθ summed over causes in at least float32 (bf16 models)
        for n, p in params.items():
            d = sum(wide(t[n]) for k, t in tangents.items() if k != "kernel")
            step_sq += float((d**2).sum())
            after[n] = (wide(p.detach()) + d).to(p.dtype)
            if keep_delta:
                kept[n.removeprefix("lm.")] = d
            del d
        step_norm = step_sq**0.5
        causes = list(tangents)
        stacked = {n: torch.stack([tangents[k].pop(n) for k in causes]) for n in params}  # (causes, *shape)
        del tangents
        timings["update_gradient_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        columns = part_columns(spec, beta)
        head, totals = SharedPromptLogits(model), _Totals(columns)
        order = {key: i for i, key in enumerate(obs.keys)}
        by_order = lambda r: (order[r["example_id"], r["response_type"]], r["position"])  # noqa: E731
        token_text = functools.cache(lambda t: tokenizer.decode([t]))
        try:
            batches = list(probe_batches(obs, chunk_tokens, pad=can_pad_prompts(model)))
            for groups in tracked(batches, "Explaining" if progress else None, len(batches)):
                batch = probe_batch(obs, groups, chunk_tokens, model.device)
                rows = sorted(_explain_batch(head, params, after, causes, stacked, obs, batch, rule, top_k, token_text,
                                             columns), key=by_order)  # each response whole and in position order
                totals.add(rows)
                sink.add(rows)
                del rows
            positions = sink.finish(order)
        except BaseException:
            sink.abort()
            raise
        timings["probes_s"] = time.perf_counter() - t0

    changes = totals.changes(order)
    summary = _summary(changes, totals, update_info, rule, spec.name, beta, timings, step_norm, columns)
    return Explanation(changes, positions, summary, kept if keep_delta else None)


def predict_naive(model: Any, tokenizer: Any, probes: Sequence[Probe], delta: dict[str, Tensor], *,
                  types: Sequence[str] | None = None) -> Any:
    """The obvious route, for checking and benchmarking: per probe response, one backward pass for
    ∇θ log π(y), then its dot product with Δθ. Costs a forward and a backward per response."""
    import pandas as pd

    obs = probe_sequences(probes, tokenizer, types, context_length(model))
    head = ResponseLogits(model)
    params = {n: p for n, p in model.named_parameters() if n in delta}
    rows = []
    with explain_mode(model), torch.enable_grad():
        for i, key in enumerate(obs.keys):
            ids, mask, r, c, labels, seq = full_inputs(obs, [i], model.device)
            logp = sequence_logps(head(ids, mask, r, c), labels, seq, 1)[0]
            grads = torch.autograd.grad(logp, list(params.values()), allow_unused=True)
            dot = sum(float((g.double() * delta[n].double()).sum()) for n, g in zip(params, grads) if g is not None)
            rows.append({"example_id": key[0], "response_type": key[1], "predicted": dot})
    return pd.DataFrame(rows)


def _encode(update: Sequence[Preference] | Sequence[Group], tokenizer: Any, spec: Loss, limit: int | None,
            max_length: int | None, scale_rewards: str, max_completion_length: int | None
            ) -> tuple[Sequences, dict, dict]:
    """The update's sequences, the loss's further terms (advantages) and what to report about groups."""
    if not spec.policy_gradient:
        if max_length is not None:
            update, _ = fit_prompts(list(update), tokenizer, max_length)
        return encode_update(update, tokenizer, pairwise=spec.pairwise, max_length=limit, truncate=max_length), {}, {}
    if not all(isinstance(g, Group) for g in update):
        raise LearndynError(f"loss {spec.name} explains a GRPO step: the update is groups of completions with "
                            "rewards (learndyn.dynamics.groups.Group), not preference pairs")
    if max_length is not None:
        raise LearndynError(f"loss {spec.name}: GRPO cuts completions at max_completion_length (--max-new-tokens), "
                            "not at --max-length")
    upd = encode_groups(update, tokenizer, max_length=limit, max_completion_length=max_completion_length)
    adv, info = advantages(update, scale_rewards)
    info["max_completion_length"] = max_completion_length
    return upd, {"advantages": adv, "max_completion_length": max_completion_length}, info


def _update_gradients(head: ResponseLogits, params: dict[str, Tensor], upd: Sequences, loss: Loss, beta: float,
                      ref_model: Any, terms: dict) -> tuple[dict[str, dict[str, Tensor]], dict]:
    """g⁺ (and g⁻, ...) = Jᵀ G⁺ (G⁻, ...): one forward, then one backward per residual part."""
    ids, mask, rows, cols, labels, seq = full_inputs(upd, range(len(upd.ids)), head.lm.device)
    n_seq = len(upd.ids)
    with torch.enable_grad():
        logits = head(ids, mask, rows, cols)  # (N, V)
        ref = _reference_logps(ref_model, ids, mask, rows, cols, labels, seq, n_seq, logits, loss, beta)
        g_parts = residual_parts(loss, logits.detach(), labels, seq, n_seq, beta=beta, ref_logps=ref, **terms)
        grads = {}
        for i, (side, part) in enumerate(g_parts.items()):  # each (N, V)
            got = torch.autograd.grad(logits, list(params.values()), part.to(logits.dtype),
                                      retain_graph=i + 1 < len(g_parts), allow_unused=True)
            grads[side] = {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), got)}
        del g_parts
    with torch.no_grad():
        value = float(loss_value(loss, logits.detach(), labels, seq, n_seq, beta=beta, ref_logps=ref, **terms))
        logps = sequence_logps(logits.detach(), labels, seq, n_seq)
    info = {"loss": value, "sequences": [{"example_id": k[0], "side": k[1], "logp_sum": float(v)}
                                         for k, v in zip(upd.keys, logps)]}
    if "advantages" in terms:  # GRPO: each completion's advantage and length beside its log-prob
        lengths = torch.bincount(seq, minlength=n_seq).tolist()
        for row, a, n in zip(info["sequences"], terms["advantages"].tolist(), lengths):
            row.update(advantage=a, n_tokens=n)
    return grads, info


def _reference_logps(ref_model, ids, mask, rows, cols, labels, seq, n_seq, logits, loss: Loss,
                     beta: float) -> Tensor | None:
    """log π_ref of the update, where the loss uses it: per sequence for the pairwise losses, per token
    for a KL term (β ≠ 0) of the policy-gradient ones; without a reference model, the current model's
    (h = 0, no KL pull)."""
    if not (loss.pairwise or (loss.policy_gradient and beta)):
        return None
    with torch.no_grad():
        ref_logits = logits.detach() if ref_model is None else ResponseLogits(ref_model)(ids, mask, rows, cols)
        if loss.pairwise:
            return sequence_logps(ref_logits, labels, seq, n_seq)
        return wide(ref_logits).log_softmax(-1).gather(-1, labels[:, None])[:, 0]  # (N,)


def _explain_batch(head, params, after, causes, stacked, obs: Sequences, batch: ProbeBatch, rule, top_k,
                   token_text, columns: list[str]) -> list[dict]:
    """Per position: Δz of every cause by jvp at θ, and the distribution at θ + Δθ.

    The jvp is vmapped over the causes (`stacked` holds their tangents on a leading axis), so the
    logits at θ are computed once rather than once per cause: a jvp costs about three forwards, one
    for the primal and two for the tangent, and the primal is shared.
    """
    primal = {n: p.detach() for n, p in params.items()}
    f = lambda p: functional_call(head, p, (batch,))  # noqa: E731
    with torch.no_grad():
        z, dz = vmap(lambda t: jvp(f, (primal,), (t,)), out_dims=(None, 0))(stacked)  # (N, V), (causes, N, V)
        z_after = f(after)  # (N, V)
    dz = dict(zip(causes, dz))
    where = [(*obs.keys[batch.index[s]], j) for s, j in zip(batch.seq.tolist(), batch.position.tolist())]
    out = []
    for lo in range(0, len(batch.labels), _ROWS):
        sl = slice(lo, lo + _ROWS)
        out.extend(_position_stats(z[sl], {k: v[sl] for k, v in dz.items()}, z_after[sl], batch.labels[sl],
                                   where[sl], rule, top_k, token_text, columns))
    return out


def _position_stats(z, dz, z_after, labels, where, rule, top_k, token_text, columns: list[str]) -> list[dict]:
    """Statistics of n positions from their logits (n, V); `where` is (example_id, response_type, position);
    `columns` the parts of the prediction (a cause with no tangent, such as sft's rejected, is zero)."""
    logp = wide(z).log_softmax(-1)  # (n, V)
    p = logp.exp()
    at = lambda t: t.gather(-1, labels[:, None])[:, 0]  # noqa: E731  value at the observed token
    a_at = lambda v: at(v) - (p * v).sum(-1)  # noqa: E731  [A·Δz]_y = Δ log π(y), A linear in Δz
    cols_pred = {k: a_at(wide(v)) for k, v in dz.items()}
    moved = sum(wide(v) for k, v in dz.items() if k != "kernel")  # Δz of the whole step, summed in >= float32
    total = moved - (p * moved).sum(-1, keepdim=True)  # predicted Δ log π_l(v), (n, V)
    dp_pred = p * total  # first-order Δπ
    logp_after = wide(z_after).log_softmax(-1)
    p_after = logp_after.exp()
    dp_act = p_after - p
    top = p.argmax(-1)
    ent = -(p * logp).sum(-1)
    kernel = cols_pred["kernel"] if "kernel" in cols_pred else at(total) / rule.lr  # SGD: Δθ = −η g
    gain_pred = dp_pred.topk(top_k, -1).indices.tolist()
    gain_act = dp_act.topk(top_k, -1).indices.tolist()
    at_top = lambda t: t.gather(-1, top[:, None])[:, 0]  # noqa: E731
    stats = {
        "logp": at(logp), "actual": at(logp_after) - at(logp), "predicted": at(total), "kernel": kernel,
        **{c: cols_pred.get(c.removeprefix("predicted_"), torch.zeros_like(ent)) for c in columns},
        "argmax_prob": at_top(p), "argmax_prob_predicted": at_top(dp_pred), "argmax_prob_actual": at_top(dp_act),
        "entropy": ent, "entropy_predicted": -(dp_pred * logp).sum(-1),
        "entropy_actual": -(p_after * logp_after).sum(-1) - ent,
    }
    stats = {k: v.tolist() for k, v in stats.items()}
    labels, top = labels.tolist(), top.tolist()
    rows = []
    for i, (example_id, response_type, position) in enumerate(where):
        row = {"example_id": example_id, "response_type": response_type, "position": position,
               "token": token_text(labels[i]), "argmax_token": token_text(top[i])}
        row.update((k, v[i]) for k, v in stats.items())
        row["top_gain_predicted"] = [token_text(t) for t in gain_pred[i]]
        row["top_gain_actual"] = [token_text(t) for t in gain_act[i]]
        rows.append(row)
    return rows


class _Totals:
    """What the per-response table and the summary need, accumulated chunk by chunk so that no step
    holds all positions. Every response lies whole in one chunk (batches split between responses,
    never inside one), so its sums equal those of the full table, rounding included; the
    per-position sums of the summary are exactly rounded (`_ExactSum`), hence chunking-invariant."""

    def __init__(self, columns: list[str]) -> None:
        self.columns = columns  # the prediction's parts (predicted_from_*)
        self.parts: list[Any] = []  # per-response frames, one per chunk
        self.positions = 0
        self.argmax = {"argmax_prob_predicted": _ExactSum(), "argmax_prob_actual": _ExactSum()}

    def add(self, rows: list[dict]) -> None:
        import pandas as pd

        frame = pd.DataFrame(rows)
        self.parts.append(_per_response(frame, self.columns))
        self.positions += len(frame)
        for column, total in self.argmax.items():
            total.add(frame[column].tolist())

    def changes(self, order: dict[tuple[str, str], int]) -> Any:
        """All responses, in probe-file order (not the length order they were processed in)."""
        import pandas as pd

        keys = ["example_id", "response_type"]
        changes = pd.concat(self.parts, ignore_index=True)
        return changes.iloc[sorted(range(len(changes)), key=lambda i: order[tuple(changes.iloc[i][keys])])].reset_index(drop=True)


class _ExactSum:
    """A float sum with one rounding at the end (Shewchuk's partials, as in `math.fsum`), fed in pieces."""

    def __init__(self) -> None:
        self.partials: list[float] = []

    def add(self, values: list[float]) -> None:
        for x in values:
            kept = []
            for y in self.partials:
                if abs(x) < abs(y):
                    x, y = y, x
                high = x + y
                low = y - (high - x)
                if low:
                    kept.append(low)
                x = high
            kept.append(x)
            self.partials = kept

    def value(self) -> float:
        import math

        return math.fsum(self.partials)


def _per_response(positions: Any, columns: list[str]) -> Any:
    """Sequence-level changes: sums over positions (log π(y) is a sum), entropy change averaged."""
    grouped = positions.groupby(["example_id", "response_type"], sort=False)
    summed = [*_SUMMED[:3], *columns, *_SUMMED[3:]]  # logp, actual, predicted, the parts, kernel, argmax
    changes = grouped[summed].sum().rename(columns={
        "logp": "logp_sum", "argmax_prob_predicted": "argmax_mass_predicted", "argmax_prob_actual": "argmax_mass_actual"})
    changes = changes.join(grouped[_AVERAGED].mean())
    changes["n_tokens"] = grouped.size()
    return changes.reset_index()


def _check_unique_ids(probes: Sequence[Probe]) -> None:
    """Two probes with one id would merge their responses into one row of `changes`."""
    seen: set[str] = set()
    for probe in probes:
        if probe.example_id in seen:
            raise LearndynError(f"probe id '{probe.example_id}' appears more than once in the probe set; "
                                "give each probe its own id")
        seen.add(probe.example_id)


def _n_causes(n_parts: int, rule: OptimizerRule, state: dict | None) -> int:
    """How many tangents the jvp carries at most (the residual's parts, from_state, kernel), for the
    memory estimate; from_state and kernel are counted whenever the rule may need them."""
    return n_parts + 2 * (rule.name != "sgd" or bool(state))


def _summary(changes, totals: _Totals, update_info, rule, loss, beta, timings, step_norm: float,
             columns: list[str]) -> dict:
    """Headline numbers: agreement of predicted and actual, the split by cause, the mass on argmax tokens."""
    pred, act = changes["predicted"], changes["actual"]
    predicted, actual = (totals.argmax[k].value() for k in ("argmax_prob_predicted", "argmax_prob_actual"))
    by_type = changes.groupby("response_type", sort=False)[
        ["predicted", "actual", *columns, "argmax_mass_predicted", "argmax_mass_actual"]].mean()
    return {
        "loss": loss, "beta": beta, "parts": columns, "optimizer": rule.name, "lr": rule.lr, "weight_decay": rule.weight_decay,
        "max_grad_norm": rule.max_grad_norm,
        "update": update_info,
        "step_norm": step_norm,
        "responses": len(changes), "positions": totals.positions,
        "relative_error": float(((pred - act) ** 2).sum() ** 0.5 / max(float((act**2).sum() ** 0.5), 1e-30)),
        "rank_correlation": rank_correlation(pred, act),
        "argmax_mass": {
            "predicted_sum": predicted,
            "actual_sum": actual,
            "predicted_per_token": predicted / max(totals.positions, 1),
            "actual_per_token": actual / max(totals.positions, 1),
        },
        "by_type": {t: {k: float(v) for k, v in row.items()} for t, row in by_type.iterrows()},
        "timings": timings,
    }


def rank_correlation(a: Any, b: Any) -> float | None:
    """Spearman's rank correlation (None when either side is constant or there are < 3 values)."""
    if len(a) < 3 or a.nunique() < 2 or b.nunique() < 2:
        return None
    return float(a.rank().corr(b.rank()))


@contextmanager
def explain_mode(model: Any) -> Iterator[None]:
    """Dropout off, eager attention (sdpa has no forward-mode AD rule) and eager mixture-of-experts
    layers (nor has grouped_mm: Mixtral, GPT-OSS); all restored after."""
    if model is None:
        yield
        return
    attn = getattr(model.config, "_attn_implementation", None)
    experts = getattr(model.config, "_experts_implementation", None)
    if attn not in (None, "eager"):
        model.set_attn_implementation("eager")
    if experts not in (None, "eager"):
        model.set_experts_implementation("eager")
    try:
        with eval_mode(model):
            yield
    finally:
        if attn not in (None, "eager"):
            model.set_attn_implementation(attn)
        if experts not in (None, "eager"):
            model.set_experts_implementation(experts)
