"""Preference data: loading many formats into one record type, and rendering prompts."""

from __future__ import annotations

from typing import Any

from learndyn.errors import LearndynError

Messages = list[dict[str, str]]
Prompt = str | Messages


def render_prompt(prompt: Prompt, tokenizer: Any) -> str:
    """Turn a prompt into the exact text the model sees.

    Plain text is used as written (e.g. HH transcripts ending in "\\n\\nAssistant:"); a conversation
    goes through the tokenizer's chat template with the generation prompt appended, so the response
    that follows is what the assistant would say next.
    """
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise LearndynError(
            "the prompt is a conversation but the tokenizer has no chat template; "
            "give plain-text prompts or a chat model"
        )
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
