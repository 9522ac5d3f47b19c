"""Run directories: where a tracked training run keeps its settings and measurements.

    RUN/config.yaml            the fully resolved settings (written once, atomically)
    RUN/inputs.yaml            paths and content hashes of the input files (see inputs.py)
    RUN/metrics/*.parquet      long-format probe scores, one shard per evaluation, written atomically
    RUN/rewards/*.parquet      GRPO only: every sampled completion's reward (see grpo.py)
    RUN/checkpoints/final/     the model the run ended with (a model folder, or a LoRA adapter folder
                               with learndyn_base.json naming its base); `final_checkpoint`
    RUN/finished.yaml          written last, when training ended (its last step): `is_finished`
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
PHASES = ("sft", "dpo", "grpo")


# What a run writes (and --overwrite removes); anything else in the folder is the user's and stays.
RUN_OUTPUTS = ("finished.yaml", "metrics", "rewards", "checkpoints", "figures", "report.html", "signatures.json",
               "inputs.yaml")


def check_run_folder(run: str | Path, *, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse, before any work and without writing, a folder that this run must not touch: one that
    holds metrics (without --resume or --overwrite), or --overwrite on a folder that is not a run."""
    run = Path(run)
    if resume and overwrite:
        raise LearndynError("pass --resume or --overwrite, not both")
    if run.exists() and not run.is_dir():
        raise LearndynError(f"{run}: not a folder; a run folder is needed")
    has_metrics = bool(metric_shards(run))
    if has_metrics and not (resume or overwrite):
        raise LearndynError(f"{run} already holds metrics; pass --resume to continue it or --overwrite to replace it")
    if overwrite and run.exists() and not is_run(run) and not _is_empty(run):
        raise LearndynError(f"{run} is not a learndyn run (no config.yaml) and is not empty; --overwrite replaces "
                            "runs only, so nothing was deleted: choose another --out")


def final_checkpoint(run: str | Path) -> Path:
    """The model a finished run ended with (the start of a chained phase): a model folder, or a LoRA
    adapter folder whose base is recorded beside it (see `learndyn.models.adapter_base`). (models.py,
    which sits below training, finds it by the same path when a run folder is given as a model.)"""
    from learndyn.models import is_adapter

    path = Path(run) / "checkpoints" / "final"
    if not Path(run).is_dir():
        raise LearndynError(f"--from {run}: no such run folder")
    if not ((path / "config.json").is_file() or is_adapter(path)):
        raise LearndynError(f"--from {run}: no final checkpoint ({path}); did that run finish with save_model on?")
    return path


def is_finished(run: str | Path) -> bool:
    """A run whose training ended: it wrote finished.yaml, or (made before that file existed) its
    final model. A run that keeps no model (save_model off) is finished too, so --resume reuses it."""
    run = Path(run)
    if not (run / "config.yaml").is_file():
        return False
    if (run / "finished.yaml").is_file():
        return True
    try:
        return final_checkpoint(run).is_dir()
    except LearndynError:
        return False


def mark_finished(run: str | Path, step: int) -> None:
    """Record, last of all and atomically, that training ended at `step`."""
    import yaml

    with atomic_path(Path(run) / "finished.yaml") as tmp:
        tmp.write_text(yaml.safe_dump({"step": int(step)}), encoding="utf-8")


def is_run(run: str | Path) -> bool:
    """A folder that learndyn made a run in (it writes config.yaml before anything else)."""
    return (Path(run) / "config.yaml").is_file()


def _is_empty(run: Path) -> bool:
    """Nothing in it but the temporary files an interrupted atomic write may leave (.NAME.XXXX.tmp)."""
    return all(p.name.startswith(".") and p.name.endswith(".tmp") for p in run.iterdir())


def start_run(run: str | Path, config: dict[str, Any], inputs: dict[str, Any], *, overwrite: bool = False) -> Path:
    """Begin a run in `run` (already checked by `check_run_folder`): with `overwrite`, remove what an
    earlier run wrote (metrics first, so that a crash midway never leaves them beside new settings),
    then write config.yaml and inputs.yaml."""
    from learndyn.training.inputs import write_inputs

    run = Path(run)
    if overwrite and run.exists():
        for name in RUN_OUTPUTS:
            _remove(run / name)
    write_config(run, config)
    write_inputs(run, inputs)
    (run / "metrics").mkdir(parents=True, exist_ok=True)
    return run


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    except OSError as err:
        raise LearndynError(f"--overwrite: cannot remove {path} ({err.strerror or err})") from None


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


def metric_shards(run: str | Path, phase: str | None = None) -> list[Path]:
    """The run's metric shards (one Parquet file per evaluation), in file-name order, of `phase` or all."""
    return sorted((Path(run) / "metrics").glob(f"{phase}-step*.parquet" if phase else "*.parquet"))


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

    shards = metric_shards(run)
    if not shards:
        raise LearndynError(f"{run}: no metrics (metrics/*.parquet) to read")
    frame = pd.concat([pd.read_parquet(s) for s in shards], ignore_index=True)
    order = {p: i for i, p in enumerate(PHASES)}
    return frame.sort_values(["phase", "step"], key=lambda col: col.map(order) if col.name == "phase" else col,
                             kind="stable").reset_index(drop=True)


def reward_shards(run: str | Path) -> list[Path]:
    """A GRPO run's reward shards (RUN/rewards/, see training/grpo.py), in step order."""
    return sorted((Path(run) / "rewards").glob("*.parquet"))


def read_rewards(run: str | Path) -> Any:
    """Every sampled completion's reward in a GRPO run (columns step, example_id, generation, reward,
    completion_tokens), or None when the run kept none."""
    import pandas as pd

    shards = reward_shards(run)
    if not shards:
        return None
    frame = pd.concat([pd.read_parquet(s) for s in shards], ignore_index=True)
    return frame.drop_duplicates(["step", "example_id", "generation"], keep="last").reset_index(drop=True)


def done_steps(run: str | Path, phase: str) -> set[int]:
    """Steps of `phase` already evaluated (a resumed run skips them)."""
    return {int(p.stem.rsplit("step", 1)[1]) for p in metric_shards(run, phase)}
