"""Gradient attacks through the engine: the optimised embedding is the engine's model (an embedding is a parameter too).

An attack that optimises by gradient describes one prompt's optimisation as an :class:`Objective`
(a loss on a batch of target latents, an optional projection after each step, an optional check
every ``check_every`` steps that may end the run) and calls :func:`optimise`. That builds a
``Method`` of one phase for the engine's ``run_method``, so the attack gets the engine's seeds per
step, Adam/AdamW, logging to ``log.jsonl``, the NaN guard, checkpoints and exact resume, and stops
early through ``RunContext.request_stop`` when the check says the concept is back. The loop runs on
``erase.engine.local.LocalAccelerator``: under ``accelerate launch`` each process attacks its own
prompts, so an embedding's gradients must never be averaged with another process's.

The parameter lives in a :class:`Parameter` module (nothing else is trainable: the frozen denoisers
and text encoder are closed over by the objective), so a checkpoint holds the embedding alone.
Each prompt gets its own run folder (``ctx.workdir/<case>``), so an interrupted attack continues
inside the prompt it was attacking.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from erase.attacks.base import Attack, AttackContext
from erase.engine import LoopSettings, RunContext, run_method
from erase.engine.local import LocalAccelerator
from erase.engine.method import Method, MethodConfig, Phase
from erase.engine.streams import DataView
from erase.engine.task import DenoisingTask
from erase.errors import EraseError
from erase.prompts import PromptRow
from erase.storage import slug


class Parameter(nn.Module):
    """The one tensor an attack optimises (an embedding, a relaxed one-hot matrix), as a module the engine trains."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.value = nn.Parameter(init.detach().clone().float())


class Tensors:
    """A dataset of equal-length tensors (``get_batch`` -> dict), for the engine's streams."""

    def __init__(self, **tensors: torch.Tensor):
        lengths = {len(t) for t in tensors.values()}
        if len(lengths) != 1:
            raise ValueError(f"tensors of different lengths: { {k: len(v) for k, v in tensors.items()} }")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def get_batch(self, indices: torch.Tensor) -> dict:
        return {k: v[indices] for k, v in self.tensors.items()}


@dataclass
class Objective:
    """One prompt's optimisation: what the engine runs.

    ``loss(batch, value, step)`` -> scalar (``value`` is the parameter; ``step`` the global step, 0-based);
    ``project(value)`` edits the parameter in place after each step (under ``no_grad``);
    ``check(value)`` -> True when the attack has already succeeded (runs every ``check_every`` steps and
    after the last one); ``data`` the stream (target latents, training images).
    """

    data: Tensors
    steps: int
    lr: float
    loss: Callable[[dict, torch.Tensor, int], torch.Tensor]
    optimizer: str = "adam"
    weight_decay: float = 0.0
    batch_size: int = 1
    project: Callable[[torch.Tensor], None] | None = None
    check: Callable[[torch.Tensor], bool] | None = None
    check_every: int = 0


class _AttackMethod(Method):
    name = "attack"
    streams = ("target",)
    default_weights = {"attack": 1.0}

    def __init__(self, objective: Objective):
        cfg = MethodConfig(epochs=0, max_steps=objective.steps, lr=objective.lr, optimizer=objective.optimizer,
                           momentum=0.0, weight_decay=objective.weight_decay, batch_size=objective.batch_size)
        super().__init__(cfg)
        self.objective = objective

    def phases(self, ctx: RunContext) -> list[Phase]:
        return [Phase("attack", self.objective.steps, self.streams)]

    def losses(self, batch: dict, ctx: RunContext) -> dict[str, torch.Tensor]:
        return {"attack": self.objective.loss(batch["target"], ctx.unwrapped.value, ctx.global_step)}

    def after_step(self, ctx: RunContext) -> None:
        obj, value = self.objective, ctx.unwrapped.value
        if obj.project is not None:
            with torch.no_grad():
                obj.project(value)
        done = ctx.global_step + 1
        if obj.check is not None and ((obj.check_every and done % obj.check_every == 0) or done == obj.steps):
            with torch.no_grad():
                if obj.check(value.detach()):
                    ctx.request_stop("the judge says the concept is back")
                    ctx.state["succeeded_at"] = done


