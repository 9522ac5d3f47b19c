"""Reward functions, for RL finetuning and for ranking samples: one resolver for every spec.

    arithmetic        the built-in task's exact-match reward (learndyn.arithmetic)
    reward:MODEL      a sequence-classification reward model (hub id or folder): its score of the
                      prompt followed by the completion, the usual RLHF reward model
    MODULE:FUNCTION   your function with TRL's reward signature, imported as Python imports it (the
                      current folder is searched last, so ./my_rewards.py is found)

TRL calls a reward function with keyword arguments `prompts`, `completions` (text, or chat messages
[{"role": "assistant", "content": ...}] for chat prompts), the dataset's other columns, and more
(completion_ids, trainer_state), and expects one number per completion, higher is better. Every
reward returned by `load_reward` is checked on each call: an exception inside it, a wrong count, a
value that is not a number, or NaN is one line naming the spec (`RewardError`).
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from learndyn.data import plain_text
from learndyn.errors import LearndynError, first_line

__all__ = ["RewardError", "RewardModel", "load_reward", "reward_model", "FORMS"]

RewardFn = Callable[..., list[float | None]]
FORMS = "arithmetic, reward:MODEL or MODULE:FUNCTION"
_SPEC = re.compile(r"([A-Za-z_][\w.]*):([A-Za-z_][\w.]*)")


class RewardError(LearndynError):
    """A reward function that failed or returned something unusable."""


def load_reward(spec: str, *, device: str | None = None) -> RewardFn:
    """The reward named by `spec` (module docstring), checked on every call."""
    if spec == "arithmetic":
        from learndyn.arithmetic import reward

        return _checked(reward, spec)
    if (spec or "").startswith("reward:"):
        return _checked(reward_model(spec.removeprefix("reward:"), device), spec)
    return _checked(_import(spec), spec)


def _import(spec: str) -> RewardFn:
    match = _SPEC.fullmatch(spec or "")
    if match is None:
        raise LearndynError(f"--reward {spec}: expected {FORMS}, e.g. my_rewards:brevity")
    module_name, path = match.groups()
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())  # last: a file here must not shadow an installed package
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as err:  # the user's module may fail in any way while importing
        raise LearndynError(f"--reward {spec}: cannot import {module_name} "
                            f"({type(err).__name__}: {first_line(err)})") from None
    for part in path.split("."):
        if not hasattr(target, part):
            raise LearndynError(f"--reward {spec}: {module_name} has no attribute {path}")
        target = getattr(target, part)
    if not callable(target):
        raise LearndynError(f"--reward {spec}: {module_name}.{path} is a {type(target).__name__}, not a function")
    return target


def _checked(function: RewardFn, spec: str) -> RewardFn:
    """`function`, made to fail with one clear line when it raises or returns something unusable."""

    @functools.wraps(function)
    def reward(*, prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
        try:
            values = function(prompts=prompts, completions=completions, **kwargs)
        except LearndynError:
            raise
        except Exception as err:  # the user's code may fail in any way
            raise RewardError(f"--reward {spec} raised {type(err).__name__}: {first_line(err)}") from None
        try:
            values = [None if v is None else float(v) for v in values]
        except (TypeError, ValueError):
            raise RewardError(f"--reward {spec}: must return a list of numbers, got {type(values).__name__}") from None
        if len(values) != len(completions):
            raise RewardError(f"--reward {spec}: returned {len(values)} rewards for {len(completions)} completions")
        bad = next((i for i, v in enumerate(values) if v is not None and not math.isfinite(v)), None)
        if bad is not None:
            raise RewardError(f"--reward {spec}: reward {values[bad]} for completion {bad}; rewards must be finite")
        return values

    return reward


@functools.lru_cache(maxsize=4)
def reward_model(name: str, device: str | None = None) -> RewardModel:
    """The reward model `name`, loaded once per process (checking a setting and training both use it)."""
    return RewardModel(name, device=device)


class RewardModel:
    """A sequence-classification reward model as a reward function: the score (its single logit) of
    the prompt followed by the completion, rendered by the model's chat template when the prompt is a
    conversation. Texts are scored in batches; the model is refused unless its head is a
    sequence classifier with one output (a causal LM would silently get a random head)."""

    def __init__(self, name: str, *, device: str | None = None, batch_size: int = 8, max_tokens: int = 1024):
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        from learndyn.models import pick_device

        self.name, self.batch_size, self.max_tokens = name, batch_size, max_tokens
        self.__name__ = f"reward:{name}"  # the name TRL logs for a reward function
        try:
            config = AutoConfig.from_pretrained(name)
        except Exception as err:  # noqa: BLE001  a missing folder, an unknown hub id, no network
            raise LearndynError(f"reward:{name}: cannot load its config ({first_line(err)})") from None
        heads = [a for a in (config.architectures or []) if a.endswith("ForSequenceClassification")]
        if not heads:
            kind = ", ".join(config.architectures or []) or config.model_type
            raise LearndynError(f"reward:{name} is a {kind}, not a sequence classifier: a reward model has a "
                                "...ForSequenceClassification head with one output")
        if config.num_labels != 1:
            raise LearndynError(f"reward:{name} has {config.num_labels} outputs; a reward model has one score")
        self.tokenizer = AutoTokenizer.from_pretrained(name)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(name).to(pick_device(device)).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def text(self, prompt: Any, completion: Any) -> str:
        """The conversation the reward model reads."""
        answer = plain_text(completion)
        if isinstance(prompt, str):
            return prompt + answer
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": answer}],
                                                      tokenize=False)
        return "\n".join(m["content"] for m in prompt) + "\n" + answer

    def scores(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[float]:
        import torch

        texts = [self.text(p, c) for p, c in zip(prompts, completions)]
        out: list[float] = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                       truncation=True, max_length=self.max_tokens, add_special_tokens=False)
                logits = self.model(**batch.to(self.model.device)).logits  # (B, 1)
                out += logits[:, 0].float().tolist()
        return out

    def __call__(self, *, prompts: list, completions: list, **kwargs: Any) -> list[float]:
        return self.scores(prompts, completions)
