"""Self-describing checkpoints: saved atomically, loaded without ever running code from the file.

A checkpoint is a dict of plain types and tensors, so `torch.load(weights_only=True)` can read it.
Its schema is written once, below: `TrainingState` is what the Trainer fills, `Checkpoint` adds
the header that `save_checkpoint` writes. `medsynth sample CHECKPOINT` needs nothing else.
"""

from __future__ import annotations

import datetime
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import torch

from medsynth import __version__
from medsynth.ada import AdaState
from medsynth.atomic import atomic_write
from medsynth.conditions import ConditionSpec
from medsynth.config import config_from_dict
from medsynth.errors import MedsynthError, one_line_reason
from medsynth.models import Generator3d, build_generator, label_class_count

FORMAT = "medsynth-checkpoint"
# 2: the samples' affine moved from the checkpoint's top level into the plan (`output_affine`).
SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)


class CheckpointError(MedsynthError):
    """A checkpoint is missing, unreadable or incompatible. The message is for the user."""


class RngState(TypedDict, total=False):
    torch_cpu: torch.Tensor  # the global CPU generator (weight init, penalties' random mixes)
    latent: torch.Tensor  # the noise G is trained on
    augment: torch.Tensor  # DiffAugment's draws
    cuda: torch.Tensor  # only on CUDA runs


class DataState(TypedDict):
    epoch: int
    batch: int  # batches of this epoch already used


class GuardState(TypedDict):
    rollbacks: int  # divergence rollbacks so far (each halved the learning rates)
    d_win_streak: int  # consecutive steps on which D has won outright


class ClockState(TypedDict):
    trained_seconds: float  # wall time spent training, summed over resumes (train.max_minutes)


class PrecisionState(TypedDict):
    bf16: bool  # whether the run trains under bf16 autocast
    device_type: str  # "cpu" or "cuda": a resume on another kind of device chooses again


class TrainingState(TypedDict):
    """What the Trainer puts in a checkpoint: all a resume needs, and all sampling needs."""

    step: int
    config: dict[str, Any]  # the full resolved configuration (config_to_dict)
    plan: dict[str, Any]  # Plan.to_dict(): grid, intensity window and its inverse, output affine, label set
    fingerprint: dict[str, Any]  # the dataset's summary (medians, counts); never file names
    world_size: int
    generator: dict[str, torch.Tensor]
    generator_ema: dict[str, torch.Tensor]  # BatchNorm statistics recalibrated: what sampling uses
    discriminator: dict[str, torch.Tensor]
    optimizer_generator: dict[str, Any]
    optimizer_discriminator: dict[str, Any]
    rng: RngState
    data: DataState
    guard: GuardState
    precision: PrecisionState  # absent from checkpoints written before it was recorded
    ada: NotRequired[AdaState]  # adaptive augmentation's probability and controller, when on
    clock: NotRequired[ClockState]  # absent from checkpoints written before it was recorded


class Checkpoint(TrainingState):
    """A checkpoint as saved and loaded: the training state and a header saying what wrote it."""

    format: str  # FORMAT
    schema_version: int
    medsynth_version: str
    torch_version: str
    created: str  # ISO 8601, UTC


