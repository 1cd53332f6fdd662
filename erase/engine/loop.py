"""The one training loop every method runs on (minGPT-style: it knows nothing about the model).

Features: accelerate for devices, DDP, mixed precision and gradient accumulation; named loss
terms weighted from the config and logged; masked steps that keep frozen coordinates bit-exact;
step-named checkpoints and exact resume; a NaN/inf guard that names the step and the last
checkpoint known to be good; phases declared by the method.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from erase.engine.checkpoint import Checkpointer
from erase.engine.context import RunContext
from erase.engine.masking import ParameterMask
from erase.engine.method import Method, Phase
from erase.engine.optim import build_optimizer, lr_factor
from erase.engine.streams import Stream, move_to
from erase.errors import EraseError, NonFiniteLossError
from erase.storage import atomic_write_text


@dataclass
class LoopSettings:
    checkpoint_every: int = 0       # optimiser steps between checkpoints (0: only at phase ends)
    keep_checkpoints: int = 2
    log_every: int = 10
    resume: bool = False
    progress: bool = True


@dataclass
class Plan:
    """What a method asked for, resolved before the first step."""

    phases: list[Phase]
    total: int
    masker: ParameterMask | None
    weights: dict[str, float] = field(default_factory=dict)

    def spans(self):
        """(phase, index of its first global step) in order."""
        start = 0
        for p in self.phases:
            yield p, start
            start += p.steps


def lr_curve(phase: Phase, cfg, phase_start: int, total: int) -> Callable[[int], float]:
    """The learning rate at the phase's i-th step: the one place a step's learning rate comes from."""
    if phase.lr_at is not None:
        return phase.lr_at
    base = (cfg.lr if phase.lr is None else phase.lr) * phase.lr_scale
    if phase.schedule:
        return lambda i: base * lr_factor(phase.schedule, i, phase.steps)
    return lambda i: base * lr_factor(cfg.lr_schedule, phase_start + i, total, cfg.warmup_steps)


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 1_009 + micro * 31 + rank) % 2**62


class Trainer:
    """Runs one method on ``ctx.model`` in place: plan, prepare, resume, phases of steps, finalize."""

    def __init__(self, method: Method, ctx: RunContext, settings: LoopSettings):
        self.method, self.ctx, self.settings = method, ctx, settings
        self.acc = ctx.accelerator
        self.cfg = method.config
        self.log_file = ctx.output_dir / "log.jsonl"

    # -- the loop on one screen --------------------------------------------------------------------
    def run(self) -> dict:
        t0 = time.perf_counter()
        plan = self.plan()
        result = {"steps": plan.total, "phases": [{"name": p.name, "steps": p.steps} for p in plan.phases],
                  "setup_s": time.perf_counter() - t0}
        if plan.total:
            self.prepare(plan)
            start = self.resume()
            t_train = time.perf_counter()
            bar = tqdm(total=plan.total, initial=start, desc=self.method.name, dynamic_ncols=True,
                       disable=not self.ctx.progress)
            try:
                for phase, phase_start in plan.spans():
                    if self.ctx.stop_reason:
                        break
                    if phase_start + phase.steps > start:
                        self.run_phase(plan, phase, phase_start, max(start - phase_start, 0), bar)
            finally:
                bar.close()
            result["train_s"] = time.perf_counter() - t_train
            if self.ctx.stop_reason:
                result.update(stopped=self.ctx.stop_reason, stopped_at=self.ctx.global_step)
            self.ctx.model = self.acc.unwrap_model(self.model)
        self.method.finalize(self.ctx)
        result["total_s"] = time.perf_counter() - t0
        return result

    # -- before the first step ---------------------------------------------------------------------
    def check_streams(self) -> None:
        m, ctx = self.method, self.ctx
        missing = [s for s in m.streams if s not in ctx.views]
        if missing:
            raise EraseError(f"method {m.name!r} needs data stream(s) {missing} that task {ctx.task.name!r} cannot supply")
        for s in m.streams:
            if len(ctx.views[s]) == 0:
                raise EraseError(f"method {m.name!r} needs a non-empty {s!r} set")

    def plan(self) -> Plan:
        m, ctx = self.method, self.ctx
        if self.acc.is_main_process:
            ctx.output_dir.mkdir(parents=True, exist_ok=True)
        ctx.progress = self.settings.progress and self.acc.is_local_main_process
        m.setup(ctx)  # may add a view the method builds itself (e.g. ca's anchor images)
        self.check_streams()
        masks = m.parameter_masks(ctx)
        masker = ParameterMask(ctx.model, masks) if masks else None
        m.apply(ctx)
        phases = m.phases(ctx)
        ctx.total_steps = sum(p.steps for p in phases)
        return Plan(phases, ctx.total_steps, masker, m.weights() if ctx.total_steps else {})

    def prepare(self, plan: Plan) -> None:
        """Wrap the model, build one optimiser per key up front (so a resume restores all), open the streams."""
        acc, cfg, ctx = self.acc, self.cfg, self.ctx
        self.model = ctx.model = acc.prepare(ctx.model)
        self.optimizers = {}
        for p in plan.phases:
            if p.optimizer not in self.optimizers:
                wd = cfg.weight_decay if p.weight_decay is None else p.weight_decay
                self.optimizers[p.optimizer] = acc.prepare(
                    build_optimizer(self.model.parameters(), cfg.optimizer, cfg.lr, cfg.momentum, wd))
        self.streams = {
            name: Stream(ctx.views[name], cfg.batch_size, ctx.seed, name, acc.process_index, acc.num_processes)
            for name in sorted({s for p in plan.phases for s in p.streams})
        }
        self.checkpoints = Checkpointer(ctx.output_dir / "checkpoints", self.settings.keep_checkpoints,
                                        acc.is_main_process)

    def resume(self) -> int:
        """The step to start from: 0, or the latest good checkpoint's step when resuming."""
        if not self.settings.resume:
            return 0
        ck = self.checkpoints.latest()
        if ck is None:  # the runner has said so already: "--resume" also serves a first start
            return 0
        state = self.checkpoints.load(ck, self.acc.unwrap_model(self.model), self.optimizers)
        start = int(state["step"])
        for name, s in state.get("streams", {}).items():
            if name in self.streams:
                self.streams[name].load_state_dict(s)
        self.ctx.state.update(state.get("method_state", {}))
        self.ctx.stop_reason = self.ctx.state.get("stop_reason", "")
        self.ctx.global_step = start
        if self.acc.is_main_process:
            self._truncate_log(start)
        self.acc.print(f"resumed from {ck} at step {start}/{self.ctx.total_steps}")
        return start

    def _truncate_log(self, step: int) -> None:
        """Drop log lines written after the checkpoint, so a resumed run does not log those steps twice."""
        if self.log_file.is_file():
            kept = [line for line in self.log_file.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= step]
            atomic_write_text("".join(line + "\n" for line in kept), self.log_file)

    # -- the steps ---------------------------------------------------------------------------------
    def run_phase(self, plan: Plan, phase: Phase, phase_start: int, first: int, bar) -> None:
        ctx, acc = self.ctx, self.acc
        ctx.phase = phase.name
        self.model.train(phase.train_mode)
        optimizer = self.optimizers[phase.optimizer]
        if first == 0 and phase.on_start is not None:
            ctx.global_step = phase_start
            torch.manual_seed(step_seed(ctx.seed, phase_start, -1, 0))  # same on every rank: edits weights
            phase.on_start(ctx)
        masker = plan.masker
        if phase.masks is not None:
            masker = ParameterMask(acc.unwrap_model(self.model), phase.masks)
        lr_at = lr_curve(phase, self.cfg, phase_start, plan.total)
        for i in range(first, phase.steps):
            ctx.global_step = phase_start + i
            lr = lr_at(i)
            logged = self.step(plan, phase, optimizer, masker, lr)
            self.method.after_step(ctx)  # ctx.global_step is still the step just taken
            done = ctx.global_step = phase_start + i + 1
            bar.update(1)
            if done % max(self.settings.log_every, 1) == 0 or done == plan.total:
                self.log({"step": done, "phase": phase.name, "lr": lr, **logged}, bar)
            every = self.settings.checkpoint_every
            stop = bool(ctx.stop_reason)
            if (every and done % every == 0) or i == phase.steps - 1 or stop:
                self.checkpoint(done)
            if stop:
                if done % max(self.settings.log_every, 1) and done != plan.total:
                    self.log({"step": done, "phase": phase.name, "lr": lr, **logged}, bar)
                break
        if phase.masks is not None:
            masker.release()

    def step(self, plan: Plan, phase: Phase, optimizer, masker: ParameterMask | None, lr: float) -> dict[str, float]:
        """One optimiser step over ``grad_accum`` micro-batches; the logged loss terms."""
        ctx, acc, method = self.ctx, self.acc, self.method
        for group in optimizer.param_groups:
            group["lr"] = lr
        logged: dict[str, float] = {}
        for micro in range(ctx.grad_accum):
            torch.manual_seed(step_seed(ctx.seed, ctx.global_step, micro, acc.process_index))
            batch = {s: move_to(self.streams[s].next(), acc.device) for s in phase.streams}
            with acc.accumulate(self.model):
                terms = method.losses(batch, ctx)
                unknown = set(terms) - set(plan.weights)
                if unknown:
                    raise RuntimeError(f"{method.name} returned loss terms {sorted(unknown)} without weights")
                loss = sum(plan.weights[k] * v for k, v in terms.items())
                self.guard(terms, loss, phase, lr)
                acc.backward(loss)
                if acc.sync_gradients:
                    if masker is not None:
                        masker.mask_grads()
                    if self.cfg.max_grad_norm > 0:
                        acc.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
                optimizer.step()
                if acc.sync_gradients and masker is not None:
                    masker.restore()
                optimizer.zero_grad(set_to_none=True)
            for k, v in terms.items():
                logged[k] = logged.get(k, 0.0) + float(v.detach()) / ctx.grad_accum
            logged["loss"] = logged.get("loss", 0.0) + float(loss.detach()) / ctx.grad_accum
        return logged

    def guard(self, terms: dict[str, torch.Tensor], loss: torch.Tensor, phase: Phase, lr: float) -> None:
        """Stop on a non-finite loss, naming the step (as log.jsonl counts it) and the last good checkpoint.

        A finite loss on the weights of the newest checkpoint confirms that checkpoint; a non-finite one
        marks it bad (its weights already diverged), so ``--resume`` goes back to the one before.
        """
        bad = [k for k, v in terms.items() if not torch.isfinite(v.detach()).all()]
        if not bad and torch.isfinite(loss.detach()):
            self.checkpoints.confirm()
            return
        step = self.ctx.global_step + 1
        rejected = self.checkpoints.reject_pending()
        good = self.checkpoints.last_good
        what = (f"the loss term(s) {bad or ['total']} became non-finite at step {step} "
                f"(phase {phase.name}, lr {lr:.3g})")
        if rejected is not None:
            what += f"; checkpoint {rejected.name} already held diverged weights and was set aside as {rejected}"
        if good is None:
            raise NonFiniteLossError(f"{what}; no good checkpoint was written, the base model is untouched. "
                                     "Lower --lr or add --max-grad-norm, then rerun with --overwrite.")
        raise NonFiniteLossError(f"{what}; last good checkpoint: {good}. "
                                 "Lower --lr or add --max-grad-norm, then rerun with --resume.")

    # -- outputs -----------------------------------------------------------------------------------
    def log(self, record: dict, bar) -> None:
        bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k not in ("step", "phase", "lr")})
        self.acc.log(record, step=record["step"])
        if self.acc.is_main_process:
            with open(self.log_file, "a") as f:
                f.write(json.dumps(record) + "\n")

    def checkpoint(self, step: int) -> None:
        self.acc.wait_for_everyone()
        model = self.acc.unwrap_model(self.model)
        nonfinite = [n for n, p in model.named_parameters() if not torch.isfinite(p.detach()).all()]
        if nonfinite:
            raise NonFiniteLossError(
                f"parameter {nonfinite[0]} (and {len(nonfinite) - 1} more) became non-finite by step {step}; "
                f"not saved. Last good checkpoint: {self.checkpoints.last_good or 'none (the base model is untouched)'}. "
                "Lower --lr or add --max-grad-norm.")
        self.checkpoints.save(step, model, self.optimizers,
                              {"streams": {n: s.state_dict() for n, s in self.streams.items()},
                               "method_state": _jsonable(self.ctx.state)})
        self.acc.wait_for_everyone()


def run_method(method: Method, ctx: RunContext, settings: LoopSettings) -> dict:
    """Run ``method`` on ``ctx.model`` in place; return timing and step counts."""
    return Trainer(method, ctx, settings).run()


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        try:
            json.dumps(v)
            out[k] = v
        except TypeError:
            continue  # tensors/modules are rebuilt by setup(); only plain values are resumable state
    return out
