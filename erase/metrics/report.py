"""Side-by-side reports of finished runs against a retrained reference (JSON + markdown)."""

from __future__ import annotations

import json
from pathlib import Path

from erase.errors import EraseError
from erase.metrics.classifier import GAP_KEYS, gap_to_retrain, rte
from erase.storage import atomic_write_json, atomic_write_text


def load_run(path: str | Path) -> dict:
    """metrics.json + run.json of a finished run folder."""
    p = Path(path)
    if not p.exists():
        raise EraseError(f"run folder {p} not found")
    if not (p / "run.json").is_file() or not (p / "metrics.json").is_file():
        # --resume is advice only for a run that was interrupted (it has checkpoints to go on from).
        hint = ("it was interrupted: finish it by rerunning its erase/train.py command with --resume"
                if (p / "checkpoints").is_dir() else "is it a folder written by erase/train.py?")
        raise EraseError(f"{p} is not a finished erase run (no run.json/metrics.json); {hint}")
    return {"path": str(p), **json.loads((p / "run.json").read_text()), "metrics": json.loads((p / "metrics.json").read_text())}


def compare_runs(runs: list[dict], retrain: dict | None) -> list[dict]:
    rows = []
    for r in runs:
        m = r["metrics"]
        missing = [k for k in GAP_KEYS if k not in m]
        if missing:
            raise EraseError(f"{r['path']} has no {missing} (was anything forgotten?)")
        row = {"method": r["method"], "path": r["path"], **{k: m[k] for k in GAP_KEYS}}
        if m.get("MIA_se") is not None:  # runs evaluated before MIA had a standard error have none
            row["MIA_se"] = m["MIA_se"]
        if retrain is not None:
            gaps = gap_to_retrain(m, retrain["metrics"])
            row.update({f"gap_{k}": v for k, v in gaps.items() if k != "avg_gap"})
            row["avg_gap"] = gaps["avg_gap"]
        row.update(rte(float(r["total_s"]), float(retrain["total_s"]) if retrain else None))
        rows.append(row)
    return rows


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or [c for c in ["method", *GAP_KEYS, "MIA_se", "avg_gap", "RTE_s", "RTE_ratio"] if any(c in r for r in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" if c == "method" else "---:" for c in columns) + "|"]
    for r in rows:
        cells = [(f"{r[c]:.2f}" if isinstance(r.get(c), float) else str(r.get(c, ""))) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(rows: list[dict], out_prefix: Path, title: str, notes: list[str] | None = None) -> None:
    atomic_write_json({"title": title, "rows": rows, "notes": notes or []}, out_prefix.with_suffix(".json"))
    body = [f"# {title}", "", markdown_table(rows), ""] + [f"- {n}" for n in notes or []]
    atomic_write_text("\n".join(body) + "\n", out_prefix.with_suffix(".md"))
