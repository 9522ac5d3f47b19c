"""The paper's fix, measured fairly: baseline SFT -> DPO against extended SFT -> DPO.

Both arms start from one model with one probe set, seed, data order and DPO step count; they differ
only in what SFT trains on (chosen; or chosen and rejected, which takes twice the SFT steps at equal
epochs). With `on_policy`, a third arm continues the baseline SFT model with on-policy DPO. With
`filter_top` P, another continues it with DPO on the training pairs less the P% that `forecast --cross`
(run on the baseline SFT model) says displace the chosen responses most, for as many DPO steps as
the other arms (DIR/filtered/forecast/ holds that forecast). Every
checkpoint answers the held-out prompts greedily; a judge compares the answers pairwise in both
orders; the intrinsic measures describe each set of answers. The folder:

    DIR/probes.jsonl                       probes tracked in every run
    DIR/{arm}/{phase}/                     run folders (config, metrics, checkpoints/final)
    DIR/responses/{arm}-{phase}.jsonl      greedy answers to the held-out prompts
    DIR/verdicts/{A}_vs_{B}.jsonl          judged pairs, reused by a rerun (an API judge is paid once)
    DIR/summary.json                       settings, step counts, win rates, intrinsic measures, signatures
    DIR/report.html, DIR/figures/          the report: win rates, intrinsic measures, dynamics of all arms

A rerun with `resume` reuses every finished run (same settings and input files), response file and
verdict; anything downstream of a retrained run is redone.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from learndyn.atomic import atomic_path, write_json
from learndyn.errors import LearndynError
from learndyn.models import BUILTIN_MODEL
from learndyn.settings import setting

log = logging.getLogger(__name__)

__all__ = ["CompareSettings", "Checkpoint", "PAIRS", "compare_settings", "run_compare", "train_arms"]


@dataclass(frozen=True)
class CompareSettings:
    """One comparison. The sizes default to what shows the dynamics on a 135M model on a CPU."""

    data: str = setting(help="Training preference data (see `probes build --data`); a row range splits a file, "
                             "e.g. data.jsonl[:400]")
    eval_data: str = setting(help="Held-out preference data: prompts to answer, chosen responses to score (e.g. "
                                  "example:test, data.jsonl[400:])")
    out: str = setting("learndyn-compare", "Folder for probes, runs, responses, verdicts, summary.json and "
                                           "report.html")
    model: str = setting(BUILTIN_MODEL, "Starting model of both arms")
    judge: str = setting("local", "openai:MODEL, local[:MODEL] or reward:MODEL (see `learndyn judge`)")
    on_policy: bool = setting(False, "Add an arm: the baseline SFT model trained by on-policy DPO")
    filter_top: float | None = setting(None, "Add an arm: DPO from the baseline SFT model without this percentage "
                                             "of the pairs forecast to displace chosen most (equal DPO steps)")
    examples: int | None = setting(32, "Training pairs")
    eval_n: int | None = setting(None, "Answer only the first N held-out prompts", shown="all")
    probes: int = setting(8, "Tracked prompts: the first training examples")
    sft_epochs: float = setting(3.0, "SFT epochs")
    dpo_epochs: float = setting(2.0, "DPO epochs")
    sft_lr: float = setting(5e-5, "SFT learning rate", shown="5e-5; 5e-4 with --lora")
    dpo_lr: float = setting(2e-5, "DPO learning rate", shown="2e-5; 2e-4 with --lora")
    beta: float = setting(0.1, "DPO beta")
    batch_size: int = setting(8, "Examples per optimizer step")
    every: int = setting(3, "Score probes every N optimizer steps")
    max_length: int = setting(256, "Tokens per training sequence and scored response")
    greedy_tokens: int = setting(48, "Length of the probe set's greedy responses, in tokens")
    max_new_tokens: int = setting(96, "Longest answer, in tokens")
    seed: int = setting(0, "Seed of data order, probes and initialisation")
    device: str | None = setting(None, "cpu, cuda, cuda:1, ...", shown="GPU if present")
    lora: bool = setting(False, "Train LoRA adapters (r 16, alpha 32, all linear layers) instead of all weights",
                         shown="--full")

    def __post_init__(self) -> None:
        if self.filter_top is not None and not 0 < self.filter_top < 100:
            raise LearndynError(f"filter_top is a percentage between 0 and 100, got {self.filter_top}")


QUICK = dict(examples=16, probes=6, sft_epochs=2.0, dpo_epochs=1.0, every=4, max_new_tokens=64)
# A LoRA adapter needs ~10-100x the full-finetuning learning rate for a comparable step (see
# training.recipes.TrainSettings); 10x the full defaults above, unless the lrs are given.
LORA_LRS = dict(sft_lr=5e-4, dpo_lr=2e-4)


def compare_settings(quick: bool, **values: Any) -> CompareSettings:
    """Settings from the given values (None: the default, or the quick default with `quick`)."""
    given = {k: v for k, v in values.items() if v is not None}
    base = {**(QUICK if quick else {}), **(LORA_LRS if given.get("lora") else {}), **given}
    return CompareSettings(**base)


@dataclass(frozen=True)
class Checkpoint:
    """A trained model of the comparison: `arm/phase`, e.g. extended/dpo."""

    arm: str
    phase: str
    run: Path

    @property
    def name(self) -> str:
        return f"{self.arm}/{self.phase}"

    @property
    def stem(self) -> str:
        return f"{self.arm}-{self.phase}"


# (A, B): the win rate of A over B. The first is the paper's claim; the last two show what DPO did in each arm.
PAIRS = (("extended/dpo", "baseline/dpo"), ("extended/sft", "baseline/sft"),
         ("baseline/dpo", "baseline/sft"), ("extended/dpo", "extended/sft"))
ON_POLICY_PAIRS = (("baseline/dpo-on-policy", "baseline/dpo"), ("baseline/dpo-on-policy", "baseline/sft"))
FILTERED_PAIRS = (("filtered/dpo", "baseline/dpo"),)


def run_compare(settings: CompareSettings, *, resume: bool = False, overwrite: bool = False,
                judge_options: dict[str, Any] | None = None, console: Console | None = None) -> dict[str, Any]:
    """Train, generate, judge, measure and report (module docstring); returns the summary."""
    from learndyn.data import load_preferences
    from learndyn.judging import make_judge

    console = console or Console(stderr=True)
    out = Path(settings.out)
    _check_folder(out, resume, overwrite)
    held_out = load_preferences(settings.eval_data, limit=settings.eval_n, need_rejected=False)
    load_preferences(settings.data, limit=settings.examples)  # bad training data fails before any work
    judge = make_judge(settings.judge, device=settings.device, **(judge_options or {}))
    clock: dict[str, float] = {}

    start = time.perf_counter()
    checkpoints, retrained = train_arms(settings, resume=resume, console=console, judge_options=judge_options)
    clock["training"] = time.perf_counter() - start

    start = time.perf_counter()
    fresh, measures = _evaluate(checkpoints, held_out, settings, resume=resume, retrained=retrained, console=console)
    clock["generation_and_scoring"] = time.perf_counter() - start

    start = time.perf_counter()
    pairs = PAIRS + (ON_POLICY_PAIRS if settings.on_policy else ()) + (FILTERED_PAIRS if settings.filter_top else ())
    win_rates = [_judge_pair(a, b, judge, out, redo=bool({a, b} & fresh), console=console) for a, b in pairs]
    clock["judging"] = time.perf_counter() - start

    summary = {
        "settings": asdict(settings),
        "judge": judge.spec,
        "held_out_prompts": len(held_out),
        "runs": {c.name: {"path": str(c.run), "steps": _steps(c.run)} for c in checkpoints},
        "win_rates": win_rates,
        "intrinsic": measures,
        "seconds": {k: round(v, 1) for k, v in clock.items()},
    }
    from learndyn.report import build_report, evaluate_signatures
    from learndyn.report.comparison import sections, win_rate_figure

    runs = [c.run for c in checkpoints if c.phase != "sft"]  # each DPO run brings its SFT run
    summary["signatures"] = evaluate_signatures(runs)
    write_json(out / "summary.json", summary)
    figure = win_rate_figure(win_rates)
    with atomic_path(out / "figures" / "win_rates.png") as tmp:
        tmp.write_bytes(figure)
    summary["report"] = str(build_report(runs, out, sections=sections(summary, figure)))
    return summary


def train_arms(settings: CompareSettings, *, resume: bool = False, console: Console | None = None,
               judge_options: dict[str, Any] | None = None) -> tuple[list[Checkpoint], set[str]]:
    """Build the probe set and train every arm; returns the checkpoints in training order and the
    names of those trained now (not reused). The on-policy arm's judge takes the endpoint in
    `judge_options` (base_url, api_key_env), so the key goes to the host the user named."""
    from learndyn.training.recipes import TrainSettings

    console = console or Console(stderr=True)
    out = Path(settings.out)
    probes = out / "probes.jsonl"
    if not (resume and probes.is_file()):
        _build_probes(settings, probes)
    common = dict(data=settings.data, probes=str(probes), model=settings.model, limit=settings.examples,
                  batch_size=settings.batch_size, every=settings.every, max_length=settings.max_length,
                  seed=settings.seed, device=settings.device, lora=settings.lora)
    plan: list[tuple[str, str, TrainSettings]] = []
    for arm, extend in (("baseline", False), ("extended", True)):
        sft = TrainSettings(phase="sft", out=str(out / arm / "sft"), extend=extend, epochs=settings.sft_epochs,
                            learning_rate=settings.sft_lr, **common)
        dpo = TrainSettings(phase="dpo", out=str(out / arm / "dpo"), from_run=sft.out, beta=settings.beta,
                            epochs=settings.dpo_epochs, learning_rate=settings.dpo_lr, **common)
        plan += [(arm, "sft", sft), (arm, "dpo", dpo)]
    if settings.on_policy:
        endpoint = {} if not settings.judge.startswith("openai:") else {
            "judge_base_url": (judge_options or {}).get("base_url"), "judge_api_key_env": (judge_options or {}).get("api_key_env")}
        on = replace(plan[1][2], out=str(out / "baseline" / "dpo-on-policy"), on_policy=True, judge=settings.judge,
                     **endpoint)
        plan.append(("baseline", "dpo-on-policy", on))
    if settings.filter_top:
        plan.append(("filtered", "dpo", replace(plan[1][2], out=str(out / "filtered" / "dpo"), limit=None,
                                                data=str(out / "filtered" / "forecast" / "filtered.jsonl"))))
    checkpoints, retrained = [], set()
    for number, (arm, phase, train_settings) in enumerate(plan, 1):
        what = {"sft": "SFT on chosen" + (" and rejected" if train_settings.extend else ""),
                "dpo": f"DPO from the SFT model, beta {settings.beta}",
                "dpo-on-policy": "on-policy DPO from the baseline SFT model"}[phase]
        if arm == "filtered":
            what = f"DPO from the baseline SFT model without the top {settings.filter_top:g}% displacing pairs"
        console.print(f"[bold][{number}/{len(plan)}] {arm} {phase}[/bold] ({what})")
        if arm == "filtered":
            train_settings = _filtered_dpo(settings, train_settings, resume=resume and "baseline/sft" not in retrained,
                                           console=console)
        run, trained = train_once(train_settings, resume=resume and not retrained & {f"{arm}/sft"})
        if trained:
            retrained.add(f"{arm}/{phase}")
        else:
            console.print(f"  reusing the finished run {run}")
        checkpoints.append(Checkpoint(arm, phase, run))
    return checkpoints, retrained


def _filtered_dpo(settings: CompareSettings, dpo: Any, *, resume: bool, console: Console) -> Any:
    """Forecast the training pairs on the baseline SFT model and drop the top `filter_top`%; returns
    the DPO settings on the rest, with epochs scaled so the arm takes as many steps as the others."""
    import math

    from learndyn.data import load_preferences
    from learndyn.experiments.forecast import ForecastSettings, run_forecast

    folder = Path(settings.out) / "filtered" / "forecast"
    kept_file = folder / "filtered.jsonl"
    if not (resume and kept_file.is_file() and (folder / "summary.json").is_file()):
        forecast = ForecastSettings(data=settings.data, model=str(Path(settings.out) / "baseline" / "sft"),
                                    beta=settings.beta, lr=settings.dpo_lr, cross=True, drop_top=settings.filter_top,
                                    max_length=settings.max_length, limit=settings.examples, seed=settings.seed,
                                    device=settings.device, lora=settings.lora)
        summary = run_forecast(forecast, folder, overwrite=True)
        console.print(f"  forecast: dropped {len(summary['dropped'])} of {summary['pairs']} pairs ({', '.join(summary['dropped'])})")
    given = len(load_preferences(settings.data, limit=settings.examples))
    kept = len(load_preferences(str(kept_file)))
    steps = math.ceil(given / settings.batch_size) * settings.dpo_epochs  # the other arms' DPO steps
    return replace(dpo, epochs=steps / math.ceil(kept / settings.batch_size))


def _build_probes(settings: CompareSettings, path: Path) -> None:
    from learndyn.data import load_preferences
    from learndyn.models import load_model
    from learndyn.probes.build import build_probes
    from learndyn.probes.files import write_probes

    model, tokenizer = load_model(settings.model, device=settings.device)
    probes = build_probes(load_preferences(settings.data, limit=settings.probes),
                          held_out=load_preferences(settings.eval_data, limit=settings.eval_n, need_rejected=False),
                          model=model, tokenizer=tokenizer, greedy_max_tokens=settings.greedy_tokens,
                          seed=settings.seed)
    write_probes(probes, path)


def train_once(settings: Any, *, resume: bool) -> tuple[Path, bool]:
    """Train unless `resume` finds this run finished with these settings and inputs (the content of
    the data file and of the run it starts from); (run, trained now?). Says why a run it finds is
    trained again."""
    from learndyn.training.recipes import resume_differences, train
    from learndyn.training.runs import is_finished, is_run

    run = Path(settings.out)
    if resume and is_run(run):
        differ = resume_differences(settings, run)
        if not differ and is_finished(run):
            return run, False
        log.warning(f"{run}: training it again ({'; '.join(differ) if differ else 'it did not finish'})")
    return train(settings, overwrite=True), True


def _evaluate(checkpoints: list[Checkpoint], held_out: list, settings: CompareSettings, *, resume: bool,
              retrained: set[str], console: Console) -> tuple[set[str], dict[str, dict[str, Any]]]:
    """Answer the held-out prompts with every checkpoint and measure the answers; returns the names
    whose answers were generated now and the measures by checkpoint name."""
    from learndyn.evaluation.intrinsic import intrinsic_measures
    from learndyn.evaluation.responses import DecodingSettings, generate_responses, resolve_model
    from learndyn.responses import read_responses, write_responses
    from learndyn.models import load_model

    decoding = DecodingSettings(max_new_tokens=settings.max_new_tokens)
    fresh: set[str] = set()
    measures: dict[str, dict[str, Any]] = {}
    for ckpt in checkpoints:
        path = Path(settings.out) / "responses" / f"{ckpt.stem}.jsonl"
        model, tokenizer = load_model(resolve_model(ckpt.run), device=settings.device)
        rows = read_responses(path) if resume and path.is_file() and ckpt.name not in retrained else None
        if rows is not None and [(r["example_id"], r["prompt"]) for r in rows] != [(p.example_id, p.prompt) for p in held_out]:
            console.print(f"  the held-out prompts changed since {path} was written: answering again")
            rows = None
        if rows is None:
            rows = generate_responses(model, tokenizer, held_out, decoding, model_name=str(ckpt.run),
                                      progress=f"Answering with {ckpt.name}")
            write_responses(rows, path)
            fresh.add(ckpt.name)
        measures[ckpt.name] = {"responses": str(path),
                               **intrinsic_measures(rows, tokenizer, model, held_out, max_length=settings.max_length)}
        del model
    return fresh, measures


def _judge_pair(a: str, b: str, judge: Any, out: Path, *, redo: bool, console: Console) -> dict[str, Any]:
    from learndyn.judging import judge_files, rate_text, win_rate

    files = [out / "responses" / f"{name.replace('/', '-')}.jsonl" for name in (a, b)]
    verdicts = out / "verdicts" / f"{a.replace('/', '-')}_vs_{b.replace('/', '-')}.jsonl"
    result = judge_files(*files, judge, verdicts, overwrite=redo, progress=f"Judging {a} vs {b}")
    rate = win_rate(result.rows)
    console.print(f"  {a} vs {b}: win rate {rate_text(rate)}, ties {rate['ties']}, unparsed {rate['unparsed']}",
                  highlight=False)
    return {"a": a, "b": b, "verdicts": str(verdicts), **rate}


def _steps(run: Path) -> int:
    from learndyn.training.runs import read_metrics

    return int(read_metrics(run)["step"].max())


def _check_folder(out: Path, resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise LearndynError("pass --resume or --overwrite, not both")
    started = (out / "probes.jsonl").exists() or (out / "summary.json").exists()
    if started and not (resume or overwrite):
        raise LearndynError(f"{out} holds an earlier comparison; pass --resume to reuse its finished parts "
                            "or --overwrite to start again")
