"""Judge two response files pairwise, in both orders, into a verdict file that doubles as a cache.

Response files are JSONL (or any format `read_records` reads) with `prompt` (text or chat messages)
and `response`, as `learndyn generate` writes them; row i of file A and row i of file B form pair i
and must hold the same prompt. The verdict file has one JSON row per pair:

    index                pair number (row number in the response files, from 0)
    example_id           file A's example_id, when it has one
    prompt, response_a, response_b
    judge                the judge's spec, e.g. "openai:gpt-4o-mini" or "local:smollm2-135m-instruct"
    raw_ab, raw_ba       the judge's output with file A's response shown first (ab) and second (ba)
    verdict_ab/_ba       each order's verdict relative to the files: "A" (file A's response won),
                         "B", "tie" or "unparsed"
    score_ab/_ba         the judge's log-odds for file A's response in each order (local judge; else null)
    tie_margin           the local judge's tie margin (local judge only)
    verdict              the pair's verdict from both orders (the judge's `combine`: votes for API
                         judges, mean log-odds for the local judge)

Rows are appended and flushed after every batch, so an interrupted or failed run loses no finished
verdict. A rerun into the same file keeps the rows already there and judges only the missing pairs:
an API judge is never paid twice for a pair. Rows made by another judge, or for other responses,
are refused rather than mixed in (pass `overwrite=True` to start again).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from learndyn.atomic import write_jsonl
from learndyn.data import Prompt
from learndyn.errors import LearndynError
from learndyn.judging.judges import Judge, Judgment, JudgingFailed
from learndyn.progress import progress as progress_bar
from learndyn.responses import read_response_records

__all__ = ["Judged", "Pair", "judge_files", "read_pairs", "read_verdicts"]

_FLIP = {"A": "B", "B": "A", "tie": "tie", "unparsed": "unparsed"}
_ROW_FIELDS = ("index", "prompt", "response_a", "response_b", "judge", "verdict_ab", "verdict_ba", "verdict")


@dataclass(frozen=True)
class Pair:
    """Row `index` of both response files: one prompt and the two responses to compare."""

    index: int
    prompt: Prompt
    response_a: str
    response_b: str
    example_id: str | None = None


@dataclass
class Judged:
    """What `judge_files` did: the verdict rows of the requested pairs, in pair order, and how many
    of them were reused from the verdict file rather than judged now."""

    rows: list[dict[str, Any]]
    reused: int
    out: Path


def read_pairs(a_path: str | Path, b_path: str | Path) -> list[Pair]:
    """Pair row i of file A with row i of file B, refusing files whose prompts differ.

    The error names the first mismatch: both files' lines and a short excerpt of each prompt from
    where they start to differ, or the first row without a partner when the lengths differ.
    """
    rows_a, rows_b = read_response_records(a_path), read_response_records(b_path)
    for index, ((where_a, row_a), (where_b, row_b)) in enumerate(zip(rows_a, rows_b)):
        if row_a["prompt"] != row_b["prompt"]:
            text_a, text_b = _prompt_key(row_a["prompt"]), _prompt_key(row_b["prompt"])
            raise LearndynError(
                f"{where_a} and {where_b}: the prompts of pair {index} differ (A: {_excerpt(text_a, text_b)!r}, "
                f"B: {_excerpt(text_b, text_a)!r}); the files must hold the same prompts in the same order")
    if len(rows_a) != len(rows_b):
        longer, shorter = (rows_a, b_path) if len(rows_a) > len(rows_b) else (rows_b, a_path)
        where = longer[min(len(rows_a), len(rows_b))][0]
        raise LearndynError(f"{where}: no partner row in {shorter} ({len(rows_a)} rows in {a_path}, "
                            f"{len(rows_b)} in {b_path}); the files must hold the same prompts in the same order")
    return [Pair(i, a["prompt"], a["response"], b["response"],
                 str(a["example_id"]) if a.get("example_id") is not None else None)
            for i, ((_, a), (_, b)) in enumerate(zip(rows_a, rows_b))]


def judge_files(
    a_path: str | Path,
    b_path: str | Path,
    judge: Judge,
    out_path: str | Path,
    *,
    max_pairs: int | None = None,
    overwrite: bool = False,
    progress: str | None = "Judging",
) -> Judged:
    """Judge the first `max_pairs` pairs of two response files in both orders; write `out_path`.

    Verdicts already in `out_path` (same judge, same responses) are reused. If the judge fails, the
    error says how many verdicts were kept and that the same command finishes the rest.
    """
    if max_pairs is not None and max_pairs < 1:
        raise LearndynError(f"max_pairs must be at least 1, got {max_pairs}")
    pairs = read_pairs(a_path, b_path)[:max_pairs]
    out = Path(out_path)
    done = {} if overwrite else _cached(out, judge.spec, _margin(judge), pairs)
    todo = [pair for pair in pairs if pair.index not in done]
    if overwrite or not out.exists():
        _rewrite(out, [])
    finished = 0
    with open(out, "a", encoding="utf-8") as fh, progress_bar(progress, len(todo)) as advance:
        for start in range(0, len(todo), judge.pairs_per_call):
            batch = todo[start:start + judge.pairs_per_call]
            items = [item for p in batch for item in ((p.prompt, p.response_a, p.response_b),
                                                      (p.prompt, p.response_b, p.response_a))]
            try:
                judgments: list[Judgment | None] = list(judge.judge(items))
                error = None
            except JudgingFailed as err:
                judgments, error = err.done, err
            except LearndynError as err:
                judgments, error = [None] * len(items), err
            for k, pair in enumerate(batch):
                ab, ba = judgments[2 * k], judgments[2 * k + 1]
                if ab is not None and ba is not None:
                    row = _verdict_row(pair, judge, ab, ba)
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                    done[pair.index] = row
                    finished += 1
            fh.flush()
            os.fsync(fh.fileno())
            advance(len(batch))
            if error is not None:
                kept = sum(1 for p in pairs if p.index in done)
                raise LearndynError(f"{error}; kept {kept} of {len(pairs)} verdicts in {out}; "
                                    "rerun the same command to judge the rest") from None
    _sort_file(out)
    rows = [done[pair.index] for pair in pairs]
    return Judged(rows, reused=len(rows) - finished, out=out)


def read_verdicts(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a verdict file, in file order (a last line cut short by a killed run is skipped)."""
    path = Path(path)
    if not path.is_file():
        raise LearndynError(f"{path}: file not found")
    return list(_load(path)[0].values())


