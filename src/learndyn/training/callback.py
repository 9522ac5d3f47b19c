"""LearningDynamicsCallback: score the probe set during any transformers/TRL training run.

    trainer.add_callback(LearningDynamicsCallback(probes, every=10, out="runs/sft"))

It only observes. At step 0, every `every` optimizer steps and at the end it scores every probe
response with the fast scorer (probes are tokenized once per run) and appends the rows, tagged with
phase/step/epoch, to RUN/metrics/ as one Parquet shard per evaluation, written atomically. Under
`accelerate launch`/`torchrun` every process scores a share of the probes (sharded FSDP2 models
included: ranks pad to the same number of forward calls), all rows are gathered, and only the main
process writes. Per-type means go to the trainer's logs: with `trainer=` through `trainer.log`, so that
`report_to` integrations (TensorBoard, W&B, ...) show them; without it into `state.log_history`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback

from learndyn.distributed import check_sharding, is_zero3, rank_and_world
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
        check_sharding(model)
        rank, world = rank_and_world()
        # every rank scores its share and receives all rows, in the order of self.encoded; under ZeRO-3
        # the head gathers its weight at each chunk, so every rank scores everything (untested)
        frame = score_encoded(model, self.encoded, batch_tokens=self.batch_tokens,
                              across_ranks=world > 1 and not is_zero3(model),
                              progress=f"Scoring probes at step {step}" if rank == 0 else None)
        if not frame["logp_sum"].map(math.isfinite).all():  # the same rows on every rank: all stop together
            self.nan_step = step
            return
        if rank != 0:
            return
        frame.insert(0, "epoch", float(state.epoch or 0.0))
        frame.insert(0, "step", step)
        frame.insert(0, "phase", self.phase)
        assert tuple(frame.columns[: len(KEY_COLUMNS)]) == KEY_COLUMNS
        write_shard(self.out, frame, self.phase, step)
        means = frame.groupby("response_type", sort=False)["logp_sum"].mean()
        logs = {f"probes/{name}/logp_sum": float(v) for name, v in means.items()}
        if self.trainer is not None:
            _log_through(self.trainer, logs)
        else:
            state.log_history.append({**logs, "epoch": float(state.epoch or 0.0), "step": step})


def _log_through(trainer: Any, logs: dict[str, float]) -> None:
    """`logs` to state.log_history and the report_to integrations, leaving the trainer's own logging
    as it was. The base `Trainer.log`, because TRL's trainers override `log` to flush the metrics they
    gather for their own next record (DPO's rewards/*, GRPO's reward and entropy), which would land
    in ours; and `should_log` is restored, because logging resets it, which would drop the trainer's
    own record of this step (its loss)."""
    should_log = trainer.control.should_log
    Trainer.log(trainer, logs)
    trainer.control.should_log = should_log


def _from_main_process(compute):
    """A value computed on the main process and shared, so that every process skips the same steps."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return compute()
    box = [compute() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
