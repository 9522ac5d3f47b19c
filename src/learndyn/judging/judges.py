"""Pairwise judges, registered by name: which of two responses to a prompt is better?

A judge is anything with a `spec` (its name as written in verdict files), `pairs_per_call` (the
verdict file is written after every call) and two methods:

    judge(items)        items are (prompt, first, second) presentations; returns one `Judgment` per
                        item, whose verdict names the winning *position* ("A" = first)
    combine(ab, ba)     the pair's verdict from its two orders, both already relative to the files

Two are built in (`make_judge("openai:MODEL")`, `make_judge("local[:MODEL]")`):
  openai  any OpenAI-compatible chat endpoint; the text answer is read strictly by `parse_answer`
          and the two orders are combined by votes (`vote`).
  local   a local Hugging Face chat model; it compares log p("A") with log p("B") as the next token.
          Tie rule: |log p(A) − log p(B)| < `tie_margin` (default 0.02 nats: odds within 2%). The
          two orders are combined by the mean of their log-odds for the first file, with the same
          margin, so a constant position bias (the same shift of log-odds toward "A" in both orders)
          cancels exactly. Small chat models are mostly position bias (SmolLM2-135M says "A" in both
          orders of every pair, by ~0.8 nats); what is left after cancelling is a few hundredths of
          a nat, hence the small margin.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Protocol

from learndyn.data import Prompt
from learndyn.errors import LearndynError
from learndyn.judging.prompt import LETTER_INSTRUCTION, TEXT_INSTRUCTION, pairwise_messages, parse_answer
from learndyn.models import eval_mode
from learndyn.openai_chat import DEFAULT_API_KEY_ENV, DEFAULT_BASE_URL, ChatClient

__all__ = ["JUDGES", "Judge", "Judgment", "JudgingFailed", "LocalJudge", "OpenAIJudge", "RewardJudge", "make_judge",
           "vote"]

Item = tuple[Prompt, str, str]  # (prompt, first response, second response)


@dataclass(frozen=True)
class Judgment:
    """One judged presentation: `verdict` is "A", "B", "tie" or "unparsed"; `raw` the judge's output
    as it came (kept so that a verdict can be audited); `score` the judge's log-odds for A over B
    when it has one (the local judge), else None."""

    verdict: str
    raw: str
    score: float | None = None


class Judge(Protocol):
    spec: str
    pairs_per_call: int

    def judge(self, items: Sequence[Item]) -> list[Judgment]: ...

    def combine(self, ab: Judgment, ba: Judgment) -> str: ...


class JudgingFailed(LearndynError):
    """The judge stopped part way; `done` holds the judgments it finished (None for the others), so
    that work already paid for is kept."""

    def __init__(self, message: str, done: list[Judgment | None]):
        super().__init__(message)
        self.done = done


def vote(ab: Judgment, ba: Judgment) -> str:
    """Combine two orders by votes (+1 for A, 0 for a tie, −1 for B): the sign of the sum.

    A judge that always picks one position (pure position bias) gives A in one order and B in the
    other: a tie, never a win. Either order unparsed makes the pair unparsed: one order alone would
    carry exactly the bias the second order is there to cancel.
    """
    if "unparsed" in (ab.verdict, ba.verdict):
        return "unparsed"
    points = {"A": 1, "tie": 0, "B": -1}
    total = points[ab.verdict] + points[ba.verdict]
    return "A" if total > 0 else "B" if total < 0 else "tie"


class OpenAIJudge:
    """Asks an OpenAI-compatible chat endpoint; `workers` requests at once, at most `rate_limit` per
    second, each retried with back-off (see `ChatClient`). Temperature 0 by default so that a rerun
    would ask the same question the same way."""

    def __init__(
        self,
        model: str,
        base_url: str = DEFAULT_BASE_URL,
        api_key_env: str = DEFAULT_API_KEY_ENV,
        *,
        rate_limit: float | None = None,
        workers: int = 4,
        timeout: float = 60,
        max_retries: int = 3,
        backoff: float = 1.0,
        temperature: float | None = 0.0,
        require_key: bool = True,
    ):
        if workers < 1:
            raise LearndynError(f"judge workers must be at least 1, got {workers}")
        self.client = ChatClient(base_url, model, api_key_env, timeout, max_retries, backoff,
                                 require_key=require_key, rate_limit=rate_limit, what="judge")
        self.spec = f"openai:{model}"
        self.workers = workers
        self.pairs_per_call = 4 * workers  # 8 requests per worker between writes
        self.temperature = temperature

    def __repr__(self) -> str:
        return f"OpenAIJudge(spec={self.spec!r}, client={self.client!r}, workers={self.workers})"

    def judge(self, items: Sequence[Item]) -> list[Judgment]:
        """One request per item; on a failure no new request starts, those running finish, and
        `JudgingFailed` carries every finished judgment."""
        if not items:
            return []
        pool = ThreadPoolExecutor(max_workers=min(self.workers, len(items)))
        try:
            futures = [pool.submit(self.judge_one, *item) for item in items]
            wait(futures, return_when=FIRST_EXCEPTION)
        finally:  # after a failure (or Ctrl-C) start nothing new; let running requests finish
            pool.shutdown(wait=True, cancel_futures=True)
        failed = [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]
        if failed:
            done = [f.result() if not f.cancelled() and f.exception() is None else None for f in futures]
            error = failed[0]
            if not isinstance(error, LearndynError):
                raise error
            raise JudgingFailed(str(error), done)
        return [f.result() for f in futures]

    def judge_one(self, prompt: Prompt, first: str, second: str) -> Judgment:
        params = {} if self.temperature is None else {"temperature": self.temperature}
        reply = self.client.complete(pairwise_messages(prompt, first, second, TEXT_INSTRUCTION), **params)
        return Judgment(parse_answer(reply), reply)  # the client has hidden the key already

    combine = staticmethod(vote)


class LocalJudge:
    """Compares log p("A") with log p("B") as the next token of a local chat model after the pairwise
    prompt: weak, but offline and deterministic. Prompts are batched (left padding, position ids from
    the attention mask, so a prompt's result does not depend on its batch) and only the last position
    goes through the LM head. The prompt and each response are cut to `max_text_tokens` tokens.

    Built from a loaded `model` and `tokenizer`, or from a `model_name` that is loaded on first use
    (a rerun whose verdicts are all cached never loads it).
    """

    def __init__(
        self,
        model: Any = None,
        tokenizer: Any = None,
        *,
        model_name: str | None = None,
        batch_size: int = 8,
        tie_margin: float = 0.02,
        max_text_tokens: int = 256,
        device: str | None = None,
        dtype: str | None = None,
    ):
        if (model is None) != (tokenizer is None):
            raise LearndynError("local judge: give both model and tokenizer, or neither (and a model_name)")
        if batch_size < 1 or tie_margin < 0 or max_text_tokens < 1:
            raise LearndynError("local judge: need batch_size >= 1, tie_margin >= 0, max_text_tokens >= 1")
        if model is None:
            from learndyn.models import BUILTIN_MODEL

            model_name = model_name or BUILTIN_MODEL
        else:
            model_name = model_name or getattr(model.config, "name_or_path", "") or type(model).__name__
        self.model, self.tokenizer = model, tokenizer
        self.spec = f"local:{model_name}"
        self.model_name = model_name
        self.batch_size, self.tie_margin, self.max_text_tokens = batch_size, tie_margin, max_text_tokens
        self.pairs_per_call = 4 * batch_size  # 8 forward passes between writes, sorted by length together
        self.device, self.dtype = device, dtype
        self._letters: tuple[int, int] | None = None
        if model is not None:
            self._letters = self._check(tokenizer)

    def __repr__(self) -> str:
        return f"LocalJudge(spec={self.spec!r}, batch_size={self.batch_size}, tie_margin={self.tie_margin})"

    def judge(self, items: Sequence[Item]) -> list[Judgment]:
        if not items:
            return []
        import torch

        model, tokenizer = self._loaded()
        encoded = [self._encode(item) for item in items]
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # similar lengths share a batch
        results: list[Judgment | None] = [None] * len(encoded)
        with eval_mode(model), torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                logp = self._next_token_logp(model, [encoded[i] for i in batch], tokenizer)  # (B, 2)
                for i, (a, b) in zip(batch, logp.tolist()):
                    results[i] = self._judgment(a, b)
        return results  # type: ignore[return-value]

    def combine(self, ab: Judgment, ba: Judgment) -> str:
        """The mean of both orders' log-odds for the first file, with the same tie margin."""
        if ab.score is None or ba.score is None:
            return vote(ab, ba)
        mean = (ab.score + ba.score) / 2
        return "tie" if abs(mean) < self.tie_margin else "A" if mean > 0 else "B"

    def _judgment(self, logp_a: float, logp_b: float) -> Judgment:
        score = logp_a - logp_b
        verdict = "tie" if abs(score) < self.tie_margin else "A" if score > 0 else "B"
        return Judgment(verdict, f"logp(A)={logp_a:.4f} logp(B)={logp_b:.4f}", score)

    def _loaded(self) -> tuple[Any, Any]:
        if self.model is None:
            from learndyn.models import load_model

            model, tokenizer = load_model(self.model_name, device=self.device, dtype=self.dtype)
            self._letters = self._check(tokenizer)
            self.model, self.tokenizer = model, tokenizer
        return self.model, self.tokenizer

    @staticmethod
    def _check(tokenizer: Any) -> tuple[int, int]:
        """The token ids of "A" and "B"; each must be a single token for its probability to mean anything."""
        if not getattr(tokenizer, "chat_template", None):
            raise LearndynError("the local judge needs a chat model: the tokenizer has no chat_template")
        ids = []
        for letter in ("A", "B"):
            tokens = tokenizer.encode(letter, add_special_tokens=False)
            if len(tokens) != 1:
                raise LearndynError(f"local judge: the tokenizer splits '{letter}' into {len(tokens)} tokens")
            ids.append(tokens[0])
        return ids[0], ids[1]

    def _cut(self, text: str) -> str:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) <= self.max_text_tokens:
            return text
        return self.tokenizer.decode(ids[:self.max_text_tokens], skip_special_tokens=True) + " [...]"

    def _encode(self, item: Item) -> list[int]:
        prompt, first, second = item
        if not isinstance(prompt, str):
            prompt = [dict(m, content=self._cut(m["content"])) for m in prompt]
        else:
            prompt = self._cut(prompt)
        messages = pairwise_messages(prompt, self._cut(first), self._cut(second), LETTER_INSTRUCTION)
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _next_token_logp(self, model: Any, rows: list[list[int]], tokenizer: Any) -> Any:
        """log p("A"), log p("B") at the position after each row: (B, 2)."""
        import torch

        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
        width = max(len(row) for row in rows)
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=model.device)  # (B, T)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=model.device)  # (B, T)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): left padding must not shift positions
        options = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, **options).logits
        logp = torch.log_softmax(logits[:, -1, :].float(), dim=-1)  # (B, V)
        assert self._letters is not None
        return logp[:, list(self._letters)]  # (B, 2)


