"""The `learndyn` command: each command parses, calls one library function and prints a summary.

Heavy imports (torch, transformers) happen inside commands so that `learndyn --help` is instant.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from learndyn.atomic import check_writable, describe_os_error
from learndyn.errors import LearndynError
from learndyn.losses import names as loss_names
from learndyn.memory import reporting_oom
from learndyn.openai_chat import Endpoint
from learndyn.rewards import FORMS as REWARD_FORMS
from learndyn.settings import option_help

app = typer.Typer(no_args_is_help=True, pretty_exceptions_show_locals=False, add_completion=False,
                  help="Measure and explain the learning dynamics of LLM finetuning.")
probes_app = typer.Typer(no_args_is_help=True, help="Build probe sets.")
app.add_typer(probes_app, name="probes")
train_app = typer.Typer(no_args_is_help=True, help="Finetune with probes tracked (SFT, extended SFT, DPO).")
app.add_typer(train_app, name="train")
console = Console(stderr=True)
out = Console(width=None if sys.stdout.isatty() else 130)  # full tables when piped to a file

ModelOpt = Annotated[str, typer.Option("--model", help="Hub id, local folder, .gguf file, the built-in name, a LoRA adapter folder or a run folder (its final checkpoint).")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1, ... (default: GPU if present).")]
DtypeOpt = Annotated[Optional[str], typer.Option(help="float32 or bfloat16 (default: bf16 on GPU, fp32 on CPU).")]
# The OpenAI-compatible endpoint of a judge or rephraser (openai_chat.Endpoint holds defaults and help).
BaseUrlOpt = Annotated[Optional[str], typer.Option(help=option_help(Endpoint, "base_url"))]
ApiKeyEnvOpt = Annotated[Optional[str], typer.Option(help=option_help(Endpoint, "api_key_env"))]
RateLimitOpt = Annotated[Optional[float], typer.Option(help=option_help(Endpoint, "rate_limit"))]


def _endpoint(base_url: str | None, api_key_env: str | None, rate_limit: float | None) -> dict:
    """The endpoint options given, the defaults for the rest."""
    given = dict(base_url=base_url, api_key_env=api_key_env, rate_limit=rate_limit)
    return asdict(Endpoint(**{k: v for k, v in given.items() if v is not None}))


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, carrying the one line to print (what was kept)."""


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 1, never a traceback; so do
    the system's refusals to write (a read-only folder, a full disk). Ctrl-C prints one line and exits
    with 130 (typer turns it into a silent exit 130, which is recognised by its cause)."""
    # Our own bars show progress; TRL's per-dataset map bars and transformers' notices about its own
    # renamed options (FutureWarning) say nothing a user can act on.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    try:
        app()
    except LearndynError as err:
        _error_line(str(err))
    except OSError as err:
        _error_line(describe_os_error(err))
    except KeyboardInterrupt as err:
        _interrupted(err)
    except SystemExit as exc:
        cause = _keyboard_interrupt(exc)
        if cause is None:
            raise
        _interrupted(cause)


def _error_line(text: str) -> None:
    console.print(f"[red]error:[/red] {escape(text)}", highlight=False, soft_wrap=True)
    sys.exit(1)


def _interrupted(err: KeyboardInterrupt) -> None:
    console.print(escape(str(err) if isinstance(err, Interrupted) else "interrupted"), highlight=False,
                  soft_wrap=True)
    sys.exit(130)


def _keyboard_interrupt(exc: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt behind an exit, if any (typer raises Exit(130) from it, then sys.exit)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _samples_help(name: str) -> str:
    from learndyn.probes.samples import SampleSettings

    return option_help(SampleSettings, name)


@probes_app.command("build")
def probes_build(
    data: Annotated[str, typer.Option(help="Preference data: 'example', a .jsonl/.json/.parquet/.csv file or a hub id, with optional :SPLIT.")],
    out_path: Annotated[Path, typer.Option("--out", help="Probe file to write (JSONL).")],
    held_out: Annotated[Optional[str], typer.Option(help="Held-out preference data whose chosen answers become other_test.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N examples.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for derangements, shuffles and --reward samples.")] = 0,
    rephraser: Annotated[str, typer.Option(help="Backend for rephrases missing from the data: none, local or openai.")] = "none",
    model: Annotated[Optional[str], typer.Option(help="Add the model's own greedy response ('greedy') using this model; with --reward also its samples (default there: the built-in model).")] = None,
    rephrase_model: Annotated[str, typer.Option(help="Chat model of the 'local' rephraser.")] = "smollm2-135m-instruct",
    api_model: Annotated[str, typer.Option(help="Model name for the 'openai' rephraser.")] = "gpt-4o-mini",
    base_url: BaseUrlOpt = None, api_key_env: ApiKeyEnvOpt = None, rate_limit: RateLimitOpt = None,
    greedy_tokens: Annotated[int, typer.Option(help="Longest greedy response (and --reward sample), in tokens.")] = 64,
    reward: Annotated[Optional[str], typer.Option(help=f"Add the model's own samples split by this reward ({REWARD_FORMS}): sample_rewarded (scored highest) and sample_unrewarded (lowest), where the rewards differ.")] = None,
    samples: Annotated[Optional[int], typer.Option(help=_samples_help("samples"))] = None,
    temperature: Annotated[Optional[float], typer.Option(help=_samples_help("temperature"))] = None,
    resume: Annotated[bool, typer.Option(help="Keep the rows already in --out and build the rest.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out file.")] = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Build a probe set (one row per prompt, one column per response type) from preference data."""
    from learndyn.data import load_preferences
    from learndyn.probes.build import build_probe_file, check_target
    from learndyn.probes.rephrase import REPHRASERS, make_rephraser
    from learndyn.probes.samples import SampleSettings

    if rephraser not in REPHRASERS:
        raise LearndynError(f"unknown rephraser '{rephraser}'; valid: {', '.join(REPHRASERS)}")
    if reward is None and (samples is not None or temperature is not None):
        raise LearndynError("--samples and --temperature need --reward")
    given = {k: v for k, v in dict(samples=samples, temperature=temperature).items() if v is not None}
    sampling = SampleSettings(**given)
    check_target(out_path, resume, overwrite)
    check_writable(out_path.parent)
    train = load_preferences(data, limit=_positive(limit, "--limit"))
    test = load_preferences(held_out) if held_out else None
    reward_fn = None
    if reward is not None:
        from learndyn.models import BUILTIN_MODEL
        from learndyn.rewards import load_reward

        model = model or BUILTIN_MODEL
        reward_fn = load_reward(reward, device=device)  # a wrong spec fails before any model loads
    backend = None
    if rephraser == "local":
        from learndyn.models import load_model

        lm, tok = load_model(rephrase_model, device=device, dtype=dtype)
        backend = make_rephraser("local", model=lm, tokenizer=tok)
    elif rephraser == "openai":
        backend = make_rephraser("openai", model=api_model, **_endpoint(base_url, api_key_env, rate_limit))
    policy_model = tokenizer = None
    if model:
        from learndyn.models import load_model

        policy_model, tokenizer = load_model(model, device=device, dtype=dtype)
    probes = build_probe_file(train, out_path, resume=resume, overwrite=overwrite, held_out=test, seed=seed,
                              rephraser=backend, model=policy_model, tokenizer=tokenizer, greedy_max_tokens=greedy_tokens,
                              reward=reward_fn, samples=sampling.samples, temperature=sampling.temperature)
    counts = {}
    for p in probes:
        for name in p.responses:
            counts[name] = counts.get(name, 0) + 1
    out.print(f"wrote {len(probes)} probe rows to {out_path}")
    out.print("  " + ", ".join(f"{k} {v}" for k, v in counts.items()), highlight=False, soft_wrap=True)
    if test is None:
        out.print("  other_test skipped: pass --held-out DATA (e.g. --held-out example:test)")
    if reward is not None:
        split = counts.get("sample_rewarded", 0)
        out.print(f"  sample_rewarded and sample_unrewarded on {split} of {len(probes)} prompts ({sampling.samples} "
                  f"samples per prompt from {model} at temperature {sampling.temperature:g}, split by --reward "
                  f"{reward})", highlight=False, soft_wrap=True)


