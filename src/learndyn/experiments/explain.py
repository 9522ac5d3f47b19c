"""`learndyn explain`: one update step explained against a probe set, written to a folder.

Loads the model, the update rows and the probes, runs `dynamics.step.explain_step`, and writes
OUT/changes.parquet (one row per (example_id, response_type)), OUT/positions.parquet (one row per
response token, streamed chunk by chunk so that no probe set is too big for memory; see
`dynamics.positions` for its row order), OUT/summary.json (settings and headline numbers) and
OUT/changes.png, OUT/squeeze.png, each atomically. With `on_policy`, each update row's rejected response is replaced
by the model's own greedy response: a peak of the model's distribution instead of (usually) a
valley, which is how the paper contrasts on- and off-policy negatives.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from learndyn.atomic import atomic_path, write_json
from learndyn.errors import LearndynError
from learndyn.losses import get_loss
from learndyn.memory import reporting_oom
from learndyn.models import BUILTIN_MODEL
from learndyn.settings import setting


@dataclass(frozen=True)
class ExplainSettings:
    """What to explain; saved in summary.json."""

    update: str = setting(help="Preference data holding the update batch (any format `probes build` reads)")
    probes: str = setting(help="Probe file whose responses are explained")
    model: str = setting(BUILTIN_MODEL, "Model, before the step")
    rows: tuple[int, ...] = setting((0,), "Rows of UPDATE that form the batch, numbered from 0: '0' or '0,3'",
                                    shown="0")
    loss: str = setting("sft", "Loss of the step (TRL's names; dpo = sigmoid)")
    optimizer: str = setting("sgd", "sgd, adam, adamw or rmsprop (fresh state)")
    lr: float = setting(1e-4, "Learning rate of the step")
    weight_decay: float = setting(0.0, "Weight decay (decoupled for adamw, L2 otherwise, as torch.optim)")
    max_grad_norm: float | None = setting(1.0, "Clip the gradient's norm first, as the transformers Trainer does; "
                                               "0: no clipping")
    beta: float = setting(0.1, "beta of the preference losses")
    ref_model: str | None = setting(None, "Reference model of the preference losses", shown="the model itself")
    on_policy: bool = setting(False, "Use the model's own greedy response as each row's rejected response")
    types: tuple[str, ...] | None = setting(None, "Only these response types, comma-separated", shown="all")
    probe_limit: int | None = setting(None, "Use only the first N probe rows")
    chunk_tokens: int = setting(1024, "Probe tokens per pass; lower it if memory runs short")
    max_length: int | None = setting(None, "The training run's max_length: the update and the probes are cut as "
                                           "`train` cuts them", shown="no cut within the model's context")
    greedy_tokens: int = setting(64, "Longest greedy response of --on-policy, in tokens")
    device: str | None = setting(None, "cpu, cuda, cuda:1, ...", shown="GPU if present")
    dtype: str | None = setting("float32", "float32 (first-order agreement needs it) or bfloat16")
    tokenizer: str | None = setting(None, "A tokenizer other than the model's own")

    def __post_init__(self) -> None:
        """Checked before any data or model loads: a loss explain lacks, a row named twice (it would
        count double in the step)."""
        get_loss(self.loss, explained=True)
        twice = next((row for i, row in enumerate(self.rows) if row in self.rows[:i]), None)
        if twice is not None:
            raise LearndynError(f"update rows {','.join(map(str, self.rows))}: row {twice} is named twice; "
                                "name each row once")


def run_explain(settings: ExplainSettings, out: str | Path, progress: bool = True):
    """Explain the step and write the folder; returns the `Explanation` (its `positions` is the path
    of positions.parquet, written while the probes run)."""
    from learndyn.data import load_preferences
    from learndyn.dynamics.step import explain_step
    from learndyn.dynamics.updates import OptimizerRule
    from learndyn.models import load_model
    from learndyn.probes.files import read_probes

    loss = get_loss(settings.loss, explained=True)
    pairwise = loss.pairwise
    rule = OptimizerRule(settings.optimizer, settings.lr, weight_decay=settings.weight_decay,
                         max_grad_norm=settings.max_grad_norm)
    prefs = load_preferences(settings.update, need_rejected=pairwise and not settings.on_policy)
    update = pick_rows(prefs, settings.rows, settings.update)
    probes = read_probes(settings.probes, limit=settings.probe_limit)
    # a LoRA model stays a peft model with only its adapter trainable: LoRA training moves the adapter
    # alone, so the step explained (and its Δθ) is over the adapter's parameters
    model, tokenizer = load_model(settings.model, device=settings.device, dtype=settings.dtype, adapter="train")
    if settings.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(settings.tokenizer)
    ref = load_model(settings.ref_model, device=settings.device, dtype=settings.dtype)[0] if settings.ref_model else None
    if settings.on_policy:
        update = with_greedy_rejected(model, tokenizer, update, settings.greedy_tokens)
    out = Path(out)
    with reporting_oom("explain"):
        result = explain_step(model, tokenizer, update, probes, loss=loss, rule=rule, beta=settings.beta,
                              ref_model=ref, types=settings.types, chunk_tokens=settings.chunk_tokens,
                              max_length=settings.max_length, progress=progress,
                              positions_out=out / "positions.parquet")
    write_explanation(result, settings, update, out)
    return result


def pick_rows(prefs: list, rows: tuple[int, ...], source: str) -> list:
    for row in rows:
        if not 0 <= row < len(prefs):
            raise LearndynError(f"{source}: row {row} does not exist (the data has {len(prefs)} rows, numbered from 0)")
    return [prefs[row] for row in rows]


def with_greedy_rejected(model, tokenizer, update: list, max_new_tokens: int) -> list:
    """The update rows with the model's own greedy response as the rejected one (on-policy)."""
    from dataclasses import replace

    from learndyn.generation import generate

    responses = generate(model, tokenizer, [p.prompt for p in update], max_new_tokens=max_new_tokens, progress=None)
    return [replace(p, rejected=r) for p, r in zip(update, responses)]


def write_explanation(result, settings: ExplainSettings, update: list, out: Path) -> None:
    from learndyn.report.explain_figures import changes_figure, png, squeeze_figure

    out.mkdir(parents=True, exist_ok=True)
    tables = [("changes", result.changes)]
    if not isinstance(result.positions, (str, Path)):  # in memory; streamed positions are written already
        tables.append(("positions", result.positions))
    for name, table in tables:
        with atomic_path(out / f"{name}.parquet") as tmp:
            table.to_parquet(tmp, index=False)
    for name, fig in (("changes", changes_figure(result.changes)), ("squeeze", squeeze_figure(result.changes))):
        with atomic_path(out / f"{name}.png") as tmp:
            tmp.write_bytes(png(fig))
    summary = {"settings": asdict(settings),
               "update_rows": [{"example_id": p.example_id, "chosen": p.chosen, "rejected": p.rejected} for p in update],
               **result.summary}
    write_json(out / "summary.json", summary, indent=1)
