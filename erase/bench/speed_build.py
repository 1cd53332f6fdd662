"""Build the SDXL- and SD3-shaped pipelines of the speed benchmark with random weights, one component at a time.

A full-size pipeline does not fit in memory twice: SDXL's fp32 weights are 13.9 GB, and diffusers'
``save_pretrained`` copies a whole shard into bytes while writing it. So each component is built,
saved with ``max_shard_size`` ``SHARD`` (the copy is at most one such shard) and dropped before the
next; the pipeline's ``model_index.json`` is written from the same pipeline class constructed on the
meta device (no memory), so the folder loads with the ordinary ``from_pretrained`` — which reads one
shard at a time, too. ``count_params`` builds the same components on the meta device: the counts
that the memory estimate and the published-total check use, without building anything.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from erase.storage import ZOO_DIR

SHARD = "1GB"
TEXT_CLASSES = {"sdxl": ("CLIPTextModel", "CLIPTextModelWithProjection"),
                "sd3": ("CLIPTextModelWithProjection", "CLIPTextModelWithProjection")}


def _denoiser(family: str, configs: dict):
    # lazy: diffusers takes seconds to import
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    if family == "sd3":
        return SD3Transformer2DModel(**configs["transformer"])
    return UNet2DConditionModel(**configs["unet"])


def denoiser_name(family: str) -> str:
    return "transformer" if family == "sd3" else "unet"


def _components(family: str, configs: dict) -> dict:
    """name -> a zero-argument builder of that component (built when called, under the caller's device)."""
    # lazy: diffusers and transformers take seconds to import
    import transformers
    from diffusers import AutoencoderKL

    first, second = (getattr(transformers, c) for c in TEXT_CLASSES[family])
    return {
        "text_encoder": lambda: first(transformers.CLIPTextConfig(**configs["text_encoder"])),
        "text_encoder_2": lambda: second(transformers.CLIPTextConfig(**configs["text_encoder_2"])),
        "vae": lambda: AutoencoderKL(**configs["vae"]),
        denoiser_name(family): lambda: _denoiser(family, configs),
    }


def _scheduler(family: str, configs: dict):
    # lazy: diffusers takes seconds to import
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    cls = FlowMatchEulerDiscreteScheduler if family == "sd3" else EulerDiscreteScheduler
    return cls(**configs["scheduler"])


def meta_denoiser(family: str, configs: dict) -> torch.nn.Module:
    """The denoiser with no storage (shapes and names only): for counting and the activation estimate."""
    with torch.device("meta"):
        return _denoiser(family, configs)


def count_params(family: str, configs: dict) -> dict[str, int]:
    """Parameters of every component, counted on the meta device (nothing is allocated)."""
    counts = {}
    for name, build in _components(family, configs).items():
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in build().parameters())
    return counts


def _pipeline_index(family: str, configs: dict, tokenizer, folder: Path) -> None:
    """model_index.json, from the pipeline class built with meta components: what ``save_pretrained`` writes."""
    # lazy: diffusers takes seconds to import
    from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline

    with torch.device("meta"):
        parts = {name: build() for name, build in _components(family, configs).items()}
    parts.update(scheduler=_scheduler(family, configs), tokenizer=tokenizer, tokenizer_2=tokenizer)
    if family == "sd3":
        pipe = StableDiffusion3Pipeline(**parts, text_encoder_3=None, tokenizer_3=None)
    else:
        pipe = StableDiffusionXLPipeline(**parts, add_watermarker=False)
    pipe.save_config(folder)


def build_and_save(family: str, configs: dict, folder: Path) -> dict[str, int]:
    """Write a ``family`` pipeline folder with random weights; the parameter count of each component."""
    # lazy: transformers takes seconds to import
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = CLIPTokenizer.from_pretrained(ZOO_DIR / "fmnist-tiny-sd" / "tokenizer")
    counts = {}
    torch.manual_seed(0)
    for name, build in _components(family, configs).items():
        part = build()
        counts[name] = sum(p.numel() for p in part.parameters())
        part.save_pretrained(folder / name, safe_serialization=True, max_shard_size=SHARD)
        del part
        gc.collect()
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer.save_pretrained(folder / name)
    _scheduler(family, configs).save_pretrained(folder / "scheduler")
    _pipeline_index(family, configs, tokenizer, folder)
    return counts
