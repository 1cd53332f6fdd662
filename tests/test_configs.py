"""Every shipped YAML config resolves (names, fields and types are valid)."""

from pathlib import Path

import pytest

from erase.config import load_yaml, resolve

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_resolves(path):
    data = load_yaml(str(path))
    r = resolve({}, {}, {}, data)
    assert r.method_cls.name == data["method"]["name"]
    for key, value in data["method"].items():
        if key != "name":
            assert getattr(r.method, key) == value


def test_there_are_configs():
    assert CONFIGS
