"""The demo: the paper's Figures 3-5 story on the built-in model and the bundled example data.

Two arms share probes, seeds and data order: baseline (SFT on chosen, then DPO) and extended (SFT on
chosen and rejected, then DPO). Every phase tracks the probe set; the report compares the arms. It is
the training half of `learndyn compare` (experiments/compare.py) with the example data fixed.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from learndyn.experiments.compare import CompareSettings, compare_settings, train_arms


def demo_settings(quick: bool, **overrides) -> CompareSettings:
    """The comparison's sizes (the quick ones with `quick`) on the example data."""
    return compare_settings(quick, data="example", eval_data="example:test", **overrides)


def run_demo(settings: CompareSettings, console: Console | None = None) -> list[Path]:
    """Train both arms with probes tracked; returns the four run folders (baseline sft, dpo, extended sft, dpo)."""
    checkpoints, _ = train_arms(settings, console=console)
    return [c.run for c in checkpoints]
