"""Memory planned before a run: the measured probe, the line through measured batches, `auto`
batch sizes, and refusing a run that cannot fit before anything is preprocessed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from helpers import CONFIGS, cpu_runtime, tiny_config
from test_labels import a_plan

from medsynth import memory
from medsynth.memory import MemoryProbe
from medsynth.runs import RunRefused, train_run

MIB = 1024**2


def _probe(batch: int, peak_mib: float, baseline_mib: float = 200, step_peak_mib: float | None = None) -> MemoryProbe:
    step = peak_mib if step_peak_mib is None else step_peak_mib
    return MemoryProbe("train", "cpu", batch, "off", int(peak_mib * MIB), int(step * MIB), int(baseline_mib * MIB), 0.1)


def test_the_line_through_two_measured_batches_predicts_the_others():
    probes = [_probe(2, 300), _probe(8, 420)]  # 20 MiB a volume on top of 260 MiB
    assert memory.predicted_bytes(probes, 16) == pytest.approx(580 * MIB, rel=1e-6)
    assert memory.predicted_bytes(probes, 4) == pytest.approx(340 * MIB, rel=1e-6)
    # 600 MiB to plan on: batch 16 (580) fits, 32 (900) does not.
    assert memory.largest_fitting_batch(probes, 600 * MIB, pack=2) == 16
    assert memory.largest_fitting_batch(probes, 250 * MIB, pack=2) is None
    assert memory.largest_fitting_batch(probes, 10_000 * MIB, pack=2, largest=24) == 16  # the data's limit


def test_the_line_follows_the_steps_and_a_checkpoints_peak_is_a_floor():
    """At small batches writing the checkpoint and preview can set the peak; the line through the
    batches must follow the steps' own peaks, or it predicts large batches too low."""
    probes = [_probe(2, 600, step_peak_mib=400), _probe(4, 610, step_peak_mib=500)]  # 50 MiB a volume
    assert memory.predicted_bytes(probes, 8) == pytest.approx(700 * MIB, rel=1e-6)
    assert memory.predicted_bytes(probes, 4) == pytest.approx(610 * MIB, rel=1e-6)  # the writing, not 500


def test_one_measurement_counts_everything_above_pytorch_as_growing():
    """From one batch alone the prediction must not be optimistic: all of the step's memory above
    PyTorch's own is taken to grow with the batch."""
    one = [_probe(2, 300, baseline_mib=200)]
    assert memory.predicted_bytes(one, 8) == pytest.approx((200 + 100 * 4) * MIB, rel=1e-6)
    assert memory.predicted_bytes(one, 8) >= memory.predicted_bytes([*one, _probe(4, 320)], 8)


def _fake_probes(monkeypatch, per_volume_mib: float, fixed_mib: float = 300) -> list[int]:
    """Replace the child process by a line, and record which batches were 'measured'."""
    measured: list[int] = []

    def fake(config, plan, kind, device, amp, batch_size, steps=2):
        measured.append(batch_size) if kind == "train" else None
        peak = int((fixed_mib + per_volume_mib * batch_size) * MIB)
        return MemoryProbe(kind, device, batch_size, amp, peak, peak, 0, 0.1)

    monkeypatch.setattr(memory, "probe", fake)
    return measured


def test_a_batch_that_would_not_fit_is_predicted_and_never_run(monkeypatch):
    measured = _fake_probes(monkeypatch, per_volume_mib=100)
    monkeypatch.setattr(memory, "available_bytes", lambda device: int(1001 * MIB / memory.SAFETY))
    planned = memory.plan_memory(tiny_config("train.batch_size=16"), _plan(), "cpu", measure_sampling=False)
    assert 16 not in measured  # 1900 MiB predicted: not run
    assert not planned.fits and not planned.measured
    assert planned.peak_bytes == pytest.approx(1900 * MIB, rel=1e-3)
    assert planned.largest_batch == 4  # 700 MiB; 8 would be 1100
    message = memory.refusal(planned, tiny_config("train.batch_size=16"))
    assert "batch 16 does not fit" in message and "train.batch_size=4 would fit" in message


