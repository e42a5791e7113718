"""Sampling throughput at 64³ and 128³: generating against writing, and the gzip choice.

    python benchmarks/sample_throughput.py [--sizes 64 128] [--count 16] [--repeats 3]

For each size, with a freshly initialised generator (its weights do not change the cost):
  * generation alone (the network, in its fixed micro-batches), in volumes/s;
  * writing alone, one volume to .nii.gz, for: uncompressed .nii, zlib at levels 1 and 6, and
    python-isal's igzip at level 1 (what medsynth uses);
  * `medsynth sample` end to end (generation and threaded writing overlapping), in volumes/s,
    and the share of a volume's time spent generating and writing.
Medians over the repeats.
"""

from __future__ import annotations

import argparse
import gzip
import tempfile
from pathlib import Path

import numpy as np
import torch

from medsynth.checkpoint import save_checkpoint
from medsynth.config import config_to_dict, load_config
from medsynth.distributed import resolve_device
from medsynth.io import cast_for_storage
from medsynth.models import build_models
from medsynth.plan import Plan
from medsynth.precision import machine_description, median_seconds
from medsynth.sample import SampleRequest, generate, latent_for, run_sampling


def make_checkpoint(folder: Path, size: int) -> Path:
    config = load_config(None, [f"plan.target_shape=[{size},{size},{size}]"])
    torch.manual_seed(0)
    generator, _ = build_models(config.model, (size, size, size))
    plan = Plan(
        modality="ct",
        target_shape=(size, size, size),
        spacing=(1.0, 1.0, 1.0),
        deoblique=True,
        intensity_mode="fixed",
        window=(-1024.0, 2048.0),
        percentiles=None,
        output_dtype="int16",
        n_sources=0,
    ).to_dict()
    return save_checkpoint(
        folder / f"g{size}.pt",
        {
            "step": 0,
            "config": config_to_dict(config),
            "plan": plan,
            "generator": generator.state_dict(),
            "generator_ema": generator.state_dict(),
        },
    )


def benchmark_size(size: int, folder: Path, count: int, repeats: int, device: torch.device) -> None:
    import nibabel as nib
    from isal import igzip

    from medsynth.checkpoint import generator_from_checkpoint, load_checkpoint

    checkpoint = make_checkpoint(folder, size)
    payload = load_checkpoint(checkpoint)
    generator = generator_from_checkpoint(payload).to(device)
    latents = torch.stack([latent_for(0, i, 128, "normal") for i in range(count)])  # (count, 128)
    t_generate = median_seconds(lambda: generate(generator, latents, device), repeats, device) / count
    volume = generate(generator, latents[:1], device)[0]
    values = cast_for_storage(Plan.from_dict(payload["plan"]).to_real_units(volume), "int16")
    raw = nib.Nifti1Image(values, np.eye(4)).to_bytes()
    writers = {
        ".nii, uncompressed": lambda: raw,
        "zlib level 1": lambda: gzip.compress(raw, compresslevel=1, mtime=0),
        "zlib level 6": lambda: gzip.compress(raw, compresslevel=6, mtime=0),
        "isal igzip level 1 (used)": lambda: igzip.compress(raw, compresslevel=1, mtime=0),
    }
    print(f"\n{size}³, int16 ({len(raw) / 2**20:.1f} MiB raw): generating {1 / t_generate:.1f} vol/s")
    write_times = {}
    for name, write in writers.items():
        seconds = median_seconds(lambda write=write: Path(folder, "v.nii.gz").write_bytes(write()), repeats, device)
        write_times[name] = seconds
        share = seconds / (seconds + t_generate)
        size_mib = len(write()) / 2**20
        print(f"  write {name:28s}: {seconds * 1000:6.1f} ms, {size_mib:5.2f} MiB, {share:4.0%} of generate+write")
    ratio = write_times["zlib level 6"] / write_times["isal igzip level 1 (used)"]
    print(f"  igzip-1 writes {ratio:.1f}x faster than zlib-6 (nibabel's default)")
    out = folder / f"out{size}"

    def end_to_end():
        run_sampling(SampleRequest(checkpoint=checkpoint, count=count, out_dir=out, device=device, force=True))

    seconds = median_seconds(end_to_end, repeats, device)
    print(
        f"  medsynth sample end to end: {count / seconds:.1f} vol/s, {count / seconds * t_generate:.2f}x generation alone"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    print(f"ran on: {machine_description(device)}; sampling runs in fp32 (the same voxels on every machine)")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            benchmark_size(size, Path(tmp), args.count, args.repeats, device)


if __name__ == "__main__":
    main()
