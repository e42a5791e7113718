"""Training: finite steps, checkpoints, exact resume, signals, the divergence guard, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from reliability_report import record as record_reliability

from medsynth.checkpoint import load_checkpoint
from medsynth.config import load_config
from medsynth.distributed import Runtime
from medsynth.metrics import read_metrics
from medsynth.phantoms import write_phantoms
from medsynth.runs import RunRefused, train_run
from medsynth.train import Trainer, TrainingStopped

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CPU = Runtime(device=torch.device("cpu"))


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("phantoms")
    write_phantoms(folder, 6, shape=(32, 32, 32), spacing=6.0)
    return folder


def tiny(*overrides: str):
    return load_config(CONFIGS / "tiny.yaml", list(overrides))


def test_a_few_steps_give_finite_losses_a_checkpoint_previews_and_metrics(phantom_dir, tmp_path):
    result = train_run(phantom_dir, tmp_path / "run", tiny(), CPU)
    assert result.step == 6 and result.volumes == 6
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for record in records:
        for key in (
            "loss_d",
            "loss_g",
            "d_real",
            "d_fake",
            "grad_norm_d",
            "grad_norm_g",
            "steps_per_s",
            "volumes_per_s",
        ):
            assert isinstance(record[key], float) and record[key] == record[key]  # present and not NaN
    payload = load_checkpoint(tmp_path / "run")  # weights_only=True under the hood
    assert payload["step"] == 6 and list(payload["plan"]["target_shape"]) == [16, 16, 16]
    assert set(payload) >= {
        "generator",
        "generator_ema",
        "discriminator",
        "optimizer_generator",
        "rng",
        "config",
        "fingerprint",
    }
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.pt")) == [
        "last.pt",
        "step_00000003.pt",
        "step_00000006.pt",
    ]
    assert (tmp_path / "run" / "previews" / "latest.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "run" / "previews" / "real.png").exists()
    assert (tmp_path / "run" / "config.yaml").exists() and (tmp_path / "run" / "plan.json").exists()


def test_checkpoint_has_no_file_names_or_identifiers(phantom_dir, tmp_path):
    train_run(phantom_dir, tmp_path / "run", tiny("train.max_steps=1"), CPU)
    payload = load_checkpoint(tmp_path / "run")
    text = json.dumps(payload["fingerprint"]) + json.dumps(payload["plan"])
    assert "phantom_" not in text and str(phantom_dir) not in text


def _state(run: Path) -> dict:
    payload = load_checkpoint(run)
    return {
        k: payload[k]
        for k in ("generator", "generator_ema", "discriminator", "optimizer_generator", "optimizer_discriminator")
    }


def _assert_identical(a, b, path=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _assert_identical(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{path} differs"
    else:
        assert a == b, path


@pytest.mark.parametrize(
    "overrides", [(), ("augment.intensity_jitter=0.1", "loss.r1_gamma=1.0", "loss.d_steps_per_g=2")]
)
def test_resume_is_bit_identical_to_an_uninterrupted_run(phantom_dir, tmp_path, overrides):
    """N steps, then a resume for N more, equals 2N steps in one go: weights, EMA and optimisers."""
    common = ("train.checkpoint_every=100", "train.preview_every=100", *overrides)  # N=5 is not a checkpoint step
    train_run(phantom_dir, tmp_path / "whole", tiny("train.max_steps=10", *common), CPU)
    train_run(phantom_dir, tmp_path / "split", tiny("train.max_steps=5", *common), CPU)
    resumed = train_run(phantom_dir, tmp_path / "split", tiny("train.max_steps=10", *common), CPU)
    assert resumed.resumed_from == 5 and resumed.step == 10
    _assert_identical(_state(tmp_path / "whole"), _state(tmp_path / "split"))
    whole = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    split = read_metrics(tmp_path / "split" / "metrics.jsonl")
    assert [r["loss_d"] for r in whole] == [r["loss_d"] for r in split]


def test_existing_run_with_other_settings_is_refused_unless_forced(phantom_dir, tmp_path):
    train_run(phantom_dir, tmp_path / "run", tiny("train.max_steps=2"), CPU)
    with pytest.raises(RunRefused, match="model.base_channels"):
        train_run(phantom_dir, tmp_path / "run", tiny("train.max_steps=2", "model.base_channels=8"), CPU)
    forced = train_run(
        phantom_dir, tmp_path / "run", tiny("train.max_steps=2", "model.base_channels=8"), CPU, force=True
    )
    assert forced.resumed_from is None and load_checkpoint(tmp_path / "run")["config"]["model"]["base_channels"] == 8


def test_corrupt_last_checkpoint_is_refused_clearly(phantom_dir, tmp_path):
    train_run(phantom_dir, tmp_path / "run", tiny("train.max_steps=2"), CPU)
    (tmp_path / "run" / "checkpoints" / "last.pt").write_bytes(b"garbage")
    with pytest.raises(RunRefused, match="not a readable checkpoint"):
        train_run(phantom_dir, tmp_path / "run", tiny("train.max_steps=4"), CPU)


def _nan_after(trainer: Trainer, step: int):
    """Poison D's weights once, during the update that makes step `step`."""
    original = trainer._update_discriminator
    fired = []

    def update(real):
        record = original(real)
        if trainer.step + 1 == step and not fired:
            fired.append(True)
            with torch.no_grad():
                next(trainer.discriminator.parameters()).fill_(float("nan"))  # D's weights are now NaN
            record["loss_d"] = float("nan")
        return record

    trainer._update_discriminator = update


def _trainer(phantom_dir, run_dir, config):
    from medsynth.data import prepare_dataset

    prepared = prepare_dataset(phantom_dir, config)
    return Trainer(config, prepared.plan, [e.path for e in prepared.entries], run_dir, CPU)


