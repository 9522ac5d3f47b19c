"""A small client for OpenAI-compatible `/chat/completions` endpoints, standard library only.

The rephraser and the API judge both talk to such endpoints (OpenAI, vLLM, llama.cpp, Ollama, ...).
They share this client so that retries, back-off, rate limiting and the hiding of the API key are
written, and tested, once. Every failure the user can act on is a one-line `LearndynError` naming the
URL; the key never appears in an error or a repr.

The key goes only to the configured host: redirects are never followed (urllib would re-send a POST
as a GET to wherever `Location` points, Authorization header included); a redirect is an error naming
its status and the host it points to. And it is never written anywhere: `complete` returns the reply
with the key replaced by *** (a server may echo it back), so the rephrased texts and the judge's raw
outputs that callers write are redacted here, once.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from learndyn.errors import LearndynError
from learndyn.settings import setting


@dataclass(frozen=True)
class Endpoint:
    """The options every OpenAI-compatible client takes (judge, rephraser): the one source of their
    defaults and help."""

    base_url: str = setting("https://api.openai.com/v1", "Endpoint of an openai judge or rephraser (any "
                                                         "OpenAI-compatible API)")
    api_key_env: str = setting("OPENAI_API_KEY", "NAME of the environment variable holding the API key (only the "
                                                 "name is ever saved)")
    rate_limit: float | None = setting(None, "At most this many requests per second")


DEFAULT_BASE_URL = Endpoint.base_url
DEFAULT_API_KEY_ENV = Endpoint.api_key_env

__all__ = ["ChatClient", "RateLimiter"]

_RETRY_STATUS = frozenset({408, 429}) | frozenset(range(500, 600))
_MIN_SECRET = 8  # shorter "keys" are placeholders for keyless local servers ("x", "EMPTY"), see hide_key


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Turns every redirect into the HTTPError of its 3xx status instead of following it."""

    def redirect_request(self, req, fp, code, msg, headers, newurl) -> None:  # noqa: ANN001 (urllib's hook)
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


class RateLimiter:
    """At most `rate` request starts per second, shared by every thread that calls `wait`.

    Requests are spaced evenly (a minimum interval of 1/rate between starts) rather than in bursts,
    because providers count requests over short windows. `rate=None` (or 0) means no limit.
    """

    def __init__(self, rate: float | None = None):
        if rate is not None and rate < 0:
            raise LearndynError(f"rate limit must be positive (requests per second), got {rate}")
        self.interval = 1.0 / rate if rate else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        """Block until this caller may start a request."""
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            time.sleep(start - now)


class ChatClient:
    """POSTs chat conversations to `{base_url}/chat/completions` and returns the reply text.

    Connection errors, timeouts, HTTP 408/429 and 5xx are retried `max_retries` times with exponential
    back-off (`backoff`, 2·backoff, 4·backoff ... seconds, or the server's Retry-After when longer);
    other HTTP errors (a bad key, a bad request) fail at once since repeating them cannot help. Every
    attempt, retries included, waits its turn at the rate limiter. The key is read from the
    environment variable `api_key_env`; `require_key=False` allows a keyless local server. `what`
    names the user of the client in configuration errors ("rephraser", "judge").
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
        rate_limit: float | None = None,
        what: str = "chat client",
    ):
        if not re.match(r"^https?://[^/]", base_url or ""):
            raise LearndynError(f"{what} base_url must start with http:// or https://, got '{base_url}'")
        if not model:
            raise LearndynError(f"{what} model: give the model name the endpoint serves")
        if max_retries < 0 or timeout <= 0 or backoff < 0:
            raise LearndynError(f"{what}: need max_retries >= 0, timeout > 0, backoff >= 0")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", api_key_env or ""):
            # not shown: it may be the key itself, given where its variable's name belongs
            raise LearndynError(f"{what} api_key_env: give the NAME of the environment variable that holds the "
                                "key (letters, digits and _), not the key")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.limiter = RateLimiter(rate_limit)
        self._key = os.environ.get(api_key_env, "").strip() or None  # a trailing newline from a key file
        if self._key is not None and not re.fullmatch(r"[!-~]+", self._key):
            # http.client would refuse it with a ValueError that quotes the whole header, key included
            raise LearndynError(f"the environment variable {api_key_env} holds spaces, control or non-ASCII "
                                "characters inside the key; check its value (not shown here)")
        if self._key is None and require_key:
            raise LearndynError(
                f"the openai {what} needs an API key in the environment variable {api_key_env} "
                "(set it; for a local server that checks no key, any value will do)"
            )

    @property
    def has_key(self) -> bool:
        return self._key is not None

    def __repr__(self) -> str:
        key = "set" if self._key else "unset"
        return f"ChatClient(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r} ({key}))"

    def complete(self, messages: list[dict[str, str]], **params: Any) -> str:
        """The reply's text for one conversation ("" when the endpoint sends no content), with the
        API key replaced by *** wherever the server echoed it.

        `params` (temperature, max_tokens, ...) go into the request body as they are.
        """
        body = {"model": self.model, "messages": messages, **params}
        reply = self.post(json.dumps(body).encode("utf-8"))
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
        return self.hide_key(content)

    def post(self, body: bytes) -> bytes:
        """POST with retries; every failure ends as one line naming the URL and what went wrong."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            self.limiter.wait()
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            wait = self.backoff * 2**attempt
            try:
                with _OPENER.open(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as err:
                if 300 <= err.code < 400:
                    raise LearndynError(self.redact(f"{self.url}: {_redirect(err, self.url)}")) from None
                problem = f"HTTP {err.code}{_server_message(err)}"
                if err.code not in _RETRY_STATUS:
                    raise LearndynError(self.redact(f"{self.url}: {problem}")) from None
                wait = max(wait, _retry_after(err))
            except urllib.error.URLError as err:
                problem = _describe(err.reason)
            except (TimeoutError, socket.timeout, ConnectionError, http.client.HTTPException) as err:
                problem = _describe(err)
            if attempt + 1 < attempts and wait > 0:
                time.sleep(wait)
        raise LearndynError(self.redact(f"{self.url}: {problem} (after {attempts} attempt{'s' * (attempts > 1)})"))

    def redact(self, message: str) -> str:
        """`message` on one line with the API key replaced by ***: the form of every error."""
        return self.hide_key(" ".join(message.split()))  # one line, whatever the server sent

    def hide_key(self, text: str) -> str:
        """`text` with the API key replaced by *** (a server may echo it back in a reply).

        A key shorter than 8 characters is left alone: it is a placeholder for a local server that
        checks no key ("x", "EMPTY"), not a secret, and replacing it would garble every text that
        happens to contain those letters.
        """
        if not self._key or len(self._key) < _MIN_SECRET:
            return text
        return text.replace(self._key, "***")


def _redirect(err: urllib.error.HTTPError, url: str) -> str:
    """A redirect as an error: its status and the scheme://host:port it points to (no path, query or
    credentials, which could carry secrets), and what to do."""
    location = err.headers.get("Location") if err.headers else None
    where = " without a Location"
    if location:
        try:
            parts = urllib.parse.urlsplit(urllib.parse.urljoin(url, location))
            where = f" to {parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        except ValueError:  # a Location urllib cannot parse (a bad port, ...)
            where = " to an unreadable Location"
    return (f"HTTP {err.code} redirect{where}, not followed (the API key goes only to the configured "
            "host); give the final address as the base URL")


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
