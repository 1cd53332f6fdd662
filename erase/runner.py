"""Run one resolved configuration end to end: task -> model -> method -> engine -> outputs.

Outputs (all written atomically, none into the base model's folder):
``config.yaml`` (resolved), ``model.safetensors`` + ``config.json`` (the unlearned model),
``metrics.json``, ``report.md``, ``log.jsonl``, ``run.json`` (timings; marks the run finished),
``checkpoints/step-N/`` (for ``--resume``).
"""

from __future__ import annotations

import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from accelerate.utils.environment import get_int_from_env

from erase.config import Resolved, diff_configs, load_yaml, task_registry
from erase.engine import LoopSettings, RunContext, run_method
from erase.engine.checkpoint import latest_checkpoint
from erase.errors import EraseError
from erase.storage import ZOO_DIR, atomic_write_json, atomic_write_text, check_writable_dir

RUN_OUTPUTS = ("checkpoints", "attacks", "model.safetensors", "config.json", "config.yaml", "metrics.json", "report.md",
               "log.jsonl", "run.json", "saliency_mask.safetensors", "saliency_density.md", "model", "delta.safetensors",
               "grid.png", "README.md")


@dataclass
class RunResult:
    output_dir: Path
    metrics: dict   # what metrics.json holds ({} on processes other than the main one)
    info: dict      # what run.json holds (timings, steps, machine)


def default_output_dir(r: Resolved) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in r.task.label()).strip("-")
    return Path("runs") / f"{r.method_cls.name}-{safe}"


def prepare_output_dir(out: Path, r: Resolved) -> None:
    finished = (out / "run.json").is_file()
    interrupted = (out / "checkpoints").is_dir() and not finished
    base = r.task.base_model()
    for folder in (Path(base).expanduser(), ZOO_DIR / base) if base else ():
        if folder.is_dir() and (out.resolve() == folder.resolve() or folder.resolve() in out.resolve().parents):
            raise EraseError(f"--output-dir {out} is inside the base model's folder {folder}; "
                             "erase never writes into the base model")
    check_writable_dir(out, "--output-dir")  # a read-only disk fails here, before any model loads
    if r.run.resume:
        if finished:
            raise EraseError(f"{out} holds a finished run; nothing to resume (use --overwrite to redo it)")
        if latest_checkpoint(out / "checkpoints") is None:
            # Not an error: "--resume" in a restart script must also work for the first start.
            if get_int_from_env(["RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"], 0) == 0:  # once, before accelerate is up
                print(f"--resume: no checkpoint in {out}; starting a fresh run", file=sys.stderr)
            return
        saved = out / "config.yaml"
        changed = diff_configs(load_yaml(str(saved)), r.to_dict()) if saved.is_file() else []
        if changed:  # steps before and after the checkpoint would have run under different settings
            shown = "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")
            raise EraseError(f"--resume: the run in {out} was started with other settings ({shown}); "
                             "resume with the original flags, or start over with --overwrite")
        return
    if (finished or interrupted) and not r.run.overwrite:
        what = "a finished run" if finished else "an interrupted run (continue it with --resume)"
        raise EraseError(f"{out} already holds {what}; pass --overwrite to replace it or choose another --output-dir")
    if r.run.overwrite:
        for name in RUN_OUTPUTS:
            p = out / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def run(r: Resolved) -> RunResult:
    """Run ``r`` end to end; return the output folder and the metrics it wrote."""
    out = Path(r.run.output_dir) if r.run.output_dir else default_output_dir(r)
    r.run.output_dir = str(out)
    prepare_output_dir(out, r)
    accelerator = _accelerator(r, out)
    method = r.method_cls(r.method)
    task = task_registry()[r.task_name][1](r.task, seed=r.run.seed, device=accelerator.device, streams=method.streams)
    method.check_task(task)
    model = task.build_model(from_scratch=method.from_scratch, text_encoder=method.trains_text_encoder).to(accelerator.device)
    if accelerator.is_main_process:
        task.before_training(model, out)  # e.g. the base model's images for the before/after grid
    ctx = RunContext(accelerator=accelerator, model=model, task=task, views=task.views, output_dir=out,
                     seed=r.run.seed, grad_accum=r.run.grad_accum)
    settings = LoopSettings(checkpoint_every=r.run.checkpoint_every, keep_checkpoints=r.run.keep_checkpoints,
                            log_every=r.run.log_every, resume=r.run.resume, progress=r.run.progress)
    result = run_method(method, ctx, settings)
    accelerator.wait_for_everyone()
    metrics, info = {}, {}
    if accelerator.is_main_process:
        metrics, info = _finish(r, task, method, accelerator.unwrap_model(ctx.model), result, accelerator, out)
    accelerator.end_training()
    return RunResult(out, metrics, info)


def _accelerator(r: Resolved, out: Path):
    accelerator = Accelerator(
        cpu=not _has_accelerator(),  # accelerate only sets up multi-process CPU (gloo) runs when told cpu=True
        gradient_accumulation_steps=r.run.grad_accum,
        mixed_precision=r.run.mixed_precision,
        log_with=None if r.run.report_to == "none" else r.run.report_to,
        project_dir=str(out),
    )
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        r.save(out / "config.yaml")
    accelerator.wait_for_everyone()
    if r.run.report_to != "none":
        accelerator.init_trackers("erase", config=_flat(r.to_dict()))
    set_seed(r.run.seed)
    return accelerator


def _finish(r: Resolved, task, method, model, result: dict, accelerator, out: Path) -> tuple[dict, dict]:
    """Save the model, evaluate it and write the reports; run.json last, as the mark of a finished run."""
    task.save_model(model, out)
    t_eval = time.perf_counter()
    metrics = task.evaluate(model, accelerator.device)
    metrics["eval_s"] = round(time.perf_counter() - t_eval, 2)
    metrics["method"] = method.name
    atomic_write_json(metrics, out / "metrics.json")
    info = {"method": method.name, "task": r.task_name,
            **{k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()},
            "machine": machine_description(accelerator), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    atomic_write_text(run_report(r, metrics, info), out / "report.md")
    task.write_artifacts(out, r.to_dict(), metrics, info)
    atomic_write_json(info, out / "run.json")
    return metrics, info


def _has_accelerator() -> bool:
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return bool(torch.cuda.is_available() or (mps and mps.is_available()) or (xpu and xpu.is_available()))


def machine_description(accelerator=None) -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} GPU)"
    procs = f", {accelerator.num_processes} processes" if accelerator and accelerator.num_processes > 1 else ""
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads{procs}"


def run_report(r: Resolved, metrics: dict, info: dict) -> str:
    rows = [f"| {k} | {v} |" for k, v in metrics.items() if isinstance(v, (int, float))]
    return "\n".join([
        f"# {info['method']} on {r.task_name}", "",
        f"- wall time: {info['total_s']:.1f} s (setup {info['setup_s']:.1f} s) for {info['steps']} steps on {info['machine']}",
        "- config: `config.yaml`; training log: `log.jsonl`", "",
        "| metric | value |", "|---|---:|", *rows, "",
    ])


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
