"""Teacher-forced scoring of probe responses: log π(y | x) and per-token statistics, fast.

Every later feature scores the same probes many times, so this module does the least work that
gives exact results:
  1. each prompt runs through the model once; its KV cache is reused by all of its responses;
  2. prompts and responses are batched by length so that little compute goes to padding;
  3. the LM head (21% of the FLOPs of the built-in model) runs only where a response token is
     predicted (the last prompt position and along each response), a block of rows at a time
     fused with the statistics, so the (tokens, vocabulary) logits never exist all at once.
The model split, the padding and the cache continuation live in lm.py (shared with the explainer).
Prompts are padded on the left, so that responses follow their prompt with no pad slot between
(windowed attention counts cache slots), and the copied caches are never cropped to a window. A model
whose cache cannot be copied per response (a recurrent state: Mamba, Jamba) is scored one sequence
at a time instead (`ModelSplit.shares_cache`). An FSDP2-sharded model is scored on every rank of its
process group: each rank takes a share of the prompts, pads to the same number of forward calls
(a forward is a collective there: `body_calls`), and all rows are gathered (`score_encoded`).
`score_plain` is the obvious one-sequence-at-a-time computation; tests and `bench/` check that
both agree (relative 1e-5 in fp32).

Per response (prompt masked, EOS appended), with π_l the next-token distribution at response
position l and y_l the response token there:
    logp_sum      Σ_l log π_l(y_l)                  the paper's quantity
    logp_mean     logp_sum / n_tokens
    argmax_logp   Σ_l log max_v π_l(v)              the teacher-forced y* (tracks squeezing)
    argmax_prob   mean_l max_v π_l(v)
    entropy       mean_l −Σ_v π_l(v) log π_l(v)     (nats)
    residual_norm mean_l ‖π_l − e_{y_l}‖₂           the size of the SFT residual G
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from learndyn.atomic import atomic_path
from learndyn.data import prompt_room, render_prompt
from learndyn.distributed import all_gather_dicts, is_fsdp2, is_zero3, rank_and_world, share
from learndyn.errors import LearndynError
from learndyn.lm import (ModelSplit, can_pad_prompts, continue_responses, full_cache, left_padded, pack_runs,
                         padded, response_positions, split_model)
from learndyn.models import eval_mode
from learndyn.probes.files import Probe
from learndyn.progress import progress as progress_bar
from learndyn.vocab import TYPE_NAMES

METRICS: dict[str, str] = {
    "logp_sum": "sum over response tokens of log pi(y_l | x, y_<l): the paper's quantity",
    "logp_mean": "logp_sum / n_tokens",
    "n_tokens": "response tokens scored, EOS included",
    "argmax_logp": "sum over positions of log max_v pi_l(v): the teacher-forced greedy response y*",
    "argmax_prob": "mean over positions of max_v pi_l(v)",
    "entropy": "mean over positions of the entropy of pi_l, in nats",
    "residual_norm": "mean over positions of ||pi_l - e_y||_2, the size of the SFT residual",
}
_SUMMED = ("logp_sum", "argmax_logp")
_AVERAGED = ("argmax_prob", "entropy", "residual_norm")
_STATS_CHUNK = 128  # CPU: rows of (V,) logits made and reduced at once; 25 MB at V=49k stays in cache


@dataclass
class EncodedPrompt:
    """A probe's token ids: the prompt once, and each response with EOS appended."""

    example_id: str
    prompt_ids: list[int]
    responses: list[tuple[str, list[int], bool]] = field(default_factory=list)  # (type, ids, truncated)


