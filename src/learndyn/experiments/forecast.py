"""`learndyn forecast`: which preference pairs will drag the chosen responses down, before training.

Loads the model and DATA, runs `dynamics.forecast.forecast_pairs` and writes, each atomically:

    OUT/forecast.parquet   one row per pair: ches, ches_normalized, self_predicted, [cross_predicted,
                           cross_projected, others_projected, top_displacers], logp_chosen,
                           logp_rejected, note
    OUT/displacement.npy   with --cross: the projected map c_ij (N, N), rows and columns in DATA's order
    OUT/summary.json       settings and headline numbers
    OUT/forecast.html      distributions, the most displacing pairs with their texts, the map
    OUT/filtered.jsonl     with drop_top: DATA without the most displacing pairs (`train dpo --data`),
                           and without pairs with an empty response, which `train` refuses

The ranking score is `cross_predicted` with --cross, else `self_predicted`: the first-order change of
log π(y⁺); the most negative displace the most. `drop_by` ranks the dropped pairs by another score,
e.g. `others_projected`, what a pair's step does to the other pairs' chosen.

With `lora` the forecast is of `train dpo --lora`: that run moves a fresh adapter (B = 0, A random)
on the model's merged weights, so the gradients are taken over that adapter's parameters alone. At
B = 0 only ∇B is non-zero, ∇B = s·∇W·Aᵀ (s = alpha/r), and the kernel s²·tr(U AᵀA Gᵀ) is, in
expectation over A, proportional to the full-weight kernel of the targeted layers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from learndyn.atomic import atomic_path, write_bytes, write_json, write_jsonl
from learndyn.errors import LearndynError
from learndyn.losses import get_loss
from learndyn.models import BUILTIN_MODEL
from learndyn.settings import setting
from learndyn.training.recipes import TrainSettings

__all__ = ["ForecastSettings", "run_forecast", "check_folder", "drop_top", "ranking_score"]


_TRAIN = {f.name: f for f in fields(TrainSettings)}  # the LoRA settings `train` takes, with its defaults
# the scores drop_top can rank by, and whether each needs the map (--cross)
DROP_SCORES = {"self_predicted": False, "cross_predicted": True, "others_projected": True, "cross_projected": True,
               "ches": False, "ches_normalized": False}


@dataclass(frozen=True)
class ForecastSettings:
    """One forecast; saved in summary.json."""

    data: str = setting(help="Preference data to forecast (any format `probes build` reads)")
    model: str = setting(BUILTIN_MODEL, "Model before training (for DPO after SFT: the SFT run)")
    loss: str = setting("sigmoid", "Pairwise loss, by TRL's name")
    beta: float = setting(0.1, "beta of the loss")
    lr: float = setting(1e-6, "Learning rate of the SGD step the changes are predicted for")
    cross: bool = setting(False, "Also forecast one pass over all pairs (cross_predicted, the displacement map); "
                                 "about 1.3x the time")
    projection_dim: int = setting(32768, "Buckets of the CountSketch that compresses per-pair gradients for the map")
    top: int = setting(3, "Displacers listed per pair")
    drop_top: float | None = setting(None, "Write filtered.jsonl without this percentage of most displacing pairs")
    drop_by: str | None = setting(None, f"Score --drop-top ranks by: {', '.join(DROP_SCORES)}",
                                  shown="cross_predicted with --cross, else self_predicted")
    max_length: int | None = setting(None, "The training run's max_length: pairs are cut as `train` cuts them",
                                     shown="no cut within the model's context")
    limit: int | None = setting(None, "Forecast the first N pairs only", shown="all")
    seed: int = setting(0, "Seed of the sketch (and of the fresh adapter with --lora)")
    lora: bool = setting(False, "Forecast a `train dpo --lora` run: gradients over a fresh LoRA adapter on the "
                                "model's merged weights, the parameters that run moves")
    lora_r: int = setting(_TRAIN["lora_r"].default, _TRAIN["lora_r"].metadata["help"])
    lora_alpha: int = setting(_TRAIN["lora_alpha"].default, _TRAIN["lora_alpha"].metadata["help"])
    lora_targets: str = setting(_TRAIN["lora_targets"].default, _TRAIN["lora_targets"].metadata["help"])
    device: str | None = setting(None, "cpu, cuda, cuda:1, ...", shown="GPU if present")

    def __post_init__(self) -> None:
        if not get_loss(self.loss, explained=True).pairwise:
            raise LearndynError(f"forecast needs a pairwise loss such as sigmoid or ipo, not '{self.loss}'")
        if self.drop_top is not None and not 0 < self.drop_top < 100:
            raise LearndynError(f"drop_top is a percentage between 0 and 100, got {self.drop_top}")
        if self.drop_by is not None and self.drop_by not in DROP_SCORES:
            raise LearndynError(f"drop_by is one of {', '.join(DROP_SCORES)}, got '{self.drop_by}'")
        if DROP_SCORES.get(self.drop_by) and not self.cross:
            raise LearndynError(f"drop_by {self.drop_by} is a score of the map: pass --cross")
        if self.drop_by is not None and self.drop_top is None:
            raise LearndynError("drop_by says how --drop-top ranks pairs: pass --drop-top too")
        if not self.lr > 0 or self.projection_dim < 1 or self.top < 1:
            raise LearndynError("lr must be positive, projection_dim and top at least 1")
        if self.lora and (self.lora_r < 1 or not self.lora_alpha > 0):
            raise LearndynError(f"lora_r must be at least 1 and lora_alpha positive, got {self.lora_r} and "
                                f"{self.lora_alpha}")


def ranking_score(frame: Any) -> str:
    return "cross_predicted" if "cross_predicted" in frame.columns else "self_predicted"


# The scores on which a higher value means more displacement (Razin et al.'s CHES); on the others, the
# predicted changes of log π(y⁺), a lower value does.
HIGHER_DISPLACES = frozenset({"ches", "ches_normalized"})


def drop_top(frame: Any, percent: float, score: str | None = None) -> list[str]:
    """The example_ids of the `percent` most displacing scored pairs by `score` (default the ranking
    score): the lowest predicted change, or the highest CHES; at least one."""
    score = score or ranking_score(frame)
    scored = frame.dropna(subset=[score]).sort_values(score, ascending=score not in HIGHER_DISPLACES, kind="stable")
    count = max(1, round(len(scored) * percent / 100))
    return list(scored["example_id"][:count])


CHECKPOINT = "forecast-state.pt"  # what an interrupted forecast has finished (removed when it completes)


def check_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to replace a forecast, or an unfinished one, unasked (before the model loads)."""
    if resume and overwrite:
        raise LearndynError("pass --resume or --overwrite, not both")
    held = [name for name in ("forecast.parquet", CHECKPOINT) if (out / name).exists()]
    if held and not (resume or overwrite):
        raise LearndynError(f"{out} holds a forecast ({', '.join(held)}); pass --resume to finish an interrupted "
                            "one or --overwrite to start again")


