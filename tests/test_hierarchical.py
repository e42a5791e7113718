"""The hierarchical model (medsynth.hierarchical): seamless assembly, the views D judges, training,
resume, sampling and refusals."""

from __future__ import annotations

import pytest
import torch
from helpers import cpu_runtime
from helpers import tiny_config as tiny

from medsynth import hierarchical
from medsynth.config import ConfigError, ModelConfig, load_config
from medsynth.hierarchical import SlabViews, discriminator_inputs, real_views, slab_starts
from medsynth.models import build_models
from medsynth.runs import train_run

CPU = cpu_runtime()
# 16³ with base grid 2: features at 4³, two slabs of 8.
SMALL = ("model.hierarchical_slabs=2", "model.base_grid=2")


def _generator_with_moved_statistics(upsample: str, shape=(32, 32, 32), slabs=4):
    config = ModelConfig(latent_dim=16, base_channels=4, max_channels=16, hierarchical_slabs=slabs, upsample=upsample)
    torch.manual_seed(0)
    generator, _ = build_models(config, shape)
    generator.train()
    with torch.no_grad():  # BatchNorm running statistics away from their start, as after training
        for start in slab_starts(shape, slabs):
            generator(torch.randn(4, 16), slab_start=start)
    return generator.eval()


@pytest.mark.parametrize("upsample", ["resize", "trilinear", "transposed", "pixel_shuffle"])
def test_the_volume_assembled_from_slabs_is_the_head_run_on_all_features(upsample):
    """No seams by construction: slab by slab equals the head on the whole volume at once."""
    generator = _generator_with_moved_statistics(upsample)
    z = torch.randn(3, 16)
    with torch.no_grad():
        assembled = generator(z)  # (3, 1, 32, 32, 32), four slabs of 8
        features, _ = generator._features(z, None, generator.trunk_doublings)
        whole = generator._to_output(generator._block(len(generator.blocks) - 3, features, None))
    assert assembled.shape == (3, 1, 32, 32, 32)
    torch.testing.assert_close(assembled, whole, rtol=0, atol=1e-6)
    # A training slab is that volume's slab too (eval mode: the same statistics).
    with torch.no_grad():
        low, slab = generator(z, slab_start=12)
    torch.testing.assert_close(slab, whole[..., 12:20], rtol=0, atol=1e-6)
    assert low.shape == (3, 1, 8, 8, 8) and low.abs().max() <= 1


def test_without_the_halo_slabs_would_not_join(monkeypatch):
    """The check above can fail: the head's reach is real."""
    monkeypatch.setattr(hierarchical, "HALO", 0)
    generator = _generator_with_moved_statistics("trilinear")
    z = torch.randn(2, 16)
    with torch.no_grad():
        assembled = generator(z)
        features, _ = generator._features(z, None, generator.trunk_doublings)
        whole = generator._to_output(generator._block(len(generator.blocks) - 3, features, None))
    assert (assembled - whole).abs().max() > 1e-3


def test_real_volumes_are_cut_into_the_views_the_fakes_come_in():
    volumes = torch.arange(2 * 32 * 32 * 32, dtype=torch.float32).view(2, 1, 32, 32, 32)
    views = real_views(volumes, start=8, slabs=4)
    assert views.low.shape == (2, 1, 8, 8, 8) and views.start == 8
    torch.testing.assert_close(views.low[0, 0, 0, 0, 0], volumes[0, 0, :4, :4, :4].mean())
    assert torch.equal(views.slab, volumes[..., 8:16])
    low, detail = discriminator_inputs(views)
    assert low.shape == (2, 1, 8, 8, 8) and detail.shape == (2, 2, 32, 32, 8)
    assert torch.equal(detail[:, :1], views.slab)
    # The context channel is the low-resolution volume's region z 2..3 (of 8), brought to full resolution.
    assert detail[:, 1:].min() >= low[..., 2:4].min() - 1e-3 and detail[:, 1:].max() <= low[..., 2:4].max() + 1e-3
    assert slab_starts((32, 32, 32), 4) == [0, 4, 8, 12, 16, 20, 24]
    assert isinstance(views.detach().float(), SlabViews)


def test_batchnorm_recalibration_runs_slabs_in_turn_and_never_the_whole_volume(monkeypatch):
    """The EMA's standing statistics come from the trunk and one slab a batch, every slab as often:
    at 256³ the whole volume (all slabs at once, in fp32) was what set a run's memory peak."""
    from medsynth.ema import recalibrate_batchnorm
    from medsynth.hierarchical import HierarchicalGenerator3d, slab_tiling

    generator = _generator_with_moved_statistics("resize")
    seen: list[int | None] = []
    forward = HierarchicalGenerator3d.forward

    def spy(self, z, codes=None, slab_start=None):
        seen.append(slab_start)
        return forward(self, z, codes, slab_start)

    monkeypatch.setattr(HierarchicalGenerator3d, "forward", spy)
    recalibrate_batchnorm(
        generator,
        16,
        "normal",
        torch.device("cpu"),
        seed=0,
        batches=6,
        batch_size=2,
        slab_starts=slab_tiling((32,) * 3, 4),
    )
    assert seen == [0, 8, 16, 24] * 2  # 6 batches rounded up to whole rounds of the 4 slabs
    assert not generator.training
    head_norm = generator.blocks[-2]  # the head's BatchNorm: its statistics moved from the slabs'
    assert head_norm.num_batches_tracked == 8 and torch.isfinite(head_norm.running_var).all()


