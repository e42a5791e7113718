"""`medsynth demo`: the whole pipeline on built-in phantoms, with no data to download.

Writes procedural head phantoms (CT, in Hounsfield units) as NIfTI, trains a small model on them
for a few minutes on a CPU, samples synthetic volumes from it and writes preview PNGs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from medsynth.config import Config, load_config

# A small model that learns the phantoms' anatomy in a few minutes on two CPU cores.
DEMO_SETTINGS = [
    "plan.modality=ct",
    "plan.ct_window=[-100,200]",  # brain window, wide enough for bone to saturate: soft tissue shows
    "model.latent_dim=64",
    "model.base_channels=16",
    "train.batch_size=8",
    "train.preview_every=250",
    "train.checkpoint_every=250",
    "train.log_every=50",
    "train.amp=auto",
    "cache.workers=1",
    # R1 every 16th D update (scaled) and one G forward for both halves of a step: 1.45x faster
    # with AVX2 kernels only (3 min 51 s -> 2 min 39 s on a 2-core EPYC limited to AVX2), with
    # samples of the same kind (docs/benchmarks.md).
    "loss.r1_interval=16",
    "loss.share_fake=true",
]


def demo_config(steps: int, size: int, extra: list[str] | tuple[str, ...] = ()) -> Config:
    return load_config(
        None, [*DEMO_SETTINGS, f"plan.target_shape=[{size},{size},{size}]", f"train.max_steps={steps}", *extra]
    )


def run_demo(
    out_dir: Path,
    config: Config,
    runtime,
    phantoms: int = 32,
    samples: int = 8,
    force: bool = False,
    progress: Callable | None = None,
    on_step: Callable | None = None,
    on_message: Callable[[str], None] | None = None,
    on_event: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    from medsynth.phantoms import write_phantoms
    from medsynth.runs import train_run
    from medsynth.sample import SampleRequest, run_sampling

    say = on_message or (lambda message: None)
    data = out_dir / "phantoms"
    existing = sorted(data.glob("phantom_*.nii.gz"))
    if len(existing) != phantoms:
        say(f"writing {phantoms} head phantoms to {data}")
        for old in existing:
            old.unlink()
        write_phantoms(data, phantoms, shape=(80, 80, 80), spacing=2.5)
    run = out_dir / "run"
    result = train_run(
        data, run, config, runtime, force=force, progress=progress, on_step=on_step, on_message=say, on_event=on_event
    )
    say(f"sampling {samples} synthetic volumes")
    summary = run_sampling(
        SampleRequest(
            checkpoint=run,
            count=samples,
            out_dir=out_dir / "samples",
            seed=0,
            device=runtime.device,
            preview=True,
            force=True,
        ),
        progress=progress,
    )
    return {
        "phantoms": str(data),
        "run": str(run),
        "step": result.step,
        "real_preview": str(run / "previews" / "real.png"),
        "training_preview": str(run / "previews" / "latest.png"),
        "samples": summary["out_dir"],
        "sample_preview": summary["preview"],
    }
