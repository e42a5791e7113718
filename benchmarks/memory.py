"""Peak memory and step time of training at 64³, 128³ and 256³, and whether `--dry-run` predicts
a real run's peak.

    python benchmarks/memory.py [--sizes 64 128 256] [--batches 2 4 8] [--data DIR] [--real-steps 3]
                                [--set key=value ...] [--out memory.json]
    python benchmarks/memory.py --sizes 256 --batches 2 4 --compare hierarchical='model.hierarchical_slabs=8'

For each size:
  * one training step measured by `medsynth.memory.probe` (a child process doing exactly what a
    run does: D and G updates, R1, the EMA, a checkpoint and a preview) at each batch size, in
    the precision `train.amp: auto` picks here; and one sampling batch of 8 volumes;
  * a real run: `medsynth train` on `--real-volumes` scans for `--real-steps` steps, as a user
    would start it, whose own peak (`peak_memory_mb` in metrics.jsonl: peak resident memory on a
    CPU) is set beside what `--dry-run` predicts for it (the step's probe plus the cache it maps),
    as a ratio.
With --compare NAME='SETTINGS', each variant is probed beside the baseline at every size and
batch instead, with ratios (e.g. the hierarchical model against the plain one at the same width).
With --tensors as well, each is also measured as CUDA's `max_memory_allocated` would measure it:
the peak of live tensor bytes over one training step (after a warm-up step), from the profiler's
memory timeline, split by what the tensors are (parameters, optimiser state, gradients,
activations, ...) at that moment. A process's resident peak on a CPU also holds the libraries'
code, oneDNN's buffers and the allocator's slack, none of which a GPU's tensor memory counts.
The brain preset's model (width 32, pack 2) unless --set says otherwise; batch 1 is not possible
with pack 2. First says where it ran: CPU, cores, ISA, torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from medsynth import memory
from medsynth.config import load_config
from medsynth.plan import Plan
from medsynth.precision import machine_description

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "train" / "ixi-t1"


def a_plan(size: int) -> Plan:
    return Plan(
        modality="mr",
        target_shape=(size, size, size),
        spacing=(230.0 / size,) * 3,
        deoblique=True,
        intensity_mode="percentile",
        window=(0.0, 1000.0),
        percentiles=(0.5, 99.5),
        output_dtype="float32",
        n_sources=1,
    )


def real_run(data: Path, size: int, batch: int, steps: int, volumes: int, overrides: list[str], tmp: Path) -> dict:
    """`medsynth train` on the first `volumes` scans of `data`; its peak and its plan."""
    subset = tmp / f"data{size}"
    subset.mkdir()
    for scan in sorted(data.iterdir())[:volumes]:
        (subset / scan.name).symlink_to(scan.resolve())
    run = tmp / f"run{size}"
    settings = [
        f"plan.target_shape=[{size},{size},{size}]",
        f"train.batch_size={batch}",
        f"train.max_steps={steps}",
        f"cache.dir={tmp / 'cache'}",
        "train.log_every=1",
        *overrides,
    ]
    command = [sys.executable, "-m", "medsynth", "train", str(subset), "-o", str(run), "--config"]
    command += [str(ROOT / "configs" / "brain-mri-64.yaml")] + [w for s in settings for w in ("--set", s)]
    start = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run(command, check=True, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {
        # The whole process's peak, as `/usr/bin/time` reports it (the final checkpoint and
        # preview included); runs must come before any probe in this process, smallest first.
        "peak_bytes": after * 1024 if after > before else None,
        "logged_peak_bytes": max(r["peak_memory_mb"] for r in records) * 2**20,  # over logged steps only
        "plan": Plan.load(run / "plan.json"),
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--real-steps", type=int, default=3, help="steps of each real run (0: no real runs)")
    parser.add_argument("--real-batch", type=int, default=4)
    parser.add_argument("--real-volumes", type=int, default=8)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--real-only",
        action="store_true",
        help="only the real runs, each against a probe at its batch (what the dry run measures)",
    )
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="NAME=SETTINGS",
        help="a variant (space-separated --set overrides) probed beside the baseline at every size and batch, "
        "with the ratios: e.g. hierarchical='model.hierarchical_slabs=8'",
    )
    parser.add_argument(
        "--tensors",
        action="store_true",
        help="with --compare: also each variant's peak of live tensor bytes in one step, by category",
    )
    args = parser.parse_args()
    if args.tensors and not args.compare:
        parser.error("--tensors goes with --compare (a baseline and its variants)")
    if args.real_only:
        real_only(args)
        return
    if args.compare:
        compare_variants(args)
        return

    print(f"machine: {machine_description(torch.device('cpu'))}")
    print(f"memory available now: {memory.describe_bytes(memory.available_bytes('cpu'))}")
    rows = []
    for size in args.sizes:
        config = load_config(
            ROOT / "configs" / "brain-mri-64.yaml", [f"plan.target_shape=[{size},{size},{size}]", *args.overrides]
        )
        plan = a_plan(size)
        amp = "bf16" if _bf16(config) else "off"
        for batch in args.batches:
            try:
                probe = memory.probe(config, plan, "train", "cpu", amp, batch)
                row = {
                    "size": size,
                    "batch": batch,
                    "amp": amp,
                    "peak_bytes": probe.peak_bytes,
                    "seconds": probe.seconds,
                }
            except memory.ProbeFailed as exc:
                row = {"size": size, "batch": batch, "amp": amp, "failed": str(exc)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        sampled = memory.probe(config, plan, "sample", "cpu", "off", memory.SAMPLE_BATCH)
        rows.append(
            {
                "size": size,
                "sample_batch": memory.SAMPLE_BATCH,
                "peak_bytes": sampled.peak_bytes,
                "seconds": sampled.seconds,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        if args.real_steps:
            with tempfile.TemporaryDirectory(prefix="medsynth-memory-") as tmp:
                real = real_run(
                    args.data, size, args.real_batch, args.real_steps, args.real_volumes, args.overrides, Path(tmp)
                )
                run_config = load_config(
                    ROOT / "configs" / "brain-mri-64.yaml",
                    [
                        f"plan.target_shape=[{size},{size},{size}]",
                        f"train.batch_size={args.real_batch}",
                        *args.overrides,
                    ],
                )
                planned = memory.plan_memory(
                    run_config,
                    real["plan"],
                    "cpu",
                    memory.cache_bytes(run_config, real["plan"], args.real_volumes),
                    measure_sampling=False,
                )
                predicted = planned.peak_bytes + planned.cache_bytes
                row = {
                    "size": size,
                    "real_batch": args.real_batch,
                    "real_peak_bytes": real["peak_bytes"],
                    "dry_run_bytes": predicted,
                    "ratio": predicted / real["peak_bytes"],
                    "real_run_seconds": real["seconds"],
                }
                rows.append(row)
                print(json.dumps(row), flush=True)

    print("\n| size | batch | precision | peak memory, one training step | step time |")
    print("|---|---|---|---|---|")
    for row in rows:
        if "batch" in row:
            figure = row.get("failed") or memory.describe_bytes(row["peak_bytes"])
            seconds = f"{row['seconds']:.2f} s" if "seconds" in row else "-"
            print(f"| {row['size']}³ | {row['batch']} | {row['amp']} | {figure} | {seconds} |")
    print("\n| size | sampling peak (8 volumes a batch) | dry run predicts | real run's peak | ratio |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        sample = next(r for r in rows if r["size"] == size and "sample_batch" in r)
        real = next((r for r in rows if r["size"] == size and "real_batch" in r), None)
        compare = (
            f"{memory.describe_bytes(real['dry_run_bytes'])} | {memory.describe_bytes(real['real_peak_bytes'])} | {real['ratio']:.2f}"
            if real
            else "- | - | -"
        )
        print(f"| {size}³ | {memory.describe_bytes(sample['peak_bytes'])} | {compare} |")
    if args.out:
        args.out.write_text(json.dumps({"machine": machine_description(torch.device("cpu")), "rows": rows}, indent=1))


def real_only(args) -> None:
    """Real runs first (their process peaks read from RUSAGE_CHILDREN, so before any probe), then
    the probe a dry run makes at each run's batch."""
    print(f"machine: {machine_description(torch.device('cpu'))}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="medsynth-memory-") as tmp:
        for size in sorted(args.sizes):
            real = real_run(
                args.data, size, args.real_batch, args.real_steps, args.real_volumes, args.overrides, Path(tmp)
            )
            rows.append({"size": size, **{k: v for k, v in real.items() if k != "plan"}, "plan": real["plan"]})
    for row in rows:
        size = row["size"]
        config = load_config(
            ROOT / "configs" / "brain-mri-64.yaml", [f"plan.target_shape=[{size},{size},{size}]", *args.overrides]
        )
        plan = row.pop("plan")
        probe = memory.probe(config, plan, "train", "cpu", "bf16" if _bf16(config) else "off", args.real_batch)
        row["dry_run_bytes"] = probe.peak_bytes + memory.cache_bytes(config, plan, args.real_volumes)
        print(json.dumps(row), flush=True)
    print(
        "\n| size | batch | dry run: the step + the cache | real run's process peak | ratio | real run, peak over logged steps |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        peak = row["peak_bytes"]
        ratio = f"{row['dry_run_bytes'] / peak:.2f}" if peak else "-"
        print(
            f"| {row['size']}³ | {args.real_batch} | {memory.describe_bytes(row['dry_run_bytes'])} | "
            f"{memory.describe_bytes(peak) if peak else '-'} | {ratio} | {memory.describe_bytes(row['logged_peak_bytes'])} |"
        )


def compare_variants(args) -> None:
    """The baseline (the brain preset with --set) and each --compare variant, probed one after
    another at every size and batch: the run's peak (step, checkpoint and preview), the steps' own
    peak, each above PyTorch's footprint, and the step time; ratios against the baseline."""
    print(f"machine: {machine_description(torch.device('cpu'))}")
    variants = [("baseline", [])] + [
        (name, settings.split()) for name, settings in (item.split("=", 1) for item in args.compare)
    ]
    rows = []
    for size in args.sizes:
        plan = a_plan(size)
        for batch in args.batches:
            for name, settings in variants:
                config = load_config(
                    ROOT / "configs" / "brain-mri-64.yaml",
                    [f"plan.target_shape=[{size},{size},{size}]", *args.overrides, *settings],
                )
                amp = "bf16" if _bf16(config) else "off"
                probe = memory.probe(config, plan, "train", "cpu", amp, batch)
                row = {"size": size, "batch": batch, "variant": name, "amp": amp, **dataclasses.asdict(probe)}
                if args.tensors:
                    row["tensors"] = tensor_peak(config, plan, amp, batch)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(
        "\n| size | batch | variant | run peak | steps' peak | above PyTorch (run) | ratio to baseline | step time | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        base = next(r for r in rows if r["size"] == row["size"] and r["batch"] == row["batch"])
        above = row["peak_bytes"] - row["baseline_bytes"]
        base_above = base["peak_bytes"] - base["baseline_bytes"]
        print(
            f"| {row['size']}³ | {row['batch']} | {row['variant']} | {memory.describe_bytes(row['peak_bytes'])} | "
            f"{memory.describe_bytes(row['step_peak_bytes'])} | {memory.describe_bytes(above)} | "
            f"{above / base_above:.2f} | {row['seconds']:.1f} s | {row['seconds'] / base['seconds']:.2f} |"
        )
    if args.tensors:
        print_tensor_table(rows)
    if args.out:
        args.out.write_text(json.dumps({"machine": machine_description(torch.device("cpu")), "rows": rows}, indent=1))


# The profiler's memory categories, in the order of the rows of its exported timeline (after a
# leading 0): torch.profiler._memory_profiler's _CATEGORY_TO_INDEX, None being "unknown".
TENSOR_CATEGORIES = (
    "parameters",
    "optimiser state",
    "inputs",
    "temporaries",
    "activations",
    "gradients",
    "autograd detail",
    "unknown",
)


def tensor_peak(config, plan, amp: str, batch: int) -> dict:
    """The peak of live tensor bytes over one training step at `batch` (what CUDA's
    `max_memory_allocated` counts, here on the CPU), after a warm-up step so that the optimiser
    states exist, and the bytes of each category at that moment. In this process: the profiler
    records every tensor the step allocates or frees, and every older one it touches (the weights,
    the EMA, Adam's moments)."""
    from torch.profiler import ProfilerActivity, profile

    from medsynth.config import replace
    from medsynth.distributed import Runtime

    config = replace(config, train=replace(config.train, batch_size=batch, amp=amp))
    with tempfile.TemporaryDirectory(prefix="medsynth-tensors-") as tmp:
        trainer = memory.random_volume_trainer(config, plan, Runtime(device=torch.device("cpu")), Path(tmp))
        try:
            trainer.train_step()
            with profile(
                activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
            ) as prof:
                trainer.train_step()
        finally:
            trainer.metrics.close()
        timeline = Path(tmp) / "timeline.json"
        prof.export_memory_timeline(str(timeline), device="cpu")
        _times, sizes = json.loads(timeline.read_text())
    totals = [sum(row) for row in sizes]
    at_peak = sizes[max(range(len(totals)), key=totals.__getitem__)][1:]  # (categories,), the leading 0 dropped
    return {"peak_bytes": max(totals), "by_category": dict(zip(TENSOR_CATEGORIES, at_peak, strict=True))}


def print_tensor_table(rows: list[dict]) -> None:
    """The tensor peaks beside the baseline's, and what they hold at that moment."""
    shown = [c for c in TENSOR_CATEGORIES if any(r["tensors"]["by_category"][c] for r in rows)]
    print("\nLive tensors, one training step (what CUDA's max_memory_allocated counts):\n")
    print("| size | batch | variant | tensor peak | ratio to baseline | " + " | ".join(shown) + " |")
    print("|---|---|---|---|---|" + "---|" * len(shown))
    for row in rows:
        base = next(r for r in rows if r["size"] == row["size"] and r["batch"] == row["batch"])
        tensors = row["tensors"]
        parts = " | ".join(memory.describe_bytes(tensors["by_category"][c]) for c in shown)
        print(
            f"| {row['size']}³ | {row['batch']} | {row['variant']} | {memory.describe_bytes(tensors['peak_bytes'])} | "
            f"{tensors['peak_bytes'] / base['tensors']['peak_bytes']:.2f} | {parts} |"
        )


def _bf16(config) -> bool:
    from medsynth.precision import choose_precision

    return choose_precision(config.train.amp, torch.device("cpu")).bf16


if __name__ == "__main__":
    main()
