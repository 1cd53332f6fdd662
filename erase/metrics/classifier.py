"""The classifier unlearning metrics of DESIGN.md §4: UA, RA, TA, MIA-efficacy, gap, RTE."""

from __future__ import annotations

import math

import torch

from erase.metrics.accuracy import TopOneAccuracy
from erase.metrics.mia import MIA_DRAWS, MIAEfficacy

GAP_KEYS = ("UA", "RA", "TA", "MIA")


def unlearning_metrics(preds: dict[str, tuple[torch.Tensor, torch.Tensor]], seed: int = 0,
                       ra_rows: torch.Tensor | None = None, mia_draws: int = MIA_DRAWS) -> dict:
    """``preds`` maps forget/retain/test[/test_forget] to (probabilities, labels).

    ``ra_rows`` picks the rows of ``preds["retain"]`` that RA is estimated on (default: all); the
    MIA members are every retain row. ``MIA_se`` is MIA-efficacy's standard error over its
    ``mia_draws`` resampling draws (erase/metrics/mia.py). The predictions cover whole sets already
    (the main process evaluates), so the metrics do not synchronise across processes.
    """
    out = {}
    for key, view, forget in (("UA", "forget", True), ("RA", "retain", False), ("TA", "test", False)):
        if view not in preds:  # no forget set: a plain (pre)training run
            continue
        m = TopOneAccuracy(forget=forget, sync_on_compute=False)
        probs, labels = preds[view]
        if key == "RA" and ra_rows is not None:
            probs, labels = probs[ra_rows], labels[ra_rows]
        m.update(probs, labels)
        out[key] = round(float(m.compute()), 4)
    if "test_forget" in preds:
        m = TopOneAccuracy(sync_on_compute=False)
        m.update(*preds["test_forget"])
        out["forget_class_test_acc"] = round(float(m.compute()), 4)
    if "forget" not in preds:
        return out
    mia = MIAEfficacy(seed=seed, draws=mia_draws, sync_on_compute=False)
    mia.update(*preds["retain"], split="member")
    mia.update(*preds["test"], split="non_member")
    mia.update(*preds["forget"], split="target")
    value, se = (float(t) for t in mia.compute_with_error())
    out["MIA"] = round(value, 4)
    out["MIA_se"] = round(se, 4) if math.isfinite(se) else None  # None: one draw has no spread to measure
    out["mia_settings"] = {**mia.settings, "n_members": len(preds["retain"][1]), "n_non_members": len(preds["test"][1])}
    return out


def gap_to_retrain(metrics: dict, retrain: dict) -> dict:
    """|method - retrain| per metric and their mean ("Avg. gap")."""
    gaps = {k: abs(float(metrics[k]) - float(retrain[k])) for k in GAP_KEYS}
    gaps["avg_gap"] = sum(gaps.values()) / len(GAP_KEYS)
    return {k: round(v, 4) for k, v in gaps.items()}


def rte(seconds: float, retrain_seconds: float | None) -> dict:
    out = {"RTE_s": round(seconds, 2)}
    if retrain_seconds:
        out["RTE_ratio"] = round(seconds / retrain_seconds, 4)
    return out
