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
from helpers import CONFIGS, cpu_runtime
from helpers import tiny_config as tiny
from reliability_report import record as record_reliability

from medsynth.checkpoint import load_checkpoint
from medsynth.config import ConfigError
from medsynth.metrics import read_metrics
from medsynth.pipeline import prepare_dataset
from medsynth.precision import cpu_has_native_bf16
from medsynth.runs import RunRefused, train_run
from medsynth.train import Trainer, TrainingStopped

CPU = cpu_runtime()


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
        for k in (
            "generator",
            "generator_ema",
            "discriminator",
            "optimizer_generator",
            "optimizer_discriminator",
            "ada",
        )
        if k in payload
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
    "overrides",
    [
        (),
        ("augment.intensity_jitter=0.1", "loss.r1_gamma=1.0", "loss.d_steps_per_g=2"),
        ("loss.r1_interval=3", "loss.share_fake=true"),
        # p moves every D update, by a quarter: the augmentations are on well before the resume.
        ("augment.ada=true", "augment.ada_images_to_full=8", "augment.ada_interval=1", "augment.ada_target=0.01"),
    ],
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
    if "augment.ada=true" in overrides:
        assert max(r["ada_p"] for r in whole[:5]) > 0  # augmenting before the resume point


def test_a_time_budget_ends_the_run_and_counts_over_resumes(phantom_dir, tmp_path):
    """train.max_minutes: the run stops after the first step past the budget, checkpointed and
    previewed as at max_steps; the clock is saved, so a resume under the same budget has nothing
    left to do, and a larger budget trains on."""
    said: list[str] = []
    budget = ("train.max_steps=50", "train.max_minutes=0.0001")  # 6 ms: spent within the first step
    result = train_run(phantom_dir, tmp_path / "run", tiny(*budget), CPU)
    assert result.step == 1
    payload = load_checkpoint(tmp_path / "run")
    assert payload["step"] == 1 and payload["clock"]["trained_seconds"] >= 0.006
    assert (tmp_path / "run" / "checkpoints" / "step_00000001.pt").exists()
    assert (tmp_path / "run" / "previews" / "step_00000001.png").exists()
    again = train_run(phantom_dir, tmp_path / "run", tiny(*budget), CPU, on_message=said.append)
    assert again.step == 1 and again.volumes == 0
    assert any("already finished at step 1" in line and "--max-minutes" in line for line in said)
    more = train_run(phantom_dir, tmp_path / "run", tiny("train.max_steps=3", "train.max_minutes=60"), CPU)
    assert more.resumed_from == 1 and more.step == 3
    assert load_checkpoint(tmp_path / "run")["clock"]["trained_seconds"] > payload["clock"]["trained_seconds"]


def test_a_checkpoint_without_a_clock_resumes_and_says_its_time_is_not_counted(phantom_dir, tmp_path):
    """Checkpoints written before the training clock existed resume with the whole budget left,
    and the budget line says so instead of implying a fresh run."""
    train_run(phantom_dir, tmp_path / "run", tiny("train.max_steps=1"), CPU)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    payload = torch.load(last, weights_only=False)
    del payload["clock"]
    torch.save(payload, last)
    said: list[str] = []
    more = train_run(
        phantom_dir, tmp_path / "run", tiny("train.max_steps=2", "train.max_minutes=60"), CPU, on_message=said.append
    )
    assert more.resumed_from == 1 and more.step == 2
    budget = next(line for line in said if line.startswith("time budget"))
    assert "60.0 of 60 minutes" in budget and "step 1 was written before medsynth kept a training clock" in budget


def test_the_progress_line_counts_down_a_time_budget(capsys):
    from medsynth.console import TrainingDisplay

    display = TrainingDisplay(20000, log_every=10, max_minutes=60)
    display(1, {"loss_d": 1.0, "loss_g": 1.0, "trained_s": 1.0})
    display.started -= 900  # 9 steps in 15 minutes: the steps would take days, the budget has 1 minute left
    display(10, {"loss_d": 1.0, "loss_g": 1.0, "trained_s": 3540.0})
    assert "step 10/20000" in (line := capsys.readouterr().err) and "eta 1m00s" in line


def test_existing_run_with_other_settings_is_refused_unless_forced(phantom_dir, tmp_path):
    train_run(phantom_dir, tmp_path / "run", tiny("train.max_steps=2"), CPU)
    with pytest.raises(RunRefused, match="model.base_channels"):
        train_run(phantom_dir, tmp_path / "run", tiny("train.max_steps=2", "model.base_channels=8"), CPU)
    forced = train_run(
        phantom_dir, tmp_path / "run", tiny("train.max_steps=2", "model.base_channels=8"), CPU, force=True
    )
    assert forced.resumed_from is None and load_checkpoint(tmp_path / "run")["config"]["model"]["base_channels"] == 8


