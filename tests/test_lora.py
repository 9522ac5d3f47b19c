"""LoRA (peft) adapters: training through the recipes and the CLI, loading run and adapter folders,
scoring and explaining peft models, and DPO's reference after a LoRA SFT run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from trl import SFTConfig, SFTTrainer

from learndyn.atomic import write_jsonl
from learndyn.data import Preference, load_preferences
from learndyn.dynamics.step import explain_step, predict_naive
from learndyn.dynamics.updates import OptimizerRule
from learndyn.errors import LearndynError
from learndyn.models import BASE_RECORD, adapter_base, load_model, record_base, resolve_model
from learndyn.probes.build import build_probes
from learndyn.probes.files import Probe, write_probes
from learndyn.scoring import score_probes
from learndyn.training.callback import LearningDynamicsCallback
from learndyn.training.recipes import TrainSettings, build_trainer, lora_config, train, trl_rows
from learndyn.training.runs import read_metrics

LEARNDYN = str(Path(sys.executable).parent / "learndyn")


def learndyn(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in {"FORCE_COLOR", "PY_COLORS", "CLICOLOR_FORCE"}}
    env.update(COLUMNS="80", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([LEARNDYN, *args], capture_output=True, text=True, env=env, timeout=600)


def assert_one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit code 1 and one `error:` line, the last thing written, naming every fragment."""
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]  # (beside progress bars)
    assert len(errors) == 1 and result.stderr.strip().endswith(errors[0]), result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


@pytest.fixture
def probes():
    return build_probes(load_preferences("example", limit=2))


@pytest.fixture
def probe_file(probes, tmp_path):
    path = tmp_path / "probes.jsonl"
    write_probes(probes, path)
    return path


def scores_of(model, tokenizer, probes) -> pd.Series:
    frame = score_probes(model, tokenizer, probes, max_length=128, progress=None)
    return frame.set_index(["example_id", "response_type"])["logp_sum"]


def assert_same_scores(got: pd.Series, want: pd.Series, tol: float = 1e-4) -> None:
    """Two score series (indexed by example_id, response_type) hold the same values for the same rows."""
    assert sorted(got.index) == sorted(want.index)
    torch.testing.assert_close(torch.tensor(got.loc[want.index].values), torch.tensor(want.values), rtol=tol, atol=tol)


def lora_run(phase: str, folder, probe_file, out, **changes) -> TrainSettings:
    values = dict(phase=phase, data="example", probes=str(probe_file), out=str(out), model=str(folder), limit=4,
                  batch_size=2, epochs=1, every=1, max_length=128, lora=True, lora_r=4, learning_rate=1e-2)
    return TrainSettings(**{**values, **changes})


# ---- loading -------------------------------------------------------------------------------


