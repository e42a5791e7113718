"""Synthetic volumes from a checkpoint: generator -> real units -> files with real geometry.

Sample i of a request uses its own noise, drawn from a generator seeded by (seed, i), so the same
seed gives the same files whether they are made in one job or in many shards, in any order. The
network always runs on micro-batches of `MICROBATCH` latents (the last one padded): convolution
kernels take different code paths for different batch sizes, which changes the last bits of the
output, so a fixed micro-batch is what makes the voxels independent of `--batch-size`.

Every volume is written atomically with a JSON sidecar (seed, checkpoint hash, step, version,
command line); a sidecar is written only after its volume, so "sidecar present" means "done", and
a re-run skips finished samples and redoes interrupted ones.

A paired model (its plan has a label set) makes each volume with its label map: `name_label.nii.gz`
beside `name.nii.gz`, on the same grid and affine, holding the label VALUES of the plan (uint8
while they fit), made by the same forward pass, so (seed, i) fixes both. The sidecar and the
manifest name the label file and the label set. With `--format dicom` the image is a DICOM series
as usual and its label map is still NIfTI beside it (`sample_00000_label.nii.gz`): a DICOM SEG
writer is not part of medsynth, and nnU-Net and most segmentation tools read NIfTI label maps.

With `--format nnunet` a paired model's samples become an nnU-Net v2 raw dataset: `-o` is the
nnUNet_raw folder, and `medsynth.nnunet.NnUNetRawWriter` writes `DatasetNNN_Name/imagesTr/
synth_00000_0000.nii.gz` and `labelsTr/synth_00000.nii.gz` (the same voxels and affine as the NIfTI
format's sample 0) and dataset.json. The sidecars and manifest.json go in the dataset's `medsynth/`
folder, which nnU-Net never looks into (it reads dataset.json, imagesTr and labelsTr), and name the
case files relative to themselves (`../imagesTr/...`). Shards write into one dataset folder; the
last one to complete the set checks it with `verify_nnunet_dataset`.

A conditional model (its plan has conditions) makes each file at conditions the user gives, in the
table's own units (`medsynth.conditions.sample_conditions`): file j uses the noise of latent
`latent_index[j]` (j itself, except in a sweep, where every latent is made at every value) and
its conditions, both recorded in its sidecar and the manifest; (seed, latent, conditions) fixes
the voxels, whatever the shard or batch size.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsynth import __version__
from medsynth.atomic import atomic_write_json
from medsynth.checkpoint import generator_from_checkpoint, load_checkpoint, resolve_checkpoint_path
from medsynth.conditions import sample_conditions
from medsynth.config import config_from_dict
from medsynth.errors import MedsynthError, UsageError, WriteError
from medsynth.io import Volume, cast_for_storage, file_sha256, write_dicom_series, write_nifti
from medsynth.models import sample_latent, split_pairs
from medsynth.nnunet import (
    NnUNetRawWriter,
    channel_name_for_modality,
    dataset_folder_name,
    scan_cases,
    verify_nnunet_dataset,
)
from medsynth.plan import Plan

MICROBATCH = 4
SYNTHETIC_DESCRIPTION = f"SYNTHETIC medsynth {__version__}"
FORMATS = ("nifti", "dicom", "nnunet")
# nnU-Net's published datasets use ids below 500; 500-999 are left for the user's own.
DEFAULT_NNUNET_DATASET_ID = 900
NNUNET_RECORDS_FOLDER = "medsynth"  # in the dataset folder: sidecars, manifest.json, preview.png


class SampleError(MedsynthError):
    """A sampling request cannot be carried out. The message is for the user."""


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample `index` of a request with `seed`, independent of every other index."""
    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def latent_for(seed: int, index: int, latent_dim: int, prior: str) -> torch.Tensor:
    """The noise of one sample, (latent_dim,), drawn on the CPU so that it is the same on every device."""
    generator = torch.Generator().manual_seed(sample_seed(seed, index))
    return sample_latent(1, latent_dim, prior, generator, "cpu")[0]


