"""Writable checks and temporary folders: what a run or the model cache leaves behind after a
failure, a kill or a Ctrl-C, and that its folders follow the umask like any other."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from learndyn import atomic, models
from learndyn.errors import LearndynError
from learndyn.training.recipes import save_checkpoint


@pytest.fixture
def umask_022():
    before = os.umask(0o022)
    yield
    os.umask(before)


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=60)
    return proc.pid


def stale_temp(parent: Path, pid: int) -> Path:
    """A temporary folder as `atomic_dir` names it, owned by `pid` on this host, with a file inside."""
    folder = parent / f"{atomic.TEMP_PREFIX}{atomic._host()}-{pid}-abc_12"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x" * 1000)
    return folder


@pytest.fixture
def fake_gguf(tiny_llama, tmp_path, monkeypatch):
    """A .gguf path whose "conversion" returns the tiny model (the real reader is slow and needs a real
    file); the cache lives in tmp_path."""
    import transformers

    model, tokenizer = tiny_llama
    monkeypatch.setenv("LEARNDYN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tokenizer)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: model)
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    return path


def test_checkpoint_folder_follows_the_umask(tiny_llama, tmp_path, umask_022):
    model, tokenizer = tiny_llama
    save_checkpoint(model, tokenizer, tmp_path / "run" / "checkpoints" / "final")
    assert (tmp_path / "run" / "checkpoints" / "final").stat().st_mode & 0o777 == 0o755
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["final"]


def test_converted_model_in_the_cache_follows_the_umask(fake_gguf, umask_022):
    folder = models._cached_from_gguf(fake_gguf, "m-key")
    assert (folder / "config.json").is_file()
    assert folder.stat().st_mode & 0o777 == 0o755
    assert [p.name for p in folder.parent.iterdir()] == ["m-key"]


def killed_while_saving(fake_gguf, model, monkeypatch) -> None:
    """Run the conversion in a forked child that is SIGKILLed halfway through writing the weights."""
    real_save = model.save_pretrained

    def save_then_die(folder, *args, **kwargs):
        real_save(folder, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    monkeypatch.setattr(model, "save_pretrained", save_then_die)
    pid = os.fork()
    if pid == 0:  # the child: convert, and be killed before the tokenizer is saved
        try:
            models._cached_from_gguf(fake_gguf, "m-key")
        finally:
            os._exit(3)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG)) == (0, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    if done == (0, 0):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked conversion did not finish in 60 s")
    assert os.WIFSIGNALED(done[1]) and os.WTERMSIG(done[1]) == signal.SIGKILL
    monkeypatch.setattr(model, "save_pretrained", real_save)


def test_a_conversion_killed_earlier_leaves_nothing_after_the_next_load(fake_gguf, tiny_llama, tmp_path, monkeypatch):
    models_dir = tmp_path / "cache" / "models"
    killed_while_saving(fake_gguf, tiny_llama[0], monkeypatch)
    assert len(list(models_dir.iterdir())) == 1  # the killed process's temporary folder, weights inside
    folder = models._cached_from_gguf(fake_gguf, "m-key")
    assert (folder / "config.json").is_file()
    assert [p.name for p in models_dir.iterdir()] == ["m-key"]


def test_a_stale_temporary_folder_goes_even_when_the_model_is_already_cached(fake_gguf, tmp_path):
    models._cached_from_gguf(fake_gguf, "m-key")
    leftover = stale_temp(tmp_path / "cache" / "models", dead_pid())
    models._cached_from_gguf(fake_gguf, "m-key")
    assert not leftover.exists()


def test_a_running_conversion_keeps_its_temporary_folder(tmp_path):
    mine = stale_temp(tmp_path, os.getpid())
    foreign = tmp_path / f"{atomic.TEMP_PREFIX}otherhost-{dead_pid()}-abc_12"
    foreign.mkdir()
    unrelated = tmp_path / ".tmp-notours"
    unrelated.mkdir()
    assert atomic.sweep_stale(tmp_path) == []
    assert mine.exists() and foreign.exists() and unrelated.exists()


def test_ctrl_c_during_a_conversion_removes_the_temporary_folder(fake_gguf, tiny_llama, tmp_path, monkeypatch):
    model, _ = tiny_llama

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        models._cached_from_gguf(fake_gguf, "m-key")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_check_writable_names_the_folder_and_leaves_nothing(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(LearndynError, match="cannot write to output folder .*a-file/out: Not a directory"):
        atomic.check_writable(tmp_path / "a-file" / "out")
    atomic.check_writable(tmp_path / "new" / "deeper")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # the folders it made to try are gone


def test_json_and_jsonl_writers_round_trip_and_keep_the_old_file_on_failure(tmp_path):
    from learndyn.atomic import write_json, write_jsonl

    target = write_json(tmp_path / "s.json", {"name": "café", "path": tmp_path})
    assert json.loads(target.read_text(encoding="utf-8")) == {"name": "café", "path": str(tmp_path)}
    rows = write_jsonl(tmp_path / "r.jsonl", ({"i": i} for i in range(3)))
    assert [json.loads(line) for line in rows.read_text().splitlines()] == [{"i": 0}, {"i": 1}, {"i": 2}]

    def failing():
        yield {"i": 0}
        raise RuntimeError("disk went away")

    with pytest.raises(RuntimeError):
        write_jsonl(rows, failing())
    assert len(rows.read_text().splitlines()) == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl", "s.json"]
