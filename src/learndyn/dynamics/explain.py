"""Explain one LLM update step: predicted vs actual change of every probe response, per position.

For an update batch u with loss L and an optimizer rule giving Δθ, the first-order change of the
log-probability of an observed token y_l (Ren & Sutherland, Eq. 5) is

    Δ log π(y_l) ≈ ⟨∇θ log π(y_l), Δθ⟩ = [A_l · Δz_l]_{y_l},   Δz_l = J_l Δθ,   A_l = I − 1π_lᵀ

Δθ is affine in the update's gradient g = Σ_u J_uᵀ G_u (see `updates.py`), and g splits into the
part from the chosen residual G⁺ and the part from the rejected residual G⁻, so the prediction
splits the same way. Nothing of size V×V (the eNTK) or (probes × parameters) is ever formed:
    one forward + one backward per residual part on the update batch gives g⁺ and g⁻;
    one forward-mode pass (jvp) per part over the probes gives Δz = J·Δθ at every position;
    one plain forward at θ + Δθ gives the actual change.
A K summary per token is `kernel` = ⟨∇θ log π(y_l), −g⟩ = [A K G]_{y_l}: how strongly plain
gradient descent on u pulls y_l up per unit learning rate (for SGD, predicted = η · kernel).

Where the probability mass went (squeezing): at each position the predicted first-order change of
the whole distribution, Δπ = π ⊙ (A Δz), and the actual one, summarised by the change of the
argmax token's probability, the entropy change and the tokens that gained most.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call, jvp

from learndyn.data import Preference, render_prompt
from learndyn.dynamics.residuals import get_loss, loss_value, residual, sequence_logps, wide
from learndyn.dynamics.updates import OptimizerRule, plan_step
from learndyn.errors import LearndynError
from learndyn.probes.files import Probe
from learndyn.scoring import context_length, encode_probes, pack_runs, split_model

_ROWS = 256  # positions whose (V,) distributions are reduced at once


@dataclass
class Sequences:
    """Token sequences (prompt + response) with what each response position predicts."""

    ids: list[list[int]]  # prompt + response ids
    starts: list[int]  # index of the first response token in each sequence
    keys: list[tuple[str, str]] = field(default_factory=list)  # (example_id, response_type)


@dataclass
class Explanation:
    """The result: `changes` per (example_id, response_type), `positions` per token, a `summary` dict."""

    changes: Any  # pandas DataFrame
    positions: Any  # pandas DataFrame
    summary: dict
    delta: dict[str, Tensor] | None = None  # Δθ by parameter name, when asked for (keep_delta=True)


def explain_step(
    model: Any,
    tokenizer: Any,
    update: Sequence[Preference],
    probes: Sequence[Probe],
    *,
    loss: str = "sft",
    rule: OptimizerRule | None = None,
    beta: float = 0.1,
    ref_model: Any = None,
    state: dict | None = None,
    types: Sequence[str] | None = None,
    chunk_tokens: int = 1024,
    top_k: int = 3,
    progress: bool = False,
    keep_delta: bool = False,
) -> Explanation:
    """Explain one optimizer step on `update` against every response of `probes`.

    `rule` defaults to SGD at lr 1e-4 with fresh state; `state` is an optimizer state keyed by
    parameter name (`updates.state_from_optimizer`). The reference model of DPO-style losses
    defaults to the current model (the first step of a DPO run). Probe sequences go through the
    model `chunk_tokens` tokens at a time, so memory stays bounded for any probe set. The model
    is never modified.
    """
    import pandas as pd

    rule = rule or OptimizerRule()
    spec = get_loss(loss)
    limit = context_length(model)
    _check_tokenizer(model, tokenizer)
    upd = encode_update(update, tokenizer, pairwise=spec.pairwise, max_length=limit)
    obs = _probe_sequences(probes, tokenizer, types, limit)
    timings: dict[str, float] = {}
    head = _ResponseLogits(model)
    params = {f"lm.{n}": p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise LearndynError("the model has no trainable parameters")

    with _explain_mode(model), _explain_mode(ref_model):
        t0 = time.perf_counter()
        grads, update_info = _update_gradients(head, params, upd, spec.name, beta, ref_model)
        full = {n: sum(part[n] for part in grads.values()) for n in params}
        step = plan_step(rule, {n: p.detach() for n, p in params.items()}, full,
                         {f"lm.{n}": s for n, s in (state or {}).items()})
        tangents = {f"from_{side}": step.apply(g) for side, g in grads.items()}  # Δθ by cause
        del grads
        if step.offset is not None:
            tangents["from_state"] = step.offset
        if rule.name != "sgd" or step.offset is not None:  # else kernel = predicted / η, no extra pass
            tangents["kernel"] = {n: g.neg_() for n, g in full.items()}
        del full
        delta = {n: sum(t[n] for k, t in tangents.items() if k != "kernel") for n in params}
        after = {n: p.detach() + delta[n] for n, p in params.items()}
        step_norm = sum(float((wide(d) ** 2).sum()) for d in delta.values()) ** 0.5
        if not keep_delta:
            del delta
        timings["update_gradient_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        rows = []
        for batch in _progress(list(_batches(obs, chunk_tokens)), progress, "Explaining"):
            rows.extend(_explain_batch(head, params, after, tangents, obs, batch, rule, top_k, tokenizer))
        timings["probes_s"] = time.perf_counter() - t0

    positions = pd.DataFrame(rows)
    changes = _per_response(positions, obs)
    summary = _summary(changes, positions, update_info, rule, spec.name, beta, timings, step_norm)
    kept = {n.removeprefix("lm."): d for n, d in delta.items()} if keep_delta else None
    return Explanation(changes, positions, summary, kept)


def predict_naive(model: Any, tokenizer: Any, probes: Sequence[Probe], delta: dict[str, Tensor], *,
                  types: Sequence[str] | None = None) -> Any:
    """The obvious route, for checking and benchmarking: per probe response, one backward pass for
    ∇θ log π(y), then its dot product with Δθ. Costs a forward and a backward per response."""
    import pandas as pd

    obs = _probe_sequences(probes, tokenizer, types, context_length(model))
    head = _ResponseLogits(model)
    params = {n: p for n, p in model.named_parameters() if n in delta}
    rows = []
    with _explain_mode(model), torch.enable_grad():
        for i, key in enumerate(obs.keys):
            ids, mask, r, c, labels, seq = _inputs(obs, [i], model.device)
            logp = sequence_logps(head(ids, mask, r, c), labels, seq, 1)[0]
            grads = torch.autograd.grad(logp, list(params.values()), allow_unused=True)
            dot = sum(float((g.double() * delta[n].double()).sum()) for n, g in zip(params, grads) if g is not None)
            rows.append({"example_id": key[0], "response_type": key[1], "predicted": dot})
    return pd.DataFrame(rows)


def encode_update(update: Sequence[Preference], tokenizer: Any, *, pairwise: bool, max_length: int | None) -> Sequences:
    """Chosen responses (then, for pairwise losses, the rejected ones in the same order)."""
    if not update:
        raise LearndynError("the update batch is empty")
    seqs = Sequences([], [], [])
    sides = ("chosen", "rejected") if pairwise else ("chosen",)
    for side in sides:
        for pref in update:
            text = pref.chosen if side == "chosen" else pref.rejected
            if text is None:
                raise LearndynError(f"update example '{pref.example_id}' has no rejected response; "
                                    "the loss needs one (use --loss sft, or data with rejected)")
            prompt = tokenizer(render_prompt(pref.prompt, tokenizer), add_special_tokens=isinstance(pref.prompt, str))["input_ids"]
            response = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            if max_length is not None and len(prompt) + len(response) > max_length:
                raise LearndynError(f"update example '{pref.example_id}' ({side}) is {len(prompt) + len(response)} "
                                    f"tokens, longer than the model's context of {max_length}")
            seqs.ids.append(prompt + response)
            seqs.starts.append(len(prompt))
            seqs.keys.append((pref.example_id, side))
    return seqs


def _probe_sequences(probes: Sequence[Probe], tokenizer: Any, types: Sequence[str] | None, limit: int | None) -> Sequences:
    seqs = Sequences([], [], [])
    for enc in encode_probes(probes, tokenizer, types=types, max_length=limit):
        for name, ids, _ in enc.responses:
            seqs.ids.append(enc.prompt_ids + ids)
            seqs.starts.append(len(enc.prompt_ids))
            seqs.keys.append((enc.example_id, name))
    if not seqs.ids:
        raise LearndynError("no probe responses to explain (check --types)")
    return seqs


def _check_tokenizer(model: Any, tokenizer: Any) -> None:
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise LearndynError(f"the tokenizer has {len(tokenizer)} tokens but the model embeds only {rows}: "
                            "they do not belong together")


class _ResponseLogits(torch.nn.Module):
    """Logits at response positions only, as a module so that `functional_call` can swap θ."""

    def __init__(self, model: Any):
        super().__init__()
        self.lm = model
        self.fused = split_model(model).fused

    def forward(self, ids: Tensor, mask: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        if self.fused:  # the LM head runs on response positions only
            states = self.lm.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            return self.lm.get_output_embeddings()(states[rows, cols])  # (N, V)
        return self.lm(input_ids=ids, attention_mask=mask, use_cache=False).logits[rows, cols]


def _inputs(seqs: Sequences, index: Sequence[int], device: Any) -> tuple[Tensor, ...]:
    """Right-padded ids and mask, and (row, col, label, seq) of every response position."""
    width = max(len(seqs.ids[i]) for i in index)
    ids = torch.zeros((len(index), width), dtype=torch.long)
    mask = torch.zeros((len(index), width), dtype=torch.long)
    rows, cols, labels, seq = [], [], [], []
    for b, i in enumerate(index):
        tokens, start = seqs.ids[i], seqs.starts[i]
        ids[b, : len(tokens)] = torch.tensor(tokens)
        mask[b, : len(tokens)] = 1
        n = len(tokens) - start
        rows += [b] * n
        cols += range(start - 1, len(tokens) - 1)  # position l-1 predicts token l
        labels += tokens[start:]
        seq += [b] * n
    as_t = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    return ids.to(device), mask.to(device), as_t(rows), as_t(cols), as_t(labels), as_t(seq)


def _update_gradients(head: _ResponseLogits, params: dict[str, Tensor], upd: Sequences, loss: str, beta: float,
                      ref_model: Any) -> tuple[dict[str, dict[str, Tensor]], dict]:
    """g⁺ (and g⁻) = Jᵀ G⁺ (G⁻): one forward, then one backward per residual part."""
    ids, mask, rows, cols, labels, seq = _inputs(upd, range(len(upd.ids)), head.lm.device)
    n_seq = len(upd.ids)
    with torch.enable_grad():
        logits = head(ids, mask, rows, cols)  # (N, V)
        ref = _reference_logps(ref_model, ids, mask, rows, cols, labels, seq, n_seq, logits) \
            if get_loss(loss).pairwise else None
        g_all = residual(loss, logits.detach(), labels, seq, n_seq, beta=beta, ref_logps=ref)  # (N, V)
        sides = {"chosen": seq < n_seq // 2, "rejected": seq >= n_seq // 2} if get_loss(loss).pairwise \
            else {"chosen": torch.ones_like(seq, dtype=torch.bool)}
        grads = {}
        for i, (side, where) in enumerate(sides.items()):
            part = g_all * where[:, None].to(g_all.dtype)
            got = torch.autograd.grad(logits, list(params.values()), part.to(logits.dtype),
                                      retain_graph=i + 1 < len(sides), allow_unused=True)
            grads[side] = {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), got)}
    with torch.no_grad():
        value = float(loss_value(loss, logits.detach(), labels, seq, n_seq, beta=beta, ref_logps=ref))
        logps = sequence_logps(logits.detach(), labels, seq, n_seq)
    info = {"loss": value, "sequences": [{"example_id": k[0], "side": k[1], "logp_sum": float(v)}
                                         for k, v in zip(upd.keys, logps)]}
    return grads, info


def _reference_logps(ref_model, ids, mask, rows, cols, labels, seq, n_seq, logits) -> Tensor:
    """log π_ref of the update sequences; without a reference model, the current model's (h = 0)."""
    with torch.no_grad():
        ref_logits = logits.detach() if ref_model is None else _ResponseLogits(ref_model)(ids, mask, rows, cols)
        return sequence_logps(ref_logits, labels, seq, n_seq)


