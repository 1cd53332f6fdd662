"""What a method is: a typed config, the tasks it supports, and a loss (or a closed-form edit).

A method never owns a loop. The engine calls, in order:

1. ``setup(ctx)`` — masks, teachers, cached embeddings; runs on the *base* weights, also when a
   run resumes, so it must be deterministic (or cache its result under ``ctx.output_dir``);
2. ``apply(ctx)`` — optional closed-form edit (SSD, influence updates);
3. for each :class:`Phase` of ``phases(ctx)``: ``losses(batch, ctx)`` every step, where ``batch``
   maps the phase's stream names to batches; the engine weights the returned terms by
   ``config.loss_weights`` (defaults in ``default_weights``), sums, and steps the optimiser;
   then ``after_step(ctx)`` (e.g. a proximal step on the weights);
4. ``finalize(ctx)`` — optional last edit (e.g. dropping a shadow class).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from erase.errors import EraseError
from erase.fields import field_problems, flag_name, opt

if TYPE_CHECKING:
    from erase.engine.context import RunContext


@dataclass
class MethodConfig:
    """Knobs every method has; subclasses change defaults and add their own fields."""

    epochs: float = opt(5.0, "passes over the method's main data stream (see the method's docs)")
    max_steps: int = opt(0, "if > 0, optimiser steps to run instead of --epochs")
    lr: float = opt(0.01, "base learning rate")
    optimizer: str = opt("sgd", "optimiser", ("sgd", "adamw", "adam"))
    momentum: float = opt(0.9, "SGD momentum")
    weight_decay: float = opt(5e-4, "weight decay (L2 for SGD/Adam, decoupled for AdamW)")
    batch_size: int = opt(256, "examples per optimiser step, summed over processes")
    lr_schedule: str = opt("constant", "learning-rate schedule", ("constant", "cosine", "linear", "onecycle", "step"))
    warmup_steps: int = opt(0, "linear warm-up steps")
    max_grad_norm: float = opt(0.0, "clip the gradient norm to this value (0 = off)")
    loss_weights: dict = opt({}, "override weights of named loss terms, e.g. {forget_ce: -1.0}")
    # The fields that set the method's length (with --max-steps), so "--epochs 0" is refused only where it
    # means "train nothing"; a method with a fixed step count or a closed-form edit names others, or none.
    length_fields: ClassVar[tuple[str, ...]] = ("epochs",)

    def validate(self) -> None:
        """Range checks shared by every method; a subclass adds its own and calls ``super().validate()``.

        Everything here needs only the config, so a bad value fails before any model loads or any
        image is generated. Each message names the flag.
        """
        problems = field_problems(self)
        for name, low in (("batch_size", 1), ("max_steps", 0), ("epochs", 0), ("lr", 0), ("warmup_steps", 0),
                          ("momentum", 0), ("weight_decay", 0), ("max_grad_norm", 0)):
            if getattr(self, name) < low:
                problems.append(f"{flag_name(name)} must be >= {low}, got {getattr(self, name)}")
        for term, weight in self.loss_weights.items():
            try:
                number = float(weight) if not isinstance(weight, bool) else math.nan
            except (TypeError, ValueError):
                number = math.nan
            if not math.isfinite(number):
                problems.append(f"--loss-weights: the weight of {term!r} must be a finite number, got {weight!r}")
        length = self.length_fields
        if length and self.max_steps == 0 and all(getattr(self, n) == 0 for n in length):
            given = " and ".join(f"{flag_name(n)} 0" for n in length)
            problems.append(f"nothing to train: {given} and --max-steps 0; give one of them a positive value")
        if problems:
            raise EraseError("; ".join(problems))


@dataclass
class Phase:
    """A stretch of optimiser steps drawing one batch per step from each named stream.

    ``on_start`` runs once when the phase begins (not again when a run resumes inside it), e.g. to
    re-initialise layers; it runs under the step's seed, so its randomness is reproducible.
    ``lr`` replaces the method's base learning rate and ``lr_scale`` multiplies it; ``schedule``
    gives the phase its own learning-rate schedule over its own steps (default: the method's
    schedule over the whole run). Phases naming the same ``optimizer`` share its state (momentum);
    a new name gets a fresh optimiser with this phase's ``weight_decay``. ``lr_at(i)``, if given, is
    the exact learning rate at the phase's i-th step (for a curve that spans several phases; it
    replaces ``lr``/``lr_scale``/``schedule``). ``masks`` replaces the
    method's parameter masks while the phase runs (bool or float, see ``ParameterMask``).
    """

    name: str
    steps: int
    streams: tuple[str, ...]
    lr_scale: float = 1.0
    on_start: Callable[[RunContext], None] | None = None
    train_mode: bool = True
    lr: float | None = None
    schedule: str | None = None
    optimizer: str = "main"
    weight_decay: float | None = None
    masks: dict | None = None
    lr_at: Callable[[int], float] | None = None


class Method:
    name: ClassVar[str] = ""
    tasks: ClassVar[tuple[str, ...]] = ()
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    # Weights of the loss terms ``losses`` returns; the sign is part of the weight (GA: -1).
    default_weights: ClassVar[dict[str, float]] = {}
    # Streams the method reads; the engine checks the task can supply them before anything runs.
    streams: ClassVar[tuple[str, ...]] = ()
    # True for methods that start from freshly initialised weights (retrain).
    from_scratch: ClassVar[bool] = False
    # True for methods that train the text encoder (advunlearn): the runner asks the task for a model holding
    # the denoiser and a trainable text encoder (``Task.build_model(text_encoder=True)``); masks pick what trains.
    trains_text_encoder: ClassVar[bool] = False
    # Config defaults that differ by task, e.g. {"diffusion": {"optimizer": "adam", "lr": 1e-5}}.
    task_defaults: ClassVar[dict[str, dict]] = {}
    # The knobs a benchmark's tuning grid multiplies; None: every learning rate (``lr`` and ``*_lr``).
    # Closed-form methods name their step size instead (e.g. SSD's ``alpha``).
    tunable: ClassVar[tuple[str, ...] | None] = None
    # Lengths in epochs that a budget rule scales besides ``epochs`` (e.g. a warm-up's epochs).
    epoch_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: MethodConfig):
        config.validate()
        self.config = config

    # -- hooks -------------------------------------------------------------------------------
    def check_task_config(self, task_cfg) -> None:
        """Reject a task from its config alone (raise EraseError); runs while the config is resolved,
        before any model loads or any data is generated. ``check_task`` still runs on the built task."""

    def check_task(self, task) -> None:
        """Reject a task this method cannot serve, before any expensive work (raise EraseError)."""

    def setup(self, ctx: RunContext) -> None:
        """Prepare masks, teachers, caches. Runs on the base weights."""

    def parameter_masks(self, ctx: RunContext) -> dict[str, torch.Tensor] | None:
        """Bool masks (True = trainable) per parameter name; None trains every parameter."""
        return None

    def apply(self, ctx: RunContext) -> None:
        """Closed-form edit of ``ctx.model`` (optional)."""

    def phases(self, ctx: RunContext) -> list[Phase]:
        """By default: one phase over ``streams``, sized by --epochs of the first stream."""
        if not self.streams:
            return []
        return [Phase("train", self.steps_for(ctx, self.streams[0]), self.streams)]

    def losses(self, batch: dict[str, Any], ctx: RunContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} declares streams but no losses()")

    def after_step(self, ctx: RunContext) -> None:
        """Runs after every optimiser step (after masks are restored), before checkpointing (optional)."""

    def finalize(self, ctx: RunContext) -> None:
        """Last edit after training (optional)."""

    # -- helpers -----------------------------------------------------------------------------
    def weights(self) -> dict[str, float]:
        w = dict(self.default_weights)
        unknown = set(self.config.loss_weights) - set(w)
        if unknown:
            raise EraseError(f"{self.name}: unknown loss term(s) {sorted(unknown)}; terms: {sorted(w)}")
        w.update({k: float(v) for k, v in self.config.loss_weights.items()})
        return w

    def steps_for(self, ctx: RunContext, stream: str, epochs: float | None = None) -> int:
        """Optimiser steps for ``epochs`` passes over ``stream`` (``--max-steps`` wins if set)."""
        if self.config.max_steps > 0:
            return self.config.max_steps
        epochs = self.config.epochs if epochs is None else epochs
        per_step = self.config.batch_size * ctx.grad_accum
        return max(1, math.ceil(epochs * len(ctx.views[stream]) / per_step))