def test_a_run_made_under_an_old_default_resumes_with_it(phantom_dir, tmp_path):
    """model.upsample's default changed from transposed to resize: a run started under the old
    default resumes, by the same command, with its own generator, not refused or rebuilt."""
    train_run(phantom_dir, tmp_path / "run", tiny("train.max_steps=2", "model.upsample=transposed"), CPU)
    resumed = train_run(phantom_dir, tmp_path / "run", tiny("train.max_steps=3"), CPU)
    assert resumed.resumed_from == 2 and resumed.step == 3
    assert load_checkpoint(tmp_path / "run")["config"]["model"]["upsample"] == "transposed"
    with pytest.raises(RunRefused, match="model.upsample"):  # asked for by name, it is not the run's
        train_run(phantom_dir, tmp_path / "run", tiny("train.max_steps=4", "model.upsample=pixel_shuffle"), CPU)


def test_corrupt_last_checkpoint_is_refused_clearly(phantom_dir, tmp_path):
    train_run(phantom_dir, tmp_path / "run", tiny("train.max_steps=2"), CPU)
    (tmp_path / "run" / "checkpoints" / "last.pt").write_bytes(b"garbage")
    with pytest.raises(RunRefused, match="not a readable checkpoint"):
        train_run(phantom_dir, tmp_path / "run", tiny("train.max_steps=4"), CPU)


def _trainer(phantom_dir, run_dir, config, trainer_class=Trainer, **kwargs) -> Trainer:
    prepared = prepare_dataset(phantom_dir, config)
    return trainer_class(config, prepared.plan, [e.path for e in prepared.entries], run_dir, CPU, **kwargs)


class PoisonedTrainer(Trainer):
    """Poisons D's weights once, during the D update that makes step `poison_step`."""

    poison_step = 5
    poisoned = False

    def update_discriminator(self, real, *args, **kwargs):
        record = super().update_discriminator(real, *args, **kwargs)
        if self.step + 1 == self.poison_step and not self.poisoned:
            self.poisoned = True
            with torch.no_grad():
                next(self.discriminator.parameters()).fill_(float("nan"))  # D's weights are now NaN
            record["loss_d"] = float("nan")
        return record


class OverconfidentTrainer(Trainer):
    """Reports D as winning outright on every step."""

    def update_discriminator(self, real, *args, **kwargs):
        return {**super().update_discriminator(real, *args, **kwargs), "d_real": 0.999, "d_fake": 0.001}


def test_divergence_guard_stops_without_saving_nan_weights(phantom_dir, tmp_path):
    config = tiny("train.on_divergence=stop", "train.max_steps=8")
    trainer = _trainer(phantom_dir, tmp_path / "run", config, PoisonedTrainer)
    with pytest.raises(TrainingStopped, match="non-finite loss at step 5") as stopped:
        trainer.fit()
    assert "last good checkpoint is step 3" in str(stopped.value)
    for path in (tmp_path / "run" / "checkpoints").glob("*.pt"):
        payload = load_checkpoint(path)
        assert all(torch.isfinite(t).all() for t in payload["discriminator"].values() if t.is_floating_point())


def test_divergence_guard_rolls_back_and_carries_on(phantom_dir, tmp_path):
    events, steps = [], []
    trainer = _trainer(
        phantom_dir,
        tmp_path / "run",
        tiny("train.max_steps=8"),
        PoisonedTrainer,
        on_event=events.append,
        on_step=lambda step, record: steps.append(step),
    )
    assert trainer.fit() == 8
    assert len(events) == 1 and "rolled back to step 3" in events[0]
    assert steps == [1, 2, 3, 4, 4, 5, 6, 7, 8]  # step 5 diverged: back to 3, then 4 again; events are not steps
    assert trainer.rollbacks == 1 and trainer.opt_d.param_groups[0]["lr"] == pytest.approx(1e-4)
    assert all(torch.isfinite(p).all() for p in trainer.discriminator.parameters())


def test_d_winning_for_long_triggers_the_guard(phantom_dir, tmp_path):
    config = tiny("train.on_divergence=stop", "train.d_win_steps=2")
    trainer = _trainer(phantom_dir, tmp_path / "run", config, OverconfidentTrainer)
    with pytest.raises(TrainingStopped, match="the discriminator has won"):
        trainer.fit()


