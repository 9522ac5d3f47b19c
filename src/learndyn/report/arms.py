"""Arms: the given runs, chained into the curves a reader compares.

An SFT run followed by a DPO run started from it is one experiment, so the report draws it as one
"arm": the SFT curve first, the DPO curve continuing on the same epoch axis (DPO epochs offset by the
SFT run's last epoch), a divider at the phase boundary. A DPO run is chained after the run its
config `from` names when that run is also given or exists on disk. An arm is "extended" if one of
its SFT runs trained on chosen and rejected (`extend: true`, the paper's dataset extension), else
"baseline"; a report compares arms of the two kinds. An arm whose DPO ran on-policy (`on_policy: true`,
pairs sampled from the policy at each step) is labelled so, e.g. "baseline, on-policy DPO"; an arm
with a GRPO run is labelled "GRPO" ("extended, GRPO" after an extended SFT).

Curves are per-type means over examples of one metric column, indexed by optimizer step. This module
reads files only (no torch, no model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from learndyn.errors import LearndynError
from learndyn.training.runs import KEY_COLUMNS, PHASES, metric_shards, read_config, read_metrics

KINDS = ("baseline", "extended")


@dataclass
class Segment:
    """One phase of one run, placed on its arm's x axis (x = epoch + offset)."""

    run: Path
    phase: str
    config: dict[str, Any]
    frame: pd.DataFrame  # this run's metrics rows of this phase
    offset: float = 0.0
    _tables: dict[str, pd.Series] = field(default_factory=dict, repr=False, compare=False)

    def per_example(self, response_type: str, metric: str = "logp_sum") -> pd.DataFrame | None:
        """Examples x steps of one type's metric, examples scored at every step only (None if absent).

        The signatures ask for many types of one segment, so each metric is grouped once and kept."""
        if metric not in self.frame:
            return None
        if metric not in self._tables:
            self._tables[metric] = self.frame.groupby(["response_type", "example_id", "step"])[metric].mean()
        grouped = self._tables[metric]
        if response_type not in grouped.index.get_level_values(0):
            return None
        table = grouped.xs(response_type, level="response_type").unstack("step").sort_index(axis=1).dropna()
        return None if table.empty else table

    def curve(self, response_type: str, metric: str = "logp_sum") -> pd.DataFrame:
        """Mean of `metric` over examples per step: columns step, epoch, x, value (empty if absent)."""
        rows = self.frame[self.frame["response_type"] == response_type]
        if rows.empty or metric not in rows:
            return pd.DataFrame(columns=["step", "epoch", "x", "value"])
        out = rows.groupby("step", sort=True).agg(epoch=("epoch", "mean"), value=(metric, "mean")).reset_index()
        out["epoch"] = out["epoch"].fillna(out["step"].astype(float))  # no epoch recorded: fall back to steps
        out["x"] = out["epoch"] + self.offset
        return out[["step", "epoch", "x", "value"]]

    @property
    def end_x(self) -> float:
        epochs = self.frame["epoch"].fillna(self.frame["step"].astype(float))
        return float(epochs.max()) + self.offset


@dataclass
class Arm:
    """The segments of one chained experiment, in training order."""

    label: str
    kind: str  # "baseline" or "extended"
    segments: list[Segment] = field(default_factory=list)
    on_policy: bool = False  # its DPO sampled its own pairs

    @property
    def runs(self) -> list[Path]:
        return list(dict.fromkeys(seg.run for seg in self.segments))

    def phase(self, name: str) -> Segment | None:
        """The last segment of phase `name` (the one a chained next phase started from)."""
        found = [seg for seg in self.segments if seg.phase == name]
        return found[-1] if found else None

    def types(self) -> set[str]:
        return {t for seg in self.segments for t in seg.frame["response_type"].unique()}

    def series(self, response_type: str, metric: str = "logp_sum") -> pd.DataFrame:
        """The plotted curve over all segments: columns segment (index), phase, step, epoch, x, value."""
        parts = []
        for i, seg in enumerate(self.segments):
            curve = seg.curve(response_type, metric)
            if not curve.empty:
                parts.append(curve.assign(segment=i, phase=seg.phase))
        if not parts:
            return pd.DataFrame(columns=["segment", "phase", "step", "epoch", "x", "value"])
        return pd.concat(parts, ignore_index=True)[["segment", "phase", "step", "epoch", "x", "value"]]

    def boundaries(self) -> list[tuple[float, str]]:
        """(x, "SFT | DPO") where one segment ends and the next begins."""
        return [(nxt.offset, f"{prev.phase.upper()} | {nxt.phase.upper()}")
                for prev, nxt in zip(self.segments, self.segments[1:])]


