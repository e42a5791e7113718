"""Device choice and torch.distributed set-up for `medsynth train` under torchrun.

`torchrun --nproc_per_node K medsynth train ...` sets WORLD_SIZE, RANK and LOCAL_RANK; this module
reads them, starts the process group (nccl on GPUs, gloo on CPU, so it can be tested anywhere)
and says which process is the main one, which alone writes files and logs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from medsynth.errors import UsageError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(setting: str = "auto") -> torch.device:
    """'auto' picks CUDA when present; anything else is passed to torch.device and checked."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except RuntimeError:
        raise UsageError(f"--device {setting}: not a device (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {setting}: CUDA is not available on this machine")
    return device


def setup(device_setting: str = "auto") -> Runtime:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Runtime(device=resolve_device(device_setting))
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    wanted = resolve_device(device_setting)
    if wanted.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Runtime(device=device, rank=rank, world_size=world_size, local_rank=local_rank)


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        import torch.distributed as dist

        dist.barrier()


def teardown(runtime: Runtime) -> None:
    if runtime.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def any_rank(runtime: Runtime, flag: bool) -> bool:
    """True on every process if `flag` is true on any: all ranks must agree to stop together."""
    if not runtime.distributed:
        return flag
    import torch.distributed as dist

    value = torch.tensor([1.0 if flag else 0.0], device=runtime.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def sum_over_ranks(runtime: Runtime, values: tuple[float, ...]) -> tuple[float, ...]:
    """Each value summed over all processes (itself when there is one)."""
    if not runtime.distributed:
        return values
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tuple(tensor.tolist())


def set_threads(threads: int | None) -> None:
    """Compute threads of this process (`--threads`); None keeps torch's default (one per core it
    may run on). Give each of several processes on one machine its share, or match a scheduler's
    allocation (SLURM's --cpus-per-task)."""
    if threads is not None:
        torch.set_num_threads(threads)
