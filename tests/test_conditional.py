"""Conditional models: the networks, training with conditions (missing values included), exact
resume, and `sample` at asked-for conditions: determinism, sweeps, tables, sidecars and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import blob_volume, cpu_runtime, write_nifti
from helpers import tiny_config as tiny
from test_train import _assert_identical, _state

from medsynth.conditions import ConditionSpec
from medsynth.models import build_models
from medsynth.runs import RunRefused, train_run

CPU = cpu_runtime()
SIZES = [40, 45, 50, 55, 60, 65, 70, 75]


@pytest.fixture(scope="module")
def conditioned(tmp_path_factory) -> tuple[Path, Path]:
    """Eight 20³ balls whose radius is the table's `size`, in two groups; case7 has no row and
    case6 no size, so both train with that condition unknown."""
    root = tmp_path_factory.mktemp("conditioned")
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, 20)] * 3, indexing="ij"))
    radius = np.sqrt((grid**2).sum(axis=0))
    rows = ["subject,size,group"]
    for i, size in enumerate(SIZES):
        volume = blob_volume((20, 20, 20), seed=i) * (radius < size / 50.0)
        write_nifti(root / "scans" / f"case{i}_T1.nii.gz", volume.astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
        if i < 7:
            rows.append(f"case{i},{'NA' if i == 6 else size},{'AB'[i % 2]}")
    (root / "table.csv").write_text("\n".join(rows) + "\n")
    return root / "scans", root / "table.csv"


def with_table(table: Path, *overrides: str):
    return tiny(f"conditions.table={table}", *overrides)


@pytest.fixture(scope="module")
def conditional_run(conditioned, tmp_path_factory) -> Path:
    scans, table = conditioned
    root = tmp_path_factory.mktemp("run")
    # Module-scoped, so before the per-test cache isolation: its own cache, never the user's.
    train_run(scans, root / "run", with_table(table, "train.max_steps=4", f"cache.dir={root / 'cache'}"), CPU)
    return root / "run"


def test_without_conditions_the_networks_are_unchanged_and_with_them_only_the_inputs_grow():
    config = tiny().model
    plain_g, plain_d = build_models(config, (16, 16, 16))
    spec = ConditionSpec(continuous=1, categories=(2,))
    cond_g, cond_d = build_models(config, (16, 16, 16), conditions=spec)
    assert not any(k.startswith("condition") for k in [*plain_g.state_dict(), *plain_d.state_dict()])
    plain_keys = set(plain_d.state_dict())
    assert plain_keys <= set(cond_d.state_dict())
    assert {k for k in cond_d.state_dict() if k not in plain_keys} == {
        k for k in cond_d.state_dict() if k.startswith("condition.")
    }
    codes = torch.tensor([[0.5, 1.0, 2.0], [0.0, 0.0, 0.0]])  # (B, width): size, present, group index
    volumes = cond_g(torch.randn(2, config.latent_dim), codes)
    assert volumes.shape == (2, 1, 16, 16, 16)
    pack = config.pack
    logits = cond_d(volumes.reshape(2 // pack, pack, 16, 16, 16), codes.reshape(2 // pack, pack, 3))
    assert logits.shape == (2 // pack,)
    with pytest.raises(ValueError, match="needs condition codes"):
        cond_g(torch.randn(2, config.latent_dim))


def test_the_projection_term_is_where_the_condition_reaches_d():
    """Same volumes, different conditions: only a conditional D's logit moves."""
    config = tiny("model.pack=1").model
    _, discriminator = build_models(config, (16, 16, 16), conditions=ConditionSpec(0, (3,)))
    torch.nn.init.normal_(discriminator.condition[0].categorical[0].weight, 0.0, 1.0)
    volumes = torch.rand(3, 1, 16, 16, 16) * 2 - 1
    same = volumes[:1].expand(3, -1, -1, -1, -1)
    logits = discriminator(same, torch.tensor([[[0.0]], [[1.0]], [[2.0]]]))
    assert len(set(logits.tolist())) == 3