def _padded(chunk: torch.Tensor) -> torch.Tensor:
    """A micro-batch padded with zero rows to MICROBATCH, so every forward pass has the same size."""
    missing = MICROBATCH - chunk.shape[0]
    return torch.cat([chunk, torch.zeros(missing, *chunk.shape[1:], dtype=chunk.dtype)]) if missing else chunk


@torch.no_grad()
def generate_pairs(
    generator: torch.nn.Module,
    latents: torch.Tensor,
    device: torch.device,
    label_values: tuple[int, ...] | None,
    codes: torch.Tensor | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(N, latent_dim) -> (N, X, Y, Z) float32 in [-1, 1], and with a label set the label maps of the
    same forward pass, (N, X, Y, Z) int64 label values (else None); in fixed micro-batches. A
    conditional generator takes each latent's condition codes, `codes` (N, width)."""
    images, label_maps = [], []
    for start in range(0, latents.shape[0], MICROBATCH):
        chunk = latents[start : start + MICROBATCH]
        real_rows = chunk.shape[0]
        inputs = [_padded(chunk).to(device)]
        if codes is not None:
            inputs.append(_padded(codes[start : start + MICROBATCH]).to(device))
        volumes, labels = split_pairs(generator(*inputs).float()[:real_rows], label_values)  # (rows, X, Y, Z)
        images.append(volumes.cpu().numpy())
        if labels is not None:
            label_maps.append(labels.cpu().numpy())
    if not images:
        return np.zeros((0,), dtype=np.float32), None
    return np.concatenate(images), np.concatenate(label_maps) if label_maps else None


def generate(generator: torch.nn.Module, latents: torch.Tensor, device: torch.device) -> np.ndarray:
    """(N, latent_dim) -> (N, X, Y, Z) float32 in [-1, 1], in fixed micro-batches: the images alone."""
    return generate_pairs(generator, latents, device, None)[0]


def label_dtype(label_values: tuple[int, ...]) -> str:
    """The integer type label maps are written in: uint8 while the values fit, else uint16."""
    return "uint8" if max(label_values) <= 255 else "uint16"


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str | None) -> Shard:
        if not text:
            return cls(0, 1)
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise UsageError(f"--shard expects i/k, e.g. 0/4, got {text!r}") from None
        if count < 1 or not 0 <= index < count:
            raise UsageError(f"--shard {text}: need 0 <= i < k")
        return cls(index, count)

    def indices(self, n: int) -> list[int]:
        """Sample indices of this shard: every k-th, so shards finish together."""
        return list(range(self.index, n, self.count))


@dataclass
class SampleRequest:
    checkpoint: Path
    count: int | None  # None: one volume per row of `conditions_table`
    out_dir: Path
    seed: int = 0
    batch_size: int = 8
    device: torch.device = torch.device("cpu")
    file_format: str = "nifti"
    shard: Shard = Shard(0, 1)
    force: bool = False
    preview: bool = False
    # --format nnunet only: the dataset's id and name (None: DEFAULT_NNUNET_DATASET_ID, and a name
    # made from the run folder's, `default_dataset_name`).
    dataset_id: int | None = None
    dataset_name: str | None = None
    # A conditional model's conditions (medsynth.conditions.sample_conditions): NAME=VALUE or
    # NAME=START:STOP:COUNT words, and/or a table with one row per volume.
    conditions: tuple[str, ...] = ()
    conditions_table: Path | None = None
    allow_extrapolation: bool = False


def _prefix(file_format: str) -> str:
    """What sample names start with. An nnU-Net case says it is synthetic in its identifier, which
    nnU-Net carries into its splits and predictions, where it may sit beside real cases."""
    return "synth" if file_format == "nnunet" else "sample"


