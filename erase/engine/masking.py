"""Keep masked parameter coordinates bit-exact through any optimiser step.

Zeroing gradients is not enough: weight decay (AdamW, or SGD's L2 term) and momentum keep moving
coordinates whose gradient is zero. So after every step the masked-out coordinates are copied back
from their values when the mask was installed. Parameters with no trainable coordinate are frozen
(``requires_grad=False``) while the mask is active, so only partially masked tensors pay for a copy.

Masks are bool (True = trainable) or float: a float mask scales the gradient per coordinate
(soft saliency, "1/10 lr for kept weights"), and its zeros are frozen exactly like False. A 0-dim mask
(:func:`whole`) stands for the whole tensor: methods that train or freeze whole layers (ESD, FMN, CA) would
otherwise hold one byte per parameter of the model (2.4 GiB at SDXL size) to say so.
"""

from __future__ import annotations

import torch
from torch import nn


def whole(trainable: bool) -> torch.Tensor:
    """The mask of a whole parameter tensor: every coordinate trainable, or none."""
    return torch.tensor(bool(trainable))


def trainable_coordinates(mask: torch.Tensor, param: torch.Tensor) -> int:
    """How many of ``param``'s coordinates ``mask`` lets train (a 0-dim mask speaks for all of them)."""
    return int(mask.count_nonzero()) * (param.numel() if mask.dim() == 0 else 1)


class ParameterMask:
    """``masks`` maps parameter names to bool or float tensors of the parameter's shape."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor]):
        params = dict(model.named_parameters())
        unknown = sorted(set(masks) - set(params))
        if unknown:
            raise ValueError(f"mask names parameters the model does not have, e.g. {unknown[0]}")
        self._entries: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = []
        self._frozen: list[tuple[nn.Parameter, bool]] = []
        for name, m in masks.items():
            p = params[name]
            if m.dim() and m.shape != p.shape:
                raise ValueError(f"mask for {name} has shape {tuple(m.shape)}, parameter has {tuple(p.shape)}")
            m = m.to(p.device)
            keep = m if m.dtype == torch.bool else m != 0
            scale = None if m.dtype == torch.bool else m.to(p.dtype)
            if not keep.any():
                self._frozen.append((p, p.requires_grad))
                p.requires_grad_(False)
            elif not keep.all():
                self._entries.append((p, keep, p.detach().clone(), scale))
            elif scale is not None:
                self._entries.append((p, keep, None, scale))

    @torch.no_grad()
    def mask_grads(self) -> None:
        """Zero (or scale) gradients of masked coordinates, so clipping norms only see trainable ones."""
        for p, keep, _, scale in self._entries:
            if p.grad is not None:
                p.grad.mul_(scale if scale is not None else keep)

    @torch.no_grad()
    def restore(self) -> None:
        for p, keep, frozen, _ in self._entries:
            if frozen is not None:
                p.copy_(torch.where(keep, p, frozen))

    def release(self) -> None:
        """Undo the freezing of fully masked tensors (when a phase with its own mask ends)."""
        for p, flag in self._frozen:
            p.requires_grad_(flag)
        self._frozen, self._entries = [], []
