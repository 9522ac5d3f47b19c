"""The language model as the scorer and the explainer both run it: a body and a head, prompts run
once, responses continued on a copy of their prompt's KV cache.

`ModelSplit` cuts a causal LM into `body` (tokens -> hidden states, with the KV cache) and `head`
(states -> logits), so that the head runs only at the positions that predict a response token.
`left_padded` + `full_cache` + `continue_responses` are the prompt-cache continuation, written once:
scoring.py runs it under inference mode for the statistics, dynamics/sequences.py under jvp for the
explainer. Both are checked against whole-sequence forwards (tests/test_scoring.py,
tests/test_explain.py, tests/test_attention_variants.py across attention variants). `pack_runs`
cuts length-sorted items into batches that waste little compute on padding.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from learndyn.distributed import fsdp2_roots, is_fsdp2, owning_unit
from learndyn.models import eval_mode

__all__ = ["ModelSplit", "split_model", "can_pad_prompts", "left_padded", "full_cache", "padded",
           "response_positions", "continue_responses", "pack_runs"]


class ModelSplit:
    """The model as `body` (tokens -> states, with the KV cache) and `head` (states -> logits).

    When a model's logits are exactly its output embedding applied to the base model's hidden
    states (checked once on a few tokens), the body stops at the hidden states and the head runs
    chunk by chunk inside the statistics, so the (tokens, V) logits never exist all at once. Models
    that post-process logits (soft-capping, scaling) keep their own forward and an identity head.
    """

    def __init__(self, model: Any):
        self.model = model
        # the transformer under the LM head; a peft model's `base_model` is its LoraModel wrapper (whose
        # forward is the whole causal LM), so look through it to the backbone that carries the adapters
        self.backbone = (model.get_base_model().base_model if callable(getattr(model, "get_base_model", None))
                         else model.base_model)
        self.embedding = model.get_output_embeddings()
        self.calls = 0  # body calls so far: sharded scoring pads every rank to the same count
        # FSDP2: the body (`base_model`) is a part of the root unit, whose own parameters (embeddings,
        # final norm, the head) only the root's forward all-gathers; the fused route therefore holds
        # the root units unsharded while it scores (`hold`/`release`). A head that is a unit of its
        # own would all-gather at every chunk, a count that differs between ranks: such a model keeps
        # its own forward, whose hooks gather the head once per call.
        self.held: list[Any] = fsdp2_roots(model)
        self.sharded = bool(self.held)
        head_owner = owning_unit(model, self.embedding) if self.held and self.embedding is not None else None
        own_head = head_owner is not None and all(head_owner is not root for root in self.held)
        self.fused = self.embedding is not None and not own_head and self._head_is_plain()
        if not self.fused:  # the head runs inside the model's forward: nothing to hold (the check may have)
            self.release()
            self.held = []
        # recent transformers renamed `past_key_values` to `cache` and drop the old name in 5.40
        called = self.backbone if self.fused else model
        self.cache_name = "cache" if "cache" in inspect.signature(called.forward).parameters else "past_key_values"
        self._shares_cache: bool | None = None

    def shares_cache(self) -> bool:
        """Whether responses may continue from a copy of their prompt's KV cache; checked once, on two
        short prompts, against whole sequences. Models that keep a recurrent state beside or instead
        of keys and values (Mamba, Jamba, LFM2) fail it, and are scored a sequence at a time."""
        if self._shares_cache is None:
            prompts, owner, responses = [[1, 2, 3, 4], [4, 3, 2, 1]], [0, 1, 1], [[5, 6, 7], [7, 6], [5]]
            with torch.no_grad(), eval_mode(self.model):
                alone = torch.stack([self._logp(prompts[b] + r[:-1], r, len(prompts[b]) - 1)
                                     for b, r in zip(owner, responses)])
                try:
                    shared = self._logp_on_cache(prompts, owner, responses)
                except Exception:  # noqa: BLE001  the cache cannot be copied or continued: score sequences alone
                    shared = None
            rtol = max(1e-4, 16 * torch.finfo(self.model.dtype).eps)
            self._shares_cache = shared is not None and bool(((shared - alone).abs() <= rtol * alone.abs()).all())
        return self._shares_cache

    def _logp(self, fed: list[int], targets: list[int], first: int) -> torch.Tensor:
        """log π(targets) from one forward of the whole sequence (`first`: the position predicting target 0)."""
        states, _ = self.body(input_ids=torch.tensor([fed], device=self.model.device), use_cache=False)
        logits = self.head(states[0, first:]).float()  # (R, V)
        return logits.log_softmax(-1).gather(1, torch.tensor(targets, device=logits.device)[:, None]).sum()

    def _logp_on_cache(self, prompts: list[list[int]], owner: list[int], responses: list[list[int]]) -> torch.Tensor:
        device = self.model.device
        ids, mask, positions, lengths = left_padded(prompts, device)
        states, cache = self.body(input_ids=ids, attention_mask=mask, position_ids=positions, cache=full_cache(),
                                  use_cache=True)
        tokens, n = padded(responses, device)
        h = continue_responses(self, cache, states[:, -1], mask, lengths, torch.tensor(owner, device=device), tokens, n)
        logp = self.head(h).float().log_softmax(-1).gather(1, tokens[response_positions(n)][:, None])[:, 0]
        return torch.zeros(len(responses), dtype=logp.dtype, device=device).index_add_(
            0, torch.arange(len(responses), device=device).repeat_interleave(n), logp)

    def body(self, cache: Any = None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        """Run the model; `cache` is a KV cache to continue from, and the returned one to continue."""
        self.calls += 1
        if cache is not None:
            kwargs[self.cache_name] = cache
        if self.fused:
            self.hold()
        out = self.backbone(**kwargs) if self.fused else self.model(**kwargs)
        new_cache = out.get(self.cache_name) if kwargs.get("use_cache") else None
        return (out.last_hidden_state if self.fused else out.logits), new_cache

    def head(self, states: torch.Tensor) -> torch.Tensor:
        return self.embedding(states) if self.fused else states

    def idle(self) -> None:
        """A one-token body call whose result is dropped: a sharded rank with no work left joins the
        all-gathers of the others' calls with it."""
        self.body(input_ids=torch.zeros((1, 1), dtype=torch.long, device=self.model.device), use_cache=False)

    def hold(self) -> None:
        """All-gather the held FSDP2 units (a no-op when they are already whole). Every rank reaches
        it at the same body call, so the collective matches."""
        for unit in self.held:
            unit.unshard()

    def release(self) -> None:
        """Free the held units' gathered parameters (local, no collective); the next forward regathers."""
        for unit in self.held:
            unit.reshard()

    def _head_is_plain(self) -> bool:
        """Post-processing the config declares, or any difference beyond rounding, keeps the model's forward.

        Both are needed: a random or freshly initialised model has logits so small that soft-capping
        (c·tanh(z/c), Gemma-2) is the identity to 1e-5, yet shifts argmax_prob by 2e-5 relative.
        """
        config = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        for name, neutral in _LOGIT_POSTPROCESSING.items():
            if getattr(config, name, neutral) not in (neutral, None):
                return False
        ids = torch.tensor([[0, 1, 2, 3]], device=self.model.device)
        try:
            logits = self.model(input_ids=ids).logits  # first: a sharded root initialises on its own forward
            self.hold()
            hidden = self.backbone(input_ids=ids).last_hidden_state
        except Exception:  # an unusual architecture: keep its own forward
            return False
        fused = self.embedding(hidden)
        eps = torch.finfo(logits.dtype).eps
        return fused.shape == logits.shape and torch.allclose(fused.float(), logits.float(), rtol=8 * eps, atol=8 * eps)