def _stem(index: int, file_format: str) -> str:
    """Sample `index`'s name, without an ending: its files, its sidecar, its nnU-Net case."""
    return f"{_prefix(file_format)}_{index:05d}"


def _name(index: int, file_format: str) -> str:
    return f"sample_{index:05d}" + (".nii.gz" if file_format == "nifti" else "")


def _label_name(index: int) -> str:
    """The label map's file beside its image (NIfTI for either format of the image)."""
    return f"sample_{index:05d}_label.nii.gz"


def _sidecar_path(records_dir: Path, index: int, file_format: str) -> Path:
    return records_dir / f"{_stem(index, file_format)}.json"


def default_dataset_name(checkpoint_path: Path) -> str:
    """An nnU-Net dataset name from the run folder's name (or a lone checkpoint file's):
    runs/hippo -> "SyntheticHippo", runs/brain-mri.v2 -> "SyntheticBrainMriV2"."""
    run_dir = checkpoint_path.parent.parent if checkpoint_path.parent.name == "checkpoints" else None
    source = run_dir.resolve().name if run_dir is not None else checkpoint_path.stem
    words = re.split(r"[^A-Za-z0-9]+", source)  # nnU-Net takes letters, digits and _ only
    return "Synthetic" + "".join(word[:1].upper() + word[1:] for word in words)


def _done(records_dir: Path, index: int, identity: dict[str, Any], file_format: str) -> bool:
    """A sample is finished when its sidecar exists, names the same checkpoint, seed and format,
    and its files (named relative to the sidecar's folder) exist."""
    sidecar = _sidecar_path(records_dir, index, file_format)
    if not sidecar.exists():
        return False
    try:
        record = json.loads(sidecar.read_text())
    except ValueError:
        return False
    same = all(record.get(key) == value for key, value in identity.items())
    if not same:
        raise SampleError(
            f"{records_dir} already holds sample {index} from another checkpoint, seed, format or conditions "
            f"({sidecar.name}); use --force to replace it, or another -o folder"
        )
    files = [record["file"], *([record["label_file"]] if record.get("label_file") else [])]
    return all((records_dir / name).exists() for name in files)


def _write_one(
    index: int,
    volume: np.ndarray,
    label_map: np.ndarray | None,
    plan: Plan,
    request: SampleRequest,
    sidecar: dict[str, Any],
    records_dir: Path,
    nnunet: NnUNetRawWriter | None = None,
) -> dict:
    # Cast once (rounding and clipping to the output dtype), so every format holds the same values.
    values = cast_for_storage(plan.to_real_units(volume), plan.output_dtype)
    if nnunet is not None:
        files = _write_nnunet_case(nnunet, index, values, label_map, plan, records_dir)
    else:
        files = _write_sample_files(index, values, label_map, plan, request, sidecar["seed"])
    record = {**sidecar, "index": index, **files}
    atomic_write_json(_sidecar_path(records_dir, index, request.file_format), record)  # after the files: marks done
    return record


def _write_sample_files(
    index: int, values: np.ndarray, label_map: np.ndarray | None, plan: Plan, request: SampleRequest, seed: int
) -> dict[str, str]:
    """The image (NIfTI file or DICOM series) and its label map in the -o folder; their names."""
    name = _name(index, request.file_format)
    target = request.out_dir / name
    if request.file_format == "nifti":
        write_nifti(
            Volume(values.astype(np.float32), plan.affine),
            target,
            dtype=plan.output_dtype,
            description=SYNTHETIC_DESCRIPTION,
        )
    else:
        write_dicom_series(
            target,
            values,
            plan.affine,
            modality="CT" if plan.modality == "ct" else "MR",
            dtype=plan.output_dtype,
            series_description=f"{SYNTHETIC_DESCRIPTION} sample {index}",
            seed=seed,
            value_range=plan.window,  # one stored unit for every MR sample of the run
        )
    files = {"file": name}
    if label_map is not None and plan.label_values:
        # Same grid and affine as the image; label values, integers: nothing to round or window.
        label_name = _label_name(index)
        write_nifti(
            Volume(label_map, plan.affine),
            request.out_dir / label_name,
            dtype=label_dtype(plan.label_values),
            description=SYNTHETIC_DESCRIPTION,
        )
        files["label_file"] = label_name
    return files