@app.command()
def score(
    probes: Annotated[Path, typer.Option(help="Probe file (ours, or the paper authors' column names).")],
    out_path: Annotated[Path, typer.Option("--out", help="Scores to write (long-format Parquet).")],
    model: ModelOpt = "smollm2-135m-instruct",
    limit: Annotated[Optional[int], typer.Option(help="Score only the first N prompts.")] = None,
    types: Annotated[Optional[str], typer.Option(help="Comma-separated response types (default: all present).")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="Truncate prompt+response to this many tokens (default: the model's context).")] = None,
    batch_tokens: Annotated[Optional[int], typer.Option(help="Padded tokens per forward pass (default: 1024 on CPU, 16384 on GPU).")] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Score every (prompt, response type) by teacher forcing and print per-type means."""
    from learndyn.vocab import check_types

    selected = check_types([t.strip() for t in types.split(",") if t.strip()]) if types else None
    from learndyn.models import load_model
    from learndyn.probes.files import read_probes
    from learndyn.scoring import check_max_length, score_probes, write_scores

    check_max_length(max_length)
    check_writable(out_path.parent)

    _positive(batch_tokens, "--batch-tokens")
    rows = read_probes(probes, limit=_positive(limit, "--limit"))
    with reporting_oom("score"):
        lm, tok = load_model(model, device=device, dtype=dtype)
        scores = score_probes(lm, tok, rows, types=selected, max_length=max_length, batch_tokens=batch_tokens)
    write_scores(scores, out_path)
    print_summary(scores)
    cut = int(scores["truncated"].sum())
    out.print(f"wrote {len(scores)} rows to {out_path}" + (f" ({cut} responses truncated)" if cut else ""))


def _train(phase: str, config: Optional[Path], flags: dict, resume: bool, overwrite: bool) -> None:
    """Settings from --config YAML, then the flags given on the command line, then defaults."""
    from learndyn.training.recipes import TrainSettings, read_yaml, train

    _positive(flags["limit"], "--limit")
    _positive(flags["probe_limit"], "--probe-limit")
    values = read_yaml(config, "--config") if config is not None else {}
    values.update({k: v for k, v in flags.items() if v is not None})
    values["phase"] = phase
    settings = TrainSettings.from_dict(values)
    check_writable(settings.out, "run folder")
    metrics = Path(settings.out) / "metrics"
    try:
        with reporting_oom("train"):
            run = train(settings, resume=resume, overwrite=overwrite)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; {_shards(metrics)} evaluations kept in {metrics}") from None
    except OSError as err:
        raise LearndynError(f"{describe_os_error(err)}; {_shards(metrics)} evaluations kept in {metrics}") from None
    out.print(f"{phase} run finished: {run} (metrics in {run / 'metrics'}; `learndyn report {run}` draws them)")


def _shards(metrics: Path) -> int:
    from learndyn.training.runs import metric_shards

    return len(metric_shards(metrics.parent))


def _train_help(name: str) -> str:
    from learndyn.training.recipes import TrainSettings

    return option_help(TrainSettings, name)


DataOpt = Annotated[Optional[str], typer.Option(help=_train_help("data"))]
ProbesOpt = Annotated[Optional[str], typer.Option(help=_train_help("probes"))]
RunOpt = Annotated[Optional[str], typer.Option("--out", help=_train_help("out"))]
ConfigOpt = Annotated[Optional[Path], typer.Option(help="YAML file of settings; flags override it.")]
LrOpt = Annotated[Optional[float], typer.Option("--lr", help=_train_help("learning_rate"))]
EpochsOpt = Annotated[Optional[float], typer.Option(help=_train_help("epochs"))]
BatchOpt = Annotated[Optional[int], typer.Option(help=_train_help("batch_size"))]
EveryOpt = Annotated[Optional[int], typer.Option(help=_train_help("every"))]
LimitOpt = Annotated[Optional[int], typer.Option(help=_train_help("limit"))]
ProbeLimitOpt = Annotated[Optional[int], typer.Option(help=_train_help("probe_limit"))]
SeedOpt = Annotated[Optional[int], typer.Option(help=_train_help("seed"))]
MaxLenOpt = Annotated[Optional[int], typer.Option(help=_train_help("max_length"))]
TrainDeviceOpt = Annotated[Optional[str], typer.Option(help=_train_help("device"))]
ResumeOpt = Annotated[bool, typer.Option(help="Continue a run folder that holds metrics (same settings and input files).")]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace a run (its metrics, checkpoints and report); a folder that is not a run is refused.")]
LoraOpt = Annotated[Optional[bool], typer.Option("--lora/--full", help=_train_help("lora"))]
LoraROpt = Annotated[Optional[int], typer.Option(help=_train_help("lora_r"))]
LoraAlphaOpt = Annotated[Optional[int], typer.Option(help=_train_help("lora_alpha"))]
LoraTargetsOpt = Annotated[Optional[str], typer.Option(help=_train_help("lora_targets"))]
LoraDropoutOpt = Annotated[Optional[float], typer.Option(help=_train_help("lora_dropout"))]


def _lora_flags(lora, lora_r, lora_alpha, lora_targets, lora_dropout) -> dict:
    return dict(lora=lora, lora_r=lora_r, lora_alpha=lora_alpha, lora_targets=lora_targets, lora_dropout=lora_dropout)


@train_app.command("sft")
def train_sft(
    data: DataOpt = None, probes: ProbesOpt = None, out_dir: RunOpt = None, config: ConfigOpt = None,
    model: Annotated[Optional[str], typer.Option(help=_train_help("model"))] = None,
    extend: Annotated[Optional[bool], typer.Option("--extend/--no-extend", help=_train_help("extend"))] = None,
    lr: LrOpt = None, epochs: EpochsOpt = None, batch_size: BatchOpt = None, every: EveryOpt = None,
    limit: LimitOpt = None, probe_limit: ProbeLimitOpt = None, seed: SeedOpt = None, max_length: MaxLenOpt = None,
    device: TrainDeviceOpt = None, resume: ResumeOpt = False, overwrite: OverwriteOpt = False,
    lora: LoraOpt = None, lora_r: LoraROpt = None, lora_alpha: LoraAlphaOpt = None, lora_targets: LoraTargetsOpt = None,
    lora_dropout: LoraDropoutOpt = None,
) -> None:
    """Supervised finetuning on chosen responses (with --extend: on chosen and rejected)."""
    _train("sft", config, dict(data=data, probes=probes, out=out_dir, model=model, extend=extend, learning_rate=lr,
                               epochs=epochs, batch_size=batch_size, every=every, limit=limit, probe_limit=probe_limit,
                               seed=seed, max_length=max_length, device=device,
                               **_lora_flags(lora, lora_r, lora_alpha, lora_targets, lora_dropout)), resume, overwrite)


@train_app.command("dpo")
def train_dpo(
    data: DataOpt = None, probes: ProbesOpt = None, out_dir: RunOpt = None, config: ConfigOpt = None,
    model: Annotated[Optional[str], typer.Option(help=_train_help("model"))] = None,
    from_run: Annotated[Optional[str], typer.Option("--from", help=_train_help("from_run"))] = None,
    loss: Annotated[Optional[str], typer.Option(help=f"{', '.join(loss_names(pairwise=True))}: " + _train_help("loss"))] = None,
    beta: Annotated[Optional[float], typer.Option(help=_train_help("beta"))] = None,
    lr: LrOpt = None, epochs: EpochsOpt = None, batch_size: BatchOpt = None, every: EveryOpt = None,
    limit: LimitOpt = None, probe_limit: ProbeLimitOpt = None, seed: SeedOpt = None, max_length: MaxLenOpt = None,
    device: TrainDeviceOpt = None, resume: ResumeOpt = False, overwrite: OverwriteOpt = False,
    on_policy: Annotated[Optional[bool], typer.Option("--on-policy/--off-policy", help=_train_help("on_policy"))] = None,
    judge: Annotated[Optional[str], typer.Option(help=_train_help("judge"))] = None,
    reward: Annotated[Optional[str], typer.Option(help=_train_help("reward"))] = None,
    base_url: Annotated[Optional[str], typer.Option(help=_train_help("judge_base_url"))] = None,
    api_key_env: Annotated[Optional[str], typer.Option(help=_train_help("judge_api_key_env"))] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help=_train_help("max_new_tokens"))] = None,
    temperature: Annotated[Optional[float], typer.Option(help=_train_help("temperature"))] = None,
    lora: LoraOpt = None, lora_r: LoraROpt = None, lora_alpha: LoraAlphaOpt = None, lora_targets: LoraTargetsOpt = None,
    lora_dropout: LoraDropoutOpt = None,
) -> None:
    """Direct preference optimisation (and its variants), the reference model being the starting model."""
    _train("dpo", config, dict(data=data, probes=probes, out=out_dir, model=model, from_run=from_run, loss=loss,
                               beta=beta, learning_rate=lr, epochs=epochs, batch_size=batch_size, every=every,
                               limit=limit, probe_limit=probe_limit, seed=seed, max_length=max_length, device=device,
                               on_policy=on_policy, judge=judge, reward=reward, max_new_tokens=max_new_tokens,
                               temperature=temperature, judge_base_url=base_url, judge_api_key_env=api_key_env,
                               **_lora_flags(lora, lora_r, lora_alpha, lora_targets, lora_dropout)),
           resume, overwrite)


@train_app.command("grpo")
def train_grpo(
    data: DataOpt = None, probes: ProbesOpt = None, out_dir: RunOpt = None, config: ConfigOpt = None,
    reward: Annotated[Optional[str], typer.Option(help=_train_help("reward"))] = None,
    model: Annotated[Optional[str], typer.Option(help=_train_help("model"))] = None,
    from_run: Annotated[Optional[str], typer.Option("--from", help=_train_help("from_run"))] = None,
    num_generations: Annotated[Optional[int], typer.Option(help=_train_help("num_generations"))] = None,
    loss: Annotated[Optional[str], typer.Option(help=f"{', '.join(loss_names(policy_gradient=True))}: "
                                                + _train_help("loss"))] = None,
    beta: Annotated[Optional[float], typer.Option(help=_train_help("beta"))] = None,
    scale_rewards: Annotated[Optional[str], typer.Option(help=_train_help("scale_rewards"))] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help=_train_help("max_new_tokens"))] = None,
    temperature: Annotated[Optional[float], typer.Option(help=_train_help("temperature"))] = None,
    lr: LrOpt = None, epochs: EpochsOpt = None, batch_size: BatchOpt = None, every: EveryOpt = None,
    limit: LimitOpt = None, probe_limit: ProbeLimitOpt = None, seed: SeedOpt = None, max_length: MaxLenOpt = None,
    device: TrainDeviceOpt = None, resume: ResumeOpt = False, overwrite: OverwriteOpt = False,
    lora: LoraOpt = None, lora_r: LoraROpt = None, lora_alpha: LoraAlphaOpt = None, lora_targets: LoraTargetsOpt = None,
    lora_dropout: LoraDropoutOpt = None,
) -> None:
    """RL finetuning with a reward (TRL's GRPO and its loss types), every sample's reward kept in RUN/rewards/."""
    _train("grpo", config, dict(data=data, probes=probes, out=out_dir, reward=reward, model=model, from_run=from_run,
                                num_generations=num_generations, loss=loss, beta=beta, scale_rewards=scale_rewards,
                                max_new_tokens=max_new_tokens, temperature=temperature, learning_rate=lr,
                                epochs=epochs, batch_size=batch_size, every=every, limit=limit,
                                probe_limit=probe_limit, seed=seed, max_length=max_length, device=device,
                                **_lora_flags(lora, lora_r, lora_alpha, lora_targets, lora_dropout)),
           resume, overwrite)


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run folders: an SFT run and the DPO run made --from it, or two such arms.")],
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Folder for figures/, report.html and signatures.json (default: the last run).")] = None,
    explained: Annotated[Optional[list[Path]], typer.Option("--explain", help="A folder written by `learndyn explain` (repeatable): the mass its step moved onto argmax tokens is shown beside the squeezing signature.")] = None,
) -> None:
    """Figures, the signatures table and report.html, from the runs' stored metrics alone."""
    from learndyn.report import build_report, evaluate_signatures

    target = out_dir if out_dir is not None else (runs[-1] if runs else None)
    if target is not None and (out_dir is not None or target.is_dir()):
        check_writable(target)
    page = build_report(runs, out_dir, explained=explained or ())
    print_signatures(evaluate_signatures(runs, explained=explained or ()))
    out.print(f"report: {page}")


def print_signatures(signatures: list[dict]) -> None:
    """The paper's observations: held, not held or inconclusive in these runs, with effects and 95% intervals."""
    from rich.table import Table

    from learndyn.report.page import estimate_text
    from learndyn.report.signatures import explained_text

    view = Table("observation", "arm", "verdict", "effect [interval] (claim)",
                 title="Signatures of the paper's observations (paired bootstrap over probe examples)")
    marks = {"held": "[green]held[/green]", "not held": "[red]not held[/red]", "inconclusive": "[yellow]inconclusive[/yellow]",
             "not applicable": "n/a"}
    for sig in signatures:
        numbers = "\n".join([estimate_text(e) for e in sig["estimates"]]
                            + [explained_text(s) for s in sig.get("explained_steps", [])]
                            + ([f"reading: {sig['reading']}"] if sig.get("reading") else []))
        view.add_row(sig["name"].split(" [")[0], sig.get("arm") or "both", marks[sig["verdict"]], numbers)
    out.print(view)


DEMO_OUT = Path("learndyn-demo")


def _rl_demo_help(name: str) -> str:
    from learndyn.experiments.rl_demo import RLDemoSettings

    return option_help(RLDemoSettings, name)


def _rl_demo(quick: bool, out_dir: Optional[Path], device: Optional[str], sft_epochs: Optional[float]) -> None:
    from learndyn.experiments.rl_demo import rl_demo_settings, run_rl_demo
    from learndyn.report import build_report, evaluate_signatures

    settings = rl_demo_settings(quick, out=None if out_dir is None else str(out_dir), device=device,
                                sft_epochs=sft_epochs)
    check_writable(Path(settings.out))
    runs = run_rl_demo(settings, console)
    page = build_report(runs, settings.out)
    print_signatures(evaluate_signatures(runs))
    out.print(f"report: {page.resolve()}")


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for probes, runs and the report (default "
                                                        "learndyn-demo; learndyn-demo-rl with --rl).")] = DEMO_OUT,
    quick: Annotated[bool, typer.Option(help="A smaller run (about 5 minutes on 2 CPU cores).")] = False,
    device: DeviceOpt = None,
    rl: Annotated[bool, typer.Option(help="The RL demo instead: GRPO on the built-in arithmetic task, with its "
                                          "RL probes and signatures.")] = False,
    sft_epochs: Annotated[Optional[float], typer.Option(help="With --rl: " + _rl_demo_help("sft_epochs"))] = None,
) -> None:
    """Baseline SFT -> DPO and extended SFT -> DPO on the built-in model and example data, then the report
    (with --rl: GRPO on the built-in arithmetic task)."""
    from learndyn.experiments.demo import run_demo, demo_settings
    from learndyn.report import build_report, evaluate_signatures

    if sft_epochs is not None and not rl:
        raise LearndynError("--sft-epochs applies to the RL demo; add --rl")
    if rl:
        return _rl_demo(quick, out_dir if out_dir != DEMO_OUT else None, device, sft_epochs)
    settings = demo_settings(quick, out=str(out_dir), device=device)
    check_writable(out_dir)
    runs = run_demo(settings, console)
    page = build_report(runs, out_dir)
    signatures = evaluate_signatures(runs)
    print_signatures(signatures)
    if any(s["name"].startswith("dpo_chosen_rises_then_falls") and s["verdict"] != "held" for s in signatures):
        out.print("Chosen's rise then fall during DPO takes a longer DPO run than the demo's budget on a CPU: "
                  "bench/README.md ('Rise then fall') has the longer runs and what they showed; "
                  "bench/replicate_hh.py --long runs one on HH.")
    out.print(f"report: {page.resolve()}")


