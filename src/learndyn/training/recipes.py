"""Tracked finetuning on TRL: SFT (optionally "extended" to rejected responses), DPO with its variants,
and GRPO (RL with a verifiable reward, grpo.py).

A recipe turns `TrainSettings` into a run folder (see runs.py): it loads the starting model (a model
name, or the final checkpoint of an earlier run for SFT -> DPO chains), builds the TRL dataset,
attaches the LearningDynamicsCallback and trains. The reference model of DPO is the starting model.
With `lora`, only a LoRA adapter (peft) is trained and saved; the run's checkpoint records its base
model, and a run started `--from` a LoRA run trains a fresh adapter on the earlier adapter merged into
its base (so DPO's reference, the policy with its adapter disabled, is exactly the SFT model).
DPO is off-policy (the data's chosen/rejected pairs) unless `on_policy`: then every step samples two
responses per prompt from the current policy and a judge or reward function ranks them (online.py).
GRPO samples `num_generations` completions per prompt each step and trains on their group-relative
rewards; there is no reference model unless `beta` > 0 (the KL penalty, TRL's default 0).
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

from learndyn.atomic import atomic_dir
from learndyn.errors import LearndynError, first_line
from learndyn.losses import get_loss
from learndyn.memory import check_fits
from learndyn.models import BUILTIN_MODEL
from learndyn.openai_chat import DEFAULT_API_KEY_ENV, DEFAULT_BASE_URL
from learndyn.settings import setting
from learndyn.training.inputs import data_identity, differences, identity, read_inputs
from learndyn.training.runs import (check_run_folder, final_checkpoint, is_finished, is_run, mark_finished, read_config,
                                    start_run)

log = logging.getLogger(__name__)

PHASES = ("sft", "dpo", "grpo")


@dataclass
class TrainSettings:
    """Everything that defines a tracked run; saved as RUN/config.yaml."""

    phase: str = setting(help="sft, dpo or grpo")
    data: str = setting(help="Training preference data (see `probes build --data`)")
    probes: str = setting(help="Probe file to track")
    out: str = setting(help="Run folder")
    model: str = setting(BUILTIN_MODEL, "Starting model, unless --from is given", shown="the built-in one")
    from_run: str | None = setting(None, "Start from this run's final checkpoint")
    extend: bool = setting(False, "Also train on rejected responses (the paper's dataset extension)")
    loss: str | None = setting(None, "TRL loss type", shown="sigmoid (DPO) for dpo, dapo (TRL's default) for grpo")
    beta: float | None = setting(None, "DPO beta; for GRPO the KL penalty's weight (0: no reference model)",
                                 shown="0.1 DPO, 0 GRPO")
    learning_rate: float | None = setting(None, "Learning rate", shown="2e-5 SFT, 5e-6 DPO, 1e-6 GRPO; with --lora "
                                                                   "2e-4 SFT, 5e-5 DPO, 1e-5 GRPO")
    epochs: float = setting(2.0, "Passes over the data")
    batch_size: int = setting(8, "Examples per optimizer step (per device; GRPO counts sampled completions, "
                                 "a multiple of --num-generations)")
    grad_accum: int = setting(1, "Gradient accumulation steps")
    max_length: int = setting(512, "Tokens per training sequence and probe; a longer prompt keeps its last tokens")
    every: int = setting(2, "Score probes every N optimizer steps")
    limit: int | None = setting(None, "Train on the first N examples only")
    probe_limit: int | None = setting(None, "Track the first N probe prompts only")
    seed: int = setting(0, "Seed of data order and initialisation")
    device: str | None = setting(None, "cpu, cuda, cuda:1, ...", shown="GPU if present")
    report_to: list[str] = setting(help="transformers report_to integrations", factory=list)
    save_model: bool = setting(True, "Keep the final model in RUN/checkpoints/final")
    on_policy: bool = setting(False, "Each step, sample two responses per prompt from the current model and train "
                                     "on them, ranked", shown="off-policy, the data's pairs")
    num_generations: int = setting(4, "Completions sampled per prompt and step (GRPO's group size)")
    scale_rewards: str = setting("group", "GRPO's advantage scaling: group (divide by the group's reward std), "
                                          "batch, or none (Dr. GRPO)")
    judge: str = setting("local", "Ranks the two samples (--on-policy): local, local:MODEL, openai:MODEL or "
                                  "reward:MODEL")
    reward: str | None = setting(None, "The reward (GRPO), or a reward ranking on-policy DPO's samples instead of "
                                       "the judge: arithmetic, reward:MODEL "
                                       "(a sequence-classification reward model) or MODULE:FUNCTION (TRL's reward "
                                       "signature; imports Python code, the current folder is searched)")
    judge_base_url: str | None = setting(None, "Endpoint of an openai judge (--on-policy)",
                                         shown=DEFAULT_BASE_URL)
    judge_api_key_env: str | None = setting(None, "NAME of the environment variable holding an openai judge's API "
                                                  "key (only the name is saved)", shown=DEFAULT_API_KEY_ENV)
    max_new_tokens: int = setting(64, "Longest sampled response, in tokens (GRPO, --on-policy)")
    temperature: float = setting(1.0, "Sampling temperature (GRPO, --on-policy)")
    lora: bool = setting(False, "Train a LoRA adapter (peft) and save only it, or all weights", shown="--full")
    lora_r: int = setting(16, "LoRA rank")
    lora_alpha: int = setting(32, "LoRA alpha; the adapter's update is scaled by alpha/r")
    lora_dropout: float = setting(0.0, "Dropout on the adapter's input")
    lora_targets: str = setting("all-linear", "Modules given adapters: all-linear or comma-separated names, e.g. "
                                              "q_proj,v_proj")

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise LearndynError(f"unknown phase '{self.phase}'; valid: {', '.join(PHASES)}")
        grpo = self.phase == "grpo"
        if self.loss is None:
            self.loss = "dapo" if grpo else "sigmoid"
        # TRL's name ("dpo" reads as "sigmoid"); an SFT run keeps the DPO default it never uses
        loss = get_loss(self.loss, policy_gradient=True) if grpo else get_loss(self.loss, pairwise=True)
        self.loss = loss.name
        if self.beta is None:
            self.beta = loss.default_beta
        if self.learning_rate is None:
            # A LoRA update moves a rank-r product of small matrices, whose effect per step is far smaller
            # than a full-weight step at the same lr: LoRA needs ~10-100x the full-finetuning lr (2e-4 is
            # the usual LoRA SFT value), DPO keeps its ~4-10x smaller step than SFT, and GRPO TRL's 1e-6.
            full, lora = {"sft": (2e-5, 2e-4), "dpo": (5e-6, 5e-5), "grpo": (1e-6, 1e-5)}[self.phase]
            self.learning_rate = lora if self.lora else full
        for name in ("batch_size", "grad_accum", "every"):
            if getattr(self, name) < 1:
                raise LearndynError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_length < 2:
            raise LearndynError(f"max_length must be at least 2 (a prompt token and a response token), "
                                f"got {self.max_length}")
        for name in ("epochs", "learning_rate"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise LearndynError(f"{name} must be a positive finite number, got {value}")
        self._check_on_policy()
        self._check_grpo()
        self._check_lora()

    def _check_grpo(self) -> None:
        if self.phase != "grpo":
            return
        if self.reward is None:
            from learndyn.rewards import FORMS

            raise LearndynError(f"GRPO needs a reward: --reward {FORMS}")
        if self.on_policy or self.extend:
            raise LearndynError("--on-policy and --extend do not apply to GRPO (it always samples from the policy)")
        if self.num_generations < 2:
            raise LearndynError(f"num_generations must be at least 2 (advantages compare a prompt's samples), "
                                f"got {self.num_generations}")
        if (self.batch_size * self.grad_accum) % self.num_generations:
            raise LearndynError(f"GRPO's batch is counted in completions: batch_size x grad_accum "
                                f"({self.batch_size} x {self.grad_accum}) must be a multiple of num_generations "
                                f"({self.num_generations})")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise LearndynError(f"scale_rewards must be group, batch or none, got '{self.scale_rewards}'")
        if self.beta < 0 or self.max_new_tokens < 1 or not self.temperature > 0:
            raise LearndynError("GRPO needs beta >= 0, max_new_tokens >= 1 and a positive temperature")
        from learndyn.rewards import load_reward

        load_reward(self.reward, device=self.device)  # a bad spec fails before the run folder is touched

    def _check_lora(self) -> None:
        if self.lora_r < 1 or not self.lora_alpha > 0:
            raise LearndynError(f"lora_r must be at least 1 and lora_alpha positive, got {self.lora_r} and "
                                f"{self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise LearndynError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_targets.strip(" ,"):
            raise LearndynError("lora_targets is empty; give all-linear or module names such as q_proj,v_proj")

    def _check_on_policy(self) -> None:
        """Fail on creation, before a run folder is touched: a bad reward module or judge spec would
        otherwise surface only after the model has loaded."""
        if self.reward is not None and not self.on_policy and self.phase != "grpo":
            raise LearndynError(f"--reward {self.reward}: a reward function ranks on-policy samples; add --on-policy")
        given = [flag for flag, value in (("--base-url", self.judge_base_url), ("--api-key-env", self.judge_api_key_env))
                 if value is not None]
        if given and not (self.on_policy and self.reward is None and self.judge.startswith("openai:")):
            raise LearndynError(f"{' and '.join(given)} (judge_base_url, judge_api_key_env) set the endpoint of an "
                                "openai judge: they need --on-policy and --judge openai:MODEL, without --reward")
        if not self.on_policy:
            return
        if self.phase != "dpo":
            raise LearndynError(f"on_policy applies to DPO only (train dpo --on-policy), not to phase '{self.phase}'")
        get_loss(self.loss, pairwise=True, online=True)
        if self.max_new_tokens < 1 or not self.temperature > 0:
            raise LearndynError("on_policy needs max_new_tokens >= 1 and a positive temperature")
        from learndyn.training.online import check_ranker

        check_ranker(self.judge, self.reward, **self.judge_options())

    def judge_options(self) -> dict[str, Any]:
        """The openai judge's endpoint settings for `make_judge` (None: its default)."""
        return {"base_url": self.judge_base_url, "api_key_env": self.judge_api_key_env}

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> TrainSettings:
        """Settings from a YAML file (the format of RUN/config.yaml and `train --config`), with
        `overrides` on top: `TrainSettings.from_yaml("sft.yaml", out="runs/b")`."""
        return cls.from_dict({**read_yaml(path), **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainSettings:
        """Build from a YAML/flags dict, naming any unknown key (`from` is accepted for from_run)."""
        values = dict(values)
        if "from" in values:
            values["from_run"] = values.pop("from")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise LearndynError(f"unknown setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        missing = [n for n in ("phase", "data", "probes", "out") if values.get(n) is None]
        if missing:
            raise LearndynError(f"missing setting(s): {', '.join(missing)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["from"] = values.pop("from_run")
        return values


def train(settings: TrainSettings, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Run one tracked phase; returns the run folder. Interrupting it keeps the evaluations written.

    Everything that can fail on the user's input (the folder, --from, data, probes, a resumed run's
    settings and inputs, the model itself) is checked before the run folder is touched."""
    from learndyn.data import fit_prompts, load_preferences
    from learndyn.probes.files import read_probes
    from learndyn.training.callback import LearningDynamicsCallback

    run = Path(settings.out)
    check_run_folder(run, resume=resume, overwrite=overwrite)
    start = _starting_point(settings)
    need_rejected = (settings.phase == "dpo" and not settings.on_policy) or settings.extend
    prefs = load_preferences(settings.data, limit=settings.limit, need_rejected=need_rejected)
    probes = read_probes(settings.probes, limit=settings.probe_limit)
    continuing = resume and is_run(run)
    inputs = run_inputs(settings)
    if continuing:
        differ = resume_differences(settings, run, inputs)
        if differ:
            raise LearndynError(f"{run} was made with other settings; --resume needs the same ones (or use "
                                f"--overwrite): {'; '.join(differ)}")
        if is_finished(run):
            log.warning(f"{run} finished already; nothing to resume")
            return run
    model, tokenizer = load_trainable(start, settings.device)  # a wrong --model fails before anything is removed
    peft_config = lora_config(settings, model) if settings.lora else None  # so does a --lora-targets matching nothing
    if not settings.lora:  # gradients and AdamW moments of every weight; a LoRA adapter's are small
        check_fits(model, "train", tokens=settings.batch_size * settings.max_length)
    if not continuing:
        start_run(run, settings.to_dict(), inputs, overwrite=overwrite)

    prefs, cut = fit_prompts(prefs, tokenizer, settings.max_length)
    if cut:
        log.warning(f"{run}: {cut} of {len(prefs)} prompts are too long for max_length {settings.max_length} "
                    "with their responses; each keeps its last tokens")
    trainer = build_trainer(settings, model, tokenizer, prefs, run, peft_config)
    callback = LearningDynamicsCallback(probes, run, every=settings.every, phase=settings.phase, tokenizer=tokenizer,
                                        trainer=trainer, max_length=settings.max_length)
    trainer.add_callback(callback)
    quiet_progress(trainer, f"{settings.phase.upper()}{' (extended)' if settings.extend else ''}"
                             f"{' (on-policy)' if settings.on_policy else ''}")
    trainer.train()
    if callback.nan_step is not None:
        raise LearndynError(f"loss became NaN at step {callback.nan_step}; training stopped, "
                            f"metrics up to then are kept in {run / 'metrics'}")
    if settings.save_model:
        save_checkpoint(trainer.model, tokenizer, run / "checkpoints" / "final", base=start if settings.lora else None)
    mark_finished(run, trainer.state.global_step)
    if settings.phase == "grpo":
        trainer.reward_log.check_learned()
    return run


def _stored_settings(run: Path) -> dict[str, Any]:
    """The settings a run was made with; settings added since (absent from its file) read as their
    defaults, so a run from an older version still resumes."""
    defaults = {f.name: f.default for f in fields(TrainSettings) if f.default is not MISSING}
    defaults["from"] = defaults.pop("from_run")
    return {**defaults, **read_config(run)}


def run_inputs(settings: TrainSettings) -> dict[str, dict[str, str]]:
    """Paths and content hashes of what the run reads from disk (see inputs.py); hub ids, the
    built-in model and data have none."""
    inputs = {"probes": identity(settings.probes)}
    data = data_identity(settings.data)
    if data is not None:
        inputs["data"] = data
    if settings.from_run:
        inputs["from"] = identity(final_checkpoint(settings.from_run))
    elif settings.model != BUILTIN_MODEL and Path(settings.model).exists():
        inputs["model"] = identity(settings.model)
    return inputs


def resume_differences(settings: TrainSettings, run: str | Path,
                       inputs: dict[str, dict[str, str]] | None = None) -> list[str]:
    """What differs between the run in `run` and `settings` (settings, and the content of input
    files); empty when `settings` may continue it."""
    recorded = read_inputs(run)
    if recorded is None:
        log.warning(f"{run}: no record of its inputs' content (made by an older learndyn); the probe and data "
                    "files are compared by path only")
    return differences(_stored_settings(Path(run)), recorded, settings.to_dict(),
                       run_inputs(settings) if inputs is None else inputs)


def save_checkpoint(model: Any, tokenizer: Any, path: Path, *, base: str | Path | None = None) -> None:
    """Save model + tokenizer to `path` atomically (a temporary folder renamed into place).

    A peft model saves its adapter only; `base` (the model the adapter was trained on: a name, a
    folder or another adapter folder) is recorded beside it, since the adapter cannot be used without it.
    """
    from learndyn.models import record_base

    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if base is not None:
            record_base(tmp, base)


def lora_config(settings: Any, model: Any) -> Any:
    """The peft `LoraConfig` of `settings` (TrainSettings, or any settings with its lora_r, lora_alpha,
    lora_targets and optionally lora_dropout), checked against `model`: targets that match no module
    fail here, in one line, before the run folder is touched (peft would fail inside the trainer)."""
    from peft import LoraConfig

    targets = settings.lora_targets.strip()
    config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha,
                        lora_dropout=getattr(settings, "lora_dropout", 0.0),
                        target_modules=targets if targets == "all-linear" else
                        [t.strip() for t in targets.split(",") if t.strip()],
                        bias="none", task_type="CAUSAL_LM")
    _check_targets(model, config, targets)
    return config


def _check_targets(model: Any, config: Any, targets: str) -> None:
    """Inject a throwaway adapter and take it out again (the model is left as it was, its weights
    still trainable); peft raises a ValueError when no module matches."""
    from peft import get_peft_model

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    try:
        probe = get_peft_model(model, copy.deepcopy(config), adapter_name="learndyn_check")
    except ValueError as err:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                        if type(m).__name__ in ("Linear", "Conv1D")} - {"lm_head"})
        raise LearndynError(f"--lora-targets {targets}: {first_line(err)} (linear modules here: "
                            f"{', '.join(names) or 'none'})") from None
    probe.unload()
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)


def _starting_point(settings: TrainSettings) -> str:
    return str(final_checkpoint(settings.from_run)) if settings.from_run else settings.model


def load_trainable(name: str, device: str | None) -> tuple[Any, Any]:
    """Weights in fp32 for training (mixed precision on GPU comes from the trainer's bf16 flag)."""
    from learndyn.models import load_model

    model, tokenizer = load_model(name, device=device, dtype="float32")
    model.config.use_cache = False  # training does not use the KV cache; scoring passes use_cache itself
    return model, tokenizer


def _training_args(config_cls: type, settings: TrainSettings, run: Path, model: Any, **extra: Any) -> Any:
    on_cpu = model.device.type == "cpu"
    if "max_length" in {f.name for f in fields(config_cls)}:  # GRPO's config has none: it samples to a length
        extra = {"max_length": settings.max_length, **extra}
    return config_cls(
        output_dir=str(run / "checkpoints"),
        learning_rate=settings.learning_rate,
        num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        lr_scheduler_type="constant",  # the paper's dynamics are read at a fixed step size
        logging_steps=1,
        save_strategy="no",
        report_to=settings.report_to or "none",
        seed=settings.seed,
        data_seed=settings.seed,
        use_cpu=on_cpu,
        bf16=not on_cpu,
        **extra,
    )


def quiet_progress(trainer: Any, label: str) -> None:
    """A rich step bar instead of transformers' tqdm bar, which also prints every log dict."""
    from rich.console import Console
    from rich.progress import Progress
    from transformers import PrinterCallback, ProgressCallback, TrainerCallback

    class StepBar(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.bar = Progress(console=Console(stderr=True), transient=False)
                self.bar.start()
                self.task = self.bar.add_task(f"{label} steps", total=state.max_steps)

        def on_step_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.bar.update(self.task, completed=state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.bar.stop()

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(StepBar())


def trl_rows(prefs: list, kind: str) -> list[dict[str, Any]]:
    """TRL dataset rows: prompt/completion for SFT, prompt/chosen/rejected for DPO."""
    chat = {not isinstance(p.prompt, str) for p in prefs}
    if len(chat) > 1:
        raise LearndynError("the data mixes plain-text and conversation prompts; TRL needs one kind")

    def answer(text: str) -> Any:
        return [{"role": "assistant", "content": text}] if chat == {True} else text

    if kind == "dpo":
        return [{"prompt": p.prompt, "chosen": answer(p.chosen), "rejected": answer(p.rejected)} for p in prefs]
    rows = [{"prompt": p.prompt, "completion": answer(p.chosen)} for p in prefs]
    if kind == "sft-extended":
        rows += [{"prompt": p.prompt, "completion": answer(p.rejected)} for p in prefs if p.rejected is not None]
    return rows


def _sft_trainer(settings: TrainSettings, model: Any, tokenizer: Any, prefs: list, run: Path,
                 peft_config: Any = None) -> Any:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = trl_rows(prefs, "sft-extended" if settings.extend else "sft")
    args = _training_args(SFTConfig, settings, run, model, completion_only_loss=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=peft_config)
    return _warn_dropped(trainer, len(rows), run)


def build_trainer(settings: TrainSettings, model: Any, tokenizer: Any, prefs: list, run: str | Path,
                  peft_config: Any = None) -> Any:
    """The TRL trainer `train` runs for these settings (SFTTrainer, DPOTrainer or OnlineDPOTrainer),
    not yet started and without the callback: for benchmarks and for code that drives it itself."""
    kind = "online-dpo" if settings.on_policy else settings.phase
    return _TRAINERS[kind](settings, model, tokenizer, prefs, Path(run), peft_config)


def _frozen_copy(model: Any) -> Any:
    """The starting model as DPO's reference; TRL would rebuild it from a path (not always possible here)."""
    reference = copy.deepcopy(model).eval()
    for param in reference.parameters():
        param.requires_grad_(False)
    return reference


def _dpo_trainer(settings: TrainSettings, model: Any, tokenizer: Any, prefs: list, run: Path,
                 peft_config: Any = None) -> Any:
    """With LoRA, no reference copy: TRL uses the policy with its fresh adapter disabled, which is the
    starting model (an earlier LoRA run's adapter is already merged into it by `load_model`)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = _training_args(DPOConfig, settings, run, model, beta=settings.beta, loss_type=settings.loss)
    trainer = DPOTrainer(model=model, ref_model=None if peft_config else _frozen_copy(model), args=args,
                         train_dataset=Dataset.from_list(trl_rows(prefs, "dpo")), processing_class=tokenizer,
                         peft_config=peft_config)
    return _warn_dropped(trainer, len(prefs), run)


def _warn_dropped(trainer: Any, given: int, run: Path) -> Any:
    """Say so when TRL left rows out (a response cut away whole: a conversation whose last turn alone
    fills max_length); `fit_prompts` prevents it for every other row."""
    kept = len(trainer.train_dataset)
    if kept == 0:
        raise LearndynError(f"no training row fits in max_length {trainer.args.max_length}; "
                            "a larger max_length keeps them")
    if kept < given:
        log.warning(f"{run}: TRL left out {given - kept} of {given} training rows that do not fit in max_length "
                    f"{trainer.args.max_length}; a larger max_length keeps them")
    return trainer


def _online_dpo_trainer(settings: TrainSettings, model: Any, tokenizer: Any, prefs: list, run: Path,
                        peft_config: Any = None) -> Any:
    """TRL's online DPO on the data's prompts only. Gradient checkpointing stays off: with it on, TRL
    samples without the KV cache, recomputing the whole prefix for every new token."""
    from datasets import Dataset

    from learndyn.training.online import make_ranker, online_dpo_classes

    config_cls, trainer_cls = online_dpo_classes()
    names = {f.name for f in fields(config_cls)}  # transformers 5.x renames gradient_ to activation_checkpointing
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    args = _training_args(config_cls, settings, run, model, beta=settings.beta, loss_type=settings.loss,
                          max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                          **{checkpointing: False})
    prompts = [{"prompt": row["prompt"]} for row in trl_rows(prefs, "sft")]  # _rows refuses mixed prompt kinds
    return trainer_cls(model=model, ref_model=None if peft_config else _frozen_copy(model),
                       reward_funcs=make_ranker(settings), args=args, train_dataset=Dataset.from_list(prompts),
                       processing_class=tokenizer, peft_config=peft_config)


def read_yaml(path: str | Path, what: str = "settings file") -> dict[str, Any]:
    """A YAML mapping of settings; a missing file, bad YAML or a non-mapping is one line naming the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise LearndynError(f"{what} {path}: file not found")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise LearndynError(f"{what} {path}: not valid YAML ({first_line(err)})") from None
    if not isinstance(values, dict):
        raise LearndynError(f"{what} {path}: expected a mapping of settings")
    return values


def _grpo_trainer(settings: TrainSettings, model: Any, tokenizer: Any, prefs: list, run: Path,
                  peft_config: Any = None) -> Any:
    from learndyn.training.grpo import grpo_trainer

    return grpo_trainer(settings, model, tokenizer, prefs, run, peft_config,
                        lambda cls, **extra: _training_args(cls, settings, run, model, **extra))


_TRAINERS = {"sft": _sft_trainer, "dpo": _dpo_trainer, "online-dpo": _online_dpo_trainer, "grpo": _grpo_trainer}
