"""The 3D DCGAN: `Generator3d` and `Discriminator3d` for any power-of-two volume shape.

Both follow Radford et al. (2016) in 3D. The generator projects the latent vector onto a small base
grid and doubles the grid with strided transposed convolutions (BatchNorm, ReLU) up to the volume
shape, ending in tanh; `model.upsample` swaps the transposed convolutions for resize-convolutions
or sub-pixel convolutions. The discriminator mirrors it with strided convolutions and LeakyReLU(0.2),
with no normalisation on the first layer, and ends in one logit. Shapes need not be cubic: the
number of doublings is set by the shortest axis, so 128×128×64 starts from an 8×8×4 grid.

Paired variants (`label_classes` K > 0, from the plan's label set): G makes an image and its label
map together, (B, 1 + K, X, Y, Z): channel 0 the image, channels 1..K one class each (class k is
the plan's `label_values[k]`), and D judges the pair, 1 + K channels per volume. With K = 0 both
networks are exactly the unlabeled ones: the same modules, parameter names and shapes.

Conditional variants (`conditions`, a `ConditionSpec` from the plan's conditions): G joins z with
an embedding of the condition codes (a cGAN's input conditioning, Mirza & Osindero 2014), or with
`model.condition_generator: batchnorm` lets the embedding set the gain and bias of each of its
BatchNorms (conditional BatchNorm); D is a projection discriminator (Miyato & Koyama 2018).
Without conditions both networks are again exactly the unconditional ones.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from medsynth.conditions import ConditionSpec
from medsynth.config import ModelConfig

# Width of the condition embedding joined to z: enough for a few columns, small beside latent_dim.
CONDITION_EMBEDDING = 32


def stage_count(shape: tuple[int, int, int], base_grid: int) -> int:
    """Number of 2x resolution steps between the base grid and `shape`."""
    shortest = min(shape)
    if shortest < 2 * base_grid:
        raise ValueError(f"volume shape {shape} is too small for model.base_grid={base_grid}")
    return int(math.log2(shortest // base_grid))


def channels_per_stage(config: ModelConfig, stages: int, finest: int | None = None) -> list[int]:
    """Channels at each resolution, finest (shape / 2) first, coarsest (the base grid) last."""
    return [min((finest or config.base_channels) * 2**i, config.max_channels) for i in range(stages)]


def _base_shape(shape: tuple[int, int, int], stages: int) -> tuple[int, int, int]:
    return tuple(n // 2**stages for n in shape)  # type: ignore[return-value]


# Per axis, for output phase r and tap s of the 2-tap phase kernel (input m - 1 + r + s): the index
# 3 - r - 2s of a 4-tap transposed-convolution kernel, listed for (r, s) = (0, 0), (0, 1), (1, 0), (1, 1).
_PHASE_TAPS = torch.tensor([3, 1, 2, 0])


def phase_split_conv_transpose(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """conv_transpose3d(x, weight, stride=2, padding=1) for a 4³ kernel, as one ordinary convolution.

    Output voxel 2m + r (r = 0 or 1 per axis: 8 phases in 3D) sums 2×2×2 of the kernel's taps over
    inputs m - 1 + r and m + r. So the layer is a 2×2×2 Conv3d with 8·C_out outputs over the input
    padded by one, whose phase r is read at offset r and interleaved.
    """
    c_in, c_out = weight.shape[:2]
    w = weight  # (C_in, C_out, 4, 4, 4)
    for axis in (2, 3, 4):
        w = w.index_select(axis, _PHASE_TAPS.to(w.device))
    w = w.view(c_in, c_out, 2, 2, 2, 2, 2, 2)  # (C_in, C_out, rx, sx, ry, sy, rz, sz)
    w = w.permute(2, 4, 6, 1, 0, 3, 5, 7).reshape(8 * c_out, c_in, 2, 2, 2)  # one C_out block per phase
    y = nn.functional.conv3d(nn.functional.pad(x, (1, 1, 1, 1, 1, 1)), w)  # (B, 8·C_out, X+1, Y+1, Z+1)
    b, (nx, ny, nz) = x.shape[0], x.shape[2:]
    phases = [
        y[:, p * c_out : (p + 1) * c_out, rx : rx + nx, ry : ry + ny, rz : rz + nz]
        for p, (rx, ry, rz) in enumerate((rx, ry, rz) for rx in (0, 1) for ry in (0, 1) for rz in (0, 1))
    ]
    out = torch.stack(phases, 1).view(b, 2, 2, 2, c_out, nx, ny, nz)  # (B, rx, ry, rz, C_out, X, Y, Z)
    return out.permute(0, 4, 5, 1, 6, 2, 7, 3).reshape(b, c_out, 2 * nx, 2 * ny, 2 * nz)  # (B, C_out, 2X, 2Y, 2Z)


def conv_transpose_2x(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 4³, stride-2, padding-1 transposed convolution by whichever form the CPU runs faster: oneDNN's
    transposed convolution runs at 6-14% of peak with few output channels (the generator's last
    layer), where the phase split measured 2x faster forward and 1.1-1.4x forward + backward on AVX2
    (docs/benchmarks.md); with more outputs oneDNN's own is at peak."""
    if weight.shape[1] > 8:
        return nn.functional.conv_transpose3d(x, weight, bias, stride=2, padding=1)
    out = phase_split_conv_transpose(x, weight)
    return out if bias is None else out + bias.view(1, -1, 1, 1, 1)


