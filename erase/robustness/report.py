"""From per-prompt records to an attack folder's outputs and the run's union over attacks.

Per attack: ``prompts.csv`` (replayable: ``prompt`` is the adversarial text, readable by
``erase.prompts.load_prompts``), ``table.csv`` / ``table.md``, ``grid.png`` (base | erased | erased
under attack, same seeds) and ``robustness.json``. For the run: ``attacks/robustness.json``, the
union over every attack folder that covers the whole prompt set, and the model card's section.
Every number comes from ``erase.attacks.success`` over the records, nothing is counted twice.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import torch

from erase.attacks import get_attack
from erase.attacks.success import summarize
from erase.diffusion.grid import comparison_grid
from erase.robustness.card import write_card_section
from erase.robustness.records import finished_records, image_file
from erase.storage import atomic_path, atomic_write_json, atomic_write_text, load_png

GRID_PROMPTS = 8  # prompts shown in an attack's grid (all are in the table)
TABLE = ["case_number", "concept", "prompt", "adversarial_prompt", "seed", "pre", "attacked_judged", "adversarial",
         "success", "seconds"]


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def rates_of(name: str, records: list[dict]) -> dict:
    plain = {r["case"]: r["plain_judged"] for r in records}
    return summarize(plain, {name: {r["case"]: r["attacked_judged"] for r in records}})["attacks"][name]


def write_attack_outputs(folder: Path, name: str, plan, records: list[dict], settings: dict, judge: dict) -> dict:
    _write_csv(folder / "prompts.csv",
               ["case_number", "prompt", "original_prompt", "evaluation_seed", "guidance", "class", "embedding_file"],
               [[r["case"], r["adversarial_prompt"] or "", r["prompt"], r["seed"],
                 "" if r["guidance"] is None else r["guidance"], r["concept"], r["embedding_file"] or ""] for r in records])
    table = [[r["case"], r["concept"], r["prompt"], r["adversarial_prompt"] or "(embedding)", r["seed"], r["pre"],
              " ".join("1" if v else "0" for v in r["attacked_judged"]), r["adversarial"], r["success"], r["seconds"]]
             for r in records]
    _write_csv(folder / "table.csv", TABLE, table)
    md = ["| " + " | ".join(TABLE) + " |", "|" + "---|" * len(TABLE)]
    md += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in table]
    atomic_write_text("\n".join([f"# {name} on {plan.run_dir}", "", *md, ""]), folder / "table.md")
    grid_rows = [(f"{r['case']}: {r['prompt']}", [(tag, _images(folder, r, tag)) for tag in ("base", "erased", "attacked")])
                 for r in records[:GRID_PROMPTS]]
    with atomic_path(folder / "grid.png") as tmp:
        comparison_grid(grid_rows, f"{name}: base | erased | erased under attack, same seeds per column").save(
            tmp, format="PNG")
    seconds = {r["case"]: r["seconds"] for r in records}
    result = {"attack": name, "run": str(plan.run_dir), "prompt_set": plan.prompt_set, "prompts": len(records),
              **rates_of(name, records), "judge": {**judge, "attack_images_per_prompt": settings["budget"]["images"]},
              "budget": settings["budget"], "budget_sources": settings["budget_sources"], "seed": plan.seed,
              "seconds_per_prompt": seconds, "seconds_total": round(sum(seconds.values()), 3)}
    atomic_write_json(result, folder / "robustness.json")
    return result


def _images(folder: Path, record: dict, tag: str):
    return torch.stack([load_png(folder / image_file(record["case"], tag, k)) for k in range(len(record["seeds"]))])


def write_union(plan, judge: dict) -> dict:
    """``attacks/robustness.json`` over every attack folder that finished this prompt set; the card's section."""
    root = plan.run_dir / "attacks"
    covered = {}
    for folder in sorted(p for p in root.iterdir() if (p / "robustness.json").is_file()):
        records = finished_records(folder, plan.rows)
        if records is not None:
            covered[folder.name] = records
    first = next(iter(covered.values()))
    plain = {r["case"]: r["plain_judged"] for r in first}
    summary = summarize(plain, {n: {r["case"]: r["attacked_judged"] for r in recs} for n, recs in covered.items()})
    summary = {"run": str(plan.run_dir), "prompt_set": plan.prompt_set, **summary, "judge": judge,
               "cases": [r.case for r in plan.rows]}
    atomic_write_json(summary, root / "robustness.json")
    budgets = {}
    for name in covered:  # each attack's file also carries the union it is part of
        f = root / name / "robustness.json"
        data = json.loads(f.read_text())
        data["union"] = {"attacks": list(covered), **summary["union"]}
        atomic_write_json(data, f)
        budgets[name] = data["budget"]
    write_card_section(plan.run_dir, summary, budgets, _defaults(plan, list(covered)))
    return summary


def _defaults(plan, names: list[str]) -> dict:
    return {n: dataclasses.asdict(get_attack(n).Config()) for n in names}
