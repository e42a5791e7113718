"""Training throughput at 32³, 64³ and 128³, against the machine's peak and a plain reference.

    python benchmarks/train_step.py [--sizes 32 64 128] [--steps 5] [--data DIR] [--device cpu] [--set key=value]
    python benchmarks/train_step.py --sizes 64 --steps 16 --rounds 5 [--config configs/brain-mri-64.yaml] \
        --compare transposed=model.upsample=transposed --compare lazy-r1='loss.r1_interval=16'

In one run, for each size:
  * medsynth's Trainer step on the memory-mapped cache (bf16 autocast where the device has it),
    as volumes/s and achieved GFLOP/s;
  * a plain reference of the same network, as typical research code writes it: fp32, default
    memory format, and a loader that reads the NIfTI files with nibabel and resizes them with
    torch every step;
and once, the machine's own Conv3d peak (a large 3x3x3 convolution: fp32, and bf16 only where the
device runs it natively; emulated bf16 would take minutes and is never used).
Reports medians over the timed steps (after warm-up) and the ratios, and first says where it ran:
CPU model, cores, ISA features, torch and oneDNN versions, and the precision each step used.

With --compare NAME='SETTINGS', the settings are a variant of the baseline (`--config` and `--set`)
and the benchmark times the baseline and each variant side by side instead of the reference: the
trainers are built once and take turns, `--rounds` times, each timing `--steps` consecutive steps
(a multiple of `loss.r1_interval`, so lazy R1's occasional penalty is counted at its share). A
trainer's figure is the median over rounds of its mean step time; taking turns spreads any drift
of the machine (another process, frequency) over all of them. Each variant's throughput is
reported as a ratio to the baseline's measured in the same run.
"""

from __future__ import annotations

import argparse
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import torch

from medsynth.config import load_config
from medsynth.distributed import Runtime, resolve_device
from medsynth.losses import discriminator_loss, generator_loss
from medsynth.models import build_models
from medsynth.precision import choose_precision, elapsed_seconds, machine_description, median_seconds, native_bf16
from medsynth.runs import describe_models
from medsynth.train import Trainer

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "train" / "ixi-t1"


def conv3d_peak(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """GFLOP/s of one large Conv3d forward: the ceiling this machine offers these networks."""
    conv = torch.nn.Conv3d(64, 64, 3, padding=1, bias=False).to(device)
    x = torch.randn(4, 64, 32, 32, 32, device=device)
    flops = 2 * 64 * 64 * 27 * 4 * 32**3
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        return flops / median_seconds(lambda: conv(x), repeats, device) / 1e9


class ReferenceLoop:
    """The same G and D and the same game, written plainly: fp32, NCDHW, nibabel every step."""

    def __init__(self, config, shape, files: list[Path], device: torch.device):
        from medsynth.config import ModelConfig

        self.device = device
        # The same layers, fed one volume per D input as plain DCGAN code does (no PacGAN packing).
        model = ModelConfig(**{**config.model.__dict__, "pack": 1})
        self.generator, self.discriminator = (m.to(device) for m in build_models(model, shape))
        self.opt_g = torch.optim.Adam(self.generator.parameters(), 2e-4, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), 2e-4, betas=(0.5, 0.999))
        self.files, self.shape, self.batch = files, shape, config.train.batch_size
        self.latent_dim = config.model.latent_dim
        self.rng = np.random.default_rng(0)

    def _batch(self) -> torch.Tensor:
        import nibabel as nib
        import torch.nn.functional as F

        volumes = []
        for path in self.rng.choice(self.files, self.batch):
            data = torch.from_numpy(nib.load(str(path)).get_fdata(dtype=np.float32))[None, None]
            data = F.interpolate(data, size=self.shape, mode="trilinear", align_corners=False)
            data = (data - data.min()) / (data.max() - data.min() + 1e-6) * 2 - 1
            volumes.append(data)
        return torch.cat(volumes).to(self.device)

    def step(self) -> None:
        real = self._batch()
        fake = self.generator(torch.randn(self.batch, self.latent_dim, device=self.device))
        loss_d = discriminator_loss("non_saturating", self.discriminator(real), self.discriminator(fake.detach()))
        self.opt_d.zero_grad()
        loss_d.backward()
        self.opt_d.step()
        loss_g = generator_loss("non_saturating", self.discriminator(fake))
        self.opt_g.zero_grad()
        loss_g.backward()
        self.opt_g.step()


def benchmark_config(args: argparse.Namespace, size: int, batch: int, overrides: list[str]):
    return load_config(
        args.config,
        [
            f"plan.target_shape=[{size},{size},{size}]",
            f"model.base_channels={args.base_channels}",
            f"train.batch_size={batch}",
            "train.max_steps=1000000",
            "train.max_minutes=null",
            "cache.workers=2",
            *overrides,
        ],
    )


def run_steps(trainer: Trainer, steps: int) -> None:
    for _ in range(steps):
        trainer.train_step()