def _explain_help(name: str) -> str:
    from learndyn.experiments.explain import ExplainSettings

    return option_help(ExplainSettings, name)


@app.command()
def explain(
    update: Annotated[str, typer.Option(help=_explain_help("update"))],
    probes: Annotated[str, typer.Option(help=_explain_help("probes"))],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for changes.parquet, positions.parquet, summary.json and figures.")] = Path("learndyn-explain"),
    model: Annotated[Optional[str], typer.Option(help=_explain_help("model"))] = None,
    rows: Annotated[Optional[str], typer.Option(help=_explain_help("rows"))] = None,
    loss: Annotated[Optional[str], typer.Option(help=f"{', '.join(loss_names(explained=True))}: " + _explain_help("loss"))] = None,
    optimizer: Annotated[Optional[str], typer.Option(help=_explain_help("optimizer"))] = None,
    lr: Annotated[Optional[float], typer.Option(help=_explain_help("lr"))] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help=_explain_help("weight_decay"))] = None,
    max_grad_norm: Annotated[Optional[float], typer.Option(help=_explain_help("max_grad_norm"))] = None,
    beta: Annotated[Optional[float], typer.Option(help=_explain_help("beta"))] = None,
    ref_model: Annotated[Optional[str], typer.Option(help=_explain_help("ref_model"))] = None,
    on_policy: Annotated[Optional[bool], typer.Option("--on-policy", help=_explain_help("on_policy"))] = None,
    types: Annotated[Optional[str], typer.Option(help=_explain_help("types"))] = None,
    probe_limit: Annotated[Optional[int], typer.Option(help=_explain_help("probe_limit"))] = None,
    chunk_tokens: Annotated[Optional[int], typer.Option(help=_explain_help("chunk_tokens"))] = None,
    max_length: Annotated[Optional[int], typer.Option(help=_explain_help("max_length"))] = None,
    reward: Annotated[Optional[str], typer.Option(help=_explain_help("reward"))] = None,
    num_generations: Annotated[Optional[int], typer.Option(help=_explain_help("num_generations"))] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help=_explain_help("max_new_tokens"))] = None,
    scale_rewards: Annotated[Optional[str], typer.Option(help=_explain_help("scale_rewards"))] = None,
    seed: Annotated[Optional[int], typer.Option(help=_explain_help("seed"))] = None,
    tokenizer: Annotated[Optional[str], typer.Option(help=_explain_help("tokenizer"))] = None,
    device: DeviceOpt = None,
    dtype: Annotated[Optional[str], typer.Option(help=_explain_help("dtype"))] = None,
) -> None:
    """Explain one update step: predicted vs actual change of every probe response, split into the
    parts caused by the chosen and the rejected residual (GRPO: by the completions of positive and of
    negative advantage), and where the probability mass went."""
    from learndyn.experiments.explain import ExplainSettings, run_explain

    given = dict(model=model, rows=rows and _int_list(rows, "--rows"), loss=loss, optimizer=optimizer, lr=lr,
                 weight_decay=weight_decay, max_grad_norm=max_grad_norm, beta=beta, ref_model=ref_model,
                 on_policy=on_policy, types=_names(types), probe_limit=_positive(probe_limit, "--probe-limit"),
                 chunk_tokens=_positive(chunk_tokens, "--chunk-tokens"), max_length=_positive(max_length, "--max-length"),
                 reward=reward, num_generations=num_generations, max_new_tokens=max_new_tokens,
                 scale_rewards=scale_rewards, seed=seed, tokenizer=tokenizer, device=device, dtype=dtype)
    given = {k: v for k, v in given.items() if v is not None}
    if max_grad_norm == 0:
        given["max_grad_norm"] = None  # no clipping
    settings = ExplainSettings(update=update, probes=probes, **given)
    check_writable(out_dir)
    with reporting_oom("explain"):
        result = run_explain(settings, out_dir)
    print_explanation(result.summary)
    group = ", group.jsonl" if "zero_variance_groups" in result.summary["update"] else ""
    out.print(f"written: {out_dir}/changes.parquet, positions.parquet, summary.json{group}, changes.png, squeeze.png")


