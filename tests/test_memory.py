"""Memory estimates before a job, and one line (with the fix) when memory runs out anyway."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

from learndyn import memory
from learndyn.errors import LearndynError
from learndyn.memory import MemoryWarning, check_fits, estimate, free_memory, is_out_of_memory, out_of_memory

GB = 10**9


@pytest.mark.parametrize("job,multiple", [("load", 1), ("score", 1), ("train", 4), ("explain", 2 + 3)])
def test_estimate_is_a_multiple_of_the_weights(job, multiple):
    """score ≈ 1× the weights, training ≈ 4× (weights, gradients, two Adam moments), explain ≈ (2 + causes)×."""
    est = estimate(250_000_000, job)
    assert est.weights == GB and est.weights + est.state == multiple * GB
    assert est.activations == 0 and est.resident == 0  # a bare count: shape unknown, nothing loaded


def test_explain_counts_its_causes_and_bf16_halves_the_bytes():
    assert estimate(10**6, "explain", causes=1).state == 2 * 4 * 10**6
    assert estimate(10**6, "train", bytes_per_param=2).state == 3 * 2 * 10**6


def test_a_model_gives_exact_bytes_trainable_share_and_activations(tiny_llama):
    model, _ = tiny_llama
    n = sum(p.numel() for p in model.parameters())
    est = estimate(model, "train", tokens=512)
    assert est.weights == 4 * n and est.state == 3 * 4 * n and est.activations > 0
    assert est.resident == est.weights and est.sure == est.state  # already loaded on the CPU: not asked again
    for p in model.parameters():  # LoRA-like: only a few weights train
        p.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)
    frozen = estimate(model, "train", tokens=512)
    assert frozen.state == 3 * 4 * model.lm_head.weight.numel() < est.state
    half = estimate(model.to(torch.bfloat16), "score", tokens=512)
    assert half.weights == 2 * n
    assert estimate(model, "score", tokens=4096).activations > half.activations  # grows with the batch
    assert estimate(model, "score", device="cuda").resident == 0  # not yet moved there


def test_surely_over_memory_is_a_one_line_error():
    with pytest.raises(LearndynError) as err:
        check_fits(250_000_000, "train", available=3 * GB)
    line = str(err.value)
    assert "\n" not in line
    assert "training needs at least 4.00 GB more on cpu" in line and "3.00 GB is free" in line
    assert "LoRA" in line and "--batch-size" in line
    with pytest.raises(LearndynError, match="--chunk-tokens"):
        check_fits(250_000_000, "explain", causes=1, available=2.5 * GB)


def test_close_to_the_limit_warns_and_plenty_is_silent(tiny_llama):
    model, _ = tiny_llama
    est = estimate(model, "explain", tokens=256)
    with pytest.warns(MemoryWarning, match="explaining needs about .* may run out of memory; if so, lower --chunk-tokens"):
        check_fits(model, "explain", tokens=256, available=int(est.needed / 0.95))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = check_fits(model, "explain", tokens=256, available=10 * est.needed)
    assert got.available == 10 * est.needed
    with pytest.raises(LearndynError):
        check_fits(model, "explain", tokens=256, available=est.sure - 1)


def test_free_memory_reads_proc_meminfo_without_psutil(monkeypatch):
    with_psutil = free_memory("cpu")
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil now raises ImportError
    without = free_memory("cpu")
    assert with_psutil and without and abs(without - with_psutil) < 0.5 * with_psutil
    assert free_memory("mps") is None


def test_unknown_job_is_refused():
    with pytest.raises(LearndynError, match="valid: load, score, train, explain"):
        estimate(1, "generate")


@pytest.mark.parametrize("err,job,fix", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nGPU 0 has ..."), "explain", "--chunk-tokens"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: not enough memory: you tried to allocate 9 bytes"),
     "score", "--batch-tokens"),
    (MemoryError(), "train", "LoRA"),
])
def test_out_of_memory_is_one_line_with_the_fix(err, job, fix):
    assert is_out_of_memory(err)
    line = str(out_of_memory(err, job))
    assert "\n" not in line and line.startswith("out of memory while ") and fix in line and "bfloat16" in line
    assert (str(err).splitlines() or ["MemoryError"])[0][:60] in line


def test_other_errors_pass_through_unchanged():
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        with memory.reporting_oom("score"):
            raise RuntimeError("shape mismatch")


@pytest.mark.parametrize("command", ["score", "train", "explain"])
def test_cli_prints_one_line_and_exits_non_zero_on_oom(command, tmp_path, monkeypatch, capsys):
    """Each heavy command turns an OOM deep inside into the one line with the fix, exit code 1."""
    from learndyn import cli

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    if command == "score":
        import learndyn.models
        import learndyn.scoring

        monkeypatch.setattr(learndyn.models, "load_model", lambda *a, **k: (None, None))
        monkeypatch.setattr(learndyn.scoring, "score_probes", oom)
        probes = tmp_path / "p.jsonl"
        probes.write_text('{"example_id": "a", "prompt": "Hi", "chosen": "Hello"}\n')
        argv = ["score", "--probes", str(probes), "--out", str(tmp_path / "s.parquet")]
        fix = "--batch-tokens"
    elif command == "train":
        import learndyn.training.recipes

        monkeypatch.setattr(learndyn.training.recipes, "train", oom)
        argv = ["train", "sft", "--data", "example", "--probes", "p.jsonl", "--out", str(tmp_path / "run")]
        fix = "LoRA"
    else:
        import learndyn.experiments.explain

        monkeypatch.setattr(learndyn.experiments.explain, "run_explain", oom)
        argv = ["explain", "--update", "example", "--probes", "p.jsonl", "--out", str(tmp_path / "ex")]
        fix = "--chunk-tokens"
    monkeypatch.setattr(sys, "argv", ["learndyn", *argv])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: out of memory while") and "Tried to allocate 20.00 GiB" in err[0]
    assert fix in err[0]


def test_training_that_cannot_fit_stops_before_the_run_folder_is_made(tiny_folder, tmp_path, monkeypatch):
    """Full finetuning needs gradients and two AdamW moments per weight: a machine whose free memory
    holds the weights but not those is told so, in one line, before anything is written."""
    import learndyn.memory
    from learndyn.data import load_preferences
    from learndyn.errors import LearndynError
    from learndyn.probes.build import build_probes
    from learndyn.probes.files import write_probes
    from learndyn.training.recipes import TrainSettings, train

    write_probes(build_probes(load_preferences("example", limit=2)), tmp_path / "p.jsonl")
    weights = sum(f.stat().st_size for f in tiny_folder.glob("*.safetensors"))
    monkeypatch.setattr(learndyn.memory, "free_memory", lambda device="cpu": 2 * weights)
    settings = TrainSettings(phase="sft", data="example", probes=str(tmp_path / "p.jsonl"), out=str(tmp_path / "run"),
                             model=str(tiny_folder), limit=2, batch_size=2, epochs=1)
    with pytest.raises(LearndynError, match="^training needs at least .* train LoRA adapters"):
        train(settings)
    assert not (tmp_path / "run").exists()
