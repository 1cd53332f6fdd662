"""Saliency masks from gradient statistics: top-k (global or per layer) or a threshold.

Masks are bool tensors (True = trainable). The global threshold is found with ``kthvalue`` on
the concatenated scores, never a full argsort: one float copy of the scores, no int64 indices.
Ties at the threshold are broken towards the exact requested count, so the density is exact.
"""

from __future__ import annotations

import torch

from erase.storage import load_safetensors, save_safetensors


def _exact_topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    flat = scores.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(flat, dtype=torch.bool).view_as(scores)
    if k >= n:
        return torch.ones_like(flat, dtype=torch.bool).view_as(scores)
    thr = torch.kthvalue(flat.float(), n - k + 1).values  # k-th largest value
    mask = flat > thr
    need = k - int(mask.sum())
    if need > 0:  # take just enough of the ties, lowest index first, for an exact count
        ties = torch.nonzero(flat == thr).squeeze(1)[:need]
        mask[ties] = True
    return mask.view_as(scores)


def topk_masks(scores: dict[str, torch.Tensor], fraction: float, scope: str = "global") -> dict[str, torch.Tensor]:
    """Mark the ``fraction`` of highest scores trainable, ranked over all tensors or per tensor."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"mask fraction must be in [0, 1], got {fraction}")
    if scope == "layer":
        return {n: _exact_topk_mask(s, round(fraction * s.numel())) for n, s in scores.items()}
    if scope != "global":
        raise ValueError(f"unknown mask scope {scope!r}; use 'global' or 'layer'")
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1).float() for n in names])
    mask = _exact_topk_mask(flat, round(fraction * flat.numel()))
    out, offset = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = mask[offset:offset + size].view_as(scores[n])
        offset += size
    return out


def threshold_masks(scores: dict[str, torch.Tensor], threshold: float) -> dict[str, torch.Tensor]:
    return {n: s >= threshold for n, s in scores.items()}


def density(masks: dict[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return sum(int(m.sum()) for m in masks.values()) / max(total, 1)


def density_report(masks: dict[str, torch.Tensor]) -> str:
    """A markdown table: trainable share per parameter tensor, and overall."""
    lines = ["| parameter | size | trainable | share |", "|---|---:|---:|---:|"]
    for n, m in masks.items():
        k = int(m.sum())
        lines.append(f"| {n} | {m.numel()} | {k} | {k / max(m.numel(), 1):.1%} |")
    lines.append(f"| **all** | {sum(m.numel() for m in masks.values())} | "
                 f"{sum(int(m.sum()) for m in masks.values())} | {density(masks):.1%} |")
    return "\n".join(lines)


def save_masks(masks: dict[str, torch.Tensor], path, metadata: dict | None = None) -> None:
    # safetensors has a bool dtype: one byte per coordinate, no int64 index lists.
    save_safetensors({n: m.to(torch.bool) for n, m in masks.items()}, path,
                     metadata={k: str(v) for k, v in (metadata or {}).items()})


def load_masks(path) -> dict[str, torch.Tensor]:
    return {n: t.to(torch.bool) for n, t in load_safetensors(path).items()}
