"""Every registered classifier method: 2 steps on a tiny model, finite losses, only allowed weights move."""

import pytest
import torch

import erase
from erase.engine import LoopSettings, run_method
from tests.conftest import ToyTask, make_ctx, toy_model


def test_registry_lists_the_foundation_methods():
    assert {"retrain", "ft", "ga", "rl", "salun"} <= set(erase.list_methods())
    assert "retrain" in erase.list_methods(task="classifier")


def test_registry_rejects_duplicates_and_unknown_names():
    from erase.engine.method import Method
    from erase.registry import register_method

    with pytest.raises(ValueError, match="already registered"):
        @register_method("salun")
        class Other(Method):
            tasks = ("classifier",)
    with pytest.raises(erase.EraseError, match="choose one of"):
        erase.get_method("salune")
    with pytest.raises(ValueError, match="invalid method name"):
        register_method("Bad Name")


@pytest.mark.parametrize("name", erase.list_methods(task="classifier"))
def test_method_two_steps_on_tiny_model(tmp_path, name):
    cls = erase.get_method(name, "classifier")
    task, model = ToyTask(), toy_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = cls.Config(max_steps=2, batch_size=8, lr=0.05)
    method = cls(cfg)
    ctx = make_ctx(task, model, tmp_path)
    info = run_method(method, ctx, LoopSettings(progress=False, log_every=1))
    log = (tmp_path / "log.jsonl").read_text().splitlines() if (tmp_path / "log.jsonl").exists() else []
    if info["steps"]:
        assert info["steps"] >= 2 and log, "an iterative method must log its loss terms"
        import json

        for line in log:
            assert all(torch.isfinite(torch.tensor(v)) for k, v in json.loads(line).items() if k not in ("phase",))
    after = dict(ctx.unwrapped.named_parameters())
    changed = [n for n in before if n in after and after[n].shape == before[n].shape and not torch.equal(after[n], before[n])]
    assert changed, f"{name} changed nothing"
    masks = method.parameter_masks(ctx)
    if masks:
        for n, m in masks.items():
            assert torch.equal(after[n].detach()[~m], before[n][~m]), f"{name} moved masked weights of {n}"


def test_salun_mask_is_half_of_all_weights_and_cached(tmp_path):
    from erase.saliency import density, load_masks

    cls = erase.get_method("salun")
    ctx = make_ctx(ToyTask(), toy_model(), tmp_path)
    method = cls(cls.Config(max_steps=1, batch_size=8))
    run_method(method, ctx, LoopSettings(progress=False))
    saved = load_masks(tmp_path / "saliency_mask.safetensors")
    assert density(saved) == pytest.approx(0.5, abs=1e-3)
    assert (tmp_path / "saliency_density.md").is_file()


def test_ga_raises_the_forget_loss(tmp_path):
    task = ToyTask()
    model = toy_model()
    batch = next(task.iterate("forget"))
    before = float(task.loss(model, batch).detach())
    cls = erase.get_method("ga")
    ctx = make_ctx(task, model, tmp_path)
    run_method(cls(cls.Config(max_steps=5, batch_size=12, lr=0.1)), ctx, LoopSettings(progress=False))
    assert float(task.loss(ctx.unwrapped, batch).detach()) > before


def test_rl_sequential_phases_alternate_forget_and_retain(tmp_path):
    cls = erase.get_method("rl")
    ctx = make_ctx(ToyTask(), toy_model(), tmp_path)
    phases = cls(cls.Config(epochs=2, batch_size=8)).phases(ctx)
    assert [p.streams for p in phases] == [("forget",), ("retain",)] * 2
    assert phases[0].steps == 2 and phases[1].steps == 11  # 12 forget / 84 retain examples, batch 8