def test_views_read_from_the_cache_are_the_views_cut_from_whole_augmented_volumes(tmp_path):
    """Training reads the low-resolution view a few planes at a time and the slab alone, through
    flips and intensity jitter, and must get what `real_views` cuts from the whole volumes."""
    import numpy as np

    from medsynth.config import AugmentConfig
    from medsynth.data import CachedVolumeDataset
    from medsynth.hierarchical import read_real_views

    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"v{i}.npy"))
        np.save(paths[-1], rng.uniform(-1, 1, (32, 32, 32)).astype(np.float32))
    augment = AugmentConfig(flip_axes=(0, 2), flip_probability=0.5, intensity_jitter=0.3)
    whole = CachedVolumeDataset(paths, augment, seed=3)
    lazy = CachedVolumeDataset(paths, augment, seed=3, draws_only=True)
    draws = [lazy[i] for i in range(3)]
    assert {axis for draw in draws for axis in draw.flipped_axes} == {0, 2}  # both flips are exercised
    expected = real_views(torch.from_numpy(np.stack([whole[i] for i in range(3)])), start=20, slabs=4)
    got = read_real_views(lazy, draws, start=20, shape=(32, 32, 32), slabs=4, device=torch.device("cpu"))
    assert got.start == 20 and torch.equal(got.slab, expected.slab)
    torch.testing.assert_close(got.low, expected.low, rtol=0, atol=1e-6)


def test_a_hierarchical_run_trains_samples_whole_volumes_and_resumes_exactly(phantom_dir, tmp_path):
    from test_train import _assert_identical, _state

    from medsynth.checkpoint import generator_from_checkpoint, load_checkpoint

    common = (*SMALL, "loss.r1_gamma=1", "augment.ada=true", "augment.ada_target=0.01", "augment.ada_interval=1")
    common += ("augment.ada_images_to_full=8", "train.checkpoint_every=100", "train.preview_every=100")
    train_run(phantom_dir, tmp_path / "whole", tiny("train.max_steps=4", *common), CPU)
    train_run(phantom_dir, tmp_path / "split", tiny("train.max_steps=2", *common), CPU)
    train_run(phantom_dir, tmp_path / "split", tiny("train.max_steps=4", *common), CPU)
    _assert_identical(_state(tmp_path / "whole"), _state(tmp_path / "split"))

    payload = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")
    assert set(payload["discriminator"]) >= {"low.to_logit.bias", "detail.to_logit.bias"}
    generator = generator_from_checkpoint(payload)  # what `sample` builds: nothing else needed
    assert isinstance(generator, hierarchical.HierarchicalGenerator3d)
    with torch.no_grad():
        volume = generator(torch.randn(2, 16))
    assert volume.shape == (2, 1, 16, 16, 16) and torch.isfinite(volume).all()


@pytest.mark.slow  # the resume test above builds the generator `sample` builds; this runs the command too
def test_sample_writes_full_resolution_volumes_from_a_hierarchical_run(phantom_dir, tmp_path, run_cli):
    import nibabel as nib

    train_run(phantom_dir, tmp_path / "run", tiny("train.max_steps=2", *SMALL), CPU)
    code, out, err = run_cli("sample", str(tmp_path / "run"), "-n", "2", "-o", str(tmp_path / "out"))
    assert code == 0, err
    written = sorted((tmp_path / "out").glob("*.nii.gz"))
    assert len(written) == 2 and nib.load(written[0]).shape == (16, 16, 16)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("model.hierarchical_slabs=3",), "power of two"),
        (("model.hierarchical_slabs=2", "loss.name=wgan_gp"), "wgan_gp"),
    ],
)
def test_settings_it_cannot_take_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny(*overrides)


def test_shapes_and_runs_it_cannot_take_are_refused_naming_the_settings():
    config = load_config(None, ["model.hierarchical_slabs=8"]).model
    with pytest.raises(ConfigError, match="does not fit the volume shape"):
        build_models(config, (64, 64, 32))  # slabs of 4 voxels
    with pytest.raises(ConfigError, match="unlabeled, unconditional"):
        build_models(config, (64, 64, 64), label_classes=2)


def test_every_discriminator_call_sees_views_and_the_real_slab_is_cut_where_the_fake_one_is(phantom_dir, tmp_path):
    from medsynth.pipeline import prepare_dataset
    from medsynth.train import Trainer

    seen = []

    class Recording(Trainer):
        def run_discriminator(self, volumes, discriminator, codes=None):
            assert isinstance(volumes, SlabViews)
            seen.append(
                (volumes.start, tuple(volumes.low.shape), tuple(volumes.slab.shape), volumes.slab.requires_grad)
            )
            return super().run_discriminator(volumes, discriminator, codes)

    config = tiny(*SMALL, "loss.r1_gamma=1", "augment.diff_augment=translation,cutout")
    prepared = prepare_dataset(phantom_dir, config, cache_dir=tmp_path / "cache")
    trainer = Recording(config, prepared.plan, [e.path for e in prepared.entries], tmp_path / "run", CPU)
    record = trainer.train_step()
    assert "r1" in record
    (real_start, *real), (fake_start, *fake), (g_start, *g) = seen  # D step: real (R1: grad), fake; G step
    assert real_start == fake_start and real == [(2, 1, 4, 4, 4), (2, 1, 16, 16, 8), True]
    assert fake == [(2, 1, 4, 4, 4), (2, 1, 16, 16, 8), False] and g[1] == (2, 1, 16, 16, 8)
