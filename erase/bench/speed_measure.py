"""The speed benchmark's measurements: one closed-form edit or one optimiser step, timed, through the task adapter.

Shared by every family (``erase.bench.speed`` for SD-1.4, ``erase.bench.speed_fullsize`` for SDXL and
SD3); what each phase contains is in ``erase/bench/speed.py``'s docstring. ``measure_step`` re-states
the engine's inner loop (``erase.engine.loop.Trainer.step``) for one step; with ``bf16`` it goes through
accelerate exactly as the runner does with ``--mixed-precision bf16``: an ``Accelerator(mixed_precision=
"bf16")`` prepares the model (its forward then runs under ``torch.autocast(dtype=bfloat16)``, on CPU as
on GPU) and the optimiser, and ``accelerator.backward`` takes the loss. Which dtypes the denoiser's first
linear layer actually produced during the timed step is recorded (``autocast_dtypes``), so a bf16
measurement shows that autocast was on.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from erase.diffusion.task import DiffusionConfig, DiffusionTask
from erase.engine import RunContext
from erase.engine.masking import ParameterMask, trainable_coordinates
from erase.engine.optim import build_optimizer
from erase.engine.streams import Stream, move_to
from erase.methods import get_method
from erase.methods._closed_form import uce_edit, uce_map
from erase.methods.rece import RECE, RECEConfig
from erase.methods.uce import UCE, UCEConfig, kv_projections, pooled_projections

ESD_DDIM_STEPS = 50
ESD_MEAN_STOP = 24  # ESD draws the partial-sampling stop uniformly from 0..49
LORA_RANK = 4


def rss_gb() -> float:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError):
        return float("nan")


def peak_rss_gb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes on macOS, KiB on Linux


def _task(model_dir: Path, concept: str = "garbage truck", gradient_checkpointing: bool = False,
          streams: tuple[str, ...] = (), resolution: int = 0, lora_rank: int = 0):
    cfg = DiffusionConfig(model=str(model_dir), concept=concept, n_forget=1, n_retain=1, sample_steps=2,
                          eval_images=1, gradient_checkpointing=gradient_checkpointing, resolution=resolution,
                          lora_rank=lora_rank)
    return DiffusionTask(cfg, streams=streams)


def accelerator(mixed_precision: str = "no"):
    """An Accelerator as the runner builds it (``cpu`` without a GPU) with ``mixed_precision``."""
    # lazy: accelerate pulls in torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state.get("_mixed_precision", mixed_precision) != mixed_precision:
        # accelerate keeps one process-wide state; only the in-process (test) runs switch precision between
        # measurements (each measurement's own process starts fresh)
        AcceleratorState._reset_state()
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision)


def _ctx(task, model, out: Path, mixed_precision: str = "no"):
    return RunContext(accelerator=accelerator(mixed_precision), model=model, task=task, views=task.views,
                      output_dir=out, seed=0, progress=False)


class Clock:
    def __init__(self):
        self.times: dict[str, float] = {}

    def __call__(self, name: str):
        clock = self

        class _Span:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                clock.times[name] = round(time.perf_counter() - self.t, 4)

        return _Span()


def measure_uce(model_dir: Path, out: Path, n: int, resolution: int = 0) -> dict:
    clock = Clock()
    names = [f"concept {i}" for i in range(n)]
    with clock("load_s"):
        task = _task(model_dir, ",".join(names), resolution=resolution)  # several concepts at once
        model = task.build_model(False)
    rss_loaded = rss_gb()
    method = UCE(UCEConfig())
    method.check_task(task)
    layers = kv_projections(task.layer_map(model), model, method.config.edit)
    with clock("encode_s"):
        erase, guide, keep, n_preserve = method.uce_rows(task)
    cfg, ps = method.config, method.effective_preserve_scale(n_preserve)
    with clock("solve_s"):
        method.edit_layers(layers, uce_map(erase, guide, keep, cfg.lamb, cfg.erase_scale, ps))
    with clock("per_layer_solve_s"):
        for _, lin in layers:
            uce_edit(lin.weight, erase, guide, keep, cfg.lamb, cfg.erase_scale, ps)
    pooled = pooled_projections(task.layer_map(model), model)
    if pooled:  # SD3 / FLUX: the same edit of the pooled text's embedder, as UCE.uce does
        with clock("pooled_s"):
            p_erase, p_guide, p_keep, p_n = method.pooled_rows(task)
            method.edit_layers(pooled, uce_map(p_erase, p_guide, p_keep, cfg.lamb, cfg.erase_scale,
                                               method.effective_preserve_scale(p_n)))
    with clock("save_s"):
        task.save_model(model, out)
    t = clock.times
    t["edit_s"] = round(t["encode_s"] + t["solve_s"] + t.get("pooled_s", 0.0), 4)
    t["load_to_saved_s"] = round(t["load_s"] + t["edit_s"] + t["save_s"], 4)
    return {"times": t, "main_s": t["edit_s"], "rss_loaded_gb": rss_loaded, "matrices": len(layers),
            "erase_rows": len(erase), "preserve_rows": len(keep)}


def measure_rece(model_dir: Path, out: Path) -> dict:
    clock = Clock()
    with clock("load_s"):
        task = _task(model_dir)
        model = task.build_model(False)
    rss_loaded = rss_gb()
    method = RECE(RECEConfig(epochs=1))
    method.check_task(task)
    with clock("edit_s"):
        method.apply(_ctx(task, model, out))
    return {"times": clock.times, "main_s": clock.times["edit_s"], "rss_loaded_gb": rss_loaded}


def _seed_for_stop(stop: int) -> int:
    """A seed under which ESD's first draw, randint(0, ddim_steps), is ``stop``."""
    for seed in range(100_000):
        torch.manual_seed(seed)
        if int(torch.randint(0, ESD_DDIM_STEPS, (1,))) == stop:
            return seed
    raise RuntimeError(f"no seed draws stop {stop}")


