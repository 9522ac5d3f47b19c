"""Batched decoding: the model's own responses to many prompts, fast and in input order.

Probe building needs the greedy response y* of every training prompt, the local rephraser asks a
chat model to reword texts, and evaluation samples responses during a run. All of them go through
`generate`, which batches prompts of similar length (little compute spent on padding), pads on the
left (so every row's next token sits at the same, last position) and reuses the KV cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from learndyn.data import Prompt, render_prompt
from learndyn.errors import LearndynError
from learndyn.models import eval_mode
from learndyn.progress import progress as progress_bar


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int | None = None,
    progress: str | None = "Generating",
) -> list[str]:
    """The model's response to each prompt (new tokens only, special tokens dropped, stripped).

    Each response stops at EOS or after `max_new_tokens` tokens. Greedy decoding (the default) is
    deterministic and, up to float rounding, independent of `batch_size`; sampling settings in the
    model's generation_config are ignored. Sampling is plain temperature sampling over the whole
    vocabulary (no top-k/top-p), so samples follow the model's distribution; with a `seed` it is
    reproducible for the same prompts and batch size, and the global torch RNG is left untouched.
    A rich progress bar labelled `progress` is shown when there is more than one batch.
    """
    tokens = generate_tokens(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             do_sample=do_sample, temperature=temperature, seed=seed, progress=progress)
    eos_ids = _eos_ids(model, tokenizer) if tokens else []
    return [tokenizer.decode(_until_eos(t, eos_ids), skip_special_tokens=True).strip() for t in tokens]


def generate_tokens(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int | None = None,
    progress: str | None = "Generating",
) -> list[list[int]]:
    """`generate`'s responses as the token ids the model produced: the new tokens up to and including
    the first EOS (none when the response was cut at `max_new_tokens`), as an RL trainer trains on them."""
    if max_new_tokens < 1:
        raise LearndynError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if batch_size < 1:
        raise LearndynError(f"batch_size must be at least 1, got {batch_size}")
    if do_sample and not temperature > 0:
        raise LearndynError(f"temperature must be positive when sampling, got {temperature}")
    if not prompts:
        return []

    encoded = [_encode(prompt, tokenizer, index) for index, prompt in enumerate(prompts)]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # longest first: OOM shows at once
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    options = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, eos_token_id=eos_ids,
                   pad_token_id=pad_id, use_cache=True)
    if do_sample:
        options.update(temperature=temperature, top_k=None, top_p=None)
    else:  # silence sampling settings a model's generation_config may carry
        options.update(temperature=None, top_k=None, top_p=None)

    results: list[list[int]] = [[] for _ in encoded]
    device = model.device
    # eval mode: dropout off, so greedy decoding is deterministic even mid-training
    with eval_mode(model), _seeded(seed if do_sample else None, device), torch.inference_mode(), \
            progress_bar(progress, len(encoded), enabled=len(batches) > 1) as advance:
        for batch in batches:
            input_ids, attention_mask = _left_pad([encoded[i] for i in batch], pad_id)
            output = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **options
            )  # (B, T + new)
            new_tokens = output[:, input_ids.shape[1]:].tolist()  # (B, new)
            for i, tokens in zip(batch, new_tokens):
                results[i] = _through_eos(tokens, eos_ids)
            advance(len(batch))
    return results


def _encode(prompt: Prompt, tokenizer: Any, index: int) -> list[int]:
    """Token ids of a prompt; a chat-rendered prompt already holds its special tokens."""
    text = render_prompt(prompt, tokenizer)
    ids = tokenizer(text, add_special_tokens=isinstance(prompt, str))["input_ids"]
    if not ids:
        raise LearndynError(f"prompt {index} is empty: nothing to generate from")
    return list(ids)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS and the model's generation_config EOS ids."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if config_eos is not None:
        ids.extend(i for i in ([config_eos] if isinstance(config_eos, int) else config_eos) if i not in ids)
    if not ids:
        raise LearndynError("the tokenizer has no eos_token and the model's generation_config no eos_token_id")
    return ids


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding by hand: the tokenizer's padding side is never touched, so nothing to restore."""
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([[pad_id] * (width - len(row)) + row for row in rows])  # (B, T)
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])  # (B, T)
    return input_ids, attention_mask


def _through_eos(tokens: list[int], eos_ids: list[int]) -> list[int]:
    """Tokens through the first EOS, which is kept (what follows it in a batch is padding)."""
    for position, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[:position + 1]
    return tokens


def _until_eos(tokens: list[int], eos_ids: list[int]) -> list[int]:
    """Tokens before the first EOS (what follows it in a batch is padding)."""
    for position, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[:position]
    return tokens


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed torch for sampling inside the block only, restoring the caller's RNG state after."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