class PhaseSplitConvTranspose3d(nn.ConvTranspose3d):
    """ConvTranspose3d(kernel 4, stride 2, padding 1) computed by `conv_transpose_2x`. The parameters
    are the transposed convolution's own, so checkpoints are unchanged, and the result is the same up
    to float rounding."""

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if output_size is not None or self.kernel_size != (4, 4, 4) or self.stride != (2, 2, 2):
            return super().forward(x, output_size)
        return conv_transpose_2x(x, self.weight, self.bias)


class NearestResizeConv3d(nn.Sequential):
    """Nearest-neighbour 2× upsampling, then a 3³ convolution (the resize-convolution of Odena et
    al. 2016), computed as the transposed convolution it equals, without building the upsampled grid.

    After nearest upsampling, the 3 taps of an axis fall on only 2 distinct inputs: output 2m reads
    m - 1 with tap 0 and m with taps 1 + 2; output 2m + 1 reads m with taps 0 + 1 and m + 1 with tap 2.
    That is a 4-tap, stride-2 transposed convolution whose taps are sums of the 3 (`_TAP_SUMS`), one
    whose phases share their weights, which is why it cannot make a checkerboard. Computed this way it
    costs 64 multiply-adds per input voxel and channel pair instead of 216, the same as the transposed
    convolution: computed naively, resize made the 64³ training step 2.5× slower (docs/results.md).
    It stays a Sequential of (Upsample, Conv3d), so its parameters and checkpoint keys are the naive
    form's, and `naive_forward` is kept to test against.
    """

    # Rows: the transposed kernel's taps 0-3 (phase and tap (1, 1), (0, 1), (1, 0), (0, 0) by
    # _PHASE_TAPS); columns: the 3 taps of the 3³ kernel that land on that input.
    _TAP_SUMS = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])

    def __init__(self, c_in: int, c_out: int, bias: bool):
        super().__init__(
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv3d(c_in, c_out, kernel_size=3, padding=1, bias=bias)
        )

    def naive_forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self[1]
        sums = self._TAP_SUMS.to(conv.weight)
        weight = torch.einsum("ka,lb,mc,oiabc->ioklm", sums, sums, sums, conv.weight)  # (C_in, C_out, 4, 4, 4)
        return conv_transpose_2x(x, weight, conv.bias)


