"""Rephrase backends: make the `*_semantic` and `*_format` probes from chosen/rejected responses.

The paper asked GPT for two rewrites of each response: same meaning in other words (semantic), and
same format, sentence structure and length about something else (format). A rephraser is any callable
`(texts, style) -> texts`; the backends here are registered by name in `REPHRASERS`:
  none    no rephrasing (rephrase probes come from data columns or are skipped)
  local   a local chat model through `learndyn.generation.generate` (greedy)
  openai  any OpenAI-compatible `/chat/completions` endpoint, standard library only
An empty rewrite comes back as "" and the probe builder skips it.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from learndyn.errors import LearndynError
from learndyn.openai_chat import DEFAULT_API_KEY_ENV, ChatClient

Rephraser = Callable[[list[str], str], list[str]]

STYLES: tuple[str, ...] = ("semantic", "format")
_INSTRUCTIONS: dict[str, str] = {
    "semantic": (
        "Rewrite the following text so that it keeps exactly the same meaning but uses different words "
        "and phrasing."
    ),
    "format": (
        "Rewrite the following text so that it keeps the same format, sentence structure and length but "
        "changes the meaning: a different subject with different facts (for example, an answer about a "
        "horseshoe becomes an answer about a fishhook)."
    ),
}
_PREFIX = re.compile(
    r"^(?:here is |here's )?(?:the |your )?(?:(?:rewritten|rephrased|new)(?: text| version)?|text|version)\s*:\s*",
    re.IGNORECASE,
)
_QUOTES = {'"': '"', "'": "'", "“": "”", "‘": "’", "`": "`", "«": "»"}


def rephrase_messages(text: str, style: str) -> list[dict[str, str]]:
    """The chat conversation that asks a model for one rewrite of `text` in `style`."""
    check_style(style)
    content = f"{_INSTRUCTIONS[style]} Reply with the rewritten text only.\n\nText: {text}"
    return [{"role": "user", "content": content}]


def check_style(style: str) -> str:
    if style not in STYLES:
        raise LearndynError(f"unknown rephrase style '{style}'; valid: {', '.join(STYLES)}")
    return style


def clean_rewrite(text: str) -> str:
    """Strip what chat models wrap around a rewrite: "Rewritten text:" prefixes and enclosing quotes."""
    text = text.strip()
    while True:
        before = text
        text = _PREFIX.sub("", text, count=1).strip()
        close = _QUOTES.get(text[:1])
        if len(text) >= 2 and text[-1] == close and text[0] not in text[1:-1] and close not in text[1:-1]:
            text = text[1:-1].strip()
        if text == before:
            return text


class LocalRephraser:
    """Rewrites with a local chat model, greedily, batched through `generate`."""

    def __init__(self, model: Any, tokenizer: Any, max_new_tokens: int = 96, batch_size: int = 8):
        if not getattr(tokenizer, "chat_template", None):
            raise LearndynError("the local rephraser needs a chat model: the tokenizer has no chat_template")
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    def __call__(self, texts: list[str], style: str) -> list[str]:
        from learndyn.generation import generate

        conversations = [rephrase_messages(text, style) for text in texts]
        outputs = generate(self.model, self.tokenizer, conversations, max_new_tokens=self.max_new_tokens,
                           batch_size=self.batch_size, do_sample=False, progress=None)
        return [clean_rewrite(out) for out in outputs]

    def __repr__(self) -> str:
        name = getattr(getattr(self.model, "config", None), "name_or_path", "") or type(self.model).__name__
        return f"LocalRephraser(model={name!r}, max_new_tokens={self.max_new_tokens}, batch_size={self.batch_size})"


class OpenAIRephraser:
    """Rewrites through an OpenAI-compatible `{base_url}/chat/completions` endpoint, one request per text.

    The HTTP side is `learndyn.openai_chat.ChatClient`: connection errors, timeouts, HTTP 408/429 and
    5xx are retried `max_retries` times with exponential back-off (`backoff`, 2·backoff, 4·backoff ...
    seconds, or the server's Retry-After when longer); `rate_limit` caps requests per second. The API
    key is read from the environment variable `api_key_env` and never shown: not in errors, not in the
    repr. `require_key=False` allows a keyless local server. `workers` requests run at once.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = DEFAULT_API_KEY_ENV,
        timeout: float = 60,
        max_retries: int = 3,
        backoff: float = 1.0,
        *,
        require_key: bool = True,
        temperature: float | None = None,
        workers: int = 4,
        rate_limit: float | None = None,
    ):
        if workers < 1:
            raise LearndynError("rephraser: need max_retries >= 0, workers >= 1, timeout > 0, backoff >= 0")
        self.client = ChatClient(base_url, model, api_key_env, timeout, max_retries, backoff,
                                 require_key=require_key, rate_limit=rate_limit, what="rephraser")
        self.temperature = temperature
        self.workers = workers

    def __repr__(self) -> str:
        client = self.client
        key = "set" if client.has_key else "unset"
        return (f"OpenAIRephraser(url={client.url!r}, model={client.model!r}, "
                f"api_key_env={client.api_key_env!r} ({key}), max_retries={client.max_retries})")

    def __call__(self, texts: list[str], style: str) -> list[str]:
        check_style(style)
        if self.workers == 1 or len(texts) <= 1:
            return [self.rephrase_one(text, style) for text in texts]
        with ThreadPoolExecutor(max_workers=min(self.workers, len(texts))) as pool:
            futures = [pool.submit(self.rephrase_one, text, style) for text in texts]
            try:
                return [future.result() for future in futures]
            except BaseException:
                for future in futures:
                    future.cancel()
                raise

    def rephrase_one(self, text: str, style: str) -> str:
        params = {} if self.temperature is None else {"temperature": self.temperature}
        return clean_rewrite(self.client.complete(rephrase_messages(text, style), **params))


def _no_rephraser() -> None:
    return None


REPHRASERS: dict[str, Callable[..., Rephraser | None]] = {
    "none": _no_rephraser,
    "local": LocalRephraser,
    "openai": OpenAIRephraser,
}


def make_rephraser(name: str, **options: Any) -> Rephraser | None:
    """The rephraser registered as `name`, built with `options` (None for "none")."""
    factory = REPHRASERS.get(name)
    if factory is None:
        raise LearndynError(f"unknown rephraser '{name}'; valid: {', '.join(REPHRASERS)}")
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as err:
        raise LearndynError(f"rephraser '{name}': {err}") from None
    return factory(**options)