def watch_dtypes(model: torch.nn.Module) -> tuple[set[str], object]:
    """The output dtypes of ``model``'s first linear layer, as they come (and the hook's handle)."""
    seen: set[str] = set()
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    handle = first.register_forward_hook(lambda _m, _i, out: seen.add(str(out.dtype).removeprefix("torch.")))
    return seen, handle


def measure_step(model_dir: Path, out: Path, name: str, gradient_checkpointing: bool, bf16: bool = False,
                 lora: bool = False, resolution: int = 0, esd_iter: bool = True) -> dict:
    clock = Clock()
    cls = get_method(name, "diffusion")
    with clock("load_s"):
        task = _task(model_dir, gradient_checkpointing=gradient_checkpointing, streams=cls.streams,
                     resolution=resolution, lora_rank=LORA_RANK if lora else 0)
        model = task.build_model(False)
    rss_loaded = rss_gb()
    cfg = cls.Config(**{**cls.task_defaults.get("diffusion", {}), "batch_size": 1})
    if hasattr(cfg, "ddim_steps"):
        cfg.ddim_steps = ESD_DDIM_STEPS
    method = cls(cfg)
    method.check_task(task)
    ctx = _ctx(task, model, out, "bf16" if bf16 else "no")
    with clock("setup_s"):
        method.setup(ctx)
        masks = method.parameter_masks(ctx)
        masker = ParameterMask(model, masks) if masks else None
    params = dict(model.named_parameters())
    trainable = (sum(trainable_coordinates(m, params[n]) for n, m in masks.items() if params[n].requires_grad) if masks
                 else sum(p.numel() for p in model.parameters() if p.requires_grad))
    del masks, params  # as in the engine (Trainer.plan): the masks are dropped once the masker has them
    optimizer = build_optimizer(model.parameters(), cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay)
    acc = ctx.accelerator
    if bf16:  # as the engine's Trainer.prepare: the forward of the prepared model runs under autocast
        ctx.model = acc.prepare(model)
        optimizer = acc.prepare(optimizer)
    seen, handle = watch_dtypes(model)  # after setup: ESD's teacher copy must not carry the hook
    weights = method.weights()
    streams = {s: Stream(task.views[s], cfg.batch_size, 0, s) for s in method.streams}
    model.train()

    def step(seed: int) -> None:  # the engine's inner loop (erase.engine.loop.Trainer.step) for one step
        torch.manual_seed(seed)
        batch = {s: move_to(streams[s].next(), ctx.device) for s in method.streams}
        terms = method.losses(batch, ctx)
        loss = sum(weights[k] * v for k, v in terms.items())
        if bf16:
            acc.backward(loss)
        else:
            loss.backward()
        if masker is not None:
            masker.mask_grads()
        optimizer.step()
        if masker is not None:
            masker.restore()
        optimizer.zero_grad(set_to_none=True)

    at_once = _seed_for_stop(0)
    with clock("warmup_s"):
        step(at_once)
    seen.clear()
    with clock("step_s"):
        step(at_once)
    handle.remove()
    if esd_iter and name.startswith("esd"):
        with clock("esd_iter_s"):
            step(_seed_for_stop(ESD_MEAN_STOP))
    record = {"times": clock.times, "main_s": clock.times["step_s"], "rss_loaded_gb": rss_loaded,
              "trainable_params": trainable, "gradient_checkpointing": gradient_checkpointing}
    if bf16 or lora:
        record.update(mixed_precision="bf16" if bf16 else "no", lora_rank=LORA_RANK if lora else 0,
                      autocast_dtypes=sorted(seen))
    return record


def run_in_child(argv: list[str], result: Path, timeout_s: float | None = None) -> dict:
    """``python -m erase.bench.speed ARGV`` in a fresh process (its own peak RSS); the record it wrote to
    ``result``, or an error naming how it ended (``timeout_s``: killed after that many seconds)."""
    cmd = [sys.executable, "-m", "erase.bench.speed", *argv]
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s or None)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:g} s (--timeout-s)", "process_s": round(time.perf_counter() - t0, 1)}
    if proc.returncode != 0 or not result.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        killed = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
        return {"error": f"exit {proc.returncode}{killed}: {tail[0]}", "process_s": round(time.perf_counter() - t0, 1)}
    record = json.loads(result.read_text())
    record["process_s"] = round(time.perf_counter() - t0, 1)
    return record