def binomial_blur(x: torch.Tensor) -> torch.Tensor:
    """The separable [1, 2, 1] / 4 filter along each spatial axis, edges repeated: (B, C, X, Y, Z)
    -> the same shape. Nearest-neighbour 2× upsampling followed by it is trilinear upsampling
    (align_corners=False) exactly: output 2m is x[m-1] / 4 + 3 x[m] / 4."""
    for axis in (2, 3, 4):
        n = x.shape[axis]
        padded = torch.cat([x.narrow(axis, 0, 1), x, x.narrow(axis, n - 1, 1)], dim=axis)
        x = (padded.narrow(axis, 0, n) + 2 * padded.narrow(axis, 1, n) + padded.narrow(axis, 2, n)) * 0.25
    return x


class TrilinearResizeConv3d(NearestResizeConv3d):
    """Trilinear 2× upsampling and a 3³ convolution, as the resize-convolution followed by the
    binomial filter that turns nearest into trilinear upsampling. Both are convolutions, so the
    order does not matter away from the volume's faces (within 2 voxels of a face the filter
    repeats the edge where the convolution pads with zeros). Why: nearest upsampling copies each
    coarse voxel into a 2×2×2 block at every doubling, and on IXI the samples kept straight seams
    along the coarse grid; the filter costs 9 multiply-adds per output voxel and channel, against
    the convolution's 8·C_in. Same parameters and checkpoint keys as `NearestResizeConv3d`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return binomial_blur(super().forward(x))  # (B, C_out, 2X, 2Y, 2Z)


class PixelShuffleUp3d(nn.Module):
    """2× upsampling by a 3³ convolution to 8·C_out channels, then depth-to-space (sub-pixel
    convolution, Shi et al. 2016, in 3D)."""

    def __init__(self, c_in: int, c_out: int, bias: bool):
        super().__init__()
        self.c_out = c_out
        self.conv = nn.Conv3d(c_in, 8 * c_out, kernel_size=3, padding=1, bias=bias)

    def initialise_icnr(self) -> None:
        """ICNR (Aitken et al. 2017): the 8 sub-voxel kernels of each output channel start equal,
        so the layer starts as nearest-neighbour upsampling after a convolution: no checkerboard."""
        with torch.no_grad():
            weight = self.conv.weight.view(self.c_out, 8, *self.conv.weight.shape[1:])
            weight.copy_(weight[:, :1].expand_as(weight))
            if self.conv.bias is not None:
                bias = self.conv.bias.view(self.c_out, 8)
                bias.copy_(bias[:, :1].expand_as(bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)  # (B, C_out·8, X, Y, Z), channel c·8 + (rx·4 + ry·2 + rz)
        b, _, nx, ny, nz = y.shape
        y = y.view(b, self.c_out, 2, 2, 2, nx, ny, nz).permute(0, 1, 5, 2, 6, 3, 7, 4)
        return y.reshape(b, self.c_out, 2 * nx, 2 * ny, 2 * nz)  # (B, C_out, 2X, 2Y, 2Z)


def upsampling(kind: str, c_in: int, c_out: int, bias: bool) -> nn.Module:
    """One 2× step of the generator's grid (`model.upsample`)."""
    if kind == "transposed":
        # oneDNN is slow only with few output channels (the last layer); elsewhere it is at peak.
        layer = PhaseSplitConvTranspose3d if c_out <= 8 else nn.ConvTranspose3d
        return layer(c_in, c_out, kernel_size=4, stride=2, padding=1, bias=bias)
    if kind == "resize":
        return NearestResizeConv3d(c_in, c_out, bias)
    if kind == "trilinear":
        return TrilinearResizeConv3d(c_in, c_out, bias)
    if kind == "pixel_shuffle":
        return PixelShuffleUp3d(c_in, c_out, bias)
    raise ValueError(f"unknown model.upsample {kind!r}")


def label_class_count(label_values: Sequence[int] | None) -> int:
    """K, the label channels of a paired model, from a plan's label set (None or empty: 0, unlabeled)."""
    return len(label_values) if label_values else 0


