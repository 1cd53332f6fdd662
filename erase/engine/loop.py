"""The one training loop every method runs on (minGPT-style: it knows nothing about the model).

Features: accelerate for devices, DDP, mixed precision and gradient accumulation; named loss
terms weighted from the config and logged; masked steps that keep frozen coordinates bit-exact;
step-named checkpoints and exact resume; a NaN/inf guard that names the last good checkpoint;
phases declared by the method.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from erase.engine.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from erase.engine.context import RunContext
from erase.engine.masking import ParameterMask
from erase.engine.method import Method
from erase.engine.optim import build_optimizer, lr_factor
from erase.engine.streams import Stream, move_to
from erase.errors import EraseError, NonFiniteLossError


@dataclass
class LoopSettings:
    checkpoint_every: int = 0       # optimiser steps between checkpoints (0: only at phase ends)
    keep_checkpoints: int = 2
    log_every: int = 10
    resume: bool = False
    progress: bool = True


def _step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 1_009 + micro * 31 + rank) % 2**62


def run_method(method: Method, ctx: RunContext, settings: LoopSettings) -> dict:
    """Run ``method`` on ``ctx.model`` in place; return timing and step counts."""
    acc = ctx.accelerator
    cfg = method.config
    ckpt_root = ctx.output_dir / "checkpoints"
    if acc.is_main_process:
        ctx.output_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ctx.progress = settings.progress and acc.is_local_main_process

    missing = [s for s in method.streams if s not in ctx.views]
    if missing:
        raise EraseError(f"method {method.name!r} needs data stream(s) {missing} that task {ctx.task.name!r} cannot supply")
    for s in method.streams:
        if len(ctx.views[s]) == 0:
            raise EraseError(f"method {method.name!r} needs a non-empty {s!r} set")

    method.setup(ctx)
    masks = method.parameter_masks(ctx)
    masker = ParameterMask(ctx.model, masks) if masks else None
    method.apply(ctx)
    phases = method.phases(ctx)
    timings["setup_s"] = time.perf_counter() - t0

    total = sum(p.steps for p in phases)
    ctx.total_steps = total
    result = {"steps": total, "phases": [{"name": p.name, "steps": p.steps} for p in phases]}
    if total == 0:
        method.finalize(ctx)
        timings["total_s"] = time.perf_counter() - t0
        return {**result, **timings}

    weights = method.weights()
    model = acc.prepare(ctx.model)
    ctx.model = model
    optimizers = {}
    for p in phases:  # one optimiser per key, created up front so a resume can restore all of them
        if p.optimizer not in optimizers:
            wd = cfg.weight_decay if p.weight_decay is None else p.weight_decay
            optimizers[p.optimizer] = acc.prepare(
                build_optimizer(model.parameters(), cfg.optimizer, cfg.lr, cfg.momentum, wd))
    streams = {
        name: Stream(ctx.views[name], cfg.batch_size, ctx.seed, name, acc.process_index, acc.num_processes)
        for name in sorted({s for p in phases for s in p.streams})
    }

    start = 0
    if settings.resume and (ck := latest_checkpoint(ckpt_root)) is not None:
        state = load_checkpoint(ck, acc.unwrap_model(model), optimizers)
        start = int(state["step"])
        for name, s in state.get("streams", {}).items():
            if name in streams:
                streams[name].load_state_dict(s)
        ctx.state.update(state.get("method_state", {}))
        acc.print(f"resumed from {ck} at step {start}/{total}")
    last_good = str(latest_checkpoint(ckpt_root) or "none yet; the base model is untouched")

    def checkpoint(step: int) -> None:
        nonlocal last_good
        acc.wait_for_everyone()
        if acc.is_main_process:
            path = save_checkpoint(ckpt_root, step, acc.unwrap_model(model), optimizers,
                                   {"streams": {n: s.state_dict() for n, s in streams.items()},
                                    "method_state": _jsonable(ctx.state)}, settings.keep_checkpoints)
            last_good = str(path)
        acc.wait_for_everyone()

    log_file = ctx.output_dir / "log.jsonl"
    bar = tqdm(total=total, initial=start, disable=not (settings.progress and acc.is_local_main_process),
               desc=method.name, dynamic_ncols=True)
    step = 0
    t_train = time.perf_counter()
    try:
        for phase in phases:
            phase_start, step = step, step + phase.steps
            if step <= start:
                continue
            ctx.phase = phase.name
            model.train(phase.train_mode)
            optimizer = optimizers[phase.optimizer]
            first = max(start - phase_start, 0)
            if first == 0 and phase.on_start is not None:
                ctx.global_step = phase_start
                torch.manual_seed(_step_seed(ctx.seed, phase_start, -1, 0))  # same on every rank: edits weights
                phase.on_start(ctx)
            step_mask = masker
            if phase.masks is not None:
                step_mask = ParameterMask(acc.unwrap_model(model), phase.masks)
            base_lr = (cfg.lr if phase.lr is None else phase.lr) * phase.lr_scale
            for i in range(first, phase.steps):
                global_step = phase_start + i
                ctx.global_step = global_step
                if phase.lr_at is not None:
                    lr = phase.lr_at(i)
                elif phase.schedule:
                    lr = base_lr * lr_factor(phase.schedule, i, phase.steps)
                else:
                    lr = base_lr * lr_factor(cfg.lr_schedule, global_step, total, cfg.warmup_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                logged: dict[str, float] = {}
                for micro in range(ctx.grad_accum):
                    torch.manual_seed(_step_seed(ctx.seed, global_step, micro, acc.process_index))
                    batch = {s: move_to(streams[s].next(), acc.device) for s in phase.streams}
                    with acc.accumulate(model):
                        terms = method.losses(batch, ctx)
                        unknown = set(terms) - set(weights)
                        if unknown:
                            raise RuntimeError(f"{method.name} returned loss terms {sorted(unknown)} without weights")
                        loss = sum(weights[k] * v for k, v in terms.items())
                        bad = [k for k, v in terms.items() if not torch.isfinite(v.detach()).all()]
                        if bad or not torch.isfinite(loss.detach()):
                            raise NonFiniteLossError(
                                f"loss term(s) {bad or ['total']} became non-finite at step {global_step} "
                                f"(phase {phase.name}, lr {lr:.3g}); last good checkpoint: {last_good}. "
                                "Lower --lr or add --max-grad-norm, then rerun with --resume.")
                        acc.backward(loss)
                        if acc.sync_gradients:
                            if step_mask is not None:
                                step_mask.mask_grads()
                            if cfg.max_grad_norm > 0:
                                acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                        optimizer.step()
                        if acc.sync_gradients and step_mask is not None:
                            step_mask.restore()
                        optimizer.zero_grad(set_to_none=True)
                    for k, v in terms.items():
                        logged[k] = logged.get(k, 0.0) + float(v.detach()) / ctx.grad_accum
                    logged["loss"] = logged.get("loss", 0.0) + float(loss.detach()) / ctx.grad_accum
                method.after_step(ctx)  # ctx.global_step is still the step just taken
                done = global_step + 1
                ctx.global_step = done
                bar.update(1)
                if done % max(settings.log_every, 1) == 0 or done == total:
                    record = {"step": done, "phase": phase.name, "lr": lr, **logged}
                    bar.set_postfix({k: f"{v:.3g}" for k, v in logged.items()})
                    acc.log(record, step=done)
                    if acc.is_main_process:
                        with open(log_file, "a") as f:
                            f.write(json.dumps(record) + "\n")
                if (settings.checkpoint_every and done % settings.checkpoint_every == 0) or i == phase.steps - 1:
                    checkpoint(done)
            if phase.masks is not None:
                step_mask.release()
    finally:
        bar.close()
    timings["train_s"] = time.perf_counter() - t_train
    ctx.model = acc.unwrap_model(model)
    method.finalize(ctx)
    timings["total_s"] = time.perf_counter() - t0
    return {**result, **timings}


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        try:
            json.dumps(v)
            out[k] = v
        except TypeError:
            continue  # tensors/modules are rebuilt by setup(); only plain values are resumable state
    return out


def finished_marker(output_dir: Path) -> Path:
    return output_dir / "run.json"
