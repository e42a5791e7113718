"""Which precision a run computes in: bf16 autocast only where it is native and measured faster.

On a GPU with bf16, and on CPUs that run it natively (AVX512-BF16 or AMX), bf16 autocast roughly
halves the step time of these networks. On CPUs without it (AVX2-only laptops, cloud VMs, many
cluster nodes) oneDNN emulates bf16, and a 64³ training step that takes seconds in fp32 took more
than ten minutes. So `train.amp: auto` never takes bf16 on such a CPU, and on a native one takes
it only after a quick measurement says it is faster; forcing `bf16` where it is emulated still
runs, but says how much slower it measured.

Sampling and evaluation always run in fp32 on the CPU: the voxels a seed gives must not depend
on the machine, and neither ever takes the emulated path.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import statistics
import time
from dataclasses import dataclass

import torch

# bf16 must measure at least this much faster than fp32 for `auto` to take it: a margin, so that
# timing noise on a machine where the two are close does not flip the choice between runs.
AUTO_BF16_MAX_TIME_RATIO = 0.8


@dataclass(frozen=True)
class PrecisionChoice:
    bf16: bool
    reason: str  # one clause for logs and `train --dry-run`
    warning: str | None = None  # one loud line, when the chosen path is known to be slow
    measured_ratio: float | None = None  # bf16 time / fp32 time of the probe, where measured

    @property
    def name(self) -> str:
        return "bf16 autocast" if self.bf16 else "fp32"


def cpu_has_native_bf16() -> bool:
    """True where oneDNN runs bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated, slow."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()


@functools.lru_cache(maxsize=8)
def bf16_time_ratio(device_name: str, repeats: int = 3) -> float:
    """bf16-autocast time over fp32 time of a Conv3d forward and backward of the kind these
    networks are made of (64 channels, a 16³ grid): < 1 where bf16 is faster.

    Measured once per machine and remembered in the cache folder (`precision-*.json`, keyed by
    the CPU, torch and the device), so that every run and every process on one machine makes the
    same choice: a resumed or requeued run must not switch precision on a noisy measurement."""
    import json

    from medsynth.data import default_cache_dir

    identity = f"{device_name}|{cpu_description()}|torch {torch.__version__}|repeats {repeats}"
    record = default_cache_dir() / f"precision-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.json"
    try:
        return float(json.loads(record.read_text())["bf16_time_ratio"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    ratio = _measure_bf16_time_ratio(torch.device(device_name), repeats)
    from medsynth.atomic import atomic_write_json
    from medsynth.errors import WriteError

    with contextlib.suppress(WriteError):  # a read-only cache folder: measure again next time
        atomic_write_json(record, {"machine": identity, "bf16_time_ratio": ratio})
    return ratio


def elapsed_seconds(work, device: torch.device) -> float:
    """Wall time of one `work()`, synchronising CUDA around it so queued kernels are counted."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def median_seconds(work, repeats: int, device: torch.device) -> float:
    """Median wall time of `work()` over `repeats` calls, after one warm-up call (allocations,
    oneDNN primitive creation)."""
    work()
    return statistics.median(elapsed_seconds(work, device) for _ in range(repeats))


def _measure_bf16_time_ratio(device: torch.device, repeats: int) -> float:
    # Small enough to take about half a second natively and a few seconds where bf16 is emulated.
    conv = torch.nn.Conv3d(64, 64, 3, padding=1).to(device)
    x = torch.randn(4, 64, 16, 16, 16, device=device)

    def step(bf16: bool) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = conv(x)
        out.float().square().mean().backward()

    fp32 = median_seconds(lambda: step(False), repeats, device)
    return median_seconds(lambda: step(True), repeats, device) / max(fp32, 1e-9)


def choose_precision(amp: str, device: torch.device) -> PrecisionChoice:
    """The precision for `train.amp` (auto, bf16 or off) on `device`, and why."""
    if amp == "off":
        return PrecisionChoice(False, "fp32 (train.amp=off)")
    native = native_bf16(device)
    if device.type == "cuda":
        if amp == "bf16" or native:
            return PrecisionChoice(True, "bf16 autocast on CUDA")
        return PrecisionChoice(False, "fp32: this GPU has no bf16")
    if device.type != "cpu":
        return PrecisionChoice(amp == "bf16", f"{amp} on {device.type}")
    if not native:
        if amp == "auto":
            return PrecisionChoice(False, "fp32: this CPU has no native bf16 (emulated bf16 is far slower)")
        ratio = bf16_time_ratio(str(device))
        return PrecisionChoice(
            True,
            "bf16 autocast, forced (train.amp=bf16)",
            warning=(
                f"train.amp=bf16 on a CPU without native bf16 ({cpu_description()}): bf16 measured "
                f"{ratio:.0f}x slower than fp32 here; train.amp=auto would train in fp32"
            ),
            measured_ratio=ratio,
        )
    ratio = bf16_time_ratio(str(device))
    if amp == "bf16":
        return PrecisionChoice(True, f"bf16 autocast (train.amp=bf16; native, {1 / ratio:.1f}x fp32)", None, ratio)
    if ratio <= AUTO_BF16_MAX_TIME_RATIO:
        return PrecisionChoice(
            True, f"bf16 autocast: native on this CPU and measured {1 / ratio:.1f}x fp32", None, ratio
        )
    return PrecisionChoice(False, f"fp32: native bf16 measured only {1 / ratio:.2f}x fp32 here", None, ratio)


@functools.lru_cache(maxsize=1)
def cpu_description() -> str:
    """The CPU's model name and the instruction-set features that decide speed here, e.g.
    'AMD EPYC 9R14, 2 cores, AVX2 AVX-512 AVX512-BF16'. For logs and benchmark figures."""
    import os
    import platform

    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name") and ":" in line:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and ":" in line:
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    features = [
        name
        for flag, name in (
            ("avx2", "AVX2"),
            ("avx512f", "AVX-512"),
            ("avx512_bf16", "AVX512-BF16"),
            ("amx_bf16", "AMX"),
        )
        if flag in flags
    ]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    native = "native bf16" if cpu_has_native_bf16() else "no native bf16"
    # What torch actually uses, which environment variables can lower (imitating an older CPU).
    used = f"ATen {torch.backends.cpu.get_cpu_capability()}"
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):
        used += f", oneDNN limited to {os.environ['ONEDNN_MAX_CPU_ISA']}"
    return f"{model}, {cores} cores, {' '.join(features) or 'no AVX2'} ({used}), {native}"


def machine_description(device: torch.device) -> str:
    """Which machine and software a speed figure belongs to: the CPU (or GPU), torch, oneDNN and
    the thread count. Printed beside every benchmark figure."""
    import re

    found = re.search(r"MKL-DNN (v[\d.]+)", torch.__config__.show())  # oneDNN's old name in torch's build info
    onednn = found.group(1) if found else "?"
    if device.type == "cuda":
        machine = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        machine = cpu_description()
    return f"{machine}; torch {torch.__version__}, oneDNN {onednn}, {torch.get_num_threads()} threads"
