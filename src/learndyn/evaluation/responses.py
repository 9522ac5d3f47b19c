"""Answers to held-out prompts, for judges and intrinsic measures: generated in batches and written as
a response file (its format, reader and writer are learndyn.responses).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from learndyn.data import Preference
from learndyn.errors import LearndynError
from learndyn.responses import write_responses

__all__ = ["DecodingSettings", "generate_file", "generate_responses", "resolve_model"]


@dataclass(frozen=True)
class DecodingSettings:
    """How responses are decoded; checked on creation and written into every response row."""

    sample: bool = False  # greedy by default: deterministic, so two arms differ only by their weights
    max_new_tokens: int = 128
    temperature: float = 1.0
    seed: int = 0
    # Speed only, not written to the rows (greedy output depends on it only by float rounding). 16 answered
    # 1.5x more prompts/s than 8 on 2 CPU cores (bench/generation_throughput.py); its KV cache is small.
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise LearndynError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise LearndynError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.sample and not self.temperature > 0:
            raise LearndynError(f"temperature must be positive when sampling, got {self.temperature}")

    def to_row(self) -> dict[str, Any]:
        """The settings as they appear in a response row (sampling-only values are null when greedy)."""
        return {"decoding": "sample" if self.sample else "greedy", "max_new_tokens": self.max_new_tokens,
                "temperature": self.temperature if self.sample else None, "seed": self.seed if self.sample else None}


def resolve_model(spec: str | Path) -> str:
    """What to load for `spec`: a run folder's final checkpoint (a model or a LoRA adapter), or the
    spec itself. Kept here for callers of this module; the rule lives in `learndyn.models`."""
    from learndyn.models import resolve_model as resolve

    return resolve(spec)


def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Preference],
    settings: DecodingSettings = DecodingSettings(),
    *,
    model_name: str = "",
    progress: str | None = "Generating",
) -> list[dict[str, Any]]:
    """One response row (see the module docstring) per preference example, batched with progress."""
    from learndyn.generation import generate

    texts = generate(model, tokenizer, [p.prompt for p in prompts], max_new_tokens=settings.max_new_tokens,
                     batch_size=settings.batch_size, do_sample=settings.sample, temperature=settings.temperature,
                     seed=settings.seed if settings.sample else None, progress=progress)
    meta = {"model": model_name, **settings.to_row()}
    return [{"example_id": p.example_id, "prompt": p.prompt, "response": text, **meta}
            for p, text in zip(prompts, texts)]


def generate_file(
    model_spec: str,
    data: str,
    out: str | Path,
    settings: DecodingSettings = DecodingSettings(),
    *,
    n: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> list[dict[str, Any]]:
    """`learndyn generate`: load the model of `model_spec` (see `resolve_model`), answer the first
    `n` prompts of `data` and write the rows to `out` atomically; returns the rows."""
    from learndyn.data import load_preferences
    from learndyn.models import load_model

    if n is not None and n < 1:
        raise LearndynError(f"--n must be at least 1, got {n}")
    prompts = load_preferences(data, limit=n, need_rejected=False)  # bad data fails before the model loads
    model, tokenizer = load_model(resolve_model(model_spec), device=device, dtype=dtype)
    rows = generate_responses(model, tokenizer, prompts, settings, model_name=str(model_spec))
    write_responses(rows, out)
    return rows
