"""Faults: SIGKILL at random moments, a full disk, identifying DICOM tags. Nothing is lost or leaked.

The kill tests run `medsynth train` and `medsynth sample` as subprocesses and SIGKILL them at
moments drawn from a seeded generator; the default suite runs a few kills, `make test-slow` runs
20 and more and records the counts in docs/reliability.md.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CONFIGS, blob_volume, cpu_runtime, write_dicom_series
from reliability_report import record

from medsynth.checkpoint import load_checkpoint
from medsynth.config import load_config
from medsynth.runs import train_run

CPU = cpu_runtime()
STEPS = 80
# Checkpoint every step, so kills land inside checkpoint writes often, and every resume point
# is a checkpoint step of the uninterrupted run too (the condition for bit-identical weights).
TRAIN_ARGS = [
    "--config",
    str(CONFIGS / "tiny.yaml"),
    "--device",
    "cpu",
    "--set",
    f"train.max_steps={STEPS}",
    "--set",
    "train.checkpoint_every=1",
    "--set",
    "train.preview_every=1000",
    "--set",
    "train.keep_checkpoints=1",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def medsynth(*args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "medsynth", *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )


def weights(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    payload = load_checkpoint(run)
    return {k: payload[k] for k in ("generator", "generator_ema", "discriminator")}


def kill_at_random_moments(args, kills: int, seed: int, wait, check) -> dict[str, int]:
    """Start `medsynth args` and SIGKILL it `kills` times, each after `wait(process, rng)`;
    `check(counts)` runs after each kill. Returns counts of what happened."""
    rng = np.random.default_rng(seed)
    counts = {"kills": 0, "finished before the kill": 0}
    for _ in range(kills):
        process = medsynth(*args)
        wait(process, rng)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            counts["kills"] += 1
        else:
            counts["finished before the kill"] += 1
        _, err = process.communicate(timeout=300)
        assert "Traceback" not in err, err[-3000:]
        check(counts)
    return counts


@pytest.mark.parametrize("kills", [pytest.param(3, id="short"), pytest.param(24, id="full", marks=pytest.mark.slow)])
def test_training_killed_at_random_moments_resumes_to_the_same_weights(phantom_dir, tmp_path, kills):
    reference = tmp_path / "reference"
    start = time.perf_counter()
    process = medsynth("train", phantom_dir, "-o", reference, *TRAIN_ARGS)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    whole_run = time.perf_counter() - start
    start = time.perf_counter()
    process = medsynth("train", phantom_dir, "-o", tmp_path / "one-step", *TRAIN_ARGS, "--max-steps", "1")
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    start_up = time.perf_counter() - start  # imports, discovery, cache, model build, one step
    training = max(whole_run - start_up, 0.5)

    run = tmp_path / "killed"
    steps_seen: list[int] = []

    def check(counts):
        folder = run / "checkpoints"
        # The next start removes them, so any temporary seen now was left by this kill.
        if folder.exists() and any(folder.glob(".*.tmp")):
            counts["kills inside a checkpoint write"] = counts.get("kills inside a checkpoint write", 0) + 1
        if (folder / "last.pt").exists():
            steps_seen.append(load_checkpoint(run)["step"])  # every checkpoint left behind loads

    step_time = training / STEPS
    metrics = run / "metrics.jsonl"

    def steps_done() -> int:
        return len(metrics.read_text().splitlines()) if metrics.exists() else 0

    def wait(process, rng):
        """A quarter of the kills land in start-up (imports, discovery, loading the checkpoint);
        the rest 1-3 steps into training, at a random moment within a step, so that many fall
        inside a checkpoint write. Waiting on progress, not the clock, keeps every kill inside the
        run however fast or loaded the machine is."""
        if rng.random() < 0.25:
            time.sleep(rng.uniform(0.1, 0.9) * start_up)
            return
        target = steps_done() + int(rng.integers(1, 4))
        deadline = time.perf_counter() + 10 * start_up + 100 * step_time
        while steps_done() < target and process.poll() is None and time.perf_counter() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, step_time))

    counts = kill_at_random_moments(
        ["train", phantom_dir, "-o", run, *TRAIN_ARGS], kills, seed=0, wait=wait, check=check
    )
    final = medsynth("train", phantom_dir, "-o", run, *TRAIN_ARGS)
    _, err = final.communicate(timeout=600)
    assert final.returncode == 0, err[-3000:]
    assert load_checkpoint(run)["step"] == STEPS
    assert not list((run / "checkpoints").glob(".*.tmp")), "interrupted writes were left on disk"
    assert steps_seen == sorted(steps_seen), "a resume went backwards"
    expected, actual = weights(reference), weights(run)
    for part in expected:
        for name, tensor in expected[part].items():
            assert torch.equal(tensor, actual[part][name]), f"{part}.{name} differs from the uninterrupted run"
    assert counts["kills"] >= kills // 2
    inside = counts.get("kills inside a checkpoint write", 0)
    record(
        "kill-train",
        "SIGKILL during training",
        f"`medsynth train` (tiny config, {STEPS} steps, a checkpoint every step) killed at seeded random "
        "moments, then resumed by re-running the same command",
        kills,
        f"{counts['kills']} kills landed ({inside} left a checkpoint write unfinished), "
        f"{counts['finished before the kill']} finished before its kill; every left checkpoint loaded; "
        f"final step {STEPS} reached; weights bit-identical to an uninterrupted run",
    )


@pytest.fixture(scope="module")
def sample_checkpoint(phantom_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("sample_run") / "run"
    config = load_config(CONFIGS / "tiny.yaml", ["plan.target_shape=[32,32,32]", "train.max_steps=2"])
    train_run(phantom_dir, run, config, CPU)
    return run


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("kills", [pytest.param(3, id="short"), pytest.param(20, id="full", marks=pytest.mark.slow)])
def test_sampling_killed_at_random_moments_completes_the_set_exactly(sample_checkpoint, tmp_path, kills):
    count = 24
    start = time.perf_counter()
    process = medsynth("sample", sample_checkpoint, "-n", count, "-o", tmp_path / "reference", "--device", "cpu")
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    whole_run = time.perf_counter() - start
    reference = {p.name: _digest(p) for p in (tmp_path / "reference").glob("*.nii.gz")}
    assert len(reference) == count
    out = tmp_path / "killed"

    def check(counts):
        for path in out.glob("*.nii.gz"):  # whatever has a final name is complete and right
            assert _digest(path) == reference[path.name], f"{path.name} is partial or wrong"
        counts["files checked"] = counts.get("files checked", 0) + len(list(out.glob("*.nii.gz")))

    counts = kill_at_random_moments(
        ["sample", sample_checkpoint, "-n", count, "-o", out, "--device", "cpu"],
        kills,
        seed=1,
        wait=lambda process, rng: time.sleep(rng.uniform(0.3 * whole_run, whole_run)),
        check=check,
    )
    final = medsynth("sample", sample_checkpoint, "-n", count, "-o", out, "--device", "cpu")
    _, err = final.communicate(timeout=600)
    assert final.returncode == 0, err[-3000:]
    assert {p.name: _digest(p) for p in out.glob("*.nii.gz")} == reference
    assert len(list(out.glob("*.json"))) == count + 1  # a sidecar each, and the manifest
    record(
        "kill-sample",
        "SIGKILL during sampling",
        f"`medsynth sample -n {count}` killed at seeded random moments, every file under a final name "
        "checked after each kill, then re-run",
        kills,
        f"{counts['kills']} kills landed; {counts.get('files checked', 0)} files checked after kills, none partial; "
        f"the re-run completed the set byte for byte ({count} volumes)",
    )


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous_checkpoint(
    phantom_dir, tmp_path, run_cli, monkeypatch
):
    run = tmp_path / "run"
    args = ["train", phantom_dir, "-o", run, "--config", CONFIGS / "tiny.yaml", "--device", "cpu"]
    code, _, err = run_cli(*args, "--max-steps", "3")
    assert code == 0, err
    before = _digest(run / "checkpoints" / "last.pt")
    monkeypatch.setattr("medsynth.checkpoint.torch.save", _enospc)
    code, _, err = run_cli(*args, "--max-steps", "6")
    assert code == 1 and "Traceback" not in err
    assert "No space left on device" in err and "previous version of it is intact" in err
    assert _digest(run / "checkpoints" / "last.pt") == before
    assert load_checkpoint(run)["step"] == 3
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    record(
        "disk-full",
        "disk full (ENOSPC)",
        "torch.save raises ENOSPC during a checkpoint write; writing a sample raises ENOSPC",
        2,
        "one line naming the file and the reason, exit 1; the previous checkpoint is byte-identical and "
        "loads; no temporary file left; no partial sample",
    )


def test_full_disk_while_sampling_leaves_no_partial_file(sample_checkpoint, tmp_path, run_cli, monkeypatch):
    import medsynth.atomic

    real_fsync = os.fsync
    calls = {"n": 0}

    def fsync_then_fill(fd):
        calls["n"] += 1
        if calls["n"] > 4:  # the first two volumes and their sidecars, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(medsynth.atomic.os, "fsync", fsync_then_fill)
    code, _, err = run_cli("sample", sample_checkpoint, "-n", "6", "-o", tmp_path / "out", "--device", "cpu")
    assert code == 1 and "No space left on device" in err and "Traceback" not in err
    monkeypatch.undo()
    written = sorted((tmp_path / "out").glob("*.nii.gz"))
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]
    code, _, err = run_cli("sample", sample_checkpoint, "-n", "6", "-o", tmp_path / "out", "--device", "cpu")
    assert code == 0, err
    assert len(list((tmp_path / "out").glob("*.nii.gz"))) == 6 and len(written) <= 6


IDENTIFIERS = {
    "PatientName": "Doe^Janet^Q",
    "PatientID": "MRN-83190457",
    "PatientBirthDate": "19470312",
    "InstitutionName": "St Elsewhere General Hospital",
    "AccessionNumber": "ACC99812734",
}
PRIVATE_VALUE = "PRIVATE-TAG-SECRET-7731"


def _identifying_series(folder: Path, seed: int) -> None:
    import pydicom

    array = blob_volume(shape=(32, 32, 24), seed=seed).astype(np.int16)
    for path in write_dicom_series(folder, array, pixel_spacing=(3.0, 3.0), slice_step=(0.0, 0.0, 4.0)):
        dataset = pydicom.dcmread(path)
        for keyword, value in IDENTIFIERS.items():
            setattr(dataset, keyword, value)
        dataset.add_new(0x00291010, "LO", PRIVATE_VALUE)  # a private tag, as vendors write them
        dataset.save_as(path)


def test_identifying_dicom_tags_never_reach_any_output(tmp_path, run_cli, monkeypatch):
    """inspect -> train -> sample (NIfTI and DICOM) -> evaluate on identifying series; then search
    every byte written for the identifying values."""
    data = tmp_path / "patients"
    for index in range(4):
        _identifying_series(data / f"series{index}", seed=index)
    inputs_before = {p: _digest(p) for p in data.rglob("*") if p.is_file()}
    out = tmp_path / "outputs"
    monkeypatch.setenv("MEDSYNTH_CACHE", str(out / "cache"))
    elsewhere = tmp_path / "working-directory"  # relative paths would land here
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    home = tmp_path / "home"  # and "~" here
    monkeypatch.setenv("HOME", str(home))
    overrides = ["--set", "plan.target_shape=[16,16,16]"]
    steps = [
        ("inspect", data, "--json"),
        ("train", data, "-o", out / "run", "--config", CONFIGS / "tiny.yaml", "--device", "cpu", *overrides),
        ("sample", out / "run", "-n", "2", "-o", out / "nifti", "--preview", "--device", "cpu"),
        ("sample", out / "run", "-n", "2", "-o", out / "dicom", "--format", "dicom", "--device", "cpu"),
        ("evaluate", "--real", data, "--synthetic", out / "nifti", "-o", out / "report", *overrides),
    ]
    logs = []
    for args in steps:
        code, stdout, stderr = run_cli(*args)
        assert code == 0, (args[0], stderr)
        logs.append(stdout + stderr)
    (out / "logs.txt").write_text("\n".join(logs))
    needles = [v.encode() for v in IDENTIFIERS.values()] + [PRIVATE_VALUE.encode(), b"Doe^Janet", b"Janet"]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 20
    for path in files:
        blob = path.read_bytes()
        for needle in needles:
            assert needle not in blob, f"{needle!r} found in {path.relative_to(out)}"
    assert {p: _digest(p) for p in data.rglob("*") if p.is_file()} == inputs_before  # inputs untouched
    # Nothing written outside the chosen folders: not beside the inputs, not in the working
    # directory or the home folder.
    # (matplotlib keeps its own font cache under ~, which holds no data of ours.)
    assert not list(elsewhere.rglob("*")), [str(p) for p in elsewhere.rglob("*")]
    allowed = (out, data, home / ".cache" / "matplotlib", home / ".config" / "matplotlib")
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and not any(a in p.parents for a in allowed)]
    assert outside == [], outside
    record(
        "privacy",
        "identifiers in DICOM input",
        "4 series with PatientName, PatientID, BirthDate, InstitutionName, AccessionNumber and a private tag "
        "through inspect, train, sample (NIfTI and DICOM) and evaluate; every byte written is searched",
        len(files),
        f"no identifying value in any of the {len(files)} files written (cache, checkpoints, logs, configs, "
        "samples, sidecars, report); inputs byte-identical afterwards; nothing written outside the chosen "
        "folders (working directory and home checked; matplotlib's own font cache excepted)",
    )