class RewardJudge:
    """A reward model as a pairwise judge: A wins when its reward beats B's by more than `tie_margin`.
    Deterministic and order-free, so both orders agree; `score` is the reward difference A − B."""

    def __init__(self, model_name: str, *, batch_size: int = 8, tie_margin: float = 0.0, device: str | None = None):
        from learndyn.rewards import RewardModel

        if tie_margin < 0:
            raise LearndynError("reward judge: tie_margin must be >= 0")
        self.rewards = RewardModel(model_name, device=device, batch_size=batch_size)
        self.spec = f"reward:{model_name}"
        self.tie_margin = tie_margin
        self.pairs_per_call = 4 * batch_size

    def judge(self, items: Sequence[Item]) -> list[Judgment]:
        prompts = [p for p, _, _ in items]
        firsts = self.rewards.scores(prompts, [a for _, a, _ in items])
        seconds = self.rewards.scores(prompts, [b for _, _, b in items])
        out = []
        for a, b in zip(firsts, seconds):
            verdict = "tie" if abs(a - b) <= self.tie_margin else "A" if a > b else "B"
            out.append(Judgment(verdict, f"reward A {a:.6g}, B {b:.6g}", a - b))
        return out

    def combine(self, ab: Judgment, ba: Judgment) -> str:
        return vote(ab, ba)


