"""bench/gpu_suite.py runs where no GPU is (--smoke), so the script a GPU owner runs as is does not rot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_gpu_suite_smoke_runs_every_part_and_agrees(tmp_path):
    out = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(out.read_text())
    tiny = figures["tiny"]
    assert tiny["scoring"]["max_rel_diff_logp_sum"] < 1e-4  # fp32 on the CPU: the scorer equals the plain loop
    assert tiny["scoring"]["responses"] > 0 and tiny["scoring"]["fraction_of_peak"] > 0
    assert tiny["tracking"]["evaluations"] >= 2 and 0 < tiny["tracking"]["scoring_share"] < 1
    assert tiny["explain"]["max_diff_vs_naive"] < 1e-4  # explain's jvp route equals the naive backward route
