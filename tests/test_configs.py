"""The shipped config files load, and default.yaml really is the defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from medsynth.config import Config, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_default_yaml_is_the_built_in_defaults():
    assert load_config(CONFIGS / "default.yaml") == Config()


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    load_config(path)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_no_shipped_config_forces_a_precision(path):
    """bf16 is emulated, and ten to a hundred times slower, on CPUs without native support: the
    precision is chosen on the machine (train.amp=auto), never by a preset."""
    assert load_config(path).train.amp == "auto"
