"""Helpers shared by the multi-phase catalogue methods (scrub, kl_uniform, reinit_kp, grad_reinit,
prune_reinit, reset_distill, reset_noise). Not a method: it registers nothing.

* Layer discovery by module type, so the methods run on the CIFAR-stem ResNet-18, on torchvision's
  ResNets and on a plain MLP: the classifier head is the *last* ``nn.Linear``; a projection shortcut
  is any module under a child named ``shortcut`` (kuangliu / this repo) or ``downsample``
  (torchvision); "feature layers" are the convolutions, or on a model without any, the linear
  layers before the head.
* Seeded randomness that is the same on every device and every process: re-initialisations and
  noise are drawn on the CPU from a generator seeded by (run seed, tags) and then copied to the
  parameter's device. (The engine seeds ``on_start`` with a seed that includes the process index,
  so draws from the global RNG there would differ between DDP ranks and the replicas would drift
  apart.)
* Phase sizing: steps per epoch of a stream, comma-separated list options, and ``--max-steps``
  as a cap on the total number of steps over all phases.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import zlib

import torch
from torch import nn

from erase.errors import EraseError

CONV = nn.modules.conv._ConvNd
NORM = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
WEIGHT = (CONV, nn.Linear)
SHORTCUT_NAMES = ("shortcut", "downsample")


# -- which module is what ----------------------------------------------------------------------------
def classifier_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """The last ``nn.Linear`` in registration order (``fc`` of a ResNet, the output layer of an MLP)."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise EraseError(f"{type(model).__name__} has no nn.Linear layer to treat as the classifier head")
    return linears[-1]


def is_shortcut(name: str) -> bool:
    """True for modules inside a projection shortcut (``...shortcut.0``, ``...downsample.1``)."""
    return any(part in SHORTCUT_NAMES for part in name.split("."))


def has_own_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def feature_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Convolutions (with weights) if the model has any, else the linear layers before the head."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, CONV) and has_own_parameters(m)]
    if convs:
        return convs
    head, _ = classifier_head(model)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != head]


def first_layer(model: nn.Module) -> tuple[str, nn.Module]:
    """The first convolution (the stem), or on a model without convolutions the first linear layer."""
    for kind in (CONV, nn.Linear):
        for n, m in model.named_modules():
            if isinstance(m, kind) and has_own_parameters(m):
                return n, m
    raise EraseError(f"{type(model).__name__} has no convolution or linear layer")


def module_of(model: nn.Module, param_name: str) -> nn.Module:
    return model.get_submodule(param_name.rpartition(".")[0]) if "." in param_name else model


def is_norm_parameter(model: nn.Module, param_name: str) -> bool:
    return isinstance(module_of(model, param_name), NORM)


# -- seeded randomness ---------------------------------------------------------------------------------
def seed_for(seed: int, *tags) -> int:
    """A stable 63-bit seed from the run seed and any tags (method name, cycle index, ...)."""
    return (seed * 1_000_003 + zlib.crc32(repr(tags).encode())) % 2**63


def generator(seed: int, *tags) -> torch.Generator:
    """A CPU generator seeded by (seed, tags); draw on the CPU and move, so every device agrees."""
    return torch.Generator().manual_seed(seed_for(seed, *tags))


@torch.no_grad()
def seeded_reset(module: nn.Module, seed: int) -> None:
    """``module.reset_parameters()`` (PyTorch's default initialisation) with values drawn on the CPU
    from ``seed``; the global RNG is left as it was. BatchNorm also resets its running statistics."""
    if not hasattr(module, "reset_parameters"):
        raise EraseError(f"{type(module).__name__} has no reset_parameters(); cannot re-initialise it")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = copy.deepcopy(module).to("cpu")
        fresh.reset_parameters()
    module.load_state_dict(fresh.state_dict())


# -- phases ------------------------------------------------------------------------------------------------
def epoch_steps(method, ctx, stream: str, epochs: float = 1.0, batch_size: int | None = None) -> int:
    """Optimiser steps for ``epochs`` passes over ``stream`` (ignores ``--max-steps``; see :func:`cap`)."""
    per_step = (batch_size or method.config.batch_size) * ctx.grad_accum
    return max(1, math.ceil(epochs * len(ctx.views[stream]) / per_step)) if epochs > 0 else 0


def cap(phases: list, max_steps: int) -> list:
    """With ``--max-steps N > 0``: the first N steps of the phase list (later phases dropped)."""
    phases = [p for p in phases if p.steps > 0]
    if max_steps <= 0:
        return phases
    out, left = [], max_steps
    for p in phases:
        if left <= 0:
            break
        out.append(dataclasses.replace(p, steps=min(p.steps, left)))
        left -= out[-1].steps
    return out


def floats(text: str, flag: str) -> list[float]:
    """Parse a comma-separated list option such as ``"2,1,1,1"``."""
    try:
        values = [float(v) for v in str(text).replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise EraseError(f"--{flag.replace('_', '-')} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise EraseError(f"--{flag.replace('_', '-')} must list at least one number")
    return values
