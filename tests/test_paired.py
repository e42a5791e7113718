"""The paired model: G makes an image and its label map, D judges both; pairs out of `sample`.

Label maps are K one-hot channels after the image, (B, 1 + K, X, Y, Z): real ones from the cache,
fake ones from G's straight-through softmax. Every augmentation moves them with the image and
never changes their values; `sample` writes each label map beside its image.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import CONFIGS, cpu_runtime, write_labelled_folders
from helpers import tiny_config as tiny
from test_train import _assert_identical, _state

from medsynth.ada import AdaptiveAugment
from medsynth.checkpoint import load_checkpoint
from medsynth.config import ModelConfig
from medsynth.diffaug import diff_augment
from medsynth.metrics import read_metrics
from medsynth.models import (
    Discriminator3d,
    Generator3d,
    build_models,
    one_hot_labels,
    straight_through_one_hot,
)
from medsynth.pipeline import prepare_dataset
from medsynth.plan import Plan
from medsynth.preview import LABEL_COLOURS, montage
from medsynth.runs import RunRefused, train_run
from medsynth.train import Trainer

CPU = cpu_runtime()
MODEL = ModelConfig(latent_dim=8, base_channels=4, max_channels=16, pack=1)
LABEL_VALUES = (0, 1, 2)  # what `blob_labels` draws: background, the blob, its +x half
K = len(LABEL_VALUES)


def paired(labels_dir: Path, *overrides: str):
    return tiny(f"labels.dir={labels_dir}", *overrides)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> tuple[Path, Path]:
    """(SCAN_DIR, LABEL_DIR): three blob images of 20×24×16 and their label maps of values 0, 1, 2."""
    return write_labelled_folders(tmp_path_factory.mktemp("labelled"), n=3)


@pytest.fixture(scope="module")
def prepared(labelled, tmp_path_factory):
    scans, labels = labelled
    return prepare_dataset(scans, paired(labels), cache_dir=tmp_path_factory.mktemp("paired-cache"))


@pytest.fixture(scope="module")
def paired_run(labelled, tmp_path_factory) -> Path:
    """A paired tiny model trained for 3 steps, for sampling."""
    scans, labels = labelled
    root = tmp_path_factory.mktemp("paired-run")
    config = paired(labels, "train.max_steps=3", f"cache.dir={root / 'cache'}")
    train_run(scans, root / "run", config, CPU)
    return root / "run"


# ---------------------------------------------------------------------------------------------
# The networks


def test_the_unlabeled_networks_are_todays_and_the_paired_ones_differ_only_where_the_channels_enter():
    generator, discriminator = build_models(MODEL, (16, 16, 16))
    paired_generator, paired_discriminator = build_models(MODEL, (16, 16, 16), label_classes=K)
    for plain, pair, changed in (
        (generator, paired_generator, "to_volume."),
        (discriminator, paired_discriminator, "features.0."),
    ):
        shapes = {name: tuple(t.shape) for name, t in plain.state_dict().items()}
        paired_shapes = {name: tuple(t.shape) for name, t in pair.state_dict().items()}
        assert shapes.keys() == paired_shapes.keys()  # the same parameter and buffer names
        differing = {name for name in shapes if shapes[name] != paired_shapes[name]}
        assert differing and all(name.startswith(changed) for name in differing), differing
    # Built without a label set, the networks are those of a call that never heard of labels.
    torch.manual_seed(0)
    before = Generator3d(MODEL, (16, 16, 16)).state_dict()
    torch.manual_seed(0)
    after = Generator3d(MODEL, (16, 16, 16), label_classes=0).state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_paired_generator_makes_an_image_and_one_hot_label_channels():
    generator = Generator3d(MODEL, (16, 16, 16), label_classes=K)
    out = generator(torch.randn(3, MODEL.latent_dim))
    assert out.shape == (3, 1 + K, 16, 16, 16)
    assert out[:, 0].min() >= -1 and out[:, 0].max() <= 1  # tanh
    labels = out[:, 1:]
    assert set(labels.unique().tolist()) <= {0.0, 1.0} and torch.equal(labels.sum(1), torch.ones(3, 16, 16, 16))


def test_paired_discriminator_judges_packs_of_pairs():
    for pack in (1, 2):
        discriminator = Discriminator3d(ModelConfig(base_channels=2, pack=pack), (16, 16, 16), label_classes=K)
        assert discriminator.features[0].in_channels == pack * (1 + K)
        assert discriminator(torch.zeros(2, pack * (1 + K), 16, 16, 16)).shape == (2,)


def test_straight_through_is_one_hot_forward_and_the_softmax_gradient_backward():
    logits = torch.randn(2, K, 4, 4, 4, requires_grad=True)
    weights = torch.randn(2, K, 4, 4, 4)
    probabilities = torch.softmax(logits, dim=1)
    hard = straight_through_one_hot(probabilities)
    assert torch.equal(hard, torch.nn.functional.one_hot(logits.argmax(1), K).permute(0, 4, 1, 2, 3).float())
    (through_hard,) = torch.autograd.grad((hard * weights).sum(), logits)
    (through_soft,) = torch.autograd.grad((torch.softmax(logits, dim=1) * weights).sum(), logits)
    torch.testing.assert_close(through_hard, through_soft)
    assert through_hard.abs().sum() > 0


def test_real_label_values_become_the_class_channels_of_the_plan():
    label_map = torch.tensor([0, 2, 7, 7, 0, 2, 2, 0], dtype=torch.uint8).view(1, 1, 2, 2, 2)
    channels = one_hot_labels(label_map, (0, 2, 7))  # values 0, 2, 7 are classes 0, 1, 2
    assert channels.shape == (1, 3, 2, 2, 2) and channels.dtype == torch.float32
    assert torch.equal(channels.argmax(1).flatten(), torch.tensor([0, 1, 2, 2, 0, 1, 1, 0]))
    assert torch.equal(channels.sum(1), torch.ones(1, 2, 2, 2))


# ---------------------------------------------------------------------------------------------
# Augmentations: geometry moves labels with their image; intensity touches the image only


def pair_batch(batch: int = 4, side: int = 16) -> torch.Tensor:
    """(B, 1 + K, side³): a textured cube in [-0.5, 0.5] on background -1 off the centre, class 1
    on the cube, class 2 on its +x half, class 0 (background) elsewhere."""
    image = torch.full((batch, 1, side, side, side), -1.0)
    texture = torch.rand(batch, 1, 6, 6, 6, generator=torch.Generator().manual_seed(0)) - 0.5
    image[:, :, 3:9, 4:10, 5:11] = texture
    classes = torch.zeros(batch, 1, side, side, side, dtype=torch.uint8)
    classes[:, :, 3:9, 4:10, 5:11] = 1
    classes[:, :, 6:9, 4:10, 5:11] = 2
    return torch.cat([image, one_hot_labels(classes, LABEL_VALUES)], dim=1)


def assert_labels_follow_the_image(augmented: torch.Tensor) -> None:
    """Label channels still exactly one-hot, with a label exactly where the image has anatomy:
    a voxel labelled foreground has an image above the background, a background image voxel has
    the background class."""
    labels = augmented[:, 1:]
    assert set(labels.unique().tolist()) <= {0.0, 1.0}, "label channels changed value"
    assert torch.equal(labels.sum(1), torch.ones_like(labels[:, 0]))
    foreground = labels[:, 0] == 0  # (B, X, Y, Z)
    image = augmented[:, 0]
    assert bool((image[foreground] > -1.0).all()), "a label where the image is background"
    assert bool((~foreground[image == -1.0]).all()), "background image under a foreground label"


def test_ada_moves_label_channels_with_the_image_by_nearest_neighbour():
    """p = 1: every volume flipped, scaled, shifted and gamma-corrected. The gamma would turn a
    one-hot channel's zeros into 2 · 0.5^g - 1, so one-hot channels afterwards show it left them be."""
    ada = AdaptiveAugment(0.6, 1000, 4, flip_axes=(0,))
    ada.probability = 1.0
    x = pair_batch(8)
    out = ada.augment(x, torch.Generator().manual_seed(0), label_classes=K)
    assert out.shape == x.shape
    assert_labels_follow_the_image(out)
    for before, after in zip(x, out):
        assert not torch.equal(before[1:], after[1:])  # every volume's labels moved
        assert not torch.equal(before[0], after[0])


