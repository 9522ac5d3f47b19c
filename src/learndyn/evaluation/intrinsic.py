"""Intrinsic measures of a set of generations, and of the model that made them.

The paper's story predicts that off-policy DPO squeezes probability mass into each position's
argmax token: greedy answers grow repetitive and peaky ("repeaters"), the chosen responses of
held-out prompts lose probability, and the teacher-forced argmax path gains it; SFT on rejected
responses first ("extended") should soften all of this. These measures make those predictions
checkable without a judge.

Text measures (no model needed). Words are the whitespace-separated pieces of a response, case and
punctuation kept as generated; an n-gram is n consecutive words of one response (never spanning two).

    n_responses      number of responses in the set
    empty_responses  responses with no words (e.g. EOS came first)
    mean_words       mean words per response
    mean_tokens      mean tokens per response, re-tokenized without special tokens (needs a tokenizer)
    distinct_1/2     unique n-grams / total n-grams over the whole set (Li et al., 2016): low when
                     the responses reuse the same words and phrases; None when the set has no n-gram
    repetition_3     mean over responses of the within-response repetition rate of 3-grams,
                         rep_n(y) = 1 − |unique n-grams of y| / |n-grams of y|,
                     the share of y's n-gram occurrences that repeat an earlier one in y: 0 for a
                     response that never repeats a phrase, → 1 for one that loops. Responses with
                     fewer than n words have no n-gram and are left out; None when none is left.

Model measures (teacher forced by `learndyn.scoring.score_probes`, prompt masked, EOS appended) on
held-out preference data, i.e. prompts the model was not trained on:

    held_out_n          number of held-out chosen responses scored
    held_out_truncated  how many of them were cut to fit the context
    chosen_logp_sum     mean over them of log π(y⁺ | x)            (the paper's quantity)
    chosen_logp_mean    mean over them of log π(y⁺ | x) / tokens   (length-fair)
    chosen_argmax_logp  mean over them of Σ_l log max_v π_l(v)     (rises as mass is squeezed)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from learndyn.data import Preference
from learndyn.errors import LearndynError

__all__ = ["distinct_n", "held_out_measures", "intrinsic_measures", "repetition_rate", "text_measures"]

Response = str | dict[str, Any]  # a text, or a response-file row holding it under "response"


def ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """The n-grams of one word sequence, in order (empty when it has fewer than n words)."""
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: Iterable[str], n: int) -> float | None:
    """Unique n-grams / total n-grams over all `texts` (see the module docstring); None if no n-gram."""
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        grams = ngrams(text.split(), n)
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else None


def repetition_rate(text: str, n: int = 3) -> float | None:
    """1 − unique/total n-grams within one response: the share of its n-grams that repeat an
    earlier one. None for a response with fewer than n words (nothing to repeat)."""
    grams = ngrams(text.split(), n)
    return 1.0 - len(set(grams)) / len(grams) if grams else None


def text_measures(responses: Sequence[Response], tokenizer: Any = None, *, repetition_n: int = 3) -> dict[str, Any]:
    """Length, distinct-1/2 and within-response repetition of a set of responses (module docstring).

    `mean_tokens` is present only when a tokenizer is given.
    """
    if repetition_n < 1:
        raise LearndynError(f"repetition_n must be at least 1, got {repetition_n}")
    texts = [_text(r, i) for i, r in enumerate(responses)]
    if not texts:
        raise LearndynError("no responses to measure")
    word_counts = [len(t.split()) for t in texts]
    rates = [r for r in (repetition_rate(t, repetition_n) for t in texts) if r is not None]
    measures: dict[str, Any] = {
        "n_responses": len(texts),
        "empty_responses": sum(1 for c in word_counts if c == 0),
        "mean_words": sum(word_counts) / len(texts),
    }
    if tokenizer is not None:
        lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        measures["mean_tokens"] = sum(lengths) / len(texts)
    measures["distinct_1"] = distinct_n(texts, 1)
    measures["distinct_2"] = distinct_n(texts, 2)
    measures[f"repetition_{repetition_n}"] = sum(rates) / len(rates) if rates else None
    return measures


def held_out_measures(
    model: Any, tokenizer: Any, held_out: Sequence[Preference], *, max_length: int | None = None
) -> dict[str, Any]:
    """Mean teacher-forced log π and argmax_logp of the held-out chosen responses (module docstring).

    Scored by `score_probes` with one `chosen` probe per example, so these are the same numbers the
    probe tracking records for `chosen`, only on prompts outside the training data.
    """
    from learndyn.probes.files import Probe
    from learndyn.scoring import score_probes

    if not held_out:
        raise LearndynError("no held-out examples to score")
    probes = [Probe(p.example_id, p.prompt, {"chosen": p.chosen}) for p in held_out]
    scores = score_probes(model, tokenizer, probes, types=["chosen"], max_length=max_length,
                          progress="Scoring held-out chosen")
    return {
        "held_out_n": len(scores),
        "held_out_truncated": int(scores["truncated"].sum()),
        "chosen_logp_sum": float(scores["logp_sum"].mean()),
        "chosen_logp_mean": float(scores["logp_mean"].mean()),
        "chosen_argmax_logp": float(scores["argmax_logp"].mean()),
    }


def intrinsic_measures(
    responses: Sequence[Response],
    tokenizer: Any = None,
    model: Any = None,
    held_out: Sequence[Preference] | None = None,
    *,
    repetition_n: int = 3,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Every intrinsic measure of one set of generations in one flat dict (keys: module docstring).

    The text measures always; the model measures when `model` and `held_out` are given (they need
    the tokenizer too). Pass the model that generated `responses`, so that both describe one arm.
    """
    if (model is None) != (held_out is None):
        raise LearndynError("the held-out measures need both a model and held-out data; got only one")
    if model is not None and tokenizer is None:
        raise LearndynError("the held-out measures need the model's tokenizer")
    measures = text_measures(responses, tokenizer, repetition_n=repetition_n)
    if model is not None:
        measures.update(held_out_measures(model, tokenizer, held_out, max_length=max_length))
    return measures


def _text(response: Response, index: int) -> str:
    if isinstance(response, str):
        return response
    if isinstance(response, dict) and isinstance(response.get("response"), str):
        return response["response"]
    raise LearndynError(f"response {index}: expected a text or a row with a 'response' text")