def straight_through_one_hot(probabilities: torch.Tensor) -> torch.Tensor:
    """(B, K, X, Y, Z) class probabilities -> the one-hot of their argmax in the forward pass, with
    the probabilities' gradient in the backward pass (the straight-through estimator, Bengio et al.
    2013).

    Why not show D the softmax itself: real label maps reach D as exact one-hot channels, and soft
    ones are told apart by their values alone (anything strictly between 0 and 1 is fake), so D
    wins on that without looking at anatomy, and G's only way out is to saturate its logits, where
    the softmax's gradient vanishes. Hard channels give D nothing but the shapes to judge, and are
    exactly the label maps `sample` writes. The price is a biased gradient, the usual one of
    straight-through estimators (Gumbel-softmax and VQ-VAE train with it). Smoothing the reals
    instead (noise on the one-hot) would change the distribution G is asked to match, so no
    setting offers the soft form: there is no case for it to serve.
    """
    hard = torch.zeros_like(probabilities).scatter_(1, probabilities.argmax(dim=1, keepdim=True), 1.0)
    # hard + (p - p): exactly `hard` forward (the bracket is exactly 0), p's gradient backward.
    return hard + (probabilities - probabilities.detach())


def one_hot_labels(label_maps: torch.Tensor, label_values: Sequence[int]) -> torch.Tensor:
    """Label maps of label VALUES (B, 1, X, Y, Z), integers -> one-hot class channels (B, K, X, Y, Z)
    float32, class k standing for `label_values[k]` (sorted, as the plan keeps them): how D sees a
    real label map."""
    values = torch.tensor(list(label_values), device=label_maps.device)
    classes = torch.searchsorted(values, label_maps.long())  # (B, 1, X, Y, Z) class indices
    channels = torch.zeros(label_maps.shape[0], len(label_values), *label_maps.shape[2:], device=label_maps.device)
    return channels.scatter_(1, classes, 1.0)  # (B, K, X, Y, Z)