def test_ada_changes_the_image_as_it_would_without_labels():
    """Labels take no random draws and do not touch the image's arithmetic."""
    x = pair_batch(6)
    results = []
    for channels, classes in ((x, K), (x[:, :1], 0)):
        ada = AdaptiveAugment(0.6, 1000, 4, flip_axes=(0,))
        ada.probability = 0.7
        results.append(ada.augment(channels, torch.Generator().manual_seed(3), label_classes=classes)[:, :1])
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize(
    "policy", [("translation",), ("cutout",), ("contrast",), ("translation", "cutout", "contrast")]
)
def test_diff_augment_moves_and_cuts_labels_with_the_image_and_never_jitters_them(policy):
    x = pair_batch(6)
    out = diff_augment(x, policy, torch.Generator().manual_seed(1), label_classes=K)
    assert out.shape == x.shape
    assert_labels_follow_the_image(out)
    # Exactly: whole-voxel shifts and boxes move or blank image and labels alike.
    assert torch.equal(out[:, 0] > -1.0, out[:, 1] == 0)
    if policy == ("contrast",):
        assert torch.equal(out[:, 1:], x[:, 1:]) and not torch.equal(out[:, 0], x[:, 0])
    else:
        assert not torch.equal(out[:, 1:], x[:, 1:])
    alone = diff_augment(x[:, :1], policy, torch.Generator().manual_seed(1))
    assert torch.equal(out[:, :1], alone)  # the image as without labels


