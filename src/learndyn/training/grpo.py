"""GRPO: RL finetuning with a verifiable reward, on TRL's GRPOTrainer, with every sample's reward kept.

Each optimizer step TRL samples `num_generations` completions per prompt from the current policy,
scores them with the reward, and trains on the group-relative advantages

    A_i = (r_i − mean_group r) / (std_group r + 1e-4)      (scale_rewards "group"; "batch": the batch's
                                                             std; "none": no division, as Dr. GRPO)

with the policy-gradient loss of TRL's `loss_type` (grpo, dr_grpo, dapo, bnpo, ...). A group whose
rewards are all equal has A = 0: it costs a generation and contributes no gradient.

TRL logs only means. learndyn keeps each sample's reward with its prompt's `example_id`
(`training.runs.read_rewards` reads them back), so the report can decide "reward rises" per prompt
(a paired comparison, with an interval) and say which probe prompts were trained on: `RewardLog` wraps the reward function and, at every probe evaluation
and at the end, appends the rows since the last one to RUN/rewards/ as one Parquet shard, written
atomically (columns: step, example_id, generation, reward, completion_tokens; `step` is the optimizer
step the sample trains, counting from 1). Interrupting a run keeps the shards written.
"""

from __future__ import annotations

import functools
from dataclasses import fields
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from learndyn.atomic import atomic_path
from learndyn.errors import LearndynError
from learndyn.rewards import RewardError, RewardFn

REWARD_COLUMNS = ("step", "example_id", "generation", "reward", "completion_tokens")


class RewardLog(TrainerCallback):
    """Keeps the reward of every sample TRL scores (see the module docstring); `wrap` the reward
    function given to the trainer and add this object as a callback."""

    def __init__(self, out: str | Path, every: int):
        self.out, self.every = Path(out), every
        self.rows: list[dict[str, Any]] = []
        self.groups = self.varied = 0  # prompt groups scored, and those whose rewards differed

    def wrap(self, function: RewardFn) -> RewardFn:
        """`function`, recording what it returns; TRL passes the dataset's `example_id` column along."""

        @functools.wraps(function)
        def recorded(*, prompts: list, completions: list, example_id: list | None = None,
                     trainer_state: Any = None, completion_ids: list | None = None, **kwargs: Any) -> list:
            values = function(prompts=prompts, completions=completions, example_id=example_id,
                              trainer_state=trainer_state, completion_ids=completion_ids, **kwargs)
            step = (trainer_state.global_step if trainer_state is not None else 0) + 1
            if values and all(v is None for v in values):
                raise RewardError(f"--reward {getattr(function, '__name__', function)} scored none of the "
                                  f"{len(values)} completions of step {step} (every reward None): no prompt in "
                                  "the batch is rewardable")
            ids = example_id if example_id is not None else [None] * len(values)
            self._count_groups(ids, values)
            seen: dict[Any, int] = {}
            for i, (eid, value) in enumerate(zip(ids, values)):
                seen[eid] = seen.get(eid, -1) + 1  # a prompt's samples are numbered 0..G-1 within a step
                self.rows.append({"step": step, "example_id": None if eid is None else str(eid),
                                  "generation": seen[eid], "reward": float("nan") if value is None else float(value),
                                  "completion_tokens": len(completion_ids[i]) if completion_ids else None})
            return values

        return recorded

    def _count_groups(self, ids: list, values: list) -> None:
        groups: dict[Any, list[float]] = {}
        for eid, value in zip(ids, values):
            if value is not None:
                groups.setdefault(eid, []).append(value)
        self.groups += len(groups)
        self.varied += sum(max(g) > min(g) for g in groups.values())

    def check_learned(self) -> None:
        """Fail when no group ever had reward variance: every advantage was zero, so the run trained nothing."""
        if self.groups and not self.varied:
            raise LearndynError(f"no prompt's samples ever differed in reward ({self.groups} groups): every "
                                "advantage was zero and GRPO trained nothing; an easier task, more "
                                "--num-generations or a higher --temperature gives the rewards variance")

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self.flush(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.flush(state.global_step)

    def flush(self, step: int) -> None:
        """Append the rows since the last flush as RUN/rewards/grpo-stepN.parquet (main process only)."""
        import pandas as pd

        if not self.rows or not _is_main_process():
            self.rows.clear()
            return
        path = self.out / "rewards" / f"grpo-step{step:08d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        frame = pd.DataFrame(self.rows, columns=list(REWARD_COLUMNS))
        if path.exists():  # a second flush at the same step (the end right after an evaluation)
            frame = pd.concat([pd.read_parquet(path), frame], ignore_index=True)
        with atomic_path(path) as tmp:
            frame.to_parquet(tmp, index=False)
        self.rows.clear()


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def grpo_rows(prefs: list) -> list[dict[str, Any]]:
    """TRL's GRPO dataset: the prompt, its `example_id` (for the reward log) and the data's other
    columns (a task's `answer`, ...), which TRL passes to the reward function by name."""
    chat = {not isinstance(p.prompt, str) for p in prefs}
    if len(chat) > 1:
        raise LearndynError("the data mixes plain-text and conversation prompts; TRL needs one kind")
    names = sorted({k for p in prefs for k in p.columns} - {"prompt", "example_id"})
    return [{"prompt": p.prompt, "example_id": p.example_id, **{k: p.columns.get(k) for k in names}} for p in prefs]


def grpo_trainer(settings: Any, model: Any, tokenizer: Any, prefs: list, run: Path, peft_config: Any,
                 training_args: Any) -> Any:
    """TRL's GRPOTrainer for `settings` (a TrainSettings of phase grpo), its reward wrapped by a
    `RewardLog` that is also added as a callback. Gradient checkpointing stays off (TRL's GRPO turns it
    on by default, and then samples without the KV cache, recomputing the prefix for every token)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from learndyn.rewards import load_reward

    names = {f.name for f in fields(GRPOConfig)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    args = training_args(GRPOConfig, num_generations=settings.num_generations, beta=settings.beta,
                         loss_type=settings.loss, scale_rewards=settings.scale_rewards,
                         max_completion_length=settings.max_new_tokens, temperature=settings.temperature,
                         **{checkpointing: False})
    log = RewardLog(run, settings.every)
    reward = log.wrap(load_reward(settings.reward, device=settings.device))
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=Dataset.from_list(grpo_rows(prefs)),
                          processing_class=tokenizer, peft_config=peft_config)
    trainer.add_callback(log)
    trainer.reward_log = log
    return trainer
