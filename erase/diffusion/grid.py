"""Before/after grids: the same prompts and seeds from the base and the erased model, side by side."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw


def _tile(img: torch.Tensor, size: int) -> Image.Image:
    arr = (img.detach().float().clamp(0, 1) * 255).round().byte()
    if arr.shape[0] == 1:
        arr = arr.expand(3, -1, -1)
    pil = Image.fromarray(arr.permute(1, 2, 0).cpu().numpy())
    return pil.resize((size, size), Image.NEAREST if pil.width < size else Image.BICUBIC)


def before_after_grid(rows: list[tuple[str, torch.Tensor, torch.Tensor]], tile: int = 96, label_width: int = 260) -> Image.Image:
    """``rows``: (prompt, base images (K, C, H, W), erased images (K, C, H, W)) with the same seeds.

    Each prompt gets two rows, "base" above "erased"; columns are seeds.
    """
    k = max(r[1].shape[0] for r in rows)
    width = label_width + k * (tile + 4) + 4
    height = len(rows) * 2 * (tile + 4) + 28
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 6), "rows: base model (above) and erased model (below), same prompt; columns: seeds", fill="black")
    y = 28
    for prompt, before, after in rows:
        for tag, imgs in (("base", before), ("erased", after)):
            draw.text((4, y + tile // 2 - 12), f"{tag}:", fill="gray" if tag == "base" else "darkred")
            draw.text((4, y + tile // 2 + 2), prompt[:40], fill="black")
            for j in range(imgs.shape[0]):
                canvas.paste(_tile(imgs[j], tile), (label_width + j * (tile + 4), y))
            y += tile + 4
    return canvas