def test_gradients_reach_the_generators_label_logits_through_every_augmentation():
    logits = torch.randn(2, K, 16, 16, 16, requires_grad=True)
    image = pair_batch(2)[:, :1]
    x = torch.cat([image, straight_through_one_hot(torch.softmax(logits, dim=1))], dim=1)
    ada = AdaptiveAugment(0.6, 1000, 4, flip_axes=(0,))
    ada.probability = 1.0
    out = ada.augment(x, torch.Generator().manual_seed(0), label_classes=K)
    out = diff_augment(out, ("translation", "cutout", "contrast"), torch.Generator().manual_seed(0), K)
    (out[:, 1:] * torch.randn_like(out[:, 1:])).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Training on pairs


def test_every_discriminator_call_sees_image_and_labels(prepared, tmp_path):
    """Real, fake, R1, the gradient penalty and the G step: all pairs, label channels one-hot."""
    seen = []

    class Recording(Trainer):
        def run_discriminator(self, volumes, discriminator, codes=None):
            updating_d = next(discriminator.parameters()).requires_grad  # D is frozen in the G step
            labels = volumes[:, 1:].detach()
            binary = bool(((labels == 0) | (labels == 1)).all())
            one_hot = binary and bool(torch.equal(labels.sum(1), torch.ones_like(labels[:, 0])))
            seen.append((tuple(volumes.shape), updating_d, one_hot, volumes.requires_grad))
            return super().run_discriminator(volumes, discriminator, codes)

    assert prepared.plan.label_values == LABEL_VALUES
    config = tiny("loss.name=wgan_gp", "loss.r1_gamma=1", "model.pack=2", "augment.diff_augment=translation,cutout")
    paths, label_paths = [e.path for e in prepared.entries], [e.label_path for e in prepared.entries]
    trainer = Recording(config, prepared.plan, paths, tmp_path, CPU, label_paths=label_paths)
    record = trainer.train_step()
    pair = (2, 1 + K, 16, 16, 16)
    # D step: real (with grad, for R1), fake, interpolates for the penalty (not one-hot: mixes); G step.
    assert [s[:2] for s in seen] == [(pair, True), (pair, True), (pair, True), (pair, False)]
    assert [s[2] for s in seen] == [True, True, False, True]
    assert seen[0][3] and "r1" in record and record["r1"] > 0  # R1 differentiated through the pair