def test_training_records_the_conditions_in_the_plan_and_trains_unknown_values(conditional_run):
    plan = json.loads((conditional_run / "plan.json").read_text())
    size, group = plan["conditions"]
    assert (size["name"], size["kind"], size["minimum"], size["maximum"]) == ("size", "continuous", 40.0, 65.0)
    assert size["mean"] == pytest.approx(np.mean(SIZES[:6]))  # case6 has no size and case7 no row
    assert (group["name"], group["categories"]) == ("group", ["A", "B"])
    assert (conditional_run / "previews" / "latest.png").exists()


def test_conditional_resume_is_bit_identical(conditioned, tmp_path):
    scans, table = conditioned
    common = ("train.checkpoint_every=100", "train.preview_every=100", "augment.ada=true", "augment.ada_interval=1")
    train_run(scans, tmp_path / "whole", with_table(table, "train.max_steps=4", *common), CPU)
    train_run(scans, tmp_path / "split", with_table(table, "train.max_steps=2", *common), CPU)
    resumed = train_run(scans, tmp_path / "split", with_table(table, "train.max_steps=4", *common), CPU)
    assert resumed.resumed_from == 2
    _assert_identical(_state(tmp_path / "whole"), _state(tmp_path / "split"))


def test_a_resumed_run_keeps_its_scaling_and_refuses_other_conditions(conditioned, tmp_path):
    scans, table = conditioned
    train_run(scans, tmp_path / "run", with_table(table, "train.max_steps=1"), CPU)
    other = tmp_path / "other.csv"
    other.write_text("subject,size\ncase0,40\n")
    with pytest.raises(RunRefused):
        train_run(scans, tmp_path / "run", with_table(other, "train.max_steps=2"), CPU)


def test_init_from_an_unconditional_run_is_refused(conditioned, tmp_path):
    scans, table = conditioned
    train_run(scans, tmp_path / "plain", tiny("train.max_steps=1"), CPU)
    with pytest.raises(RunRefused, match="conditions"):
        train_run(scans, tmp_path / "cond", with_table(table, "train.max_steps=1"), CPU, init_from=tmp_path / "plain")


# ---------------------------------------------------------------------------------------------
# sample


def voxels(folder: Path, index: int) -> np.ndarray:
    return np.asarray(nib.load(folder / f"sample_{index:05d}.nii.gz").dataobj)


def test_sample_at_conditions_is_deterministic_across_batches_and_shards(run_cli, conditional_run, tmp_path):
    args = ("--condition", "size=55", "--condition", "group=b")
    assert run_cli("sample", conditional_run, "-n", "3", "-o", tmp_path / "one", "--batch-size", "1", *args)[0] == 0
    for shard in ("0/2", "1/2"):
        assert run_cli("sample", conditional_run, "-n", "3", "-o", tmp_path / "two", "--shard", shard, *args)[0] == 0
    for i in range(3):
        assert np.array_equal(voxels(tmp_path / "one", i), voxels(tmp_path / "two", i))
    sidecar = json.loads((tmp_path / "one" / "sample_00002.json").read_text())
    assert sidecar["conditions"] == {"size": 55.0, "group": "B"} and sidecar["latent_index"] == 2
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert [s["conditions"]["group"] for s in manifest["samples"]] == ["B", "B", "B"]
    # Another condition for the same index in the same folder is not mistaken for a finished sample.
    code, _, err = run_cli(
        "sample", conditional_run, "-n", "3", "-o", tmp_path / "one", "--condition", "size=60", "--condition", "group=B"
    )
    assert code != 0 and "conditions" in err


def test_a_sweep_makes_each_latent_at_every_value(run_cli, conditional_run, tmp_path):
    sweep = ("--condition", "size=40:65:3", "--condition", "group=A")
    assert run_cli("sample", conditional_run, "-n", "2", "-o", tmp_path / "sweep", *sweep)[0] == 0
    manifest = json.loads((tmp_path / "sweep" / "manifest.json").read_text())
    made = [(s["latent_index"], s["conditions"]["size"]) for s in manifest["samples"]]
    assert made == [(0, 40.0), (0, 52.5), (0, 65.0), (1, 40.0), (1, 52.5), (1, 65.0)]
    # The same person at 52.5: latent 1 at that size is sample 1 of a plain request at it.
    run_cli(
        "sample",
        conditional_run,
        "-n",
        "2",
        "-o",
        tmp_path / "plain",
        "--condition",
        "size=52.5",
        "--condition",
        "group=A",
    )
    assert np.array_equal(voxels(tmp_path / "sweep", 4), voxels(tmp_path / "plain", 1))
    assert not np.array_equal(voxels(tmp_path / "sweep", 3), voxels(tmp_path / "sweep", 4))