def encode_probes(
    probes: Sequence[Probe],
    tokenizer: Any,
    *,
    types: Sequence[str] | None = None,
    max_length: int | None = None,
) -> list[EncodedPrompt]:
    """Tokenize probes once (a training run scores the same encoding at every evaluation).

    Truncation policy, for a prompt whose longest response does not fit in `max_length` tokens: the
    prompt keeps its most recent tokens, but at least half of `max_length` when it is that long;
    each response then keeps its first tokens up to the limit (EOS is lost when cut). Cut responses
    are flagged `truncated` in the scores.
    """
    eos = tokenizer.eos_token_id
    encoded = []
    for probe in probes:
        text = render_prompt(probe.prompt, tokenizer)
        chat = not isinstance(probe.prompt, str)  # the chat template already holds special tokens
        prompt_ids = tokenizer(text, add_special_tokens=not chat)["input_ids"]
        if not prompt_ids:
            raise LearndynError(f"probe '{probe.example_id}': the prompt is empty after tokenization")
        names = [t for t in (types or TYPE_NAMES) if t in probe.responses]
        responses = [(t, tokenizer(probe.responses[t], add_special_tokens=False)["input_ids"] + [eos]) for t in names]
        if not responses:
            continue
        if max_length is not None:
            longest = max(len(ids) for _, ids in responses)
            if len(prompt_ids) + longest > max_length:
                keep = min(len(prompt_ids), prompt_room(max_length, longest))
                prompt_ids = prompt_ids[len(prompt_ids) - keep:]
            room = max_length - len(prompt_ids)
            responses = [(t, ids[:room], len(ids) > room) for t, ids in responses]
        else:
            responses = [(t, ids, False) for t, ids in responses]
        encoded.append(EncodedPrompt(probe.example_id, prompt_ids, responses))
    return encoded


def score_probes(
    model: Any,
    tokenizer: Any,
    probes: Sequence[Probe],
    *,
    types: Sequence[str] | None = None,
    max_length: int | None = None,
    batch_tokens: int | None = None,
    progress: str | None = "Scoring",
    across_ranks: bool | None = None,
) -> Any:
    """Score every (probe, response type): a long-format DataFrame, one row per pair.

    `max_length` defaults to the model's context length. `batch_tokens` bounds the padded tokens of
    one forward pass; it defaults to 1024 on CPU (measured best in bench/score_throughput.py) and
    16384 on GPU. Memory for logits stays bounded whatever it is (see `token_stats`). In a process
    group, call it on every rank with the same probes: see `score_encoded` for `across_ranks`.
    """
    check_max_length(max_length)
    if max_length is None:
        max_length = context_length(model)
    encoded = encode_probes(probes, tokenizer, types=types, max_length=max_length)
    return score_encoded(model, encoded, batch_tokens=batch_tokens, progress=progress, across_ranks=across_ranks)


def check_max_length(max_length: int | None) -> None:
    """A scored sequence needs a prompt token and a response token; fail before any work otherwise."""
    if max_length is not None and max_length < 2:
        raise LearndynError(f"max_length must be at least 2 (a prompt token and a response token), got {max_length}")


def context_length(model: Any) -> int | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if getattr(config, attr, None):
            return int(getattr(config, attr))
    return None