def test_adapter_folder_loads_merged_or_trainable_with_equal_scores(tiny_llama, tiny_folder, probes, tmp_path):
    model, tokenizer = tiny_llama
    torch.manual_seed(1)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    expected = scores_of(peft, tokenizer, probes)  # scored through the peft wrapper (ModelSplit's backbone)
    folder = tmp_path / "adapter"
    peft.save_pretrained(folder)
    record_base(folder, tiny_folder)
    assert adapter_base(folder) == str(tiny_folder.resolve())
    assert not (folder / "model.safetensors").exists()

    merged, tok = load_model(str(folder), device="cpu")
    assert not isinstance(merged, PeftModel) and not merged.training
    trainable, _ = load_model(str(folder), device="cpu", adapter="train")
    assert isinstance(trainable, PeftModel)
    names = [n for n, p in trainable.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    for got in (merged, trainable):
        assert_same_scores(scores_of(got, tok, probes), expected)
    with pytest.raises(LearndynError, match="unknown adapter mode 'fuse'"):
        load_model(str(folder), adapter="fuse")


def test_a_run_folder_resolves_to_its_final_checkpoint_adapter_or_not(tmp_path, tiny_folder):
    run = tmp_path / "run"
    (run / "checkpoints" / "final").mkdir(parents=True)
    (run / "config.yaml").write_text("phase: sft\n")
    with pytest.raises(LearndynError, match="no final checkpoint"):
        resolve_model(run)
    (run / "checkpoints" / "final" / "adapter_config.json").write_text("{}")
    assert resolve_model(run) == str(run / "checkpoints" / "final")
    assert resolve_model(run / "checkpoints" / "final") == str(run / "checkpoints" / "final")
    assert resolve_model(str(tiny_folder)) == str(tiny_folder)
    assert resolve_model("smollm2-135m-instruct") == "smollm2-135m-instruct"
    with pytest.raises(LearndynError, match="names no base model"):
        adapter_base(run / "checkpoints" / "final")
    gone = tmp_path / "gone"
    record_base(run / "checkpoints" / "final", gone)
    with pytest.raises(LearndynError, match=f"^{run}: its base model {gone} is missing"):
        load_model(str(run))


# ---- training ------------------------------------------------------------------------------


def test_lora_settings_default_to_a_larger_learning_rate_and_check_their_values():
    common = dict(data="example", probes="p.jsonl", out="r")
    assert TrainSettings(phase="sft", lora=True, **common).learning_rate == 2e-4
    assert TrainSettings(phase="dpo", lora=True, **common).learning_rate == 5e-5
    assert TrainSettings(phase="sft", **common).learning_rate == 2e-5
    assert TrainSettings(phase="sft", lora=True, learning_rate=1e-3, **common).learning_rate == 1e-3
    for bad, message in ((dict(lora_r=0), "lora_r"), (dict(lora_dropout=1.0), "lora_dropout"),
                         (dict(lora_targets=" , "), "lora_targets")):
        with pytest.raises(LearndynError, match=message):
            TrainSettings(phase="sft", lora=True, **common, **bad)


def test_targets_matching_no_module_fail_before_the_run_folder_is_touched(tiny_folder, probe_file, tmp_path):
    settings = lora_run("sft", tiny_folder, probe_file, tmp_path / "run", lora_targets="qkv_proj")
    with pytest.raises(LearndynError, match=r"--lora-targets qkv_proj: .*not found.*q_proj"):
        train(settings)
    assert not (tmp_path / "run").exists()


def test_checking_targets_leaves_the_model_as_it_was(tiny_llama):
    model, _ = tiny_llama
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    lora_config(TrainSettings(phase="sft", data="d", probes="p", out="o", lora=True), model)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and type(model).__name__ == "LlamaForCausalLM"
    for name, (value, grad) in before.items():
        assert after[name].requires_grad == grad and torch.equal(after[name], value)


def test_dpo_reference_after_lora_sft_is_the_sft_model(tiny_folder, probe_file, tmp_path):
    """TRL's reference for a peft policy is the policy with its adapter disabled. After a LoRA SFT
    run that must be the SFT model (its adapter merged below DPO's fresh adapter), not the base."""
    sft = train(lora_run("sft", tiny_folder, probe_file, tmp_path / "sft"))
    settings = lora_run("dpo", tiny_folder, probe_file, tmp_path / "dpo", from_run=str(sft), learning_rate=None)
    assert settings.learning_rate == 5e-5
    policy, tokenizer = load_model(str(sft), device="cpu", dtype="float32")
    prefs = load_preferences("example", limit=2)
    trainer = build_trainer(settings, policy, tokenizer, prefs, tmp_path / "dpo", lora_config(settings, policy))
    assert trainer.ref_model is None and isinstance(trainer.model, PeftModel)
    batch = next(iter(trainer.get_train_dataloader()))
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)

    def sequence_logps(model) -> torch.Tensor:
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        picked = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        return (picked * batch["completion_mask"][:, 1:]).sum(-1)

    sft_model, _ = load_model(str(sft), device="cpu", dtype="float32")
    base_model, _ = load_model(str(tiny_folder), device="cpu", dtype="float32")
    want = sequence_logps(sft_model)
    torch.testing.assert_close(torch.cat([ref_chosen, ref_rejected]), want, rtol=1e-5, atol=1e-4)
    assert (sequence_logps(base_model) - want).abs().max() > 1e-2  # SFT moved them: the test can tell


