"""Token sequences and batches for the explainer's passes through the model.

Full sequences (prompt + response, right-padded) serve the update batch and the naive route; probe
batches run each prompt once and its responses on the prompt's KV cache, as `scoring.py` does, so
that the jvp over the probes does little repeated prompt work. `ResponseLogits` and
`SharedPromptLogits` are modules so that `torch.func.functional_call` can swap the parameters.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from learndyn.data import Preference, render_prompt
from learndyn.errors import LearndynError
from learndyn.probes.files import Probe
from learndyn.lm import continue_responses, full_cache, left_padded, pack_runs, split_model
from learndyn.scoring import encode_probes


@dataclass
class Sequences:
    """Token sequences (prompt + response) with what each response position predicts."""

    ids: list[list[int]]  # prompt + response ids
    starts: list[int]  # index of the first response token in each sequence
    keys: list[tuple[str, str]] = field(default_factory=list)  # (example_id, response_type)
    prompt: list[int] = field(default_factory=list)  # probes: which prompt; such sequences share ids[:start]


def encode_update(update: Sequence[Preference], tokenizer: Any, *, pairwise: bool, max_length: int | None,
                  truncate: int | None = None) -> Sequences:
    """Chosen responses (then, for pairwise losses, the rejected ones in the same order), tokenized as
    TRL tokenizes the rows `train` gives it (see `trained_tokens`), so a step explained is the step taken.
    `truncate` is the trainer's max_length: each sequence keeps its first `truncate` tokens (TRL's
    "keep_start"); `max_length`, the model's context, is a hard limit."""
    if not update:
        raise LearndynError("the update batch is empty")
    sides = ("chosen", "rejected") if pairwise else ("chosen",)
    encoded = {}
    for pref in update:
        texts = [pref.chosen if side == "chosen" else pref.rejected for side in sides]
        if None in texts:
            raise LearndynError(f"update example '{pref.example_id}' has no rejected response; "
                                "the loss needs one (use --loss sft, or data with rejected)")
        encoded[pref.example_id] = trained_tokens(pref.prompt, texts, tokenizer)
    seqs = Sequences([], [], [])
    for k, side in enumerate(sides):
        for pref in update:
            prompt, responses = encoded[pref.example_id]
            ids = (prompt + responses[k])[:truncate]
            if len(ids) <= len(prompt):
                raise LearndynError(f"update example '{pref.example_id}' ({side}): its prompt fills max_length "
                                    f"{truncate}, leaving no response token to train on")
            if max_length is not None and len(ids) > max_length:
                raise LearndynError(f"update example '{pref.example_id}' ({side}) is {len(ids)} "
                                    f"tokens, longer than the model's context of {max_length}")
            seqs.ids.append(ids)
            seqs.starts.append(len(prompt))
            seqs.keys.append((pref.example_id, side))
    return seqs