def _batches(seqs: Sequences, budget: int) -> Iterator[list[int]]:
    order = sorted(range(len(seqs.ids)), key=lambda i: len(seqs.ids[i]))
    for start, stop in pack_runs([len(seqs.ids[i]) for i in order], budget):
        yield order[start:stop]


def _explain_batch(head, params, after, tangents, obs: Sequences, index, rule, top_k, tokenizer) -> list[dict]:
    """Per position: Δz of every tangent by jvp at θ, and the distribution at θ + Δθ."""
    ids, mask, rows, cols, labels, seq = _inputs(obs, index, head.lm.device)
    primal = {n: p.detach() for n, p in params.items()}
    f = lambda p: functional_call(head, p, (ids, mask, rows, cols))  # noqa: E731
    dz: dict[str, Tensor] = {}
    with torch.no_grad():
        for name, tangent in tangents.items():
            z, dz[name] = jvp(f, (primal,), (tangent,))  # (N, V) each
        z_after = f(after)  # (N, V)
    out = []
    for lo in range(0, len(labels), _ROWS):
        sl = slice(lo, lo + _ROWS)
        out.extend(_position_stats(z[sl], {k: v[sl] for k, v in dz.items()}, z_after[sl], labels[sl], seq[sl],
                                   index, obs, cols[sl], rule, top_k, tokenizer))
    return out


