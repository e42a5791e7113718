"""How much memory a training step and sampling take, measured before a long job starts.

A formula cannot be trusted for this: oneDNN's workspaces, the allocator's caching, autocast's
copies of the weights and PyTorch's own libraries all count, and none is in a parameter count. So
the figure comes from running the real thing once, in a child process that does nothing else:
`Trainer` steps (D and G updates, R1, the EMA), a checkpoint and a preview at the configured
shape, width, batch and precision, on random volumes; or one sampling batch of the generator.

- CUDA: `torch.cuda.max_memory_allocated` after the step (what the caching allocator handed out),
  against the device's free memory.
- CPU: the child's peak resident memory (VmHWM), PyTorch itself included, against the
  memory the machine has available (`MemAvailable`, or a cgroup's limit if lower).

A real run's memory is the probe's plus the volumes it memory-maps from the cache (counted apart,
`PlannedMemory.cache_bytes`: resident once read, though the kernel can drop them). Training
records its own peak (`metrics.jsonl`, `peak_memory_mb`), so the two can be compared
(benchmarks/memory.py does).

`estimate_step_bytes` is a cheap screen, not a figure: the architecture's weights and layer
outputs counted by arithmetic, so `train` can skip the probe where memory is plainly ample.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medsynth.errors import MedsynthError

# Of the memory available, what a run may plan to use: the rest is headroom for checkpoint
# writing, previews, the loader and whatever else the machine runs.
SAFETY = 0.85
# `train` probes before it starts when the screen says a step may need more than this share.
PROBE_ABOVE = 0.25
# What a process that has imported PyTorch and medsynth holds before any model (measured on a
# CPU: 0.22-0.23 GiB); part of the screen, since the probe's figure includes it too.
TORCH_FOOTPRINT = 250 * 1024**2
# Latents per `medsynth sample` batch, its --batch-size default.
SAMPLE_BATCH = 8
GIB = 1024**3


class ProbeFailed(MedsynthError):
    """The measuring child process died (out of memory) or failed."""


@dataclass(frozen=True)
class MemoryProbe:
    """One measured run of a training step or a sampling batch."""

    kind: str  # "train" or "sample"
    device: str
    batch_size: int
    amp: str  # "off" or "bf16"
    peak_bytes: int  # CUDA: max_memory_allocated; CPU: the child's peak resident memory
    # The peak over the training steps alone, before the checkpoint and preview (sampling: the
    # peak). The steps grow with the batch; writing a checkpoint and a preview barely does.
    step_peak_bytes: int
    baseline_bytes: int  # before any model existed: PyTorch's own footprint on CPU, 0 on CUDA
    seconds: float  # median wall time of the step or batch


def available_bytes(device: str) -> int:
    """Memory a run on `device` may use now: CUDA free memory, or the CPU's available memory (a
    cgroup limit included, as on cluster nodes and in containers)."""
    import torch

    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    available = _meminfo_available()
    limit = _cgroup_limit()
    return min(available, limit) if limit else available


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _cgroup_limit() -> int | None:
    """What a cgroup (v2, else v1) leaves this process, or None where there is no limit."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            text = Path(limit_file).read_text().strip()
            if text == "max" or int(text) >= 1 << 60:
                return None
            return max(0, int(text) - int(Path(usage_file).read_text().strip()))
        except (OSError, ValueError):
            continue
    return None


