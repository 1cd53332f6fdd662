"""Write an erased model: a full diffusers folder, or only the tensors that changed.

``pipeline`` writes ``model/``: ``StableDiffusionPipeline.from_pretrained("…/model")`` (SDXL:
``StableDiffusionXLPipeline``; SD3: ``StableDiffusion3Pipeline``; FLUX: ``FluxPipeline``) loads it as usual (a DDPM:
``model/unet`` + ``model/scheduler``); a model whose text encoder was trained
(:class:`~erase.diffusion.text_model.TextConditionedUNet`) writes that encoder as ``model/text_encoder``.
``delta`` writes ``delta.safetensors`` with the changed tensors only: denoiser keys as the denoiser names
them (format ``erase-unet-delta``; "UNet" here and below also means SD3's / FLUX's transformer), or, when a text
encoder was trained, ``unet.*`` and ``text_encoder.*`` keys (format ``erase-delta``); :func:`load_delta`
applies either to the base pipeline. Both are written into a temporary folder / file and renamed into
place. LoRA exports hold denoiser adapters only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from erase.diffusion.loading import denoiser_attr, pipeline_class
from erase.diffusion.text_model import ENCODER_NAMES, TextConditionedUNet, denoiser
from erase.errors import EraseError
from erase.storage import atomic_dir, load_safetensors, save_safetensors

UNET_DELTA, DELTA = "erase-unet-delta", "erase-delta"  # the metadata "format" of the two kinds of delta file


def save_pipeline(task, model, out: Path) -> Path:
    with atomic_dir(out / "model") as tmp:
        if task.kind == "ddpm":
            model.save_pretrained(tmp / "unet", safe_serialization=True)
            task.scheduler.save_pretrained(tmp / "scheduler")
        else:
            pipe = task.base.pipe
            parts = {denoiser_attr(task.kind): denoiser(model), "scheduler": task.base.shipped_scheduler or pipe.scheduler}
            if isinstance(model, TextConditionedUNet):  # the trained encoders go where the pipeline keeps its own
                parts.update(zip(ENCODER_NAMES, model.text_encoders))
            original = {name: getattr(pipe, name) for name in parts}
            try:
                for name, part in parts.items():
                    setattr(pipe, name, part)
                pipe.save_pretrained(tmp, safe_serialization=True)
            finally:
                for name, part in original.items():
                    setattr(pipe, name, part)
    return out / "model"


def save_lora(task, unet, out: Path) -> Path:
    """The trained adapters as a diffusers LoRA folder: ``pipe.load_lora_weights("…/lora")``."""
    # lazy: peft pulls in transformers
    from peft.utils import get_peft_model_state_dict

    with atomic_dir(out / "lora") as tmp:
        layers = {f"{denoiser_attr(task.kind)}_lora_layers": get_peft_model_state_dict(unet)}
        pipeline_class(task.kind).save_lora_weights(tmp, **layers, safe_serialization=True)
    return out / "lora"


def merge_lora(unet) -> None:
    """Fold trained adapters into the UNet's weights (for a full or delta export)."""
    if getattr(unet, "peft_config", None):
        unet.fuse_lora()
        unet.unload_lora()


def changed_tensors(base_state: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    now = model.state_dict()
    return {k: v for k, v in now.items() if k in base_state and not torch.equal(v.cpu(), base_state[k])}


def save_delta(base_state: dict[str, torch.Tensor], model, out: Path) -> Path:
    """The tensors of ``model`` (a UNet, or a UNet with its trained text encoder) that differ from ``base_state``."""
    delta = changed_tensors(base_state, model)
    path = out / "delta.safetensors"
    if isinstance(model, TextConditionedUNet):
        parts = sorted({k.split(".", 1)[0] for k in delta})
        save_safetensors(delta, path, {"format": DELTA, "parts": ",".join(parts), "tensors": str(len(delta))})
    else:
        save_safetensors(delta, path, {"format": UNET_DELTA, "tensors": str(len(delta))})
    return path


def delta_format(path: str | Path) -> str | None:
    """The kind of erase delta ``path`` is (``erase-unet-delta`` / ``erase-delta``), or None for anything else."""
    try:
        with safe_open(str(path), "pt") as f:
            fmt = (f.metadata() or {}).get("format")
    except Exception:  # noqa: BLE001 - not a safetensors file: the caller reports it
        return None
    return fmt if fmt in (UNET_DELTA, DELTA) else None


def load_delta(pipe_or_unet, path: str | Path) -> int:
    """Overwrite the base model's tensors with those in ``delta.safetensors``; returns how many changed.

    ``load_delta(StableDiffusionPipeline.from_pretrained(base), "run/delta.safetensors")``. A delta that
    holds text-encoder tensors needs the pipeline (or a ``TextConditionedUNet``), not a bare UNet.
    """
    delta = load_safetensors(path)
    if delta_format(path) != DELTA:
        return _apply(_denoiser_of(pipe_or_unet), delta, path, "UNet")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in delta.items():
        part, _, name = key.partition(".")
        parts.setdefault(part, {})[name] = value
    unknown = sorted(set(parts) - {"unet", *ENCODER_NAMES})
    if unknown:
        raise EraseError(f"{path} holds tensors of {unknown[0]!r}, which erase does not write; is it an erase delta?")
    encoders = [name for name in ENCODER_NAMES if name in parts]
    if any(getattr(pipe_or_unet, name, None) is None for name in encoders):
        raise EraseError(f"{path} also holds text-encoder weights (the run trained the text encoder): apply it to the "
                         "whole pipeline, load_delta(pipe, path), not to its UNet")
    n = _apply(_denoiser_of(pipe_or_unet), parts.get("unet", {}), path, "UNet")
    for name in encoders:
        n += _apply(getattr(pipe_or_unet, name), parts[name], path, name.replace("_", " "))
    return n


def _denoiser_of(pipe_or_unet):
    """A pipeline's UNet or transformer; anything else is taken for the denoiser itself."""
    for attr in ("unet", "transformer"):
        if getattr(pipe_or_unet, attr, None) is not None:
            return getattr(pipe_or_unet, attr)
    return pipe_or_unet


def _apply(module, tensors: dict[str, torch.Tensor], path, what: str) -> int:
    own = module.state_dict()
    bad = [k for k, v in tensors.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise EraseError(f"{path} does not fit this {what} (e.g. {bad[0]}); was it made from another base model?")
    module.load_state_dict(tensors, strict=False)
    return len(tensors)
