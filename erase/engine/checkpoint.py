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


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, optimizers: dict, state: dict,
                    last_good: Path | None = None) -> Path:
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
        kept = (f"the last good checkpoint {last_good} is kept" if last_good
                else "no earlier checkpoint exists (the base model is untouched)")
        raise EraseError(f"could not save checkpoint {final}: {disk_reason(final, os_err)}; {kept}; free some space, "
                         "then rerun the same command with --resume") from err
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


class Checkpointer:
    """Checkpoints of one run, and which of them is known to be good.

    A checkpoint is *pending* until the next step's loss, computed on its weights, comes out finite
    (``confirm``); a non-finite loss means its weights had already diverged (``reject_pending`` sets it
    aside under a name ``--resume`` ignores). Pruning keeps the newest ``keep`` checkpoints and never
    deletes the last good one. Only the main process touches the disk; every process keeps the state.
    """

    def __init__(self, root: Path, keep: int, writes: bool = True):
        self.root, self.keep, self.writes = root, max(keep, 1), writes
        self.last_good: Path | None = latest_checkpoint(root)
        self.pending: Path | None = None

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root)

    def load(self, path: Path, model: torch.nn.Module, optimizers: dict) -> dict:
        self.last_good = path
        return load_checkpoint(path, model, optimizers)

    def save(self, step: int, model: torch.nn.Module, optimizers: dict, state: dict) -> None:
        path = self.root / f"step-{step:06d}"
        if self.writes:
            save_checkpoint(self.root, step, model, optimizers, state, self.last_good)
        self.pending = path
        self._prune()

    def confirm(self) -> None:
        if self.pending is not None:
            self.last_good, self.pending = self.pending, None
            self._prune()

    def reject_pending(self) -> Path | None:
        if self.pending is None:
            return None
        bad = self.pending.with_name(self.pending.name + ".nonfinite")
        if self.writes:
            shutil.rmtree(bad, ignore_errors=True)
            self.pending.rename(bad)
        self.pending = None
        return bad

    def _prune(self) -> None:
        if not self.writes:
            return
        dirs = checkpoint_dirs(self.root)
        for old in dirs[:-self.keep]:
            if old not in (self.last_good, self.pending):
                shutil.rmtree(old, ignore_errors=True)
