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
