"""The callback inside real TRL trainers, the recipes, and run folders."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from datasets import Dataset
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

import learndyn.data
from learndyn.data import load_preferences
from learndyn.errors import LearndynError
from learndyn.probes.build import build_probes
from learndyn.probes.files import write_probes
from learndyn.training.callback import LearningDynamicsCallback
from learndyn.training.recipes import TrainSettings, trl_rows, train
from learndyn.training.runs import read_config, read_metrics

TESTS = Path(__file__).parent


@pytest.fixture
def probes():
    return build_probes(load_preferences("example", limit=3))


def trainer_args(config_cls, tmp_path, **extra):
    return config_cls(output_dir=str(tmp_path / "ckpt"), per_device_train_batch_size=4, num_train_epochs=2,
                      learning_rate=1e-3, use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
                      disable_tqdm=True, max_length=256, **extra)


def chat_rows(n, kind):
    prefs = load_preferences("example", limit=n)
    return Dataset.from_list(trl_rows(prefs, kind))


def test_callback_in_sft_trainer_writes_a_shard_per_evaluation(tiny_llama, probes, tmp_path):
    model, tokenizer = tiny_llama
    trainer = SFTTrainer(model=model, args=trainer_args(SFTConfig, tmp_path), train_dataset=chat_rows(8, "sft"),
                         processing_class=tokenizer)  # 2 steps per epoch, 4 in all
    trainer.add_callback(LearningDynamicsCallback(probes, out=tmp_path / "run", every=3))
    trainer.train()
    metrics = read_metrics(tmp_path / "run")
    per_step = metrics.groupby("step")
    assert sorted(per_step.groups) == [0, 3, 4]  # the start, every 3 steps, the end
    assert per_step["epoch"].first().tolist() == [0.0, 1.5, 2.0]
    n_rows = sum(len(p.responses) for p in probes)
    assert per_step.size().tolist() == [n_rows] * 3
    assert set(metrics["phase"]) == {"sft"}
    assert not metrics.duplicated(["step", "example_id", "response_type"]).any()
    chosen = metrics[metrics.response_type == "chosen"].groupby("step")["logp_sum"].mean()
    assert chosen[4] > chosen[0]  # SFT on chosen raises chosen (lr 1e-3 on a random model)
    logged = [h for h in trainer.state.log_history if "probes/chosen/logp_sum" in h]
    assert len(logged) == 3  # mirrored to the trainer's logs


def test_callback_in_dpo_trainer(tiny_llama, probes, tmp_path):
    model, tokenizer = tiny_llama
    reference = copy.deepcopy(model)
    args = trainer_args(DPOConfig, tmp_path, beta=0.1, loss_type="sigmoid")
    trainer = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=chat_rows(8, "dpo"),
                         processing_class=tokenizer)
    callback = LearningDynamicsCallback(probes, out=tmp_path / "run", every=1, phase="dpo", trainer=trainer)
    trainer.add_callback(callback)
    trainer.train()
    metrics = read_metrics(tmp_path / "run")
    assert sorted(set(metrics["step"])) == [0, 1, 2, 3, 4] and set(metrics["phase"]) == {"dpo"}
    mean = metrics.groupby(["response_type", "step"])["logp_sum"].mean()
    margin = mean["chosen"] - mean["rejected"]
    assert margin[4] > margin[0]  # DPO widens the chosen-rejected margin of trained pairs
    # the trainer's own record of every step is kept, with DPO's metrics in it, not in ours
    own = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in own] == [1, 2, 3, 4] and all("rewards/margins" in h for h in own)
    assert not any("rewards/margins" in h for h in trainer.state.log_history if "probes/chosen/logp_sum" in h)


def test_extend_trains_on_two_rows_per_example():
    prefs = load_preferences("example", limit=5)
    plain, extended = trl_rows(prefs, "sft"), trl_rows(prefs, "sft-extended")
    assert len(extended) == 2 * len(plain)
    completions = [r["completion"][0]["content"] for r in extended]
    assert completions[:5] == [p.chosen for p in prefs] and completions[5:] == [p.rejected for p in prefs]


def test_recipe_chain_sft_then_dpo(tiny_folder, probes, tmp_path):
    write_probes(probes, tmp_path / "p.jsonl")
    common = dict(data="example", probes=str(tmp_path / "p.jsonl"), limit=4, batch_size=4, epochs=1, every=1,
                  learning_rate=1e-3, max_length=256)
    sft = train(TrainSettings(phase="sft", out=str(tmp_path / "sft"), model=str(tiny_folder), extend=True, **common))
    assert sorted(set(read_metrics(sft)["step"])) == [0, 1, 2]  # extended: 8 rows / 4 = 2 steps
    assert (sft / "checkpoints" / "final" / "config.json").is_file()
    dpo = train(TrainSettings(phase="dpo", out=str(tmp_path / "dpo"), from_run=str(sft), loss="ipo", **common))
    config = read_config(dpo)
    assert config["from"] == str(sft) and config["loss"] == "ipo" and config["learning_rate"] == 1e-3
    start = read_metrics(dpo).query("step == 0")
    end_of_sft = read_metrics(sft).query("step == 2")
    pd.testing.assert_series_equal(start["logp_sum"].reset_index(drop=True),
                                   end_of_sft["logp_sum"].reset_index(drop=True), rtol=1e-5)


def interrupt(run: Path) -> None:
    """Make a finished run look like one a crash stopped: its last evaluation never landed, nor did its end."""
    sorted((run / "metrics").glob("*.parquet"))[-1].unlink()
    (run / "finished.yaml").unlink()
    shutil.rmtree(run / "checkpoints" / "final", ignore_errors=True)


def test_resume_after_a_crash_between_shards(tiny_folder, probes, tmp_path):
    write_probes(probes, tmp_path / "p.jsonl")
    settings = TrainSettings(phase="sft", data="example", probes=str(tmp_path / "p.jsonl"), out=str(tmp_path / "run"),
                             model=str(tiny_folder), limit=8, batch_size=4, epochs=1, every=1, learning_rate=1e-3,
                             max_length=256)
    run = train(settings)
    shards = sorted((run / "metrics").glob("*.parquet"))
    complete = read_metrics(run)
    interrupt(run)
    kept = {s: s.stat().st_mtime_ns for s in shards[:-1]}
    with pytest.raises(LearndynError, match="--resume"):
        train(settings)
    train(settings, resume=True)
    assert {s: s.stat().st_mtime_ns for s in shards[:-1]} == kept  # finished evaluations untouched
    pd.testing.assert_frame_equal(read_metrics(run), complete, rtol=1e-5)
    with pytest.raises(LearndynError, match="other settings"):
        train(TrainSettings(**{**settings.__dict__, "learning_rate": 1e-4}), resume=True)


def tiny_run(tiny_folder, probe_rows, tmp_path, **changes) -> TrainSettings:
    """Settings of a 2-step SFT run on local copies of the data and probes (files a user may edit)."""
    write_probes(probe_rows, tmp_path / "p.jsonl")
    source = Path(learndyn.data.__file__).parent / "resources" / "example_train.jsonl"
    (tmp_path / "d.jsonl").write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    return TrainSettings(**{**dict(phase="sft", data=str(tmp_path / "d.jsonl"), probes=str(tmp_path / "p.jsonl"),
                                   out=str(tmp_path / "run"), model=str(tiny_folder), limit=8, batch_size=4, epochs=1,
                                   every=1, learning_rate=1e-3, max_length=256), **changes})


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_checks_everything_before_removing_the_old_run_and_its_report(tiny_folder, probes, tmp_path):
    settings = tiny_run(tiny_folder, probes, tmp_path)
    run = train(settings)
    (run / "report.html").write_text("<html>old</html>")
    (run / "signatures.json").write_text("[]")
    (run / "figures").mkdir()
    (run / "figures" / "logp.png").write_bytes(b"png")
    (run / "notes.txt").write_text("mine")
    finished = snapshot(run)
    typo = TrainSettings(**{**settings.__dict__, "model": str(tmp_path / "tiny-typo"), "learning_rate": 5e-4})
    with pytest.raises(LearndynError, match="tiny-typo"):
        train(typo, overwrite=True)
    assert snapshot(run) == finished  # the finished run, its config and its report untouched
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(LearndynError, match="empty probe file"):
        train(TrainSettings(**{**settings.__dict__, "probes": str(tmp_path / "empty.jsonl")}), overwrite=True)
    assert snapshot(run) == finished
    train(TrainSettings(**{**settings.__dict__, "learning_rate": 5e-4}), overwrite=True)
    assert not (run / "report.html").exists() and not (run / "signatures.json").exists()
    assert not (run / "figures").exists()  # a report of the old run must not sit beside the new one
    assert read_config(run)["learning_rate"] == 5e-4 and (run / "notes.txt").read_text() == "mine"


def test_overwrite_refuses_a_folder_that_is_not_a_run(tiny_folder, probes, tmp_path):
    settings = tiny_run(tiny_folder, probes, tmp_path, out=str(tmp_path / "thesis"))
    folder = tmp_path / "thesis"
    for name in ("metrics/table.csv", "checkpoints/model.bin", "figures/plot.png", "report.html"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(name)
    kept = snapshot(folder)
    with pytest.raises(LearndynError, match="thesis is not a learndyn run .*nothing was deleted"):
        train(settings, overwrite=True)
    assert snapshot(folder) == kept
    empty = tmp_path / "empty"
    empty.mkdir()
    run = train(TrainSettings(**{**settings.__dict__, "out": str(empty)}), overwrite=True)  # an empty folder is fine
    assert sorted(set(read_metrics(run)["step"])) == [0, 1, 2]


def test_resume_refuses_edited_input_files_and_names_what_differs(tiny_folder, probes, tmp_path, caplog):
    settings = tiny_run(tiny_folder, probes, tmp_path)
    run = train(settings)
    shards = sorted((run / "metrics").glob("*.parquet"))
    interrupt(run)
    probe_file, data_file = Path(settings.probes), Path(settings.data)
    original = {path: path.read_bytes() for path in (probe_file, data_file)}
    probe_file.write_bytes(original[probe_file].replace(b"water", b"milk", 1))
    with pytest.raises(LearndynError, match=r"other settings.*probes: content of .*p\.jsonl' differs"):
        train(settings, resume=True)
    probe_file.write_bytes(original[probe_file])
    data_file.write_bytes(original[data_file].replace(b"four quarts", b"five quarts", 1))
    with pytest.raises(LearndynError, match=r"data: content of .*d\.jsonl' differs") as err:
        train(settings, resume=True)
    assert "probes" not in str(err.value)
    data_file.write_bytes(original[data_file])
    with pytest.raises(LearndynError, match=r"data: rows were all, now \[:6\]"):
        train(TrainSettings(**{**settings.__dict__, "data": f"{data_file}[:6]"}), resume=True)
    with pytest.raises(LearndynError, match=r"learning_rate: was 0\.001, now 0\.0001$"):
        train(TrainSettings(**{**settings.__dict__, "learning_rate": 1e-4}), resume=True)
    assert not shards[-1].exists()  # nothing was trained by a refused resume
    (run / "inputs.yaml").unlink()  # a run made before inputs were recorded still resumes, with a warning
    train(settings, resume=True)
    assert shards[-1].exists() and "compared by path only" in caplog.text


def test_resume_accepts_the_same_run_however_its_paths_are_spelled(tiny_folder, probes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = tiny_run(tiny_folder, probes, tmp_path, out="run", probes="p.jsonl", data="d.jsonl")
    run = tmp_path / train(settings)
    complete = read_metrics(run)
    shards = sorted((run / "metrics").glob("*.parquet"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for spelled in (dict(out="./run/"), dict(out=str(run), probes=str(tmp_path / "p.jsonl")),
                    dict(out="../run", probes="../p.jsonl", data="../d.jsonl")):
        interrupt(run)
        monkeypatch.chdir(elsewhere if spelled["out"] == "../run" else tmp_path)
        train(TrainSettings(**{**settings.__dict__, **spelled}), resume=True)
        pd.testing.assert_frame_equal(read_metrics(run), complete, rtol=1e-5)


def test_resume_refuses_a_from_run_that_was_overwritten(tiny_folder, probes, tmp_path):
    sft = tiny_run(tiny_folder, probes, tmp_path, out=str(tmp_path / "sft"))
    train(sft)
    dpo = TrainSettings(**{**sft.__dict__, "phase": "dpo", "out": str(tmp_path / "dpo"), "from_run": sft.out,
                           "learning_rate": None})
    run = train(dpo)
    shards = sorted((run / "metrics").glob("*.parquet"))
    interrupt(run)
    train(TrainSettings(**{**sft.__dict__, "learning_rate": 5e-3}), overwrite=True)  # other weights, same path
    with pytest.raises(LearndynError, match=r"from: content of .*sft' differs \(same path"):
        train(dpo, resume=True)
    assert not shards[-1].exists()


def test_nan_loss_stops_training_and_keeps_earlier_metrics(tiny_llama, probes, tmp_path):
    model, tokenizer = tiny_llama

    class Diverge(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    model.lm_head.weight.fill_(float("nan"))

    trainer = SFTTrainer(model=model, args=trainer_args(SFTConfig, tmp_path), train_dataset=chat_rows(8, "sft"),
                         processing_class=tokenizer, callbacks=[Diverge()])
    callback = LearningDynamicsCallback(probes, out=tmp_path / "run", every=1)
    trainer.add_callback(callback)
    trainer.train()
    assert callback.nan_step == 3
    assert trainer.state.global_step == 3  # stopped, not run to step 4
    assert sorted(set(read_metrics(tmp_path / "run")["step"])) == [0, 1, 2]


def test_bad_inputs_are_one_line_errors(tiny_folder, probes, tmp_path):
    write_probes(probes, tmp_path / "p.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "sft_only.jsonl").write_text('{"prompt": "q", "chosen": "a"}\n')
    base = dict(phase="dpo", data="example", probes=str(tmp_path / "p.jsonl"), out=str(tmp_path / "r"),
                model=str(tiny_folder))
    with pytest.raises(LearndynError, match="no such run folder"):
        train(TrainSettings(**{**base, "from_run": str(tmp_path / "missing")}))
    with pytest.raises(LearndynError, match="empty probe file"):
        train(TrainSettings(**{**base, "probes": str(tmp_path / "empty.jsonl")}))
    with pytest.raises(LearndynError, match="missing field 'rejected'"):
        train(TrainSettings(**{**base, "data": str(tmp_path / "sft_only.jsonl")}))
    with pytest.raises(LearndynError, match="missing field 'rejected'"):
        train(TrainSettings(**{**base, "phase": "sft", "extend": True, "data": str(tmp_path / "sft_only.jsonl")}))
    with pytest.raises(LearndynError, match="unknown setting"):
        TrainSettings.from_dict({**base, "learning_rte": 1.0})
    assert not (tmp_path / "r").exists()  # nothing half-made


def test_prompts_too_long_for_max_length_are_cut_and_trained_on_not_dropped(tiny_folder, probes, tmp_path, caplog):
    """TRL keeps the start of a long sequence and drops rows left without response tokens."""
    rows = [{"prompt": f"Human: {'tell me about tea and horses ' * 20}{i}?\n\nAssistant:",
             "chosen": "Boil the water.", "rejected": "No."} for i in range(4)]
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_probes(probes, tmp_path / "p.jsonl")
    common = dict(data=str(tmp_path / "long.jsonl"), probes=str(tmp_path / "p.jsonl"), batch_size=2, epochs=1,
                  every=1, learning_rate=1e-3, max_length=64)
    sft = train(TrainSettings(phase="sft", out=str(tmp_path / "sft"), model=str(tiny_folder), **common))
    dpo = train(TrainSettings(phase="dpo", out=str(tmp_path / "dpo"), from_run=str(sft), **common))
    for run in (sft, dpo):
        assert sorted(set(read_metrics(run)["step"])) == [0, 1, 2]  # 4 rows / 2 per step: none left out
    assert "4 of 4 prompts are too long for max_length 64" in caplog.text
    assert "left out" not in caplog.text


def test_rows_that_trl_still_leaves_out_are_counted_in_a_warning(tiny_folder, probes, tmp_path, caplog):
    huge = [{"role": "user", "content": "tell me about tea and horses " * 20}]  # one turn: nothing to cut
    rows = [{"prompt": huge if i < 2 else [{"role": "user", "content": "Hi?"}], "chosen": "Hello.", "rejected": "No."}
            for i in range(4)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_probes(probes, tmp_path / "p.jsonl")
    run = train(TrainSettings(phase="sft", out=str(tmp_path / "sft"), model=str(tiny_folder), max_length=64,
                              data=str(tmp_path / "chat.jsonl"), probes=str(tmp_path / "p.jsonl"), batch_size=2,
                              epochs=1, every=1, learning_rate=1e-3))
    assert "TRL left out 2 of 4 training rows that do not fit in max_length 64" in caplog.text
    assert sorted(set(read_metrics(run)["step"])) == [0, 1]


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo")
def test_two_processes_write_each_probe_once(tiny_folder, probes, tmp_path):
    write_probes(probes, tmp_path / "p.jsonl")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(TESTS / "two_process_sft.py"), str(tiny_folder), str(tmp_path / "p.jsonl"), str(tmp_path / "run")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(tmp_path / "run")
    n_rows = sum(len(p.responses) for p in probes)
    assert metrics.groupby("step").size().tolist() == [n_rows] * len(set(metrics["step"]))
    assert not metrics.duplicated(["step", "example_id", "response_type"]).any()
    order = [p.example_id for p in probes]
    assert list(dict.fromkeys(metrics.query("step == 0")["example_id"])) == order


@pytest.mark.parametrize("setting, value, message", [
    ("epochs", float("inf"), "epochs must be a positive finite number, got inf"),
    ("epochs", float("nan"), "epochs must be a positive finite number, got nan"),
    ("epochs", -1.0, "epochs must be a positive finite number, got -1.0"),
    ("learning_rate", float("inf"), "learning_rate must be a positive finite number, got inf"),
    ("max_length", 0, "max_length must be at least 2"),
    ("max_length", 1, "max_length must be at least 2"),
])
def test_settings_that_cannot_train_are_refused_on_creation(setting, value, message):
    with pytest.raises(LearndynError, match=message):
        TrainSettings(phase="sft", data="example", probes="p.jsonl", out="r", **{setting: value})


def test_a_max_length_that_leaves_no_row_is_one_line(tiny_folder, probes, tmp_path):
    write_probes(probes, tmp_path / "p.jsonl")
    with pytest.raises(LearndynError, match="no training row fits in max_length 2"):
        train(TrainSettings(phase="sft", data="example", probes=str(tmp_path / "p.jsonl"), out=str(tmp_path / "r"),
                            model=str(tiny_folder), limit=2, max_length=2))


def test_settings_load_from_yaml_for_library_users(tmp_path):
    """The file `train --config` reads and RUN/config.yaml are one format: a run's settings reload as
    they were, and overrides go on top; a broken file is one line naming it."""
    import yaml

    settings = TrainSettings(phase="dpo", data="example", probes="p.jsonl", out="runs/a", from_run="runs/sft",
                             loss="ipo", lora=True)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(settings.to_dict()))
    assert TrainSettings.from_yaml(tmp_path / "config.yaml") == settings
    assert TrainSettings.from_yaml(tmp_path / "config.yaml", out="runs/b").out == "runs/b"
    (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    with pytest.raises(LearndynError, match=f"^settings file {tmp_path / 'bad.yaml'}: not valid YAML"):
        TrainSettings.from_yaml(tmp_path / "bad.yaml")
    with pytest.raises(LearndynError, match="file not found"):
        TrainSettings.from_yaml(tmp_path / "missing.yaml")


def test_a_run_is_finished_with_its_final_model_or_adapter(tmp_path):
    """compare --resume reuses finished runs: a LoRA run (adapter only, no config.json) counts too."""
    from learndyn.training.runs import final_checkpoint, is_finished

    run = tmp_path / "run"
    (run / "checkpoints" / "final").mkdir(parents=True)
    (run / "config.yaml").write_text("phase: sft\n")
    assert not is_finished(run)
    (run / "checkpoints" / "final" / "adapter_config.json").write_text("{}")
    assert is_finished(run) and final_checkpoint(run) == run / "checkpoints" / "final"
    (run / "config.yaml").unlink()
    assert not is_finished(run)
    with pytest.raises(LearndynError, match="no such run folder"):
        final_checkpoint(tmp_path / "missing")


def test_a_run_that_keeps_no_model_is_finished_and_resuming_it_trains_nothing(tiny_folder, probes, tmp_path,
                                                                             monkeypatch, caplog):
    from learndyn.training import recipes
    from learndyn.training.runs import is_finished

    write_probes(probes, tmp_path / "p.jsonl")
    settings = TrainSettings(phase="sft", out=str(tmp_path / "run"), model=str(tiny_folder), data="example", limit=4,
                             probes=str(tmp_path / "p.jsonl"), batch_size=2, epochs=1, every=1, save_model=False)
    run = train(settings)
    assert is_finished(run) and not (run / "checkpoints" / "final").exists()
    assert yaml.safe_load((run / "finished.yaml").read_text()) == {"step": 2}
    shards = {p: p.stat().st_mtime_ns for p in (run / "metrics").iterdir()}
    monkeypatch.setattr(recipes, "build_trainer", lambda *a, **k: pytest.fail("a finished run was trained again"))
    assert train(settings, resume=True) == run
    assert f"{run} finished already; nothing to resume" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in (run / "metrics").iterdir()} == shards
    (run / "finished.yaml").unlink()  # as if interrupted before its end: not finished, so trained on
    assert not is_finished(run)
    with pytest.raises(pytest.fail.Exception, match="trained again"):
        train(settings, resume=True)
