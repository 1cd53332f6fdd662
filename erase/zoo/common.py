"""Small helpers shared by the zoo training scripts: threads/seeds, data in the SD convention,
the machine description recorded in model cards, and shipping (fp16, no local paths)."""

from __future__ import annotations

import json
import os
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch

from erase.storage import atomic_write_json

# Every script defaults to 2 threads: the reference machine has 2 cores, and more threads than
# cores makes PyTorch's CPU kernels slower, not faster.
DEFAULT_THREADS = 2


def setup(seed: int, threads: int | None = DEFAULT_THREADS) -> None:
    if threads:
        torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def machine() -> str:
    """What the model card says the model was trained on, e.g. "2 CPU cores, no GPU"."""
    if torch.cuda.is_available():
        accel = torch.cuda.get_device_name(0)
    else:
        accel = "no GPU"
    return f"{os.cpu_count()} CPU cores, {accel} ({platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads)"


def to_sd_pixels(x01: torch.Tensor) -> torch.Tensor:
    """Grayscale [0, 1] (N, 1, H, W) -> RGB [-1, 1] (N, 3, H, W), the convention of SD's VAE."""
    return (x01 * 2 - 1).expand(-1, 3, -1, -1).contiguous()


def to_gray01(x: torch.Tensor) -> torch.Tensor:
    """RGB or gray images in [-1, 1] -> gray [0, 1] (N, 1, H, W), what the evaluator reads."""
    return ((x.float().clamp(-1, 1) + 1) / 2).mean(dim=1, keepdim=True)


class Timer:
    """Wall time that survives resumes: the seconds of earlier runs are stored with the checkpoint."""

    def __init__(self, previous: float = 0.0):
        self.previous, self.start = previous, time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.previous + time.perf_counter() - self.start


def strip_local_paths(model_dir: str | Path) -> None:
    """Remove ``_name_or_path`` (an absolute path of the training machine) from every saved config."""
    for cfg in Path(model_dir).rglob("*.json"):
        data = json.loads(cfg.read_text())
        if isinstance(data, dict) and "_name_or_path" in data:
            data.pop("_name_or_path")
            atomic_write_json(data, cfg)


def prefer_float32(config_file: str | Path) -> None:
    """Weights ship in fp16 to stay small, but transformers' default ``dtype="auto"`` would then load
    fp16 on a CPU, where it is slow; the config's dtype says to load them as float32."""
    data = json.loads(Path(config_file).read_text())
    for key in ("dtype", "torch_dtype"):
        if key in data:
            data[key] = "float32"
    atomic_write_json(data, config_file)


def read_json(path: str | Path, default=None):
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else default


def write_record(model_dir: str | Path, section: str, record: dict) -> None:
    """Merge ``record`` into ``card.json[section]``: the facts the README model card is built from."""
    path = Path(model_dir) / "card.json"
    data = read_json(path, {})
    data[section] = record
    atomic_write_json(data, path)