def test_a_conditions_table_makes_one_volume_per_row(run_cli, conditional_run, tmp_path):
    cohort = tmp_path / "cohort.tsv"
    cohort.write_text("id\tgroup\tsize\nx\tA\t45\ny\tB\t65\nz\tA\t50\n")
    assert run_cli("sample", conditional_run, "-o", tmp_path / "cohort", "--conditions-table", cohort)[0] == 0
    manifest = json.loads((tmp_path / "cohort" / "manifest.json").read_text())
    assert [s["conditions"] for s in manifest["samples"]] == [
        {"size": 45.0, "group": "A"},
        {"size": 65.0, "group": "B"},
        {"size": 50.0, "group": "A"},
    ]
    code, _, err = run_cli("sample", conditional_run, "-n", "5", "-o", tmp_path / "x", "--conditions-table", cohort)
    assert code != 0 and "3 rows, but -n 5" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--condition", "size=55"), "give --condition group (A, B)"),
        (("--condition", "size=95", "--condition", "group=A"), "outside the range the model was trained on (40 to 65)"),
        (("--condition", "sise=55", "--condition", "group=A"), "did you mean size?"),
        (("--condition", "size=55", "--condition", "group=C"), "not a class the model knows (A, B)"),
        (("--condition", "size=55", "--condition", "group=A:B:2"), "needs a continuous condition"),
        (("--condition", "size=big", "--condition", "group=A"), "'big' is not a number"),
        (("--condition", "size=40:65:1", "--condition", "group=A"), "COUNT of at least 2"),
    ],
)
def test_bad_condition_requests_are_one_line(run_cli, conditional_run, tmp_path, args, message):
    code, _, err = run_cli("sample", conditional_run, "-n", "1", "-o", tmp_path / "out", *args)
    assert code != 0 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_extrapolation_is_made_only_when_asked_for_with_a_warning(run_cli, conditional_run, tmp_path):
    args = ("--condition", "size=95", "--condition", "group=A", "--allow-extrapolation")
    code, _, err = run_cli("sample", conditional_run, "-n", "1", "-o", tmp_path / "far", *args)
    assert code == 0 and "outside the range" in err and "made anyway" in err


def test_conditions_given_to_an_unconditional_model_are_refused(run_cli, conditioned, tmp_path):
    scans, _ = conditioned
    train_run(scans, tmp_path / "plain", tiny("train.max_steps=1"), CPU)
    code, _, err = run_cli("sample", tmp_path / "plain", "-n", "1", "-o", tmp_path / "out", "--condition", "size=50")
    assert code != 0 and "trained without conditions" in err


def test_inspect_reports_coverage_distributions_and_unmatched_scans(run_cli, conditioned):
    scans, table = conditioned
    code, out, _ = run_cli("inspect", scans, "--conditions", table, "--json")
    assert code == 0
    report = json.loads(out)["conditions"]
    size, group = report["columns"]
    assert (size["present"], size["of"]) == (6, 8)
    assert group["counts"] == {"A": 4, "B": 3}
    assert report["scans_without_row"] == ["case7_T1.nii.gz"]
    assert report["id_column"] == "subject"
    code, out, _ = run_cli("inspect", scans, "--conditions", table)
    assert "1 scan(s) have no row" in out and "size" in out


def test_class_folders_train_a_categorical_condition(run_cli, tmp_path):
    for group in ("healthy", "lesion"):
        for i in range(3):
            write_nifti(tmp_path / "scans" / group / f"{group}{i}.nii.gz", blob_volume((20, 20, 20), seed=i))
    code, _, err = run_cli(
        "train",
        tmp_path / "scans",
        "--class-folders",
        "-o",
        tmp_path / "run",
        "--config",
        str(tiny_yaml()),
        "--max-steps",
        "1",
    )
    assert code == 0, err
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["conditions"] == [{"name": "class", "kind": "categorical", "categories": ["healthy", "lesion"]}]
    assert run_cli("sample", tmp_path / "run", "-n", "1", "-o", tmp_path / "out", "--condition", "class=lesion")[0] == 0