def optimise(ctx: AttackContext, row: PromptRow, attack: str, init: torch.Tensor, objective: Objective) -> tuple[torch.Tensor, dict]:
    """Run ``objective`` on a parameter starting at ``init``; the optimised value and the run's summary.

    The run folder is ``ctx.workdir/<attack>/<case>`` (resumed when it holds a checkpoint) or a
    temporary folder that is removed afterwards.
    """
    accelerator = LocalAccelerator(ctx.task.device)  # one prompt, one process: never synchronised with others
    temporary = ctx.workdir is None
    folder = Path(tempfile.mkdtemp(prefix="erase-attack-")) if temporary else \
        ctx.workdir / attack / slug(row.case)
    frozen = [m for m in (ctx.model, ctx.base, ctx.encoder, *ctx.task.text_encoders) if m is not None]
    trainable = [q for m in frozen for q in m.parameters() if q.requires_grad]
    modes = [(m, m.training) for m in frozen]
    for m in frozen:  # gradients reach the parameter through them, never into them
        m.eval().requires_grad_(False)
    try:
        run = RunContext(accelerator, Parameter(init).to(ctx.task.device), ctx.task,
                         {"target": DataView(objective.data)}, folder, seed=1_000_003 * ctx.seed + row.seed,
                         progress=False)
        info = run_method(_AttackMethod(objective), run,
                          LoopSettings(checkpoint_every=max(objective.check_every, 50), keep_checkpoints=1,
                                       log_every=max(objective.check_every, 10), resume=not temporary,
                                       progress=ctx.progress))
        value = run.unwrapped.value.detach().clone()
    finally:
        for q in trainable:
            q.requires_grad_(True)
        for m, mode in modes:
            m.train(mode)
        if temporary:
            shutil.rmtree(folder, ignore_errors=True)
    summary = {"steps": info.get("stopped_at", info["steps"]), "budget_steps": info["steps"],
               "stopped_early": bool(info.get("stopped")), "optimise_s": round(info.get("train_s", 0.0), 3)}
    return value, summary


class GradientAttack(Attack):
    """An attack that optimises through the denoiser: needs the denoising extension and the base model."""

    tasks = ("diffusion",)

    def check_task(self, task) -> None:
        super().check_task(task)
        if not isinstance(task, DenoisingTask):
            raise EraseError(f"attack {self.name!r} optimises through the denoiser: the task offers no noise predictions")

    def needs_base(self, ctx: AttackContext) -> nn.Module:
        if ctx.base is None:
            raise EraseError(f"attack {self.name!r} needs the base model's images of the prompt (AttackContext.base)")
        return ctx.base

    def target_latents(self, ctx: AttackContext, row: PromptRow) -> torch.Tensor:
        """(1, C, h, w): the base model's image of the row's prompt (its seed and guidance), encoded back by the
        VAE (UnlearnDiffAtk and P4D attack towards the original model's image: ``latent_dist.mean`` x scale)."""
        key = ("target", row.prompt, row.seed, row.guidance)
        if key not in ctx.state:
            base = self.needs_base(ctx)
            with torch.no_grad():
                image = ctx.task.generate(base, ctx.task.encode([row.prompt]), [row.seed], row.guidance)
                ctx.state[key] = ctx.task.to_latents(image).detach().float().cpu()
        return ctx.state[key]

    @torch.no_grad()
    def judged(self, ctx: AttackContext, row: PromptRow, text: str) -> bool:
        """Whether the attacked model's image of ``text`` at the row's first seed shows the concept (the early stop)."""
        if ctx.judge is None:
            return False
        images = ctx.task.generate(ctx.model, ctx.encode([text]), [row.seed], row.guidance)
        return bool(ctx.judge(images, ctx.concept_of(row)).any())

    def noisy(self, ctx: AttackContext, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, the clean model's target) at timesteps ``t``, with fresh noise (the engine seeds every step)."""
        noise = torch.randn_like(x0)
        return ctx.task.add_noise(x0, noise, t), ctx.task.denoising_target(x0, noise, t)
