"""Adversarial losses by name, and the R1 and gradient penalties.

All take raw discriminator logits. For the default `non_saturating` game (Goodfellow et al. 2014):
D minimises the binary cross-entropy of real volumes labelled 1 and generated ones labelled 0;
G is trained with flipped labels, i.e. it minimises -log D(G(z)) = softplus(-logit), which keeps
its gradient strong early on, when D rejects every sample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

LOSSES = ("non_saturating", "hinge", "wgan_gp")


def discriminator_loss(name: str, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    if name == "non_saturating":
        real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
        fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
        return real + fake
    if name == "hinge":
        return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()
    if name == "wgan_gp":
        return fake_logits.mean() - real_logits.mean()
    raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")


def generator_loss(name: str, fake_logits: torch.Tensor) -> torch.Tensor:
    if name == "non_saturating":
        # -log sigmoid(logit): the BCE of fakes against the flipped label 1.
        return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
    if name in ("hinge", "wgan_gp"):
        return -fake_logits.mean()
    raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")


def r1_penalty(real_logits: torch.Tensor, real: torch.Tensor | Sequence[Any]) -> torch.Tensor:
    """gamma-free R1: E ||grad_x D(x)||^2 on real data. `real` must require grad: one tensor, or
    the tensors of a tuple of inputs D reads together (the hierarchical model's views, whose
    gradients make one vector per sample)."""
    inputs = [real] if isinstance(real, torch.Tensor) else [part for part in real if isinstance(part, torch.Tensor)]
    gradients = torch.autograd.grad(real_logits.sum(), inputs, create_graph=True)
    return torch.stack([g.pow(2).flatten(1).sum(1) for g in gradients]).sum(0).mean()


def gradient_penalty(
    discriminator: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor, fake: torch.Tensor
) -> torch.Tensor:
    """WGAN-GP: E (||grad D(x_hat)|| - 1)^2 on random interpolates x_hat of real and fake."""
    mix = torch.rand(real.shape[0], *([1] * (real.dim() - 1)), device=real.device, dtype=real.dtype)
    interpolates = (mix * real + (1.0 - mix) * fake).requires_grad_(True)
    logits = discriminator(interpolates)
    (gradient,) = torch.autograd.grad(logits.sum(), interpolates, create_graph=True)
    return (gradient.flatten(1).norm(2, dim=1) - 1.0).pow(2).mean()


def discriminator_confidence(name: str, logits: torch.Tensor) -> float:
    """Mean D output for reporting: a probability for the BCE game, the raw critic value otherwise."""
    if name == "non_saturating":
        return float(torch.sigmoid(logits.float()).mean())
    return float(logits.float().mean())