def score_encoded(
    model: Any,
    encoded: Sequence[EncodedPrompt],
    *,
    batch_tokens: int | None = None,
    progress: str | None = "Scoring",
    across_ranks: bool | None = None,
) -> Any:
    """Score pre-tokenized probes (see `encode_probes`); rows keep the order of `encoded`.

    Called on every rank of a process group with the same `encoded`, it returns every row on every
    rank. `across_ranks` deals the prompts out, each rank scoring a share of every size; it defaults to
    on for an FSDP2-sharded model in a group of more than one process, where a forward pass is a
    collective: ranks with fewer forward calls then make one-token dummy calls so that every rank
    joins every all-gather. Off, every rank scores everything (the route of ZeRO-3, whose LM head
    gathers per call: untested). Unsharded DDP replicas may use either.
    """
    import pandas as pd

    on_gpu = model.device.type != "cpu"
    batch_tokens = batch_tokens or (16384 if on_gpu else 1024)
    if batch_tokens < 1:
        raise LearndynError(f"batch_tokens must be positive, got {batch_tokens}")
    rank, world = rank_and_world()
    if across_ranks is None:
        across_ranks = world > 1 and is_fsdp2(model)
    across_ranks = across_ranks and world > 1
    mine = dealt(encoded, rank, world) if across_ranks else list(range(len(encoded)))
    part = [encoded[i] for i in mine]

    results: dict[tuple[int, int], dict[str, float]] = {}
    total = sum(len(e.responses) for e in part)
    with (progress_bar(progress, total, enabled=rank == 0) as advance,
          _grad_off(model),
          eval_mode(model)):
        split = split_model(model)
        try:
            shares = split.shares_cache()
            pad = can_pad_prompts(model)
            score = _score_batch if shares else _score_alone
            before = split.calls
            for batch in _prompt_batches(part, batch_tokens, pad=pad):
                for key, stats in score(model, [part[i] for i in batch], batch, batch_tokens, on_gpu):
                    results[key] = stats
                    advance(1)
            if across_ranks and is_fsdp2(model):  # every rank makes as many forward calls as the busiest one
                most = max(body_calls([encoded[i] for i in dealt(encoded, r, world)], batch_tokens, pad=pad,
                                      shares_cache=shares) for r in range(world))
                for _ in range(most - (split.calls - before)):
                    split.idle()
        finally:
            split.release()
    rows = []
    for i, enc in enumerate(part):
        for j, (name, ids, truncated) in enumerate(enc.responses):
            rows.append({"example_id": enc.example_id, "response_type": name, **results[(i, j)],
                         "truncated": truncated, "_at": mine[i]})
    if across_ranks:
        rows = sorted(all_gather_dicts(rows), key=lambda row: row["_at"])  # stable: responses keep their order
    return pd.DataFrame(rows, columns=["example_id", "response_type", *METRICS, "truncated"])


def dealt(encoded: Sequence[EncodedPrompt], rank: int, world: int) -> list[int]:
    """The prompts (indices, ascending) that `rank` scores: dealt round-robin in order of their tokens
    (prompt and responses), so that every rank gets the same mix of sizes whatever the file's order.
    On random probes this kept ranks' tokens within 3-7% of each other, where halves of a file sorted
    by length differ 1.6-1.9x; forward-call counts still differ by a few (the short rank pads)."""
    def tokens(i: int) -> int:
        return len(encoded[i].prompt_ids) + sum(len(ids) for _, ids, _ in encoded[i].responses)

    by_size = sorted(range(len(encoded)), key=tokens)
    return sorted(by_size[k] for k in share(len(encoded), rank, world))


def body_calls(encoded: Sequence[EncodedPrompt], batch_tokens: int, *, pad: bool = True,
               shares_cache: bool = True) -> int:
    """How many forward calls of the model's body scoring `encoded` makes, without running any.

    Batching depends only on token counts, so every rank can compute every rank's count: the plan
    that lets ranks of a sharded model pad to the same number of calls. It mirrors `_score_batch`
    (a call per prompt batch, and one per response chunk with a response longer than one token) and
    `_score_alone` (a call per response); tests check it against a call counter.
    """
    if not shares_cache:
        return sum(len(e.responses) for e in encoded)
    calls = 0
    for batch in _prompt_batches(encoded, batch_tokens, pad=pad):
        lengths = sorted(len(ids) for i in batch for _, ids, _ in encoded[i].responses)
        calls += 1 + sum(1 for _, stop in pack_runs(lengths, batch_tokens) if lengths[stop - 1] > 1)
    return calls


@contextmanager
def _grad_off(model: Any) -> Iterator[None]:
    """No autograd while scoring: `inference_mode` where it is safe, `no_grad` for sharded models,
    whose hooks swap parameters in and out (inference tensors must never become module state)."""
    context = torch.no_grad() if is_fsdp2(model) or is_zero3(model) else torch.inference_mode()
    with context:
        yield


