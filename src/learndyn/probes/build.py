"""Building a probe set from preference data: every response type of the vocabulary we can make.

Cheap types come from the data itself with seeded randomness (derangements so that "another
prompt's answer" is never the prompt's own); rephrases come from columns when present, else from a
rephraser backend; `greedy` is the model's own greedy decode when a model is given, and with a reward
too, `sample_rewarded`/`sample_unrewarded` split the model's own samples by it (learndyn.probes.samples).
Rows depend only on the seed and the data (and the model), so a build interrupted by a failing
rephraser or reward resumes to the same file; finished rows are never redone.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from learndyn.data import Preference
from learndyn.errors import LearndynError
from learndyn.probes.files import Probe, read_probes, write_probes
from learndyn.progress import progress
from learndyn.probes.rephrase import Rephraser
from learndyn.probes.samples import SampleSettings, SamplingStopped, add_reward_samples
from learndyn.rewards import RewardFn
from learndyn.vocab import REPHRASE_TYPES

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_BORROWED = ("other_train", "fluent_random", "shuffled_other")  # types lent by another training example
_SAMPLING = SampleSettings()  # the defaults of `samples` and `temperature`


class ProbeBuildError(LearndynError):
    """A build that failed part-way; `finished` holds the rows completed before the failure."""

    def __init__(self, message: str, finished: list[Probe]):
        super().__init__(message)
        self.finished = finished


def build_probes(
    train: Sequence[Preference],
    *,
    held_out: Sequence[Preference] | None = None,
    seed: int = 0,
    rephraser: Rephraser | None = None,
    model: Any = None,
    tokenizer: Any = None,
    greedy_max_tokens: int = 64,
    reward: str | RewardFn | None = None,
    samples: int = _SAMPLING.samples,
    temperature: float = _SAMPLING.temperature,
    done: Sequence[Probe] = (),
    batch_size: int = 8,
) -> list[Probe]:
    """Probe rows for `train`, one per example, in the same order.

    `held_out` supplies `other_test` (answers to prompts not trained on). `reward` (a spec for
    `learndyn.rewards.load_reward`, or a function with TRL's reward signature) splits `samples`
    samples per prompt from `model`, at `temperature` and up to `greedy_max_tokens` long, into
    `sample_rewarded`/`sample_unrewarded`; a spec's reward is checked on every call, while a function
    is called as given (only a LearndynError it raises keeps the finished rows). `done` holds rows
    from an earlier, interrupted build of the same data and seed; they are kept as they are.
    """
    sampling = SampleSettings(samples=samples, temperature=temperature)  # checked before any work
    if reward is not None and model is None:
        raise LearndynError("a reward needs a model to sample from (--model)")
    finished = {p.example_id: p for p in done}
    sources = {s: derangement(len(train), random.Random(f"{seed}/{s}")) for s in _BORROWED}
    probes = [finished.get(p.example_id) or _cheap_probe(p, i, train, held_out, sources, seed)
              for i, p in enumerate(train)]
    todo = [p for p in probes if p.example_id not in finished]
    if model is not None and todo:
        _add_greedy(todo, model, tokenizer, greedy_max_tokens, batch_size)
    if reward is not None and todo:
        _add_samples(probes, todo, train, model, tokenizer, reward, sampling, seed, greedy_max_tokens,
                     needs_rephrase=rephraser is not None)
    if rephraser is not None and todo:
        _add_rephrases(probes, todo, rephraser, batch_size)
    return probes


def build_probe_file(
    train: Sequence[Preference],
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    **options: Any,
) -> list[Probe]:
    """`build_probes(train, **options)` into the probe file `out`, which is written once, atomically.

    An existing `out` is refused unless `resume` (its rows are kept and the rest built) or `overwrite`.
    When a backend fails part-way, the rows finished so far are written and the error says how to
    resume: paid rephrases are never lost.
    """
    out = Path(out)
    check_target(out, resume, overwrite)
    done = read_probes(out) if resume and out.exists() else []
    try:
        probes = build_probes(train, done=done, **options)
    except ProbeBuildError as err:
        if not err.finished:
            raise LearndynError(f"{err}; no row was finished, nothing written") from None
        write_probes(err.finished, out)
        raise LearndynError(f"{err}; kept {len(err.finished)} of {len(train)} finished rows in {out}; "
                            "rerun with --resume to finish") from None
    write_probes(probes, out)
    return probes


def check_target(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to replace a probe file unasked; callers check before loading models."""
    if out.exists() and not (resume or overwrite):
        raise LearndynError(f"{out} exists; pass --resume to finish it or --overwrite to replace it")


def derangement(n: int, rng: random.Random) -> list[int]:
    """A uniformly random cyclic permutation (Sattolo): for n >= 2 no index maps to itself."""
    perm = list(range(n))
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def shuffle_words(text: str, rng: random.Random) -> str:
    """The words of `text` in a random order that differs from the original when possible."""
    words = text.split()
    lead = text[: len(text) - len(text.lstrip())]
    shuffled = list(words)
    for _ in range(10):
        rng.shuffle(shuffled)
        if shuffled != words or len(set(words)) < 2:
            break
    return lead + " ".join(shuffled)


def _cheap_probe(
    pref: Preference,
    index: int,
    train: Sequence[Preference],
    held_out: Sequence[Preference] | None,
    sources: dict[str, list[int]],
    seed: int,
) -> Probe:
    responses = {"chosen": pref.chosen}
    if pref.rejected is not None:
        responses["rejected"] = pref.rejected
    responses.update(pref.extras)  # rephrases and authors' columns given with the data
    if len(train) >= 2:  # a single example has no "other" to borrow from
        lender = {stream: train[perm[index]] for stream, perm in sources.items()}
        responses.setdefault("other_train", lender["other_train"].chosen)
        rng = random.Random(f"{seed}/{pref.example_id}/fluent_random")
        responses.setdefault("fluent_random", _fluent_text(lender["fluent_random"], len(pref.chosen.split()), rng))
        rng = random.Random(f"{seed}/{pref.example_id}/shuffled_other")
        _set_shuffled(responses, "shuffled_other", lender["shuffled_other"].chosen, rng)
    if held_out:
        order = random.Random(f"{seed}/other_test").sample(range(len(held_out)), len(held_out))
        responses.setdefault("other_test", held_out[order[index % len(held_out)]].chosen)
    rng = random.Random(f"{seed}/{pref.example_id}/shuffled_chosen")
    _set_shuffled(responses, "shuffled_chosen", pref.chosen, rng)
    return Probe(pref.example_id, pref.prompt, responses)


def _set_shuffled(responses: dict[str, str], name: str, text: str, rng: random.Random) -> None:
    """A shuffled probe, unless one was given or no order differs (a one-word answer such as "42"
    would only repeat the response it shuffles)."""
    shuffled = shuffle_words(text, rng)
    if shuffled != text:
        responses.setdefault(name, shuffled)


def _fluent_text(source: Preference, target_words: int, rng: random.Random) -> str:
    """Consecutive sentences of an unrelated example, about as long as the prompt's chosen response."""
    sentences = [s for text in (source.chosen, source.rejected or "") for s in _SENTENCE_END.split(text.strip()) if s]
    start = rng.randrange(len(sentences))
    picked: list[str] = []
    for s in sentences[start:] + sentences[:start]:
        picked.append(s)
        if sum(len(p.split()) for p in picked) >= 0.8 * target_words:
            break
    return " ".join(picked)


def _add_greedy(todo: list[Probe], model: Any, tokenizer: Any, max_new_tokens: int, batch_size: int) -> None:
    from learndyn.generation import generate

    outputs = generate(model, tokenizer, [p.prompt for p in todo], max_new_tokens=max_new_tokens,
                       batch_size=batch_size, progress="Greedy decoding")
    for probe, text in zip(todo, outputs):
        if text.strip():
            probe.responses["greedy"] = text


def _add_samples(probes: list[Probe], todo: list[Probe], train: Sequence[Preference], model: Any, tokenizer: Any,
                 reward: str | RewardFn, sampling: SampleSettings, seed: int, max_new_tokens: int, *,
                 needs_rephrase: bool) -> None:
    """Sample and reward prompt by prompt; when the reward fails, the rows sampled before it are
    finished, unless they still wait for a rephrase (rephrasing comes after sampling)."""
    if isinstance(reward, str):
        from learndyn.rewards import load_reward

        reward = load_reward(reward, device=str(model.device))
    columns = {p.example_id: p.columns for p in train}
    try:
        add_reward_samples(todo, columns, model, tokenizer, reward, sampling, seed=seed,
                           max_new_tokens=max_new_tokens)
    except SamplingStopped as err:
        pending = {p.example_id for p in todo[err.finished:]}
        if needs_rephrase:
            pending |= {p.example_id for p, _ in _rephrase_jobs(todo[:err.finished])}
        raise ProbeBuildError(str(err), [p for p in probes if p.example_id not in pending]) from None


def _rephrase_jobs(todo: list[Probe]) -> list[tuple[Probe, str]]:
    """(probe, type) for every rephrase type a probe lacks whose source (chosen/rejected) it has."""
    return [(p, name) for p in todo for name in REPHRASE_TYPES if name not in p.responses
            and p.responses.get(name.split("_")[0])]


def _add_rephrases(probes: list[Probe], todo: list[Probe], rephraser: Rephraser, batch_size: int) -> None:
    """Fill missing rephrase types chunk by chunk, so a failure keeps every finished chunk."""
    jobs = _rephrase_jobs(todo)
    with progress("Rephrasing", len(jobs)) as advance:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            try:
                for style in ("semantic", "format"):
                    part = [(p, name) for p, name in chunk if name.endswith(style)]
                    if not part:
                        continue
                    texts = rephraser([p.responses[name.split("_")[0]] for p, name in part], style)
                    if len(texts) != len(part):
                        raise LearndynError(f"the rephraser returned {len(texts)} texts for {len(part)} inputs")
                    for (probe, name), text in zip(part, texts):
                        if text.strip():
                            probe.responses[name] = text
            except LearndynError as err:
                pending = {p.example_id for p, _ in jobs[start:]}
                raise ProbeBuildError(str(err), [p for p in probes if p.example_id not in pending]) from None
            advance(len(chunk))
