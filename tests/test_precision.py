"""Precision by measurement: bf16 only where it is native and faster; a loud line where forced and slow."""

from __future__ import annotations

import pytest
import torch
from helpers import cpu_runtime, tiny_config

from medsynth import precision
from medsynth.precision import choose_precision

CPU = torch.device("cpu")


@pytest.fixture
def emulated_bf16(monkeypatch):
    """A CPU like an AVX2-only EPYC: no native bf16, where the probe measured bf16 37x slower."""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(precision, "bf16_time_ratio", lambda device: 37.0)


def native_bf16_measuring(monkeypatch, ratio: float) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(precision, "bf16_time_ratio", lambda device: ratio)


def test_auto_never_takes_emulated_bf16(emulated_bf16):
    choice = choose_precision("auto", CPU)
    assert not choice.bf16 and "no native bf16" in choice.reason and choice.warning is None


def test_forced_bf16_where_emulated_runs_but_says_how_much_slower(emulated_bf16):
    choice = choose_precision("bf16", CPU)
    assert choice.bf16 and "37x slower than fp32" in choice.warning and "train.amp=auto" in choice.warning


@pytest.mark.parametrize(("ratio", "bf16"), [(0.5, True), (0.79, True), (0.95, False), (1.6, False)])
def test_auto_takes_native_bf16_only_when_measured_faster(monkeypatch, ratio, bf16):
    native_bf16_measuring(monkeypatch, ratio)
    choice = choose_precision("auto", CPU)
    assert choice.bf16 is bf16 and choice.measured_ratio == ratio and choice.warning is None


def test_off_is_fp32_without_measuring(monkeypatch):
    monkeypatch.setattr(precision, "bf16_time_ratio", lambda device: pytest.fail("measured"))
    assert not choose_precision("off", CPU).bf16


def test_the_probe_measures_a_real_ratio():
    ratio = precision.bf16_time_ratio("cpu", repeats=1)
    assert 0.05 < ratio < 1000  # a measurement, whatever this CPU is


def test_training_with_forced_emulated_bf16_says_so_once(emulated_bf16, phantom_dir, tmp_path):
    from medsynth.runs import train_run

    events, messages = [], []
    train_run(
        phantom_dir,
        tmp_path / "run",
        tiny_config("train.amp=bf16", "train.max_steps=1"),
        cpu_runtime(),
        on_event=events.append,
        on_message=messages.append,
    )
    assert len(events) == 1 and "37x slower" in events[0]
    assert any("bf16 autocast, forced" in m for m in messages)


def test_a_resumed_auto_run_keeps_the_precision_it_started_in(monkeypatch, phantom_dir, tmp_path):
    from medsynth.checkpoint import load_checkpoint
    from medsynth.runs import train_run

    native_bf16_measuring(monkeypatch, 0.5)  # measured faster: auto starts in bf16
    train_run(phantom_dir, tmp_path / "run", tiny_config("train.max_steps=1"), cpu_runtime())
    assert load_checkpoint(tmp_path / "run")["precision"] == {"bf16": True, "device_type": "cpu"}
    native_bf16_measuring(monkeypatch, 0.9)  # a new measurement would say fp32 ...
    messages = []
    train_run(
        phantom_dir, tmp_path / "run", tiny_config("train.max_steps=2"), cpu_runtime(), on_message=messages.append
    )
    assert any("as this run started" in m for m in messages)  # ... but the run keeps bf16
    assert load_checkpoint(tmp_path / "run")["precision"]["bf16"] is True


def test_the_measurement_is_remembered_per_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDSYNTH_CACHE", str(tmp_path))
    precision.bf16_time_ratio.cache_clear()
    calls = []
    real = precision._measure_bf16_time_ratio
    monkeypatch.setattr(precision, "_measure_bf16_time_ratio", lambda *a: calls.append(1) or real(*a))
    first = precision.bf16_time_ratio("cpu", 1)
    precision.bf16_time_ratio.cache_clear()  # a new process
    assert precision.bf16_time_ratio("cpu", 1) == first and len(calls) == 1
    assert len(list(tmp_path.glob("precision-*.json"))) == 1
    precision.bf16_time_ratio.cache_clear()