# Every way D can be called, with every stabiliser: two steps each. wgan_gp with pack 2 crashed on
# step 1 when the gradient penalty called D on unpacked volumes.
PRECISIONS = ["off", "bf16"] if cpu_has_native_bf16() else ["off"]


@pytest.fixture(scope="module")
def prepared_phantoms(phantom_dir, tmp_path_factory):
    return prepare_dataset(phantom_dir, tiny(), cache_dir=tmp_path_factory.mktemp("smoke-cache"))


@pytest.mark.parametrize("amp", PRECISIONS)
@pytest.mark.parametrize("diff_augment", ["", "translation,cutout,contrast"])
@pytest.mark.parametrize("pack", [1, 2])
@pytest.mark.parametrize("loss", ["non_saturating", "hinge", "wgan_gp"])
def test_two_steps_train_with_every_loss_pack_augmentation_and_precision(
    prepared_phantoms, tmp_path, loss, pack, diff_augment, amp
):
    config = tiny(
        f"loss.name={loss}", f"model.pack={pack}", f"augment.diff_augment={diff_augment}", f"train.amp='{amp}'"
    )
    paths = [e.path for e in prepared_phantoms.entries]
    trainer = Trainer(config, prepared_phantoms.plan, paths, tmp_path / "run", CPU)
    before_g = [p.detach().clone() for p in trainer.generator.parameters()]
    before_d = [p.detach().clone() for p in trainer.discriminator.parameters()]
    for _ in range(2):
        record = trainer.train_step()
    assert all(torch.isfinite(torch.tensor(v)) for v in record.values()), record
    assert ("gradient_penalty" in record) == (loss == "wgan_gp")
    assert any(not torch.equal(a, b) for a, b in zip(before_g, trainer.generator.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before_d, trainer.discriminator.parameters()))


def test_every_discriminator_call_goes_through_run_discriminator(prepared_phantoms, tmp_path):
    """Real, fake, R1, the gradient penalty and the G step: all packed and augmented alike."""
    seen = []

    class Recording(Trainer):
        def run_discriminator(self, volumes, discriminator, codes=None):
            updating_d = next(discriminator.parameters()).requires_grad  # D is frozen in the G step
            seen.append((tuple(volumes.shape), updating_d))
            return super().run_discriminator(volumes, discriminator, codes)

    config = tiny("loss.name=wgan_gp", "loss.r1_gamma=1", "model.pack=2", "augment.diff_augment=translation")
    Recording(config, prepared_phantoms.plan, [e.path for e in prepared_phantoms.entries], tmp_path, CPU).train_step()
    volume = (2, 1, 16, 16, 16)
    # D step: real, fake, interpolates for the penalty; G step: fakes through the frozen D.
    assert seen == [(volume, True), (volume, True), (volume, True), (volume, False)]


def test_lazy_r1_falls_on_every_nth_update_and_a_shared_fake_skips_a_g_forward(prepared_phantoms, tmp_path):
    forwards = []

    class Counting(Trainer):
        def generate_for_update(self, batch, codes=None):
            forwards.append(self.step)
            return super().generate_for_update(batch, codes)

    paths = [e.path for e in prepared_phantoms.entries]
    config = tiny("loss.r1_interval=2", "loss.share_fake=true")
    trainer = Counting(config, prepared_phantoms.plan, paths, tmp_path, CPU)
    records = [trainer.train_step() for _ in range(4)]
    assert ["r1" in r for r in records] == [True, False, True, False]
    assert forwards == [0, 1, 2, 3]  # one G forward with gradients per step, shared by D's update
    d_fakes = []

    class Watching(Trainer):
        def update_discriminator(self, real, fake=None, with_r1=True, codes=None):
            d_fakes.append(fake)
            return super().update_discriminator(real, fake, with_r1, codes)

    Watching(tiny(), prepared_phantoms.plan, paths, tmp_path / "b", CPU).train_step()
    assert d_fakes == [None]  # unshared (the default): D's fakes come from fresh noise without gradients


def test_pack_must_divide_the_batch_before_anything_runs():
    with pytest.raises(ConfigError, match=r"train.batch_size \(3\) must be a multiple of model.pack \(2\)"):
        tiny("train.batch_size=3", "model.pack=2")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_on_cuda_trains_and_resumes_bit_identically(phantom_dir, tmp_path):
    from medsynth.distributed import Runtime

    cuda = Runtime(device=torch.device("cuda"))
    common = ("train.amp=bf16", "train.checkpoint_every=100", "train.preview_every=100")
    train_run(phantom_dir, tmp_path / "whole", tiny("train.max_steps=6", *common), cuda)
    train_run(phantom_dir, tmp_path / "split", tiny("train.max_steps=3", *common), cuda)
    train_run(phantom_dir, tmp_path / "split", tiny("train.max_steps=6", *common), cuda)
    _assert_identical(_state(tmp_path / "whole"), _state(tmp_path / "split"))


