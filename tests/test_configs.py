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


ZOO = Path(__file__).resolve().parents[1] / "erase" / "zoo"
RECIPES = sorted(ZOO.glob("*/erase.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.parent.name)
def test_bundled_recipes_resolve_and_sit_below_flags(path):
    """A model folder's erase.yaml names real methods and fields; a flag still overrides it."""
    import yaml

    recipes = yaml.safe_load(path.read_text())["methods"]
    for method, fields in recipes.items():
        r = resolve({"method": method, "task": "diffusion"}, {"model": path.parent.name}, {}, {})
        for key, value in fields.items():
            assert getattr(r.method, key) == value, (method, key)
        r = resolve({"method": method, "task": "diffusion"}, {"model": path.parent.name}, {"lr": 0.123}, {})
        assert r.method.lr == 0.123


def test_model_recipe_from_a_local_folder(tmp_path):
    (tmp_path / "erase.yaml").write_text("methods:\n  rl: {lr: 0.0042, epochs: 3}\n")
    r = resolve({"method": "rl", "task": "diffusion"}, {"model": str(tmp_path)}, {}, {})
    assert (r.method.lr, r.method.epochs) == (0.0042, 3)
