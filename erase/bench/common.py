"""Shared plumbing of the benchmark commands: resumable, failure-tolerant runs, their costs and reports.

Every run goes through the ordinary runner (``erase.runner.run``) in this process, into its own
folder. A folder holding ``run.json`` is finished and is read back instead of rerun (so an
interrupted benchmark continues where it stopped); a run that raises (a non-finite loss, a
closed-form edit that produces NaN weights, ...) leaves ``failed.json`` with the error and the
benchmark goes on. ``bench.json`` beside ``run.json`` records the run's whole wall time (task
construction, training, evaluation) and the machine load around it.

The two classifier commands (``erase.bench.classifier`` and ``erase.bench.audit``) share more: the
settings (:class:`ClassifierSettings`) and their flags, the run log
(:class:`ClassifierRuns`) and the way results are written and announced.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from erase.config import resolve
from erase.errors import EraseError
from erase.methods import list_methods
from erase.runner import run
from erase.storage import atomic_write_json, atomic_write_text

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


def parse_method_overrides(items: list[str]) -> dict[str, dict]:
    """``["ssd.alpha=10", "salun.lr=3e-4"]`` -> {"ssd": {"alpha": 10}, "salun": {"lr": "3e-4"}}.

    Values are read as YAML scalars; the method's typed config coerces them when the run resolves.
    """
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
        if any(k in old and old[k] != v and not _inert(k, new) for k, v in new.items()):
            return True
    return False


def _inert(key: str, config: dict) -> bool:
    """A setting that cannot have changed the run: LoRA targets when no LoRA trained (their default became
    'the layer map's' without changing what a full-weight run does)."""
    return key == "lora_targets" and not config.get("lora_rank") and config.get("save_format") != "lora"


def run_once(out: Path, method: str, task_layer: dict, method_layer: dict, seed: int, *,
             retry_failed: bool = False, keep_checkpoints: bool = False, dry: bool = False) -> dict:
    """Run one configuration into ``out`` unless it already finished (or failed); return its record.

    ``dry``: only report what exists (``status: missing`` otherwise).
    """
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


# -- the classifier commands ---------------------------------------------------------------------

REFERENCE = "retrain"  # the gold standard every classifier benchmark compares with; never a method row


@dataclass
class ClassifierSettings:
    """What every classifier benchmark command is set by; each command adds its own plan.

    The first fields fix the original model (and every retrain): data, width, recipe. Then the
    budget scale, per-method ``--set`` overrides, where runs and results go, and how to resume.
    """

    dataset: str = "fashion-mnist"
    width: int = 8
    limit_train: int = 4000
    limit_test: int = 1500
    eval_max_retain: int = 1500
    epochs: float = 10.0
    augment: bool = False
    label_smoothing: float = 0.0
    epoch_scale: float = 0.1
    overrides: dict = field(default_factory=dict)
    out_dir: str = "runs/bench"  # each command names its own folders
    results: str = "results/bench"
    threads: int = 0
    retry_failed: bool = False
    report_only: bool = False

    def tag(self) -> str:
        """The folder name of this setup's runs: runs of another setup are never read back."""
        ds = self.dataset.replace("fashion-mnist", "fmnist")
        recipe = ("-aug" if self.augment else "") + (f"-ls{self.label_smoothing:g}" if self.label_smoothing else "")
        return f"{ds}-w{self.width}-n{self.limit_train}-t{self.limit_test}-r{self.eval_max_retain}-e{self.epochs:g}{recipe}"

    def recipe(self) -> dict:
        """The method layer of the original and of every retrain."""
        return {"epochs": self.epochs, "label_smoothing": self.label_smoothing}

    def task_layer(self, forget: str, split_seed: int = 0, original: str = "") -> dict:
        layer = {"dataset": self.dataset, "forget": forget, "split_seed": split_seed, "width": self.width,
                 "limit_train": self.limit_train, "limit_test": self.limit_test,
                 "eval_max_retain": self.eval_max_retain, "augment": self.augment}
        if original:
            layer["original"] = original
        return layer


def add_setup_flags(p: argparse.ArgumentParser, d: ClassifierSettings) -> None:
    """The flags that fix the original model; ``d`` gives the defaults shown."""
    p.add_argument("--width", type=int, help=f"ResNet-18 base width (default {d.width})")
    p.add_argument("--dataset", help=f"dataset (default {d.dataset})")
    p.add_argument("--limit-train", type=int, help=f"training images used (default {d.limit_train})")
    p.add_argument("--limit-test", type=int, help=f"test images used (default {d.limit_test})")
    p.add_argument("--eval-max-retain", type=int, help=f"retain images for RA; MIA uses every retain image (default {d.eval_max_retain})")
    p.add_argument("--epochs", type=float, help=f"epochs of the original and of retrain (default {d.epochs:g})")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="flip + shift augmentation in every training stream (default: off, so the original memorises "
                   "its training set as in the papers' setting)")
    p.add_argument("--label-smoothing", type=float, help=f"label smoothing of the original and retrain (default {d.label_smoothing:g})")