def _prompt_batches(encoded: Sequence[EncodedPrompt], batch_tokens: int, pad: bool = True) -> list[list[int]]:
    """Groups of prompts of similar length (indices into `encoded`); of equal length unless `pad`."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].prompt_ids))
    runs = pack_runs([len(encoded[i].prompt_ids) for i in order], batch_tokens, max_waste=0.1 if pad else 0.0)
    return [order[start:stop] for start, stop in runs]


def _score_batch(model: Any, prompts: list[EncodedPrompt], index: list[int], batch_tokens: int, on_gpu: bool):
    """Run the prompts once, then their responses in length-sorted chunks on the shared cache."""
    split = split_model(model)
    device = model.device
    ids, mask, positions, lengths = left_padded([p.prompt_ids for p in prompts], device)
    states, cache = split.body(input_ids=ids, attention_mask=mask, position_ids=positions, cache=full_cache(),
                               use_cache=True)
    last = states[:, -1]  # (B, D): predicts response token 1

    jobs = sorted(((b, j) for b, p in enumerate(prompts) for j in range(len(p.responses))),
                  key=lambda bj: len(prompts[bj[0]].responses[bj[1]][1]))
    for start, stop in pack_runs([len(prompts[b].responses[j][1]) for b, j in jobs], batch_tokens):
        chunk = jobs[start:stop]
        stats = _score_responses(split, cache, last, mask, lengths, [(b, prompts[b].responses[j][1]) for b, j in chunk],
                                 chunk_rows=2048 if on_gpu else _STATS_CHUNK)
        for (b, j), row in zip(chunk, stats):
            yield (index[b], j), row


def _score_alone(model: Any, prompts: list[EncodedPrompt], index: list[int], batch_tokens: int, on_gpu: bool):
    """Each (prompt + response) in one forward pass of its own, without a cache: the route of models
    whose cache cannot be shared (see `ModelSplit.shares_cache`)."""
    split = split_model(model)
    device = model.device
    for b, p in enumerate(prompts):
        for j, (_, ids, _) in enumerate(p.responses):
            seq = torch.tensor([p.prompt_ids + ids[:-1]], device=device)  # the last response token is never fed
            states, _ = split.body(input_ids=seq, use_cache=False)
            states = states[0, len(p.prompt_ids) - 1:]  # (R, D): the positions that predict the response
            n = torch.tensor([len(ids)], device=device)
            token = token_stats(states, torch.tensor(ids, device=device), split.head, 2048 if on_gpu else _STATS_CHUNK)
            yield (index[b], j), _per_response(token, torch.zeros(len(ids), dtype=torch.long, device=device), n)[0]


def _score_responses(split: ModelSplit, cache, last, prompt_mask, prompt_lengths, rows, chunk_rows: int):
    """Teacher-force `rows` = [(prompt row b, response ids)] on top of the prompts' cache."""
    device = last.device
    owner = torch.tensor([b for b, _ in rows], device=device)  # (S,)
    tokens, n = padded([ids for _, ids in rows], device)  # (S, R), (S,)
    states = continue_responses(split, cache, last, prompt_mask, prompt_lengths, owner, tokens, n)  # (N, D)
    segment = torch.arange(len(rows), device=device).repeat_interleave(n)  # (N,)
    return _per_response(token_stats(states, tokens[response_positions(n)], split.head, chunk_rows), segment, n)


def token_stats(
    states: torch.Tensor,
    targets: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor] = lambda z: z,
    chunk_rows: int = 128,
) -> dict[str, torch.Tensor]:
    """Per-position statistics from states (N, D) through `head` to logits (N, V), in fp32, a chunk
    of rows at a time so that the block stays in cache and memory stays bounded.

    Few passes over each (chunk, V) block: shift by the max and exponentiate once. The argmax term (exactly 1 after the shift) is kept out of the sums
    so that near-one-hot positions keep their relative precision (entropy ~ 1e-6 stays accurate).
    """
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("logp", "argmax_logp", "entropy", "residual_norm")}
    for start in range(0, states.shape[0], chunk_rows):
        z = head(states[start:start + chunk_rows]).float()  # (C, V)
        y = targets[start:start + chunk_rows, None]  # (C, 1)
        top, arg = z.max(dim=-1, keepdim=True)  # (C, 1)
        shifted = z - top  # (C, V), <= 0
        e = shifted.exp().scatter_(1, arg, 0.0)  # (C, V): unnormalised pi without its max term
        rest = e.sum(-1)  # (C,): total mass is 1 + rest
        total = 1 + rest
        log_total = torch.log1p(rest)
        # Products then sum (pairwise summation): bmm/einsum on CPU lose ~1e-4 over V=49k terms.
        e_shifted = (e * shifted).sum(-1)  # sum_v e*shifted
        e_sq = (e * e).sum(-1)  # sum over non-max v of e^2
        is_top = (y == arg)[:, 0]
        shifted_y = shifted.gather(1, y)[:, 0]
        e_y = shifted_y.exp()  # unnormalised pi(y)
        logp_y = shifted_y - log_total
        # ||pi - e_y||^2 = (1 - pi_y)^2 + sum_{v != y} pi_v^2, each part without cancellation
        one_minus = torch.where(is_top, rest, 1 + rest - e_y) / total
        others_sq = torch.where(is_top, e_sq, 1 + e_sq - e_y**2) / total**2
        parts["logp"].append(logp_y)
        parts["argmax_logp"].append(-log_total)  # log max_v pi = top - lse
        parts["entropy"].append(log_total - e_shifted / total)
        parts["residual_norm"].append((one_minus**2 + others_sq).clamp_min(0).sqrt())
    return {k: torch.cat(v) for k, v in parts.items()}


