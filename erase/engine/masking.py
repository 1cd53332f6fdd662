"""Keep masked parameter coordinates bit-exact through any optimiser step.

Zeroing gradients is not enough: weight decay (AdamW, or SGD's L2 term) and momentum keep moving
coordinates whose gradient is zero. So after every step the masked-out coordinates are copied back
from their original values. Parameters with no trainable coordinate are excluded from the
optimiser altogether (``requires_grad=False``), so only partially masked tensors pay for a copy.
"""

from __future__ import annotations

import torch
from torch import nn


class ParameterMask:
    """``masks`` maps parameter names to bool tensors (True = trainable) of the parameter's shape."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor]):
        params = dict(model.named_parameters())
        unknown = sorted(set(masks) - set(params))
        if unknown:
            raise ValueError(f"mask names parameters the model does not have, e.g. {unknown[0]}")
        self._entries: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = []
        for name, m in masks.items():
            p = params[name]
            if m.shape != p.shape:
                raise ValueError(f"mask for {name} has shape {tuple(m.shape)}, parameter has {tuple(p.shape)}")
            m = m.to(device=p.device, dtype=torch.bool)
            if not m.any():
                p.requires_grad_(False)
            elif not m.all():
                self._entries.append((p, m, p.detach().clone()))

    @torch.no_grad()
    def mask_grads(self) -> None:
        """Zero gradients of frozen coordinates (so clipping norms only see trainable ones)."""
        for p, m, _ in self._entries:
            if p.grad is not None:
                p.grad.mul_(m)

    @torch.no_grad()
    def restore(self) -> None:
        for p, m, frozen in self._entries:
            p.copy_(torch.where(m, p, frozen))
