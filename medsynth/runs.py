"""A training run folder: start it, resume it, or refuse to clobber it; then call the Trainer.

    RUN_DIR/
      config.yaml      the resolved configuration       plan.json, fingerprint.json, manifest.json
      metrics.jsonl    one line per step                previews/   real.png, latest.png, step_*.png
      checkpoints/     last.pt and the newest numbered step_*.pt

Running `medsynth train SCAN_DIR -o RUN_DIR` again on a folder that holds a checkpoint resumes it
(a pre-empted cluster job is simply requeued with the same command), as long as nothing that
changes what is learnt differs; otherwise it refuses unless `--force`, which starts over.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medsynth.atomic import atomic_write_bytes, atomic_write_json
from medsynth.checkpoint import CheckpointError, load_checkpoint
from medsynth.conditions import ConditionSpec
from medsynth.config import Config, config_from_dict, config_to_dict
from medsynth.distributed import Runtime, barrier
from medsynth.errors import UsageError
from medsynth.models import label_class_count
from medsynth.pipeline import Progress, prepare_dataset
from medsynth.plan import Plan, format_triple
from medsynth.train import EventCallback, StepCallback, Trainer

# Settings that may change when a run is resumed: they do not change what is being learnt.
RESUMABLE_CHANGES = {
    "train.max_steps",
    "train.max_minutes",
    "train.check_memory",
    "train.activation_checkpointing",
    "train.device",
    "train.amp",
    "train.compile",
    "train.channels_last",
    "train.loader_workers",
    "train.log_every",
    "train.preview_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.on_divergence",
    "train.max_rollbacks",
    "train.d_win_steps",
    "cache.dir",
    "cache.workers",
}
# Settings whose default has changed: (the old default, the new). A run saved under the old default
# (or before the setting existed) and resumed by the same command, which now resolves to the new
# default, keeps the old: its weights were made for it.
CHANGED_DEFAULTS: dict[str, tuple[Any, Any]] = {
    "model.upsample": ("transposed", "resize"),
    "plan.target_shape": ([64, 64, 64], "auto"),
}
RUN_ARTEFACTS = (
    "checkpoints",
    "previews",
    "tensorboard",
    "metrics.jsonl",
    "config.yaml",
    "plan.json",
    "fingerprint.json",
    "manifest.json",
    "init_from.json",
)


class RunRefused(UsageError):
    """The run folder cannot be used as asked (exit 2). The message says why and what to do."""


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(saved: dict[str, Any], current: Config) -> list[str]:
    """Settings that differ between a saved run and now, other than those safe to change on resume."""
    old, new = _flatten(saved), _flatten(config_to_dict(current))
    defaults = _flatten(config_to_dict(Config()))
    keys = sorted(set(old) | set(new))
    return [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in keys
        if old.get(k) != new.get(k)
        and k not in RESUMABLE_CHANGES
        # A setting added since the run was saved, at its default: the run was made without it,
        # which is what its default does (defaults that changed behaviour are CHANGED_DEFAULTS).
        and not (k not in old and new.get(k) == defaults.get(k))
    ]


def keeping_old_defaults(saved: dict[str, Any], current: Config) -> Config:
    """`current`, with each setting of CHANGED_DEFAULTS back at the old default where the saved run
    has the old default and `current` the new one."""
    old, data = _flatten(saved), config_to_dict(current)
    kept = False
    for key, (old_default, new_default) in CHANGED_DEFAULTS.items():
        section, name = key.split(".")
        if old.get(key, old_default) == old_default and data[section][name] == new_default:
            data[section][name] = old_default
            kept = True
    return config_from_dict(data) if kept else current


def clear_run(run_dir: Path) -> None:
    """--force: remove a previous run's artefacts (only those medsynth writes, nothing else)."""
    for name in RUN_ARTEFACTS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def find_resume(run_dir: Path, config: Config, force: bool) -> tuple[dict[str, Any] | None, Config]:
    """(The checkpoint to resume from, or None for a fresh start; the config to train with, which
    keeps the run's old defaults: `keeping_old_defaults`). RunRefused when the folder holds an
    incompatible run and --force was not given."""
    last = run_dir / "checkpoints" / "last.pt"
    if force or not last.exists():
        return None, config
    try:
        payload = load_checkpoint(last)
    except CheckpointError as exc:
        raise RunRefused(f"{exc}. Use --force to start this run over, or another -o folder") from None
    config = keeping_old_defaults(payload["config"], config)
    if config.train.batch_size == "auto":  # the run keeps the batch size auto chose when it started
        config = with_batch_size(config, payload["config"]["train"]["batch_size"])
    differences = config_differences(payload["config"], config)
    if differences:
        listed = "; ".join(differences[:4]) + (f"; and {len(differences) - 4} more" if len(differences) > 4 else "")
        raise RunRefused(
            f"{run_dir} holds a run (step {payload['step']}) with different settings ({listed}). "
            "Use the same settings to resume it, --force to start over, or another -o folder"
        )
    return payload, config