def test_divergence_guard_stops_without_saving_nan_weights(phantom_dir, tmp_path):
    trainer = _trainer(phantom_dir, tmp_path / "run", tiny("train.on_divergence=stop", "train.max_steps=8"))
    _nan_after(trainer, 5)
    with pytest.raises(TrainingStopped, match="non-finite loss at step 5") as stopped:
        trainer.fit()
    assert "last good checkpoint is step 3" in str(stopped.value)
    for path in (tmp_path / "run" / "checkpoints").glob("*.pt"):
        payload = load_checkpoint(path)
        assert all(torch.isfinite(t).all() for t in payload["discriminator"].values() if t.is_floating_point())


def test_divergence_guard_rolls_back_and_carries_on(phantom_dir, tmp_path):
    events = []
    trainer = _trainer(phantom_dir, tmp_path / "run", tiny("train.max_steps=8"))
    trainer.on_step = lambda step, record: events.append(record.get("event"))
    _nan_after(trainer, 5)
    assert trainer.fit() == 8
    assert any(e and "rolled back to step 3" in e for e in events)
    assert trainer.rollbacks == 1 and trainer.opt_d.param_groups[0]["lr"] == pytest.approx(1e-4)
    assert all(torch.isfinite(p).all() for p in trainer.discriminator.parameters())


def test_d_winning_for_long_triggers_the_guard(phantom_dir, tmp_path):
    trainer = _trainer(phantom_dir, tmp_path / "run", tiny("train.on_divergence=stop", "train.d_win_steps=2"))
    original = trainer._update_discriminator

    def confident(real):
        return {**original(real), "d_real": 0.999, "d_fake": 0.001}

    trainer._update_discriminator = confident
    with pytest.raises(TrainingStopped, match="the discriminator has won"):
        trainer.fit()


def _cli(*args, env=None, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "medsynth", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        **kwargs,
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_signal_writes_a_checkpoint_and_exits_cleanly(phantom_dir, tmp_path, signum):
    run = tmp_path / "run"
    process = _cli(
        "train",
        phantom_dir,
        "-o",
        run,
        "--config",
        CONFIGS / "tiny.yaml",
        "--max-steps",
        "100000",
        "--set",
        "train.checkpoint_every=100000",
    )
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, err
    assert f"stopped by {signal.Signals(signum).name}" in err and "Traceback" not in err
    step = load_checkpoint(run)["step"]
    assert step >= 3
    # The same command resumes from there.
    resumed = _cli("train", phantom_dir, "-o", run, "--config", CONFIGS / "tiny.yaml", "--max-steps", str(step + 2))
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert f"resuming {run} from step {step}" in err and load_checkpoint(run)["step"] == step + 2
    record_reliability(
        f"signal-{signal.Signals(signum).name}",
        f"pre-emption ({signal.Signals(signum).name})",
        "sent to `medsynth train` mid-run, then the same command re-run",
        1,
        f"checkpoint written, exit {128 + signum}, resumed from the same step",
    )


def test_explicit_flags_beat_set_beats_yaml(run_cli, phantom_dir, tmp_path):
    code, out, err = run_cli(
        "train",
        phantom_dir,
        "-o",
        tmp_path / "run",
        "--config",
        CONFIGS / "tiny.yaml",
        "--set",
        "train.max_steps=4",
        "--max-steps",
        "2",
    )
    assert code == 0, err
    payload = load_checkpoint(tmp_path / "run")
    assert payload["step"] == 2 and payload["config"]["train"]["batch_size"] == 2  # 2 from tiny.yaml
    import yaml

    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["train"]["max_steps"] == 2 and resolved["model"]["base_channels"] == 4


def test_dry_run_reports_sizes_and_writes_nothing(run_cli, phantom_dir, tmp_path):
    code, out, _ = run_cli("train", phantom_dir, "-o", tmp_path / "run", "--config", CONFIGS / "tiny.yaml", "--dry-run")
    assert code == 0 and "parameters" in out and "FLOP" in out
    assert not (tmp_path / "run").exists()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_parameters_worker(rank: int, world: int, port: int, phantom_dir: str, out_dir: str) -> None:
    from medsynth import distributed
    from medsynth.data import prepare_dataset

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    runtime = distributed.setup("cpu")
    try:
        config = tiny("train.max_steps=4")
        prepared = prepare_dataset(phantom_dir, config, cache_dir=Path(out_dir) / f"cache{rank}")
        trainer = Trainer(config, prepared.plan, [e.path for e in prepared.entries], Path(out_dir) / "run", runtime)
        trainer.fit()
        # Parameters, not buffers: BatchNorm running statistics are per rank between DDP's
        # broadcasts from rank 0 (which is the copy that is saved).
        torch.save(
            {
                "generator": dict(trainer.generator.named_parameters()),
                "discriminator": dict(trainer.discriminator.named_parameters()),
                "ema": dict(trainer.ema.named_parameters()),
                "noise": trainer.latent_rng.get_state(),
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        distributed.teardown(runtime)


def test_two_process_ddp_keeps_parameters_identical(phantom_dir, tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(
        _ddp_parameters_worker,
        args=(2, _free_port(), str(phantom_dir), str(tmp_path)),
        nprocs=2,
        start_method="spawn",
    )
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for part in ("generator", "discriminator", "ema"):
        assert rank0[part], part
        for name, tensor in rank0[part].items():
            assert torch.equal(tensor, rank1[part][name]), f"{part}.{name} differs between ranks"
    assert not torch.equal(rank0["noise"], rank1["noise"])  # but each rank drew its own noise
    # Only rank 0 wrote files.
    assert (tmp_path / "run" / "checkpoints" / "last.pt").exists()
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == 4
