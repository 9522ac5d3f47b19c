"""Response files: a model's answers to prompts, written by `generate` and `compare`, read by judges
and the intrinsic measures. This module owns the format; evaluation/responses.py makes the answers.

One JSONL row per prompt, in the data's order:

    example_id      the prompt's id in the preference data (default: the row number)
    prompt          as in the data: text, or chat messages [{"role", "content"}]
    response        the generated text (new tokens only, special tokens dropped, stripped)
    model           the model spec as given (a run folder, a model folder, a hub id, ...)
    decoding        "greedy" or "sample"
    max_new_tokens  the cap on response length, in tokens
    temperature     sampling temperature (null when greedy)
    seed            sampling seed (null when greedy)

Only `prompt` and `response` are required to read a file (a user's own answers may carry nothing
else). Every row we write carries the settings so that a file says how it was made even when copied
alone. Errors name the file and line.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from learndyn.atomic import write_jsonl
from learndyn.data import parse_prompt, read_records
from learndyn.errors import LearndynError

__all__ = ["RESPONSE_FIELDS", "read_response_records", "read_responses", "write_responses"]

RESPONSE_FIELDS = ("example_id", "prompt", "response", "model", "decoding", "max_new_tokens", "temperature", "seed")


def write_responses(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Write response rows as JSONL (UTF-8, one object per line), atomically."""
    write_jsonl(path, rows)


def read_response_records(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """(file:line, row) for every row, `prompt` parsed and `response` checked; an empty file is an error."""
    records = []
    for where, row in read_records(path):
        for name in ("prompt", "response"):
            if row.get(name) is None:
                raise LearndynError(f"{where}: missing field '{name}'")
        if not isinstance(row["response"], str):
            raise LearndynError(f"{where}: field 'response' must be text")
        records.append((where, dict(row, prompt=parse_prompt(row["prompt"], where))))
    if not records:
        raise LearndynError(f"{path}: no responses")
    return records


def read_responses(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a response file, each with a unique `example_id` (the row number when absent)."""
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for index, (where, row) in enumerate(read_response_records(path)):
        row = dict(row, example_id=str(row.get("example_id", index)))
        if row["example_id"] in seen:
            raise LearndynError(f"{where}: duplicate example_id '{row['example_id']}'")
        seen.add(row["example_id"])
        rows.append(row)
    return rows