def test_auto_takes_the_largest_batch_that_fits_and_measures_it(monkeypatch):
    measured = _fake_probes(monkeypatch, per_volume_mib=100)
    monkeypatch.setattr(memory, "available_bytes", lambda device: int(1001 * MIB / memory.SAFETY))
    planned = memory.plan_memory(tiny_config("train.batch_size=auto"), _plan(), "cpu", measure_sampling=False)
    assert planned.batch_size == 4 and planned.measured and planned.fits
    assert measured[-1] == 4


def test_the_dry_run_says_when_the_data_not_memory_limits_the_batch(monkeypatch):
    """8 training volumes cap `auto` at 8; the dry run must not let that read as memory's limit."""
    _fake_probes(monkeypatch, per_volume_mib=100)
    monkeypatch.setattr(memory, "available_bytes", lambda device: int(10_000 * MIB / memory.SAFETY))
    roomy = memory.plan_memory(tiny_config("train.batch_size=2"), _plan(), "cpu", measure_sampling=False, largest=8)
    assert roomy.largest_batch == 8 and roomy.limited_by_data  # 16 would need 1900 of 10000 MiB
    monkeypatch.setattr(memory, "available_bytes", lambda device: int(1200 * MIB / memory.SAFETY))
    tight = memory.plan_memory(tiny_config("train.batch_size=2"), _plan(), "cpu", measure_sampling=False, largest=8)
    assert tight.largest_batch == 8 and not tight.limited_by_data  # 16 (1900 MiB) would not fit either
    memory_bound = memory.plan_memory(tiny_config("train.batch_size=2"), _plan(), "cpu", measure_sampling=False)
    assert memory_bound.largest_batch == 8 and not memory_bound.limited_by_data  # 64 allowed, 16 does not fit


def _plan(shape=(16, 16, 16)):
    return a_plan(shape)  # test_labels' minimal MR plan


@pytest.mark.slow  # the dry-run test runs the same probes by default
def test_the_probe_measures_a_real_step_in_a_child_process():
    """One real step of the tiny model: a peak above PyTorch's own footprint, and the step's time."""
    result = memory.probe(tiny_config(), _plan(), "train", "cpu", "off", 2, steps=1)
    assert result.peak_bytes > result.baseline_bytes > 50 * MIB
    assert result.seconds > 0
    sampled = memory.probe(tiny_config(), _plan(), "sample", "cpu", "off", 8, steps=1)
    assert sampled.peak_bytes > sampled.baseline_bytes


def test_a_run_that_cannot_fit_is_refused_before_preprocessing(monkeypatch, phantom_dir, tmp_path):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 64 * MIB)  # less than PyTorch itself
    with pytest.raises(RunRefused, match="does not fit in memory.*plan.target_shape"):
        train_run(phantom_dir, tmp_path / "run", tiny_config(), cpu_runtime())
    cache = Path(os.environ["MEDSYNTH_CACHE"])
    assert not list(cache.rglob("*.npy"))  # nothing was preprocessed
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_auto_batch_is_chosen_recorded_and_kept_on_resume(monkeypatch, phantom_dir, tmp_path):
    measured = _fake_probes(monkeypatch, per_volume_mib=100)
    monkeypatch.setattr(memory, "available_bytes", lambda device: int(701 * MIB / memory.SAFETY))
    messages: list[str] = []
    train_run(
        phantom_dir,
        tmp_path / "run",
        tiny_config("train.batch_size=auto", "train.max_steps=2"),
        cpu_runtime(),
        on_message=messages.append,
    )
    assert any("train.batch_size auto: 4" in m for m in messages)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["batch_size"] == 4
    # More memory later does not change a run that has started: it resumes with its batch.
    monkeypatch.setattr(memory, "available_bytes", lambda device: 100_000 * MIB)
    measured.clear()
    result = train_run(
        phantom_dir, tmp_path / "run", tiny_config("train.batch_size=auto", "train.max_steps=3"), cpu_runtime()
    )
    assert result.resumed_from == 2 and result.step == 3
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["batch_size"] == 4


