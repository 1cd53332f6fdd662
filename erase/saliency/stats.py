"""Gradient statistics of a loss over a data loader, per parameter.

``power=1`` gives |sum of batch gradients| (SalUn's saliency: the magnitude of the forget-loss
gradient at the original weights); ``power=2`` with ``per_batch=True`` gives the mean of squared
batch gradients, the diagonal-Fisher estimate SSD uses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from erase.engine.streams import move_to


def gradient_statistics(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, dict], torch.Tensor],
    batches: Iterable[dict],
    power: int = 1,
    reduce: str = "sum_then_abs",
    names: Callable[[str], bool] | None = None,
    device: torch.device | str | None = None,
    desc: str = "gradient statistics",
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Accumulate gradient statistics of ``loss_fn(model, batch)`` over ``batches``.

    ``reduce``:
      * ``"sum_then_abs"`` — |Σ_b g_b|^power (SalUn: the gradient of the whole-set loss);
      * ``"mean_of_power"`` — mean_b |g_b|^power (Fisher-style, per batch).
    ``names`` filters which parameters get statistics (default: all that require grad).
    Model mode and parameter ``requires_grad`` flags are restored afterwards.
    """
    if reduce not in ("sum_then_abs", "mean_of_power"):
        raise ValueError(f"unknown reduce {reduce!r}")
    params = {n: p for n, p in model.named_parameters() if (names is None or names(n))}
    was_training = model.training
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n in params)
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    count = 0
    model.eval()
    try:
        for batch in tqdm(batches, desc=desc, leave=False, disable=not progress):
            if device is not None:
                batch = move_to(batch, device)
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            for n, p in params.items():
                if p.grad is None:
                    continue
                g = p.grad.detach().float()
                acc[n] += g if reduce == "sum_then_abs" else g.abs().pow(power)
            count += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    if count == 0:
        raise ValueError("gradient statistics over an empty set of batches")
    if reduce == "sum_then_abs":
        return {n: a.abs().pow(power) for n, a in acc.items()}
    return {n: a / count for n, a in acc.items()}