def test_the_loader_serves_pairs_whose_labels_are_the_cached_maps(prepared, tmp_path):
    paths, label_paths = [e.path for e in prepared.entries], [e.label_path for e in prepared.entries]
    config = tiny("augment.flip_axes=[]")
    trainer = Trainer(config, prepared.plan, paths, tmp_path, CPU, label_paths=label_paths)
    real, _ = trainer._next_real()
    assert real.shape == (2, 1 + K, 16, 16, 16)
    served = {np.load(p).tobytes(): np.load(q) for p, q in zip(paths, label_paths)}
    for pair in real:
        label_map = served[pair[0].numpy().tobytes()]  # this volume's own label map
        values = np.asarray(LABEL_VALUES)[pair[1:].argmax(0).numpy()]
        np.testing.assert_array_equal(values, label_map)


def test_a_labelled_plan_needs_label_maps(prepared, labelled, tmp_path):
    scans, _ = labelled
    with pytest.raises(RunRefused, match=r"label set \[0, 1, 2\].*give --labels"):
        train_run(scans, tmp_path / "run", tiny("train.max_steps=1"), CPU, plan=prepared.plan)
    with pytest.raises(ValueError, match="label maps"):
        Trainer(tiny(), prepared.plan, [e.path for e in prepared.entries], tmp_path / "t", CPU)


def test_paired_resume_is_bit_identical_to_an_uninterrupted_run(labelled, tmp_path):
    """As tests/test_train.py's resume test, on pairs, with every augmentation of what D sees on."""
    scans, labels = labelled
    common = (
        "train.checkpoint_every=100",
        "train.preview_every=100",
        "augment.intensity_jitter=0.1",
        "augment.diff_augment=translation,cutout,contrast",
        "augment.ada=true",
        "augment.ada_images_to_full=8",
        "augment.ada_interval=1",
        "augment.ada_target=0.01",
        "loss.r1_interval=2",
    )
    train_run(scans, tmp_path / "whole", paired(labels, "train.max_steps=6", *common), CPU)
    train_run(scans, tmp_path / "split", paired(labels, "train.max_steps=3", *common), CPU)
    resumed = train_run(scans, tmp_path / "split", paired(labels, "train.max_steps=6", *common), CPU)
    assert resumed.resumed_from == 3 and resumed.step == 6
    _assert_identical(_state(tmp_path / "whole"), _state(tmp_path / "split"))
    whole = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    split = read_metrics(tmp_path / "split" / "metrics.jsonl")
    assert [r["loss_d"] for r in whole] == [r["loss_d"] for r in split]
    assert max(r["ada_p"] for r in whole[:3]) > 0  # augmenting before the resume point


def test_init_from_a_model_with_another_label_set_is_refused(labelled, tmp_path):
    scans, labels = labelled
    train_run(scans, tmp_path / "images", tiny("train.max_steps=1"), CPU)
    with pytest.raises(RunRefused, match="images without label maps.*3 classes"):
        train_run(scans, tmp_path / "pairs", paired(labels, "train.max_steps=1"), CPU, init_from=tmp_path / "images")


# ---------------------------------------------------------------------------------------------
# Through the command line, and pairs out of `sample`


