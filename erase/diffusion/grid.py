"""Comparison grids: the same prompts and seeds from several models (base, erased, attacked), stacked."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw

_COLOURS = {"base": "gray", "erased": "darkred"}


def _tile(img: torch.Tensor, size: int) -> Image.Image:
    arr = (img.detach().float().clamp(0, 1) * 255).round().byte()
    if arr.shape[0] == 1:
        arr = arr.expand(3, -1, -1)
    pil = Image.fromarray(arr.permute(1, 2, 0).cpu().numpy())
    return pil.resize((size, size), Image.NEAREST if pil.width < size else Image.BICUBIC)


def comparison_grid(rows: list[tuple[str, list[tuple[str, torch.Tensor]]]], title: str, tile: int = 96,
                    label_width: int = 260) -> Image.Image:
    """``rows``: (prompt, [(tag, images (K, C, H, W)), ...]); each prompt gets one grid row per tag, columns are seeds."""
    k = max(imgs.shape[0] for _, tagged in rows for _, imgs in tagged)
    width = label_width + k * (tile + 4) + 4
    height = sum(len(tagged) for _, tagged in rows) * (tile + 4) + 28
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 6), title, fill="black")
    y = 28
    for prompt, tagged in rows:
        for tag, imgs in tagged:
            draw.text((4, y + tile // 2 - 12), f"{tag}:", fill=_COLOURS.get(tag, "darkblue"))
            draw.text((4, y + tile // 2 + 2), prompt[:40], fill="black")
            for j in range(imgs.shape[0]):
                canvas.paste(_tile(imgs[j], tile), (label_width + j * (tile + 4), y))
            y += tile + 4
    return canvas


def before_after_grid(rows: list[tuple[str, torch.Tensor, torch.Tensor]], tile: int = 96, label_width: int = 260) -> Image.Image:
    """``rows``: (prompt, base images (K, C, H, W), erased images (K, C, H, W)) with the same seeds.

    Each prompt gets two rows, "base" above "erased"; columns are seeds.
    """
    return comparison_grid([(p, [("base", b), ("erased", a)]) for p, b, a in rows],
                           "rows: base model (above) and erased model (below), same prompt; columns: seeds",
                           tile, label_width)
