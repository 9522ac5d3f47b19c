"""Run directories: where a tracked training run keeps its settings and measurements.

    RUN/config.yaml            the fully resolved settings (written once, atomically)
    RUN/metrics/*.parquet      long-format probe scores, one shard per evaluation, written atomically
    RUN/checkpoints/           optional model checkpoints (final/ holds the end of the run)
    RUN/figures/, RUN/report.html, RUN/signatures.json   written by `learndyn report`

A metrics row is one (phase, step, example_id, response_type) with every scorer metric, so that
pandas/polars/DuckDB can slice it and any figure can be rebuilt from `metrics/` alone. This module
reads and writes files only: it imports neither torch nor transformers.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from learndyn.atomic import atomic_path
from learndyn.errors import LearndynError

# Columns of a metrics shard, before the scorer's metric columns (see learndyn.scoring.METRICS).
KEY_COLUMNS = ("phase", "step", "epoch", "example_id", "response_type")
PHASES = ("sft", "dpo")


def prepare_run(run: str | Path, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Create `run`, refusing to mix a new run with an old one's metrics unless asked."""
    run = Path(run)
    has_metrics = any((run / "metrics").glob("*.parquet"))
    if has_metrics and not (resume or overwrite):
        raise LearndynError(f"{run} already holds metrics; pass --resume to continue it or --overwrite to replace it")
    if overwrite and run.exists():
        for name in ("metrics", "checkpoints", "figures"):
            shutil.rmtree(run / name, ignore_errors=True)
    (run / "metrics").mkdir(parents=True, exist_ok=True)
    return run


def write_config(run: str | Path, config: dict[str, Any]) -> None:
    """Save the resolved settings as YAML, atomically."""
    import yaml

    with atomic_path(Path(run) / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def read_config(run: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(run) / "config.yaml"
    if not path.is_file():
        raise LearndynError(f"{run}: not a run folder (no config.yaml)")
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def shard_path(run: str | Path, phase: str, step: int) -> Path:
    return Path(run) / "metrics" / f"{phase}-step{step:08d}.parquet"


def write_shard(run: str | Path, frame: Any, phase: str, step: int) -> Path:
    """Write one evaluation's rows as a shard, atomically (a crash leaves the old shards intact)."""
    path = shard_path(run, phase, step)
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
    return path


def read_metrics(run: str | Path) -> Any:
    """All of a run's metrics rows as one DataFrame, ordered by phase and step."""
    import pandas as pd

    shards = sorted((Path(run) / "metrics").glob("*.parquet"))
    if not shards:
        raise LearndynError(f"{run}: no metrics (metrics/*.parquet) to read")
    frame = pd.concat([pd.read_parquet(s) for s in shards], ignore_index=True)
    order = {p: i for i, p in enumerate(PHASES)}
    return frame.sort_values(["phase", "step"], key=lambda col: col.map(order) if col.name == "phase" else col,
                             kind="stable").reset_index(drop=True)


def done_steps(run: str | Path, phase: str) -> set[int]:
    """Steps of `phase` already evaluated (a resumed run skips them)."""
    return {int(p.stem.rsplit("step", 1)[1]) for p in (Path(run) / "metrics").glob(f"{phase}-step*.parquet")}