def _cached(path: Path, spec: str, margin: float | None, pairs: list[Pair]) -> dict[int, dict[str, Any]]:
    """The reusable rows of an existing verdict file by pair index, the file made ready to append to.

    Rows by another judge or tie margin, or whose prompt or responses differ from the pair of the
    same index, are refused: reusing them would mix two comparisons in one win rate.
    """
    if not path.exists():
        return {}
    rows, clean = _load(path)
    by_index = {pair.index: pair for pair in pairs}
    for row in rows.values():
        if row["judge"] != spec:
            raise LearndynError(f"{path} holds verdicts of judge '{row['judge']}', not '{spec}'; "
                                "choose another output file or overwrite it")
        if row.get("tie_margin") != margin:
            raise LearndynError(f"{path} holds verdicts made with tie margin {row.get('tie_margin')}, not {margin}; "
                                "choose another output file or overwrite it")
        pair = by_index.get(row["index"])
        if pair is not None and (row["prompt"], row["response_a"], row["response_b"]) != \
                (pair.prompt, pair.response_a, pair.response_b):
            raise LearndynError(f"{path}: the verdict of pair {row['index']} compares other responses than the "
                                "files now hold; choose another output file or overwrite it")
    if not clean:
        _rewrite(path, list(rows.values()))
    return rows


def _load(path: Path) -> tuple[dict[int, dict[str, Any]], bool]:
    """Rows by pair index, and whether the file ends cleanly (a newline after its last row)."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    rows: dict[int, dict[str, Any]] = {}
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            if lineno == len(lines):  # no newline after it: a write cut short; that pair is judged again
                break
            raise LearndynError(f"{path}:{lineno}: not a verdict row (malformed JSON)") from None
        if not isinstance(row, dict) or any(name not in row for name in _ROW_FIELDS):
            raise LearndynError(f"{path}:{lineno}: not a verdict row (needs {', '.join(_ROW_FIELDS)})")
        if row["index"] in rows:
            raise LearndynError(f"{path}:{lineno}: a second verdict for pair {row['index']}")
        rows[row["index"]] = row
    return rows, not data or data.endswith(b"\n")


def _verdict_row(pair: Pair, judge: Judge, ab: Judgment, ba: Judgment) -> dict[str, Any]:
    """Both orders relative to the files: in order ba, file A's response was shown second."""
    ba = replace(ba, verdict=_FLIP[ba.verdict], score=None if ba.score is None else -ba.score)
    row: dict[str, Any] = {"index": pair.index}
    if pair.example_id is not None:
        row["example_id"] = pair.example_id
    row.update(prompt=pair.prompt, response_a=pair.response_a, response_b=pair.response_b, judge=judge.spec,
               raw_ab=ab.raw, raw_ba=ba.raw, verdict_ab=ab.verdict, verdict_ba=ba.verdict,
               score_ab=ab.score, score_ba=ba.score, verdict=judge.combine(ab, ba))
    if _margin(judge) is not None:
        row["tie_margin"] = _margin(judge)
    return row


def _margin(judge: Judge) -> float | None:
    """A judge's tie margin, if it has one: it decides verdicts, so cached rows must share it."""
    return getattr(judge, "tie_margin", None)


def _prompt_key(prompt: Prompt) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)


def _excerpt(text: str, other: str, before: int = 12, width: int = 40) -> str:
    """About `width` characters of `text` from a little before where it first differs from `other`."""
    first = next((i for i, (x, y) in enumerate(zip(text, other)) if x != y), min(len(text), len(other)))
    start = max(0, first - before)
    piece = text[start:start + width]
    return ("…" if start else "") + piece + ("…" if start + width < len(text) else "")


def _rewrite(path: Path, rows: list[dict[str, Any]]) -> None:
    write_jsonl(path, rows)


def _sort_file(path: Path) -> None:
    """Put the rows in pair order (a resumed run appends the pairs it judges after the others)."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    indices = [row["index"] for row in rows]
    if indices != sorted(indices):
        _rewrite(path, sorted(rows, key=lambda row: row["index"]))
