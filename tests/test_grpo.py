"""GRPO (`train grpo`): TRL's GRPOTrainer with a reward, the probes tracked, every sample's reward kept."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from test_training import probes  # noqa: F401  (the probe-set fixture)

from learndyn.errors import LearndynError
from learndyn.probes.files import write_probes
from learndyn.training.runs import read_rewards
from learndyn.training.recipes import TrainSettings, train
from learndyn.training.runs import read_config, read_metrics

CALLS: list[dict] = []


def odd_length(prompts, completions, example_id, trainer_state=None, **kwargs):
    """A reward with variance on a random model's samples: 1 for a completion of odd length."""
    if trainer_state is not None:  # a call from GRPO, not from the probe builder
        CALLS.append({"example_id": list(example_id), "step": trainer_state.global_step, "n": len(completions)})
    return [float(len(c[0]["content"]) % 2) for c in completions]


def constant(prompts, completions, **kwargs):
    return [1.0] * len(completions)


def nothing(prompts, completions, **kwargs):
    return [None] * len(completions)


def fails(prompts, completions, **kwargs):
    raise KeyError("answer")


@pytest.fixture
def settings(tiny_folder, probes, tmp_path):  # noqa: F811
    """GRPO on the tiny model: 4 arithmetic prompts, 2 per step with 2 samples each, 5 sampled tokens."""
    write_probes(probes, tmp_path / "p.jsonl")
    return dict(phase="grpo", data="arithmetic[0:4]", probes=str(tmp_path / "p.jsonl"), out=str(tmp_path / "run"),
                model=str(tiny_folder), reward="test_grpo:odd_length", num_generations=2, batch_size=4, epochs=2,
                every=2, learning_rate=1e-2, max_length=256, max_new_tokens=5)


def test_grpo_tracks_probes_and_keeps_every_samples_reward(settings):
    CALLS.clear()
    run = train(TrainSettings(**settings))
    # 4 prompts x 2 epochs, 2 prompts per step: 4 steps, each scoring 2 prompts x 2 samples
    assert [c["step"] for c in CALLS] == [0, 1, 2, 3] and all(c["n"] == 4 for c in CALLS)
    rewards = read_rewards(run)
    assert len(rewards) == 16 and sorted(rewards["step"].unique()) == [1, 2, 3, 4]
    groups = rewards.groupby(["step", "example_id"])["generation"].apply(sorted)
    assert len(groups) == 8 and all(g == [0, 1] for g in groups)  # two samples per prompt per step
    assert set(rewards["example_id"]) == {f"arith-0-{i:05d}" for i in range(4)}
    for call in CALLS:  # the rows are the function's own values, in its order
        kept = rewards[rewards["step"] == call["step"] + 1]
        assert kept["example_id"].tolist() == call["example_id"]
    assert set(rewards["reward"]) <= {0.0, 1.0} and (rewards["completion_tokens"] <= 5).all()

    metrics = read_metrics(run)
    assert set(metrics["phase"]) == {"grpo"} and sorted(metrics["step"].unique()) == [0, 2, 4]
    config = read_config(run)
    assert config["phase"] == "grpo" and config["loss"] == "dapo" and config["beta"] == 0.0
    assert config["num_generations"] == 2 and config["learning_rate"] == 1e-2
    assert (run / "checkpoints" / "final" / "config.json").is_file()


@pytest.mark.parametrize("change, message", [
    (dict(reward=None), "GRPO needs a reward"),
    (dict(batch_size=3), "must be a multiple of num_generations"),
    (dict(num_generations=1), "num_generations must be at least 2"),
    (dict(scale_rewards="mean"), "scale_rewards must be group, batch or none"),
    (dict(loss="sigmoid"), "sigmoid"),
    (dict(on_policy=True), "not to phase 'grpo'"),
    (dict(extend=True), "do not apply to GRPO"),
    (dict(reward="test_grpo:missing"), "has no attribute missing"),
])
def test_bad_grpo_settings_fail_before_the_run_folder_is_touched(settings, change, message, tmp_path):
    with pytest.raises(LearndynError, match=message):
        TrainSettings(**{**settings, **change})
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("reward, message", [
    ("test_grpo:fails", r"--reward test_grpo:fails raised KeyError: 'answer'"),
    ("test_grpo:nothing", "scored none of the 4 completions of step 1"),
])
def test_a_failing_reward_is_one_line_and_keeps_the_first_evaluation(settings, reward, message):
    with pytest.raises(LearndynError, match=message):
        train(TrainSettings(**{**settings, "reward": reward}))
    assert set(read_metrics(settings["out"])["step"]) == {0}


def test_rewards_without_variance_train_nothing_and_say_so(settings):
    with pytest.raises(LearndynError, match=r"no prompt's samples ever differed in reward \(8 groups\)"):
        train(TrainSettings(**{**settings, "reward": "test_grpo:constant"}))
    assert sorted(read_metrics(settings["out"])["step"].unique()) == [0, 2, 4]  # finished metrics kept
    assert len(read_rewards(settings["out"])) == 16


