"""The challenge audit: confidences, per-example ε, bucketing, forget quality and the final score."""

import math

import numpy as np
import pytest
import torch

from erase.metrics.audit import (
    DELTA,
    EPSILON_CAP,
    ForgetQuality,
    bucket_points,
    challenge_score,
    example_epsilon,
    example_points,
    forget_quality,
    logit_scaled_confidence,
    per_example_epsilons,
)
from tests.conftest import needs_fmnist


def test_logit_scaled_confidence_matches_definition_and_is_stable():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, -1.0]])
    labels = np.array([0, 2])
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    want = [np.log(p[0, 0]) - np.log(p[0, 1] + p[0, 2]), np.log(p[1, 2]) - np.log(p[1, 0] + p[1, 1])]
    got = logit_scaled_confidence(torch.tensor(logits, dtype=torch.float32), torch.tensor(labels))
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # large logits: max-subtraction keeps it exact; log p_y - log(sum of others) = 30 - log 2
    np.testing.assert_allclose(logit_scaled_confidence(np.array([[30.0, 0.0, 0.0]]), np.array([0])), [30 - math.log(2)], rtol=1e-9)
    # past float64's range the 1e-45 floor inside the logs bounds it at ±ln(1e45), as in the original
    np.testing.assert_allclose(logit_scaled_confidence(np.array([[1000.0, 0.0, 0.0]]), np.array([0])), [-math.log(1e-45)])
    np.testing.assert_allclose(logit_scaled_confidence(np.array([[0.0, 1000.0]]), np.array([0])), [math.log(1e-45)])


def test_identical_samples_give_epsilon_zero():
    rng = np.random.default_rng(0)
    conf = rng.normal(size=(32, 20))
    eps, how = per_example_epsilons(conf, conf.copy())
    assert how["thresholds"] == 20
    assert np.all(eps < 1e-4)  # log(1 - δ - x) - log(1 - x) ≈ 0 at every threshold
    fq = forget_quality(conf, conf.copy())
    assert fq["forget_quality"] == 1.0


def test_independent_draws_of_one_distribution_stay_finite_and_small():
    # Not ≈ 0: the interval family finds short windows holding, by chance, k retrained and 1 unlearned
    # confidences, worth log k; that noise floor (~1-1.6 per example) is the metric's, at any N.
    rng = np.random.default_rng(1)
    eps, how = per_example_epsilons(rng.normal(size=(64, 6)), rng.normal(size=(64, 6)))
    assert how["thresholds"] == 6 and np.all(eps < math.log(63)) and eps.mean() < 2.0


def test_separable_distributions_hit_the_cap():
    rng = np.random.default_rng(2)
    unlearned = rng.normal(10.0, 1.0, size=(16, 5))
    retrained = rng.normal(0.0, 1.0, size=(16, 5))
    eps, how = per_example_epsilons(unlearned, retrained)
    assert np.all(eps == EPSILON_CAP) and how["thresholds"] == 5
    assert forget_quality(unlearned, retrained)["forget_quality"] == 0.0


def test_degenerate_range_rule_caps_a_peaky_group():
    rng = np.random.default_rng(3)
    retrained = rng.normal(size=(16, 3))
    unlearned = np.full((16, 3), float(np.median(retrained)))  # a deterministic method: every model identical
    eps, how = per_example_epsilons(unlearned, retrained)
    assert np.all(eps == EPSILON_CAP) and how["degenerate"] == 3


def test_hand_checked_intermediate_case():
    # N = 4. Retrained (positive: larger median) {10, 11, 12, 13}, unlearned {0, 1, 2, 12.5}.
    # Any threshold with FPR > 0 must include 12.5; the best keeps 3 of 4 retrained above it:
    # FPR = FNR = 1/4 -> ε = log(1 - δ - 1/4) - log(1/4) = log(2.99996).
    retrained = np.array([[10.0], [11.0], [12.0], [13.0]])
    unlearned = np.array([[0.0], [1.0], [2.0], [12.5]])
    eps, how = per_example_epsilons(unlearned, retrained)
    want = math.log(1 - DELTA - 0.25) - math.log(0.25)
    assert eps[0] == pytest.approx(want, abs=1e-5)
    # N = 4 -> buckets up to ceil(ln 3) = 2: [1, 1.5) earns 1/4
    fq = forget_quality(unlearned, retrained)
    assert fq["max_epsilon"] == 2 and fq["forget_quality"] == 0.25


def test_epsilon_against_a_dense_reference_implementation():
    """The sorted-search counts equal the original's dense [models x thresholds] comparisons."""
    rng = np.random.default_rng(4)
    for trial in range(3):
        pos = rng.normal(0.5 * trial, 1.0, size=8)
        neg = rng.normal(0.0, 0.7, size=8)
        got, _ = example_epsilon(pos, neg)
        assert got == pytest.approx(_dense_epsilon(pos, neg), abs=1e-6)


