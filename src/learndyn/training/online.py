"""On-policy (online) DPO: pairs sampled from the current policy, ranked by a judge or a reward function.

Every optimizer step TRL's `OnlineDPOTrainer` samples two responses per prompt from the policy being
trained (at `temperature`, at most `max_new_tokens`), ranks each pair (the better response becomes
chosen, the other rejected) and takes a DPO step on those pairs against the frozen starting model.
The paper predicts that such negatives, sitting where the policy already puts its mass, squeeze far
less than off-policy ones. TRL ranks pairs with reward functions only, so the ranker is one of:

    reward   "MODULE:FUNCTION", a reward function called exactly as TRL calls one (see `load_reward`)
    judge    a pairwise `Judge` (any `make_judge` spec) turned into a reward function by `JudgeReward`

Tie rule, the same for both: the first sample wins. TRL keeps the first of two equal rewards, and
`JudgeReward` gives a tied or unparsed pair to the first sample. The two samples are drawn
independently from the same policy, so "the first" is a deterministic but fair coin; how often the
judge had to toss it is logged (`judge/ties`, `judge/unparsed`) and kept in `JudgeReward.tally`.

Nothing here imports torch or TRL until a trainer is built, so settings can be checked cheaply.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from learndyn.errors import LearndynError, first_line
from learndyn.judging.judges import Judge, Judgment, make_judge

__all__ = ["JudgeReward", "check_ranker", "load_reward", "make_ranker", "online_dpo_classes"]

RewardFn = Callable[..., list[float | None]]
_SPEC = re.compile(r"([A-Za-z_][\w.]*):([A-Za-z_][\w.]*)")
_FLIP = {"A": "B", "B": "A", "tie": "tie", "unparsed": "unparsed"}


def load_reward(spec: str) -> RewardFn:
    """The reward function named by "MODULE:FUNCTION", checked on every call.

    MODULE is imported as Python imports it, with the current directory searched last, so that
    `--reward my_rewards:brevity` finds ./my_rewards.py. TRL calls the function once per step with
    keyword arguments (accept **kwargs: TRL may add more):

        prompts        2B prompts, the batch twice: [p1 .. pB, p1 .. pB] (text, or chat messages)
        completions    2B samples in the same layout: every prompt's first sample, then every second
                       one (text, or [{"role": "assistant", "content": TEXT}] for chat prompts)
        completion_ids the sampled token ids; trainer_state, the transformers TrainerState

    and it returns 2B numbers, higher is better (None counts as 0). Per prompt, the sample with the
    higher reward becomes chosen; equal rewards keep the first sample.
    """
    match = _SPEC.fullmatch(spec or "")
    if match is None:
        raise LearndynError(f"--reward {spec}: expected MODULE:FUNCTION, e.g. my_rewards:brevity")
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
    return _checked(target, spec)


def _checked(function: RewardFn, spec: str) -> RewardFn:
    """The user's function, made to fail with one clear line when it returns the wrong thing."""

    @functools.wraps(function)
    def reward(*, prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
        values = function(prompts=prompts, completions=completions, **kwargs)
        try:
            values = [None if v is None else float(v) for v in values]
        except (TypeError, ValueError):
            raise LearndynError(f"--reward {spec}: must return a list of numbers, "
                                f"got {type(values).__name__}") from None
        if len(values) != len(completions):
            raise LearndynError(f"--reward {spec}: returned {len(values)} rewards for {len(completions)} completions")
        return values

    return reward


class JudgeReward:
    """A pairwise `Judge` as a TRL reward function: each prompt's two samples are judged in both
    orders (to cancel position bias), the orders combined by the judge's own `combine`, and the
    winner gets reward 1, the loser 0. Tied and unparsed pairs go to the first sample (reward 1, 0).

    `tally` counts, over the run: pairs, first (first sample won), second, ties, unparsed.
    """

    def __init__(self, judge: Judge):
        self.judge = judge
        self.__name__ = f"judge:{judge.spec}"  # the name TRL reports for this reward function
        self.tally = dict.fromkeys(("pairs", "first", "second", "ties", "unparsed"), 0)

    def __call__(self, *, prompts: list, completions: list, **kwargs: Any) -> list[float]:
        n = len(completions) // 2  # TRL's layout: every prompt's first sample, then every second one
        texts = [_text(c) for c in completions]
        won = self.winners(prompts[:n], texts[:n], texts[n:])
        return [1.0 - w for w in won] + [float(w) for w in won]

    def winners(self, prompts: Sequence[Any], firsts: Sequence[str], seconds: Sequence[str]) -> list[int]:
        """For each (prompt, first, second): 0 if the first response wins or the pair is tied or
        unparsed, 1 if the second wins. Both orders of every pair go to the judge in one call."""
        items = []
        for prompt, first, second in zip(prompts, firsts, seconds, strict=True):
            items += [(prompt, first, second), (prompt, second, first)]
        judged = self.judge.judge(items)
        result = []
        for ab, ba in zip(judged[0::2], judged[1::2]):
            verdict = self.judge.combine(ab, _relative_to_first(ba))
            result.append(1 if verdict == "B" else 0)
            self.tally[{"A": "first", "B": "second", "tie": "ties"}.get(verdict, "unparsed")] += 1
        self.tally["pairs"] += len(result)
        return result

    def log_values(self) -> dict[str, float]:
        """The tally so far, as training-log entries."""
        return {f"judge/{name}": float(count) for name, count in self.tally.items()}


def _relative_to_first(ba: Judgment) -> Judgment:
    """The order that showed the first sample second, re-read so that "A" means the first sample."""
    return replace(ba, verdict=_FLIP[ba.verdict], score=None if ba.score is None else -ba.score)


def _text(completion: Any) -> str:
    """A completion as text: TRL hands chat completions over as [{"role": "assistant", "content": ...}]."""
    if isinstance(completion, str):
        return completion
    return "".join(str(message.get("content") or "") for message in completion)


def check_ranker(judge: str, reward: str | None, **judge_options: Any) -> None:
    """Fail now, with one line, on a reward spec that does not load or a judge spec `make_judge` refuses
    (with `judge_options`, e.g. an openai judge's base_url and api_key_env: a missing key fails here)."""
    if reward is not None:
        load_reward(reward)
    else:
        make_judge(judge, **judge_options)


def make_ranker(settings: Any) -> RewardFn:
    """The reward function that ranks on-policy pairs: the user's, else the judge wrapped."""
    if settings.reward is not None:
        return load_reward(settings.reward)
    return JudgeReward(make_judge(settings.judge, device=settings.device, **settings.judge_options()))


@functools.cache
def online_dpo_classes() -> tuple[type, type]:
    """TRL's `OnlineDPOConfig`, and its `OnlineDPOTrainer` extended to log the judge's tally.

    TRL prints a notice on every import of its experimental package; users of this recipe chose it
    knowingly, so it is silenced here rather than shown on each run.
    """
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="You are importing from 'trl.experimental'")
            from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
    except ImportError as err:
        import trl

        raise LearndynError(f"on-policy DPO needs TRL's experimental OnlineDPOTrainer, which trl {trl.__version__} "
                            f"lacks ({err})") from None

    class OnPolicyDPOTrainer(OnlineDPOTrainer):
        """Adds `judge/*` counts to every training log, so report_to integrations show them, and keeps
        a transformers deprecation notice that TRL triggers at every sampling step off the console."""

        def training_step(self, *args: Any, **kwargs: Any) -> Any:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                        category=FutureWarning)
                return super().training_step(*args, **kwargs)

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if "loss" in logs:
                for reward in self.reward_funcs:
                    if isinstance(reward, JudgeReward):
                        logs.update(reward.log_values())
            super().log(logs, start_time)

    return OnlineDPOConfig, OnPolicyDPOTrainer