def test_the_callback_in_your_own_grpo_trainer(tiny_llama, probes, tmp_path):  # noqa: F811
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from learndyn import LearningDynamicsCallback

    from learndyn.training.grpo import RewardLog

    model, tokenizer = tiny_llama
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} + 1?"}], "example_id": f"q{i}"} for i in range(4)]
    args = GRPOConfig(output_dir=str(tmp_path / "ckpt"), per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=4, num_train_epochs=1, learning_rate=1e-2, use_cpu=True, report_to="none",
                      save_strategy="no", logging_steps=1, disable_tqdm=True, gradient_checkpointing=False, bf16=False)
    rewards = RewardLog(tmp_path / "mine", every=1)
    trainer = GRPOTrainer(model=model, reward_funcs=rewards.wrap(odd_length), args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.add_callback(LearningDynamicsCallback(probes, tmp_path / "mine", every=1, phase="grpo", trainer=trainer))
    trainer.add_callback(rewards)
    trainer.train()
    frame = pd.read_parquet(tmp_path / "mine" / "metrics")
    assert set(frame["phase"]) == {"grpo"} and sorted(frame["step"].unique()) == [0, 1, 2]
    trl_records = [r for r in trainer.state.log_history if "loss" in r]
    assert len(trl_records) == 2 and all("reward" in r and "entropy" in r for r in trl_records)
    ours = [r for r in trainer.state.log_history if "probes/chosen/logp_sum" in r]
    assert len(ours) == 3 and not any("reward" in r for r in ours)  # TRL's metrics stay in TRL's records
    kept = read_rewards(tmp_path / "mine")
    assert sorted(kept["step"].unique()) == [1, 2] and set(kept["example_id"]) == {"q0", "q1", "q2", "q3"}


def test_train_grpo_command_then_report(tmp_path, tiny_folder):
    from test_cli import learndyn

    probes = tmp_path / "probes.jsonl"
    assert learndyn("probes", "build", "--data", "arithmetic[0:4]", "--out", str(probes)).returncode == 0
    run = tmp_path / "run"
    common = ("--data", "arithmetic[2:6]", "--probes", str(probes), "--model", str(tiny_folder), "--out", str(run))
    result = learndyn("train", "grpo", *common, "--reward", "test_grpo:odd_length", "--num-generations", "2",
                      "--batch-size", "4", "--epochs", "1", "--every", "1", "--lr", "0.01", "--max-new-tokens", "4",
                      "--loss", "dr_grpo", "--scale-rewards", "none", cwd=Path(__file__).parent)
    assert result.returncode == 0, result.stderr[-2000:]
    assert read_config(run)["loss"] == "dr_grpo" and read_config(run)["scale_rewards"] == "none"
    assert len(read_rewards(run)) == 8  # 4 prompts x 2 samples
    report = learndyn("report", str(run))
    assert report.returncode == 0, report.stderr[-2000:]
    assert "grpo_reward_rises" in report.stdout and "dpo_lowers_rejected" not in report.stdout
    assert (run / "figures" / "rewards.png").is_file()
    # probe examples 0 and 1 were never trained: the squeezing check uses them
    signatures = {s["name"].split(" [")[0]: s for s in __import__("json").loads((run / "signatures.json").read_text())}
    squeezing = signatures["grpo_squeezing"]["estimates"]
    assert squeezing and squeezing[0]["quantity"] == "chosen argmax_logp change, prompts never trained"


def test_grpo_with_lora_saves_only_the_adapter(settings):
    run = train(TrainSettings(**{**settings, "lora": True, "lora_targets": "q_proj,v_proj", "epochs": 1}))
    final = run / "checkpoints" / "final"
    assert (final / "adapter_config.json").is_file() and not (final / "config.json").is_file()
    assert len(read_rewards(run)) == 8


def test_the_rl_demo_recipe_on_a_tiny_model(tiny_folder, tmp_path, monkeypatch):
    import learndyn.arithmetic
    from learndyn.experiments.rl_demo import RLDemoSettings, run_rl_demo

    monkeypatch.setattr(learndyn.arithmetic, "reward", odd_length)  # a random model never does sums
    from learndyn.probes.files import read_probes
    from learndyn.report import evaluate_signatures

    settings = RLDemoSettings(out=str(tmp_path / "demo"), model=str(tiny_folder), probes=4, untrained=2, prompts=2,
                              sft_epochs=1.0, epochs=1.0, num_generations=2, batch_size=4, max_new_tokens=4, every=1)
    runs = run_rl_demo(settings)
    assert [r.name for r in runs] == ["sft", "grpo"]
    assert read_config(runs[1])["from"] == str(runs[0]) and read_config(runs[1])["data"] == "arithmetic[2:4]"
    assert [p.example_id for p in read_probes(tmp_path / "demo" / "probes.jsonl")] == [
        f"arith-0-{i:05d}" for i in range(4)]
    assert set(read_rewards(runs[1])["example_id"]) == {"arith-0-00002", "arith-0-00003"}  # 0, 1 never trained
    names = {s["name"].split(" [")[0] for s in evaluate_signatures(runs)}
    assert {"sft_raises_chosen", "grpo_reward_rises", "grpo_squeezing"} <= names and "dpo_lowers_rejected" not in names
