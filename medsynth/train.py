"""The `Trainer`: the adversarial game, and everything that makes it safe to run on a cluster.

Each step follows Goodfellow et al.'s algorithm with DCGAN networks:

1. update D, `loss.d_steps_per_g` times: m real volumes and m fresh noise samples; D learns to call
   the real ones real and G's (detached) ones fake;
2. update G on m fresh noise samples, with D frozen, to make D call them real;
3. update the EMA copy of G, which previews and sampling use.

Everything D judges (real volumes, fakes, the R1 and gradient-penalty inputs, and G's fakes in the
G step) passes through one method, `run_discriminator`: DiffAugment, then PacGAN packing, then D.
A new input to D (a label map, a condition) therefore reaches every D call or none.

With conditions in the plan (age, sex, a class), each real minibatch travels with its volumes'
condition codes; G makes this step's fakes at the same codes, and every D call gets them
(a projection discriminator, models.Discriminator3d).

With a label set in the plan (K classes), the game is played on pairs: a real volume travels with
its label map as K one-hot channels after the image, (B, 1 + K, X, Y, Z), G makes such pairs
(models.Generator3d), and every D call, penalty and augmentation sees both.

Around it: bf16 autocast, DDP, exact resume (RNG states, data position and optimiser states are
in every checkpoint), atomic checkpoints, SIGINT/SIGTERM/SIGUSR1 handling and a divergence guard.
`fit()` reads as the table of contents of a run.
"""

from __future__ import annotations

import contextlib
import copy
import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medsynth.ada import AdaptiveAugment
from medsynth.checkpoint import (
    ClockState,
    GuardState,
    PrecisionState,
    RngState,
    TrainingState,
    all_finite,
    load_checkpoint,
    publish_last,
    remove_interrupted_writes,
    rotate_checkpoints,
    save_checkpoint,
)
from medsynth.conditions import ConditionSpec
from medsynth.config import Config, config_to_dict
from medsynth.data import CachedVolumeDataset, VolumeDraw
from medsynth.diffaug import diff_augment
from medsynth.distributed import Runtime, any_rank, sum_over_ranks
from medsynth.ema import recalibrate_batchnorm, update_ema
from medsynth.errors import MedsynthError
from medsynth.hierarchical import SlabViews, discriminator_inputs, read_real_views, slab_starts, slab_tiling
from medsynth.losses import discriminator_confidence, discriminator_loss, generator_loss, gradient_penalty, r1_penalty
from medsynth.memory import peak_bytes
from medsynth.metrics import MetricsLog
from medsynth.models import build_models, label_class_count, one_hot_labels, sample_latent, split_pairs
from medsynth.plan import Plan
from medsynth.precision import PrecisionChoice, choose_precision, native_bf16
from medsynth.preview import save_montage

# Log callback: (step, metrics) -> None. The CLI draws progress with it; tests pass None.
StepCallback = Callable[[int, dict[str, Any]], None]
# Event callback: one sentence about something that happened to the run (a divergence rollback).
EventCallback = Callable[[str], None]


class TrainingStopped(MedsynthError):
    """Training ended early on purpose (a signal) or by the divergence guard. Message for users."""

    level = "warning"

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class DataPosition:
    epoch: int = 0
    batch: int = 0  # batches already used in this epoch


class ResumableBatches:
    """Minibatch index lists in a fixed order per epoch (DistributedSampler: shuffled with
    (seed, epoch), every rank its own share), starting anywhere, so a resume continues exactly."""

    def __init__(self, dataset_size: int, batch_size: int, seed: int, runtime: Runtime):
        from torch.utils.data import DistributedSampler

        self.sampler = DistributedSampler(
            range(dataset_size),  # type: ignore[arg-type]
            num_replicas=runtime.world_size,
            rank=runtime.rank,
            shuffle=True,
            seed=seed,
            drop_last=True,
        )
        self.batch_size = batch_size
        self.per_epoch = len(self.sampler) // batch_size
        if self.per_epoch == 0:
            raise TrainingStopped(
                f"{dataset_size} volumes cannot fill one batch of {batch_size} per process "
                f"({runtime.world_size} process(es)): lower train.batch_size or add data",
                exit_code=1,
            )

    def epoch(self, epoch: int, skip: int = 0) -> list[list[int]]:
        self.sampler.set_epoch(epoch)
        order = list(self.sampler)
        return [order[i * self.batch_size : (i + 1) * self.batch_size] for i in range(skip, self.per_epoch)]


