"""Preference data: many on-disk formats in, one record type (`Preference`) out.

Accepted sources: the built-in `example` set, the built-in `arithmetic` task (seeded questions with
an exact-match reward, for RL finetuning; see learndyn.arithmetic), a local .jsonl/.json/.parquet/.csv file, or a Hugging
Face hub dataset id, each optionally followed by `:SPLIT` (default `train`) and then by a row range
`[START:STOP]` in Python's slice notation (`data.jsonl[:400]`, `data.jsonl[400:]`), which splits one
file into training and held-out parts; rows keep their file positions as default ids. Rows hold
`prompt/chosen/rejected` as plain text or chat messages, or (Anthropic-HH style) only
`chosen/rejected` full transcripts, split at the last "\\n\\nAssistant:".

The two sides of a pair must share one prompt: an HH transcript or a conversation whose rejected side
differs from chosen before the last answer is refused with its file and row (DPO would compare answers
to different questions). A pair whose rejected equals chosen loads, with a warning that counts them:
it gives DPO no signal. A CSV file is parsed strictly: a quote left open (which would swallow the rows
after it) is an error naming the line where its row starts.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from learndyn.errors import LearndynError, first_line
from learndyn.vocab import canonical_type

Messages = list[dict[str, str]]
Prompt = str | Messages

log = logging.getLogger(__name__)

EXAMPLE_DATA = "example"
TASK_DATA = "arithmetic"  # the built-in verifiable task (learndyn.arithmetic), for RL finetuning
_OWN_COLUMNS = frozenset({"example_id", "id", "prompt", "chosen", "rejected"})
HH_MARKER = "\n\nAssistant:"


@dataclass(frozen=True)
class Preference:
    """One preference example: a prompt, its chosen and rejected responses, and any extra probes.

    `extras` holds further responses already present in the source (rephrases, the authors' probe
    columns), keyed by their probe-vocabulary name; `columns` the source's other columns (a task's
    `answer`, ...), which RL finetuning hands to the reward function as TRL does.
    """

    example_id: str
    prompt: Prompt
    chosen: str
    rejected: str | None
    extras: dict[str, str] = field(default_factory=dict)
    columns: dict[str, Any] = field(default_factory=dict)


def empty_sides(pref: Preference) -> list[str]:
    """The sides of a pair that are blank: "chosen", "rejected" (loaded with `keep_empty`)."""
    return [side for side in ("chosen", "rejected") if not (getattr(pref, side) or "").strip()]


def render_prompt(prompt: Prompt, tokenizer: Any) -> str:
    """Turn a prompt into the exact text the model sees.

    Plain text is used as written (e.g. HH transcripts ending in "\\n\\nAssistant:"); a conversation
    goes through the tokenizer's chat template with the generation prompt appended, so the response
    that follows is what the assistant would say next.
    """
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise LearndynError(
            "the prompt is a conversation but the tokenizer has no chat template; "
            "give plain-text prompts or a chat model"
        )
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def plain_text(value: Prompt) -> str:
    """Text as is; chat messages as their contents joined (TRL hands a chat completion over as
    [{"role": "assistant", "content": ...}])."""
    if isinstance(value, str):
        return value
    return "".join(str(message.get("content") or "") for message in value)


def prompt_room(max_length: int, longest: int) -> int:
    """Tokens a prompt may keep beside its longest response: what is left, but at least half of
    `max_length` (a long response gets cut rather than its context lost). Scoring and training share it."""
    return max(max_length - longest, max_length // 2)


def fit_prompts(prefs: list[Preference], tokenizer: Any, max_length: int) -> tuple[list[Preference], int]:
    """Shorten the prompts that leave their longest response no room in `max_length` tokens; returns
    the preferences and how many prompts were cut.

    TRL keeps the start of a sequence that is too long and drops the rows left without a response
    token, so without this a long prompt is silently never trained on (15% of HH prompts at 256
    tokens). The cut follows the scorer's policy (`scoring.encode_probes`): the prompt keeps its most
    recent tokens (`prompt_room`). A text prompt loses its first tokens; a conversation
    loses its oldest turns (it then starts at a user turn, after any system message), never its last.
    """
    fitted, cut = [], 0
    for pref in prefs:
        longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in (pref.chosen, pref.rejected)
                      if r is not None) + 1  # EOS
        room = prompt_room(max_length, longest) - 2  # 2: special tokens, merges across the cut
        prompt = _cut_text(pref.prompt, tokenizer, room) if isinstance(pref.prompt, str) else \
            _cut_turns(pref.prompt, tokenizer, room)
        cut += prompt != pref.prompt
        fitted.append(pref if prompt == pref.prompt else replace(pref, prompt=prompt))
    return fitted, cut


def _cut_text(prompt: str, tokenizer: Any, room: int) -> str:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return prompt if len(ids) <= room else tokenizer.decode(ids[len(ids) - room:])


def _cut_turns(prompt: Messages, tokenizer: Any, room: int) -> Messages:
    head = prompt[:1] if prompt[0]["role"] == "system" else []
    starts = [len(head), *(i for i, m in enumerate(prompt) if i > len(head) and m["role"] == "user")]
    for start in starts:  # oldest first: keep as much of the conversation as fits
        kept = head + prompt[start:]
        if len(tokenizer(render_prompt(kept, tokenizer), add_special_tokens=False)["input_ids"]) <= room:
            return kept
    return head + prompt[starts[-1]:]


def load_preferences(spec: str, *, limit: int | None = None, need_rejected: bool = True,
                     keep_empty: bool = False) -> list[Preference]:
    """Load preference data from `spec` (see the module docstring) into `Preference` records.

    A blank chosen or rejected response stops the load with its file and line, unless `keep_empty`:
    then the pair loads with that side "" (for `forecast`, which notes such a pair in its row)."""
    if limit is not None and limit < 1:
        raise LearndynError(f"limit must be a positive integer, got {limit}")
    spec_, rows_range = _range_spec(spec)
    source, split = _split_spec(spec_)
    rows: Iterator[tuple[int, tuple[str, dict[str, Any]]]] = enumerate(_read_rows(source, split))
    if rows_range is not None:
        rows = _take(rows, rows_range)
    prefs: list[Preference] = []
    seen: set[str] = set()
    same: list[str] = []  # where rejected == chosen
    for index, (where, row) in rows:
        if limit is not None and len(prefs) >= limit:
            break
        pref = _to_preference(row, where, default_id=str(index), need_rejected=need_rejected, keep_empty=keep_empty)
        if pref.example_id in seen:
            raise LearndynError(f"{where}: duplicate example_id '{pref.example_id}'")
        seen.add(pref.example_id)
        if pref.rejected is not None and pref.rejected == pref.chosen:
            same.append(where)
        prefs.append(pref)
        if limit is not None and len(prefs) >= limit:
            break  # stop before reading the next row: rows after the limit may be anything
    if not prefs:
        raise LearndynError(f"{spec}: no examples")
    if same and need_rejected:
        log.warning(f"{spec}: {len(same)} of {len(prefs)} pairs have rejected identical to chosen (first at "
                    f"{same[0]}); they carry no preference (a zero DPO gradient)")
    return prefs


def read_records(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Rows of a local file as `(location, row)`, location naming the file and line for errors."""
    path = Path(path)
    readers = {".jsonl": _jsonl_rows, ".json": _json_rows, ".parquet": _parquet_rows, ".csv": _csv_rows}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise LearndynError(f"{path}: unsupported file type '{path.suffix}'; valid: {', '.join(readers)}")
    if not path.is_file():
        raise LearndynError(f"{path}: file not found")
    return reader(path)


