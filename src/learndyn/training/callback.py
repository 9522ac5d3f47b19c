"""LearningDynamicsCallback: score the probe set during any transformers/TRL training run.

    trainer.add_callback(LearningDynamicsCallback(probes, every=10, out="runs/sft"))

It only observes. At step 0, every `every` optimizer steps and at the end it scores every probe
response with the fast scorer (probes are tokenized once per run) and appends the rows, tagged with
phase/step/epoch, to RUN/metrics/ as one Parquet shard per evaluation, written atomically. Under
`accelerate launch`/`torchrun` the probes are split across processes and only the main process
writes. Per-type means go to the trainer's logs: with `trainer=` through `trainer.log`, so that
`report_to` integrations (TensorBoard, W&B, ...) show them; without it into `state.log_history`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from learndyn.errors import LearndynError
from learndyn.probes.files import Probe, read_probes
from learndyn.scoring import encode_probes, score_encoded
from learndyn.training.runs import KEY_COLUMNS, done_steps, write_shard


class LearningDynamicsCallback(TrainerCallback):
    """Track how training moves the log-probability of every probe response (see module docstring)."""

    def __init__(
        self,
        probes: Sequence[Probe] | str | Path,
        out: str | Path,
        every: int = 10,
        *,
        phase: str = "sft",
        tokenizer: Any = None,
        trainer: Any = None,
        types: Sequence[str] | None = None,
        max_length: int | None = None,
        batch_tokens: int | None = None,
    ):
        if every < 1:
            raise LearndynError(f"every must be at least 1 optimizer step, got {every}")
        self.probes = read_probes(probes) if isinstance(probes, (str, Path)) else list(probes)
        if not self.probes:
            raise LearndynError("the probe set is empty")
        self.out, self.every, self.phase = Path(out), every, phase
        self.tokenizer, self.trainer, self.types = tokenizer, trainer, types
        self.max_length, self.batch_tokens = max_length, batch_tokens
        self.encoded: list | None = None
        self.done: set[int] = set()
        self.nan_step: int | None = None

    # -- trainer events -------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        tokenizer = self.tokenizer or processing_class
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps its tokenizer
        if tokenizer is None:
            raise LearndynError("LearningDynamicsCallback needs a tokenizer: pass tokenizer=")
        if self.encoded is None:  # once per run, not per evaluation
            self.encoded = encode_probes(self.probes, tokenizer, types=self.types, max_length=self.max_length)
        self.done = _from_main_process(lambda: done_steps(self.out, self.phase))  # a resumed run keeps these
        self._evaluate(args, state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self._evaluate(args, state, model)
        if self.nan_step is not None:
            control.should_training_stop = True

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._evaluate(args, state, model)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        loss = logs.get("loss")
        if loss is not None and not math.isfinite(loss):
            self.nan_step = state.global_step
            control.should_training_stop = True

    # -- the work -------------------------------------------------------------------------------
    def _evaluate(self, args, state, model) -> None:
        step = state.global_step
        if step in self.done or model is None or self.nan_step is not None:
            return
        self.done.add(step)
        rank, world = _rank_and_world(args)
        frame = score_encoded(model, self.encoded[rank::world], batch_tokens=self.batch_tokens,
                              progress=f"Scoring probes at step {step}" if rank == 0 else None)
        diverged = not frame["logp_sum"].map(math.isfinite).all()
        if world > 1:
            diverged = _any_rank(diverged, model.device)
        if diverged:  # keep only finite evaluations; every rank stops together
            self.nan_step = step
            return
        if world > 1:
            frame = _gather_frames(frame, rank, world)
        if rank != 0:
            return
        order = {enc.example_id: i for i, enc in enumerate(self.encoded)}
        frame = frame.sort_values("example_id", key=lambda ids: ids.map(order), kind="stable", ignore_index=True)
        frame.insert(0, "epoch", float(state.epoch or 0.0))
        frame.insert(0, "step", step)
        frame.insert(0, "phase", self.phase)
        assert tuple(frame.columns[: len(KEY_COLUMNS)]) == KEY_COLUMNS
        write_shard(self.out, frame, self.phase, step)
        means = frame.groupby("response_type", sort=False)["logp_sum"].mean()
        logs = {f"probes/{name}/logp_sum": float(v) for name, v in means.items()}
        if self.trainer is not None:
            self.trainer.log(logs)  # reaches report_to integrations and state.log_history
        else:
            state.log_history.append({**logs, "epoch": float(state.epoch or 0.0), "step": step})


def _rank_and_world(args) -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return getattr(args, "process_index", 0), 1


def _from_main_process(compute):
    """A value computed on the main process and shared, so that every process skips the same steps."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return compute()
    box = [compute() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _any_rank(flag: bool, device) -> bool:
    import torch
    import torch.distributed as dist

    value = torch.tensor([1.0 if flag else 0.0], device=device)  # on the GPU under NCCL
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _gather_frames(frame, rank: int, world: int):
    """Collect every process's rows on the main process (ranks hold interleaved probe slices)."""
    import pandas as pd
    import torch.distributed as dist

    parts = [None] * world if rank == 0 else None
    dist.gather_object(frame, parts, dst=0)
    if rank != 0:
        return frame
    return pd.concat(parts, ignore_index=True)
