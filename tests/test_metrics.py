"""Metrics with known answers."""

import numpy as np
import pytest
import torch

from erase.metrics import MIAEfficacy, TopOneAccuracy, gap_to_retrain, mia_efficacy, rte, unlearning_metrics
from erase.metrics.mia import mean_and_standard_error, mia_draw_values
from tests.conftest import needs_fmnist


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


def test_mia_rule_is_stable_across_member_subsets():
    """Issue 11 §4: which retain images serve as members moved one balanced fit by several points."""
    rng = np.random.default_rng(0)
    member = rng.beta(6, 1, 4000)       # many members, overlapping the non-members
    non_member = rng.beta(3, 1, 300)    # few non-members
    target = rng.beta(4.5, 1, 200)
    # the old rule: the caller hands over a member subset of the non-member size (first n, or random n)
    subsets = [np.arange(300)] + [np.random.default_rng(s).choice(4000, 300, replace=False) for s in range(1, 8)]
    old = [mia_efficacy(member[i], non_member, target) for i in subsets]
    # the rule now: every member, averaged over the resampling draws; only the seed is left to choose
    new = [mia_efficacy(member, non_member, target, seed=s) for s in range(8)]
    assert np.ptp(old) >= 4.0  # the instability is real on these data
    assert np.std(new, ddof=1) < np.std(old, ddof=1) / 2
    assert mia_efficacy(member, non_member, target, seed=3) == mia_efficacy(member, non_member, target, seed=3)


def test_mia_standard_error_by_hand():
    from sklearn.svm import SVC

    assert mean_and_standard_error(np.array([1.0, 2.0, 3.0, 6.0])) == pytest.approx((3.0, (14 / 3) ** 0.5 / 2))
    rng = np.random.default_rng(1)
    member, non_member, target = rng.beta(6, 1, 50), rng.beta(3, 1, 30), rng.beta(4.5, 1, 40)
    hand, draw_rng = [], np.random.default_rng(7)  # the documented protocol, step by step
    for _ in range(4):
        m = member[draw_rng.choice(50, 30, replace=False)]
        clf = SVC(C=3, gamma="auto").fit(np.r_[m, non_member].reshape(-1, 1), np.r_[np.ones(30), np.zeros(30)])
        hand.append(100 * (1 - clf.predict(target.reshape(-1, 1)).mean()))
    mean, se = np.mean(hand), np.std(hand, ddof=1) / 2
    assert se > 0
    np.testing.assert_allclose(mia_draw_values(member, non_member, target, seed=7, draws=4), hand)
    metric = MIAEfficacy(seed=7, draws=4)
    two = lambda p: torch.stack([torch.as_tensor(p, dtype=torch.float32), 1 - torch.as_tensor(p, dtype=torch.float32)], 1)  # noqa: E731
    for conf, split in ((member, "member"), (non_member, "non_member"), (target, "target")):
        metric.update(two(conf), torch.zeros(len(conf), dtype=torch.long), split)
    value, error = metric.compute_with_error()
    assert float(value) == pytest.approx(mean) and float(error) == pytest.approx(se, rel=1e-5)
    assert float(metric.compute()) == pytest.approx(mean)
    # nothing to resample when both sets have the same size: one fit, no spread
    assert mean_and_standard_error(mia_draw_values(member[:30], non_member, target, draws=5))[1] == 0.0


def test_unlearning_metrics_report_mia_standard_error_and_ra_rows():
    rng = np.random.default_rng(2)
    conf = {"forget": rng.beta(4.5, 1, 20), "retain": rng.beta(6, 1, 70), "test": rng.beta(3, 1, 30)}
    preds = {}
    for view, c in conf.items():  # two classes; the true label's probability is the confidence
        labels = torch.as_tensor(rng.integers(0, 2, len(c)))
        p = torch.as_tensor(c, dtype=torch.float32)
        preds[view] = (torch.where(labels[:, None] == torch.arange(2), p[:, None], 1 - p[:, None]), labels)
    rows = torch.arange(0, 70, 2)
    out = unlearning_metrics(preds, ra_rows=rows, mia_draws=6)
    assert out["RA"] == pytest.approx(100 * float((conf["retain"][rows.numpy()] > 0.5).mean()), abs=1e-4)
    assert out["mia_settings"]["draws"] == 6 and out["mia_settings"]["n_members"] == 70
    values = mia_draw_values(*(preds[v][0].gather(1, preds[v][1][:, None]).squeeze(1).numpy()
                               for v in ("retain", "test", "forget")), draws=6)
    mean, se = mean_and_standard_error(values)
    assert se > 0 and (out["MIA"], out["MIA_se"]) == pytest.approx((mean, se), abs=1e-4)
    assert unlearning_metrics(preds, mia_draws=1)["MIA_se"] is None


@needs_fmnist
def test_classifier_evaluate_uses_every_retain_example_as_mia_member():
    from erase.classifier.task import ClassifierConfig, ClassifierTask

    task = ClassifierTask(ClassifierConfig(limit_train=200, limit_test=60, eval_max_retain=50, width=2, forget="random:0.1"))
    model = task.build_model(from_scratch=True)
    m = task.evaluate(model)
    assert m["settings"]["ra_examples"] == 50 and m["mia_settings"]["n_members"] == m["settings"]["n_retain"] == 180
    assert m["MIA_se"] >= 0
    g = torch.Generator().manual_seed(0)  # RA: the same seeded subsample as before, read from the full predictions
    pick = torch.randperm(180, generator=g)[:50].sort().values
    from erase.engine.streams import DataView

    probs, labels = task.probabilities(model, DataView(task.train_set, task.split.retain[pick]), "cpu")
    assert m["RA"] == pytest.approx(float(100 * (probs.argmax(1) == labels).float().mean()), abs=1e-3)


def test_gap_and_rte():
    method = {"UA": 10.0, "RA": 99.0, "TA": 90.0, "MIA": 20.0}
    retrain = {"UA": 8.0, "RA": 100.0, "TA": 91.0, "MIA": 16.0}
    g = gap_to_retrain(method, retrain)
    assert g["avg_gap"] == pytest.approx((2 + 1 + 1 + 4) / 4)
    assert rte(5.0, 100.0) == {"RTE_s": 5.0, "RTE_ratio": 0.05}
