"""A verifiable task that runs offline: seeded arithmetic questions and an exact-match reward.

RL finetuning (GRPO and its kin) needs prompts whose answers a program can check and a model that
solves some of them, so that the rewards of a group of samples vary. `questions(n, seed)` makes
chat prompts such as "What is 23 + 58? Reply with the number only." with their answers; `reward`
has TRL's reward-function signature and scores a completion 1.0 when the last number in it equals
the answer, else 0.0. Everything is generated here from the seed: no data is downloaded or copied.

Each question is a `Preference` so that probes, training and scoring read it like any other data:
chosen is the correct answer in the requested form, rejected a plausible wrong one (off by a small
amount, or the result of the wrong operation), `extras["chosen_semantic"]` the correct answer reworded
("The answer is 42.", one of a few wordings, all ending in the answer so the reward scores it 1.0),
and the answer itself is kept in `columns["answer"]`, which TRL hands to the reward function. As a
data source, `arithmetic[0:64]` names the first 64.

The built-in model solves some, not all: on `questions(48, seed=0)`, SmolLM2-135M-Instruct answered
33% greedily (24 new tokens) and 14% of samples at temperature 1, and 9 of 16 prompts had reward
variance within a group of 4 samples (measured 2026-12-03; operands up to 50 gave 23%, 8% and 4 of 16).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any

from learndyn.data import Preference, plain_text

__all__ = ["questions", "reward", "final_number", "TASK_SIZE"]

TASK_SIZE = 2048  # questions per split of the `arithmetic` data source (learndyn.data)

OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
INSTRUCTION = "Reply with the number only."
# The correct answer in other words (chosen_semantic); the answer is the last number in each.
REWORDINGS = ("The answer is {answer}.", "{a} {op} {b} = {answer}.", "It comes to {answer}.",
              "That makes {answer}.")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def questions(n: int, seed: int = 0, *, largest: int = 20) -> list[Preference]:
    """`n` questions on operands up to `largest` (products on operands up to 12), each a chat prompt."""
    rng = random.Random(f"arithmetic/{seed}")
    wording = random.Random(f"arithmetic/{seed}/wording")  # its own stream: the questions stay as they were
    rows = []
    for i in range(n):
        op = rng.choice(list(OPERATIONS))
        top = 12 if op == "*" else largest
        a, b = rng.randint(2, top), rng.randint(2, top)
        if op == "-" and b > a:
            a, b = b, a
        answer = OPERATIONS[op](a, b)
        prompt = [{"role": "user", "content": f"What is {a} {op} {b}? {INSTRUCTION}"}]
        reworded = wording.choice(REWORDINGS).format(a=a, op=op, b=b, answer=answer)
        rows.append(Preference(f"arith-{seed}-{i:05d}", prompt, str(answer), str(_wrong(rng, op, a, b, answer)),
                               extras={"chosen_semantic": reworded}, columns={"answer": str(answer)}))
    return rows


def _wrong(rng: random.Random, op: str, a: int, b: int, answer: int) -> int:
    """A plausible wrong answer: the other operation's result, or off by one to ten."""
    other = OPERATIONS["+" if op != "+" else "-"](a, b)
    if other != answer and rng.random() < 0.5:
        return other
    return answer + rng.choice([-1, 1]) * rng.randint(1, 10)


def final_number(text: str) -> float | None:
    """The last number written in `text` (commas as thousands separators allowed), or None."""
    found = _NUMBER.findall(text or "")
    return float(found[-1].replace(",", "")) if found else None


def reward(prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[str] | None = None,
           **kwargs: Any) -> list[float]:
    """TRL's reward signature: 1.0 where the completion's last number equals the answer, else 0.0.

    `answer` is the dataset column TRL passes along; without it the answer is worked out from the
    question in the prompt. Completions may be text or chat messages (the assistant's content)."""
    if answer is None:
        answer = [str(_solve(plain_text(p))) for p in prompts]
    scores = []
    for completion, expected in zip(completions, answer):
        got = final_number(plain_text(completion))
        scores.append(1.0 if got is not None and got == float(expected) else 0.0)
    return scores


def _solve(question: str) -> int | None:
    match = re.search(r"What is (\d+) ([+*-]) (\d+)\?", question)
    if match is None:
        return None
    a, op, b = match.groups()
    return OPERATIONS[op](int(a), int(b))
