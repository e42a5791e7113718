"""Slow end-to-end checks, run with `make test-slow`: torchrun on CPU, and real-data training."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medsynth.checkpoint import load_checkpoint
from medsynth.metrics import read_metrics
from medsynth.phantoms import write_phantoms

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
pytestmark = pytest.mark.slow


def test_torchrun_two_cpu_processes_train_and_resume(tmp_path):
    """The documented command: `torchrun --nproc_per_node 2 -m medsynth train`, gloo on CPU."""
    write_phantoms(tmp_path / "data", 8, shape=(32, 32, 32), spacing=6.0)
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "medsynth",
    ]
    args = ["train", tmp_path / "data", "-o", tmp_path / "run", "--config", CONFIGS / "tiny.yaml", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(
        [*torchrun, *map(str, args), "--max-steps", "4"], capture_output=True, text=True, env=env, timeout=600
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert load_checkpoint(tmp_path / "run")["world_size"] == 2
    second = subprocess.run(
        [*torchrun, *map(str, args), "--max-steps", "6"], capture_output=True, text=True, env=env, timeout=600
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert load_checkpoint(tmp_path / "run")["step"] == 6
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_real_ixi_trains_a_few_steps(shared_data, tmp_path):
    from medsynth.config import load_config
    from medsynth.distributed import Runtime
    from medsynth.runs import train_run

    config = load_config(CONFIGS / "brain-mri-64.yaml", ["train.max_steps=3", "train.batch_size=2"])
    result = train_run(shared_data / "train" / "ixi-t1", tmp_path / "run", config, Runtime(device=torch.device("cpu")))
    assert result.volumes == 139 and result.step == 3
    assert all(r["loss_d"] == r["loss_d"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl"))