# Config fields (and their do-nothing values) of transformers models that change logits after the LM head.
_LOGIT_POSTPROCESSING: dict[str, Any] = {
    "final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0, "output_multiplier": 1.0,
}


_SPLITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def split_model(model: Any) -> ModelSplit:
    """The model's `ModelSplit`, made once per model, and again once `fully_shard` has changed the
    model in place (a model scored before `accelerate` shards it must not keep its unsharded split)."""
    split = _SPLITS.get(model)
    if split is None or split.sharded != is_fsdp2(model):
        split = _SPLITS[model] = ModelSplit(model)
    return split


def can_pad_prompts(model: Any) -> bool:
    """Whether prompts of different lengths may share a batch (left-padded).

    A left pad slot's query sees no key. Eager attention takes its softmax in float32, where a
    float64 model's mask minimum becomes -inf and such a row NaN, which the pad slots' keys and
    values then spread to every real token. Such models get batches of equal-length prompts.
    """
    return not (model.dtype == torch.float64 and getattr(model.config, "_attn_implementation", None) == "eager")


def left_padded(prompts: Sequence[Sequence[int]], device: Any) -> tuple[torch.Tensor, ...]:
    """Prompts padded on the left: ids (B, P), mask (B, P), position ids (B, P) and lengths (B,).

    Left, because responses continue in the cache slots after the widest prompt: every prompt then
    ends where its responses begin, so no pad slot sits between a response and its prompt. Windowed
    attention (sliding windows, chunks) counts cache slots, not positions; right padding put pad
    slots inside a shorter prompt's window and scored it wrongly (tests/test_attention_variants.py).
    """
    lengths = torch.tensor([len(p) for p in prompts], device=device)  # (B,)
    width = int(lengths.max())
    ids = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p, device=device)
    pad = (width - lengths)[:, None]  # (B, 1)
    at = torch.arange(width, device=device)[None, :]  # (1, P)
    mask = (at >= pad).long()  # (B, P)
    positions = (at - pad).clamp_min(0)  # (B, P): real positions; pad slots (masked) take 0
    return ids, mask, positions, lengths


