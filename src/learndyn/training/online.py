"""On-policy (online) DPO: pairs sampled from the current policy, ranked by a judge or a reward function.

Every optimizer step TRL's `OnlineDPOTrainer` samples two responses per prompt from the policy being
trained (at `temperature`, at most `max_new_tokens`), ranks each pair (the better response becomes
chosen, the other rejected) and takes a DPO step on those pairs against the frozen starting model.
The paper predicts that such negatives, sitting where the policy already puts its mass, squeeze far
less than off-policy ones. TRL ranks pairs with reward functions only, so the ranker is one of:

    reward   arithmetic, reward:MODEL or MODULE:FUNCTION, called exactly as TRL calls a reward function
             (see learndyn.rewards)
    judge    a pairwise `Judge` (any `make_judge` spec) turned into a reward function by `JudgeReward`

Tie rule, the same for both: the first sample wins. TRL keeps the first of two equal rewards, and
`JudgeReward` gives a tied or unparsed pair to the first sample. The two samples are drawn
independently from the same policy, so "the first" is a deterministic but fair coin; how often the
judge had to toss it is logged (`judge/ties`, `judge/unparsed`) and kept in `JudgeReward.tally`.

Nothing here imports torch or TRL until a trainer is built, so settings can be checked cheaply.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from learndyn.data import plain_text
from learndyn.errors import LearndynError
from learndyn.judging.judges import Judge, Judgment, make_judge
from learndyn.rewards import RewardFn, load_reward

__all__ = ["JudgeReward", "check_ranker", "load_reward", "make_ranker", "online_dpo_classes"]

_FLIP = {"A": "B", "B": "A", "tie": "tie", "unparsed": "unparsed"}


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
        texts = [plain_text(c) for c in completions]
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