def _range_spec(spec: str) -> tuple[str, slice | None]:
    """Split a trailing `[START:STOP]` row range off `spec` (unless `spec` names an existing path)."""
    match = re.fullmatch(r"(.+)\[\s*(-?\d*)\s*:\s*(-?\d*)\s*\]", spec)
    if match is None or Path(spec).exists():
        if spec.endswith("]") and "[" in spec and not Path(spec).exists():
            raise LearndynError(f"{spec}: a row range is written [START:STOP] with whole numbers, e.g. [:400] or [400:]")
        return spec, None
    start, stop = (int(x) if x else None for x in match.group(2, 3))
    return match.group(1), slice(start, stop)


def _take(rows: Iterator[tuple[int, Any]], rows_range: slice) -> Iterator[tuple[int, Any]]:
    """The rows of a range, keeping their positions; negative bounds read the source to its end."""
    if (rows_range.start or 0) >= 0 and (rows_range.stop is None or rows_range.stop >= 0):
        return itertools.islice(rows, rows_range.start, rows_range.stop)
    return iter(list(rows)[rows_range])


def _split_spec(spec: str) -> tuple[str, str]:
    if Path(spec).exists():
        return spec, "train"
    name, sep, split = spec.rpartition(":")
    if sep and name and split and "/" not in split:
        return name, split
    return spec, "train"