def test_lora_sft_then_dpo_through_the_cli_and_score_the_run(tiny_folder, probe_file, probes, tmp_path):
    common = ("--data", "example", "--probes", str(probe_file), "--limit", "4", "--batch-size", "2", "--epochs", "1",
              "--every", "1", "--max-length", "128", "--lora", "--lora-r", "4", "--lora-alpha", "8", "--lr", "1e-2")
    sft, dpo = tmp_path / "sft", tmp_path / "dpo"
    result = learndyn("train", "sft", *common, "--model", str(tiny_folder), "--out", str(sft))
    assert result.returncode == 0, result.stderr[-3000:]
    result = learndyn("train", "dpo", *common, "--from", str(sft), "--out", str(dpo), "--lora-targets", "q_proj,v_proj")
    assert result.returncode == 0, result.stderr[-3000:]
    for run, base, targets in ((sft, tiny_folder, None), (dpo, sft / "checkpoints" / "final", {"q_proj", "v_proj"})):
        final = run / "checkpoints" / "final"
        assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()
        assert json.loads((final / BASE_RECORD).read_text())["base_model"] == str(base.resolve())
        adapter = json.loads((final / "adapter_config.json").read_text())
        assert adapter["r"] == 4 and adapter["lora_alpha"] == 8
        if targets:
            assert set(adapter["target_modules"]) == targets
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["lora"] is True and config["lora_r"] == 4
        steps = sorted(set(read_metrics(run)["step"]))
        assert steps == [0, 1, 2]
    # the tracked end of the DPO run equals base + SFT adapter + DPO adapter, loaded from the run folder
    out = tmp_path / "scores.parquet"
    result = learndyn("score", "--probes", str(probe_file), "--out", str(out), "--model", str(dpo),
                      "--max-length", "128")
    assert result.returncode == 0, result.stderr[-3000:]
    scored = pd.read_parquet(out).set_index(["example_id", "response_type"])["logp_sum"]
    metrics = read_metrics(dpo)
    tracked = metrics[metrics.step == 2].set_index(["example_id", "response_type"])["logp_sum"]
    assert_same_scores(scored, tracked)
    sft_scores = read_metrics(sft).query("step == 2").set_index(["example_id", "response_type"])["logp_sum"]
    start = metrics[metrics.step == 0].set_index(["example_id", "response_type"])["logp_sum"]
    assert_same_scores(start, sft_scores)  # DPO starts where SFT ended

    moved = tmp_path / "tiny-moved"
    tiny_folder.rename(moved)
    missing = learndyn("score", "--probes", str(probe_file), "--out", str(out), "--model", str(dpo))
    assert_one_error_line(missing, f"{dpo}: its base model {tiny_folder.resolve()} is missing")
    bad = learndyn("train", "sft", *common, "--model", str(moved), "--out", str(tmp_path / "bad"),
                   "--lora-targets", "attn_qkv")
    assert_one_error_line(bad, "--lora-targets attn_qkv", "not found")
    assert not (tmp_path / "bad").exists()


def test_callback_tracks_the_adapted_model_in_a_users_sft_trainer(tiny_llama, probes, tmp_path):
    model, tokenizer = tiny_llama
    before = scores_of(model, tokenizer, probes)
    args = SFTConfig(output_dir=str(tmp_path / "ckpt"), per_device_train_batch_size=2, num_train_epochs=1,
                     learning_rate=1e-2, use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
                     disable_tqdm=True, max_length=128)
    rows = Dataset.from_list(trl_rows(load_preferences("example", limit=4), "sft"))
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer,
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    trainer.add_callback(LearningDynamicsCallback(probes, out=tmp_path / "run", every=1, max_length=128))
    trainer.train()
    assert isinstance(trainer.model, PeftModel)
    metrics = read_metrics(tmp_path / "run")
    at = lambda step: metrics[metrics.step == step].set_index(["example_id", "response_type"])["logp_sum"]  # noqa: E731
    assert_same_scores(at(0), before)  # a fresh adapter (B = 0) changes nothing
    after = scores_of(trainer.model, tokenizer, probes)
    assert_same_scores(at(2), after)  # the last evaluation saw the adapted model
    chosen = metrics[metrics.response_type == "chosen"].groupby("step")["logp_sum"].mean()
    assert chosen[2] > chosen[0] + 1e-3


# ---- explain -------------------------------------------------------------------------------

UPDATE = [Preference("u0", "Human: How do I make tea? Assistant:", " Boil the water, then steep.", " I cannot help.")]
PROBES = [
    Probe("u0", "Human: How do I make tea? Assistant:",
          {"chosen": " Boil the water, then steep.", "rejected": " I cannot help.", "fluent_random": " The dog sleeps."}),
    Probe("p1", "Human: Is the fox quick? Assistant:", {"chosen": " Yes, it jumps over the lazy dog."}),
]


@pytest.fixture
def lora_gpt2(tiny_gpt2):
    """GPT-2 in float64 (exact attention) with a random-initialised r=4 adapter (B != 0, so the
    gradients reach A as well as B)."""
    model, tokenizer = tiny_gpt2
    torch.manual_seed(2)
    peft = get_peft_model(model.double(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                     init_lora_weights=False, fan_in_fan_out=True))
    return peft.eval(), tokenizer