def finished_because(resume: dict[str, Any], config: Config) -> str | None:
    """Why a saved run has nothing left to train under `config`, with how to train on; None if it has."""
    train = config.train
    if resume["step"] >= train.max_steps:
        return f"train.max_steps = {train.max_steps}; raise --max-steps to train on"
    trained = float(resume.get("clock", {}).get("trained_seconds", 0.0))
    if train.max_minutes is not None and trained >= 60 * train.max_minutes:
        return (
            f"{trained / 60:.1f} minutes trained, train.max_minutes = {train.max_minutes:g}; "
            "raise --max-minutes to train on"
        )
    return None


@dataclass
class RunResult:
    run_dir: Path
    step: int
    resumed_from: int | None
    volumes: int
    skipped: int


def _plan_identity(plan: Plan) -> dict[str, Any]:
    """What makes two plans the same plan: everything but where samples are placed and who wrote it."""
    data = plan.to_dict()
    for key in ("output_affine", "medsynth_version"):
        data.pop(key)
    return data


def train_run(
    scan_dir: str | Path,
    run_dir: str | Path,
    config: Config,
    runtime: Runtime,
    force: bool = False,
    progress: Progress | None = None,
    on_step: StepCallback | None = None,
    on_message=None,
    on_event: EventCallback | None = None,
    plan: Plan | None = None,
    init_from: str | Path | None = None,
) -> RunResult:
    """Prepare the data, then train to max_steps.

    `init_from` (a run folder or checkpoint) starts a fresh run from that run's weights (G, its
    EMA, D) with new optimiser states and this data's plan; the model settings and volume shape
    must be the same. A resumed run continues from its own checkpoint and ignores it.

    The plan is, in order of precedence: the checkpoint's when resuming (a given `plan` must then
    be the same one), the given `plan` (`train --plan`, e.g. from `inspect --save-plan`), or one
    derived from the data's fingerprint and `config.plan`.
    """
    import yaml

    run_dir = Path(run_dir)
    say = on_message if (on_message and runtime.is_main) else (lambda message: None)
    resume, config = find_resume(run_dir, config, force)
    if resume:
        saved = Plan.from_dict(resume["plan"])
        if plan is not None and _plan_identity(plan) != _plan_identity(saved):
            raise RunRefused(
                f"{run_dir} holds a run (step {resume['step']}) trained with another plan than --plan gives. "
                "Resume without --plan (the run keeps its own), --force to start over, or another -o folder"
            )
        plan = saved
    if plan is not None and min(plan.target_shape) < 2 * config.model.base_grid:
        raise RunRefused(
            f"the plan's shape {list(plan.target_shape)} is too small for model.base_grid={config.model.base_grid}"
        )
    if runtime.is_main:
        if force and (run_dir / "checkpoints").exists():
            say(f"--force: starting {run_dir} over")
            clear_run(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        finished = finished_because(resume, config)
        if finished:
            say(f"{run_dir} already finished at step {resume['step']} ({finished})")
            return RunResult(run_dir, int(resume["step"]), int(resume["step"]), 0, 0)
        say(f"resuming {run_dir} from step {resume['step']}")
        if init_from is not None:
            say("--init-from applies to a fresh run only: this one continues from its own checkpoint")
            init_from = None
    initial = _initial_weights(init_from, config) if init_from is not None else None

    # Whether a step fits in memory is settled before preprocessing (and `auto` resolved), so a
    # run that cannot train stops before it spends anything.
    fitted: list[Config] = []

    def check_memory(planned: Plan, volumes: int) -> None:
        fitted.append(fit_to_memory(config, planned, runtime, volumes, say))

    # The main process fills the cache and writes the run's records; the others then find the
    # cache warm and take the main process's plan, so every rank trains on the same volumes.
    if runtime.is_main:
        prepared = prepare_dataset(scan_dir, config, progress=progress, plan=plan, before_preprocessing=check_memory)
        config = fitted[0] if fitted else config
        if prepared.plan.label_values and not prepared.labelled:
            raise RunRefused(
                f"the plan has a label set {list(prepared.plan.label_values)} (a paired model) but {scan_dir} brought "
                "no label maps: give --labels, or a plan made without them"
            )
        if prepared.plan.conditions and prepared.condition_codes is None:
            names = ", ".join(c["name"] for c in prepared.plan.conditions)
            raise RunRefused(
                f"the plan has conditions ({names}) but none were given: give --conditions TABLE (or "
                "--class-folders), or a plan made without them"
            )
        n_before = resume.get("fingerprint", {}).get("n_volumes") if resume else None
        if n_before not in (None, len(prepared.entries)):
            say(f"warning: the data changed since the run started ({n_before} -> {len(prepared.entries)} volumes)")
        fingerprint = prepared.fingerprint.to_dict()
        fingerprint["n_volumes"] = len(prepared.entries)
        atomic_write_bytes(run_dir / "config.yaml", yaml.safe_dump(config_to_dict(config), sort_keys=False).encode())
        prepared.plan.save(run_dir / "plan.json")
        atomic_write_json(run_dir / "fingerprint.json", fingerprint)
        atomic_write_json(run_dir / "manifest.json", prepared.manifest())
    barrier(runtime)
    if not runtime.is_main:
        prepared = prepare_dataset(scan_dir, config, plan=Plan.load(run_dir / "plan.json"))
        fingerprint = json.loads((run_dir / "fingerprint.json").read_text())
        if config.train.batch_size == "auto":  # as the main process chose it
            config = with_batch_size(
                config, yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["batch_size"]
            )

    trainer = Trainer(
        config,
        prepared.plan,
        [entry.path for entry in prepared.entries],
        run_dir,
        runtime,
        fingerprint=fingerprint,
        resume=resume,
        on_step=on_step,
        on_event=on_event,
        # With a label set, every entry has its label map (pipeline.unlabeled_images saw to that).
        label_paths=[entry.label_path for entry in prepared.entries] if prepared.plan.label_values else None,  # type: ignore[misc]
        condition_codes=prepared.condition_codes,
    )
    if initial is not None:
        source, payload = initial
        if list(payload["plan"]["target_shape"]) != list(prepared.plan.target_shape):
            raise RunRefused(
                f"--init-from {source}: its volumes are {format_triple(payload['plan']['target_shape'], 0)}, this "
                f"plan's are {format_triple(prepared.plan.target_shape, 0)}; set plan.target_shape to match"
            )
        theirs, ours = payload["plan"].get("label_values"), prepared.plan.label_values
        if label_class_count(theirs) != label_class_count(ours):
            raise RunRefused(
                f"--init-from {source}: its model makes {_label_set_words(theirs)}, this run's makes "
                f"{_label_set_words(ours)}; start from a run with the same number of label classes"
            )
        theirs_conditions = ConditionSpec.of(payload["plan"].get("conditions"))
        if theirs_conditions != ConditionSpec.of(prepared.plan.conditions):
            raise RunRefused(
                f"--init-from {source}: its model takes conditions {theirs_conditions or 'none'}, this run's "
                f"{ConditionSpec.of(prepared.plan.conditions) or 'none'}; start from a run with the same conditions"
            )
        trainer.load_weights(payload)
        if runtime.is_main:
            atomic_write_json(
                run_dir / "init_from.json",
                {"checkpoint": str(source.resolve()), "step": int(payload["step"]), "plan": payload["plan"]},
            )
        say(f"starting from the weights of {source} (step {payload['step']}), with new optimiser states")
    say(
        f"training on {len(prepared.entries)} volumes of {format_triple(prepared.plan.target_shape, 0)} "
        f"at {prepared.plan.spacing[0]:g} mm"
        + (f" with {_label_set_words(prepared.plan.label_values)}" if prepared.plan.label_values else "")
        + (f", conditioned on {_conditions_words(prepared)}" if prepared.conditions is not None else "")
        + f", {runtime.world_size} process(es) on {runtime.device}, {trainer.precision.reason}"
    )
    if trainer.precision.warning and runtime.is_main:
        (on_event or say)(trainer.precision.warning)
    if config.train.max_minutes is not None:
        left = config.train.max_minutes - trainer.trained_seconds() / 60
        say(
            f"time budget: {left:.1f} of {config.train.max_minutes:g} minutes of training left (train.max_minutes)"
            + (
                f"; the checkpoint at step {trainer.step} was written before medsynth kept a training clock,"
                " so the training before it is not counted"
                if trainer.clock_missing
                else ""
            )
        )
    step = trainer.fit()
    return RunResult(
        run_dir, step, int(resume["step"]) if resume else None, len(prepared.entries), len(prepared.skipped)
    )


def with_batch_size(config: Config, batch_size: int) -> Config:
    from medsynth.config import replace

    return replace(config, train=replace(config.train, batch_size=int(batch_size)))


def fit_to_memory(config: Config, plan: Plan, runtime: Runtime, volumes: int, say=lambda message: None) -> Config:
    """`config` with `train.batch_size: auto` resolved to the largest batch that fits, after
    checking that a training step fits in this device's memory; RunRefused, with a batch size or
    the settings that would fit, where it does not. The step is measured (`memory.plan_memory`)
    where the batch is auto or the cheap screen says it may take more than a quarter of the memory
    available; plainly small runs are not probed. `train.check_memory: false` skips all of it."""
    from medsynth import memory

    asked = config.train.batch_size
    if not config.train.check_memory and asked != "auto":
        return config
    device = str(runtime.device)
    # CPU processes of one machine share its memory; each GPU has its own.
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if runtime.device.type == "cpu" else 1
    if asked != "auto":
        available = memory.available_bytes(device) // processes
        if memory.estimate_step_bytes(config, plan, asked) <= memory.PROBE_ABOVE * available:
            return config
    say(
        f"measuring one training step's memory at {format_triple(plan.target_shape, 0)} (a few steps in a child process)"
    )

    config, planned, note = memory.plan_to_fit(
        config, plan, device, volumes, world_size=runtime.world_size, processes=processes
    )
    if note:
        say(note)
    if not planned.fits:
        raise RunRefused(memory.refusal(planned, config))
    if asked == "auto":
        say(f"train.batch_size auto: {planned.batch_size}, {memory.describe_planned(planned)}")
        return with_batch_size(config, planned.batch_size)
    return config


def _conditions_words(prepared) -> str:
    """How a run's conditions read in a message: "Age (continuous), Sex (F, M); 4 volumes with a
    condition unknown"."""
    columns = [
        f"{c['name']} ({'continuous' if c['kind'] == 'continuous' else ', '.join(c['categories'])})"
        for c in prepared.plan.conditions
    ]
    unknown = sum(any(v is None for v in row.values()) for row in prepared.conditions.values)
    return ", ".join(columns) + (f"; {unknown} volume(s) with a condition unknown" if unknown else "")


def _label_set_words(label_values) -> str:
    """How a run's label set reads in a message: "label maps of 3 classes (values 0, 1, 2)"."""
    if not label_values:
        return "images without label maps"
    return f"label maps of {len(label_values)} classes (values {', '.join(map(str, label_values))})"


def _initial_weights(init_from: str | Path, config: Config) -> tuple[Path, dict[str, Any]]:
    """The checkpoint --init-from names, checked for the same model settings as this run's."""
    from medsynth.checkpoint import resolve_checkpoint_path

    try:
        source = resolve_checkpoint_path(init_from)
        payload = load_checkpoint(source)
    except CheckpointError as exc:
        raise RunRefused(f"--init-from: {exc}") from None
    differences = [d for d in config_differences(payload["config"], config) if d.startswith("model.")]
    if differences:
        raise RunRefused(
            f"--init-from {source}: its model differs from this run's ({'; '.join(differences[:4])}); "
            "use the same model settings to start from its weights"
        )
    return source, payload


def describe_models(config: Config, plan: Plan) -> dict[str, Any]:
    """What `--dry-run` prints: sizes and compute of G and D for this plan."""
    import torch

    from medsynth.models import build_models, forward_flops, label_class_count, parameter_count

    label_classes = label_class_count(plan.label_values)
    conditions = ConditionSpec.of(plan.conditions)
    generator, discriminator = build_models(config.model, plan.target_shape, label_classes, conditions)
    z = torch.zeros(1, config.model.latent_dim)
    volume = torch.zeros(1, config.model.pack * (1 + label_classes), *plan.target_shape)
    if config.model.hierarchical_slabs:  # a training step's views (medsynth.hierarchical), not whole volumes
        from medsynth.hierarchical import view_shapes

        pack = config.model.pack
        low_shape, slab_shape = view_shapes(plan.target_shape, config.model.hierarchical_slabs)
        low, detail = torch.zeros(1, pack, *low_shape), torch.zeros(1, 2 * pack, *slab_shape)
        g_flops = forward_flops(generator, (z, None, 0))
        d_flops = forward_flops(discriminator, (low, detail)) / pack
    elif conditions:  # unknown conditions: the codes' values do not change the count
        codes = torch.zeros(1, conditions.width)
        g_flops = forward_flops(generator, (z, codes))
        d_flops = forward_flops(discriminator, (volume, codes.expand(config.model.pack, -1)[None])) / config.model.pack
    else:
        g_flops = forward_flops(generator, z)
        d_flops = forward_flops(discriminator, volume) / config.model.pack  # per volume judged
    batch = config.train.batch_size
    # A step: D sees m real and m fake (G forward without grad), then G trains through D. Backward
    # costs about twice the forward. With loss.share_fake, the D update reuses G's forward for the
    # G update, so it costs no G forward of its own. R1 is not counted: it is overhead, not the game.
    shared = config.loss.share_fake and config.loss.d_steps_per_g == 1
    d_step = batch * ((0 if shared else g_flops) + 3 * 2 * d_flops)
    g_step = batch * 3 * (g_flops + d_flops)
    return {
        "volume_shape": list(plan.target_shape),
        "generator_parameters": parameter_count(generator),
        "discriminator_parameters": parameter_count(discriminator),
        "generator_gflops_per_volume": g_flops / 1e9,
        "discriminator_gflops_per_volume": d_flops / 1e9,
        "gflops_per_step": (config.loss.d_steps_per_g * d_step + g_step) / 1e9,
        "batch_size": batch,
    }


def time_training_step(config: Config, plan: Plan, runtime: Runtime, amp: str, steps: int = 2) -> float:
    """Seconds of one real training step (D and G updates and the EMA) at the configured shape,
    width and batch, in precision `amp` ("off" or "bf16"), on random volumes: the median of
    `steps` steps after a warm-up step."""
    import tempfile

    from medsynth.config import replace
    from medsynth.memory import random_volume_trainer
    from medsynth.precision import median_seconds

    with tempfile.TemporaryDirectory() as tmp:
        timed = replace(config, train=replace(config.train, amp=amp))
        trainer = random_volume_trainer(timed, plan, runtime, Path(tmp))
        try:
            return median_seconds(trainer.train_step, steps, runtime.device)
        finally:
            trainer.metrics.close()