def _dense_epsilon(pos, neg, delta=DELTA):
    def eps_of(tpr, fnr, fpr, tnr):
        out = np.zeros(len(tpr), dtype=np.float32)
        perfect = (fpr + fnr == 0) & (tpr + tnr == 2)
        out[perfect] = np.inf
        drop = ~perfect & (fpr * fnr == 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            v = np.clip(np.nanmax([np.log(1 - delta - fpr) - np.log(fnr), np.log(1 - delta - fnr) - np.log(fpr)], axis=0), 0, None)
        keep = ~perfect & ~drop
        out[keep] = v[keep]
        out[drop] = np.nan
        return out

    def rates(p_pred, n_pred):
        f = np.float32
        return (p_pred.mean(0).astype(f), (~p_pred).mean(0).astype(f), n_pred.mean(0).astype(f), (~n_pred).mean(0).astype(f))

    # single thresholds
    allc = torch.cat([torch.from_numpy(pos), torch.from_numpy(neg)])
    thr = torch.linspace(allc.min(), allc.max(), int(torch.ceil((allc.max() - allc.min()) * 100))).double().numpy()
    single = eps_of(*rates(pos[:, None] >= thr[None], neg[:, None] >= thr[None]))
    # interval thresholds, positive := the peakier group
    p, n = (neg, pos) if (pos.max() - pos.min()) >= (neg.max() - neg.min()) else (pos, neg)
    width = min(pos.max() - pos.min(), neg.max() - neg.min())
    lo, hi = p.min() + width - 2.0, p.max() + 2.0
    right = np.linspace(lo, hi, num=int(np.ceil((hi - lo) * 100)))
    left = np.concatenate([np.linspace(r - width - 2.0, r - width + 2.0, num=400) for r in right])
    right = np.repeat(right, 400)
    inside = lambda c: (left[None] <= c[:, None]) & (c[:, None] <= right[None])  # noqa: E731
    interval = eps_of(*rates(inside(p), inside(n)))
    e = np.concatenate([interval, single])
    return float(np.clip(np.nanmax(e), 0, EPSILON_CAP))


def test_bucketing_points():
    assert len(bucket_points(512)) == 14 and bucket_points(512)[-1] == (6.5, 2.0 ** -13)  # ceil(ln 511) = 7
    assert len(bucket_points(32)) == 8  # ceil(ln 31) = 4
    pts = example_points(np.array([0.0, 0.49, 0.5, 1.2, 6.99, 7.0, 50.0]), 512)
    np.testing.assert_allclose(pts, [1, 1, 0.5, 0.25, 2.0 ** -13, 0, 0])
    assert bucket_points(2) == []  # ceil(ln 1) = 0: nothing can score


def test_challenge_score_formula():
    assert challenge_score(0.5, [90.0, 90.0], [100.0], [80.0], [100.0, 100.0]) == pytest.approx(0.36)
    # ratios are not clipped: an unlearned model more accurate than retrain scores above F
    assert challenge_score(0.5, [100.0], [90.0], [90.0], [90.0]) == pytest.approx(0.5 * 100 / 90)


def test_forget_quality_metric_class_matches_the_function():
    rng = np.random.default_rng(5)
    labels = torch.tensor([0, 1, 2, 1, 0])
    metric = ForgetQuality()
    u_conf, r_conf = [], []
    for _ in range(6):
        lu, lr = torch.randn(5, 3, generator=torch.Generator().manual_seed(int(rng.integers(1e6)))), torch.randn(5, 3)
        metric.update(lu, labels, "unlearned")
        metric.update(lr + 2 * torch.nn.functional.one_hot(labels, 3), labels, "retrained")
        u_conf.append(logit_scaled_confidence(lu, labels))
        r_conf.append(logit_scaled_confidence(lr + 2 * torch.nn.functional.one_hot(labels, 3), labels))
    want = forget_quality(np.stack(u_conf), np.stack(r_conf))["forget_quality"]
    assert float(metric.compute()) == pytest.approx(want)
    assert len(metric.last_result["epsilons"]) == 5
    with pytest.raises(ValueError):
        metric.update(torch.zeros(5, 3), labels, "other")


@needs_fmnist
def test_audit_command_tiny(tmp_path):
    import json

    from erase.bench.audit import main

    res = tmp_path / "res" / "audit"
    argv = ["--method", "ft", "--n-models", "3", "--limit-train", "200", "--limit-test", "100", "--eval-max-retain", "100",
            "--epochs", "0.5", "--benchmark", "", "--out-dir", str(tmp_path / "runs"), "--results", str(res),
            "--threads", "1"]
    assert main(argv) == 0
    data = json.loads(res.with_suffix(".json").read_text())
    ft = data["methods"]["ft"]
    assert ft["n"] == 3 and 0.0 <= ft["forget_quality"] <= 1.0 and len(ft["epsilons"]) == data["n_forget"] == 20
    assert res.with_suffix(".md").is_file() and (res.parent / "audit_eps.png").stat().st_size > 1000
    assert "| ft |" in res.with_suffix(".md").read_text()
    assert main([*argv, "--report-only"]) == 0  # everything read back: the same scores
    assert json.loads(res.with_suffix(".json").read_text())["methods"]["ft"]["score"] == ft["score"]