def png_colour_type(path: Path) -> int:
    return path.read_bytes()[25]  # IHDR: 0 greyscale, 2 RGB


def test_train_and_sample_pairs_through_the_cli(run_cli, labelled, tmp_path):
    scans, labels = labelled
    run = tmp_path / "run"
    code, out, err = run_cli(
        "train", scans, "--labels", labels, "-o", run, "-c", CONFIGS / "tiny.yaml", "--max-steps", "2",
        "--set", "train.preview_every=2",
    )  # fmt: skip
    assert code == 0, err
    assert "label maps of 3 classes (values 0, 1, 2)" in out + err and "does not learn" not in out + err
    payload = load_checkpoint(run)
    assert list(payload["plan"]["label_values"]) == [0, 1, 2]
    assert payload["generator_ema"]["to_volume.1.weight"].shape[0] == 1 + K  # resize-convolution: (Upsample, Conv3d)
    for name in ("real.png", "latest.png"):
        assert png_colour_type(run / "previews" / name) == 2  # labels drawn in colour

    code, out, err = run_cli("sample", run, "-n", "2", "-o", tmp_path / "out", "--preview")
    assert code == 0, err
    image = nib.load(str(tmp_path / "out" / "sample_00000.nii.gz"))
    label_map = nib.load(str(tmp_path / "out" / "sample_00000_label.nii.gz"))
    assert label_map.shape == image.shape == (16, 16, 16)
    assert png_colour_type(tmp_path / "out" / "preview.png") == 2


def test_sample_writes_label_maps_beside_their_images(run_cli, paired_run, tmp_path):
    code, _, err = run_cli("sample", paired_run, "-n", "3", "-o", tmp_path / "out")
    assert code == 0, err
    plan = Plan.from_dict(load_checkpoint(paired_run)["plan"])
    for i in range(3):
        image = nib.load(str(tmp_path / "out" / f"sample_{i:05d}.nii.gz"))
        label_map = nib.load(str(tmp_path / "out" / f"sample_{i:05d}_label.nii.gz"))
        assert label_map.get_data_dtype() == np.uint8
        assert label_map.shape == image.shape == plan.target_shape
        np.testing.assert_array_equal(label_map.affine, image.affine)
        np.testing.assert_allclose(label_map.affine, np.asarray(plan.affine), atol=1e-5)
        assert b"SYNTHETIC" in label_map.header["descrip"].tobytes()
        values = np.asarray(label_map.dataobj)
        assert set(np.unique(values).tolist()) <= set(plan.label_values)
        sidecar = json.loads((tmp_path / "out" / f"sample_{i:05d}.json").read_text())
        assert sidecar["label_file"] == f"sample_{i:05d}_label.nii.gz"
        assert sidecar["label_values"] == [0, 1, 2] and len(sidecar["label_names"]) == 3
        assert sidecar["label_dtype"] == "uint8"
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s["label_file"] for s in manifest["samples"]] == [f"sample_{i:05d}_label.nii.gz" for i in range(3)]
    assert manifest["labels"] == {"values": [0, 1, 2], "names": list(plan.label_names)}


def test_a_sample_missing_its_label_map_is_made_again(run_cli, paired_run, tmp_path):
    run_cli("sample", paired_run, "-n", "2", "-o", tmp_path / "out")
    before = (tmp_path / "out" / "sample_00001_label.nii.gz").read_bytes()
    (tmp_path / "out" / "sample_00001_label.nii.gz").unlink()
    code, out, err = run_cli("sample", paired_run, "-n", "2", "-o", tmp_path / "out")
    assert code == 0 and "1 written, 1 already there" in out + err
    assert (tmp_path / "out" / "sample_00001_label.nii.gz").read_bytes() == before


def pairs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(str(p)).dataobj) for p in sorted(folder.glob("sample_*.nii.gz"))}


