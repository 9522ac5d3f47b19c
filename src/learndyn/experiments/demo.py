"""The demo: the paper's Figures 3-5 story on the built-in model and the bundled example data.

Two arms share probes, seeds and data order: baseline (SFT on chosen, then DPO) and extended (SFT on
chosen and rejected, then DPO). Every phase tracks the probe set; the report compares the arms.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console

from learndyn.data import load_preferences
from learndyn.models import BUILTIN_MODEL, load_model
from learndyn.probes.build import build_probes
from learndyn.probes.files import write_probes
from learndyn.training.recipes import TrainSettings, train


@dataclass(frozen=True)
class DemoSettings:
    """Sizes and step sizes chosen so the dynamics show on a 135M model within minutes on a CPU."""

    out: str = "learndyn-demo"
    examples: int = 32  # training pairs from the example data
    probes: int = 8  # tracked prompts: the first training examples (their chosen is trained on)
    sft_epochs: float = 3.0
    dpo_epochs: float = 2.0
    sft_lr: float = 5e-5
    dpo_lr: float = 2e-5
    beta: float = 0.1
    batch_size: int = 8
    every: int = 3
    max_length: int = 256
    greedy_tokens: int = 48
    seed: int = 0
    device: str | None = None


QUICK = dict(examples=16, probes=6, sft_epochs=2.0, dpo_epochs=1.0, every=4)


def run_demo(settings: DemoSettings, console: Console | None = None) -> list[Path]:
    """Train both arms with probes tracked; returns the four run folders (baseline sft, dpo, extended sft, dpo)."""
    console = console or Console(stderr=True)
    out = Path(settings.out)
    model, tokenizer = load_model(BUILTIN_MODEL, device=settings.device)
    probes = build_probes(load_preferences("example", limit=settings.probes),
                          held_out=load_preferences("example:test"), model=model, tokenizer=tokenizer,
                          greedy_max_tokens=settings.greedy_tokens, seed=settings.seed)
    write_probes(probes, out / "probes.jsonl")
    del model
    common = dict(data="example", probes=str(out / "probes.jsonl"), limit=settings.examples,
                  batch_size=settings.batch_size, every=settings.every, max_length=settings.max_length,
                  seed=settings.seed, device=settings.device)
    runs: list[Path] = []
    for number, (arm, extend) in enumerate((("baseline", False), ("extended", True))):
        console.print(f"[bold][{2 * number + 1}/4] {arm} SFT[/bold] ({'chosen and rejected' if extend else 'chosen'})")
        sft = train(TrainSettings(phase="sft", out=str(out / arm / "sft"), extend=extend, epochs=settings.sft_epochs,
                                  learning_rate=settings.sft_lr, **common), overwrite=True)
        console.print(f"[bold][{2 * number + 2}/4] {arm} DPO[/bold] (from the SFT model, beta {settings.beta})")
        dpo = train(TrainSettings(phase="dpo", out=str(out / arm / "dpo"), from_run=str(sft), beta=settings.beta,
                                  epochs=settings.dpo_epochs, learning_rate=settings.dpo_lr, **common), overwrite=True)
        runs += [sft, dpo]
    return runs


def demo_settings(quick: bool, **overrides) -> DemoSettings:
    base = replace(DemoSettings(), **QUICK) if quick else DemoSettings()
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


