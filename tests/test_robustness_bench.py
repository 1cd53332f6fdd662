"""The robustness benchmark's accounting on hand-made cell records (no model runs)."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pytest

from erase.bench import robustness
from erase.bench.diffusion import run_folder
from erase.bench.robustness import check_targets, markdown, plan, prompt_file, summarise
from erase.errors import EraseError

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
    args = argparse.Namespace(model="fmnist-tiny-sd", concepts=["trouser"], methods=["uce", "fmn"], base=True, seeds=3,
                              three_seeds=["base", "uce"], out_dir=str(tmp_path), stride=4, prompts=0)
    cells = [(c["method"], c["seed"]) for c in plan(args)]
    assert cells == [("base", 0), ("base", 1), ("base", 2), ("uce", 0), ("uce", 1), ("uce", 2), ("fmn", 0)]
    rows = list(csv.DictReader(prompt_file(args, "trouser").open()))
    assert [r["case_number"] for r in rows] == ["0", "4", "8", "12"] and rows[0]["prompt"] == "a photo of a trouser"
    assert {r["class"] for r in rows} == {"trouser"} and rows[1]["seed"] == "10004"


def test_model_flag_moves_cells_folders_results_and_seeds(tmp_path):
    """--model: the cells, the base-model and erasure folders, the results prefix and the seeded rows follow it;
    the default model keeps the folders and results it had before the flag existed."""
    def args_for(*argv):
        args = robustness.build_parser().parse_args([*argv, "--out-dir", str(tmp_path)])
        args.concepts, args.methods = args.concepts.split(","), args.methods.split(",")
        args.three_seeds = robustness.default_seeded(args)
        return args

    sd, flow = args_for(), args_for("--model", "fmnist-tiny-flow", "--methods", "salun,esd-u,esd-x,uce")
    assert sd.model == "fmnist-tiny-sd" and sd.results is None  # resolved in main, after the model check
    cells = plan(flow)
    assert {c["model"] for c in cells} == {"fmnist-tiny-flow"}
    assert len(cells) == 2 * 5 * 3  # two concepts x (base + 4 methods) x 3 seeds: issue 14's seeds for every row
    assert len([c for c in plan(sd) if c["concept"] == "trouser"]) == 3 * 5 + 7  # THREE_SEEDS (base + 4 methods) x 3, 7 others x 1
    base_sd = next(c for c in plan(sd) if c["method"] == "base" and c["concept"] == "sneaker")
    base_flow = next(c for c in cells if c["method"] == "base" and c["concept"] == "sneaker")
    assert robustness.base_folder(sd, base_sd) == tmp_path / "robustness" / "sneaker" / "base-s0"
    assert robustness.base_folder(flow, base_flow) == tmp_path / "robustness" / "fmnist-tiny-flow" / "sneaker" / "base-s0"
    erased_sd = next(c for c in plan(sd) if c["method"] == "uce")
    erased_flow = next(c for c in cells if c["method"] == "uce")
    assert run_folder(sd, erased_sd, {}) == tmp_path / "e8-f64-r64" / "fmnist-tiny-sd" / "trouser" / "uce-s0"
    assert run_folder(flow, erased_flow, {}) == tmp_path / "e8-f64-r64" / "fmnist-tiny-flow" / "trouser" / "uce-s0"
    assert robustness.results_prefix("fmnist-tiny-sd") == "results/robustness_fmnist"
    assert robustness.results_prefix("fmnist-tiny-flow") == "results/robustness_fmnist-tiny-flow"
    text = markdown([], [], ATTACKS, {"command": "c", "machine": "m", "cells_wall_s": 1.0, "wall_s": 1.0, "prompts": 4,
                                      "stride": 4, "three_seeds": ["base"], "budgets": {}, "model": "fmnist-tiny-flow"})
    assert text.startswith("# Robustness of erasure on the bundled fmnist-tiny-flow: ASR under two attacks")


def test_model_flag_writes_its_own_results_and_refuses_a_missing_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EraseError, match="--model: .*no-such-model"):
        robustness.main(["--model", str(tmp_path / "no-such-model"), "--methods", "uce"])
    assert not (tmp_path / "results").exists() and not (tmp_path / "runs").exists()
    model = tmp_path / "flow"  # a stand-in folder: the cells are hand-made, nothing loads it
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    seen = []

    def fake_cell(args, cell):
        seen.append(cell)
        return _cell(cell["method"], cell["seed"], 0.0, {"p4d": 0.0}, 0.0, other=96.0, concept=cell["concept"])

    monkeypatch.setattr(robustness, "attack_cell", fake_cell)
    assert robustness.main(["--model", str(model), "--methods", "uce", "--concepts", "trouser", "--threads", "1"]) == 0
    assert {c["model"] for c in seen} == {str(model)} and len(seen) == 2 * 3
    written = sorted(p.name for p in (tmp_path / "results").iterdir())
    assert len(written) == 2 and all(n.startswith("robustness_flow-") for n in written)  # never robustness_fmnist.*
    data = json.loads(next((tmp_path / "results").glob("*.json")).read_text())
    assert data["meta"]["model"] == str(model) and Path(data["meta"]["model"]).name == "flow"