def test_seed_and_index_fix_both_files_whatever_the_shard_or_batch_size(run_cli, paired_run, tmp_path):
    run_cli("sample", paired_run, "-n", "5", "-o", tmp_path / "whole", "--seed", "4", "--batch-size", "5")
    for shard in ("1/2", "0/2"):
        run_cli("sample", paired_run, "-n", "5", "-o", tmp_path / "sharded", "--seed", "4", "--batch-size", "1",
                "--shard", shard)  # fmt: skip
    whole, sharded = pairs(tmp_path / "whole"), pairs(tmp_path / "sharded")
    assert len(whole) == 10 and whole.keys() == sharded.keys()
    for name in whole:
        np.testing.assert_array_equal(whole[name], sharded[name])
    labels = [whole[f"sample_{i:05d}_label.nii.gz"] for i in range(5)]
    assert any(not np.array_equal(labels[0], other) for other in labels[1:])  # each index its own


def test_dicom_samples_keep_their_label_maps_as_nifti_beside_them(run_cli, paired_run, tmp_path):
    code, _, err = run_cli("sample", paired_run, "-n", "1", "-o", tmp_path / "out", "--format", "dicom")
    assert code == 0, err
    assert (tmp_path / "out" / "sample_00000").is_dir()
    label_map = nib.load(str(tmp_path / "out" / "sample_00000_label.nii.gz"))
    plan = Plan.from_dict(load_checkpoint(paired_run)["plan"])
    np.testing.assert_allclose(label_map.affine, np.asarray(plan.affine), atol=1e-5)
    sidecar = json.loads((tmp_path / "out" / "sample_00000.json").read_text())
    assert sidecar["file"] == "sample_00000" and sidecar["label_file"] == "sample_00000_label.nii.gz"


# ---------------------------------------------------------------------------------------------
# Previews


def test_preview_draws_each_label_in_its_colour_over_the_greyscale_slices():
    volume = np.full((16, 16, 16), -1.0, dtype=np.float32)
    volume[4:12, 4:12, 4:12] = 0.5
    label_map = np.zeros((16, 16, 16), dtype=np.uint8)
    label_map[4:12, 4:12, 4:12] = 1
    label_map[8:12, 4:12, 4:12] = 2
    plain = montage([volume])
    drawn = montage([volume], labels=[label_map])
    assert plain.ndim == 2 and drawn.shape == (*plain.shape, 3)
    colours = {tuple(c) for c in drawn.reshape(-1, 3).tolist()}
    assert tuple(LABEL_COLOURS[0]) in colours and tuple(LABEL_COLOURS[1]) in colours  # outlines of 1 and 2
    grey = (drawn[..., 0] == drawn[..., 1]) & (drawn[..., 1] == drawn[..., 2])
    np.testing.assert_array_equal(drawn[grey][:, 0], plain[grey])  # the background is the plain image
    assert (~grey).sum() < grey.sum()  # labels tint only the cube


@pytest.mark.slow  # a full evaluation of a paired run (about 15 s)
def test_evaluate_reads_paired_samples_as_images_not_their_label_maps(run_cli, paired_run, tmp_path):
    """`evaluate --synthetic` on a folder of pairs judges the images; the label maps beside them
    must not count as more synthetic volumes."""
    from medsynth.evaluate.report import holds_label_maps_beside_images

    run_cli("sample", str(paired_run), "-n", "4", "-o", str(tmp_path / "pairs"))
    assert holds_label_maps_beside_images(tmp_path / "pairs")
    assert not holds_label_maps_beside_images(paired_run)
    run_cli("sample", str(paired_run), "-n", "4", "-o", str(tmp_path / "more"), "--seed", "9")
    code, _, stderr = run_cli(
        "evaluate", "--real", str(tmp_path / "more"), "--synthetic", str(tmp_path / "pairs"),
        "--checkpoint", str(paired_run), "-o", str(tmp_path / "report"),
    )  # fmt: skip
    assert code == 0, stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["n"]["synthetic"] == 4
