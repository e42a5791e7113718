"""Every setting medsynth has, with its default, in one place.

Settings are frozen dataclasses grouped by the part of the pipeline they steer. They are built from
three layers, later layers winning: the defaults below < a YAML file < ``--set section.key=value``
overrides. Explicit command-line flags are applied last by the CLI. Unknown keys and ill-typed values
are errors that name the key and suggest the closest valid one, because a silently ignored typo in
a training config costs a GPU-day.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medsynth.errors import UsageError

# Differentiable augmentations of what D sees (medsynth.diffaug implements them).
DIFF_AUGMENT_POLICIES = ("translation", "cutout", "contrast")


class ConfigError(UsageError, ValueError):
    """A configuration value or key is invalid (exit 2). The message is meant for the user as is."""


def _is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


@dataclass(frozen=True)
class IoConfig:
    """How sources are found and read."""

    # 4D images (fMRI, DWI, multi-echo DICOM): "skip" reports them, "split" turns each frame into
    # its own volume, "first" keeps frame 0. Skipping is the default because a GAN trained on
    # mixed frames of a diffusion series learns the wrong thing silently.
    four_d: Literal["skip", "split", "first"] = "skip"
    # An axis shorter than this is not a volume (a single slice, a 2-slice localizer).
    min_slices: int = 3
    follow_symlinks: bool = True

    def __post_init__(self) -> None:
        if self.min_slices < 2:
            raise ConfigError(f"io.min_slices must be at least 2, got {self.min_slices}")


@dataclass(frozen=True)
class LabelsConfig:
    """Segmentation label maps paired with the images (medsynth.io.labels has the pairing rule)."""

    # Folder of label maps (`--labels`): each image pairs with the file of its name, or its name
    # plus _seg, _label, _labels or _mask. null: no labels, unless the scan folder is an nnU-Net v2
    # or Decathlon dataset, whose labelsTr is used.
    dir: str | None = None
    # An image with no usable label map: "refuse" stops before training and names each one (a
    # missing label is most often a naming slip, and half a paired set is not what was asked
    # for); "skip" trains without those images and lists them. null means "refuse": every new
    # setting defaults to null, so that a run saved before the setting existed resumes unchanged.
    unlabeled: Literal["refuse", "skip"] | None = None
    # Class names, as "VALUE=NAME" (e.g. ["1=anterior", "2=posterior"]), for label maps that come
    # without a dataset.json: they go into the plan, the sidecars and an nnU-Net export. They win
    # over dataset.json's; a value left unnamed is `label_<value>`. null: none given.
    names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        self.class_names  # noqa: B018 (validates)

    @property
    def skip_unlabeled(self) -> bool:
        return self.unlabeled == "skip"

    @property
    def class_names(self) -> dict[int, str]:
        """`names` as {value: name}."""
        named: dict[int, str] = {}
        for entry in self.names or ():
            value, sep, name = entry.partition("=")
            if not sep or not value.strip().isdigit() or not name.strip():
                raise ConfigError(f"labels.names: {entry!r} is not VALUE=NAME with a non-negative integer VALUE")
            if int(value) in named:
                raise ConfigError(f"labels.names: label value {int(value)} is named twice")
            named[int(value)] = name.strip()
        return named


@dataclass(frozen=True)
class ConditionsConfig:
    """Per-scan conditions (age, sex, class) for a conditional model (medsynth.conditions has the
    matching rule). Every setting defaults to null: a run without conditions is unchanged."""

    # CSV or TSV table (`--conditions`): one row per subject, an ID column and the conditions.
    table: str | None = None
    # true: SCAN_DIR/<class>/... gives each scan a categorical condition, "class". null = false.
    class_folders: bool | None = None
    # The table's ID column; null: the column whose values match the most scan names.
    id_column: str | None = None
    # The columns to condition on; null: every column but the ID column.
    columns: tuple[str, ...] | None = None
    # Kinds, where the inference (numbers are continuous, text categorical) is wrong: a 0/1
    # diagnosis column is classes, so list it under categorical.
    categorical: tuple[str, ...] | None = None
    continuous: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.table and self.class_folders:
            raise ConfigError("conditions.table and conditions.class_folders: give one source of conditions, not both")
        both = sorted(set(self.categorical or ()) & set(self.continuous or ()))
        if both:
            raise ConfigError(f"conditions.categorical and conditions.continuous both name {both}")

    @property
    def enabled(self) -> bool:
        return bool(self.table or self.class_folders)


@dataclass(frozen=True)
class PlanConfig:
    """What the dataset plan is derived from. Everything left as "auto" is read off the data."""

    # Voxel grid the model sees, (x, y, z) in RAS order. Each axis a power of two from 16 to 256.
    # "auto" derives it from the data (plan.choose_shape, as nnU-Net derives its patch size from
    # the fingerprint): the foreground at the native spacing, each axis rounded to a power of two,
    # coarsened until the grid holds at most `max_voxels`. A set of small crops gets a small grid
    # instead of a padded 64³; a whole head still gets 64³.
    target_shape: tuple[int, int, int] | Literal["auto"] = "auto"
    # The most voxels an "auto" grid may have: 64³, which trains at batch 8 in under 1 GiB and
    # about 1 s a step on a 2-core CPU (docs/benchmarks.md). Raise it for finer grids where the
    # device has the memory (`train --dry-run` measures it).
    max_voxels: int = 64**3
    # Target voxel spacing in mm, or None to derive it: the coarsest spacing at which the target
    # grid still covers the foreground of `fit_quantile` of the sources.
    spacing: tuple[float, float, float] | None = None
    isotropic: bool = True
    fit_quantile: float = 0.9
    # "auto" reads DICOM Modality and checks it against the intensities (Hounsfield units have air
    # near -1000); NIfTI carries no modality, so intensities decide.
    modality: Literal["auto", "ct", "mr"] = "auto"
    # CT: a fixed window in Hounsfield units, mapped to [-1, 1]. The default keeps air, soft tissue
    # and most cortical bone; narrow it for soft-tissue-only work.
    ct_window: tuple[float, float] = (-1024.0, 2048.0)
    # MRI has no absolute units, so each volume is windowed at its own percentiles.
    mr_percentiles: tuple[float, float] = (0.5, 99.5)
    # Resample onto world-aligned (RAS) axes, which removes obliquity and gantry-tilt shear, so
    # every training volume shows anatomy the same way up. Off keeps the voxel axes (and the tilt).
    deoblique: bool = True

    def __post_init__(self) -> None:
        if self.target_shape != "auto":
            if len(self.target_shape) != 3:
                raise ConfigError(f"plan.target_shape needs 3 sizes, got {list(self.target_shape)}")
            for n in self.target_shape:
                if not (_is_power_of_two(n) and 16 <= n <= 256):
                    raise ConfigError(
                        f"plan.target_shape sizes must be powers of two from 16 to 256, got {list(self.target_shape)}"
                    )
        if self.max_voxels < 16**3:
            raise ConfigError(f"plan.max_voxels must be at least 16³ = 4096, got {self.max_voxels}")
        if self.spacing is not None and (len(self.spacing) != 3 or min(self.spacing) <= 0):
            raise ConfigError(f"plan.spacing must be 3 positive numbers in mm, got {self.spacing}")
        if not 0.0 < self.fit_quantile <= 1.0:
            raise ConfigError(f"plan.fit_quantile must be in (0, 1], got {self.fit_quantile}")
        lo, hi = self.ct_window
        if not lo < hi:
            raise ConfigError(f"plan.ct_window must be [low, high] with low < high, got {list(self.ct_window)}")
        plo, phi = self.mr_percentiles
        if not 0.0 <= plo < phi <= 100.0:
            raise ConfigError(
                f"plan.mr_percentiles must satisfy 0 <= low < high <= 100, got {list(self.mr_percentiles)}"
            )


@dataclass(frozen=True)
class CacheConfig:
    """Where preprocessed volumes live and how they are built."""

    # None: $MEDSYNTH_CACHE, else $XDG_CACHE_HOME/medsynth, else ~/.cache/medsynth.
    dir: str | None = None
    # Worker processes for reading and preprocessing; 0 means one per CPU core.
    workers: int = 0

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ConfigError(f"cache.workers must be 0 (one per core) or more, got {self.workers}")


@dataclass(frozen=True)
class AugmentConfig:
    """Light, anatomy-preserving augmentation applied when the Dataset serves a volume."""

    # RAS axes that may be flipped. Only left-right (0) by default: brains are roughly symmetric
    # left to right, but never upside down, and the generator learns whatever D is shown.
    flip_axes: tuple[int, ...] = (0,)
    flip_probability: float = 0.5
    # Contrast jitter: intensities are scaled about the background value (-1) by a factor drawn
    # from [1 - j, 1 + j]. Off by default because it widens the learnt intensity distribution.
    intensity_jitter: float = 0.0
    # Differentiable augmentation of D's inputs, real and generated alike (Zhao et al. 2020):
    # comma-separated from translation, cutout, contrast; "" turns it off. It keeps D from
    # memorising a small training set, which otherwise costs the samples their diversity.
    diff_augment: str = ""
    # Adaptive discriminator augmentation (medsynth.ada; Karras et al. 2020): anatomy-preserving
    # flips (flip_axes only), scaling, translation and gamma on everything D sees, each with a
    # probability p steered so that D's mean sign on real packs stays near ada_target. p moves
    # from 0 to 1 in ada_images_to_full real volumes at most, adjusted every ada_interval D updates.
    ada: bool = False
    ada_target: float = 0.6
    ada_images_to_full: int = 10000
    ada_interval: int = 4

    @property
    def diff_augment_policy(self) -> tuple[str, ...]:
        """`diff_augment` as the ordered tuple of policy names it lists (empty: off)."""
        return tuple(name.strip() for name in self.diff_augment.split(",") if name.strip())

    def __post_init__(self) -> None:
        unknown = [name for name in self.diff_augment_policy if name not in DIFF_AUGMENT_POLICIES]
        if unknown:
            raise ConfigError(
                f"augment.diff_augment: unknown policy {', '.join(unknown)} "
                f"(choose from {', '.join(DIFF_AUGMENT_POLICIES)})"
            )
        if any(a not in (0, 1, 2) for a in self.flip_axes):
            raise ConfigError(f"augment.flip_axes must name axes 0, 1 or 2, got {list(self.flip_axes)}")
        if not 0.0 < self.ada_target < 1.0 or self.ada_images_to_full < 1 or self.ada_interval < 1:
            raise ConfigError("augment.ada_target must be in (0, 1), ada_images_to_full and ada_interval at least 1")
        if not 0.0 <= self.flip_probability <= 1.0:
            raise ConfigError(f"augment.flip_probability must be in [0, 1], got {self.flip_probability}")
        if not 0.0 <= self.intensity_jitter < 1.0:
            raise ConfigError(f"augment.intensity_jitter must be in [0, 1), got {self.intensity_jitter}")


@dataclass(frozen=True)
class ModelConfig:
    """The DCGAN generator and discriminator. The volume shape comes from the plan."""

    latent_dim: int = 128
    # Channels at the finest resolution; each halving of the grid doubles them, up to max_channels.
    base_channels: int = 32
    max_channels: int = 512
    # The generator's channels at its finest resolution, where they should differ from the
    # discriminator's base_channels: to compare generators at equal FLOPs, or to give G more room.
    generator_channels: int | None = None
    # Side of the smallest grid: the generator starts there and the discriminator ends there.
    base_grid: int = 4
    # Normalisation after every discriminator layer but the first ("batch" is the DCGAN paper's).
    # The default is spectral normalisation instead: with BatchNorm, D wins outright within ten
    # steps on real brain MRI (D(G(z)) ~ 0, G's loss ~ 30) and G learns little; spectral norm keeps
    # the game balanced (docs/results.md).
    discriminator_norm: Literal["batch", "instance", "none"] = "none"
    # Channels of a 3³ stride-1 convolution at full resolution before the discriminator's strided
    # layers (0: none, the DCGAN discriminator). A strided first layer turns a pattern that
    # alternates voxel by voxel (a checkerboard, or the 2×2×2 blocks of nearest upsampling) into a
    # constant offset of its features, hard to tell from brightness; a layer at full resolution
    # sees it as a pattern. On IXI at 1000 steps it made every figure worse, the grid included,
    # and cost 42% of the step rate (docs/results.md): an option for comparisons, off.
    discriminator_stem: int = 0
    spectral_norm: bool = True
    # Minibatch standard deviation (Karras et al. 2018): D sees how much the volumes in its batch
    # differ, so a generator that makes the same volume every time is easy to catch.
    minibatch_std: bool = True
    # PacGAN (Lin et al. 2018): D judges `pack` volumes at once, stacked as channels, all real or
    # all generated. A generator that repeats itself makes packs of near-copies, which real packs
    # never are, so collapse is penalised directly. The batch size must be a multiple of it.
    # Without it, 64³ brain samples converged onto one head within 1000 steps (docs/results.md).
    pack: int = 2
    # How the generator doubles its grid. "transposed": the DCGAN paper's 4³ stride-2 transposed
    # convolution. "resize": nearest-neighbour upsampling, then a 3³ convolution (Odena et al.
    # 2016: every output voxel gets the same number of taps, so no checkerboard by construction).
    # "trilinear": resize with trilinear instead of nearest upsampling (models.TrilinearResizeConv3d).
    # "pixel_shuffle": a 3³ convolution to 8× the channels, then depth-to-space, initialised as
    # the resize form (ICNR, Aitken et al. 2017) so that it starts free of checkerboard too.
    # Resize costs the same FLOPs as transposed (it is computed as the transposed convolution it
    # equals, models.NearestResizeConv3d); pixel_shuffle costs 27/8 of them at the same width.
    # Resize is the default: on IXI at 1000 steps it beat transposed on every figure of the quality
    # benchmark, by more than the intervals (C2ST 0.735 against 0.971; docs/results.md).
    upsample: Literal["transposed", "resize", "trilinear", "pixel_shuffle"] = "resize"
    # The last doubling, which makes the volume itself: as `upsample` ("same"), or trilinear
    # (its [1, 2, 1] filter removes what repeats every other voxel, where the finest seams live,
    # without blurring every scale as trilinear everywhere did). Measured on IXI at 1000 steps: no
    # less grid, a higher C2ST (0.85 against 0.79; docs/results.md), so not the default.
    output_upsample: Literal["same", "trilinear"] = "same"
    # Where a conditional generator takes its condition (a run with conditions only). "input": an
    # embedding joined to z (Mirza & Osindero 2014). "batchnorm": conditional BatchNorm, the
    # embedding setting the gain and bias of every generator BatchNorm (de Vries et al. 2017, as
    # in BigGAN), so the condition reaches every scale. Measured on IXI (docs/results.md).
    condition_generator: Literal["input", "batchnorm"] = "input"
    # High resolution in less memory (medsynth.hierarchical, in the spirit of HA-GAN, Sun et al.
    # 2022). 0: the plain generator. N (a power of two, at least 2): G's trunk makes features at a
    # quarter of the resolution for the whole volume; in training a low-resolution head makes the
    # whole volume at 1/4 and the full-resolution head only one slab, 1/N of the last axis, at a
    # random place, and D judges both. Sampling runs the full-resolution head over all N slabs,
    # which join without seams by construction.
    hierarchical_slabs: int = 0

    def __post_init__(self) -> None:
        if self.latent_dim < 1 or self.base_channels < 1 or self.max_channels < self.base_channels:
            raise ConfigError(
                "model.latent_dim, model.base_channels must be positive and max_channels >= base_channels"
            )
        if self.generator_channels is not None and not 1 <= self.generator_channels <= self.max_channels:
            raise ConfigError(f"model.generator_channels must be from 1 to max_channels, got {self.generator_channels}")
        if self.pack < 1:
            raise ConfigError(f"model.pack must be at least 1, got {self.pack}")
        if self.discriminator_stem < 0:
            raise ConfigError(
                f"model.discriminator_stem must be 0 (none) or a channel count, got {self.discriminator_stem}"
            )
        if not _is_power_of_two(self.base_grid) or not 2 <= self.base_grid <= 16:
            raise ConfigError(f"model.base_grid must be a power of two from 2 to 16, got {self.base_grid}")
        if self.hierarchical_slabs and (self.hierarchical_slabs < 2 or not _is_power_of_two(self.hierarchical_slabs)):
            raise ConfigError(
                f"model.hierarchical_slabs must be 0 (the plain generator) or a power of two from 2, "
                f"got {self.hierarchical_slabs}"
            )


@dataclass(frozen=True)
class LossConfig:
    """The adversarial game."""

    # non_saturating: D minimises BCE (real 1, fake 0); G minimises -log D(G(z)) (Goodfellow 2014).
    # hinge: Lim & Ye 2017. wgan_gp: Wasserstein with gradient penalty (Gulrajani 2017).
    name: Literal["non_saturating", "hinge", "wgan_gp"] = "non_saturating"
    gp_weight: float = 10.0  # wgan_gp only
    # R1 penalty gamma/2 * E||grad_x D(x)||^2 on real data (Mescheder 2018); 0 turns it off.
    r1_gamma: float = 1.0
    # Lazy R1 (Karras et al. 2020, StyleGAN2): the penalty on every `r1_interval`-th D update only,
    # scaled by the interval so that its average pull is the same. Each R1 step doubles D's
    # backward pass on the real batch; 1 computes it on every update.
    r1_interval: int = 1
    d_steps_per_g: int = 1
    # With one D update per G update, compute G(z) once: D's update sees it detached, G's update
    # reuses it with gradients (as PyTorch's DCGAN example does), instead of a second G forward on
    # fresh noise. Saves one G forward per step.
    share_fake: bool = False
    latent_prior: Literal["normal", "uniform"] = "normal"

    def __post_init__(self) -> None:
        if self.d_steps_per_g < 1:
            raise ConfigError(f"loss.d_steps_per_g must be at least 1, got {self.d_steps_per_g}")
        if self.r1_interval < 1:
            raise ConfigError(f"loss.r1_interval must be at least 1, got {self.r1_interval}")
        if self.r1_gamma < 0 or self.gp_weight < 0:
            raise ConfigError("loss.r1_gamma and loss.gp_weight must not be negative")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and the operational behaviour of a training run."""

    max_steps: int = 5000  # generator updates
    # A budget of training wall time, summed over every resume of the run (preprocessing is not
    # counted). The run stops at the first step past it, checkpoints and finishes as it would at
    # max_steps: whichever comes first ends the run. For cluster jobs with a time limit, and for a
    # recipe that should use an hour on whatever machine runs it. The step where a run stops then
    # depends on the machine; resuming from any checkpoint stays exact.
    max_minutes: float | None = None
    # Per process: m real volumes and m noise samples per update. "auto": the largest multiple of
    # model.pack (doubling, at most 64) that a measured step says fits this device's memory
    # (medsynth.memory); the run records the number it chose, and resumes with it.
    batch_size: int | Literal["auto"] = 8
    # Before preprocessing, check that a training step fits in the device's memory (measured by
    # one step in a child process where a cheap screen says it may not; medsynth.memory), and
    # refuse with a batch size that fits if it does not.
    check_memory: bool = True
    # Activation checkpointing of the generator's blocks: each keeps only its input for the
    # backward pass and is run again there, trading about a third more generator compute for
    # memory (measured in docs/benchmarks.md). The discriminator is not checkpointed: its spectral
    # norm's power iteration would run again on different vectors. The numbers are the same with
    # it on or off (tested), so a run may switch it when resumed.
    activation_checkpointing: bool = False
    lr_generator: float = 2e-4
    lr_discriminator: float = 2e-4
    beta1: float = 0.5  # DCGAN: momentum 0.9 makes training oscillate
    beta2: float = 0.999
    ema_decay: float = 0.999  # of the generator's weights; previews and sampling use the average
    # bf16 autocast: "auto" uses it on CUDA, and on CPUs that run bf16 natively (AVX512-BF16, AMX).
    amp: Literal["auto", "bf16", "off"] = "auto"
    channels_last: bool = False
    compile: bool = False
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...
    loader_workers: int = -1  # -1: 0 on CPU (the memory-mapped cache is faster than a worker), 4 on GPU
    log_every: int = 10  # steps between metrics lines (metrics.jsonl gets every step)
    preview_every: int = 250
    checkpoint_every: int = 500
    keep_checkpoints: int = 3  # numbered checkpoints kept besides last.pt
    preview_samples: int = 4
    # Divergence guard: a non-finite loss, or D winning outright (mean D(G(z)) below 0.01 with
    # D(x) above 0.99) for `d_win_steps` steps in a row.
    on_divergence: Literal["rollback", "stop"] = "rollback"
    max_rollbacks: int = 3
    d_win_steps: int = 500

    def __post_init__(self) -> None:
        positive = ("max_steps", "batch_size", "log_every", "preview_every", "checkpoint_every", "d_win_steps")
        for name in positive:
            if getattr(self, name) != "auto" and getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ConfigError(
                f"train.max_minutes must be positive (or null for no time budget), got {self.max_minutes}"
            )
        if self.lr_generator <= 0 or self.lr_discriminator <= 0:
            raise ConfigError("train learning rates must be positive")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ConfigError("train.beta1 and train.beta2 must be in [0, 1)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.keep_checkpoints < 0 or self.max_rollbacks < 0 or self.preview_samples < 1:
            raise ConfigError("train.keep_checkpoints and train.max_rollbacks must be >= 0, preview_samples >= 1")


@dataclass(frozen=True)
class Config:
    """The whole resolved configuration of a run."""

    io: IoConfig = field(default_factory=IoConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    conditions: ConditionsConfig = field(default_factory=ConditionsConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        # Rules that span sections, checked here so that a bad combination fails before any data
        # is read, with the settings named, rather than deep inside the first training step.
        if self.train.batch_size != "auto" and self.train.batch_size % self.model.pack:
            raise ConfigError(
                f"train.batch_size ({self.train.batch_size}) must be a multiple of model.pack ({self.model.pack}): "
                "D judges packs of model.pack volumes"
            )
        if self.model.hierarchical_slabs and self.loss.name == "wgan_gp":
            raise ConfigError(
                "model.hierarchical_slabs does not work with loss.name=wgan_gp: its penalty interpolates "
                "whole volumes, and the hierarchical model never makes one in training"
            )
        if self.plan.target_shape != "auto" and min(self.plan.target_shape) < 2 * self.model.base_grid:
            raise ConfigError(
                f"plan.target_shape {list(self.plan.target_shape)} is too small for model.base_grid="
                f"{self.model.base_grid}: the shortest side must be at least twice the base grid"
            )


# ---------------------------------------------------------------------------------------------
# Building a Config from plain data, with validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} {_type_name(args[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and convert it (lists to tuples, ints to floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key} must be null, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool):
            # YAML 1.1 reads a bare off/on/no/yes as a boolean: `--set train.amp=off` means "off".
            words = ("off", "no", "false") if not value else ("on", "yes", "true")
            value = next((word for word in words if word in choices), value)
        if value in choices:
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key} must be one of {', '.join(map(repr, choices))}, got {value!r}{hint}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key} must be {_type_name(tp)}, got {list(value)}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads 1e-4 (no dot) as a string; people write it that way all the time.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported setting type {tp!r}")  # a bug in this module, not in input


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping of settings, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (valid: {', '.join(names)})"
            raise ConfigError(f"unknown setting {prefix}{key}{hint}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(data[name], tp, f"{prefix}{name}")
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, data, "")


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain, JSON- and YAML-safe data (tuples become lists)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(config)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``section.key=value``; the value is read as YAML, so ``[64,64,32]`` and ``true`` work."""
    import yaml

    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults < YAML file < ``--set`` overrides. Raises ConfigError with a user-facing message."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config ({exc.strerror or exc})") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config file must be a mapping of sections")
        data = loaded
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{exc}") from None


def replace(config: Any, **changes: Any) -> Any:
    """`dataclasses.replace` that re-runs validation (frozen dataclasses validate in __post_init__)."""
    return dataclasses.replace(config, **changes)


def with_labels_dir(config: Config, labels_dir: str | Path | None) -> Config:
    """`config` pairing images with the label maps in `labels_dir` (None: only a dataset folder's own
    labelsTr, or label maps lying beside their images as `medsynth sample` writes them)."""
    return replace(config, labels=replace(config.labels, dir=str(labels_dir) if labels_dir else None))
