"""The NeurIPS 2023 unlearning-challenge audit (DESIGN.md §4), as pure functions plus a torchmetrics class.

Follows the official scoring code, google-deepmind/unlearning_evaluation ``metric.py`` @ ffae0ff:

1. **Logit-scaled confidence** per forget example and model: log p_y − log Σ_{k≠y} p_k, softmax in
   float64 after subtracting the largest logit, 1e-45 added inside both logs.
2. **Per-example ε** from N unlearned and N retrained confidences. The "positive" distribution is the
   one with the larger median. If the smaller of the two ranges (max − min) is below 1 % of the larger
   one, ε = 50 (the cap: a peaky, e.g. deterministic, distribution). Otherwise two threshold families:
   *single* thresholds (float32 ``torch.linspace`` over [min, max] of both, 100 per unit; predict
   positive iff c ≥ t) and *interval* thresholds (positive := the peakier distribution, width = its
   range, buffer 2; right ends linspace(pos.min + width − 2, pos.max + 2, ⌈range·100⌉), for each 400
   left ends linspace(r − width − 2, r − width + 2); predict positive iff l ≤ c ≤ r). Rates are float32
   means over models. Per threshold: FPR = FNR = 0 (and TPR = TNR = 1) gives ε = ∞; FPR·FNR = 0
   otherwise discards the threshold; else ε = max(log(1−δ−FPR) − log FNR, log(1−δ−FNR) − log FPR)
   clipped below at 0 (a NaN side, e.g. log of a negative number, is ignored). Per example ε = the
   max over the surviving thresholds, clipped to [0, 50]. δ = 1e-5.
3. **Bucketing**: width 0.5 from 0 up to ⌈ln(N − 1)⌉; bucket k earns 2^−k points; ε at or past the
   top earns 0. Forget quality F = mean points over the forget set.
4. **Score** = F · (mean RA_u / mean RA_r) · (mean TA_u / mean TA_r) (not clipped).

Two places where the released code cannot be followed literally: it stops on ``assert thr_eps``
(an array with more than one element has no truth value, and a single surviving threshold with
ε = 0 fails it), and it asserts when no threshold survives (two identical constant distributions).
Here every surviving threshold counts, and an example with no surviving threshold gets ε = 0
(reported in ``no_valid_threshold``). The interval counts are computed exactly with sorted
searches instead of the official dense [models × thresholds] comparison (same numbers, CPU-sized).

With small N the resolution is coarse: FPR and FNR are multiples of 1/N, so the largest finite ε is
about ln(N − 1) and there are only 2·⌈ln(N − 1)⌉ buckets (N = 512 in the challenge: 14; N = 32: 8).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torchmetrics import Metric

DELTA = 1e-5
EPSILON_CAP = 50.0
NUM_THRESHOLDS_PER_UNIT = 100
BUCKET_WIDTH = 0.5
INTERVAL_BUFFER = 2.0


def logit_scaled_confidence(logits, labels) -> np.ndarray:
    """log p_y − log Σ_{k≠y} p_k per row, in float64 (max-subtracted softmax, +1e-45 in the logs)."""
    z = np.array(logits.detach().cpu().numpy() if isinstance(logits, torch.Tensor) else logits, dtype=np.float64)
    y = np.asarray(labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)
    if z.ndim != 2 or len(z) != len(y):
        raise ValueError("logits must be (N, C) and labels (N,)")
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    rows = np.arange(len(y))
    p_true = p[rows, y].copy()
    p[rows, y] = 0.0
    p_wrong = p.sum(axis=1)
    return np.log(p_true + 1e-45) - np.log(p_wrong + 1e-45)


def _rates(count_pos_pred: np.ndarray, n: int) -> np.ndarray:
    """A mean of 0/1 indicators in float32, as ``torch.mean(x.type(torch.float32))`` gives it."""
    return count_pos_pred.astype(np.float32) / np.float32(n)


def _single_threshold_counts(pos: np.ndarray, neg: np.ndarray):
    """Counts of c >= t for pos/neg over the official single-threshold grid."""
    pos_t, neg_t = torch.from_numpy(pos), torch.from_numpy(neg)
    all_c = torch.cat([pos_t, neg_t])
    lo, hi = all_c.min(), all_c.max()
    num = int(torch.ceil((hi - lo) * NUM_THRESHOLDS_PER_UNIT))
    thr = torch.linspace(lo, hi, num).numpy().astype(np.float64)  # float32 grid, as in the official code
    ps, ns = np.sort(pos), np.sort(neg)
    pos_ge = len(ps) - np.searchsorted(ps, thr, side="left")
    neg_ge = len(ns) - np.searchsorted(ns, thr, side="left")
    return pos_ge, neg_ge


def _interval_threshold_counts(pos: np.ndarray, neg: np.ndarray):
    """Counts of l <= c <= r for the (peakier, other) pair over the official interval grid."""
    pos_diff, neg_diff = pos.max() - pos.min(), neg.max() - neg.min()
    smallest = neg_diff if pos_diff > neg_diff else pos_diff
    if pos_diff >= neg_diff:  # "positive" := the peakier distribution
        pos, neg = neg, pos
    width = smallest
    lo = pos.min() + width - INTERVAL_BUFFER
    hi = pos.max() + INTERVAL_BUFFER
    right = np.linspace(lo, hi, num=int(np.ceil((hi - lo) * NUM_THRESHOLDS_PER_UNIT)))
    n_left = int(np.ceil(2 * INTERVAL_BUFFER * NUM_THRESHOLDS_PER_UNIT))
    # np.linspace with array ends computes each row exactly as the original's per-threshold calls
    left = np.linspace(right - width - INTERVAL_BUFFER, right - width + INTERVAL_BUFFER, num=n_left, axis=1)
    r_flat = np.repeat(right, n_left)
    l_flat = left.reshape(-1)

    def inside(c):
        s = np.sort(c)
        k = np.searchsorted(s, r_flat, side="right") - np.searchsorted(s, l_flat, side="left")
        return np.maximum(k, 0)

    return inside(pos), inside(neg), len(pos), len(neg)


def _threshold_epsilons(tp: np.ndarray, fp: np.ndarray, n_pos: int, n_neg: int, delta: float) -> np.ndarray:
    """Per-threshold ε (inf for perfect separation, NaN for discarded thresholds), float32 like the original."""
    tpr, fnr = _rates(tp, n_pos), _rates(n_pos - tp, n_pos)
    fpr, tnr = _rates(fp, n_neg), _rates(n_neg - fp, n_neg)
    eps = np.zeros(len(tp), dtype=np.float32)
    perfect = (fpr + fnr == 0) & (tpr + tnr == 2)
    eps[perfect] = np.inf
    discard = ~perfect & (fpr * fnr == 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.log(1 - delta - fpr) - np.log(fnr)
        b = np.log(1 - delta - fnr) - np.log(fpr)
        both = np.stack([a, b])
        val = np.where(np.isnan(both).all(axis=0), np.nan, np.nanmax(np.where(np.isnan(both), -np.inf, both), axis=0))
        val = np.clip(val, 0, None)
    keep = ~perfect & ~discard
    eps[keep] = val[keep]
    eps[discard] = np.nan
    return eps


def example_epsilon(pos: np.ndarray, neg: np.ndarray, delta: float = DELTA) -> tuple[float, str]:
    """ε for one example from the confidences of the positive and the negative models.

    Returns (ε clipped to [0, 50], how it was decided: "degenerate", "thresholds" or "no_valid_threshold").
    """
    pos = np.asarray(pos, dtype=np.float64).reshape(-1)
    neg = np.asarray(neg, dtype=np.float64).reshape(-1)
    pos_diff, neg_diff = pos.max() - pos.min(), neg.max() - neg.min()
    largest = pos_diff if pos_diff > neg_diff else neg_diff
    smallest = neg_diff if pos_diff > neg_diff else pos_diff
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.float64(smallest) / np.float64(largest)
    if ratio < 0.01:  # NaN (both ranges 0) compares False, as in the original
        return EPSILON_CAP, "degenerate"
    ip, ineg, n_ip, n_in = _interval_threshold_counts(pos, neg)
    sp, sn = _single_threshold_counts(pos, neg)
    eps = np.concatenate([_threshold_epsilons(ip, ineg, n_ip, n_in, delta),
                          _threshold_epsilons(sp, sn, len(pos), len(neg), delta)])
    eps = eps[~np.isnan(eps)]
    if len(eps) == 0:
        return 0.0, "no_valid_threshold"
    return float(np.clip(np.float64(eps.max()), 0, EPSILON_CAP)), "thresholds"


def per_example_epsilons(unlearned: np.ndarray, retrained: np.ndarray, delta: float = DELTA) -> tuple[np.ndarray, dict]:
    """ε per forget example from confidence arrays of shape [models, examples].

    Returns the ε array and counts of how each was decided.
    """
    unlearned = np.asarray(unlearned, dtype=np.float64)
    retrained = np.asarray(retrained, dtype=np.float64)
    if unlearned.ndim != 2 or retrained.ndim != 2 or unlearned.shape[1] != retrained.shape[1]:
        raise ValueError("expected confidences [models, examples] with the same examples for both sets")
    retrain_is_positive = np.median(retrained, axis=0) > np.median(unlearned, axis=0)
    out = np.zeros(unlearned.shape[1])
    how = {"degenerate": 0, "thresholds": 0, "no_valid_threshold": 0}
    for i in range(unlearned.shape[1]):
        pos, neg = (retrained[:, i], unlearned[:, i]) if retrain_is_positive[i] else (unlearned[:, i], retrained[:, i])
        out[i], kind = example_epsilon(pos, neg, delta)
        how[kind] += 1
    return out, how


def bucket_points(n_models: int) -> list[tuple[float, float]]:
    """(bucket start, points) pairs: width 0.5 up to ⌈ln(N − 1)⌉, points 1, 1/2, 1/4, ..."""
    max_epsilon = math.ceil(math.log(n_models - 1)) if n_models > 2 else 0
    buckets, start, points = [], 0.0, 1.0
    while start + BUCKET_WIDTH <= max_epsilon:
        buckets.append((start, points))
        points /= 2
        start += BUCKET_WIDTH
    return buckets


def example_points(eps: np.ndarray, n_models: int) -> np.ndarray:
    """Points per example: 2^−k for ε in bucket k, 0 at or past the top bucket."""
    buckets = bucket_points(n_models)
    out = np.zeros(len(eps))
    for i, e in enumerate(np.asarray(eps, dtype=np.float64)):
        for start, points in buckets:
            if e < start + BUCKET_WIDTH:
                out[i] = points
                break
    return out


def forget_quality(unlearned: np.ndarray, retrained: np.ndarray, delta: float = DELTA) -> dict:
    """F and its ingredients from confidences [models, examples] of unlearned and retrained models."""
    eps, how = per_example_epsilons(unlearned, retrained, delta)
    n_models = np.asarray(unlearned).shape[0]
    points = example_points(eps, n_models)
    return {"forget_quality": float(points.mean()) if len(points) else 0.0, "epsilons": eps, "points": points,
            "n_models": n_models, "max_epsilon": math.ceil(math.log(n_models - 1)) if n_models > 2 else 0,
            "decided_by": how}


def challenge_score(forget_quality_value: float, ra_unlearned, ra_retrained, ta_unlearned, ta_retrained) -> float:
    """F · (mean RA_u / mean RA_r) · (mean TA_u / mean TA_r); accuracies in any common unit."""
    ra_u, ra_r = float(np.mean(ra_unlearned)), float(np.mean(ra_retrained))
    ta_u, ta_r = float(np.mean(ta_unlearned)), float(np.mean(ta_retrained))
    return float(forget_quality_value * (ra_u / ra_r) * (ta_u / ta_r))


class ForgetQuality(Metric):
    """Challenge forget quality F as a torchmetrics ``Metric``.

    ``update(logits, labels, kind)`` takes one model's logits over the whole forget set (always in
    the same order) with ``kind`` "unlearned" or "retrained"; ``compute()`` returns F. Confidences are
    stored per model (float64); the per-example ε are kept in ``last_result`` after ``compute``.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, delta: float = DELTA, **kwargs):
        super().__init__(**kwargs)
        self.delta = delta
        self.add_state("unlearned", default=[], dist_reduce_fx="cat")
        self.add_state("retrained", default=[], dist_reduce_fx="cat")
        self.last_result: dict | None = None

    def update(self, logits: torch.Tensor, labels: torch.Tensor, kind: str) -> None:
        if kind not in ("unlearned", "retrained"):
            raise ValueError("kind must be 'unlearned' or 'retrained'")
        conf = torch.from_numpy(logit_scaled_confidence(logits, labels))
        getattr(self, kind).append(conf.unsqueeze(0))

    def compute(self) -> torch.Tensor:
        u = [t.reshape(1, -1) if t.ndim == 1 else t for t in self.unlearned]
        r = [t.reshape(1, -1) if t.ndim == 1 else t for t in self.retrained]
        if not u or not r:
            raise ValueError("ForgetQuality needs at least one unlearned and one retrained model")
        self.last_result = forget_quality(torch.cat(u).numpy(), torch.cat(r).numpy(), self.delta)
        return torch.tensor(self.last_result["forget_quality"], dtype=torch.float64)
