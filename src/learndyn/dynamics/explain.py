"""Explain one LLM update step: predicted vs actual change of every probe response, per position.

For an update batch u with loss L and an optimizer rule giving Δθ, the first-order change of the
log-probability of an observed token y_l (Ren & Sutherland, Eq. 5) is

    Δ log π(y_l) ≈ ⟨∇θ log π(y_l), Δθ⟩ = [A_l · Δz_l]_{y_l},   Δz_l = J_l Δθ,   A_l = I − 1π_lᵀ

Δθ is affine in the update's gradient g = Σ_u J_uᵀ G_u (see `updates.py`), and g splits into the
part from the chosen residual G⁺ and the part from the rejected residual G⁻, so the prediction
splits the same way. Nothing of size V×V (the eNTK) or (probes × parameters) is ever formed:
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
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call, jvp, vmap

from learndyn.data import Preference, render_prompt
from learndyn.dynamics.residuals import get_loss, loss_value, residual, sequence_logps, wide
from learndyn.dynamics.updates import OptimizerRule, plan_step
from learndyn.errors import LearndynError
from learndyn.probes.files import Probe
from learndyn.scoring import context_length, encode_probes, pack_runs, split_model

# Positions reduced at once. (128, V) float32 blocks (25 MB at V=49k) stay under glibc's largest mmap
# threshold, so the temporaries are reused instead of faulted in afresh: on CPU 2x faster than 256 rows.
_ROWS = 128


@dataclass
class Sequences:
    """Token sequences (prompt + response) with what each response position predicts."""

    ids: list[list[int]]  # prompt + response ids
    starts: list[int]  # index of the first response token in each sequence
    keys: list[tuple[str, str]] = field(default_factory=list)  # (example_id, response_type)
    prompt: list[int] = field(default_factory=list)  # probes: which prompt; such sequences share ids[:start]


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
    defaults to the current model (the first step of a DPO run). Probes go through the model about
    `chunk_tokens` tokens at a time (each prompt once, then its responses), so memory stays bounded
    for any probe set. The model is never modified.
    """
    import pandas as pd

    rule = rule or OptimizerRule()
    spec = get_loss(loss)
    limit = context_length(model)
    _check_tokenizer(model, tokenizer)
    upd = encode_update(update, tokenizer, pairwise=spec.pairwise, max_length=limit)
    obs = _probe_sequences(probes, tokenizer, types, limit)
    timings: dict[str, float] = {}
    params = {f"lm.{n}": p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise LearndynError("the model has no trainable parameters")

    with _explain_mode(model), _explain_mode(ref_model):
        t0 = time.perf_counter()
        grads, update_info = _update_gradients(_ResponseLogits(model), params, upd, spec.name, beta, ref_model)
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
        causes = list(tangents)
        stacked = {n: torch.stack([tangents[k].pop(n) for k in causes]) for n in params}  # (causes, *shape)
        del tangents
        timings["update_gradient_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        head, rows = _SharedPromptLogits(model), []
        token_text = functools.cache(lambda t: tokenizer.decode([t]))
        for groups in _progress(list(_probe_batches(obs, chunk_tokens)), progress, "Explaining"):
            batch = _probe_batch(obs, groups, chunk_tokens, model.device)
            rows.extend(_explain_batch(head, params, after, causes, stacked, obs, batch, rule, top_k, token_text))
        timings["probes_s"] = time.perf_counter() - t0

    order = {key: i for i, key in enumerate(obs.keys)}
    positions = pd.DataFrame(sorted(rows, key=lambda r: (order[r["example_id"], r["response_type"]], r["position"])))
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
    for k, enc in enumerate(encode_probes(probes, tokenizer, types=types, max_length=limit)):
        for name, ids, _ in enc.responses:
            seqs.ids.append(enc.prompt_ids + ids)
            seqs.starts.append(len(enc.prompt_ids))
            seqs.keys.append((enc.example_id, name))
            seqs.prompt.append(k)
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
        self.split = split_model(model)  # body -> hidden states, head at response positions only (or logits, identity)

    def forward(self, ids: Tensor, mask: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        states, _ = self.split.body(input_ids=ids, attention_mask=mask, use_cache=False)  # (B, T, D)
        return self.split.head(states[rows, cols])  # (N, V)


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


@dataclass
class _ProbeBatch:
    """Probe responses that share prompts: the prompts run once, then the responses on their KV cache,
    in runs of similar length (one forward pass each). N counts the response positions."""

    prompts: Tensor  # (B, P) prompt ids, right-padded
    lengths: Tensor  # (B,) prompt lengths
    runs: list[tuple[Tensor, Tensor, Tensor]]  # per run: prompt row (S,), response ids (S, R) padded, lengths (S,)
    index: list[int]  # the sequence of each response, in run order (the order of the output rows)
    labels: Tensor  # (N,) the observed token at each response position
    seq: Tensor  # (N,) which entry of `index` each position belongs to
    position: Tensor  # (N,) position within the response


def _probe_batches(seqs: Sequences, budget: int) -> Iterator[list[list[int]]]:
    """Batches of probe sequences, as lists of groups that share a prompt, of about `budget` tokens.

    A batch costs its padded prompts plus its responses. All responses of a prompt go in one batch
    (so the prompt runs once), unless they alone pass the budget: then they are split, and the prompt
    runs once per part. Prompts are taken by length, so their padding stays small.
    """
    groups: dict[int, list[int]] = {}
    for i, k in enumerate(seqs.prompt):
        groups.setdefault(k, []).append(i)
    size = lambda i: len(seqs.ids[i]) - seqs.starts[i]  # noqa: E731  response tokens
    parts = []
    for members in sorted(groups.values(), key=lambda m: seqs.starts[m[0]]):
        prompt, part, used = seqs.starts[members[0]], [], 0
        for i in sorted(members, key=size):
            if part and prompt + used + size(i) > budget:
                parts.append(part)
                part, used = [], 0
            part.append(i)
            used += size(i)
        parts.append(part)
    batch, prompts, responses = [], 0, 0
    for part in parts:  # ascending prompt length: the newest part has the longest prompt
        prompt, more = seqs.starts[part[0]], sum(size(i) for i in part)
        padded = (len(batch) + 1) * prompt + responses + more
        if batch and (padded > budget or prompts + prompt + responses + more < 0.9 * padded):
            yield batch
            batch, prompts, responses = [], 0, 0
        batch.append(part)
        prompts, responses = prompts + prompt, responses + more
    if batch:
        yield batch


def _probe_batch(seqs: Sequences, groups: list[list[int]], budget: int, device: Any) -> _ProbeBatch:
    """Tensors for one batch of `_probe_batches`: prompt rows, then responses in length-sorted runs."""
    lengths = [seqs.starts[g[0]] for g in groups]
    prompts = torch.zeros((len(groups), max(lengths)), dtype=torch.long)
    for b, g in enumerate(groups):
        prompts[b, : lengths[b]] = torch.tensor(seqs.ids[g[0]][: lengths[b]])
    size = lambda i: len(seqs.ids[i]) - seqs.starts[i]  # noqa: E731
    jobs = sorted(((b, i) for b, g in enumerate(groups) for i in g), key=lambda bi: size(bi[1]))  # (prompt row, seq)
    response = [seqs.ids[i][seqs.starts[i]:] for _, i in jobs]  # ids incl. EOS: all predicted, all but the last fed
    runs = []
    for lo, hi in pack_runs([len(r) for r in response], budget):
        tokens = torch.zeros((hi - lo, len(response[hi - 1])), dtype=torch.long)  # ascending: the last is the longest
        for s, r in enumerate(response[lo:hi]):
            tokens[s, : len(r)] = torch.tensor(r)
        n = torch.tensor([len(r) for r in response[lo:hi]])
        runs.append((torch.tensor([b for b, _ in jobs[lo:hi]], device=device), tokens.to(device), n.to(device)))
    as_t = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    return _ProbeBatch(
        prompts=prompts.to(device), lengths=as_t(lengths), runs=runs, index=[i for _, i in jobs],
        labels=as_t([t for r in response for t in r]),
        seq=as_t([s for s, r in enumerate(response) for _ in r]),
        position=as_t([j for r in response for j in range(len(r))]),
    )


class _SharedPromptLogits(_ResponseLogits):
    """`_ResponseLogits` for a `_ProbeBatch`: each prompt runs once and its responses continue from its
    KV cache, the way `scoring._score_batch` does. Under jvp the cache holds the prompt's tangents
    too, so every output equals that of the full (prompt + response) sequence, value and tangent."""

    def forward(self, batch: _ProbeBatch) -> Tensor:  # type: ignore[override]
        from transformers import DynamicCache

        device = batch.prompts.device
        rows, width = batch.prompts.shape
        at = torch.arange(width, device=device)
        mask = (at[None, :] < batch.lengths[:, None]).long()  # (B, P)
        states, cache = self.split.body(input_ids=batch.prompts, attention_mask=mask,
                                        position_ids=at.expand(rows, -1), use_cache=True)  # (B, P, D)
        last = states[torch.arange(rows, device=device), batch.lengths - 1]  # (B, D): predicts each first token
        out = []
        for owner, tokens, n in batch.runs:  # owner (S,), tokens (S, R), n (S,)
            h = last[owner][:, None]  # (S, 1, D)
            at = torch.arange(tokens.shape[1], device=device)
            if tokens.shape[1] > 1:  # the last token is predicted, never fed
                fed = (at[None, :-1] < (n - 1)[:, None]).long()  # (S, R-1)
                own = DynamicCache([(layer.keys[owner], layer.values[owner]) for layer in cache.layers],
                                   config=self.lm.config)  # each response's copy of its prompt's cache
                rest, _ = self.split.body(input_ids=tokens[:, :-1], attention_mask=torch.cat([mask[owner], fed], dim=1),
                                          position_ids=batch.lengths[owner][:, None] + at[None, :-1],
                                          past_key_values=own, use_cache=True)  # (S, R-1, D)
                h = torch.cat([h, rest], dim=1)  # (S, R, D)
            out.append(h[at[None, :] < n[:, None]])  # (Σn, D), response by response
        return self.split.head(torch.cat(out))  # (N, V)


def _explain_batch(head, params, after, causes, stacked, obs: Sequences, batch: _ProbeBatch, rule, top_k,
                   token_text) -> list[dict]:
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
                                   where[sl], rule, top_k, token_text))
    return out


def _position_stats(z, dz, z_after, labels, where, rule, top_k, token_text) -> list[dict]:
    """Statistics of n positions from their logits (n, V); `where` is (example_id, response_type, position)."""
    logp = wide(z).log_softmax(-1)  # (n, V)
    p = logp.exp()
    at = lambda t: t.gather(-1, labels[:, None])[:, 0]  # noqa: E731  value at the observed token
    a_at = lambda v: at(v) - (p * v).sum(-1)  # noqa: E731  [A·Δz]_y = Δ log π(y), A linear in Δz
    cols_pred = {k: a_at(wide(v)) for k, v in dz.items()}
    moved = wide(sum(v for k, v in dz.items() if k != "kernel"))  # Δz of the whole step
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
        "predicted_from_chosen": cols_pred["from_chosen"],
        "predicted_from_rejected": cols_pred.get("from_rejected", torch.zeros_like(ent)),
        "predicted_from_state": cols_pred.get("from_state", torch.zeros_like(ent)),
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