@pytest.mark.parametrize("loss", ["sft", "dpo"])
def test_explain_on_a_lora_model_equals_the_per_probe_backward_route(lora_gpt2, loss):
    model, tokenizer = lora_gpt2
    got = explain_step(model, tokenizer, UPDATE, PROBES, loss=loss, rule=OptimizerRule("adamw", 1e-3), keep_delta=True)
    assert got.delta and all("lora_" in name for name in got.delta)  # Δθ covers the adapter only
    naive = predict_naive(model, tokenizer, PROBES, got.delta)
    merged = got.changes.merge(naive, on=["example_id", "response_type"], suffixes=("", "_naive"))
    assert len(merged) == 4
    torch.testing.assert_close(torch.tensor(merged["predicted"].values), torch.tensor(merged["predicted_naive"].values),
                               rtol=1e-7, atol=1e-10)


def test_first_order_error_on_a_lora_model_falls_with_the_learning_rate(lora_gpt2):
    model, tokenizer = lora_gpt2
    errors = [explain_step(model, tokenizer, UPDATE, PROBES, loss="dpo", rule=OptimizerRule("sgd", lr))
              .summary["relative_error"] for lr in (1e-1, 1e-2, 1e-3)]
    assert errors[0] > 3 * errors[1] > 9 * errors[2] > 0, errors  # about linear in the step
    assert errors[1] < 0.05, errors


def test_explain_command_keeps_the_adapter_trainable(tiny_llama, tiny_folder, probe_file, tmp_path, monkeypatch):
    """run_explain loads with adapter="train", so the explained step moves the adapter only."""
    from learndyn.experiments import explain as recipe

    model, _ = tiny_llama
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    folder = tmp_path / "adapter"
    peft.save_pretrained(folder)
    record_base(folder, tiny_folder)
    seen = {}

    def spy(model, *args, **kwargs):
        seen["trainable"] = [n for n, p in model.named_parameters() if p.requires_grad]
        raise LearndynError("stop here")

    monkeypatch.setattr("learndyn.dynamics.step.explain_step", spy)
    with pytest.raises(LearndynError, match="stop here"):
        recipe.run_explain(recipe.ExplainSettings(update="example", probes=str(probe_file), model=str(folder),
                                                  device="cpu"), tmp_path / "out", progress=False)
    assert seen["trainable"] and all("lora_" in n for n in seen["trainable"])


def test_compare_passes_lora_to_every_arm_with_lora_learning_rates(tmp_path, monkeypatch):
    from learndyn.experiments import compare

    trained = []
    monkeypatch.setattr(compare, "_build_probes", lambda settings, path: None)
    monkeypatch.setattr(compare, "train_once", lambda settings, resume: (trained.append(settings) or settings.out, True))
    forecasts = []

    def forecast(settings, folder, overwrite):  # the filtered arm's forecast, over what its DPO moves
        forecasts.append(settings)
        write_jsonl(Path(folder) / "filtered.jsonl", [vars(p) for p in load_preferences("example", limit=6)])
        (Path(folder) / "summary.json").write_text("{}")
        return {"dropped": ["x", "y"], "pairs": 8}

    monkeypatch.setattr("learndyn.experiments.forecast.run_forecast", forecast)
    settings = compare.compare_settings(True, data="example", eval_data="example:test", out=str(tmp_path), lora=True,
                                        filter_top=25.0, examples=8)
    compare.train_arms(settings)
    assert len(trained) == 5 and all(s.lora for s in trained)
    assert len(forecasts) == 1 and forecasts[0].lora and forecasts[0].lr == 2e-4
    assert {s.phase: s.learning_rate for s in trained} == {"sft": 5e-4, "dpo": 2e-4}
    given = compare.compare_settings(False, data="d", eval_data="e", lora=True, sft_lr=1e-3)
    assert (given.sft_lr, given.dpo_lr) == (1e-3, 2e-4)
    assert compare.compare_settings(False, data="d", eval_data="e").sft_lr == 5e-5


def prefer_short(prompts, completions, **kwargs):
    """A TRL-style reward function: shorter samples are better."""
    return [-len(c[0]["content"]) for c in completions]


def test_on_policy_dpo_trains_a_lora_adapter(tiny_folder, probe_file, tmp_path):
    settings = lora_run("dpo", tiny_folder, probe_file, tmp_path / "run", on_policy=True, max_new_tokens=6,
                        reward="test_lora:prefer_short")
    run = train(settings)
    final = run / "checkpoints" / "final"
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()
    assert adapter_base(final) == str(tiny_folder.resolve())
    assert sorted(set(read_metrics(run)["step"])) == [0, 1, 2]
