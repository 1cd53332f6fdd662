"""Shared plumbing of the benchmark commands: resumable, failure-tolerant runs and their costs.

Every run goes through the ordinary runner (``erase.runner.run``) in this process, into its own
folder. A folder holding ``run.json`` is finished and is read back instead of rerun (so an
interrupted benchmark continues where it stopped); a run that raises (a non-finite loss, a
closed-form edit that produces NaN weights, ...) leaves ``failed.json`` with the error and the
benchmark goes on. ``bench.json`` beside ``run.json`` records the run's whole wall time (task
construction, training, evaluation) and the machine load around it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import shutil
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from erase.storage import atomic_write_json

METRIC_KEYS = ("UA", "RA", "TA", "MIA")


def set_threads(n: int) -> int:
    """Set torch's intra-op threads; ``n <= 0`` chooses: all cores on an idle machine, else 1.

    On a busy 2-core machine two threads are ~10x slower per step than one (measured: 2.6 s vs 0.25 s
    per batch of 128 for ResNet-18 width 8 with another job on the cores), so "auto" avoids them there.
    """
    if n <= 0:
        load = loadavg()
        n = (os.cpu_count() or 1) if load is not None and load < 0.5 else 1
    torch.set_num_threads(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    return n


@functools.cache
def cache_datasets() -> None:
    """Load each dataset once per process (the benchmark builds hundreds of tasks from the same files).

    Wraps ``load_dataset`` as seen by the classifier task; datasets are immutable tensors, so sharing
    them between runs changes nothing but the start-up time of a run.
    """
    import erase.classifier.task as task_mod

    original = task_mod.load_dataset
    cached = functools.lru_cache(maxsize=8)(lambda name, train, root, download, pad_to: original(
        name, train, root, download, pad_to=pad_to))

    def load_dataset(name, train, root=None, download=False, **kwargs):
        return cached(name, train, root, download, kwargs.get("pad_to"))

    task_mod.load_dataset = load_dataset


def parse_method_overrides(items: list[str]) -> dict[str, dict]:
    """``["ssd.alpha=10", "salun.lr=3e-4"]`` -> {"ssd": {"alpha": 10}, "salun": {"lr": "3e-4"}}.

    Values are read as YAML scalars; the method's typed config coerces them when the run resolves.
    """
    import yaml

    from erase.errors import EraseError

    out: dict[str, dict] = {}
    for item in items:
        key, eq, value = item.partition("=")
        method, dot, fld = key.partition(".")
        if not (eq and dot and method.strip() and fld.strip()):
            raise EraseError(f"--set expects METHOD.FIELD=VALUE, got {item!r}")
        out.setdefault(method.strip(), {})[fld.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}


def describe_machine(info: dict) -> str:
    n = info["torch_threads"]
    dev = f"GPU {info['gpu']}" if info.get("gpu") else f"{n} torch thread{'' if str(n) == '1' else 's'}"
    return f"{info['cpu']} ({info['logical_cpus']} logical CPUs), {dev}, torch {info['torch']}"


def short_hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _finite_metrics(metrics: dict) -> bool:
    return all(isinstance(metrics.get(k), (int, float)) and math.isfinite(metrics[k]) for k in METRIC_KEYS
               if k in metrics)


def read_run(out: Path) -> dict | None:
    """The record of a finished (``run.json``) or failed (``failed.json``) run folder, else None."""
    out = Path(out)
    if (out / "run.json").is_file() and (out / "metrics.json").is_file():
        rec = {"path": str(out), "status": "done", "run": json.loads((out / "run.json").read_text()),
               "metrics": json.loads((out / "metrics.json").read_text())}
        if (out / "bench.json").is_file():
            rec["bench"] = json.loads((out / "bench.json").read_text())
        return rec
    if (out / "failed.json").is_file():
        return {"path": str(out), "status": "failed", **json.loads((out / "failed.json").read_text())}
    return None


def _stale(out: Path, layers: tuple) -> bool:
    """True when a finished run was made with other task or method settings than ``layers`` resolve to now.

    Recipes live outside the run folder's name (a model's ``erase.yaml``, method defaults), so a changed
    recipe must not silently read back runs of the old one. Only keys both configs have are compared:
    an option added to the code later does not invalidate older runs.
    """
    import yaml

    from erase.config import resolve

    stored_file = out / "config.yaml"
    if not stored_file.is_file():
        return False
    try:
        now = resolve(*(dict(x) for x in layers))
    except Exception:  # noqa: BLE001 - a config that no longer resolves is reported by the rerun itself
        return True
    stored = yaml.safe_load(stored_file.read_text()) or {}
    current = yaml.safe_load(yaml.safe_dump(now.to_dict(), sort_keys=False))
    for section in (now.task_name, "method"):
        old, new = stored.get(section) or {}, current[section]
        if any(k in old and old[k] != v for k, v in new.items()):
            return True
    return False


def run_once(out: Path, method: str, task_layer: dict, method_layer: dict, seed: int, *,
             retry_failed: bool = False, keep_checkpoints: bool = False, dry: bool = False) -> dict:
    """Run one configuration into ``out`` unless it already finished (or failed); return its record.

    ``dry``: only report what exists (``status: missing`` otherwise).
    """
    from erase.config import resolve
    from erase.runner import run

    out = Path(out)
    layers = ({"method": method, "output_dir": str(out), "seed": seed, "overwrite": True, "progress": False,
               "log_every": 50}, dict(task_layer), dict(method_layer), {})
    rec = read_run(out)
    if rec is not None and (rec["status"] == "done" or not retry_failed) and not _stale(out, layers):
        rec["cached"] = True
        return rec
    if dry:
        return {"path": str(out), "status": "missing"}
    (out / "failed.json").unlink(missing_ok=True)
    t0, load0 = time.perf_counter(), loadavg()
    try:
        resolved = resolve(*(dict(x) for x in layers))
        metrics = run(resolved).metrics
        if not _finite_metrics(metrics):
            raise FloatingPointError(f"non-finite metrics: { {k: metrics.get(k) for k in METRIC_KEYS} }")
    except Exception as err:  # noqa: BLE001 - any failure of one run is recorded, the benchmark goes on
        out.mkdir(parents=True, exist_ok=True)
        (out / "run.json").unlink(missing_ok=True)
        info = {"method": method, "seed": seed, "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc(limit=6)[-3000:], "wall_s": round(time.perf_counter() - t0, 2),
                "task": task_layer, "method_config": method_layer}
        atomic_write_json(info, out / "failed.json")
        return {"path": str(out), "status": "failed", "cached": False, **info}
    finally:
        if not keep_checkpoints:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
    atomic_write_json({"wall_s": round(time.perf_counter() - t0, 2), "loadavg_start": load0, "loadavg_end": loadavg(),
                       "torch_threads": torch.get_num_threads()}, out / "bench.json")
    rec = read_run(out)
    rec["cached"] = False
    return rec


def mean_std(values) -> tuple[float | None, float | None]:
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return None, None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)


def fmt_pm(mean: float | None, std: float | None, digits: int = 2) -> str:
    if mean is None:
        return "—"
    if std is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def fmt_duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min"
