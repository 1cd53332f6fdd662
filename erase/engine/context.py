"""What a method sees while it runs: the model, the task's data views and the run's settings."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass
class RunContext:
    accelerator: Any
    model: nn.Module            # the model being edited (wrapped for DDP once training starts)
    task: Any                   # the task adapter (erase.classifier.task.ClassifierTask, ...)
    views: dict                 # stream name -> DataView
    output_dir: Path
    seed: int = 0
    grad_accum: int = 1
    global_step: int = 0
    total_steps: int = 0
    phase: str = ""
    state: dict = field(default_factory=dict)  # free scratch space for a method across hooks
    progress: bool = True       # show progress bars (also for a method's own passes)
    stop_reason: str = ""       # set by request_stop: training ends after the current step

    def request_stop(self, reason: str) -> None:
        """End training after this step (from ``after_step``), e.g. an attack whose judge already says success.

        The step is checkpointed, ``finalize`` still runs, and ``run_method`` reports the reason and the step.
        """
        self.stop_reason = self.state["stop_reason"] = reason or "stopped"  # in the checkpoint: a resume stays stopped

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def frozen_copy(self, dtype: torch.dtype | None = None) -> nn.Module:
        """A frozen, eval-mode copy of the model as it is now (call in ``setup`` for the base weights).

        ``dtype=torch.float16`` halves the memory of a teacher at Stable Diffusion scale.
        """
        teacher = copy.deepcopy(self.unwrapped)
        if dtype is not None:
            teacher.to(dtype)
        teacher.eval().requires_grad_(False)
        return teacher

    def fraction_done(self) -> float:
        """Fraction of training done, in [0, 1]."""
        return self.global_step / max(self.total_steps, 1)
