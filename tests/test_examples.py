"""examples/: the accelerate configs are ones accelerate reads with the keys the callback needs, and
the TRL script runs as a user would run it (one process, a tiny model) and writes metrics."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"


def _fsdp_option_names() -> set[str]:
    """The FSDP settings `accelerate launch` understands (a config key it lacks is silently ignored)."""
    from accelerate.commands.launch import launch_command_parser

    return {action.dest for action in launch_command_parser()._actions if action.dest.startswith("fsdp_")}


@pytest.mark.parametrize("name, kind", [("accelerate_ddp.yaml", "MULTI_GPU"), ("accelerate_fsdp.yaml", "FSDP")])
def test_accelerate_configs_load_with_known_keys(name, kind):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(EXAMPLES / name))  # refuses unknown top-level keys
    assert str(config.distributed_type).endswith(kind)
    if kind == "FSDP":
        fsdp = config.fsdp_config
        assert set(fsdp) <= _fsdp_option_names(), set(fsdp) - _fsdp_option_names()
        assert fsdp["fsdp_version"] == 2  # the callback refuses FSDP1
        assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"  # and a model left as one unit


def test_trl_script_tracks_probes_in_one_process(tiny_folder, tmp_path):
    from learndyn.training.runs import read_metrics

    src = str(Path(__file__).parents[1] / "src")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, str(EXAMPLES / "trl_sft_callback.py"), "--model", str(tiny_folder), "--out",
           str(tmp_path / "run"), "--steps", "2", "--every", "1", "--max-length", "64"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = read_metrics(tmp_path / "run")
    assert sorted(set(metrics["step"])) == [0, 1, 2]
    assert metrics.groupby("step").size().nunique() == 1  # every evaluation scored the same rows