def tiny_yaml() -> Path:
    from helpers import CONFIGS

    return CONFIGS / "tiny.yaml"


# ---------------------------------------------------------------------------------------------
# evaluate: the conditional check


def balls(sizes, groups, seed=0) -> torch.Tensor:
    """(N, 1, 16, 16, 16) volumes in [-1, 1]: a ball of radius size/100, brighter for group B."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, 16)] * 3, indexing="ij"))
    radius = np.sqrt((grid**2).sum(axis=0))
    volumes = []
    for size, group in zip(sizes, groups):
        inside = radius < size / 100.0
        level = 0.8 if group == "B" else 0.1
        volume = np.where(inside, level, -1.0) + 0.05 * rng.standard_normal(radius.shape)
        volumes.append(volume.astype(np.float32))
    return torch.from_numpy(np.stack(volumes))[:, None]


def test_the_conditional_check_tells_an_obeyed_condition_from_an_ignored_one():
    from medsynth.conditions import CATEGORICAL, CONTINUOUS, ConditionColumn
    from medsynth.evaluate.conditional import ConditionedSet, PredictorRecipe, conditional_check

    rng = np.random.default_rng(0)

    def make(n, seed):
        sizes = rng.uniform(30, 90, n).round(1)
        groups = rng.choice(["A", "B"], n)
        values = [{"size": float(s), "group": str(g)} for s, g in zip(sizes, groups)]
        return ConditionedSet(balls(sizes, groups, seed), values)

    train, held_out, obeyed = make(48, 1), make(24, 2), make(24, 3)
    # A generator that ignores the condition: right volumes, labelled with other conditions.
    ignored = ConditionedSet(obeyed.volumes, list(reversed(obeyed.values)))
    sizes = np.array([v["size"] for v in train.values])
    columns = (
        ConditionColumn(
            "size", CONTINUOUS, mean=float(sizes.mean()), std=float(sizes.std()), minimum=30.0, maximum=90.0
        ),
        ConditionColumn("group", CATEGORICAL, categories=("A", "B")),
    )
    recipe = PredictorRecipe(channels=8, epochs=80)
    good = conditional_check(columns, train, held_out, obeyed, seed=0, recipe=recipe)
    bad = conditional_check(columns, train, held_out, ignored, seed=0, recipe=recipe)
    assert good["ceiling"]["size"]["pearson_r"]["value"] > 0.9  # the size is plain to see
    assert good["ceiling"]["group"]["accuracy"]["value"] > 0.9
    assert good["agreement"]["size"]["mae"]["value"] < 0.5 * good["agreement"]["size"]["baseline_mae"]
    assert good["agreement"]["group"]["accuracy"]["value"] > 0.9
    assert bad["agreement"]["size"]["pearson_r"]["value"] < 0.5
    assert bad["agreement"]["size"]["mae"]["value"] > 2 * good["agreement"]["size"]["mae"]["value"]
    assert good["reverse"]["size"]["pearson_r"]["value"] > 0.9  # trained on the "synthetic" set, tested on real
    assert "size: read back from synthetic volumes with MAE" in good["sentence"]


def test_evaluate_runs_the_conditional_check_for_a_conditional_run(run_cli, conditional_run, conditioned, tmp_path):
    scans, _ = conditioned
    run_cli(
        "sample",
        conditional_run,
        "-n",
        "2",
        "-o",
        tmp_path / "s",
        "--condition",
        "size=40:65:3",
        "--condition",
        "group=A",
    )
    from dataclasses import replace

    from test_evaluate import QUICK_UNTRAINED

    from medsynth.checkpoint import load_checkpoint
    from medsynth.config import config_from_dict
    from medsynth.evaluate import run_evaluation
    from medsynth.plan import Plan

    payload = load_checkpoint(conditional_run)
    report = run_evaluation(
        scans,
        tmp_path / "s",
        tmp_path / "report",
        tiny(),
        train_dir=scans,
        plan=Plan.from_dict(payload["plan"]),
        budget=replace(QUICK_UNTRAINED, conditional_epochs=2),
        conditions=config_from_dict(payload["config"]).conditions,  # the run's own table, as the CLI passes it
    )
    assert set(report["conditional"]) >= {"ceiling", "agreement", "reverse", "sentence"}
    assert report["conditional"]["n"] == {"train_real": 8, "held_out_real": 8, "synthetic": 6}
    assert any(line.startswith("Conditions:") for line in report["verdict"])
    # Samples that do not record their conditions: the check is skipped, with the reason.
    run_cli(
        "sample",
        conditional_run,
        "-n",
        "2",
        "-o",
        tmp_path / "plain",
        "--condition",
        "size=50",
        "--condition",
        "group=A",
    )
    (tmp_path / "plain" / "manifest.json").unlink()
    skipped = run_evaluation(
        scans,
        tmp_path / "plain",
        tmp_path / "r2",
        tiny(),
        train_dir=scans,
        plan=Plan.from_dict(payload["plan"]),
        budget=QUICK_UNTRAINED,
    )
    assert "conditional" not in skipped and any("conditional check skipped" in w for w in skipped["warnings"])


def test_the_generators_condition_embedding_starts_at_the_scale_of_z():
    """A condition that starts 1000x smaller than z is learnt too slowly to matter (IXI's age was
    ignored that way); the embedding joined to z starts with a spread comparable to z's."""
    config = tiny("model.latent_dim=128").model
    generator, _ = build_models(config, (16, 16, 16), conditions=ConditionSpec(continuous=1, categories=(2,)))
    codes = torch.stack([torch.linspace(-2, 2, 64), torch.ones(64), torch.randint(1, 3, (64,)).float()], dim=1)
    embedded = generator.condition(codes)  # (64, CONDITION_EMBEDDING)
    assert embedded.std() > 0.2


