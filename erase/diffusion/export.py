"""Write an erased model: a full diffusers folder, or only the UNet tensors that changed.

``pipeline`` writes ``model/`` — ``StableDiffusionPipeline.from_pretrained("…/model")`` loads it
as usual (for a DDPM: ``model/unet`` + ``model/scheduler``). ``delta`` writes
``delta.safetensors`` with the changed UNet tensors only; :func:`load_delta` applies it to the
base model. Both are written into a temporary folder / file and renamed into place.
"""

from __future__ import annotations

from pathlib import Path

import torch

from erase.errors import EraseError
from erase.storage import atomic_dir, load_safetensors, save_safetensors


def save_pipeline(task, unet, out: Path) -> Path:
    with atomic_dir(out / "model") as tmp:
        if task.kind == "ddpm":
            unet.save_pretrained(tmp / "unet", safe_serialization=True)
            task.scheduler.save_pretrained(tmp / "scheduler")
        else:
            pipe = task.base.pipe
            original = pipe.unet
            pipe.unet = unet
            try:
                pipe.save_pretrained(tmp, safe_serialization=True)
            finally:
                pipe.unet = original
    return out / "model"


def save_lora(task, unet, out: Path) -> Path:
    """The trained adapters as a diffusers LoRA folder: ``pipe.load_lora_weights("…/lora")``."""
    # lazy: diffusers takes seconds to import
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    with atomic_dir(out / "lora") as tmp:
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=get_peft_model_state_dict(unet),
                                                  safe_serialization=True)
    return out / "lora"


def merge_lora(unet) -> None:
    """Fold trained adapters into the UNet's weights (for a full or delta export)."""
    if getattr(unet, "peft_config", None):
        unet.fuse_lora()
        unet.unload_lora()


def changed_tensors(base_state: dict[str, torch.Tensor], unet) -> dict[str, torch.Tensor]:
    now = unet.state_dict()
    return {k: v for k, v in now.items() if k in base_state and not torch.equal(v.cpu(), base_state[k])}


def save_delta(base_state: dict[str, torch.Tensor], unet, out: Path) -> Path:
    delta = changed_tensors(base_state, unet)
    path = out / "delta.safetensors"
    save_safetensors(delta, path, {"format": "erase-unet-delta", "tensors": str(len(delta))})
    return path


def load_delta(pipe_or_unet, path: str | Path) -> int:
    """Overwrite the base UNet's tensors with those in ``delta.safetensors``; returns how many changed.

    ``load_delta(StableDiffusionPipeline.from_pretrained(base), "run/delta.safetensors")``.
    """
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    delta = load_safetensors(path)
    own = unet.state_dict()
    bad = [k for k, v in delta.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise EraseError(f"{path} does not fit this UNet (e.g. {bad[0]}); was it made from another base model?")
    unet.load_state_dict(delta, strict=False)
    return len(delta)