@dataclass
class _Run:
    path: Path
    config: dict[str, Any]
    frame: pd.DataFrame


def load_arms(runs: list[str | Path]) -> list[Arm]:
    """Read the given runs and chain them into arms, baseline arms first."""
    if not runs:
        raise LearndynError("no runs given to report on")
    by_key = {_key(Path(r)): _load(Path(r)) for r in runs}  # a run given twice counts once
    given = list(by_key.values())
    chains = [_chain(run, by_key) for run in given]
    inner = {_key(r.path) for chain in chains for r in chain[:-1]}
    # A run that another given run continues is drawn as the first part of that run's arm.
    arms = [_arm(chain) for chain in chains if _key(chain[-1].path) not in inner]
    _unique_labels(arms)
    return sorted(arms, key=lambda a: KINDS.index(a.kind))


def _load(path: Path) -> _Run:
    if not path.is_dir():
        raise LearndynError(f"{path}: no such run folder")
    config, frame = read_config(path), read_metrics(path)
    missing = [c for c in (*KEY_COLUMNS, "logp_sum") if c not in frame.columns]
    if missing:
        raise LearndynError(f"{path}: metrics lack the column(s) {', '.join(missing)}")
    if frame.empty:
        raise LearndynError(f"{path}: no metrics rows to report on")
    return _Run(path, config, frame)


def _key(path: Path) -> Path:
    return path.resolve()


def _chain(run: _Run, given: dict[Path, _Run]) -> list[_Run]:
    """`run` preceded by the runs it started from, oldest first."""
    chain = [run]
    while (parent := _parent(chain[0], given)) is not None:
        if any(_key(parent.path) == _key(r.path) for r in chain):
            break  # a loop of `from`s: stop rather than spin
        chain.insert(0, parent)
    return chain


def _parent(run: _Run, given: dict[Path, _Run]) -> _Run | None:
    """The run `run` started from: a given run, else a run folder on disk, else None (a model id)."""
    source = run.config.get("from")
    if not source:
        return None
    path = Path(str(source))
    if not path.exists():
        # A relative `from` written from another working folder: match a given run by its tail.
        tail = path.parts
        return next((r for k, r in given.items() if not path.is_absolute() and k.parts[-len(tail):] == tail
                     and k != _key(run.path)), None)
    # `from` may name the run folder or a checkpoint inside it (RUN/checkpoints/final).
    path = path.resolve()
    for folder in [path, *path.parents][:3]:
        if (folder / "config.yaml").is_file():
            if _key(folder) == _key(run.path):
                return None
            if _key(folder) in given:
                return given[_key(folder)]
            if metric_shards(folder):
                return _load(folder)
            return None
    return None


def _arm(chain: list[_Run]) -> Arm:
    segments: list[Segment] = []
    for run in chain:
        present = set(run.frame["phase"])
        for phase in [p for p in PHASES if p in present] + sorted(present - set(PHASES)):
            offset = segments[-1].end_x if segments else 0.0
            segments.append(Segment(run.path, phase, run.config, run.frame[run.frame["phase"] == phase], offset))
    sft = [r for r in chain if r.config.get("phase") == "sft"] or chain
    kind = "extended" if any(r.config.get("extend") for r in sft) else "baseline"
    on_policy = any(r.config.get("on_policy") for r in chain)
    label = f"{kind}, on-policy DPO" if on_policy else kind
    if any(r.config.get("phase") == "grpo" for r in chain):
        label = "GRPO" if kind == "baseline" else f"{kind}, GRPO"
    return Arm(label, kind, segments, on_policy)


def _unique_labels(arms: list[Arm]) -> None:
    """Arms sharing a label are named by their last run's folder instead (numbered if that repeats)."""
    for label in {a.label for a in arms}:
        same = [a for a in arms if a.label == label]
        if len(same) > 1:
            for arm in same:
                arm.label = arm.runs[-1].name
    seen: dict[str, int] = {}
    for arm in arms:
        seen[arm.label] = seen.get(arm.label, 0) + 1
        if seen[arm.label] > 1:
            arm.label = f"{arm.label} ({seen[arm.label]})"
