"""Metrics with known answers."""

import numpy as np
import pytest
import torch

from erase.metrics import MIAEfficacy, TopOneAccuracy, gap_to_retrain, mia_efficacy, rte


def test_accuracy_and_unlearning_accuracy():
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    labels = torch.tensor([0, 1, 1, 1])
    acc, ua = TopOneAccuracy(), TopOneAccuracy(forget=True)
    acc.update(scores, labels)
    ua.update(scores, labels)
    assert float(acc.compute()) == pytest.approx(75.0)
    assert float(ua.compute()) == pytest.approx(25.0)


def test_mia_efficacy_on_separable_confidences():
    rng = np.random.default_rng(0)
    member = rng.uniform(0.95, 1.0, 500)        # training examples: confident
    non_member = rng.uniform(0.0, 0.5, 500)     # unseen examples: unsure
    assert mia_efficacy(member, non_member, rng.uniform(0.0, 0.5, 200)) == pytest.approx(100.0)
    assert mia_efficacy(member, non_member, rng.uniform(0.95, 1.0, 200)) == pytest.approx(0.0)
    half = np.concatenate([rng.uniform(0.0, 0.5, 100), rng.uniform(0.95, 1.0, 100)])
    assert mia_efficacy(member, non_member, half) == pytest.approx(50.0)


def test_mia_metric_class_uses_true_label_probability():
    m = MIAEfficacy()
    n = 200
    labels = torch.zeros(n, dtype=torch.long)
    conf = lambda p: torch.stack([p, 1 - p], 1)  # noqa: E731
    m.update(conf(torch.full((n,), 0.99)), labels, "member")
    m.update(conf(torch.full((n,), 0.2)), labels, "non_member")
    m.update(conf(torch.full((50,), 0.25)), labels[:50], "target")
    assert float(m.compute()) == pytest.approx(100.0)
    with pytest.raises(ValueError):
        m.update(conf(torch.ones(2)), labels[:2], "bogus")


def test_gap_and_rte():
    method = {"UA": 10.0, "RA": 99.0, "TA": 90.0, "MIA": 20.0}
    retrain = {"UA": 8.0, "RA": 100.0, "TA": 91.0, "MIA": 16.0}
    g = gap_to_retrain(method, retrain)
    assert g["avg_gap"] == pytest.approx((2 + 1 + 1 + 4) / 4)
    assert rte(5.0, 100.0) == {"RTE_s": 5.0, "RTE_ratio": 0.05}
