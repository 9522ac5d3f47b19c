"""learndyn: measure and explain the learning dynamics of LLM finetuning (Ren & Sutherland, ICLR 2025).

The public API is a few nouns and verbs:

    model, tokenizer = learndyn.load_model("smollm2-135m-instruct")
    prefs = learndyn.load_preferences("example")            # or a file, or a hub id[:split]
    probes = learndyn.build_probes(prefs, held_out=learndyn.load_preferences("example:test"))
    scores = learndyn.score_probes(model, tokenizer, probes) # long-format pandas DataFrame
    trainer.add_callback(learndyn.LearningDynamicsCallback(probes, out="runs/mine", trainer=trainer))
    learndyn.build_report(["runs/mine"])                     # figures, signatures, report.html
    learndyn.explain_step(model, tokenizer, prefs[:1], probes, loss="sigmoid",
                          rule=learndyn.OptimizerRule("adam", 1e-5))  # one step, predicted vs actual

Names resolve lazily so that importing learndyn (and `learndyn --help`) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "learndyn.models",
    "load_preferences": "learndyn.data",
    "Preference": "learndyn.data",
    "build_probes": "learndyn.probes.build",
    "Probe": "learndyn.probes.files",
    "read_probes": "learndyn.probes.files",
    "write_probes": "learndyn.probes.files",
    "score_probes": "learndyn.scoring",
    "LearningDynamicsCallback": "learndyn.training.callback",
    "build_report": "learndyn.report",
    "explain_step": "learndyn.dynamics.step",
    "OptimizerRule": "learndyn.dynamics.updates",
    "LearndynError": "learndyn.errors",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'learndyn' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(__all__ + ["__version__"])