def _per_response(token: dict[str, torch.Tensor], segment: torch.Tensor, n: torch.Tensor) -> list[dict[str, float]]:
    def total(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(n), dtype=values.dtype, device=values.device).index_add_(0, segment, values)

    logp_sum = total(token["logp"])
    columns = {
        "logp_sum": logp_sum,
        "logp_mean": logp_sum / n,
        "n_tokens": n,
        "argmax_logp": total(token["argmax_logp"]),
        "argmax_prob": total(token["argmax_logp"].exp()) / n,
        "entropy": total(token["entropy"]) / n,
        "residual_norm": total(token["residual_norm"]) / n,
    }
    host = {k: v.double().cpu().tolist() for k, v in columns.items()}
    return [{k: (int(host[k][s]) if k == "n_tokens" else host[k][s]) for k in METRICS} for s in range(len(n))]


@torch.inference_mode()
def score_plain(model: Any, encoded: Sequence[EncodedPrompt], dtype: torch.dtype = torch.float64) -> Any:
    """The reference: one full prompt+response forward per response, log-softmax over the whole vocabulary.

    Statistics are taken in float64 by default so that the reference is not the less precise side;
    `bench/` times it with float32, as a plain implementation would run.
    """
    import pandas as pd

    rows = []
    with eval_mode(model):
        for enc in encoded:
            for name, ids, truncated in enc.responses:
                seq = torch.tensor([enc.prompt_ids + ids], device=model.device)
                logp = torch.log_softmax(model(input_ids=seq).logits[0].to(dtype), dim=-1)  # (T, V)
                pos = logp[len(enc.prompt_ids) - 1 : -1]  # (R, V): positions that predict the response
                p = pos.exp()
                y = torch.tensor(ids, device=model.device)
                logp_y = pos[torch.arange(len(ids)), y]
                onehot = torch.nn.functional.one_hot(y, pos.shape[-1]).to(dtype)
                rows.append({
                    "example_id": enc.example_id, "response_type": name,
                    "logp_sum": logp_y.sum().item(), "logp_mean": logp_y.mean().item(), "n_tokens": len(ids),
                    "argmax_logp": pos.max(-1).values.sum().item(), "argmax_prob": p.max(-1).values.mean().item(),
                    "entropy": -(p * pos).sum(-1).mean().item(),
                    "residual_norm": (p - onehot).norm(dim=-1).mean().item(), "truncated": truncated,
                })
    return pd.DataFrame(rows, columns=["example_id", "response_type", *METRICS, "truncated"])


def summarize(scores: Any) -> Any:
    """Per-type means of every metric, in vocabulary order, with the count of rows and of truncations."""
    grouped = scores.groupby("response_type", sort=False)
    table = grouped[list(METRICS)].mean()
    table.insert(0, "n", grouped.size())
    table["truncated"] = grouped["truncated"].sum()
    return table.reindex([t for t in TYPE_NAMES if t in table.index])


def write_scores(scores: Any, path: str | Path) -> None:
    """Write scores as Parquet, atomically."""
    with atomic_path(path) as tmp:
        scores.to_parquet(tmp, index=False)