def _cli(*args, env=None, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "medsynth", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        **kwargs,
    )


# One handler serves all three (train.StopSignals); the default suite sends the scheduler's one.
@pytest.mark.parametrize(
    "signum",
    [
        signal.SIGTERM,
        pytest.param(signal.SIGINT, marks=pytest.mark.slow),
        pytest.param(signal.SIGUSR1, marks=pytest.mark.slow),
    ],
)
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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_parameters_worker(rank: int, world: int, port: int, phantom_dir: str, out_dir: str) -> None:
    from medsynth import distributed
    from medsynth.pipeline import prepare_dataset

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


def test_train_uses_the_plan_inspect_saved_and_a_resume_refuses_another(run_cli, phantom_dir, tmp_path):
    from medsynth.plan import Plan

    saved = tmp_path / "plan.json"
    code, _, err = run_cli("inspect", phantom_dir, "--config", CONFIGS / "tiny.yaml", "--set", "plan.spacing=[9,9,9]",
                           "--save-plan", saved)  # fmt: skip
    assert code == 0, err
    train = ("train", phantom_dir, "-o", tmp_path / "run", "--config", CONFIGS / "tiny.yaml", "--max-steps", "1")
    code, _, err = run_cli(*train, "--plan", saved)
    assert code == 0, err
    used = Plan.load(tmp_path / "run" / "plan.json")
    assert used.spacing == (9.0, 9.0, 9.0) and used.output_affine is not None  # placed after preprocessing
    assert Plan.from_dict(load_checkpoint(tmp_path / "run")["plan"]) == used
    other = Plan.load(saved).to_dict() | {"spacing": [7.0, 7.0, 7.0]}
    (tmp_path / "other.json").write_text(json.dumps(other))
    code, _, err = run_cli(*train[:-1], "2", "--plan", tmp_path / "other.json")
    assert code == 2 and "another plan" in err and "Traceback" not in err
    code, _, err = run_cli(*train[:-1], "2", "--plan", saved)  # the same plan resumes
    assert code == 0 and "resuming" in err
    (tmp_path / "broken.json").write_text("{")
    code, _, err = run_cli(*train, "--plan", tmp_path / "broken.json")
    assert code == 1 and "broken.json: not a plan" in err


def test_init_from_starts_with_the_other_runs_weights_and_fresh_optimisers(run_cli, phantom_dir, tmp_path):
    tiny_cli = ("--config", CONFIGS / "tiny.yaml")
    code, _, err = run_cli("train", phantom_dir, "-o", tmp_path / "base", *tiny_cli, "--max-steps", "2")
    assert code == 0, err
    base = load_checkpoint(tmp_path / "base")
    code, _, err = run_cli("train", phantom_dir, "-o", tmp_path / "tuned", *tiny_cli, "--max-steps", "1",
                           "--init-from", tmp_path / "base")  # fmt: skip
    assert code == 0 and "starting from the weights of" in err, err
    start = load_checkpoint(tmp_path / "tuned" / "checkpoints" / "step_00000000.pt")
    for part in ("generator", "generator_ema", "discriminator"):
        for name, tensor in base[part].items():
            assert torch.equal(tensor, start[part][name]), f"{part}.{name} was not taken over"
    assert start["step"] == 0 and not start["optimizer_generator"]["state"]  # new optimiser, no moments yet
    assert json.loads((tmp_path / "tuned" / "init_from.json").read_text())["step"] == 2
    # A resumed run continues from its own checkpoint.
    code, _, err = run_cli("train", phantom_dir, "-o", tmp_path / "tuned", *tiny_cli, "--max-steps", "2",
                           "--init-from", tmp_path / "base")  # fmt: skip
    assert code == 0 and "fresh run only" in err
    # Another model cannot lend its weights.
    code, _, err = run_cli("train", phantom_dir, "-o", tmp_path / "wide", *tiny_cli, "--max-steps", "1",
                           "--set", "model.latent_dim=5", "--init-from", tmp_path / "base")  # fmt: skip
    assert code == 2 and "model.latent_dim" in err and "Traceback" not in err
    assert not (tmp_path / "wide" / "checkpoints").exists()
