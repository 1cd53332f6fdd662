"""The slice of ``accelerate.Accelerator`` the engine's loop uses, for a run that belongs to one process only.

An attack optimises one prompt's embedding per process while ``accelerate launch`` splits the prompts:
a real ``Accelerator`` there would wrap the embedding in DDP and wait for gradients from processes
that are optimising other prompts. ``LocalAccelerator`` runs the same loop on this process alone:
no wrapping, no gradient sync, every "main process" question answered yes (its files are its own).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn


class LocalAccelerator:
    sync_gradients = True
    is_main_process = is_local_main_process = True
    process_index, num_processes = 0, 1

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    def prepare(self, obj):
        return obj.to(self.device) if isinstance(obj, nn.Module) else obj

    def unwrap_model(self, model: nn.Module) -> nn.Module:
        return model

    def accumulate(self, model: nn.Module):
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm_(self, parameters, max_norm: float):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def wait_for_everyone(self) -> None:
        """Nothing to wait for: the run is this process's alone."""

    def log(self, values: dict, step: int | None = None) -> None:
        """No trackers: the loop's own log.jsonl has every record."""

    def print(self, *args, **kwargs) -> None:
        print(*args, **kwargs)