def full_cache(cache: Any = None, rows: torch.Tensor | None = None) -> Any:
    """An uncropped KV cache: empty, or `rows` of `cache` (each response gets its prompt's copy).

    Uncropped, because transformers' sliding-window and chunked cache layers keep only the last
    window of slots and count their length from what they were given: a copy made from such a layer
    would misplace the attention mask (relative errors of 1e-3 to 4e-2 on tiny models). A full
    cache lets the model's own mask functions apply the window, exactly as in one long forward.
    """
    from transformers import DynamicCache

    if cache is None:
        return DynamicCache()
    return DynamicCache([(layer.keys[rows], layer.values[rows]) for layer in cache.layers])


def pack_runs(lengths: Sequence[int], budget: int, max_waste: float = 0.1) -> list[tuple[int, int]]:
    """Cut ascending `lengths` into runs [start, stop) whose padded size fits `budget` tokens and is
    at most `max_waste` padding (a run always takes at least one item)."""
    runs: list[tuple[int, int]] = []
    start, real = 0, 0
    for i, length in enumerate(lengths):
        padded = (i - start + 1) * length  # ascending, so the newest item is the longest
        if i > start and (padded > budget or real + length < (1 - max_waste) * padded):
            runs.append((start, i))
            start, real = i, 0
        real += length
    if lengths:
        runs.append((start, len(lengths)))
    return runs


def padded(responses: Sequence[Sequence[int]], device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Responses right-padded with 0: ids (S, R) and lengths (S,)."""
    n = torch.tensor([len(r) for r in responses], device=device)
    tokens = torch.zeros((len(responses), int(n.max())), dtype=torch.long, device=device)
    for s, r in enumerate(responses):
        tokens[s, : len(r)] = torch.tensor(r, device=device)
    return tokens, n


def response_positions(n: torch.Tensor) -> torch.Tensor:
    """Mask (S, R) of the real positions of padded responses of lengths `n`; indexing a (S, R, ...)
    tensor with it gives response after response, the order `continue_responses` returns."""
    return torch.arange(int(n.max()), device=n.device)[None, :] < n[:, None]


def continue_responses(split: ModelSplit, cache: Any, last: torch.Tensor, prompt_mask: torch.Tensor,
                       prompt_lengths: torch.Tensor, owner: torch.Tensor, tokens: torch.Tensor,
                       n: torch.Tensor) -> torch.Tensor:
    """The states (Σn, D) that predict every response token, response after response.

    `cache`, `last` (B, D), `prompt_mask` and `prompt_lengths` come from one body call on the
    `left_padded` prompts; response s (ids `tokens[s, :n[s]]`, padded) belongs to prompt `owner[s]`.
    Its first token is predicted by its prompt's last state; the rest by one body call that feeds all
    but the last token on the response's own copy of its prompt's cache. Under jvp the cache carries
    the prompt's tangents, so values and tangents equal those of whole sequences.
    """
    h = last[owner][:, None]  # (S, 1, D)
    if tokens.shape[1] > 1:  # the last token is predicted, never fed
        at = torch.arange(tokens.shape[1] - 1, device=last.device)
        fed = (at[None, :] < (n - 1)[:, None]).long()  # (S, R-1)
        rest, _ = split.body(input_ids=tokens[:, :-1], attention_mask=torch.cat([prompt_mask[owner], fed], dim=1),
                             position_ids=prompt_lengths[owner][:, None] + at[None, :],
                             cache=full_cache(cache, owner), use_cache=True)  # (S, R-1, D)
        h = torch.cat([h, rest], dim=1)  # (S, R, D)
    return h[response_positions(n)]