def save_checkpoint(path: str | Path, state: TrainingState) -> Path:
    """Write atomically: a crash mid-save leaves the previous file intact, never half a file."""
    payload = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "medsynth_version": __version__,
        "torch_version": str(torch.__version__),  # a str subclass that weights_only loading refuses
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **state,
    }
    return atomic_write(path, lambda handle: torch.save(payload, handle))


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A run folder means its latest checkpoint; a file is taken as is."""
    path = Path(path)
    if path.is_dir():
        last = path / "checkpoints" / "last.pt"
        if not last.exists():
            raise CheckpointError(f"{path}: no checkpoint in this run folder (expected checkpoints/last.pt)")
        return last
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run folder")
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load and validate. Raises CheckpointError naming the file and the problem."""
    path = resolve_checkpoint_path(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's first line suggests retrying with weights_only=False: exactly what must not be
        # done with a stranger's file. Report the actual finding instead.
        text = str(exc)
        found = re.search(r"unsupported global:? (?:GLOBAL )?(\S+)", text, flags=re.IGNORECASE)
        if found:
            raise CheckpointError(
                f"{path}: refused: it holds a Python object ({found.group(1)}) that could run code when loaded, "
                "not only weights; medsynth loads checkpoints with weights_only=True"
            ) from None
        lines = [line.strip() for line in text.splitlines()[1:] if line.strip()]
        lines = [line for line in lines if not line.startswith(("Check the documentation", "Please file an issue"))]
        reason = (lines[0] if lines else "unpickling failed").replace("WeightsUnpickler error:", "").strip()[:160]
        raise CheckpointError(f"{path}: not a readable checkpoint, or corrupt ({reason})") from None
    except (zipfile.BadZipFile, RuntimeError, EOFError, ValueError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint, or corrupt ({one_line_reason(exc, 160)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a medsynth checkpoint")
    version = payload.get("schema_version")
    if version not in READABLE_SCHEMA_VERSIONS:
        raise CheckpointError(
            f"{path}: checkpoint schema version {version} (written by medsynth {payload.get('medsynth_version')}); "
            f"this medsynth {__version__} reads versions {', '.join(map(str, READABLE_SCHEMA_VERSIONS))}"
        )
    missing = [k for k in ("config", "plan", "generator", "step") if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return _upgrade(payload)


def _upgrade(payload: dict[str, Any]) -> Checkpoint:
    """Bring an older schema up to this one, so that the rest of medsynth reads one schema."""
    if payload["schema_version"] == 1:
        # Version 1 kept the samples' affine beside the plan; the plan now carries it.
        affine = payload.pop("sample_affine", None)
        payload["plan"] = {**payload["plan"], "output_affine": affine}
        payload["schema_version"] = 2
    model = payload["config"].setdefault("model", {})
    if "upsample" not in model:
        # Written before model.upsample existed, when every generator was the transposed one; the
        # default is now resize, which would not fit these weights.
        model["upsample"] = "transposed"
    return payload  # type: ignore[return-value]


def generator_from_checkpoint(payload: Checkpoint, use_ema: bool = True) -> Generator3d:
    """The generator a checkpoint describes, with its EMA weights when present, in eval mode: paired
    (image and label map) when the checkpoint's plan has a label set, conditional when it has conditions."""
    config = config_from_dict(payload["config"])
    shape = tuple(payload["plan"]["target_shape"])
    label_classes = label_class_count(payload["plan"].get("label_values"))
    conditions = ConditionSpec.of(payload["plan"].get("conditions"))
    generator = build_generator(config.model, shape, label_classes, conditions)  # type: ignore[arg-type]
    state = payload.get("generator_ema") if use_ema and payload.get("generator_ema") else payload["generator"]
    generator.load_state_dict(state)
    return generator.eval()


def all_finite(*modules: torch.nn.Module) -> bool:
    """False if any parameter or buffer holds NaN or Inf: such weights are never saved."""
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                return False
    return True


def remove_interrupted_writes(folder: Path) -> int:
    """Delete the temporary files of checkpoint writes a kill interrupted; returns how many.

    Only for a run's own checkpoints folder, when its one writer (rank 0) starts: a killed job
    leaves a checkpoint-sized temporary behind, and a job pre-empted many times would fill the disk."""
    removed = 0
    for temporary in folder.glob(".*.tmp"):
        temporary.unlink(missing_ok=True)
        removed += 1
    return removed


def rotate_checkpoints(folder: Path, keep: int) -> None:
    """Keep the `keep` newest numbered checkpoints (step_*.pt); last.pt is never touched."""
    numbered = sorted(folder.glob("step_*.pt"))
    for old in numbered[: max(0, len(numbered) - keep)]:
        old.unlink(missing_ok=True)


def publish_last(folder: Path, numbered: Path) -> Path:
    """Make last.pt the same file as `numbered` (a hard link, replaced atomically; copy if links fail)."""
    last = folder / "last.pt"
    temporary = folder / ".last.pt.tmp"
    temporary.unlink(missing_ok=True)
    try:
        os.link(numbered, temporary)
    except OSError:
        atomic_write(temporary, lambda handle: handle.write(numbered.read_bytes()))
    os.replace(temporary, last)
    return last