def test_conditional_batchnorm_starts_as_batchnorm_and_the_condition_then_moves_every_scale():
    """`model.condition_generator=batchnorm`: z alone enters, and the condition sets each
    BatchNorm's gain and bias. At initialisation that is a plain BatchNorm (gain 1, bias 0), so
    the condition changes nothing until it is learnt; once learnt it changes the volume."""
    from medsynth.models import ConditionalBatchNorm3d

    config = tiny("model.condition_generator=batchnorm").model
    generator, _ = build_models(config, (16, 16, 16), conditions=ConditionSpec(continuous=1, categories=(2,)))
    norms = [m for m in generator.modules() if isinstance(m, ConditionalBatchNorm3d)]
    assert len(norms) == 1 + sum(isinstance(m, ConditionalBatchNorm3d) for m in generator.blocks)
    assert generator.project.in_features == config.latent_dim  # the condition is not joined to z
    z = torch.randn(1, config.latent_dim).expand(2, -1)
    codes = torch.tensor([[-1.0, 1.0, 1.0], [1.5, 1.0, 2.0]])  # two different conditions, the same z
    generator.eval()
    with torch.no_grad():
        before = generator(z, codes)
        assert torch.equal(before[0], before[1])
        for norm in norms:
            torch.nn.init.normal_(norm.gain_and_bias.weight, 0.0, 0.1)
        after = generator(z, codes)
    assert not torch.allclose(after[0], after[1], atol=1e-4)


def test_conditional_batchnorm_resumes_bit_identically(conditioned, tmp_path):
    scans, table = conditioned
    common = ("model.condition_generator=batchnorm", "train.checkpoint_every=100", "train.preview_every=100")
    train_run(scans, tmp_path / "whole", with_table(table, "train.max_steps=4", *common), CPU)
    train_run(scans, tmp_path / "split", with_table(table, "train.max_steps=2", *common), CPU)
    train_run(scans, tmp_path / "split", with_table(table, "train.max_steps=4", *common), CPU)
    _assert_identical(_state(tmp_path / "whole"), _state(tmp_path / "split"))
