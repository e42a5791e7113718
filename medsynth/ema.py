"""The exponential moving average of the generator's weights, which previews and sampling use.

GAN weights oscillate; their average over the last thousand or so steps makes cleaner volumes
than any single step's (Yazici et al. 2019; used by StyleGAN and most modern GANs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medsynth.models import sample_latent


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, step: int, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, with TensorFlow's warm-up: early on, when the
    average would mostly remember the random initialisation, follow the model closely."""
    decay = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)
    for ema_buffer, buffer in zip(ema.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)


@torch.no_grad()
def recalibrate_batchnorm(
    generator: nn.Module,
    latent_dim: int,
    prior: str,
    device: torch.device,
    seed: int,
    batches: int = 8,
    batch_size: int = 8,
    condition_codes: torch.Tensor | None = None,
    slab_starts: Sequence[int] | None = None,
) -> None:
    """Recompute BatchNorm running statistics for the current (EMA) weights ("standing statistics").

    The EMA generator's weights are an average over many steps, so the running statistics copied
    from the live generator do not match them; sampling in eval mode with mismatched statistics
    gives washed-out volumes. A few batches through the EMA weights fix that. Noise comes from its
    own generator, so training's random stream is untouched. A conditional generator is run on
    rows of `condition_codes` (n, width), the training set's, drawn from the same generator.

    A hierarchical generator (`slab_starts`: where its slabs tile the volume) runs as in training,
    its trunk and one slab a batch, the slabs in turn (every slab as often): its head's statistics
    are per slab either way, and the whole full-resolution volume, which set a 256³ run's memory
    peak, is never made.
    """
    norms = [m for m in generator.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    generator.train()
    rng = torch.Generator(device=device).manual_seed(seed)
    starts = list(slab_starts) if slab_starts else [None]
    batches = -(-batches // len(starts)) * len(starts)  # whole rounds of the slabs
    for i in range(batches):
        z = sample_latent(batch_size, latent_dim, prior, rng, device)
        if starts[0] is not None:
            generator(z, slab_start=starts[i % len(starts)])  # (the whole volume at 1/4, one slab)
        elif condition_codes is None:
            generator(z)
        else:
            rows = torch.randint(len(condition_codes), (batch_size,), generator=rng, device=device)
            generator(z, condition_codes.to(device)[rows])
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    generator.eval()
