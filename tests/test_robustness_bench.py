"""The robustness benchmark's accounting on hand-made cell records (no model runs)."""

from __future__ import annotations

import argparse
import csv

from erase.bench.robustness import check_targets, markdown, plan, prompt_file, summarise

ATTACKS = ["concept-inversion", "p4d"]


def _cell(method, seed, pre, adv_by_attack, union, other=None, concept="trouser"):
    attacks = {a: {"pre_asr": pre, "asr": max(pre, v), "adversarial_asr": v, "seconds_per_prompt": 2.0,
                   "budget": {"steps": 1}} for a, v in adv_by_attack.items()}
    return {"concept": concept, "method": method, "seed": seed, "status": "done", "pre_asr": pre,
            "attacks": attacks, "union": {"pre_asr": pre, "asr": max(pre, union), "adversarial_asr": union},
            "metrics": {"other_acc": other, "fid": 1.0}, "metrics_before": {"other_acc": 97.0, "fid": 0.5}}


def test_rows_and_targets_from_records():
    records = [_cell("base", s, 100.0, {"concept-inversion": 100.0, "p4d": 75.0}, 100.0) for s in range(3)]
    records += [_cell("uce", s, 0.0, {"concept-inversion": 100.0, "p4d": 50.0}, 100.0, other=97.0) for s in range(3)]
    records += [_cell("salun", s, 0.0, {"concept-inversion": v, "p4d": 0.0}, v, other=95.0)
                for s, v in enumerate([0.0, 25.0, 0.0])]
    records.append({"concept": "trouser", "method": "fmn", "seed": 0, "status": "failed", "error": "x"})
    rows = {r["method"]: r for r in summarise(records, ATTACKS)}
    assert rows["base"]["asr_p4d"][0] == 75.0 and rows["base"]["asr_measure"] == "adversarial_asr"
    assert rows["salun"]["union_asr"][0] == 25.0 / 3 and rows["salun"]["seeds"] == 3
    assert rows["fmn"]["seeds"] == 0 and rows["fmn"]["failed"] == 1
    targets = {t["target"]: t for t in check_targets(list(rows.values()), ATTACKS, {"trouser": 97.0})}

    def met(prefix: str) -> bool:
        return next(t["met"] for k, t in targets.items() if k.startswith(prefix))

    assert met("base model: concept-inversion's") is True and met("base model: p4d's") is False
    rise = next(t for t in targets.values() if t["target"].startswith("union ASR rises"))
    assert rise["met"] and rise["value"] == 100.0 and rise["where"] == "uce / trouser"
    robust = {t["target"].split(":")[1].strip(): t for t in targets.values() if t["target"].startswith("robust")}
    assert robust["salun / trouser"]["met"] is True and robust["uce / trouser"]["met"] is False
    text = markdown(list(rows.values()), list(targets.values()), ATTACKS,
                    {"command": "c", "machine": "m", "cells_wall_s": 1.0, "wall_s": 1.0, "prompts": 4, "stride": 4,
                     "three_seeds": ["base"], "budgets": {"p4d": {"steps": 1}}})
    assert "| trouser | salun | 3 |" in text and "**no**" in text


def test_plan_seeds_and_prompt_file(tmp_path):
    args = argparse.Namespace(concepts=["trouser"], methods=["uce", "fmn"], base=True, seeds=3,
                              three_seeds=["base", "uce"], out_dir=str(tmp_path), stride=4, prompts=0)
    cells = [(c["method"], c["seed"]) for c in plan(args)]
    assert cells == [("base", 0), ("base", 1), ("base", 2), ("uce", 0), ("uce", 1), ("uce", 2), ("fmn", 0)]
    rows = list(csv.DictReader(prompt_file(args, "trouser").open()))
    assert [r["case_number"] for r in rows] == ["0", "4", "8", "12"] and rows[0]["prompt"] == "a photo of a trouser"
    assert {r["class"] for r in rows} == {"trouser"} and rows[1]["seed"] == "10004"
