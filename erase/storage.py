"""Safe, atomic file I/O shared by every part of erase.

Weights are only ever read with safetensors or ``torch.load(weights_only=True)``. Every write goes
to a temporary file in the same folder first and is renamed into place, so an interrupted run or a
full disk never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from erase.errors import EraseError

ZOO_DIR = Path(__file__).resolve().parent / "zoo"


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise EraseError(f"could not write {path}: {err.strerror or err}") from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(final: str | Path):
    """Yield a temporary folder beside ``final``; on success it replaces ``final`` in one rename."""
    import shutil

    final = Path(final)
    tmp = final.parent / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise EraseError(f"could not write {final}: {err.strerror or err}") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(text: str, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(obj, path: str | Path) -> None:
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n", path)


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_safetensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise EraseError(f"weights file not found: {path}")
    try:
        return load_file(str(path), device=str(device))
    except Exception as err:  # safetensors raises several private error types
        raise EraseError(f"{path} is not a readable safetensors file: {err}") from err


def load_state_dict_strict(module: torch.nn.Module, path: str | Path, map_location="cpu") -> None:
    """Load weights, reporting missing/unexpected keys and shape mismatches in one clear line."""
    state = load_safetensors(path, map_location)
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[0]}")
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        raise EraseError(f"checkpoint {path} does not fit this model: " + "; ".join(parts))
    module.load_state_dict(state)


def resolve_model_dir(name_or_path: str | Path, kind: str | None = None) -> Path:
    """A local folder, or the name of a bundled model under ``erase/zoo/``."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    bundled = ZOO_DIR / str(name_or_path)
    if bundled.is_dir() and any(bundled.iterdir()):
        return bundled
    names = list_bundled_models()
    hint = f"; bundled models: {', '.join(names)}" if names else ""
    raise EraseError(f"model {str(name_or_path)!r} is neither a folder nor a bundled {kind or 'model'} name{hint}")


def list_bundled_models() -> list[str]:
    """Names of the models shipped inside the package (folders under ``erase/zoo/``)."""
    if not ZOO_DIR.is_dir():
        return []
    return sorted(d.name for d in ZOO_DIR.iterdir()
                  if d.is_dir() and ((d / "config.json").exists() or (d / "model_index.json").exists()))


def torch_load_safe(path: str | Path, map_location="cpu"):
    """``torch.load`` restricted to tensors and plain containers (never arbitrary pickles)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def load_png(path: Path) -> torch.Tensor:
    """A PNG as float RGB in [0, 1], (3, H, W)."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255


def model_settings(model: str) -> dict:
    """A model folder's ``erase.yaml`` (recommended recipes, Concept Ablation anchors), or {} if it has none."""
    if not model:
        return {}
    for folder in (Path(model).expanduser(), ZOO_DIR / model):
        f = folder / "erase.yaml"
        if f.is_file():
            try:
                data = yaml.safe_load(f.read_text()) or {}
            except yaml.YAMLError as err:
                raise EraseError(f"{f} is not valid YAML: {str(err).splitlines()[0]}") from None
            if not isinstance(data, dict):
                raise EraseError(f"{f}: expected a mapping with 'methods' (and optionally 'anchors')")
            return data
    return {}