def run_forecast(settings: ForecastSettings, out: str | Path, progress: bool = True, *, resume: bool = False,
                 overwrite: bool = False) -> dict[str, Any]:
    """Forecast and write the folder (module docstring); returns the summary. An interrupted forecast
    keeps what it finished in OUT/forecast-state.pt, and `resume` continues from there."""
    import numpy as np

    from learndyn.data import empty_sides, load_preferences
    from learndyn.dynamics.forecast import forecast_pairs
    from learndyn.memory import reporting_oom
    from learndyn.report.forecast_page import render

    out = Path(out)
    check_folder(out, resume, overwrite)
    pairs = load_preferences(settings.data, limit=settings.limit, keep_empty=True)  # noted per row, not an error
    model, tokenizer = _starting_model(settings)
    checkpoint = out / CHECKPOINT
    if overwrite:
        checkpoint.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    with reporting_oom("forecast"):
        result = forecast_pairs(model, tokenizer, pairs, loss=settings.loss, beta=settings.beta, lr=settings.lr,
                                cross=settings.cross, projection_dim=settings.projection_dim, top=settings.top,
                                max_length=settings.max_length, seed=settings.seed, progress=progress,
                                checkpoint=checkpoint)
    frame, summary = result.pairs, {"settings": asdict(settings), **result.summary,
                                    "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    with atomic_path(out / "forecast.parquet") as tmp:
        frame.to_parquet(tmp, index=False)
    if result.kernel is not None:
        with atomic_path(out / "displacement.npy") as tmp, open(tmp, "wb") as fh:  # a file: np.save would add .npy
            np.save(fh, result.kernel)
    if settings.drop_top is not None:
        dropped = set(drop_top(frame, settings.drop_top, settings.drop_by))
        empty = [p.example_id for p in pairs if empty_sides(p)]
        kept = [p for p in pairs if p.example_id not in dropped and p.example_id not in empty]
        write_jsonl(out / "filtered.jsonl", [_row(p) for p in kept])
        summary.update(dropped=sorted(dropped), dropped_by=settings.drop_by or ranking_score(frame),
                       left_out_empty=empty)
    summary["ranking_score"] = ranking_score(frame)
    write_json(out / "summary.json", summary)
    write_bytes(out / "forecast.html", render(frame, result.kernel, pairs, summary).encode("utf-8"))
    checkpoint.unlink(missing_ok=True)
    return summary


def _starting_model(settings: ForecastSettings) -> tuple[Any, Any]:
    """The model whose trainable parameters the step moves: a LoRA model's own adapter (continued
    training), or with `lora` a fresh adapter seeded by `seed` on the merged weights, as `train --lora`
    builds it (the trainer draws A from its own random state: the kernel's expectation over A, not its
    draw, is what the two share)."""
    import torch
    from peft import get_peft_model

    from learndyn.models import load_model
    from learndyn.training.recipes import lora_config

    if not settings.lora:
        return load_model(settings.model, device=settings.device, dtype="float32", adapter="train")
    model, tokenizer = load_model(settings.model, device=settings.device, dtype="float32")
    config = lora_config(settings, model)
    torch.manual_seed(settings.seed)
    return get_peft_model(model, config), tokenizer


def _row(pref: Any) -> dict[str, Any]:
    return {"example_id": pref.example_id, "prompt": pref.prompt, "chosen": pref.chosen, "rejected": pref.rejected,
            **pref.extras}
