"""Saliency statistics and masks: exact densities, ranking, round trip."""

import pytest
import torch

from erase.saliency import density, density_report, gradient_statistics, load_masks, save_masks, threshold_masks, topk_masks
from tests.conftest import ToyTask, toy_model


def _scores():
    g = torch.Generator().manual_seed(0)
    return {"a": torch.rand(7, 5, generator=g), "b": torch.rand(11, generator=g), "c": torch.zeros(4)}


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.73, 1.0])
def test_global_topk_density_is_exact(fraction):
    masks = topk_masks(_scores(), fraction)
    total = 35 + 11 + 4
    assert sum(int(m.sum()) for m in masks.values()) == round(fraction * total)
    assert all(m.dtype == torch.bool for m in masks.values())


def test_global_topk_picks_the_largest_scores():
    scores = _scores()
    masks = topk_masks(scores, 0.5)
    chosen = torch.cat([scores[n][masks[n]] for n in scores])
    rest = torch.cat([scores[n][~masks[n]] for n in scores])
    assert chosen.min() >= rest.max()


def test_ties_still_give_the_exact_count():
    masks = topk_masks({"t": torch.ones(10)}, 0.3)
    assert int(masks["t"].sum()) == 3


def test_per_layer_topk():
    masks = topk_masks(_scores(), 0.5, scope="layer")
    assert int(masks["a"].sum()) == round(0.5 * 35) and int(masks["b"].sum()) == round(0.5 * 11)
    assert int(masks["c"].sum()) == 2


def test_threshold_and_report():
    masks = threshold_masks({"x": torch.tensor([0.1, 0.5, 0.9])}, 0.5)
    assert masks["x"].tolist() == [False, True, True]
    assert density(masks) == pytest.approx(2 / 3)
    assert "66.7%" in density_report(masks)


def test_mask_round_trip(tmp_path):
    masks = topk_masks(_scores(), 0.4)
    save_masks(masks, tmp_path / "m.safetensors", {"fraction": 0.4})
    back = load_masks(tmp_path / "m.safetensors")
    assert set(back) == set(masks) and all(torch.equal(back[n], masks[n]) for n in masks)
    assert back["a"].dtype == torch.bool


def test_gradient_statistics_match_hand_computation():
    task, model = ToyTask(), toy_model()
    batches = list(task.iterate("forget"))
    stats = gradient_statistics(model, task.loss, batches, power=1, reduce="sum_then_abs")
    model.zero_grad()
    sum(task.loss(model, b) for b in batches).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(stats[n], p.grad.abs())
    fisher = gradient_statistics(model, task.loss, batches, power=2, reduce="mean_of_power")
    assert all((v >= 0).all() for v in fisher.values())
    assert all(p.requires_grad for p in model.parameters())  # flags restored