def _write_nnunet_case(
    writer: NnUNetRawWriter,
    index: int,
    values: np.ndarray,
    label_map: np.ndarray | None,
    plan: Plan,
    records_dir: Path,
) -> dict[str, str]:
    """Sample `index` as case synth_NNNNN of the dataset; its files named relative to the sidecar's folder."""
    if label_map is None:
        raise ValueError("an nnU-Net case needs its label map")
    case = _stem(index, "nnunet")
    # Stored as the plan's dtype, as the NIfTI format stores it. A case already complete on disk
    # without a sidecar was stopped between its files and its sidecar; the writer keeps it.
    writer.add_case(case, values, label_map, plan.affine, image_dtype=plan.output_dtype)
    return {
        "nnunet_case": case,
        "file": Path(os.path.relpath(writer.image_path(case), records_dir)).as_posix(),
        "label_file": Path(os.path.relpath(writer.label_path(case), records_dir)).as_posix(),
    }


def write_manifest(out_dir: Path, prefix: str = "sample") -> Path:
    """manifest.json: every finished sample in the folder, from all shards. Built under a lock by
    whichever process finishes, from the sidecars (`prefix`_NNNNN.json), so the last shard to
    finish lists them all."""
    import fcntl

    lock_path = out_dir / ".manifest.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        records = []
        for sidecar in sorted(out_dir.glob(f"{prefix}_*.json")):
            try:
                record = json.loads(sidecar.read_text())
            except ValueError:
                continue
            if (out_dir / record.get("file", "")).exists():
                records.append(record)
        records.sort(key=lambda r: r["index"])
        manifest: dict[str, Any] = {
            "medsynth_version": __version__,
            "count": len(records),
            "samples": [
                {
                    "index": r["index"],
                    "file": r["file"],
                    **({"label_file": r["label_file"]} if r.get("label_file") else {}),
                    "seed": r["seed"],
                    "checkpoint_sha256": r["checkpoint_sha256"],
                    **({"latent_index": r["latent_index"], "conditions": r["conditions"]} if "conditions" in r else {}),
                }
                for r in records
            ],
        }
        labelled = next((r for r in records if r.get("label_file")), None)
        if labelled is not None:  # one label set for the folder: a checkpoint has one, and samples name theirs
            manifest["labels"] = {"values": labelled["label_values"], "names": labelled["label_names"]}
        path = atomic_write_json(out_dir / "manifest.json", manifest)
        fcntl.flock(lock, fcntl.LOCK_UN)
    return path