def _position_stats(z, dz, z_after, labels, seq, index, obs, cols, rule, top_k, tokenizer) -> list[dict]:
    logp = wide(z).log_softmax(-1)  # (n, V)
    p = logp.exp()
    at = lambda t: t.gather(-1, labels[:, None])[:, 0]  # noqa: E731  value at the observed token
    a_dz = {k: wide(v) - (p * wide(v)).sum(-1, keepdim=True) for k, v in dz.items()}  # A·Δz: Δlog π, (n, V)
    total = sum(v for k, v in a_dz.items() if k != "kernel")  # predicted Δ log π_l(v)
    dp_pred = p * total  # first-order Δπ
    logp_after = wide(z_after).log_softmax(-1)
    dp_act = logp_after.exp() - p
    top = p.argmax(-1)
    ent = -(p * logp).sum(-1)
    cols_pred = {k: at(v) for k, v in a_dz.items()}
    kernel = cols_pred["kernel"] if "kernel" in cols_pred else at(total) / rule.lr  # SGD: Δθ = −η g
    gain_pred = dp_pred.topk(top_k, -1).indices.tolist()
    gain_act = dp_act.topk(top_k, -1).indices.tolist()
    rows = []
    stats = {
        "logp": at(logp), "actual": at(logp_after) - at(logp), "predicted": at(total), "kernel": kernel,
        "predicted_from_chosen": cols_pred["from_chosen"],
        "predicted_from_rejected": cols_pred.get("from_rejected", torch.zeros_like(ent)),
        "predicted_from_state": cols_pred.get("from_state", torch.zeros_like(ent)),
        "argmax_prob": p.gather(-1, top[:, None])[:, 0],
        "argmax_prob_predicted": dp_pred.gather(-1, top[:, None])[:, 0],
        "argmax_prob_actual": dp_act.gather(-1, top[:, None])[:, 0],
        "entropy": ent, "entropy_predicted": -(dp_pred * logp).sum(-1),
        "entropy_actual": -(logp_after.exp() * logp_after).sum(-1) - ent,
    }
    stats = {k: v.tolist() for k, v in stats.items()}
    for i in range(len(labels)):
        example_id, response_type = obs.keys[index[int(seq[i])]]
        start = obs.starts[index[int(seq[i])]]
        row = {"example_id": example_id, "response_type": response_type, "position": int(cols[i]) + 1 - start,
               "token": tokenizer.decode([int(labels[i])]), "argmax_token": tokenizer.decode([int(top[i])])}
        row.update((k, v[i]) for k, v in stats.items())
        row["top_gain_predicted"] = [tokenizer.decode([t]) for t in gain_pred[i]]
        row["top_gain_actual"] = [tokenizer.decode([t]) for t in gain_act[i]]
        rows.append(row)
    return rows