def _accepts(model: Any, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


_OPENAI_OPTIONS = ("base_url", "api_key_env", "rate_limit", "workers", "timeout", "max_retries", "backoff",
                   "temperature")
_LOCAL_OPTIONS = ("model", "tokenizer", "batch_size", "tie_margin", "max_text_tokens", "device", "dtype")


def _openai(model: str | None, options: dict[str, Any]) -> Judge:
    if not model:
        raise LearndynError("judge 'openai' needs a model name: openai:MODEL, e.g. openai:gpt-4o-mini")
    return OpenAIJudge(model, **{k: options[k] for k in _OPENAI_OPTIONS if options.get(k) is not None})


def _local(model: str | None, options: dict[str, Any]) -> Judge:
    return LocalJudge(model_name=model, **{k: options[k] for k in _LOCAL_OPTIONS if options.get(k) is not None})


def _reward(model: str | None, options: dict[str, Any]) -> Judge:
    if not model:
        raise LearndynError("judge 'reward' needs a reward model: reward:MODEL (a sequence classifier)")
    return RewardJudge(model, **{k: options[k] for k in ("batch_size", "tie_margin", "device")
                                 if options.get(k) is not None})


JUDGES: dict[str, Callable[[str | None, dict[str, Any]], Judge]] = {"openai": _openai, "local": _local,
                                                                    "reward": _reward}
_FORMS = "openai:MODEL, local[:MODEL], reward:MODEL"


def make_judge(spec: str, **options: Any) -> Judge:
    """The judge named by `spec`: "openai:MODEL", "local" / "local:MODEL" (a model `load_model` reads)
    or "reward:MODEL" (a sequence-classification reward model: batch_size, tie_margin, device).

    `options` are the settings of either kind (openai: base_url, api_key_env, rate_limit, workers,
    timeout, max_retries, backoff, temperature; local: model and tokenizer already loaded, batch_size,
    tie_margin, max_text_tokens, device, dtype); those of the other kind, or None, are ignored so a
    command line can pass all of its options.
    """
    kind, _, model = (spec or "").partition(":")
    factory = JUDGES.get(kind)
    if factory is None:
        raise LearndynError(f"unknown judge '{spec}'; valid: {_FORMS}")
    unknown = sorted(set(options) - set(_OPENAI_OPTIONS) - set(_LOCAL_OPTIONS))
    if unknown:
        raise LearndynError(f"judge '{spec}': unknown option(s) {', '.join(unknown)}")
    return factory(model or None, options)