def run_sampling(request: SampleRequest, progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Generate and write this shard's samples. Returns a summary (written, skipped, paths; with
    --format nnunet also "nnunet", see `_finish_nnunet`)."""
    if request.file_format not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {request.file_format!r}")
    if (request.count is not None and request.count < 1) or request.batch_size < 1:
        raise UsageError("-n and --batch-size must be at least 1")
    if request.out_dir.exists() and not request.out_dir.is_dir():
        raise UsageError(f"{request.out_dir}: is a file; -o needs a folder for the samples")
    if request.file_format != "nnunet" and (request.dataset_id is not None or request.dataset_name is not None):
        raise UsageError("--dataset-id and --dataset-name name an nnU-Net dataset: they go with --format nnunet")
    checkpoint_path = resolve_checkpoint_path(request.checkpoint)
    # (id, name) with --format nnunet, checked before the checkpoint is loaded
    nnunet_dataset = _nnunet_dataset(request, checkpoint_path) if request.file_format == "nnunet" else None
    payload = load_checkpoint(checkpoint_path, map_location="cpu")
    plan = Plan.from_dict(payload["plan"])
    if nnunet_dataset is not None and not plan.label_values:
        raise UsageError(
            f"{checkpoint_path}: --format nnunet needs a model trained on image + label pairs (nnU-Net trains "
            "segmentation from label maps), and this one was trained on images alone; train with --labels, "
            "or use --format nifti"
        )
    asked = sample_conditions(
        plan.conditions, request.conditions, request.conditions_table, request.count, request.allow_extrapolation
    )
    count = len(asked.values) if asked is not None else int(request.count)  # type: ignore[arg-type]
    config = config_from_dict(payload["config"])
    generator = generator_from_checkpoint(payload).to(request.device)
    latent_dim, prior = config.model.latent_dim, config.loss.latent_prior
    identity = {
        "checkpoint_sha256": file_sha256(checkpoint_path),
        "base_seed": request.seed,
        "format": request.file_format,
    }
    try:
        request.out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where a folder of the path should be, no permission, ...
        raise WriteError(str(request.out_dir), exc.strerror or type(exc).__name__) from None
    nnunet_writer = None
    records_dir = request.out_dir  # sidecars, manifest.json, preview.png
    if nnunet_dataset is not None:
        nnunet_writer = NnUNetRawWriter(
            request.out_dir,
            *nnunet_dataset,
            channel_name_for_modality(plan.modality),
            plan.label_values,
            plan.label_names,
            overwrite=request.force,
            description=SYNTHETIC_DESCRIPTION,
        )
        records_dir = nnunet_writer.folder / NNUNET_RECORDS_FOLDER
        try:
            records_dir.mkdir(exist_ok=True)
        except OSError as exc:
            raise WriteError(str(records_dir), exc.strerror or type(exc).__name__) from None
    sidecar_base = {
        **identity,
        "synthetic": True,
        "training_step": int(payload["step"]),
        "medsynth_version": __version__,
        "command": shlex.join(sys.argv),
        "modality": plan.modality.upper(),
        "shape": list(plan.target_shape),
        "spacing_mm": list(plan.spacing),
        "dtype": plan.output_dtype,
        "units": "HU" if plan.modality == "ct" else "arbitrary (typical training range)",
    }
    if plan.label_values:  # each label file holds these values; class k is label_names[k]
        sidecar_base["label_values"] = list(plan.label_values)
        sidecar_base["label_names"] = list(plan.label_names or ())
        sidecar_base["label_dtype"] = label_dtype(plan.label_values)
    if nnunet_writer is not None:
        # nnU-Net needs classes 0, 1, 2...: the label files may hold renumbered values.
        sidecar_base["nnunet_dataset"] = nnunet_writer.folder.name
        sidecar_base["label_values_in_files"] = {str(k): v for k, v in nnunet_writer.label_mapping.items()}
    if asked is not None:
        sidecar_base["conditions_scaling"] = list(plan.conditions or ())
        all_codes = torch.from_numpy(asked.codes(plan.conditions))  # type: ignore[arg-type]  # (count, width)

    def identity_of(index: int) -> dict[str, Any]:
        """What fixes file `index`: the checkpoint, seed and format, and for a conditional model
        its latent and its conditions: (seed, latent, conditions) fixes the voxels."""
        if asked is None:
            return identity
        return {**identity, "latent_index": asked.latent_index[index], "conditions": asked.values[index]}

    wanted = request.shard.indices(count)
    todo = [i for i in wanted if request.force or not _done(records_dir, i, identity_of(i), request.file_format)]
    skipped = len(wanted) - len(todo)

    written: list[dict[str, Any]] = []
    preview_volumes: list[np.ndarray] = []
    preview_labels: list[np.ndarray] = []
    if progress:
        progress("sample", 0, len(todo))
    # Writing (gzip, DICOM encoding) runs in threads while the next batch is generated.
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as writers:
        pending: list[Future] = []
        for start in range(0, len(todo), request.batch_size):
            batch = todo[start : start + request.batch_size]
            latent_index = [asked.latent_index[i] if asked is not None else i for i in batch]
            latents = torch.stack(
                [latent_for(request.seed, j, latent_dim, prior) for j in latent_index]
            )  # (B, latent_dim)
            codes = all_codes[batch] if asked is not None else None  # (B, width)
            # (B, X, Y, Z) each; label maps None without a label set
            volumes, label_maps = generate_pairs(generator, latents, request.device, plan.label_values, codes)
            for row, (index, volume) in enumerate(zip(batch, volumes)):
                label_map = label_maps[row] if label_maps is not None else None
                sidecar = {**sidecar_base, **identity_of(index), "seed": sample_seed(request.seed, latent_index[row])}
                pending.append(
                    writers.submit(
                        _write_one, index, volume, label_map, plan, request, sidecar, records_dir, nnunet_writer
                    )
                )
                if request.preview and len(preview_volumes) < 8:
                    preview_volumes.append(volume)
                    if label_map is not None:
                        preview_labels.append(label_map)
            while len(pending) > 2 * request.batch_size:  # bound memory: wait for the oldest writes
                written.append(pending.pop(0).result())
                if progress:
                    progress("sample", len(written), len(todo))
        for future in pending:
            written.append(future.result())
            if progress:
                progress("sample", len(written), len(todo))
    manifest = write_manifest(records_dir, _prefix(request.file_format))
    preview_path = None
    if request.preview and preview_volumes:
        from medsynth.preview import save_montage

        suffix = "" if request.shard.count == 1 else f"-shard{request.shard.index}of{request.shard.count}"
        preview_path = save_montage(
            records_dir / f"preview{suffix}.png",
            preview_volumes,
            labels=preview_labels or None,
            spacing=plan.spacing,
        )
    summary = {
        "written": len(written),
        "skipped": skipped,
        "out_dir": str(request.out_dir),
        "manifest": str(manifest),
        "preview": str(preview_path) if preview_path else None,
        "checkpoint": str(checkpoint_path),
        "step": int(payload["step"]),
        "warnings": list(asked.warnings) if asked is not None else [],
    }
    if nnunet_writer is not None and nnunet_dataset is not None:
        summary["nnunet"] = _finish_nnunet(nnunet_writer, count, nnunet_dataset[0])
    return summary


def _nnunet_dataset(request: SampleRequest, checkpoint_path: Path) -> tuple[int, str]:
    """The dataset id and name asked for, or the defaults; UsageError (one line) for a bad one."""
    dataset_id = DEFAULT_NNUNET_DATASET_ID if request.dataset_id is None else request.dataset_id
    dataset_name = request.dataset_name if request.dataset_name is not None else default_dataset_name(checkpoint_path)
    dataset_folder_name(dataset_id, dataset_name)
    return dataset_id, dataset_name


def _finish_nnunet(writer: NnUNetRawWriter, count: int, dataset_id: int) -> dict[str, Any]:
    """dataset.json's final count, and `verify_nnunet_dataset` once the whole set of `count` cases
    is on disk. A shard that finishes while others still write leaves the check to the last one:
    a dataset half written by other processes would only show their work in progress."""
    # Listed before finish() counts: every case seen here is then in numTraining (cases are never
    # removed, and another shard's finish() counts at least as many), so the check sees no stale count.
    on_disk = set(scan_cases(writer.folder)[0])
    export = writer.finish()
    present = sum(_stem(i, "nnunet") in on_disk for i in range(count))
    complete = present == count
    return {
        "folder": str(export.folder),
        "raw_root": str(writer.raw_root.resolve()),
        "dataset_id": dataset_id,
        "num_training": export.num_training,
        "present": present,
        "count": count,
        "checked": complete,
        "problems": verify_nnunet_dataset(export.folder) if complete else [],
    }