def add_run_flags(p: argparse.ArgumentParser, d: ClassifierSettings) -> None:
    """The budget, override, output and resume flags of a classifier command; ``d`` gives the defaults shown."""
    p.add_argument("--epoch-scale", type=float, help=f"multiplier on every method's default epochs (default {d.epoch_scale:g})")
    p.add_argument("--set", action="append", default=[], metavar="METHOD.FIELD=VALUE",
                   help="override a method's config field for every run of it, e.g. --set ssd.alpha=10 (repeatable)")
    p.add_argument("--out-dir", help=f"root of the run folders (default {d.out_dir})")
    p.add_argument("--results", help=f"output prefix (default {d.results})")
    p.add_argument("--threads", type=int, help="torch threads (default 0 = auto: every core on an idle machine, 1 on a "
                   "busy one, where two threads run ~10x slower)")
    p.add_argument("--retry-failed", action="store_true", help="rerun runs that failed before instead of reporting them")
    p.add_argument("--report-only", action="store_true", help="run nothing; rebuild the report from finished runs")


def apply_flags(s: ClassifierSettings, args: argparse.Namespace, skip: tuple[str, ...] = ()) -> None:
    """Copy every flag given onto the settings field of the same name (``skip``: those the caller parses); --set too."""
    for f in dataclasses.fields(s):
        value = getattr(args, f.name, None)
        if value is not None and f.name not in skip:
            setattr(s, f.name, value)
    s.overrides = parse_method_overrides(args.set)


def unlearning_methods(wanted: list[str] | None = None) -> list[str]:
    """The registered classifier methods (all of them, or ``wanted`` checked against them); never the reference."""
    names = [m for m in list_methods("classifier") if m != REFERENCE]
    unknown = [m for m in wanted or [] if m not in names]
    if unknown:
        raise EraseError(f"unknown classifier method(s) {unknown}; registered: {', '.join(names)}")
    return [m for m in names if m in wanted] if wanted else names


class ClassifierRuns:
    """One invocation of a classifier command: its clock, its log, and its runs under the settings' resume flags."""

    def __init__(self, s: ClassifierSettings):
        self.s = s
        self.root = Path(s.out_dir) / s.tag()
        self.t0 = time.perf_counter()
        self.n_new = 0  # runs trained (not read back) by this invocation
        self.n_read_back = 0  # finished runs of earlier invocations that this one reused

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.0f}s] {msg}", flush=True)

    def run(self, out: Path, method: str, task: dict, layer: dict, seed: int, label: str) -> dict:
        rec = run_once(out, method, task, layer, seed, retry_failed=self.s.retry_failed, dry=self.s.report_only)
        if rec["status"] == "done":
            r, m = rec["run"], rec["metrics"]
            cost = f"{r['total_s']:.1f}s unlearn, {r['steps']} steps"
            if "bench" in rec:
                cost += f", {rec['bench']['wall_s']:.1f}s wall"
            gaps = " ".join(f"{k}={m[k]:.1f}" for k in METRIC_KEYS if k in m)
            self.log(f"{label}: {'cached' if rec.get('cached') else 'done'} ({cost}) {gaps}")
            if not rec.get("cached"):
                self.n_new += 1
            else:
                self.n_read_back += 1
        elif rec["status"] == "failed":
            self.log(f"{label}: FAILED {rec.get('error', '')[:200]}")
        else:
            self.log(f"{label}: missing")
        return rec

    def original(self) -> dict:
        """The model every method starts from: the reference recipe with nothing forgotten."""
        return self.run(self.root / "original", REFERENCE, self.s.task_layer("none"), self.s.recipe(), 0, "original")

    def wall_s(self) -> float:
        return round(time.perf_counter() - self.t0, 1)


def pyplot():
    """matplotlib's pyplot on the file-only backend (benchmarks run on machines without a display)."""
    import matplotlib  # here, not at the top: only the figures need it, and --help should stay quick

    matplotlib.use("Agg")
    # lazy: matplotlib is slow to import and only plots need it
    import matplotlib.pyplot as plt

    return plt


def write_results(prefix: Path, data: dict, markdown: str, figure: str, plot: Callable[[Path], None]) -> None:
    """``<prefix>.json``, ``<prefix>.md`` and the figure ``<prefix><figure>``, each replaced whole."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(data, prefix.with_suffix(".json"))
    atomic_write_text(markdown, prefix.with_suffix(".md"))
    png = prefix.parent / f"{prefix.name}{figure}"
    tmp = png.with_suffix(".tmp.png")  # matplotlib picks the format from the name, so not atomic_path's
    plot(tmp)
    tmp.replace(png)


def print_results(results: str, figure: str, wall_s: float) -> None:
    """The report on stdout, then the files written."""
    print()
    print(Path(results).with_suffix(".md").read_text())
    print(f"written: {results}.json, {results}.md, {results}{figure} (this invocation {fmt_duration(wall_s)})")