def print_explanation(summary: dict) -> None:
    from rich.table import Table

    parts = [c for c in summary.get("parts", ["predicted_from_chosen", "predicted_from_rejected"])
             if c != "predicted_from_state"]
    view = Table("response_type", "predicted", "actual", *(c.replace("predicted_", "").replace("_", " ") for c in parts),
                 "argmax mass pred.", "argmax mass actual", title=f"Mean change of log π(y) after one "
                 f"{summary['loss']} step ({summary['optimizer']}, lr {summary['lr']:g})")
    for name, row in summary["by_type"].items():
        view.add_row(name, *(f"{row[k]:+.4f}" for k in ("predicted", "actual", *parts, "argmax_mass_predicted",
                                                         "argmax_mass_actual")))
    out.print(view)
    update = summary["update"]
    if "zero_variance_groups" in update:  # GRPO
        out.print(f"GRPO step on {len(update['sequences'])} completions of {len(update['groups'])} prompts "
                  f"(advantages scaled by {update['scale_rewards']}); {update['zero_variance_groups']} group(s) "
                  "without reward variance gave no gradient")
    rho = summary["rank_correlation"]
    out.print(f"first order vs actual: relative error {summary['relative_error']:.3g}, rank correlation "
              f"{'n/a' if rho is None else f'{rho:.3f}'} over {summary['responses']} responses; mass onto argmax "
              f"tokens: predicted {summary['argmax_mass']['predicted_sum']:+.4f}, actual "
              f"{summary['argmax_mass']['actual_sum']:+.4f} over {summary['positions']} positions")


