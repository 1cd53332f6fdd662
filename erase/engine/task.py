"""The Task contract: what a task adapter gives methods and the runner, so neither probes with getattr.

A task adapts one kind of model (a classifier, a denoiser) to one vocabulary:

- **methods call** ``views`` (training streams by name), ``loss(model, batch)``, ``relabel(batch)``
  and ``iterate(name)`` (every example of a view once, in order, at the task's evaluation batch size);
- **the runner calls** ``build_model``, then ``before_training`` (optional), ``save_model``,
  ``evaluate`` and ``write_artifacts`` (optional) after training.

Two extensions add what only some methods need: :class:`ClassificationTask` (logits, classes) and
:class:`DenoisingTask` (noise prediction under a condition, conditions, partial sampling, base
weights, attention recording, the layer map). A method that needs an extension says so in ``check_task``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from erase.engine.layers import LayerMap
from erase.engine.streams import DataView


class TaskConfig:
    """What the runner reads from a task's config before the task exists."""

    task_name: ClassVar[str] = ""  # the task's registry name, for methods whose defaults depend on it

    def label(self) -> str:
        """A short name of what is being erased, for the default output folder."""
        return "run"

    def base_model(self) -> str:
        """The base model's name or folder ('' if none): erase never writes into it."""
        return ""

    def validate(self) -> None:
        """Reject out-of-range values before any data or model loads."""

    def model_has_cross_attention(self) -> bool | None:
        """Whether the base model reads text through cross-attention; None when that cannot be told
        without loading it (methods use this to refuse early, and ``check_task`` again on the built task)."""
        return None

    def layer_family(self) -> LayerMap | None:
        """The layer map of the base model's architecture, told from its files before anything loads (methods
        refuse a family early with it); None when that cannot be told without loading."""
        return None

    def trains_adapters(self) -> bool:
        """Whether the run trains adapters (LoRA) rather than the model's own weights."""
        return False


class Task(ABC):
    """Constructed as ``TaskClass(config, seed=, device=, streams=)``; ``streams`` names the training
    data the run's method reads, so a task can skip preparing data nobody uses."""

    name: ClassVar[str] = ""
    views: dict[str, DataView]
    # True when the model trains adapters (LoRA) rather than its own weights.
    trains_adapters: bool = False

    # -- what methods call -------------------------------------------------------------------------
    @abstractmethod
    def loss(self, model: nn.Module, batch: dict, **kwargs) -> torch.Tensor:
        """The task's training loss on a batch (cross-entropy, denoising MSE)."""

    @abstractmethod
    def relabel(self, batch: dict) -> dict:
        """The batch pointed at another target (random labels, another concept)."""

    @abstractmethod
    def iterate(self, name: str, augment: bool = False) -> Iterator[dict]:
        """Every example of the named view once, in order, in evaluation-sized batches."""

    # -- what the runner calls ---------------------------------------------------------------------
    @abstractmethod
    def build_model(self, from_scratch: bool, text_encoder: bool = False) -> nn.Module:
        """The model to edit (the base model, or a fresh one for methods that retrain).

        ``text_encoder``: the method trains the text encoder too (``Method.trains_text_encoder``); the model is
        then one module holding the denoiser and a trainable text encoder, and ``save_model`` / ``evaluate``
        write and judge both. A task without a text encoder refuses it (EraseError).
        """

    def before_training(self, model: nn.Module, out: Path) -> None:  # noqa: B027 - optional hook
        """Work on the base weights before any change (e.g. the 'before' images); optional."""

    @abstractmethod
    def save_model(self, model: nn.Module, out: Path) -> None:
        """Write the edited model under ``out``."""

    @abstractmethod
    def evaluate(self, model: nn.Module, device: torch.device | str) -> dict:
        """The task's metrics of the edited model."""

    def write_artifacts(self, out: Path, resolved: dict, metrics: dict, info: dict) -> None:  # noqa: B027 - optional hook
        """Anything else a run leaves behind (grid, model card); optional."""


class ClassificationTask(Task):
    """A task whose model maps a batch to class logits."""

    num_classes: int

    @abstractmethod
    def logits(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Class logits of a batch."""


class DenoisingTask(Task):
    """A task whose model predicts noise (or velocity) under a condition: the diffusion methods' vocabulary."""

    # Whether the model reads text through cross-attention (Stable Diffusion) or a class label (DDPM).
    has_cross_attention: bool = False
    # How many concepts the run erases; methods that draw one concept per step index them 0..n-1.
    n_concepts: int = 1

    @abstractmethod
    def predict(self, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                guidance: float | None = None) -> torch.Tensor:
        """The model's output at noisy input ``x_t``, timestep ``t`` under condition ``cond``. ``guidance``: for a
        guidance-distilled model (FLUX.1-dev), the guidance scale its guidance embedding reads for this prediction
        (None: the task's own); models without a guidance embedding ignore it."""

    @abstractmethod
    def null_condition(self, n: int, device) -> torch.Tensor:
        """The unconditional condition (empty prompt, null class), ``n`` times."""

    @abstractmethod
    def concept_condition(self, n: int, device, concept: int = 0) -> torch.Tensor:
        """Erased concept number ``concept``'s condition, ``n`` times."""

    @abstractmethod
    def partial_sample(self, model: nn.Module, n: int, stop_after: int, steps: int, guidance: float,
                       seeds: list[int], concept: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, t) after ``stop_after`` of ``steps`` guided denoising steps under erased concept ``concept``."""

    @abstractmethod
    def base_weights(self, model: nn.Module) -> AbstractContextManager[nn.Module]:
        """A context in which ``model`` predicts with the base weights (adapters off)."""

    # Timesteps the model was trained on (0 .. num_train_timesteps - 1).
    num_train_timesteps: int = 1000

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t: ``x0`` noised to timestep ``t`` by the model's forward process."""
        raise TypeError(f"task {self.name!r} does not expose its forward process")

    def denoising_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model predicts at ``add_noise(x0, noise, t)`` (the noise, or the velocity)."""
        raise TypeError(f"task {self.name!r} does not expose its training target")

    def concept_token_mask(self) -> torch.Tensor:
        """Bool (prompts, tokens): which text tokens of each forget prompt name the concept."""
        raise TypeError(f"task {self.name!r} has no text prompts")

    def layer_map(self, model: nn.Module) -> LayerMap:
        """Which of ``model``'s layers read the text (text attention, text keys/values, recording points, text
        encoders): methods ask this instead of naming module paths. See erase.engine.layers."""
        raise TypeError(f"task {self.name!r} has no layer map")

    def record_attention(self, model: nn.Module) -> Any:
        """Install an attention store on the model's cross-attention; see erase.diffusion.attention."""
        raise TypeError(f"task {self.name!r} has no cross-attention to record")
