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

import http.client
import inspect
import json
import os
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from learndyn.errors import LearndynError

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
_RETRY_STATUS = frozenset({408, 429}) | frozenset(range(500, 600))


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

    Connection errors, timeouts, HTTP 408/429 and 5xx are retried `max_retries` times with exponential
    back-off (`backoff`, 2·backoff, 4·backoff ... seconds, or the server's Retry-After when longer).
    The API key is read from the environment variable `api_key_env` and never shown: not in errors,
    not in the repr. `require_key=False` allows a keyless local server. `workers` requests run at once.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 60,
        max_retries: int = 3,
        backoff: float = 1.0,
        *,
        require_key: bool = True,
        temperature: float | None = None,
        workers: int = 4,
    ):
        if not re.match(r"^https?://[^/]", base_url or ""):
            raise LearndynError(f"rephraser base_url must start with http:// or https://, got '{base_url}'")
        if not model:
            raise LearndynError("rephraser model: give the model name the endpoint serves")
        if max_retries < 0 or workers < 1 or timeout <= 0 or backoff < 0:
            raise LearndynError("rephraser: need max_retries >= 0, workers >= 1, timeout > 0, backoff >= 0")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.temperature = temperature
        self.workers = workers
        self._key = os.environ.get(api_key_env) or None
        if self._key is None and require_key:
            raise LearndynError(
                f"the openai rephraser needs an API key in the environment variable {api_key_env} "
                "(set it, or pass require_key=False for a local server)"
            )

    def __repr__(self) -> str:
        key = "set" if self._key else "unset"
        return (f"OpenAIRephraser(url={self.url!r}, model={self.model!r}, "
                f"api_key_env={self.api_key_env!r} ({key}), max_retries={self.max_retries})")

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
        body: dict[str, Any] = {"model": self.model, "messages": rephrase_messages(text, style)}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        reply = self._post(json.dumps(body).encode("utf-8"))
        try:
            data = json.loads(reply)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LearndynError(f"{self.url}: the reply is not JSON") from None
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise LearndynError(f"{self.url}: unexpected reply, no choices[0].message.content") from None
        if content is None:
            return ""
        if not isinstance(content, str):
            raise LearndynError(f"{self.url}: unexpected reply, message content is not text")
        return clean_rewrite(content)

    def _post(self, body: bytes) -> bytes:
        """POST with retries; every failure ends as one line naming the URL and what went wrong."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            wait = self.backoff * 2**attempt
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as err:
                problem = f"HTTP {err.code}{_server_message(err)}"
                if err.code not in _RETRY_STATUS:
                    raise LearndynError(self._redact(f"{self.url}: {problem}")) from None
                wait = max(wait, _retry_after(err))
            except urllib.error.URLError as err:
                problem = _describe(err.reason)
            except (TimeoutError, socket.timeout, ConnectionError, http.client.HTTPException) as err:
                problem = _describe(err)
            if attempt + 1 < attempts and wait > 0:
                time.sleep(wait)
        raise LearndynError(self._redact(f"{self.url}: {problem} (after {attempts} attempt{'s' * (attempts > 1)})"))

    def _redact(self, message: str) -> str:
        message = " ".join(message.split())  # one line, whatever the server sent
        return message.replace(self._key, "***") if self._key else message


def _describe(reason: object) -> str:
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return "timed out"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, ConnectionResetError):
        return "connection reset"
    if isinstance(reason, BaseException):
        return getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
    return str(reason)


def _server_message(err: urllib.error.HTTPError) -> str:
    """The server's own error line (OpenAI style `{"error": {"message": ...}}`), if it gave one."""
    try:
        data = json.loads(err.read(4096))
        message = data["error"]["message"] if isinstance(data["error"], dict) else data["error"]
    except Exception:  # any body that is not the expected shape: the status code says enough
        return ""
    return f": {str(message)[:200]}" if message else ""


def _retry_after(err: urllib.error.HTTPError) -> float:
    try:
        return min(float(err.headers.get("Retry-After", 0)), 60.0)
    except (TypeError, ValueError):
        return 0.0


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
