"""GRPO's update batch: groups of completions of one prompt, their rewards, advantages and tokens.

A `Group` is one prompt with the completions sampled for it and their rewards (None: unscorable,
every reward function returned None). The advantages are TRL's (GRPOTrainer,
`_generate_and_score_completions`, one reward function, multi_objective_aggregation
"sum_then_normalize"), with r_i a completion's reward and g its group:

    A_i = (r_i − mean_g(r)) / (std(r) + 1e-4)        std: nanstd_g(r) for scale "group",
                                                          nanstd over the whole batch for "batch";
    A_i =  r_i − mean_g(r)                            for scale "none"
nanstd is the unbiased (n − 1) standard deviation ignoring NaN; a group of one completion has std 0
(TRL's eval case); unscorable completions are left out of mean and std and get A = 0. A group whose
rewards do not vary (std ≈ 0) has A = 0 for every completion: it gives no policy gradient, and
`advantages` counts such groups. Computed in float64 (TRL: float32), so values agree to ~1e-7.

Tokens follow TRL's layout: the prompt as `_tokenize_prompts` renders it (a conversation through the
chat template with the generation prompt; plain text tokenized as is), then the completion's tokens.
A sampled completion keeps the ids the model produced (`completion_ids`): through the EOS it stopped
on, which TRL's completion mask keeps, or without EOS when cut at max_completion_length. A completion
given as text is tokenized and EOS appended, as a sample that stopped there; one longer than
max_completion_length is refused, as TRL could not have sampled it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from learndyn.data import Prompt, plain_text, render_prompt
from learndyn.dynamics.sequences import Sequences
from learndyn.errors import LearndynError
from learndyn.losses import SCALE_REWARDS

__all__ = ["Group", "advantages", "encode_groups", "completion_key"]


@dataclass(frozen=True)
class Group:
    """One prompt, the completions sampled for it (texts) and their rewards (None: unscorable)."""

    example_id: str
    prompt: Prompt
    completions: tuple[str, ...]
    rewards: tuple[float | None, ...]
    completion_ids: tuple[tuple[int, ...], ...] | None = None  # as sampled (through EOS); None: from the texts

    def __post_init__(self) -> None:
        if not self.completions:
            raise LearndynError(f"update example '{self.example_id}' has no completions")
        if len(self.rewards) != len(self.completions):
            raise LearndynError(f"update example '{self.example_id}' has {len(self.completions)} completions but "
                                f"{len(self.rewards)} rewards; give one reward per completion")
        bad = next((r for r in self.rewards if r is not None and not math.isfinite(r)), None)
        if bad is not None:
            raise LearndynError(f"update example '{self.example_id}': reward {bad} is not a finite number")


def completion_key(j: int) -> str:
    """The name of a group's j-th completion in the update's sequence keys (summary.json, group.jsonl)."""
    return f"completion_{j}"


def advantages(groups: Sequence[Group], scale: str = "group") -> tuple[Tensor, dict]:
    """TRL's advantage of every completion, groups one after the other (S,), and what to report:
    each group's reward mean and std, and how many groups had no reward variance."""
    if scale not in SCALE_REWARDS:
        raise LearndynError(f"unknown scale_rewards '{scale}'; valid: {', '.join(SCALE_REWARDS)}")
    rewards = [torch.tensor([math.nan if r is None else r for r in g.rewards], dtype=torch.float64) for g in groups]
    means = [torch.nanmean(r) for r in rewards]
    stds = [nanstd(r) if len(r) > 1 else torch.zeros((), dtype=torch.float64) for r in rewards]
    flat = torch.cat(rewards)  # (S,)
    centred = torch.cat([r - m for r, m in zip(rewards, means)])
    if scale == "group":
        divisor = torch.cat([s.expand(len(r)) for s, r in zip(stds, rewards)])
        adv = centred / (divisor + 1e-4)
    elif scale == "batch":
        adv = centred / ((nanstd(flat) if len(flat) > 1 else torch.zeros(())) + 1e-4)
    else:
        adv = centred
    flat_zero = [bool(torch.isclose(s, torch.zeros_like(s))) or bool(s.isnan()) for s in stds]
    info = {"scale_rewards": scale, "zero_variance_groups": sum(flat_zero),
            "groups": [{"example_id": g.example_id, "reward_mean": _number(m), "reward_std": _number(s),
                        "zero_variance": z} for g, m, s, z in zip(groups, means, stds, flat_zero)]}
    return torch.nan_to_num(adv, nan=0.0), info


def nanstd(x: Tensor) -> Tensor:
    """TRL's `nanstd`: the unbiased standard deviation over the non-NaN entries (NaN below two)."""
    mean = torch.nanmean(x)
    count = (~x.isnan()).sum()
    variance = torch.nanmean((x - mean) ** 2) * (count / (count - 1) if count > 1 else math.nan)
    return variance.sqrt()


def encode_groups(groups: Sequence[Group], tokenizer: object, *, max_length: int | None,
                  max_completion_length: int | None) -> Sequences:
    """Every completion of every group as one sequence, in group order, keyed (example_id,
    completion_j); `max_length` is the model's context, `max_completion_length` TRL's (EOS not counted)."""
    if not groups:
        raise LearndynError("the update batch is empty")
    seqs = Sequences([], [], [])
    if tokenizer.eos_token_id is None:
        raise LearndynError("the tokenizer has no eos_token: a GRPO completion ends with it")
    for group in groups:
        prompt = render_prompt(group.prompt, tokenizer)
        prompt_ids = tokenizer(prompt, add_special_tokens=isinstance(group.prompt, str))["input_ids"]
        for j, text in enumerate(group.completions):
            where = f"update example '{group.example_id}' ({completion_key(j)})"
            ids = prompt_ids + (list(group.completion_ids[j]) if group.completion_ids is not None
                                else _text_tokens(text, tokenizer, max_completion_length, where))
            if len(ids) == len(prompt_ids):
                raise LearndynError(f"{where} has no tokens to train on")
            if max_length is not None and len(ids) > max_length:
                raise LearndynError(f"{where} is {len(ids)} tokens, longer than the model's context of {max_length}")
            seqs.ids.append(ids)
            seqs.starts.append(len(prompt_ids))
            seqs.keys.append((group.example_id, completion_key(j)))
    return seqs


def _text_tokens(text: str, tokenizer: object, max_completion_length: int | None, where: str) -> list[int]:
    """A completion given as text: its tokens and EOS, as a sample that stopped there."""
    body = tokenizer(plain_text(text), add_special_tokens=False)["input_ids"]
    if max_completion_length is not None and len(body) > max_completion_length:
        raise LearndynError(f"{where} is {len(body)} tokens, more than max_completion_length "
                            f"{max_completion_length} (--max-new-tokens), which TRL cuts completions at")
    return body + [tokenizer.eos_token_id]


def _number(x: Tensor) -> float | None:
    value = float(x)
    return None if math.isnan(value) else value