class StopSignals:
    """While active, SIGINT, SIGTERM and SIGUSR1 (what SLURM sends before a time limit with
    `--signal=USR1@120`) only record that a stop was asked for; the loop checkpoints at the end of
    the step and exits. A second signal of the same kind kills at once (the checkpoint write in
    progress is atomic anyway)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        self.received = signum
        signal.signal(signum, signal.SIG_DFL)

    def __enter__(self) -> StopSignals:
        for signum in self.SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread (e.g. inside some test runners)
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "a signal on another process"


class Trainer:
    """Holds G, D, their EMA and optimisers, and runs the game for `config.train.max_steps` steps."""

    def __init__(
        self,
        config: Config,
        plan: Plan,
        volume_paths: list[str],
        run_dir: Path,
        runtime: Runtime,
        fingerprint: dict[str, Any] | None = None,
        resume: TrainingState | None = None,
        on_step: StepCallback | None = None,
        on_event: EventCallback | None = None,
        label_paths: list[str] | None = None,
        condition_codes: np.ndarray | None = None,
    ):
        """`label_paths`: each volume's cached label map (uint8 label values on its grid), required
        exactly when the plan has a label set: the paired model is then trained on both.
        `condition_codes` (n, width): each volume's conditions as the model sees them
        (medsynth.conditions), required exactly when the plan has conditions."""
        self.config = config
        self.plan = plan
        self.run_dir = Path(run_dir)
        self.runtime = runtime
        self.device = runtime.device
        self.fingerprint = fingerprint or {}
        self.on_step = on_step
        self.on_event = on_event
        self.precision = self._choose_precision(resume)
        self.bf16 = self.precision.bf16
        train = config.train

        # K label channels after the image, from the plan's label set (0: the unlabeled model).
        self.label_classes = label_class_count(plan.label_values)
        if bool(self.label_classes) != (label_paths is not None):
            raise ValueError("label maps are needed exactly when the plan has a label set")
        self.conditions = ConditionSpec.of(plan.conditions)
        if bool(self.conditions) != (condition_codes is not None):
            raise ValueError("condition codes are needed exactly when the plan has conditions")
        # The hierarchical model (medsynth.hierarchical): G makes views, not whole volumes, in training.
        self.slabs = config.model.hierarchical_slabs
        self.hierarchical = bool(self.slabs)
        torch.manual_seed(config.seed)  # the same initial weights on every rank and every run
        generator, discriminator = build_models(config.model, plan.target_shape, self.label_classes, self.conditions)
        memory_format = torch.channels_last_3d if train.channels_last else torch.contiguous_format
        # The modules that own the weights: checkpoints, the EMA and previews use these.
        self.generator = generator.to(self.device, memory_format=memory_format)
        self.generator.activation_checkpointing = train.activation_checkpointing
        self.discriminator = discriminator.to(self.device, memory_format=memory_format)
        self.memory_format = memory_format
        self.ema = copy.deepcopy(self.generator).eval().requires_grad_(False)
        self.opt_g = torch.optim.Adam(
            self.generator.parameters(), lr=train.lr_generator, betas=(train.beta1, train.beta2)
        )
        self.opt_d = torch.optim.Adam(
            self.discriminator.parameters(), lr=train.lr_discriminator, betas=(train.beta1, train.beta2)
        )
        # The handles each half of the step calls, named by role. A network is called through its
        # DDP wrapper (gradients averaged over ranks) and compiled version only in the half that
        # updates it. The other half calls the plain module: in the G step D is frozen, so DDP
        # would have no gradient to average and would only re-broadcast D's buffers; in the D step
        # G runs without gradients at all.
        self.generator_in_g_step: nn.Module = self.generator
        self.discriminator_in_d_step: nn.Module = self.discriminator
        self.discriminator_in_g_step: nn.Module = self.discriminator
        if runtime.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.generator_in_g_step = DDP(self.generator, device_ids=ids)
            self.discriminator_in_d_step = DDP(self.discriminator, device_ids=ids)
        if train.compile:
            self.generator_in_g_step = torch.compile(self.generator_in_g_step)
            self.discriminator_in_d_step = torch.compile(self.discriminator_in_d_step)

        # The hierarchical model's loader serves draws, and its views are cut from the cache (read_real_views).
        self.dataset = CachedVolumeDataset(
            volume_paths,
            config.augment,
            seed=config.seed,
            label_paths=label_paths,
            condition_codes=condition_codes,
            draws_only=self.hierarchical,
        )
        # Every training volume's codes on the device: BatchNorm recalibration draws from them, and
        # previews show the first volumes' conditions (beside real.png, the same volumes).
        self.condition_codes = (
            torch.as_tensor(condition_codes, dtype=torch.float32, device=self.device)
            if condition_codes is not None
            else None
        )
        self.batches = ResumableBatches(len(self.dataset), train.batch_size, config.seed, runtime)
        self.loader_workers = (
            train.loader_workers if train.loader_workers >= 0 else (4 if self.device.type == "cuda" else 0)
        )
        # Each rank draws different noise; the stream is part of the checkpoint.
        self.latent_rng = torch.Generator(device=self.device).manual_seed(config.seed * 1000 + 1 + runtime.rank)
        self.diff_policy = config.augment.diff_augment_policy
        augment = config.augment
        self.ada = (
            AdaptiveAugment(augment.ada_target, augment.ada_images_to_full, augment.ada_interval, augment.flip_axes)
            if augment.ada
            else None
        )
        self.augment_rng = torch.Generator(device=self.device).manual_seed(config.seed * 1000 + 500 + runtime.rank)
        self.preview_noise = sample_latent(
            train.preview_samples,
            config.model.latent_dim,
            config.loss.latent_prior,
            torch.Generator(device=self.device).manual_seed(config.seed + 12345),
            self.device,
        )
        self.preview_codes = (
            self.condition_codes[torch.arange(train.preview_samples) % len(self.condition_codes)]
            if self.condition_codes is not None
            else None
        )  # (preview_samples, width)
        self.step = 0
        self.position = DataPosition()
        self.rollbacks = 0
        self.d_win_streak = 0
        self._real_iterator: Iterator[torch.Tensor] | None = None
        self.last_good_step: int | None = None
        # The training clock (train.max_minutes): seconds trained in earlier sessions of this run,
        # and when this session's training began. A rollback goes back in steps, not in time.
        self._trained_before = 0.0
        self.clock_missing = False  # resumed from a checkpoint older than the clock: its time is unknown
        self._clock_start: float | None = None
        self.out_of_time = False
        if resume is not None:
            self._restore(resume)
            clock = resume.get("clock")
            self.clock_missing = clock is None
            self._trained_before = float((clock or {}).get("trained_seconds", 0.0))
        if runtime.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsLog(self.run_dir, resume_step=self.step, enabled=runtime.is_main)
        self._throughput_start, self._throughput_steps = time.perf_counter(), 0

    def _choose_precision(self, resume: TrainingState | None) -> PrecisionChoice:
        """train.amp=auto keeps a resumed run in the precision it started in, on the same kind of
        device, while that precision is still native here: a requeued job must not change its
        arithmetic on a new measurement. Anything else chooses afresh."""
        choice = choose_precision(self.config.train.amp, self.device)
        saved = resume.get("precision") if resume else None
        if (
            self.config.train.amp == "auto"
            and saved
            and saved["device_type"] == self.device.type
            and saved["bf16"] != choice.bf16
            and (not saved["bf16"] or native_bf16(self.device))
        ):
            name = "bf16 autocast" if saved["bf16"] else "fp32"
            return PrecisionChoice(saved["bf16"], f"{name}, as this run started (a resumed run keeps its precision)")
        return choice

    # ------------------------------------------------------------------ data

    def _loader(self, epoch: int, skip: int) -> Iterator[torch.Tensor]:
        from torch.utils.data import DataLoader

        self.dataset.set_epoch(epoch)
        loader = DataLoader(
            self.dataset,
            batch_sampler=self.batches.epoch(epoch, skip),
            num_workers=self.loader_workers,
            pin_memory=self.device.type == "cuda",
            # Its own seed source: worker seeding must not draw from the global RNG, or a resumed
            # run (which opens a loader mid-epoch) would drift from an uninterrupted one.
            generator=torch.Generator().manual_seed(self.config.seed + epoch),
            collate_fn=list if self.hierarchical else None,  # VolumeDraws, as they come
        )
        yield from loader

    def _next_real(self) -> tuple[torch.Tensor | list[VolumeDraw], torch.Tensor | None]:
        """The next minibatch of real volumes, (B, 1, X, Y, Z) on the device, or with label maps the
        pairs as D sees them, (B, 1 + K, X, Y, Z); and their condition codes (B, width), or None
        for an unconditional model. The hierarchical model's: the volumes' draws from the cache, to
        be read as views. Epochs roll over."""
        while True:
            if self._real_iterator is None:
                self._real_iterator = self._loader(self.position.epoch, self.position.batch)
            try:
                batch = next(self._real_iterator)
            except StopIteration:
                self.position = DataPosition(self.position.epoch + 1, 0)
                self._real_iterator = None
                continue
            self.position.batch += 1
            if self.hierarchical:
                return batch, None  # the draws: update_discriminator reads the views at the fake slab's place
            codes = None
            if self.conditions:
                *batch, codes = batch
                codes = codes.to(self.device, non_blocking=True)  # (B, width)
                batch = batch if self.label_classes else batch[0]
            if self.label_classes:
                volumes, label_maps = (part.to(self.device, non_blocking=True) for part in batch)
                # uint8 values travel; the one-hot channels are made on the device.
                labels = one_hot_labels(label_maps, self.plan.label_values).to(volumes.dtype)  # (B, K, X, Y, Z)
                batch = torch.cat([volumes, labels], dim=1)  # (B, 1 + K, X, Y, Z)
            return batch.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format), codes

    # ------------------------------------------------------------------ one step

    def _autocast(self):
        if self.bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _noise(self, batch: int) -> torch.Tensor:
        c = self.config
        return sample_latent(batch, c.model.latent_dim, c.loss.latent_prior, self.latent_rng, self.device)

    def run_discriminator(
        self, volumes: torch.Tensor | SlabViews, discriminator: nn.Module, codes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Everything D judges passes here, so every D call sees the same transforms: adaptive
        augmentation and DiffAugment's random, differentiable transforms (when configured), then packs of `model.pack` volumes
        stacked as channels (PacGAN), then `discriminator` (the handle of the half that calls).

        volumes (B, 1, X, Y, Z), or pairs (B, 1 + K, X, Y, Z) -> logits (B / pack,), float32 for the
        losses. The augmentations move a pair's label channels with its image and change only the
        image's intensities (ada.py, diffaug.py). `codes` (B, width), a conditional model's: each
        volume's conditions, which no augmentation changes, packed as its volume is.

        The hierarchical model's D judges views (medsynth.hierarchical), `SlabViews`: G's, or real
        volumes cut as G's are -> logits (2B / pack,), the low-resolution part's, then the detail part's.
        """
        if self.hierarchical:
            # Two views, each augmented and packed as a whole volume would be; one D call for both.
            low, detail = discriminator_inputs(volumes)  # (B, 1, X/4, Y/4, Z/4), (B, 2, X, Y, s)
            return discriminator(self._augment_and_pack(low), self._augment_and_pack(detail)).float()  # (2B / pack,)
        volumes = self._augment_and_pack(volumes)  # (B / pack, pack · C, X, Y, Z)
        if codes is None:
            return discriminator(volumes).float()  # (B / pack,)
        codes = codes.reshape(volumes.shape[0], self.config.model.pack, codes.shape[1])  # (B / pack, pack, width)
        return discriminator(volumes, codes).float()  # (B / pack,)

    def _augment_and_pack(self, volumes: torch.Tensor) -> torch.Tensor:
        """(B, C, X, Y, Z) -> augmented and packed, (B / pack, pack · C, X, Y, Z)."""
        volumes = volumes.contiguous(memory_format=self.memory_format)
        if self.ada is not None:
            volumes = self.ada.augment(volumes, self.augment_rng, self.label_classes)
        if self.diff_policy:
            volumes = diff_augment(volumes, self.diff_policy, self.augment_rng, self.label_classes)
        pack = self.config.model.pack
        if pack > 1:
            batch, channels, *spatial = volumes.shape
            # A pack's volumes side by side, each with its own label channels.
            volumes = volumes.reshape(batch // pack, pack * channels, *spatial)  # (B / pack, pack · C, X, Y, Z)
        return volumes

    def update_discriminator(
        self,
        real: torch.Tensor | list[VolumeDraw],
        fake: torch.Tensor | None = None,
        with_r1: bool = True,
        codes: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """One D update: real (B, C, X, Y, Z) called real (the hierarchical model's real batch: its
        draws from the cache), G's fakes called fake. `fake`, when given, is G's output of this
        step, detached here; otherwise G runs on fresh noise without
        gradients. `with_r1`: whether this update carries the (lazy) R1 penalty. `codes` (B, width):
        the real volumes' conditions, which the fakes are made at too, so D judges each condition's
        real and fake volumes alike, and only realism given the condition separates them."""
        loss_config = self.config.loss
        discriminator = self.discriminator_in_d_step
        if fake is None:
            with torch.no_grad(), self._autocast():
                fake = self._generate(self.generator, len(real), codes)  # (B, C, X, Y, Z), C = 1 + K
        fake = fake.detach().float()  # no graph back to G
        batch = len(real)
        if self.hierarchical:
            # The views D judges, read now at the fake slab's place; R1 then differentiates what D sees.
            real = read_real_views(self.dataset, real, fake.start, self.plan.target_shape, self.slabs, self.device)
        r1 = loss_config.r1_gamma > 0 and with_r1
        if r1:
            # R1 differentiates D's output w.r.t. the whole input: the image and its label channels.
            real = real.detach().requires_grad_(True)
        with self._autocast():
            real_logits = self.run_discriminator(real, discriminator, codes)  # (B / pack,)
            fake_logits = self.run_discriminator(fake, discriminator, codes)  # (B / pack,)
        loss = discriminator_loss(loss_config.name, real_logits, fake_logits)
        extra: dict[str, float] = {}
        if loss_config.name == "wgan_gp":
            penalty = gradient_penalty(lambda v: self.run_discriminator(v, discriminator, codes), real.detach(), fake)
            loss = loss + loss_config.gp_weight * penalty
            extra["gradient_penalty"] = float(penalty.detach())
        if r1:
            penalty = r1_penalty(real_logits, real)
            # Lazy R1 is scaled by its interval, so its average pull matches R1 on every update.
            loss = loss + 0.5 * loss_config.r1_gamma * loss_config.r1_interval * penalty
            extra["r1"] = float(penalty.detach())
        self.opt_d.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.discriminator.parameters(), float("inf"))
        self.opt_d.step()
        if self.ada is not None:
            self.ada.observe(real_logits)
            self.ada.adjust(batch * self.runtime.world_size, lambda *v: sum_over_ranks(self.runtime, v))
            extra["ada_p"] = self.ada.probability
        return {
            "loss_d": float(loss.detach()),
            "d_real": discriminator_confidence(loss_config.name, real_logits.detach()),
            "d_fake": discriminator_confidence(loss_config.name, fake_logits.detach()),
            "grad_norm_d": float(grad_norm),
            **extra,
        }

    def _generate(self, generator: nn.Module, batch: int, codes: torch.Tensor | None) -> torch.Tensor:
        """`generator` on fresh noise (at `codes`, for a conditional model): (B, 1 + K, X, Y, Z);
        the hierarchical model's: its views, with the slab at a random place."""
        z = self._noise(batch)
        if self.hierarchical:
            starts = slab_starts(self.plan.target_shape, self.slabs)
            start = starts[int(torch.randint(len(starts), (1,), generator=self.latent_rng, device=self.device))]
            return SlabViews(*generator(z, slab_start=start), start)
        return generator(z) if codes is None else generator(z, codes)

    def generate_for_update(self, batch: int, codes: torch.Tensor | None = None) -> torch.Tensor:
        """G(z) on fresh noise with gradients, for G's update: (B, 1 + K, X, Y, Z)."""
        with self._autocast():
            return self._generate(self.generator_in_g_step, batch, codes)

    def update_generator(self, fake: torch.Tensor, codes: torch.Tensor | None = None) -> dict[str, float]:
        """One G update on this step's fakes (with their graph back to G), with flipped labels:
        make D call them real (at their conditions, `codes`)."""
        self.discriminator.requires_grad_(False)  # G's step needs gradients through D, not for D
        try:
            with self._autocast():
                logits = self.run_discriminator(fake, self.discriminator_in_g_step, codes)  # (B / pack,)
            loss = generator_loss(self.config.loss.name, logits)
            self.opt_g.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(self.generator.parameters(), float("inf"))
            self.opt_g.step()
        finally:
            self.discriminator.requires_grad_(True)
        return {"loss_g": float(loss.detach()), "grad_norm_g": float(grad_norm)}

    def train_step(self) -> dict[str, float]:
        """One generator update, after `d_steps_per_g` discriminator updates, then the EMA."""
        loss_config = self.config.loss
        shared = loss_config.share_fake and loss_config.d_steps_per_g == 1
        for i in range(loss_config.d_steps_per_g):
            real, codes = self._next_real()
            batch = len(real)
            # Counted from the step, so a resumed run puts R1 on the same updates.
            with_r1 = (self.step * loss_config.d_steps_per_g + i) % loss_config.r1_interval == 0
            fake = self.generate_for_update(batch, codes) if shared else None
            record = self.update_discriminator(real, fake, with_r1=with_r1, codes=codes)
            del real  # G's update needs only the batch size; at 256³ a real volume is 64 MiB
        if not shared:
            fake = self.generate_for_update(batch, codes)
        record.update(self.update_generator(fake, codes))
        update_ema(self.ema, self.generator, self.step, self.config.train.ema_decay)
        self.step += 1
        return record

    # ------------------------------------------------------------------ state

    def _rng_state(self) -> RngState:
        state: RngState = {
            "torch_cpu": torch.get_rng_state(),
            "latent": self.latent_rng.get_state(),
            "augment": self.augment_rng.get_state(),
        }
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def state(self) -> TrainingState:
        """Everything a checkpoint holds besides its header (checkpoint.TrainingState)."""
        summary = {k: v for k, v in self.fingerprint.items() if k != "sources"}
        summary.pop("outliers", None)  # names of files: not for a checkpoint that may be shared
        return {
            "step": self.step,
            "config": config_to_dict(self.config),
            "plan": self.plan.to_dict(),
            "fingerprint": summary,
            "world_size": self.runtime.world_size,
            "generator": self.generator.state_dict(),
            "generator_ema": self.ema.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "optimizer_generator": self.opt_g.state_dict(),
            "optimizer_discriminator": self.opt_d.state_dict(),
            "rng": self._rng_state(),
            "data": {"epoch": self.position.epoch, "batch": self.position.batch},
            "guard": GuardState(rollbacks=self.rollbacks, d_win_streak=self.d_win_streak),
            "precision": PrecisionState(bf16=self.bf16, device_type=self.device.type),
            "clock": ClockState(trained_seconds=self.trained_seconds()),
            **({"ada": self.ada.state()} if self.ada is not None else {}),
        }

    def _restore(self, payload: TrainingState) -> None:
        self.generator.load_state_dict(payload["generator"])
        self.discriminator.load_state_dict(payload["discriminator"])
        self.ema.load_state_dict(payload["generator_ema"])
        self.opt_g.load_state_dict(payload["optimizer_generator"])
        self.opt_d.load_state_dict(payload["optimizer_discriminator"])
        rng = payload["rng"]
        torch.set_rng_state(rng["torch_cpu"])
        self.latent_rng.set_state(rng["latent"])
        if "augment" in rng:
            self.augment_rng.set_state(rng["augment"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.step = int(payload["step"])
        self.position = DataPosition(int(payload["data"]["epoch"]), int(payload["data"]["batch"]))
        self._real_iterator = None
        guard = payload.get("guard", {})
        self.rollbacks = int(guard.get("rollbacks", 0))
        self.d_win_streak = int(guard.get("d_win_streak", 0))
        self.last_good_step = self.step
        if self.ada is not None and "ada" in payload:
            self.ada.load_state(payload["ada"], self.step * self.config.loss.d_steps_per_g)

    def _prepare_ema_for_use(self) -> None:
        c = self.config
        recalibrate_batchnorm(
            self.ema,
            c.model.latent_dim,
            c.loss.latent_prior,
            self.device,
            seed=c.seed + 54321,
            batch_size=max(2, c.train.batch_size),
            condition_codes=self.condition_codes,
            slab_starts=slab_tiling(self.plan.target_shape, self.slabs) if self.hierarchical else None,
        )

    def load_weights(self, payload: TrainingState) -> None:
        """Start from another run's weights (--init-from): G, its EMA and D, nothing else; the
        optimisers, RNG streams and step stay those of a fresh run."""
        self.generator.load_state_dict(payload["generator"])
        self.ema.load_state_dict(payload["generator_ema"])
        self.discriminator.load_state_dict(payload["discriminator"])

    def save(self) -> Path | None:
        """Checkpoint now (main process only). Refuses to write non-finite weights."""
        if not self.runtime.is_main:
            return None
        if not all_finite(self.generator, self.discriminator, self.ema):
            raise TrainingStopped(f"non-finite weights at step {self.step}: not saved", exit_code=1)
        self._prepare_ema_for_use()
        folder = self.run_dir / "checkpoints"
        numbered = save_checkpoint(folder / f"step_{self.step:08d}.pt", self.state())
        publish_last(folder, numbered)
        rotate_checkpoints(folder, self.config.train.keep_checkpoints)
        self.last_good_step = self.step
        return numbered

    @torch.no_grad()
    def preview(self) -> Path | None:
        if not self.runtime.is_main:
            return None
        self._prepare_ema_for_use()
        volumes, labels = [], []  # (X, Y, Z) each: the images, and the label maps' values of a paired model
        for i in range(len(self.preview_noise)):  # one at a time: at 256³ each is 64 MiB, and more in the making
            inputs = [self.preview_noise[i : i + 1]]  # (1, latent_dim)
            if self.preview_codes is not None:
                inputs.append(self.preview_codes[i : i + 1])  # (1, width)
            image, label_map = split_pairs(self.ema(*inputs).float(), self.plan.label_values)
            volumes.append(image[0].cpu().numpy())
            if label_map is not None:
                labels.append(label_map[0].cpu().numpy())
        folder = self.run_dir / "previews"
        labels_or_none = labels or None
        path = save_montage(
            folder / f"step_{self.step:08d}.png", volumes, labels=labels_or_none, spacing=self.plan.spacing
        )
        save_montage(folder / "latest.png", volumes, labels=labels_or_none, spacing=self.plan.spacing)
        return path

    def save_real_preview(self) -> None:
        if self.runtime.is_main:
            count = min(self.config.train.preview_samples, len(self.dataset))
            volumes = [np.load(self.dataset.paths[i], mmap_mode="r") for i in range(count)]
            label_paths = self.dataset.label_paths
            labels = [np.load(label_paths[i], mmap_mode="r") for i in range(count)] if label_paths else None
            save_montage(self.run_dir / "previews" / "real.png", volumes, labels=labels, spacing=self.plan.spacing)

    # ------------------------------------------------------------------ guard

    def diverged(self, record: dict[str, float]) -> str | None:
        """Why this step's record shows divergence, or None. Counts D's winning streak."""
        if not all(math.isfinite(record[k]) for k in ("loss_d", "loss_g")):
            return f"a non-finite loss at step {self.step} (D {record['loss_d']}, G {record['loss_g']})"
        if self.config.loss.name == "non_saturating" and record["d_fake"] < 0.01 and record["d_real"] > 0.99:
            self.d_win_streak += 1
        else:
            self.d_win_streak = 0
        if self.d_win_streak >= self.config.train.d_win_steps:
            return (
                f"the discriminator has won: D(x) > 0.99 and D(G(z)) < 0.01 for {self.d_win_streak} steps, "
                "so the generator gets no useful gradient"
            )
        return None

    def _roll_back(self, reason: str) -> None:
        """Go back to the last checkpoint with halved learning rates, or stop if that is spent."""
        advice = "try a lower train.lr_discriminator, model.spectral_norm=true or loss.r1_gamma=1"
        train = self.config.train
        last = self.run_dir / "checkpoints" / "last.pt"
        if train.on_divergence == "stop" or self.rollbacks >= train.max_rollbacks or not last.exists():
            raise TrainingStopped(
                f"training stopped: {reason}. The last good checkpoint is step {self.last_good_step}; {advice}",
                exit_code=1,
            )
        payload = load_checkpoint(last, map_location=self.device)
        rollbacks = self.rollbacks + 1
        self._restore(payload)
        self.rollbacks = rollbacks
        self.d_win_streak = 0
        # Halve the learning rates and draw different noise, or the same steps would diverge again.
        for optimizer in (self.opt_g, self.opt_d):
            for group in optimizer.param_groups:
                group["lr"] *= 0.5
        self.latent_rng.manual_seed(self.config.seed * 1000 + 1 + self.runtime.rank + 7919 * rollbacks)
        self._event(
            f"divergence guard: {reason}; rolled back to step {self.step} with halved learning rates "
            f"(rollback {rollbacks} of {train.max_rollbacks})"
        )

    def _event(self, message: str) -> None:
        if self.runtime.is_main and self.on_event is not None:
            self.on_event(message)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> int:
        """Train to max_steps, or until train.max_minutes of training are spent. Returns the final
        step. Raises TrainingStopped on a signal or guard stop."""
        with StopSignals() as stop, contextlib.closing(self.metrics):
            self._start()
            while self.step < self.config.train.max_steps and not self.out_of_time:
                record = self.train_step()
                if self._guard(record):
                    continue  # rolled back: the step is redone from the last checkpoint
                self._log(record)
                self._end_of_step(stop)
        return self.step

    def _start(self) -> None:
        """Clear what a killed run left behind; on a fresh run, the real preview and a step-0
        checkpoint, so the divergence guard always has somewhere to go back to."""
        self._clock_start = time.perf_counter()
        if self.runtime.is_main:
            remove_interrupted_writes(self.run_dir / "checkpoints")
        if self.step == 0:
            self.save_real_preview()
            if self.runtime.is_main and not (self.run_dir / "checkpoints" / "last.pt").exists():
                self.save()
        self._throughput_start, self._throughput_steps = time.perf_counter(), 0

    def _guard(self, record: dict[str, float]) -> bool:
        """True if the step diverged (on any rank) and the run rolled back; stops if it cannot."""
        self._throughput_steps += 1
        reason = self.diverged(record)
        if not any_rank(self.runtime, reason is not None):
            return False
        self._roll_back(reason or "another process diverged")
        return True

    def _log(self, record: dict[str, float]) -> None:
        """Complete the step's record (learning rates, throughput) and write it to metrics and the display."""
        train = self.config.train
        elapsed = time.perf_counter() - self._throughput_start
        steps_per_s = self._throughput_steps / max(elapsed, 1e-9)
        volumes = train.batch_size * self.runtime.world_size * self.config.loss.d_steps_per_g
        record.update(
            step=self.step,
            epoch=self.position.epoch,
            lr_g=self.opt_g.param_groups[0]["lr"],
            lr_d=self.opt_d.param_groups[0]["lr"],
            steps_per_s=steps_per_s,
            volumes_per_s=steps_per_s * volumes,
            peak_memory_mb=peak_bytes(self.device) / 2**20,  # what `train --dry-run` predicts
            trained_s=self.trained_seconds(),  # the training clock, over resumes (train.max_minutes)
            time=time.time(),
        )
        self.metrics.write(record)
        if self.on_step is not None and self.runtime.is_main:
            self.on_step(self.step, record)
        if self.step % train.log_every == 0:  # throughput over the last log window
            self._throughput_start, self._throughput_steps = time.perf_counter(), 0

    def trained_seconds(self) -> float:
        """Wall time spent training this run, over all its sessions (train.max_minutes)."""
        session = time.perf_counter() - self._clock_start if self._clock_start is not None else 0.0
        return self._trained_before + session

    def _end_of_step(self, stop: StopSignals) -> None:
        """Checkpoint and preview on schedule, and at the end (max_steps or the time budget); on a
        stop signal (on any rank), checkpoint and stop."""
        train = self.config.train
        if train.max_minutes is not None:  # every rank stops at the same step
            self.out_of_time = any_rank(self.runtime, self.trained_seconds() >= 60 * train.max_minutes)
        finished = self.step == train.max_steps or self.out_of_time
        scheduled_checkpoint = self.step % train.checkpoint_every == 0 or finished
        if scheduled_checkpoint:
            self.save()
        if self.step % train.preview_every == 0 or finished:
            self.preview()
        if self.out_of_time and self.step < train.max_steps:
            self._event(
                f"time budget spent: {train.max_minutes:g} minutes of training (train.max_minutes), "
                f"finished at step {self.step}"
            )
        if any_rank(self.runtime, stop.received is not None):
            if not scheduled_checkpoint:
                self.save()
            raise TrainingStopped(
                f"stopped by {stop.name} at step {self.step}; checkpoint saved. Run the same command again to resume",
                exit_code=128 + (stop.received or signal.SIGTERM),
            )