def split_pairs(volumes: torch.Tensor, label_values: Sequence[int] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """G's output (B, 1 + K, X, Y, Z) -> (images (B, X, Y, Z), label maps (B, X, Y, Z) int64 of label
    VALUES, each voxel its most likely class's value); the label maps are None without a label set."""
    images = volumes[:, 0]  # (B, X, Y, Z)
    if not label_class_count(label_values):
        return images, None
    classes = volumes[:, 1:].argmax(dim=1)  # (B, X, Y, Z) class indices
    return images, torch.tensor(list(label_values), device=volumes.device)[classes]  # type: ignore[arg-type]


def empty_voxel(channels: int, label_classes: int, like: torch.Tensor) -> torch.Tensor:
    """What D sees where there is nothing, as (1, channels, 1, 1, 1) in `like`'s dtype and device:
    the image's background (-1) in the image channels and, in the last `label_classes` channels,
    the one-hot of class 0: the lowest label value, the background (0) of nnU-Net's convention.
    Augmentations fill what they shift in or cut out with it."""
    image = [-1.0] * (channels - label_classes)
    labels = [1.0] + [0.0] * (label_classes - 1) if label_classes else []
    return torch.tensor(image + labels, dtype=like.dtype, device=like.device).view(1, channels, 1, 1, 1)


class ConditionEmbedding(nn.Module):
    """Condition codes (B, spec.width), laid out as `conditions.ConditionSpec` says -> (B, dim).

    Continuous values and their presence flags go through a small MLP (a missing value is its own
    input, not a guess); each categorical column has an embedding table whose row 0 is "unknown".
    The parts are summed. `wrap` is spectral norm in D, identity in G."""

    def __init__(self, spec: ConditionSpec, dim: int, wrap: Callable[[nn.Module], nn.Module] = lambda m: m):
        super().__init__()
        self.spec = spec
        self.continuous = (
            nn.Sequential(wrap(nn.Linear(2 * spec.continuous, dim)), nn.LeakyReLU(0.2), wrap(nn.Linear(dim, dim)))
            if spec.continuous
            else None
        )
        self.categorical = nn.ModuleList(wrap(nn.Embedding(1 + count, dim)) for count in spec.categories)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        c = self.spec.continuous
        parts = [self.continuous(codes[:, : 2 * c].float())] if self.continuous is not None else []  # (B, dim)
        for j, table in enumerate(self.categorical):
            parts.append(table(codes[:, 2 * c + j].long()))  # (B, dim)
        return torch.stack(parts).sum(0)  # (B, dim)


class ConditionalBatchNorm3d(nn.Module):
    """BatchNorm whose gain and bias come from the condition (de Vries et al. 2017): x (B, C, ...)
    and the condition embedding (B, dim) -> (B, C, ...). The projection starts at zero, so the
    layer starts as a plain BatchNorm with gain 1 and bias 0 and learns how the condition moves it."""

    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.norm = nn.BatchNorm3d(channels, affine=False)
        self.gain_and_bias = nn.Linear(dim, 2 * channels)

    def initialise(self) -> None:
        nn.init.zeros_(self.gain_and_bias.weight)
        nn.init.zeros_(self.gain_and_bias.bias)

    def forward(self, x: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        gain, bias = self.gain_and_bias(embedded).to(x.dtype).chunk(2, dim=1)  # (B, C) each
        shape = (*gain.shape, *(1,) * (x.dim() - 2))  # (B, C, 1, 1, 1)
        return self.norm(x) * (1 + gain.view(shape)) + bias.view(shape)


class Generator3d(nn.Module):
    """z (B, latent_dim) -> volume (B, 1, X, Y, Z) in [-1, 1]; paired (`label_classes` K > 0): the
    volume and its label map, (B, 1 + K, X, Y, Z), channels 1..K one-hot (`straight_through_one_hot`).
    Conditional (`conditions`): z is joined by an embedding of each volume's condition codes."""

    def __init__(
        self,
        config: ModelConfig,
        shape: tuple[int, int, int],
        label_classes: int = 0,
        conditions: ConditionSpec | None = None,
    ):
        super().__init__()
        self.latent_dim = config.latent_dim
        self.label_classes = label_classes
        self.shape = tuple(shape)
        stages = stage_count(self.shape, config.base_grid)
        channels = channels_per_stage(config, stages, config.generator_channels)
        self.base_shape = _base_shape(self.shape, stages)
        self.base_channels = channels[-1]
        self.condition = ConditionEmbedding(conditions, CONDITION_EMBEDDING) if conditions else None
        # The condition enters at the input (joined to z) or through every BatchNorm.
        self.condition_at_input = bool(conditions) and config.condition_generator == "input"
        conditional_norms = bool(conditions) and config.condition_generator == "batchnorm"

        def norm(channels_out: int) -> nn.Module:
            if conditional_norms:
                return ConditionalBatchNorm3d(channels_out, CONDITION_EMBEDDING)
            return nn.BatchNorm3d(channels_out)

        inputs = config.latent_dim + (CONDITION_EMBEDDING if self.condition_at_input else 0)
        self.project = nn.Linear(inputs, channels[-1] * math.prod(self.base_shape), bias=False)
        self.project_norm = norm(channels[-1])
        blocks: list[nn.Module] = []
        for i in range(stages - 1, 0, -1):
            blocks += [
                upsampling(config.upsample, channels[i], channels[i - 1], bias=False),
                norm(channels[i - 1]),
                nn.ReLU(inplace=True),
            ]
        self.blocks = nn.Sequential(*blocks)
        # Activation checkpointing of the blocks (`train.activation_checkpointing`, set by the
        # Trainer): each block keeps only its input for the backward pass and runs again there.
        self.activation_checkpointing = False
        # One layer makes the image and its class logits from the same features, so they agree.
        last = config.upsample if config.output_upsample == "same" else config.output_upsample
        self.to_volume = upsampling(last, channels[0], 1 + label_classes, bias=True)
        initialise_dcgan(self)
        if self.condition is not None:
            # The condition joins z at z's own scale. With the DCGAN N(0, 0.02) init the two-layer
            # MLP of a continuous condition starts 1000x smaller than z and learns from a gradient
            # that is a product of two tiny weights: on IXI (3000 steps) G then ignored age
            # entirely while it followed sex (a one-layer table). PyTorch's own initialisation
            # (Kaiming-uniform layers, N(0, 1) tables) starts it as large as z.
            for layer in self.condition.modules():
                if isinstance(layer, (nn.Linear, nn.Embedding)):
                    layer.reset_parameters()
        for module in self.modules():
            if isinstance(module, ConditionalBatchNorm3d):
                module.initialise()
        for module in self.modules():
            if isinstance(module, PixelShuffleUp3d):
                module.initialise_icnr()

    def forward(self, z: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
        x, _ = self._features(z, codes, doublings=len(self.blocks) // 3)  # (B, base_channels, X/2, Y/2, Z/2)
        return self._to_output(x)

    def _features(
        self, z: torch.Tensor, codes: torch.Tensor | None, doublings: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """z (B, latent_dim) -> the features after the projection and the first `doublings` blocks,
        and the condition embedding (B, CONDITION_EMBEDDING) or None."""
        embedded = None
        if self.condition is not None:
            if codes is None:
                raise ValueError("a conditional generator needs condition codes")
            embedded = self.condition(codes)  # (B, CONDITION_EMBEDDING)
        if self.condition_at_input:
            z = torch.cat([z, embedded.to(z.dtype)], dim=1)  # (B, latent_dim + embedding)
        x = self.project(z).view(z.shape[0], self.base_channels, *self.base_shape)  # (B, C, x/2^n, y/2^n, z/2^n)
        x = torch.relu(self._norm(self.project_norm, x, embedded))
        for start in range(0, 3 * doublings, 3):  # (upsampling, norm, ReLU) per doubling
            x = self._run_block(start, x, embedded)  # (B, C', 2x, 2y, 2z)
        return x, embedded

    def _run_block(self, start: int, x: torch.Tensor, embedded: torch.Tensor | None) -> torch.Tensor:
        """The doubling whose layers start at `start` in `blocks`, checkpointed when asked."""
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(
                self._block, start, x, embedded, use_reentrant=False, context_fn=self._recompute_context(start)
            )
        return self._block(start, x, embedded)

    def _to_output(self, x: torch.Tensor) -> torch.Tensor:
        """The last doubling's features (B, base_channels, X/2, Y/2, Z/2) -> the volume, with its
        label channels for a paired model."""
        if not self.label_classes:
            return torch.tanh(self.to_volume(x))  # (B, 1, X, Y, Z)
        out = self.to_volume(x)  # (B, 1 + K, X, Y, Z): the image, then one logit per class
        image = torch.tanh(out[:, :1])  # (B, 1, X, Y, Z)
        probabilities = torch.softmax(out[:, 1:].float(), dim=1)  # (B, K, X, Y, Z), fp32 under autocast too
        return torch.cat([image, straight_through_one_hot(probabilities).to(image.dtype)], dim=1)  # (B, 1 + K, ...)

    @staticmethod
    def _norm(layer: nn.Module, x: torch.Tensor, embedded: torch.Tensor | None) -> torch.Tensor:
        return layer(x, embedded) if isinstance(layer, ConditionalBatchNorm3d) else layer(x)

    def _block(self, start: int, x: torch.Tensor, embedded: torch.Tensor | None) -> torch.Tensor:
        for layer in self.blocks[start : start + 3]:
            x = self._norm(layer, x, embedded)  # (B, C, 2x, 2y, 2z) after the upsampling
        return x

    def _recompute_context(self, start: int) -> Callable[[], tuple[Any, Any]]:
        """Checkpointing runs a block's forward again in the backward pass. The second run must
        not move the BatchNorm running statistics (or their count) a second time: momentum 0
        while it runs. (Its batch statistics, and so its values, are the first run's: the same
        input.)"""
        norms = [m for m in self.blocks[start : start + 3].modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

        @contextlib.contextmanager
        def still_statistics():
            saved = [(norm.momentum, norm.num_batches_tracked.clone()) for norm in norms]
            for norm in norms:
                norm.momentum = 0.0
            try:
                yield
            finally:
                for norm, (momentum, count) in zip(norms, saved):
                    norm.momentum = momentum
                    norm.num_batches_tracked.copy_(count)

        return lambda: (contextlib.nullcontext(), still_statistics())


class MinibatchStd(nn.Module):
    """Appends one channel: the mean over features and voxels of the per-voxel standard deviation
    across the batch (Karras et al. 2018). Collapse shows up as a small value D can pick on."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # sqrt(var + eps), not std(): where every volume in the batch has the same value (the
        # background), std's gradient is 0/0 = NaN, which poisoned D within 25 steps.
        spread = torch.sqrt(x.float().var(dim=0, unbiased=False) + 1e-8).mean()  # over the batch, then everything
        return torch.cat([x, spread.to(x.dtype).expand(x.shape[0], 1, *x.shape[2:])], dim=1)  # (B, C+1, ...)


class Discriminator3d(nn.Module):
    """volumes (B, pack, X, Y, Z) -> one logit per pack of volumes (B,); paired (`label_classes` K > 0):
    (B, pack · (1 + K), X, Y, Z), each volume's image and its K label channels side by side.

    Conditional (`conditions`): a projection discriminator (Miyato & Koyama 2018). The logit gains
    <embed(y), h>, h D's last features averaged over space; a pack's embedding is the sum of one
    embedding per position in the pack, so D knows which volume had which condition."""

    def __init__(
        self,
        config: ModelConfig,
        shape: tuple[int, int, int],
        label_classes: int = 0,
        conditions: ConditionSpec | None = None,
        channels_per_volume: int | None = None,
    ):
        """`channels_per_volume`: what D reads per volume, where that is not the image and its
        label channels (1 + K): the hierarchical model's detail view, a slab and its context."""
        super().__init__()
        stages = stage_count(tuple(shape), config.base_grid)
        channels = channels_per_stage(config, stages)
        base_shape = _base_shape(tuple(shape), stages)
        wrap = nn.utils.parametrizations.spectral_norm if config.spectral_norm else (lambda module: module)
        # PacGAN stacks `pack` volumes as input channels.
        inputs = config.pack * (channels_per_volume or 1 + label_classes)
        layers: list[nn.Module] = []
        if config.discriminator_stem:  # at full resolution: (B, stem, X, Y, Z)
            layers += [
                wrap(nn.Conv3d(inputs, config.discriminator_stem, kernel_size=3, padding=1)),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            inputs = config.discriminator_stem
        layers += [
            # No norm on the first strided layer.
            wrap(nn.Conv3d(inputs, channels[0], kernel_size=4, stride=2, padding=1)),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        for i in range(1, stages):
            norm = config.discriminator_norm
            layers.append(
                wrap(nn.Conv3d(channels[i - 1], channels[i], kernel_size=4, stride=2, padding=1, bias=norm == "none"))
            )
            if norm == "batch":
                layers.append(nn.BatchNorm3d(channels[i]))
            elif norm == "instance":
                layers.append(nn.InstanceNorm3d(channels[i], affine=True))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
        if config.minibatch_std:
            layers.append(MinibatchStd())
        self.features = nn.Sequential(*layers)
        feature_channels = channels[-1] + int(config.minibatch_std)
        self.to_logit = wrap(nn.Linear(feature_channels * math.prod(base_shape), 1))
        self.condition = (
            nn.ModuleList(ConditionEmbedding(conditions, feature_channels, wrap) for _ in range(config.pack))
            if conditions
            else None
        )
        initialise_dcgan(self)

    def forward(self, volume: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
        """`codes` (B, pack, width): the condition codes of each pack's volumes, in pack order."""
        features = self.features(volume)  # (B, C, x/2^n, y/2^n, z/2^n)
        logit = self.to_logit(features.flatten(1)).squeeze(1)  # (B,)
        if self.condition is None:
            return logit
        if codes is None:
            raise ValueError("a conditional discriminator needs condition codes")
        pooled = features.mean(dim=(2, 3, 4))  # (B, C); a mean, so the term's scale does not grow with the grid
        embedded = torch.stack([embed(codes[:, i]) for i, embed in enumerate(self.condition)]).sum(0)  # (B, C)
        return logit + (embedded.to(pooled.dtype) * pooled).sum(dim=1)  # (B,)


def initialise_dcgan(module: nn.Module) -> None:
    """DCGAN initialisation: weights (and embeddings) N(0, 0.02); norm scales N(1, 0.02); biases 0."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv3d, nn.ConvTranspose3d, nn.Linear)):
            weight = layer.parametrizations.weight.original if hasattr(layer, "parametrizations") else layer.weight
            nn.init.normal_(weight, 0.0, 0.02)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.Embedding):  # condition embeddings start as small as the layers they feed
            weight = layer.parametrizations.weight.original if hasattr(layer, "parametrizations") else layer.weight
            nn.init.normal_(weight, 0.0, 0.02)
        elif isinstance(layer, (nn.BatchNorm3d, nn.InstanceNorm3d)) and layer.weight is not None:
            nn.init.normal_(layer.weight, 1.0, 0.02)
            nn.init.zeros_(layer.bias)


def sample_latent(
    batch: int, latent_dim: int, prior: str, generator: torch.Generator, device: torch.device | str
) -> torch.Tensor:
    """z ~ N(0, I) or U(-1, 1)^d, drawn from `generator` so that runs and resumes repeat exactly."""
    if prior == "normal":
        return torch.randn(batch, latent_dim, generator=generator, device=device)  # (B, latent_dim)
    if prior == "uniform":
        return torch.rand(batch, latent_dim, generator=generator, device=device) * 2.0 - 1.0
    raise ValueError(f"unknown latent prior {prior!r}")


def build_generator(
    config: ModelConfig, shape: tuple[int, int, int], label_classes: int = 0, conditions: ConditionSpec | None = None
) -> Generator3d:
    """The generator the config asks for: the plain one, or with `model.hierarchical_slabs` the
    hierarchical one (medsynth.hierarchical), which takes the same z and makes the same volume."""
    if config.hierarchical_slabs:
        from medsynth.hierarchical import HierarchicalGenerator3d, check_hierarchical

        check_hierarchical(config, shape, label_classes, conditions)
        return HierarchicalGenerator3d(config, shape)
    return Generator3d(config, shape, label_classes, conditions)


def build_models(
    config: ModelConfig, shape: tuple[int, int, int], label_classes: int = 0, conditions: ConditionSpec | None = None
) -> tuple[Generator3d, nn.Module]:
    """G and D for the config and the plan's shape, label classes and conditions."""
    generator = build_generator(config, shape, label_classes, conditions)
    if config.hierarchical_slabs:
        from medsynth.hierarchical import HierarchicalDiscriminator3d

        return generator, HierarchicalDiscriminator3d(config, shape)
    return generator, Discriminator3d(config, shape, label_classes, conditions)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def forward_flops(module: nn.Module, example: torch.Tensor | tuple[torch.Tensor, ...]) -> int:
    """Floating-point operations of one forward pass (multiply-add = 2), counted by torch.
    `example`: the input, or a tuple of the inputs (a conditional model's volume and codes)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    was_training = module.training
    module.eval()
    with counter, torch.no_grad():
        module(*example) if isinstance(example, tuple) else module(example)
    module.train(was_training)
    return int(counter.get_total_flops())