def _read_rows(source: str, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    if source == TASK_DATA:
        return _task_rows(split)
    if source == EXAMPLE_DATA:
        path = resources.files("learndyn") / "resources" / f"example_{split}.jsonl"
        if not path.is_file():
            raise LearndynError(f"built-in data '{EXAMPLE_DATA}' has no split '{split}'; valid: train, test")
        return _jsonl_rows(Path(str(path)))
    path = Path(source)
    if path.suffix.lower() in {".jsonl", ".json", ".parquet", ".csv"} or path.exists():
        if split != "train":
            raise LearndynError(f"{source}: a local file has no splits (':{split}' applies to hub ids and 'example')")
        return read_records(path)
    return _hub_rows(source, split)


def _task_rows(split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """The built-in task's questions, TASK_SIZE per split (train: seed 0, test: seed 1)."""
    from learndyn.arithmetic import TASK_SIZE, questions

    seeds = {"train": 0, "test": 1}
    if split not in seeds:
        raise LearndynError(f"built-in task '{TASK_DATA}' has no split '{split}'; valid: train, test")
    for i, q in enumerate(questions(TASK_SIZE, seed=seeds[split])):
        yield f"{TASK_DATA}:{split} row {i}", {"id": q.example_id, "prompt": q.prompt, "chosen": q.chosen,
                                               "rejected": q.rejected, **q.extras, **q.columns}


def _hub_rows(dataset_id: str, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        import datasets

        data = datasets.load_dataset(dataset_id, split=split)
    except Exception as err:  # datasets raises many types for offline/missing/private
        first = first_line(err)
        raise LearndynError(
            f"cannot load dataset '{dataset_id}' split '{split}' (not a local file; hub offline or id wrong?): {first}"
        ) from None
    return ((f"{dataset_id}[{split}] row {i}", row) for i, row in enumerate(data))


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise LearndynError(f"{where}: not UTF-8 text (byte {err.start})") from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                raise LearndynError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict):
                raise LearndynError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row


def _json_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise LearndynError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise LearndynError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} style
    if not isinstance(data, list):
        raise LearndynError(f"{path}: expected a list of objects")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise LearndynError(f"{path}: item {i} is not an object")
        yield f"{path}: item {i}", row


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises ArrowInvalid and OSError variants
        raise LearndynError(f"{path}: not a readable Parquet file ({first_line(err)})") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}: row {i}", row


