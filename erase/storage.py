"""Safe, atomic file I/O shared by every part of erase.

Weights are only ever read with safetensors or ``torch.load(weights_only=True)``. Every write goes
to a temporary file in the same folder first and is renamed into place, so an interrupted run or a
full disk never leaves a half-written file under the final name.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
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


# Errors that mean "the disk cannot take more": the message then says how much room is left.
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask can only set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _as_os_error(err: BaseException) -> OSError | None:
    """The operating-system error behind a failed write, also when a library wrapped it.

    safetensors reports a full disk as ``SafetensorError: ... (os error 28)``; torch.save's own
    error is recovered by :func:`save_torch` before it gets here.
    """
    if isinstance(err, OSError):
        return err
    m = re.search(r"os error (\d+)", str(err))
    if m:
        code = int(m.group(1))
        return OSError(code, os.strerror(code))
    return None


def _free_space(path: Path) -> str:
    for folder in (path, *path.parents):
        if folder.exists():
            free = shutil.disk_usage(folder).free
            for unit in ("bytes", "KB", "MB", "GB", "TB"):
                if free < 1000 or unit == "TB":
                    return f"{free:.0f} {unit}" if unit == "bytes" else f"{free:.1f} {unit}"
                free /= 1000
    return "unknown"


def disk_reason(path: Path, err: OSError) -> str:
    """Why a write failed, with the room left on the disk when that is the reason."""
    reason = err.strerror or str(err)
    if err.errno in _NO_ROOM:
        reason += f" ({_free_space(path.parent)} free on that disk)"
    return reason


def write_error(path: Path, err: OSError) -> EraseError:
    """One line: which file, why, how much room is left when that is the reason, and what is kept."""
    return EraseError(f"could not write {path}: {disk_reason(path, err)}; nothing was replaced (files and "
                      "checkpoints written before are kept)")


def os_error_in(err: BaseException | None) -> OSError | None:
    """The operating-system error at the root of ``err`` (following ``raise ... from``), if any."""
    while err is not None:
        if not isinstance(err, EraseError) and (found := _as_os_error(err)) is not None:
            return found
        err = err.__cause__
    return None


def slug(name: str) -> str:
    """``name`` as one safe file-name component (a prompt's case number, an attack's work folder)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[:80] or "x"


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The file gets the mode an ordinary ``open`` would give it (0666 minus the umask), not
    ``mkstemp``'s private 0600: models and metrics are shared artefacts.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise write_error(path, err) from err
    try:
        yield Path(tmp)
        # After the writer, not before: some (safetensors) replace the file rather than reopen it.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        os_err = _as_os_error(err) if isinstance(err, Exception) and not isinstance(err, EraseError) else None
        if os_err is not None:
            raise write_error(path, os_err) from err
        raise


@contextmanager
def atomic_dir(final: str | Path):
    """Yield a temporary folder beside ``final``; on success it replaces ``final`` in one rename."""
    final = Path(final)
    tmp = final.parent / f".{final.name}.tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)  # mode 0777 minus the umask, like any folder
    except OSError as err:
        raise write_error(final, err) from err
    try:
        yield tmp
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        os_err = _as_os_error(err) if isinstance(err, Exception) and not isinstance(err, EraseError) else None
        if os_err is not None:
            raise write_error(final, os_err) from err
        raise


class _RecordingWriter:
    """A file wrapper that keeps the OSError of a failed write: torch.save replaces it with an opaque
    RuntimeError ("unexpected pos ..."), which would hide a full disk."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.f.flush()


def save_torch(obj, path: str | Path) -> None:
    """``torch.save`` (read back with :func:`torch_load_safe`), atomically, with disk errors in one line."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        writer = _RecordingWriter(f)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise


def check_writable_dir(folder: str | Path, flag: str) -> None:
    """Create ``folder`` if needed and write a probe file into it, so an unusable folder (a file of that
    name, a read-only disk, no permission) fails in one line before any work, not at the first save."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise EraseError(f"{flag} {folder} is a file, not a folder; choose another {flag}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".erase-write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise EraseError(f"{flag} {folder} is not writable: {disk_reason(folder / 'x', err)}") from None


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
            data = read_yaml(f, "model settings") or {}
            if not isinstance(data, dict):
                raise EraseError(f"{f}: expected a mapping with 'methods' (and optionally 'anchors')")
            return data
    return {}


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: 'line L, column C: problem' (PyYAML's own text spans several lines)."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def read_yaml(path: Path, what: str = "YAML file"):
    """``yaml.safe_load`` of a file, with a one-line error naming the file and the line at fault."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise EraseError(f"{what} {path}: invalid YAML at {yaml_problem(err)}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise EraseError(f"could not read {what} {path}: {getattr(err, 'strerror', None) or err}") from None
