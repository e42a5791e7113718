"""Volume-to-volume similarity: 3D MS-SSIM, and normalised cross-correlation that survives shifts."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def downsample(volumes: np.ndarray, side: int) -> torch.Tensor:
    """(N, X, Y, Z) -> (N, 1, x, y, z) float32 with the longest axis `side` (area averaging)."""
    tensor = torch.as_tensor(np.asarray(volumes, dtype=np.float32))[:, None]
    factor = max(1, max(tensor.shape[2:]) // side)
    if factor > 1:
        tensor = F.avg_pool3d(tensor, factor, factor)
    return tensor


def central_patch(volumes: np.ndarray, side: int) -> torch.Tensor:
    """(N, X, Y, Z) -> (N, 1, x, y, z) float32: the central `side` voxels of each axis (all of a
    shorter one), at full resolution."""
    tensor = torch.as_tensor(np.asarray(volumes, dtype=np.float32))[:, None]
    for axis in (2, 3, 4):
        length = min(side, tensor.shape[axis])
        tensor = tensor.narrow(axis, (tensor.shape[axis] - length) // 2, length)
    return tensor.contiguous()


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _band_matrix(window: torch.Tensor, length: int) -> torch.Tensor:
    """(length - n + 1, length): row i holds the window at columns i..i+n-1 ('valid' filtering)."""
    n = window.numel()
    rows = torch.arange(length - n + 1)[:, None]
    columns = rows + torch.arange(n)[None, :]
    band = torch.zeros(length - n + 1, length, dtype=window.dtype, device=window.device)
    band[rows.expand(-1, n), columns] = window.expand(length - n + 1, -1)
    return band


def _blur(volume: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter, 'valid' region only: (B, C, X, Y, Z) -> smaller.

    Each axis is a matrix product with a banded matrix: on CPU that is about 6x faster than
    single-channel Conv3d with a 1D kernel, which oneDNN runs on a slow path."""
    for axis in range(2, 5):
        band = _band_matrix(window, volume.shape[axis])
        volume = torch.movedim(torch.movedim(volume, axis, -1) @ band.T, -1, axis)
    return volume


# Wang, Simoncelli & Bovik (2003): the weights of the five scales.
_MS_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def ms_ssim(
    a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, low: float = -1.0, window: int = 7, sigma: float = 1.5
) -> torch.Tensor:
    """3D multi-scale SSIM of pairs: a, b (B, 1, X, Y, Z), intensities in [low, low + data_range]
    (medsynth's [-1, 1] by default) -> (B,).

    SSIM is defined for non-negative intensities, [0, data_range]: its luminance term
    (2 mu_a mu_b + c1) / (mu_a² + mu_b² + c1) turns negative where two local means straddle zero,
    so on [-1, 1] volumes mid-grey regions of +0.05 and -0.05 scored -0.85 (clamped to 1e-6), and the
    coarsest scale's luminance decided the whole figure. The volumes are shifted to [0, data_range]
    first; the contrast-structure terms do not change with the shift.

    Volumes of 32-64 voxels are too small for the original five scales with an 11-voxel window,
    so this uses a 7-voxel window and as many scales as fit (at least 2), with the original
    weights renormalised over them.
    """
    a, b = a - low, b - low
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    kernel = _gaussian_window(window, sigma).to(a.device)
    scales = 1
    while scales < len(_MS_WEIGHTS) and min(a.shape[2:]) // 2**scales >= window:
        scales += 1
    weights = torch.tensor(_MS_WEIGHTS[:scales], device=a.device)
    weights = weights / weights.sum()
    values = []
    for scale in range(scales):
        # One filtering pass over all five moments: (B, 5, x, y, z).
        mu_a, mu_b, aa, bb, ab = _blur(torch.cat([a, b, a * a, b * b, a * b], dim=1), kernel).split(1, dim=1)
        sigma_a = aa - mu_a**2
        sigma_b = bb - mu_b**2
        sigma_ab = ab - mu_a * mu_b
        contrast_structure = (2 * sigma_ab + c2) / (sigma_a + sigma_b + c2)
        if scale == scales - 1:
            luminance = (2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1)
            values.append((luminance * contrast_structure).flatten(1).mean(1))
        else:
            values.append(contrast_structure.flatten(1).mean(1))
            a, b = F.avg_pool3d(a, 2), F.avg_pool3d(b, 2)
    stacked = torch.stack(values, dim=1).clamp(min=1e-6)  # (B, scales)
    return torch.exp((weights * torch.log(stacked)).sum(1))


def pairwise_ms_ssim(volumes: torch.Tensor, pairs: np.ndarray, batch: int = 16) -> np.ndarray:
    """MS-SSIM of the given index pairs (P, 2) within one set of (N, 1, x, y, z) volumes."""
    out = []
    for start in range(0, len(pairs), batch):
        chunk = pairs[start : start + batch]
        out.append(ms_ssim(volumes[chunk[:, 0]], volumes[chunk[:, 1]]).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def _standardise(volumes: torch.Tensor) -> torch.Tensor:
    flat = volumes.flatten(1)
    flat = flat - flat.mean(1, keepdim=True)
    return flat / flat.norm(dim=1, keepdim=True).clamp(min=1e-8)


def max_shifted_ncc(queries: torch.Tensor, references: torch.Tensor, max_shift: int = 2) -> torch.Tensor:
    """Normalised cross-correlation of every query with every reference, maximised over integer
    shifts of up to `max_shift` voxels per axis (so a copy that moved a little still matches).

    queries (Q, 1, x, y, z), references (R, 1, x, y, z) -> (Q, R) in [-1, 1].
    """
    reference_flat = _standardise(references)  # (R, V)
    # A circular shift keeps a volume's mean and norm, so standardising once before shifting is exact.
    standard_queries = _standardise(queries).reshape(queries.shape)  # (Q, 1, x, y, z)
    best = torch.full((queries.shape[0], references.shape[0]), -1.0)
    span = range(-max_shift, max_shift + 1)
    for dx in span:
        for dy in span:
            for dz in span:
                shifted = torch.roll(standard_queries, shifts=(dx, dy, dz), dims=(2, 3, 4)).flatten(1)  # (Q, V)
                best = torch.maximum(best, shifted @ reference_flat.T)
    return best
