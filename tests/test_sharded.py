"""Sharded (FSDP2) scoring and tracking, in 2 CPU processes on gloo: one torchrun launch runs every
check of tests/sharded_worker.py (a launch costs tens of seconds here), each reported as a test.

Each check compares against the unsharded model in the same process: score_probes rows within 1e-4
relative (Llama, Qwen2, GPT-2 with tied embeddings, a head that is its own unit, a single-unit model),
uneven shares (7 probes and a tiny batch budget; 1 probe, so rank 1 scores none) where ranks make
different numbers of calls and must pad, the callback at step 0 and after an SGD step writing exactly
the single-process rows from rank 0, and the single-unit refusal. A hang fails by the timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo")
CHECKS = [
    "llama_7_probes_uneven_batches", "llama_1_probe_rank1_has_none", "qwen2_5_probes", "gpt2_tied_head_4_probes",
    "llama_head_its_own_unit", "llama_single_unit_scores", "llama_scored_then_sharded_in_place",
    "uneven_set_needs_padding",
    "callback_rank0_writes_single_process_rows", "single_unit_refused_per_layer_accepted",
]


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("sharded")
    src = str(TESTS.parent / "src")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(TESTS / "sharded_worker.py"), str(out)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"the 2-process run hung past 300 s: {str(error.stdout)[-2000:]}")
    results = out / "results.json"
    if not results.is_file():
        pytest.fail(f"the 2-process run ended (exit {done.returncode}) without results:\n"
                    f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(results.read_text())


@pytest.mark.parametrize("check", CHECKS)
def test_sharded_check(worker_results, check):
    assert worker_results.get(check) == "ok", worker_results.get(check, "the check did not run")


def test_every_worker_check_is_listed(worker_results):
    assert sorted(worker_results) == sorted(CHECKS)