def _forecast_help(name: str) -> str:
    from learndyn.experiments.forecast import ForecastSettings

    return option_help(ForecastSettings, name)


@app.command()
def forecast(
    data: Annotated[str, typer.Option(help=_forecast_help("data"))],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for forecast.parquet, summary.json, forecast.html (and displacement.npy, filtered.jsonl).")] = Path("learndyn-forecast"),
    model: Annotated[Optional[str], typer.Option(help=_forecast_help("model"))] = None,
    loss: Annotated[Optional[str], typer.Option(help=f"{', '.join(n for n in loss_names(explained=True, pairwise=True))}: " + _forecast_help("loss"))] = None,
    beta: Annotated[Optional[float], typer.Option(help=_forecast_help("beta"))] = None,
    lr: Annotated[Optional[float], typer.Option(help=_forecast_help("lr"))] = None,
    cross: Annotated[Optional[bool], typer.Option("--cross", help=_forecast_help("cross"))] = None,
    projection_dim: Annotated[Optional[int], typer.Option(help=_forecast_help("projection_dim"))] = None,
    top: Annotated[Optional[int], typer.Option(help=_forecast_help("top"))] = None,
    drop_top: Annotated[Optional[str], typer.Option(help=_forecast_help("drop_top") + " Written as 5% or 5.")] = None,
    drop_by: Annotated[Optional[str], typer.Option(help=_forecast_help("drop_by"))] = None,
    max_length: Annotated[Optional[int], typer.Option(help=_forecast_help("max_length"))] = None,
    limit: Annotated[Optional[int], typer.Option(help=_forecast_help("limit"))] = None,
    seed: Annotated[Optional[int], typer.Option(help=_forecast_help("seed"))] = None,
    lora: Annotated[Optional[bool], typer.Option("--lora", help=_forecast_help("lora"))] = None,
    lora_r: LoraROpt = None, lora_alpha: LoraAlphaOpt = None, lora_targets: LoraTargetsOpt = None,
    device: DeviceOpt = None,
    resume: Annotated[bool, typer.Option(help="Finish an interrupted forecast in --out (same settings and data).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the forecast in --out.")] = False,
) -> None:
    """Forecast, before training, which preference pairs will lower their chosen responses' likelihood
    (and which pairs drag which), with CHES beside the exact first-order forecast."""
    from learndyn.experiments.forecast import CHECKPOINT, ForecastSettings, run_forecast

    given = dict(model=model, loss=loss, beta=beta, lr=lr, cross=cross, projection_dim=projection_dim, top=top,
                 drop_top=_percent(drop_top, "--drop-top"), drop_by=drop_by,
                 max_length=_positive(max_length, "--max-length"), limit=_positive(limit, "--limit"), seed=seed, device=device, lora=lora, lora_r=lora_r,
                 lora_alpha=lora_alpha, lora_targets=lora_targets)
    settings = ForecastSettings(data=data, **{k: v for k, v in given.items() if v is not None})
    check_writable(out_dir)
    try:
        summary = run_forecast(settings, out_dir, resume=resume, overwrite=overwrite)
    except KeyboardInterrupt:
        if not (out_dir / CHECKPOINT).exists():
            raise
        raise Interrupted(f"interrupted; the finished pairs are kept in {out_dir / CHECKPOINT}: rerun with --resume "
                          "to continue") from None
    score = summary["ranking_score"]
    negative = summary.get("cross_predicted_negative", summary["self_predicted_negative"])
    over = f"the {summary['parameters']:,} parameters of a fresh LoRA adapter" if settings.lora else \
        f"{summary['parameters']:,} trainable parameters"
    out.print(f"{summary['scored']} of {summary['pairs']} pairs forecast over {over}; {negative} are forecast to lower their own "
              f"chosen response ({score} < 0)")
    if summary.get("projection_rank_agreement") is not None:
        out.print(f"  displacement map: {summary['projection_dim']}-dim sketch, row sums vs exact cross_predicted: "
                  f"rank correlation {summary['projection_rank_agreement']:.3f}")
    for example_id, note in summary["notes"].items():
        out.print(f"  {example_id}: {note}", highlight=False)
    if "dropped" in summary:
        out.print(f"  dropped the {len(summary['dropped'])} most displacing pairs by {summary['dropped_by']}: "
                  f"{out_dir / 'filtered.jsonl'}")
        if summary["left_out_empty"]:
            out.print(f"  also left out {len(summary['left_out_empty'])} pairs with an empty response (train refuses "
                      "them)")
    out.print(f"written: {out_dir}/forecast.parquet, summary.json, forecast.html")


