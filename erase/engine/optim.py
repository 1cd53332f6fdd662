"""Optimisers and learning-rate schedules, as pure functions of the step (nothing to resume)."""

from __future__ import annotations

import math

import torch

from erase.errors import EraseError

OPTIMIZERS = ("sgd", "adamw", "adam")
SCHEDULES = ("constant", "cosine", "linear", "onecycle", "step")


def build_optimizer(params, name: str, lr: float, momentum: float = 0.9, weight_decay: float = 0.0):
    params = [p for p in params if p.requires_grad]
    if not params:
        raise EraseError("no trainable parameters: the method's mask or parameter filter froze everything")
    name = name.lower()
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise EraseError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")


def lr_factor(schedule: str, step: int, total: int, warmup: int = 0) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` of ``total``."""
    total = max(total, 1)
    if warmup and step < warmup:
        return (step + 1) / warmup
    frac = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * frac))
    if schedule == "linear":
        return 1.0 - frac
    if schedule == "onecycle":
        # Linear ramp up over the first 30 % from lr/25, then cosine down to ~0 (torch's OneCycleLR shape).
        up = 0.3
        if frac < up:
            return 0.04 + 0.96 * frac / up
        return 0.5 * (1 + math.cos(math.pi * (frac - up) / (1 - up)))
    if schedule == "step":
        # x0.1 at 50 % and 75 % of training (the multi-step decay of the unlearning papers' code).
        return 0.1 ** ((frac >= 0.5) + (frac >= 0.75))
    raise EraseError(f"unknown lr schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")
