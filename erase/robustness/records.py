"""Per-prompt records of an attack folder: where each prompt's files go, and reading finished ones back."""

from __future__ import annotations

import json
from pathlib import Path

from erase.prompts import PromptRow
from erase.storage import slug


def image_file(case: str, tag: str, k: int) -> str:
    """``tag``: base | erased (the plain prompt) | attacked; ``k``: the k-th seed."""
    return f"images/{slug(case)}_{tag}_{k}.png"


def record_file(folder: Path, case: str) -> Path:
    return folder / "records" / f"{slug(case)}.json"


def row_fields(row: PromptRow) -> dict:
    """What identifies a prompt's attack: a record whose fields differ belongs to another prompt set."""
    return {"case": row.case, "prompt": row.prompt, "concept": row.concept, "seed": row.seed, "guidance": row.guidance}


def done_record(folder: Path, row: PromptRow) -> dict | None:
    """The record of a prompt already attacked with the same row, else None."""
    f = record_file(folder, row.case)
    if not f.is_file():
        return None
    try:
        record = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # records are written atomically, so this is someone else's file: redo the prompt
    return record if all(record.get(k) == v for k, v in row_fields(row).items()) else None


def finished_records(folder: Path, rows: list[PromptRow]) -> list[dict] | None:
    """Every row's record from an attack folder, or None if any prompt is missing (it then stays out of the union)."""
    records = [done_record(folder, r) for r in rows]
    return None if any(r is None for r in records) else records