def test_the_dry_run_says_what_will_end_the_run():
    from medsynth.cli import _run_length
    from medsynth.config import TrainConfig

    assert _run_length(TrainConfig(max_steps=3000), 0.8) == "3,000 steps, about 40 minutes"
    budgeted = TrainConfig(max_steps=20000, max_minutes=60)
    assert _run_length(budgeted, 0.8).endswith("about 4,500 steps at the step time above")
    assert _run_length(TrainConfig(max_steps=1000, max_minutes=60), 0.8).endswith(
        "1,000 steps first at the step time above"
    )
    assert "whichever comes first" in _run_length(budgeted, None)


def test_dry_run_reports_memory_and_refuses_what_cannot_fit(run_cli, monkeypatch, phantom_dir, tmp_path):
    args = ("train", phantom_dir, "-o", tmp_path / "run", "--config", CONFIGS / "tiny.yaml", "--dry-run")
    code, out, err = run_cli(*args)
    assert code == 0, err
    for row in ("memory, a training step", "memory, sampling", "memory available", "largest batch that fits"):
        assert row in out
    assert "parameters" in out and "FLOP" in out  # the model's sizes, as before
    # One step timed in each precision (bf16 where native, else said to be emulated), the CPU named.
    assert "step time, fp32" in out and "volumes/s" in out and "training will use" in out and "run length" in out
    assert "step time, bf16" in out and "cores" in out
    monkeypatch.setattr(memory, "available_bytes", lambda device: 64 * MIB)
    code, out, err = run_cli(*args)
    assert code == 2 and "does not fit in memory" in err and "plan.target_shape" in err
    assert not (tmp_path / "run").exists()


def test_inspect_measures_memory_when_asked(run_cli, monkeypatch, phantom_dir):
    _fake_probes(monkeypatch, per_volume_mib=10)
    code, out, err = run_cli("inspect", phantom_dir, "--config", CONFIGS / "tiny.yaml", "--memory")
    assert code == 0, err
    assert "memory, a training step" in out and "largest batch that fits" in out
    code, out, err = run_cli("inspect", phantom_dir, "--config", CONFIGS / "tiny.yaml", "--memory", "--json")
    assert code == 0 and '"largest_batch"' in out


def test_activation_checkpointing_changes_memory_not_numbers(phantom_dir, tmp_path):
    """Checkpointed generator blocks run again in the backward pass; the weights, optimiser
    states and BatchNorm statistics after a few steps are bit-identical to a plain run's, and a
    run may switch it on when it is resumed."""
    from test_train import _assert_identical, _state

    common = ("train.max_steps=3", "train.checkpoint_every=100", "train.preview_every=100", "train.amp=off")
    train_run(phantom_dir, tmp_path / "plain", tiny_config(*common), cpu_runtime())
    train_run(
        phantom_dir, tmp_path / "lean", tiny_config(*common, "train.activation_checkpointing=true"), cpu_runtime()
    )
    _assert_identical(_state(tmp_path / "plain"), _state(tmp_path / "lean"))
    switched = tiny_config("train.max_steps=4", *common[1:], "train.activation_checkpointing=true")
    assert train_run(phantom_dir, tmp_path / "plain", switched, cpu_runtime()).resumed_from == 3


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc")
def test_a_probe_child_reports_its_own_peak_not_its_parents():
    """ru_maxrss survives exec: a child of a process that once held 1 GiB reported 1 GiB whatever it
    measured. The probe's figure (VmHWM) is the child's own."""
    import subprocess
    import sys

    import numpy as np

    held = np.ones(1024 * MIB // 8)  # 1 GiB, touched, held by this (the parent) process
    child = subprocess.run(
        [sys.executable, "-c", "from medsynth.memory import peak_bytes; print(peak_bytes('cpu'))"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert held.sum() > 0
    assert int(child.stdout.strip()) < 700 * MIB  # PyTorch's import is about 250 MiB; the parent's 1 GiB is not in it
