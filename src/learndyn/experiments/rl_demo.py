"""The RL demo: GRPO on the built-in arithmetic task, its probes tracked, offline on a CPU.

    probes   arithmetic[0:probes]: per question the correct answer (chosen), a plausible wrong one
             (rejected), the correct answer reworded (chosen_semantic), the model's own greedy answer
             and its own samples at the start split by the reward (sample_rewarded/_unrewarded), and
             the other-prompt and shuffled types
    SFT      optional (`sft_epochs` > 0): on the correct answers of the training questions
    GRPO     on arithmetic[untrained:untrained + prompts], from the built-in model (or the SFT run)

The first `untrained` probe questions are never trained on, so the report can test squeezing on
prompts GRPO never saw. Then `learndyn report` decides the RL signatures (report/rl_signatures.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from learndyn.errors import LearndynError
from learndyn.models import BUILTIN_MODEL
from learndyn.settings import setting

__all__ = ["RLDemoSettings", "rl_demo_settings", "run_rl_demo"]

TASK = "arithmetic"


@dataclass(frozen=True)
class RLDemoSettings:
    """The RL demo's sizes: what shows the dynamics on a 135M model on 2 CPU cores in about 20 minutes."""

    out: str = setting("learndyn-demo-rl", "Folder for probes, runs and the report")
    model: str = setting(BUILTIN_MODEL, "Starting model")
    probes: int = setting(24, "Tracked questions: arithmetic[0:N]")
    untrained: int = setting(8, "The first N tracked questions are never trained on (squeezing on unseen prompts)")
    prompts: int = setting(32, "Training questions, arithmetic[untrained:untrained + N]")
    sft_epochs: float = setting(0.0, "SFT epochs on the correct answers before GRPO (0: none)")
    epochs: float = setting(3.0, "GRPO epochs")
    learning_rate: float = setting(1e-5, "GRPO learning rate")
    num_generations: int = setting(4, "Samples per question and step")
    batch_size: int = setting(16, "Completions per optimizer step")
    max_new_tokens: int = setting(16, "Longest sample, in tokens")
    every: int = setting(4, "Score probes every N optimizer steps")
    seed: int = setting(0, "Seed of sampling, data order and probes")
    device: str | None = setting(None, "cpu, cuda, cuda:1, ...", shown="GPU if present")

    def __post_init__(self) -> None:
        if not 0 <= self.untrained < self.probes:
            raise LearndynError(f"untrained must be in [0, probes), got {self.untrained} of {self.probes}")


QUICK = dict(probes=12, untrained=4, prompts=16, epochs=2.0, batch_size=8, every=2)


def rl_demo_settings(quick: bool, **values: Any) -> RLDemoSettings:
    """Settings from the given values (None: the default, or the quick default with `quick`)."""
    return RLDemoSettings(**{**(QUICK if quick else {}), **{k: v for k, v in values.items() if v is not None}})


def run_rl_demo(settings: RLDemoSettings, console: Console | None = None) -> list[Path]:
    """Build the RL probes, train (SFT, then) GRPO; returns the run folders in training order."""
    from learndyn.experiments.compare import train_once
    from learndyn.training.recipes import TrainSettings

    console = console or Console(stderr=True)
    out = Path(settings.out)
    probes = out / "probes.jsonl"
    console.print(f"[bold]probes[/bold]: {settings.probes} questions, own samples split by the reward")
    _build_probes(settings, probes)
    train = f"{TASK}[{settings.untrained}:{settings.untrained + settings.prompts}]"
    common = dict(data=train, probes=str(probes), model=settings.model, every=settings.every, seed=settings.seed,
                  device=settings.device, max_length=128)
    runs = []
    start: dict[str, Any] = {}
    if settings.sft_epochs > 0:
        console.print(f"[bold]SFT[/bold] on the correct answers, {settings.sft_epochs:g} epochs")
        sft = TrainSettings(phase="sft", out=str(out / "sft"), epochs=settings.sft_epochs, batch_size=8, **common)
        runs.append(train_once(sft, resume=False)[0])
        start = {"from_run": sft.out}
    console.print(f"[bold]GRPO[/bold] on {settings.prompts} questions, {settings.num_generations} samples each, "
                  f"{settings.epochs:g} epochs, lr {settings.learning_rate:g}")
    grpo = TrainSettings(phase="grpo", out=str(out / "grpo"), reward=TASK, epochs=settings.epochs,
                         learning_rate=settings.learning_rate, num_generations=settings.num_generations,
                         batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens, **common, **start)
    runs.append(train_once(grpo, resume=False)[0])
    return runs


def _build_probes(settings: RLDemoSettings, path: Path) -> None:
    from learndyn.data import load_preferences
    from learndyn.models import load_model
    from learndyn.probes.build import build_probes
    from learndyn.probes.files import write_probes

    model, tokenizer = load_model(settings.model, device=settings.device)
    probes = build_probes(load_preferences(f"{TASK}[0:{settings.probes}]"), model=model, tokenizer=tokenizer,
                          reward=TASK, samples=settings.num_generations, greedy_max_tokens=settings.max_new_tokens,
                          seed=settings.seed)
    write_probes(probes, path)