def estimate_step_bytes(config, plan, batch_size: int) -> int:
    """A rough screen of one training step's memory, from the architecture alone (instant): weights
    with their gradients, Adam's moments and the EMA, plus the layer outputs of G and D kept for
    the backward pass. Not shown to users (the probe is); `train` probes where this is not small."""
    from medsynth.models import _base_shape, channels_per_stage, label_class_count, stage_count

    shape = tuple(plan.target_shape)
    voxels = math.prod(shape)
    model = config.model
    stages = stage_count(shape, model.base_grid)
    d_channels = channels_per_stage(model, stages)
    g_channels = channels_per_stage(model, stages, model.generator_channels)
    outputs = 1 + label_class_count(plan.label_values)
    # G: each block's upsampled output and its BatchNorm output at shape / 2^i, the projection, and
    # the volume (and its tanh). D: each strided convolution's output at shape / 2^(i+1).
    g_elements = 2 * g_channels[-1] * math.prod(_base_shape(shape, stages)) + 2 * outputs * voxels
    g_elements += sum(2 * g_channels[i - 1] * voxels // 8**i for i in range(1, stages))
    d_elements = sum(d_channels[i] * voxels // 8 ** (i + 1) for i in range(stages)) // model.pack
    g_weights = sum(27 * a * b for a, b in zip(g_channels[1:], g_channels[:-1])) + 27 * g_channels[0] * outputs
    g_weights += (model.latent_dim + 32) * g_channels[-1] * math.prod(_base_shape(shape, stages))
    d_weights = sum(64 * a * b for a, b in zip(d_channels[:-1], d_channels[1:])) + 64 * outputs * d_channels[0]
    d_weights += d_channels[-1] * math.prod(_base_shape(shape, stages))
    # Weights, gradients, two Adam moments, the EMA; at the peak G's batch passes through D once
    # more than the real and fake batches do: about three D passes and one G pass kept at once.
    arrays = 4 * (5 * (g_weights + d_weights) + batch_size * (g_elements + 3 * d_elements))
    return int(TORCH_FOOTPRINT + arrays)


def probe(config, plan, kind: str, device: str, amp: str, batch_size: int, steps: int = 2) -> MemoryProbe:
    """Measure one training step (`kind` "train") or one sampling batch ("sample") in a child
    process, so that the figure is the step's alone and a step that does not fit kills the child,
    not the caller. Raises ProbeFailed, saying so, if the child dies."""
    import torch

    from medsynth.config import config_to_dict

    request = {
        "kind": kind,
        "device": device,
        "amp": amp,
        "batch_size": batch_size,
        "steps": steps,
        "threads": torch.get_num_threads(),
        "config": config_to_dict(config),
        "plan": plan.to_dict(),
    }
    with tempfile.TemporaryDirectory(prefix="medsynth-probe-") as tmp:
        request_file = Path(tmp) / "request.json"
        request_file.write_text(json.dumps(request))
        result = subprocess.run(
            [sys.executable, "-m", "medsynth.memory", str(request_file)], capture_output=True, text=True, check=False
        )
    if result.returncode != 0:
        what = f"{kind} at batch {batch_size} ({amp})"
        if result.returncode in (-9, 137):
            raise ProbeFailed(f"measuring one {what} ran out of memory (the kernel stopped it)")
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise ProbeFailed(f"measuring one {what} failed: {last}")
    return MemoryProbe(**json.loads(result.stdout.strip().splitlines()[-1]))


def _status_bytes(field: str) -> int | None:
    """A memory figure of this process from /proc/self/status (Linux), in bytes, or None."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return None


def _resident_bytes() -> int:
    return _status_bytes("VmRSS") or 0


def peak_bytes(device) -> int:
    """This process's peak so far: CUDA's max_memory_allocated on `device`, else peak resident memory.

    On Linux the resident peak is VmHWM, the high-water mark of this program's own memory. Not
    `ru_maxrss`: exec keeps the larger of it and the parent's peak at the fork, so a probe started
    by a process that had held 4 GiB reported 4 GiB whatever it measured (benchmarks/memory.py
    --tensors did that). ru_maxrss is the fallback where /proc is not."""
    import resource

    import torch

    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return _status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss: KiB


def _measure(request: dict[str, Any]) -> MemoryProbe:
    """The child's work: build what a run builds, run it, and read the peak."""
    import torch

    from medsynth.conditions import ConditionSpec
    from medsynth.config import config_from_dict, replace
    from medsynth.distributed import Runtime
    from medsynth.plan import Plan
    from medsynth.precision import median_seconds

    torch.set_num_threads(request["threads"])
    device = torch.device(request["device"])
    config = config_from_dict(request["config"])
    plan = Plan.from_dict(request["plan"])
    batch = request["batch_size"]
    baseline = 0 if device.type == "cuda" else _resident_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    conditions = ConditionSpec.of(plan.conditions)
    if request["kind"] == "train":
        config = replace(config, train=replace(config.train, batch_size=batch, amp=request["amp"]))
        with tempfile.TemporaryDirectory(prefix="medsynth-probe-") as tmp:
            trainer = random_volume_trainer(config, plan, Runtime(device=device), Path(tmp))
            try:
                seconds = median_seconds(trainer.train_step, request["steps"], device)
                step_peak = peak_bytes(device)
                trainer.save()  # a checkpoint (with the EMA's BatchNorm recalibration) and a
                trainer.preview()  # preview happen in every run: their transient peaks count too
            finally:
                trainer.metrics.close()
    else:
        from medsynth.models import build_generator, label_class_count
        from medsynth.sample import generate_pairs

        generator = build_generator(config.model, plan.target_shape, label_class_count(plan.label_values), conditions)
        generator = generator.to(device).eval()
        latents = torch.randn(batch, config.model.latent_dim)
        codes = torch.zeros(batch, conditions.width) if conditions else None

        def one_batch() -> None:
            generate_pairs(generator, latents, device, plan.label_values, codes)

        seconds = median_seconds(one_batch, request["steps"], device)
        step_peak = peak_bytes(device)
    return MemoryProbe(
        request["kind"], str(device), batch, request["amp"], int(peak_bytes(device)), int(step_peak), int(baseline),
        float(seconds),
    )  # fmt: skip


def random_volume_trainer(config, plan, runtime, folder: Path):
    """A `Trainer` exactly as a run builds it for this config and plan, on one batch of random
    volumes (and label maps, and unknown conditions) written to `folder`: what the dry run times
    and the probe measures. No loader workers and no compilation: one step, not a run."""
    import numpy as np

    from medsynth.conditions import ConditionSpec
    from medsynth.config import replace
    from medsynth.train import Trainer

    config = replace(config, train=replace(config.train, loader_workers=0, compile=False))
    rng = np.random.default_rng(0)
    paths, label_paths = [], []
    for i in range(config.train.batch_size):
        paths.append(str(folder / f"volume{i}.npy"))
        np.save(paths[-1], rng.uniform(-1, 1, plan.target_shape).astype(np.float32))
        if plan.label_values:  # a paired model: random label maps of the plan's values
            label_paths.append(str(folder / f"labels{i}.npy"))
            np.save(label_paths[-1], rng.choice(np.array(plan.label_values, dtype=np.uint8), plan.target_shape))
    conditions = ConditionSpec.of(plan.conditions)
    codes = np.zeros((len(paths), conditions.width), dtype=np.float32) if conditions else None  # all unknown
    return Trainer(config, plan, paths, folder / "run", runtime, label_paths=label_paths or None, condition_codes=codes)


@dataclass(frozen=True)
class PlannedMemory:
    """What `--dry-run` and `train` report: the training step's peak at the batch asked for (or
    chosen, `train.batch_size: auto`), measured where it was predicted to fit and else predicted
    from the measured smaller batches; sampling's peak; what the device has; the largest batch
    that fits."""

    batch_size: int | None  # asked for, or chosen by auto (None: auto found none that fits)
    peak_bytes: int  # of one training step at batch_size
    measured: bool  # False: predicted from `probes`, because running it would not have fitted
    probes: tuple[MemoryProbe, ...]  # the training steps measured, smallest batch first
    sample: MemoryProbe | None
    available_bytes: int
    cache_bytes: int  # the preprocessed volumes a run memory-maps (page cache, reclaimable)
    largest_batch: int | None  # the largest batch predicted to fit; None if not even the smallest
    batch_limit: int  # the most `auto` may take (`largest_useful_batch`): 64, or fewer where the data has fewer volumes

    @property
    def limited_by_data(self) -> bool:
        """True where `largest_batch` is the data's limit, not memory's: a larger batch would fit."""
        if self.largest_batch is None or self.largest_batch * 2 <= self.batch_limit:
            return False
        return predicted_bytes(list(self.probes), self.largest_batch * 2) <= self.budget_bytes

    @property
    def fits(self) -> bool:
        return self.batch_size is not None and self.peak_bytes <= SAFETY * self.available_bytes

    @property
    def budget_bytes(self) -> int:
        return int(SAFETY * self.available_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "peak_bytes": self.peak_bytes,
            "measured": self.measured,
            "fits": self.fits,
            "largest_batch": self.largest_batch,
            "batch_limit": self.batch_limit,
            "available_bytes": self.available_bytes,
            "budget_bytes": self.budget_bytes,
            "cache_bytes": self.cache_bytes,
            "probes": [asdict(p) for p in self.probes],
            "sample": asdict(self.sample) if self.sample else None,
        }


def largest_useful_batch(volumes: int, world_size: int = 1) -> int:
    """The most `auto` may choose: 64, or what the data fills per process (one batch an epoch)."""
    return max(1, min(64, volumes // world_size))


def batch_candidates(pack: int, largest: int = 64) -> list[int]:
    """Batch sizes `auto` may choose: the pack, doubling (a batch must be a multiple of the pack)."""
    sizes, batch = [], pack
    while batch <= largest:
        sizes.append(batch)
        batch *= 2
    return sizes


def predicted_bytes(probes: list[MemoryProbe], batch: int) -> int:
    """A training step's peak at `batch`, on the straight line through the measured batches:
    activations grow with the batch, on top of weights, optimiser states and libraries. From one
    measurement only, everything above PyTorch's own footprint is counted as growing (pessimistic)."""
    points = sorted({(p.batch_size, p.step_peak_bytes, p.baseline_bytes) for p in probes})
    if len(points) == 1:
        b0, m0, base = points[0]
        steps = base + (m0 - base) * batch / b0
    else:
        (b0, m0, _), (b1, m1, _) = points[0], points[-1]
        steps = m0 + max((m1 - m0) / (b1 - b0), 0.0) * (batch - b0)
    # The checkpoint and preview of a run at this batch need at least what they did at a smaller one.
    writing = max((p.peak_bytes for p in probes if p.batch_size <= batch), default=0)
    return int(max(steps, writing))


def largest_fitting_batch(probes: list[MemoryProbe], budget: int, pack: int, largest: int = 64) -> int | None:
    """The largest candidate batch (`batch_candidates`) predicted to fit in `budget` bytes."""
    measured = {p.batch_size: p.peak_bytes for p in probes}
    fitting = [b for b in batch_candidates(pack, largest) if measured.get(b, predicted_bytes(probes, b)) <= budget]
    return fitting[-1] if fitting else None


def plan_memory(
    config,
    plan,
    device: str,
    cache_bytes: int = 0,
    measure_sampling: bool = True,
    processes: int = 1,
    largest: int = 64,
) -> PlannedMemory:
    """Measure what training (and sampling) at this config and plan take on `device`, and whether
    it fits: the smallest batch (one pack) first, then the batch asked for (or a second point for
    `auto`) if it is predicted to fit, so a step far too big is predicted, never run into the wall.
    `processes` share the device's memory (several CPU processes of one run on one machine)."""
    import torch

    from medsynth.precision import choose_precision

    amp = "bf16" if choose_precision(config.train.amp, torch.device(device)).bf16 else "off"
    available = available_bytes(device) // processes
    budget = int(SAFETY * available)
    pack = config.model.pack
    asked = config.train.batch_size
    probes = [probe(config, plan, "train", device, amp, pack)]

    failed: list[int] = []

    def try_probe(batch: int) -> None:
        try:
            probes.append(probe(config, plan, "train", device, amp, batch))
        except ProbeFailed:  # out of memory in the child: that batch, and any larger, does not fit
            failed.append(batch)

    def largest_fitting() -> int | None:
        limit = min([largest, *(b - 1 for b in failed)])
        return largest_fitting_batch(probes, budget, pack, limit)

    # A second point for the line: the batch asked for if it is predicted to fit, else two packs
    # if that may fit (one point predicts pessimistically, so with some slack: a batch that does
    # not fit only stops the child).
    if asked not in ("auto", pack) and predicted_bytes(probes, asked) <= budget:
        try_probe(asked)
    if len(probes) == 1 and predicted_bytes(probes, 2 * pack) <= 1.5 * budget:
        try_probe(2 * pack)
    largest_batch = largest_fitting()
    batch = largest_batch if asked == "auto" else asked
    measured = next((p for p in probes if p.batch_size == batch), None)
    if measured is None and batch is not None and predicted_bytes(probes, batch) <= budget:
        try_probe(batch)
        measured = next((p for p in probes if p.batch_size == batch), None)
        largest_batch = largest_fitting()
        if asked == "auto" and (measured is None or measured.peak_bytes > budget):  # the line was optimistic
            batch = largest_batch
            measured = next((p for p in probes if p.batch_size == batch), None)
    peak = measured.peak_bytes if measured else predicted_bytes(probes, batch or pack)
    if batch in failed:  # it was run and ran out of memory: whatever the line says, it does not fit
        peak = max(peak, int(available) + 1)
    sample = probe(config, plan, "sample", device, "off", SAMPLE_BATCH) if measure_sampling else None
    return PlannedMemory(
        batch, int(peak), measured is not None, tuple(sorted(probes, key=lambda p: p.batch_size)), sample, available,
        cache_bytes, largest_batch, largest,
    )  # fmt: skip


def plan_to_fit(
    config, plan, device: str, volumes: int, world_size: int = 1, processes: int = 1, measure_sampling: bool = False
):
    """(config, PlannedMemory, note): `plan_memory` for this run; where the step does not fit,
    the same with `train.activation_checkpointing` on (the same numbers, less memory), taken if
    that fits, with a note saying so. What `train` does before preprocessing and `--dry-run` shows."""
    from medsynth.config import replace

    def planned_for(settings) -> PlannedMemory:
        return plan_memory(
            settings,
            plan,
            device,
            cache_bytes(settings, plan, volumes),
            measure_sampling=measure_sampling,
            processes=processes,
            largest=largest_useful_batch(volumes, world_size),
        )

    planned = planned_for(config)
    if planned.fits or config.train.activation_checkpointing:
        return config, planned, None
    lean = replace(config, train=replace(config.train, activation_checkpointing=True))
    lean_planned = planned_for(lean)
    if not lean_planned.fits:
        return config, planned, None
    note = (
        f"train.activation_checkpointing on, so that a step fits: {describe_bytes(lean_planned.peak_bytes)} "
        f"instead of {describe_bytes(planned.peak_bytes)}"
    )
    return lean, lean_planned, note


def cache_bytes(config, plan, volumes: int) -> int:
    """The preprocessed cache a run of `volumes` volumes memory-maps: float32 images, uint8 labels.
    Nothing for the hierarchical model, which reads its views by positioned reads, a few planes at a
    time (`CachedVolumeDataset.read_planes`), and maps nothing."""
    if config.model.hierarchical_slabs:
        return 0
    voxels = math.prod(plan.target_shape)
    return volumes * voxels * (4 + (1 if plan.label_values else 0))


def describe_planned(planned: PlannedMemory) -> str:
    """One clause: the step's peak, how it was found, and the budget it is held to."""
    how = (
        "measured"
        if planned.measured
        else "predicted from measured batches " + ", ".join(str(p.batch_size) for p in planned.probes)
    )
    return (
        f"one step {how}: {describe_bytes(planned.peak_bytes)} of the {describe_bytes(planned.budget_bytes)} "
        f"a run may plan on ({SAFETY:.0%} of {describe_bytes(planned.available_bytes)} available on {planned.probes[0].device})"
    )


def refusal(planned: PlannedMemory, config) -> str:
    """Why a run does not fit, and what would: a smaller batch, or settings that shrink the step."""
    precision = "bf16" if planned.probes[0].amp == "bf16" else "fp32"
    asked = config.train.batch_size
    head = (
        f"one training step at batch {planned.batch_size} does not fit in memory ({precision}): "
        + describe_planned(planned)
        if planned.batch_size is not None
        else f"train.batch_size=auto: not even one pack ({config.model.pack} volumes) fits in memory "
        f"({precision}): {describe_bytes(planned.probes[0].peak_bytes)} measured at batch {planned.probes[0].batch_size}, "
        f"{describe_bytes(planned.budget_bytes)} to plan on"
    )
    if planned.largest_batch is not None and asked != "auto":
        return f"{head}. train.batch_size={planned.largest_batch} would fit (--batch-size {planned.largest_batch}, or auto)"
    smallest = "" if asked == "auto" else f"; not even batch {config.model.pack} (one pack) fits"
    # The hierarchical model trains a full-resolution grid in a fraction of the plain model's memory.
    hierarchical = "" if config.model.hierarchical_slabs else ", model.hierarchical_slabs=8 (for 128³ and above)"
    return (
        f"{head}{smallest}. Use a smaller plan.target_shape (or a coarser plan.spacing), fewer "
        f"model.base_channels{hierarchical}, or train.amp=bf16 where the device runs bf16 natively"
    )


def describe_bytes(count: float) -> str:
    return f"{count / GIB:.2f} GiB" if count >= 0.1 * GIB else f"{count / 1024**2:.0f} MiB"


if __name__ == "__main__":  # the measuring child: python -m medsynth.memory REQUEST.json
    with contextlib.suppress(OSError):  # if memory runs out, the kernel stops this child, not its parent
        Path("/proc/self/oom_score_adj").write_text("1000")
    print(json.dumps(asdict(_measure(json.loads(Path(sys.argv[1]).read_text())))))
