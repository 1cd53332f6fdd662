"""Step-named checkpoints: ``checkpoints/step-000120/`` with weights, optimiser and stream state.

Weights are safetensors; the optimiser state is a tensors-and-containers file read back with
``torch.load(weights_only=True)``. A checkpoint is written into a temporary folder and renamed,
so a crash mid-save never leaves a half checkpoint that ``--resume`` would pick.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from erase.errors import EraseError
from erase.storage import atomic_dir, disk_reason, load_state_dict_strict, os_error_in, save_safetensors, save_torch, torch_load_safe

_STEP = re.compile(r"^step-(\d+)$")


def checkpoint_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, optimizers: dict, state: dict, keep: int = 2) -> Path:
    final = root / f"step-{step:06d}"
    try:
        with atomic_dir(final) as tmp:
            save_safetensors(model.state_dict(), tmp / "model.safetensors")
            save_torch({k: o.state_dict() for k, o in optimizers.items()}, tmp / "optimizer.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    except EraseError as err:  # e.g. a full disk: say which checkpoint survives and how to go on from it
        os_err = os_error_in(err)
        if os_err is None:
            raise
        last = latest_checkpoint(root)
        kept = f"the last good checkpoint {last} is kept" if last else "no earlier checkpoint exists (the base model is untouched)"
        raise EraseError(f"could not save checkpoint {final}: {disk_reason(final, os_err)}; {kept}; free some space, "
                         "then rerun the same command with --resume") from err
    for old in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, optimizers: dict) -> dict:
    load_state_dict_strict(model, path / "model.safetensors")
    saved = torch_load_safe(path / "optimizer.pt")
    if set(saved) != set(optimizers):
        raise EraseError(f"checkpoint {path} holds optimisers {sorted(saved)}, this run has {sorted(optimizers)}; "
                         "was it written with other settings?")
    for key, opt in optimizers.items():
        opt.load_state_dict(saved[key])
    return json.loads((path / "state.json").read_text())
