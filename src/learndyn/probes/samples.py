"""The model's own samples, split by a reward: the probe types `sample_rewarded` and `sample_unrewarded`.

RL finetuning (GRPO with a verifiable reward) learns from the model's own samples: it pushes up the
ones the reward scores above their group's mean and pushes down the rest. Tracking one of each per
prompt shows that directly. For every prompt, `SampleSettings.samples` (K) responses are drawn at
`temperature` (plain temperature sampling, as GRPO does) and scored by the reward with TRL's
signature, `reward(prompts=..., completions=..., example_id=..., **columns)`: the prompt repeated K
times, completions as text (as chat messages [{"role": "assistant", ...}] for chat prompts), and the
data's other columns (a task's `answer`, ...) as lists, so a reward that works in GRPO works here.

`sample_rewarded` is a sample with the highest reward and `sample_unrewarded` one with the lowest,
set only when the highest exceeds the lowest: a prompt whose samples all scored the same gets neither
(no probe of that type; GRPO learns nothing from such a group either). Empty samples and samples the
reward returned None for cannot be probes and take no part in the choice.

Each prompt is sampled in its own seeded batch of K (seed from the build's seed and the example id),
so a row depends only on the seed, the prompt, the model and these settings: a resumed build samples
its remaining rows exactly as a full build would, and never resamples the finished ones.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from learndyn.errors import LearndynError
from learndyn.probes.files import Probe
from learndyn.progress import progress
from learndyn.rewards import RewardFn
from learndyn.settings import setting

__all__ = ["SampleSettings", "SamplingStopped", "add_reward_samples", "sample_seed"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleSettings:
    """How the model's own samples are drawn for `--reward` (their length is the greedy length)."""

    samples: int = setting(4, "Samples per prompt drawn from the model and scored by --reward")
    temperature: float = setting(1.0, "Temperature of those samples")

    def __post_init__(self) -> None:
        if self.samples < 2:
            raise LearndynError(f"samples must be at least 2 (one rewarded, one not), got {self.samples}")
        if not self.temperature > 0:
            raise LearndynError(f"temperature must be positive, got {self.temperature}")


class SamplingStopped(LearndynError):
    """The reward failed on `todo[finished]`; the probes before it are complete."""

    def __init__(self, message: str, finished: int):
        super().__init__(message)
        self.finished = finished


def sample_seed(seed: int, example_id: str) -> int:
    """The sampling seed of one prompt: fixed by the build's seed and the example, nothing else."""
    return random.Random(f"{seed}/{example_id}/samples").randrange(2**63)


def add_reward_samples(
    todo: Sequence[Probe],
    columns: dict[str, dict[str, Any]],
    model: Any,
    tokenizer: Any,
    reward: RewardFn,
    settings: SampleSettings,
    *,
    seed: int = 0,
    max_new_tokens: int = 64,
) -> int:
    """Add `sample_rewarded`/`sample_unrewarded` to each probe of `todo`, in order (module docstring),
    and return how many prompts had no reward variance (also logged as a warning: they get neither).

    `columns` maps an example id to its data columns, handed to the reward. A reward that fails (a
    LearndynError, e.g. RewardError) raises `SamplingStopped`, which says how many probes were done.
    """
    flat = 0
    with progress("Sampling and rewarding", len(todo)) as advance:
        for index, probe in enumerate(todo):
            texts = _draw(probe, model, tokenizer, settings, seed, max_new_tokens)
            try:
                values = reward(**_reward_inputs(probe, texts, columns.get(probe.example_id, {})))
            except LearndynError as err:
                raise SamplingStopped(str(err), index) from None
            flat += not _split(probe, texts, values)
            advance(1)
    if flat:
        log.warning(f"{flat} of {len(todo)} prompts had no reward variance among their {settings.samples} "
                    "samples: they get no sample_rewarded/sample_unrewarded")
    return flat


def _draw(probe: Probe, model: Any, tokenizer: Any, settings: SampleSettings, seed: int,
          max_new_tokens: int) -> list[str]:
    """K samples of one prompt in one seeded batch (so they do not depend on other prompts)."""
    from learndyn.generation import generate

    return generate(model, tokenizer, [probe.prompt] * settings.samples, max_new_tokens=max_new_tokens,
                    batch_size=settings.samples, do_sample=True, temperature=settings.temperature,
                    seed=sample_seed(seed, probe.example_id), progress=None)


def _reward_inputs(probe: Probe, texts: list[str], columns: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments TRL would pass for one prompt's group of samples."""
    k = len(texts)
    completions: list = texts if isinstance(probe.prompt, str) else [[{"role": "assistant", "content": t}]
                                                                     for t in texts]
    return {"prompts": [probe.prompt] * k, "completions": completions, "example_id": [probe.example_id] * k,
            **{name: [value] * k for name, value in columns.items()}}


def _split(probe: Probe, texts: list[str], values: list[float | None]) -> bool:
    """Set the highest- and lowest-rewarded non-empty samples when their rewards differ; say if they did."""
    scored = [(value, text) for text, value in zip(texts, values) if text.strip() and value is not None]
    if not scored or max(v for v, _ in scored) == min(v for v, _ in scored):
        return False
    probe.responses["sample_rewarded"] = max(scored, key=lambda pair: pair[0])[1]  # the first of equals
    probe.responses["sample_unrewarded"] = min(scored, key=lambda pair: pair[0])[1]
    return True
