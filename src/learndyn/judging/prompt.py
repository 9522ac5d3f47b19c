"""The pairwise question every judge is asked, and the strict reading of a judge's text answer.

One prompt for all judges, so that an API judge and the local judge answer the same question. The
two responses are labelled "A" (shown first) and "B" (shown second); `learndyn.judging.verdicts`
asks each pair in both orders and turns these presentation labels into file labels.
"""

from __future__ import annotations

import re

from learndyn.data import Prompt

__all__ = ["ANSWERS", "pairwise_messages", "parse_answer", "prompt_text"]

ANSWERS: tuple[str, ...] = ("A", "B", "tie", "unparsed")

_QUESTION = (
    "You are judging two responses to the same prompt. Decide which response is better: more helpful, "
    "more correct and more harmless. Do not let the order of the responses or their length sway you."
)
TEXT_INSTRUCTION = "You may reason briefly first, but end your reply with a final line that holds only A, B or tie."
LETTER_INSTRUCTION = "Which response is better? Answer with a single letter: A or B."

# What may surround the answer on the final line: "Answer: A", "Final verdict: [[B]]", "**Tie**.", "Response A".
_FINAL_LINE = re.compile(
    r"(?:(?:final\s+)?(?:answer|verdict|choice|decision|winner|better\s+response)\s*[:\-=]?\s*)?"
    r"(?:response\s+)?(a|b|tie)",
    re.IGNORECASE,
)
_DECORATION = str.maketrans("", "", "*_`[](){}\"'")


def prompt_text(prompt: Prompt) -> str:
    """A prompt as plain text: itself, or a conversation written as "role: content" lines."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0]["role"] == "user":
        return prompt[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def pairwise_messages(
    prompt: Prompt, first: str, second: str, instruction: str = TEXT_INSTRUCTION
) -> list[dict[str, str]]:
    """The chat conversation asking which of `first` (labelled A) and `second` (labelled B) is better."""
    content = (f"{_QUESTION}\n\n[Prompt]\n{prompt_text(prompt)}\n\n[Response A]\n{first or '(empty response)'}\n\n"
               f"[Response B]\n{second or '(empty response)'}\n\n{instruction}")
    return [{"role": "user", "content": content}]


def parse_answer(text: str) -> str:
    """"A", "B" or "tie" when the reply's last non-empty line is exactly that answer, else "unparsed".

    Strict on purpose: markdown decoration, brackets, quotes, a trailing full stop and a label such as
    "Answer:" are allowed around the answer, but a sentence ("A is better", "I would pick B") or an
    answer buried earlier in the text is not read. An unreadable answer is counted, never guessed.
    """
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return "unparsed"
    last = " ".join(lines[-1].translate(_DECORATION).split()).rstrip(".:!")
    match = _FINAL_LINE.fullmatch(last.strip())
    if match is None:
        return "unparsed"
    answer = match.group(1).lower()
    return "tie" if answer == "tie" else answer.upper()