def _per_response(positions: Any, obs: Sequences) -> Any:
    """Sequence-level changes: sums over positions (log π(y) is a sum), entropy change averaged."""
    keys = ["example_id", "response_type"]
    summed = ["logp", "actual", "predicted", "predicted_from_chosen", "predicted_from_rejected",
              "predicted_from_state", "kernel", "argmax_prob_predicted", "argmax_prob_actual"]
    grouped = positions.groupby(keys, sort=False)
    changes = grouped[summed].sum().rename(columns={
        "logp": "logp_sum", "argmax_prob_predicted": "argmax_mass_predicted", "argmax_prob_actual": "argmax_mass_actual"})
    changes = changes.join(grouped[["entropy_predicted", "entropy_actual"]].mean())
    changes["n_tokens"] = grouped.size()
    order = {key: i for i, key in enumerate(obs.keys)}  # probe-file order, not length order
    changes = changes.reset_index()
    return changes.iloc[sorted(range(len(changes)), key=lambda i: order[tuple(changes.iloc[i][keys])])].reset_index(drop=True)


def _summary(changes, positions, update_info, rule, loss, beta, timings, step_norm: float) -> dict:
    """Headline numbers: agreement of predicted and actual, the split by cause, the mass on argmax tokens."""
    pred, act = changes["predicted"], changes["actual"]
    by_type = changes.groupby("response_type", sort=False)[
        ["predicted", "actual", "predicted_from_chosen", "predicted_from_rejected", "predicted_from_state",
         "argmax_mass_predicted", "argmax_mass_actual"]].mean()
    return {
        "loss": loss, "beta": beta, "optimizer": rule.name, "lr": rule.lr,
        "update": update_info,
        "step_norm": step_norm,
        "responses": len(changes), "positions": len(positions),
        "relative_error": float(((pred - act) ** 2).sum() ** 0.5 / max(float((act**2).sum() ** 0.5), 1e-30)),
        "rank_correlation": rank_correlation(pred, act),
        "argmax_mass": {
            "predicted_sum": float(positions["argmax_prob_predicted"].sum()),
            "actual_sum": float(positions["argmax_prob_actual"].sum()),
            "predicted_per_token": float(positions["argmax_prob_predicted"].mean()),
            "actual_per_token": float(positions["argmax_prob_actual"].mean()),
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
def _explain_mode(model: Any) -> Iterator[None]:
    """Dropout off and eager attention (sdpa has no forward-mode AD rule); both restored after."""
    if model is None:
        yield
        return
    was_training, attn = model.training, getattr(model.config, "_attn_implementation", None)
    model.eval()
    switched = attn not in (None, "eager")
    if switched:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switched:
            model.set_attn_implementation(attn)
        model.train(was_training)


def _progress(items: list, enabled: bool, label: str) -> Iterator:
    if not enabled:
        yield from items
        return
    from rich.progress import track

    yield from track(items, description=label, transient=True)