def _percent(text: str | None, option: str) -> float | None:
    if text is None:
        return None
    try:
        return float(text.strip().removesuffix("%"))
    except ValueError:
        raise LearndynError(f"{option} takes a percentage such as 5% or 5, got '{text}'") from None


@app.command()
def squeeze(
    case: Annotated[Optional[str], typer.Option(help="One case (default: all); see the list in the error for a bad name.")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for figures and summary.json.")] = Path("learndyn-squeeze"),
    seed: Annotated[int, typer.Option(help="Seed of the random model.")] = 0,
) -> None:
    """The squeezing effect on a toy linear softmax model: one positive, negative or DPO-like step."""
    from rich.table import Table

    from learndyn.experiments.squeeze import run_squeeze, table_rows

    check_writable(out_dir)
    rows = table_rows(run_squeeze(out_dir, case=case, seed=seed))
    view = Table(*rows[0].keys(), title="One update of the toy model (probabilities before → after)")
    for row in rows:
        view.add_row(*row.values())
    out.print(view)
    out.print(f"written: {out_dir}/summary.json and one figure per case")


@app.command()
def digits(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for figures and summary.json.")] = Path("learndyn-digits"),
    seed: Annotated[int, typer.Option(help="Seed of the split, the network and the data order.")] = 0,
    steps: Annotated[int, typer.Option(help="SGD steps (one example each).")] = 4000,
) -> None:
    """Classification dynamics, exactly: A, K, G on sklearn's 8x8 digits, one step and over training."""
    from learndyn.experiments.digits import run_digits

    check_writable(out_dir)
    summary = run_digits(out_dir, seed=seed, steps=steps)
    one = summary["one_step"]
    out.print(f"one SGD step on a '{one['update_digit']}': predicted -lr*A*K*G vs actual change of log pi, "
              f"relative error {summary['relative_error']:.3g}")
    out.print(f"test accuracy {summary['test_accuracy']:.3f}; influence over training: mean diagonal "
              f"{summary['influence']['mean_diagonal']:+.4f}, mean off-diagonal {summary['influence']['mean_off_diagonal']:+.4f}")
    out.print(f"written: {out_dir}/summary.json, digits_one_step.png, digits_influence.png")


def _int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise LearndynError(f"{option} takes row numbers separated by commas, like 0,3; got '{text}'") from None


def _positive(value: int | None, option: str) -> int | None:
    """A count option: 0 would read nothing and blame the file ("empty probe file")."""
    if value is not None and value < 1:
        raise LearndynError(f"{option} must be a positive integer, got {value}")
    return value


def _names(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    from learndyn.vocab import check_types

    return tuple(check_types([part.strip() for part in text.split(",") if part.strip()]))


@app.command()
def generate(
    run: Annotated[str, typer.Argument(metavar="RUN", help="A run folder (its checkpoints/final is used), a model folder (one holding config.json), the built-in name, a .gguf file or a hub id.")],
    data: Annotated[str, typer.Option(help="Preference data whose prompts are answered (see `probes build --data`), e.g. example:test.")],
    out_path: Annotated[Path, typer.Option("--out", help="Response file to write (JSONL).")],
    n: Annotated[Optional[int], typer.Option("--n", help="Answer only the first N prompts.")] = None,
    sample: Annotated[bool, typer.Option("--sample/--greedy", help="Sample (temperature, seeded) instead of greedy decoding.")] = False,
    max_new_tokens: Annotated[int, typer.Option(help="Longest response, in tokens.")] = 128,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (with --sample).")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed (with --sample).")] = 0,
    batch_size: Annotated[int, typer.Option(help="Prompts decoded together (speed only).")] = 16,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out file.")] = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Generate one response per prompt of DATA (batched), for judges and intrinsic measures."""
    from learndyn.evaluation.intrinsic import text_measures
    from learndyn.evaluation.responses import DecodingSettings, generate_file

    settings = DecodingSettings(sample=sample, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                batch_size=batch_size)
    if out_path.exists() and not overwrite:
        raise LearndynError(f"{out_path} exists; pass --overwrite to replace it")
    check_writable(out_path.parent)
    rows = generate_file(run, data, out_path, settings, n=n, device=device, dtype=dtype)
    m = text_measures(rows)
    ratios = ", ".join(f"{name} {'n/a' if m[key] is None else format(m[key], '.3f')}" for name, key in
                       (("distinct-1", "distinct_1"), ("distinct-2", "distinct_2"), ("repetition-3", "repetition_3")))
    out.print(f"wrote {len(rows)} responses to {out_path} ({settings.to_row()['decoding']}, "
              f"at most {max_new_tokens} new tokens)")
    out.print(f"  mean {m['mean_words']:.1f} words, {ratios}, {m['empty_responses']} empty", highlight=False)


@app.command()
def judge(
    a_file: Annotated[Path, typer.Argument(help="Response file A (JSONL with prompt and response, e.g. from `learndyn generate`).")],
    b_file: Annotated[Path, typer.Argument(help="Response file B, with the same prompts in the same order.")],
    out_path: Annotated[Path, typer.Option("--out", help="Verdict file (JSONL, one row per pair); verdicts already in it are reused.")],
    judge_spec: Annotated[str, typer.Option("--judge", help="openai:MODEL (any OpenAI-compatible endpoint), local[:MODEL] (a local chat model's p(A) vs p(B)) or reward:MODEL (a reward model's scores).")] = "local",
    base_url: BaseUrlOpt = None, api_key_env: ApiKeyEnvOpt = None, rate_limit: RateLimitOpt = None,
    max_pairs: Annotated[Optional[int], typer.Option(help="Judge only the first N pairs.")] = None,
    workers: Annotated[int, typer.Option(help="Requests at once (openai judge).")] = 4,
    batch_size: Annotated[int, typer.Option(help="Prompts per forward pass (local judge).")] = 8,
    tie_margin: Annotated[float, typer.Option(help="Local judge: a tie when |log p(A) - log p(B)| is below this (nats).")] = 0.02,
    overwrite: Annotated[bool, typer.Option(help="Discard the verdicts already in --out and judge again.")] = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Judge two response files pairwise, each pair in both orders, and print the win rate of A."""
    from learndyn.judging import judge_files, make_judge, win_rate

    check_writable(out_path.parent)
    judge_ = make_judge(judge_spec, **_endpoint(base_url, api_key_env, rate_limit), workers=workers,
                        batch_size=batch_size, tie_margin=tie_margin, device=device, dtype=dtype)
    result = judge_files(a_file, b_file, judge_, out_path, max_pairs=_positive(max_pairs, "--max-pairs"),
                         overwrite=overwrite)
    rate = win_rate(result.rows)
    out.print(f"{rate['pairs']} pairs judged by {judge_.spec} in both orders ({rate['pairs'] - result.reused} now, "
              f"{result.reused} reused) -> {out_path}", highlight=False)
    out.print(f"  A = {a_file}, B = {b_file}: A wins {rate['wins']}, B wins {rate['losses']}, ties {rate['ties']}, "
              f"unparsed {rate['unparsed']} (orders disagreed on {rate['inconsistent']})", highlight=False)
    if rate["win_rate"] is None:
        out.print("  win rate of A: n/a (no parsed verdict)")
    else:
        out.print(f"  win rate of A: {rate['win_rate']:.3f}, 95% Wilson interval [{rate['ci_low']:.3f}, "
                  f"{rate['ci_high']:.3f}] (ties count half; unparsed left out)", highlight=False)


def _compare_help(name: str) -> str:
    from learndyn.experiments.compare import QUICK, CompareSettings

    return option_help(CompareSettings, name, quick=QUICK)


@app.command()
def compare(
    data: Annotated[str, typer.Option(help=_compare_help("data"))],
    eval_data: Annotated[str, typer.Option(help=_compare_help("eval_data"))],
    out_dir: Annotated[Optional[Path], typer.Option("--out", help=_compare_help("out"))] = None,
    model: ModelOpt = "smollm2-135m-instruct",
    judge_spec: Annotated[Optional[str], typer.Option("--judge", help=_compare_help("judge"))] = None,
    quick: Annotated[bool, typer.Option(help="Small sizes (16 pairs, 2 SFT epochs, 1 DPO epoch, 64-token answers).")] = False,
    on_policy: Annotated[bool, typer.Option(help=_compare_help("on_policy"))] = False,
    filter_top: Annotated[Optional[str], typer.Option(help=_compare_help("filter_top") + " Written as 10% or 10.")] = None,
    examples: Annotated[Optional[int], typer.Option(help=_compare_help("examples"))] = None,
    eval_n: Annotated[Optional[int], typer.Option(help=_compare_help("eval_n"))] = None,
    sft_epochs: Annotated[Optional[float], typer.Option(help=_compare_help("sft_epochs"))] = None,
    dpo_epochs: Annotated[Optional[float], typer.Option(help=_compare_help("dpo_epochs"))] = None,
    sft_lr: Annotated[Optional[float], typer.Option(help=_compare_help("sft_lr"))] = None,
    dpo_lr: Annotated[Optional[float], typer.Option(help=_compare_help("dpo_lr"))] = None,
    beta: Annotated[Optional[float], typer.Option(help=_compare_help("beta"))] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help=_compare_help("max_new_tokens"))] = None,
    max_length: Annotated[Optional[int], typer.Option(help=_compare_help("max_length"))] = None,
    seed: Annotated[Optional[int], typer.Option(help=_compare_help("seed"))] = None,
    base_url: BaseUrlOpt = None, api_key_env: ApiKeyEnvOpt = None, rate_limit: RateLimitOpt = None,
    resume: Annotated[bool, typer.Option(help="Reuse the finished runs, answers and verdicts in --out.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Start again in an --out that holds an earlier comparison.")] = False,
    device: DeviceOpt = None,
    lora: Annotated[bool, typer.Option("--lora/--full", help=_compare_help("lora"))] = False,
) -> None:
    """Baseline SFT -> DPO against extended SFT -> DPO: train both, answer held-out prompts, judge, report."""
    from learndyn.experiments.compare import compare_settings, run_compare

    settings = compare_settings(quick, data=data, eval_data=eval_data, out=out_dir and str(out_dir), model=model,
                                judge=judge_spec, on_policy=on_policy, filter_top=_percent(filter_top, "--filter-top"),
                                examples=_positive(examples, "--examples"),
                                eval_n=_positive(eval_n, "--eval-n"),
                                sft_epochs=sft_epochs, dpo_epochs=dpo_epochs, sft_lr=sft_lr, dpo_lr=dpo_lr, beta=beta,
                                max_new_tokens=max_new_tokens, max_length=max_length, seed=seed,
                                device=device, lora=lora)
    out_dir = Path(settings.out)
    check_writable(out_dir)
    summary = run_compare(settings, resume=resume, overwrite=overwrite, console=console,
                          judge_options=_endpoint(base_url, api_key_env, rate_limit))
    print_comparison(summary)
    out.print(f"summary: {out_dir / 'summary.json'}\nreport: {Path(summary['report']).resolve()}")


def print_comparison(summary: dict) -> None:
    """Win rates and the intrinsic measures, as the report shows them."""
    from rich.table import Table

    from learndyn.judging.winrate import rate_text
    from learndyn.report.comparison import MEASURES

    view = Table("A", "B", "win rate of A [95% CI]", "A wins", "B wins", "ties", "unparsed", "orders disagreed",
                 title=f"Judged by {summary['judge']} on {summary['held_out_prompts']} held-out prompts (both orders)")
    for r in summary["win_rates"]:
        view.add_row(r["a"], r["b"], rate_text(r), *(str(r[k]) for k in ("wins", "losses", "ties", "unparsed", "inconsistent")))
    out.print(view)
    shown = [(k, h) for k, h in MEASURES if any(k in m for m in summary["intrinsic"].values())]
    view = Table("checkpoint", *(h for _, h in shown), title="Intrinsic measures of the answers")
    for name, m in summary["intrinsic"].items():
        view.add_row(name, *("n/a" if m.get(k) is None else f"{m[k]:.3f}" if isinstance(m[k], float) else str(m[k])
                             for k, _ in shown))
    out.print(view)
    print_signatures(summary["signatures"])


def print_summary(scores) -> None:
    """The per-type means as a table, in vocabulary order."""
    from rich.table import Table

    from learndyn.scoring import summarize

    table = summarize(scores)
    view = Table("response_type", "n", "logp_sum", "logp_mean", "n_tokens", "argmax_logp", "argmax_prob",
                 "entropy", "residual_norm", title="Per-type means")
    metrics = [str(c.header) for c in view.columns[2:]]
    for name, row in table.iterrows():
        view.add_row(str(name), str(int(row["n"])), *(f"{row[m]:.1f}" if m == "n_tokens" else f"{row[m]:.3f}" for m in metrics))
    out.print(view)


if __name__ == "__main__":
    main()