def _csv_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Rows of a CSV file, parsed strictly: the lenient default reads an unclosed quote as a field that
    swallows every row after it (or up to the next quote), losing them without a word."""
    import csv

    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise LearndynError(f"{path}: not UTF-8 text (byte {err.start})") from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    while True:
        start = reader.line_num + 1  # the line this row starts on
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise LearndynError(f"{path}:{start}: malformed CSV ({err}); is a quote in this row left open?") from None
        if not cells:
            continue
        if header is None:
            header = cells
            continue
        if len(cells) > len(header):
            raise LearndynError(f"{path}:{start}: {len(cells)} fields but the header names {len(header)}")
        # An empty CSV cell means "absent", as a null does in the other formats.
        yield f"{path}:{start}", {k: _maybe_json(v) for k, v in zip(header, cells) if v != ""}


def _maybe_json(value: str | None) -> Any:
    """CSV cells holding conversations are JSON lists; decode those, keep other text as is."""
    if value and value.lstrip().startswith("[{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _to_preference(row: dict[str, Any], where: str, *, default_id: str, need_rejected: bool,
                   keep_empty: bool = False) -> Preference:
    example_id = str(row.get("example_id", row.get("id", default_id)))
    if "chosen" not in row or row["chosen"] is None:
        raise LearndynError(f"{where}: missing field 'chosen'")
    if need_rejected and row.get("rejected") is None:
        raise LearndynError(f"{where}: missing field 'rejected' (needed for preference pairs)")
    if row.get("prompt") is not None:
        prompt = parse_prompt(row["prompt"], where)
        if not isinstance(row["chosen"], str) and row.get("rejected") is not None:
            _check_same_context(_messages(row["chosen"], where, "chosen"), row["rejected"], where)
        chosen = _response(row["chosen"], where, "chosen", keep_empty)
        rejected = (_response(row["rejected"], where, "rejected", keep_empty) if row.get("rejected") is not None
                    else None)
    else:
        prompt, chosen, rejected = _implicit_prompt(row, where, keep_empty)
    extras, columns = {}, {}
    for column, value in row.items():
        name = canonical_type(column)
        if name is None and column not in _OWN_COLUMNS:
            columns[column] = value
        if name in (None, "chosen", "rejected") or value is None or value == "":
            continue
        extras[name] = _response(value, where, column)
    return Preference(example_id, prompt, chosen, rejected, extras, columns)


def parse_prompt(value: Any, where: str) -> Prompt:
    if isinstance(value, str):
        if not value.strip():
            raise LearndynError(f"{where}: field 'prompt' is empty")
        return value
    messages = _messages(value, where, "prompt")
    if not messages:
        raise LearndynError(f"{where}: field 'prompt' is an empty conversation")
    return messages


def _response(value: Any, where: str, name: str, keep_empty: bool = False) -> str:
    if not isinstance(value, str):
        messages = _messages(value, where, name)
        if not messages and not keep_empty:
            raise LearndynError(f"{where}: field '{name}' is an empty conversation")
        value = messages[-1]["content"] if messages else ""
    if not value.strip():
        if keep_empty:
            return ""
        raise LearndynError(f"{where}: field '{name}' is empty")
    return value


def _messages(value: Any, where: str, name: str) -> Messages:
    try:
        messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in list(value)]
    except (TypeError, KeyError):
        raise LearndynError(
            f"{where}: field '{name}' must be text or a list of {{'role', 'content'}} messages"
        ) from None
    return messages


def _implicit_prompt(row: dict[str, Any], where: str, keep_empty: bool = False) -> tuple[Prompt, str, str | None]:
    """No `prompt` column: the prompt is the part shared by chosen and rejected."""
    chosen_raw, rejected_raw = row["chosen"], row.get("rejected")
    if isinstance(chosen_raw, str):
        if HH_MARKER not in chosen_raw:
            raise LearndynError(
                f"{where}: no 'prompt' field and 'chosen' is not an HH transcript (no '\\n\\nAssistant:')"
            )
        cut = chosen_raw.rindex(HH_MARKER) + len(HH_MARKER)
        prompt, chosen = chosen_raw[:cut], chosen_raw[cut:]
        rejected = None
        if rejected_raw is not None:
            if not isinstance(rejected_raw, str) or HH_MARKER not in rejected_raw:
                raise LearndynError(f"{where}: 'rejected' is not an HH transcript like 'chosen'")
            cut = rejected_raw.rindex(HH_MARKER) + len(HH_MARKER)
            if rejected_raw[:cut] != prompt:
                raise LearndynError(f"{where}: 'rejected' has another prompt than 'chosen' (the transcripts differ "
                                    f"from character {_first_difference(prompt, rejected_raw[:cut])} on, before "
                                    "the last '\\n\\nAssistant:'); a pair must answer one prompt")
            rejected = rejected_raw[cut:]
        for name, text in (("chosen", chosen), ("rejected", rejected)):
            if text is not None and not text.strip() and not keep_empty:
                raise LearndynError(f"{where}: field '{name}' has an empty final assistant turn")
        chosen, rejected = ("" if text is not None and not text.strip() else text for text in (chosen, rejected))
        return prompt, chosen, rejected
    messages = _messages(chosen_raw, where, "chosen")
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise LearndynError(f"{where}: no 'prompt' field and 'chosen' does not end with an assistant turn")
    rejected = None
    if rejected_raw is not None:
        _check_same_context(messages, rejected_raw, where)
        rejected = _response(rejected_raw, where, "rejected", keep_empty)
    return messages[:-1], _response(messages, where, "chosen", keep_empty), rejected


def _check_same_context(chosen: Messages, rejected_raw: Any, where: str) -> None:
    """A conversation given as `rejected` must be chosen's conversation with another last assistant
    turn (plain text is a bare response, with no context to disagree with)."""
    if isinstance(rejected_raw, str) or not chosen:
        return
    rejected = _messages(rejected_raw, where, "rejected")
    if not rejected:
        return  # `_response` names the empty conversation
    if rejected[:-1] != chosen[:-1]:
        raise LearndynError(f"{where}: 'rejected' has another prompt than 'chosen' (the conversations differ from "
                            f"turn {_first_difference(chosen[:-1], rejected[:-1])} on, before the last answer); "
                            "a pair must answer one prompt")
    if rejected[-1]["role"] != chosen[-1]["role"]:
        raise LearndynError(f"{where}: 'rejected' ends with a '{rejected[-1]['role']}' turn where 'chosen' ends "
                            f"with '{chosen[-1]['role']}'")


def _first_difference(a: Any, b: Any) -> int:
    """Position (from 0) of the first item where two sequences differ, or the shorter one's length."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