def compare_variants(
    args: argparse.Namespace, data_dir: Path, tmp: Path, device: torch.device, runtime: Runtime
) -> None:
    """The baseline and each --compare variant, timed in turns in one process (see the docstring)."""
    import shlex
    import statistics

    from medsynth.pipeline import prepare_dataset

    variants = [("baseline", [])]
    for spec in args.compare:
        name, _, settings = spec.partition("=")
        variants.append((name, shlex.split(settings)))
    print("| size | batch | variant | s/step (median of rounds) | rounds' range | vol/s | ratio to baseline |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        batch = args.batch_size if size <= 64 else max(1, args.batch_size // 4)
        trainers = []
        for name, settings in variants:
            config = benchmark_config(args, size, batch, [*args.overrides, *settings])
            prepared = prepare_dataset(data_dir, config, cache_dir=tmp / "cache")
            paths = [e.path for e in prepared.entries]
            trainer = Trainer(config, prepared.plan, paths, tmp / f"run{size}-{name}", runtime)
            for _ in range(2):  # warm-up: allocations, oneDNN primitives
                trainer.train_step()
            trainers.append((name, trainer, []))
        for _ in range(args.rounds):
            for _, trainer, rounds in trainers:
                turn = partial(run_steps, trainer, args.steps)
                rounds.append(elapsed_seconds(turn, device) / args.steps)
        base = statistics.median(trainers[0][2])
        for name, trainer, rounds in trainers:
            seconds = statistics.median(rounds)
            trainer.metrics.close()
            print(
                f"| {size}³ | {batch} | {name} | {seconds:.3f} | {min(rounds):.3f}-{max(rounds):.3f} "
                f"| {batch / seconds:.2f} | {base / seconds:.2f}x |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--base-channels", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="a medsynth setting, e.g. loss.r1_interval=16"
    )
    parser.add_argument("--config", type=Path, help="a config file under the settings (default: medsynth's defaults)")
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="NAME=SETTINGS",
        help="a variant timed against the baseline in the same run, e.g. transposed=model.upsample=transposed",
    )
    parser.add_argument("--rounds", type=int, default=5, help="with --compare: turns each trainer takes")
    args = parser.parse_args()
    device = resolve_device(args.device)
    runtime = Runtime(device=device)

    with tempfile.TemporaryDirectory() as tmp:
        files = sorted(args.data.glob("*.nii.gz")) if args.data.is_dir() else []
        if not files:
            from medsynth.phantoms import write_phantoms

            files = write_phantoms(Path(tmp) / "phantoms", 16, shape=(96, 96, 96), spacing=2.0)
            print(f"no data at {args.data}: using 16 phantoms")
        data_dir = files[0].parent
        print(f"ran on: {machine_description(device)}")
        fp32_peak = conv3d_peak(device, torch.float32)
        bf16_peak = conv3d_peak(device, torch.bfloat16) if native_bf16(device) else None
        bf16_text = f"{bf16_peak:.0f} GFLOP/s" if bf16_peak else "not native here, not measured"
        print(f"device {device}; Conv3d peak: fp32 {fp32_peak:.0f} GFLOP/s, bf16 {bf16_text}\n")
        if args.compare:
            compare_variants(args, data_dir, Path(tmp), device, runtime)
            return
        rows = []
        for size in args.sizes:
            batch = args.batch_size if size <= 64 else max(1, args.batch_size // 4)
            config = benchmark_config(args, size, batch, args.overrides)
            from medsynth.pipeline import prepare_dataset

            prepared = prepare_dataset(data_dir, config, cache_dir=Path(tmp) / "cache")
            trainer = Trainer(
                config, prepared.plan, [e.path for e in prepared.entries], Path(tmp) / f"run{size}", runtime
            )
            gflop = describe_models(config, prepared.plan)["gflops_per_step"]
            ours = median_seconds(trainer.train_step, args.steps, device)
            trainer.metrics.close()
            reference = ReferenceLoop(config, prepared.plan.target_shape, files, device)
            plain = median_seconds(reference.step, args.steps, device)
            bf16 = choose_precision(config.train.amp, device).bf16
            peak = bf16_peak if bf16 and bf16_peak else fp32_peak
            rows.append((size, batch, ours, plain, gflop, peak, bf16))
            print(
                f"{size}³ batch {batch}: medsynth {batch / ours:6.2f} vol/s ({gflop / ours:5.0f} GFLOP/s, "
                f"{gflop / ours / peak:4.0%} of the {'bf16' if rows[-1][-1] else 'fp32'} Conv3d peak) | "
                f"reference {batch / plain:6.2f} vol/s ({gflop / plain:5.0f} GFLOP/s) | speed-up {plain / ours:4.2f}x",
                flush=True,
            )
        print("\n| size | batch | medsynth vol/s | GFLOP/s | share of peak | reference vol/s | speed-up |")
        print("|---|---|---|---|---|---|---|")
        for size, batch, ours, plain, gflop, peak, bf16 in rows:
            print(
                f"| {size}³ | {batch} | {batch / ours:.2f} | {gflop / ours:.0f} | {gflop / ours / peak:.0%} ({'bf16' if bf16 else 'fp32'}) "
                f"| {batch / plain:.2f} | {plain / ours:.2f}x |"
            )


if __name__ == "__main__":
    main()
