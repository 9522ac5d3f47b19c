"""The probe file: JSONL, one row per prompt, `example_id`, `prompt` and one column per response type.

Reading also accepts the paper authors' column names (see `learndyn.vocab.AUTHOR_COLUMNS`), so their
HH probe file scores as is. An empty cell means "no probe of this type for this prompt".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from learndyn.atomic import write_jsonl
from learndyn.data import Prompt, parse_prompt, read_records
from learndyn.errors import LearndynError
from learndyn.vocab import IGNORED_COLUMNS, TYPE_NAMES, canonical_type, raise_unknown_type

_META_COLUMNS = frozenset({"example_id", "id", "prompt"})


@dataclass
class Probe:
    """One prompt and the responses whose log-probabilities we track, keyed by response type."""

    example_id: str
    prompt: Prompt
    responses: dict[str, str] = field(default_factory=dict)

    def to_row(self) -> dict:
        row: dict = {"example_id": self.example_id, "prompt": self.prompt}
        row.update((name, self.responses[name]) for name in TYPE_NAMES if name in self.responses)
        return row


def read_probes(path: str | Path, *, limit: int | None = None) -> list[Probe]:
    """Read a probe file (.jsonl, or any format `load_preferences` reads) into `Probe`s."""
    if limit is not None and limit < 1:
        raise LearndynError(f"limit must be a positive integer, got {limit}")  # not "empty probe file"
    probes: list[Probe] = []
    seen: set[str] = set()
    for index, (where, row) in enumerate(read_records(path)):
        if limit is not None and len(probes) >= limit:
            break
        if row.get("prompt") is None:
            raise LearndynError(f"{where}: missing field 'prompt'")
        example_id = str(row.get("example_id", row.get("id", index)))
        if example_id in seen:
            raise LearndynError(f"{where}: duplicate example_id '{example_id}'")
        seen.add(example_id)
        responses: dict[str, str] = {}
        for column, value in row.items():
            if column in _META_COLUMNS or column in IGNORED_COLUMNS:
                continue
            name = canonical_type(column)
            if name is None:
                raise_unknown_type(column, where)
            if value is None or value == "":
                continue
            if not isinstance(value, str):
                raise LearndynError(f"{where}: field '{column}' must be text")
            responses[name] = value
        if not responses:
            raise LearndynError(f"{where}: row has no responses to score")
        probes.append(Probe(example_id, parse_prompt(row["prompt"], where), responses))
        if limit is not None and len(probes) >= limit:
            break  # stop before reading the next row: rows after the limit may be anything
    if not probes:
        raise LearndynError(f"{path}: empty probe file")
    return probes


def write_probes(probes: list[Probe], path: str | Path) -> None:
    """Write probes as JSONL, atomically."""
    write_jsonl(path, (probe.to_row() for probe in probes))
