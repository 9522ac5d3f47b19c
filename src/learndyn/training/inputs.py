"""What a run read, recorded so that `--resume` never joins two different inputs into one curve.

RUN/inputs.yaml (written beside config.yaml when a run starts) holds, for each setting that names
something on disk, its resolved path and a sha256 of its content:

    probes: {path: /abs/probes.jsonl, sha256: ...}
    data:   {path: /abs/data.jsonl, rows: '[:400]', sha256: ...}   absent for `example` and hub ids
    model:  {path: /abs/model-folder, sha256: ...}                absent for the built-in name, hub ids
    from:   {path: /abs/sft/checkpoints/final, sha256: ...}       the weights a chained run started from

A folder's hash covers every file's relative name and content, so a `--from` run overwritten with
other weights differs, while one spelled `./run/`, by an absolute path or from another working folder
does not. Files are read in 1 MiB blocks (about 0.6 GB/s here: a second for the built-in model).
A run made before this file existed (or stopped between the two writes) has no record: its inputs
count as unknown and are compared by the paths as written, with a warning.

This module reads files only: it imports neither torch nor transformers.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

from learndyn.atomic import atomic_path
from learndyn.errors import LearndynError

INPUTS_FILE = "inputs.yaml"
INPUT_SETTINGS = ("probes", "data", "model", "from")  # compared by identity, not by spelling
_BUILTIN_DATA = "example"  # learndyn.data.EXAMPLE_DATA; not imported, to keep this module light
_BLOCK = 1 << 20


def sha256_of(path: str | Path) -> str:
    """sha256 of a file's bytes, or of a folder's files (each relative name and content, sorted).
    Hidden entries (.git with LFS copies of the weights, .cache) are not read by a loader: skipped."""
    path = Path(path)
    if path.is_file():
        return _file_digest(path)
    outer = hashlib.sha256()
    files = (p for p in path.rglob("*") if p.is_file())
    for file in sorted(f for f in files if not any(part.startswith(".") for part in f.relative_to(path).parts)):
        outer.update(f"{file.relative_to(path).as_posix()}\0{_file_digest(file)}\n".encode())
    return outer.hexdigest()


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def identity(path: str | Path, **extra: str) -> dict[str, str]:
    """The record of one input on disk: its resolved path, its content hash and any `extra` fields."""
    return {"path": str(Path(path).resolve()), **extra, "sha256": sha256_of(path)}


def data_identity(spec: str) -> dict[str, str] | None:
    """The identity of preference data that is a local file (with its row range), else None.

    Follows `learndyn.data.load_preferences`: an optional `[START:STOP]` row range, then an optional
    `:train` (the only split a local file has); `example` is built in and hub ids are remote."""
    candidates = [(spec, "")]
    match = re.fullmatch(r"(.+)(\[[^\[\]]*\])", spec)
    if match:
        candidates.append((match.group(1), re.sub(r"\s", "", match.group(2))))
    for source, rows in list(candidates):
        candidates.append((source.rpartition(":")[0], rows))
    for source, rows in candidates:
        if source and source != _BUILTIN_DATA and Path(source).is_file():
            return identity(source, **({"rows": rows} if rows else {}))
    return None


def write_inputs(run: str | Path, inputs: dict[str, dict[str, str]]) -> None:
    import yaml

    with atomic_path(Path(run) / INPUTS_FILE) as tmp:
        tmp.write_text(yaml.safe_dump(inputs, sort_keys=False), encoding="utf-8")


def read_inputs(run: str | Path) -> dict[str, dict[str, str]] | None:
    """The recorded inputs of a run, or None for a run without a record (made by an older learndyn)."""
    import yaml

    path = Path(run) / INPUTS_FILE
    if not path.is_file():
        return None
    try:
        inputs = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError):
        inputs = None
    if not isinstance(inputs, dict) or not all(isinstance(v, dict) for v in inputs.values()):
        raise LearndynError(f"{path}: not a record of inputs (a mapping of setting to path and sha256); "
                            "delete it to compare this run's inputs by path only")
    return inputs


def differences(old: dict[str, Any], old_inputs: dict[str, dict[str, str]] | None,
                new: dict[str, Any], new_inputs: dict[str, dict[str, str]]) -> list[str]:
    """What differs between the settings and inputs a run was made with and those given now, one
    phrase each ("learning_rate: was 0.001, now 0.0001"). `out` is the folder itself, never compared;
    `old_inputs` None means unknown (paths as written are compared instead of content)."""
    found = [f"{key}: was {old.get(key)!r}, now {new.get(key)!r}" for key in _ordered(old, new)
             if key not in (*INPUT_SETTINGS, "out") and old.get(key) != new.get(key)]
    for key in INPUT_SETTINGS:
        if key == "model" and old.get("from") and new.get("from"):
            continue  # the model setting is ignored when a run starts from another run
        found += _input_difference(key, old.get(key), new.get(key),
                                   None if old_inputs is None else old_inputs.get(key), new_inputs.get(key),
                                   known=old_inputs is not None)
    return found


def _input_difference(key: str, old: Any, new: Any, old_id: dict | None, new_id: dict | None, *,
                      known: bool) -> list[str]:
    if not known:
        return [] if _same_path(old, new) else [f"{key}: was {old!r}, now {new!r}"]
    if old_id is None or new_id is None:
        if old_id is None and new_id is None and old == new:
            return []
        return [f"{key}: was {old!r}, now {new!r}"]
    found = []
    if old_id.get("sha256") != new_id.get("sha256"):
        where = "same path" if old_id.get("path") == new_id.get("path") else f"was {old_id.get('path')}"
        found.append(f"{key}: content of {new!r} differs ({where}; sha256 {str(old_id.get('sha256'))[:12]} "
                     f"then, {str(new_id.get('sha256'))[:12]} now)")
    if old_id.get("rows", "") != new_id.get("rows", ""):
        found.append(f"{key}: rows were {old_id.get('rows') or 'all'}, now {new_id.get('rows') or 'all'}")
    return found


def _same_path(old: Any, new: Any) -> bool:
    """Paths as written, for runs without a record: equal after normalising, or naming one place."""
    if old == new:
        return True
    if not (isinstance(old, str) and isinstance(new, str)):
        return False
    return os.path.normpath(old) == os.path.normpath(new) or Path(old).resolve() == Path(new).resolve()


def _ordered(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return list(new) + [key for key in old if key not in new]