def trained_tokens(prompt: Any, responses: Sequence[str], tokenizer: Any) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, completion ids per response) as TRL's trainers tokenize a prompt/completion row.

    A conversation is rendered by the chat template twice, the prompt alone with the generation
    prompt and the prompt with the assistant's turn, so a completion ends with whatever the template
    puts after the turn (e.g. "<|im_end|>\n": one token more than the probes score). Plain text gets
    EOS appended to the completion. The completion starts where the two token lists first differ;
    for a pair, at the earlier of the two places, so chosen and rejected share one prompt.
    """
    if isinstance(prompt, str):
        eos = tokenizer.eos_token
        prompt_ids = tokenizer(prompt)["input_ids"]
        full = [tokenizer(prompt + text + ("" if text.endswith(eos) else eos))["input_ids"] for text in responses]
    else:
        render_prompt(prompt, tokenizer)  # a clear error without a chat template
        prompt_ids = _chat_ids(tokenizer, prompt, add_generation_prompt=True)
        full = [_chat_ids(tokenizer, [*prompt, {"role": "assistant", "content": text}]) for text in responses]
    keep = min(_common_prefix(prompt_ids, ids) for ids in full)
    return prompt_ids[:keep], [ids[keep:] for ids in full]


def _chat_ids(tokenizer: Any, messages: list, add_generation_prompt: bool = False) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def probe_sequences(probes: Sequence[Probe], tokenizer: Any, types: Sequence[str] | None, limit: int | None) -> Sequences:
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


def check_tokenizer(model: Any, tokenizer: Any) -> None:
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise LearndynError(f"the tokenizer has {len(tokenizer)} tokens but the model embeds only {rows}: "
                            "they do not belong together")


class ResponseLogits(torch.nn.Module):
    """Logits at response positions only, as a module so that `functional_call` can swap θ."""

    def __init__(self, model: Any):
        super().__init__()
        self.lm = model
        self.split = split_model(model)  # body -> hidden states, head at response positions only (or logits, identity)

    def forward(self, ids: Tensor, mask: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        states, _ = self.split.body(input_ids=ids, attention_mask=mask, use_cache=False)  # (B, T, D)
        return self.split.head(states[rows, cols])  # (N, V)


def full_inputs(seqs: Sequences, index: Sequence[int], device: Any) -> tuple[Tensor, ...]:
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


@dataclass
class ProbeBatch:
    """Probe responses that share prompts: the prompts run once, then the responses on their KV cache,
    in runs of similar length (one forward pass each). N counts the response positions."""

    prompts: Tensor  # (B, P) prompt ids, left-padded so that responses follow their prompt (lm.left_padded)
    mask: Tensor  # (B, P) 1 on prompt tokens
    positions: Tensor  # (B, P) position ids of the prompt tokens
    lengths: Tensor  # (B,) prompt lengths
    runs: list[tuple[Tensor, Tensor, Tensor]]  # per run: prompt row (S,), response ids (S, R) padded, lengths (S,)
    index: list[int]  # the sequence of each response, in run order (the order of the output rows)
    labels: Tensor  # (N,) the observed token at each response position
    seq: Tensor  # (N,) which entry of `index` each position belongs to
    position: Tensor  # (N,) position within the response


def probe_batches(seqs: Sequences, budget: int, pad: bool = True) -> Iterator[list[list[int]]]:
    """Batches of probe sequences, as lists of groups that share a prompt, of about `budget` tokens.

    A batch costs its padded prompts plus its responses. All responses of a prompt go in one batch
    (so the prompt runs once), unless they alone pass the budget: then they are split, and the prompt
    runs once per part. Prompts are taken by length, so their padding stays small; without `pad`
    (see `lm.can_pad_prompts`) a batch holds prompts of one length only.
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
        mixed = batch and prompt != seqs.starts[batch[0][0]]
        if batch and (padded > budget or prompts + prompt + responses + more < 0.9 * padded or (mixed and not pad)):
            yield batch
            batch, prompts, responses = [], 0, 0
        batch.append(part)
        prompts, responses = prompts + prompt, responses + more
    if batch:
        yield batch


def probe_batch(seqs: Sequences, groups: list[list[int]], budget: int, device: Any) -> ProbeBatch:
    """Tensors for one batch of `probe_batches`: prompt rows, then responses in length-sorted runs."""
    prompts, mask, positions, lengths = left_padded([seqs.ids[g[0]][: seqs.starts[g[0]]] for g in groups], device)
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
    return ProbeBatch(
        prompts=prompts, mask=mask, positions=positions, lengths=lengths, runs=runs, index=[i for _, i in jobs],
        labels=as_t([t for r in response for t in r]),
        seq=as_t([s for s, r in enumerate(response) for _ in r]),
        position=as_t([j for r in response for j in range(len(r))]),
    )


class SharedPromptLogits(ResponseLogits):
    """`ResponseLogits` for a `ProbeBatch`: each prompt runs once and its responses continue from its
    KV cache (`lm.continue_responses`, as scoring does). Under jvp the cache holds the prompt's tangents
    too, so every output equals that of the full (prompt + response) sequence, value and tangent."""

    def forward(self, batch: ProbeBatch) -> Tensor:  # type: ignore[override]
        states, cache = self.split.body(input_ids=batch.prompts, attention_mask=batch.mask,
                                        position_ids=batch.positions, cache=full_cache(), use_cache=True)  # (B, P, D)
        out = [continue_responses(self.split, cache, states[:, -1], batch.mask, batch.lengths, owner, tokens, n)
               for owner, tokens, n in batch.runs]  # (Σn, D) per run, response by response
        return self.split.head(torch.cat(out))  # (N, V)
