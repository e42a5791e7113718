"""Config: defaults < YAML < --set, and every mistake named with a suggestion."""

from __future__ import annotations

import pytest

from medsynth.config import Config, ConfigError, config_to_dict, load_config


def test_defaults():
    config = load_config()
    assert config == Config()
    assert config.plan.target_shape == "auto" and config.plan.max_voxels == 64**3


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("plan:\n  target_shape: [32, 32, 32]\n  ct_window: [-100, 100]\nseed: 3\n")
    config = load_config(path, ["plan.target_shape=[128,128,64]", "seed=9"])
    assert config.plan.target_shape == (128, 128, 64)  # --set beats the file
    assert config.plan.ct_window == (-100.0, 100.0)  # the file beats the default
    assert config.seed == 9


def test_exponents_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 reads 1e-4 as a string; a learning rate written that way must still work."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr_generator: 1e-4\n")
    assert load_config(path, ["train.lr_discriminator=4e-4"]).train.lr_discriminator == 4e-4
    assert load_config(path).train.lr_generator == 1e-4


def test_round_trip_through_plain_data(tmp_path):
    import yaml

    config = load_config(None, ["plan.spacing=[1, 1, 2.5]", "io.four_d=split"])
    path = tmp_path / "resolved.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(config)))
    assert load_config(path) == config


@pytest.mark.parametrize(
    "override, message",
    [
        ("plan.target_shap=[32,32,32]", "unknown setting plan.target_shap (did you mean plan.target_shape?)"),
        ("plann.spacing=[1,1,1]", "unknown setting plann (did you mean plan?)"),
        ("io.four_d=splt", "did you mean 'split'?"),
        ("plan.target_shape=[48,64,64]", "powers of two from 16 to 256"),
        ("plan.target_shape=[512,64,64]", "powers of two from 16 to 256"),
        ("plan.isotropic=maybe", "plan.isotropic must be true or false"),
        ("cache.workers=two", "cache.workers must be an integer"),
        ("plan.ct_window=[100, -100]", "low < high"),
        ("noequals", "--set expects section.key=value"),
        ("train.max_minutes=0", "train.max_minutes must be positive"),
        ("train.max_minutes=an hour", "train.max_minutes must be float or null"),
    ],
)
def test_mistakes_are_named(override, message):
    with pytest.raises(ConfigError) as caught:
        load_config(None, [override])
    assert message in str(caught.value)


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("plan: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_cli_reports_config_errors_as_usage_errors(run_cli, tmp_path):
    code, _, err = run_cli("inspect", tmp_path, "--set", "plan.target_shap=[32,32,32]")
    assert code == 2 and "did you mean plan.target_shape?" in err and "Traceback" not in err
