"""CLIP models from local checkpoints, for torchmetrics ``CLIPScore`` and zero-shot concept accuracy.

``--clip-model`` accepts:

- a local transformers CLIP folder (``config.json`` with ``model_type: clip`` + weights + processor files);
- a local open_clip folder (``open_clip_config.json`` + weights), or ``open_clip:ARCH=FILE`` for an
  open_clip architecture name and a checkpoint file (e.g. ``open_clip:ViT-B-32=open_clip_model.safetensors``);
- a hub id (``openai/clip-vit-large-patch14``, or ``hf-hub:org/name`` for open_clip) — the only form
  that downloads, and only because the user named it.

Both kinds are wrapped in the (model, processor) interface torchmetrics' ``CLIPScore`` calls, so the
score is torchmetrics' own: 100 x max(cos(image, text), 0), averaged. Input convention: float RGB
in [0, 1] (N, 3, H, W), quantised to uint8 and handed to the checkpoint's own preprocessing
(resize, centre crop, normalisation).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image
from torch import nn

from erase.errors import EraseError

HOW = ("pass --clip-model with a local transformers CLIP folder (config.json + weights), an open_clip folder "
       "(open_clip_config.json) or open_clip:ARCH=FILE, or a hub id such as openai/clip-vit-large-patch14 (downloads)")


class _HFModel(nn.Module):
    """transformers CLIPModel -> plain feature tensors (transformers 5 returns output objects)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model.eval(), model.config

    @staticmethod
    def _tensor(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, pixel_values):
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids, attention_mask=None):
        return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


class _OpenClipModel(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.config = model.eval(), SimpleNamespace()  # no text_config: torchmetrics skips truncation

    def get_image_features(self, pixel_values):
        return self.model.encode_image(pixel_values)

    def get_text_features(self, input_ids, attention_mask=None):
        return self.model.encode_text(input_ids)


class _OpenClipProcessor:
    """open_clip's image transform and tokenizer behind a CLIPProcessor-like call."""

    def __init__(self, preprocess, tokenizer):
        self.preprocess, self.tokenizer = preprocess, tokenizer

    def __call__(self, images=None, text=None, return_tensors="pt", padding=True):
        if images is not None:
            pil = [Image.fromarray(_uint8(i).permute(1, 2, 0).numpy()) for i in images]
            return {"pixel_values": torch.stack([self.preprocess(p) for p in pil])}
        ids = self.tokenizer(list(text))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _uint8(img: torch.Tensor) -> torch.Tensor:
    if img.dtype == torch.uint8:
        return img.cpu()
    return (img.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


@dataclass
class ClipBundle:
    model: nn.Module         # get_image_features / get_text_features -> tensors
    processor: object        # processor(images=[CHW uint8]) / processor(text=[...])
    info: dict

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        px = self.processor(images=[_uint8(_rgb(i)) for i in images], return_tensors="pt", padding=True)["pixel_values"]
        f = self.model.get_image_features(px.to(next(self.model.parameters()).device))
        return f / f.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        t = self.processor(text=texts, return_tensors="pt", padding=True)
        dev = next(self.model.parameters()).device
        f = self.model.get_text_features(t["input_ids"].to(dev), t["attention_mask"].to(dev))
        return f / f.norm(dim=-1, keepdim=True)


def _rgb(img: torch.Tensor) -> torch.Tensor:
    return img.expand(3, -1, -1) if img.shape[0] == 1 else img


def _version(pkg: str) -> str:
    return f"{pkg} {version(pkg)}"


def _is_hub_id(spec: str) -> bool:
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not Path(spec).exists()


def load_clip(spec: str | None, device="cpu") -> ClipBundle:
    """Load a CLIP checkpoint named by ``spec`` (see the module docstring); one-line errors otherwise."""
    if not spec:
        raise EraseError("no CLIP checkpoint: " + HOW)
    convention = "float RGB [0, 1] -> uint8 -> the checkpoint's own resize, centre crop and normalisation"
    if spec.startswith("open_clip:"):
        # lazy: open_clip is optional and slow to import
        import open_clip

        arch, _, file = spec[len("open_clip:"):].partition("=")
        if not arch or not file:
            raise EraseError(f"--clip-model {spec!r}: write open_clip:ARCH=FILE, e.g. open_clip:ViT-B-32=model.safetensors")
        if not Path(file).expanduser().is_file():
            raise EraseError(f"CLIP checkpoint not found: {file}; " + HOW)
        if arch not in open_clip.list_models():
            raise EraseError(f"open_clip has no architecture {arch!r} (e.g. {', '.join(open_clip.list_models()[:3])}, …)")
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(Path(file).expanduser()))
        bundle = ClipBundle(_OpenClipModel(model), _OpenClipProcessor(preprocess, open_clip.get_tokenizer(arch)),
                            {"name": f"open_clip {arch}", "weights_source": str(file)})
    else:
        p = Path(spec).expanduser()
        if p.is_dir() and (p / "open_clip_config.json").is_file():
            bundle = _open_clip_named(f"local-dir:{p}", str(p))
        elif p.is_dir() and (p / "config.json").is_file():
            bundle = _transformers(str(p), True)
        elif p.exists():
            raise EraseError(f"{p} is not a CLIP checkpoint folder (no config.json or open_clip_config.json); " + HOW)
        elif spec.startswith("hf-hub:"):
            bundle = _open_clip_named(spec, spec)
        elif _is_hub_id(spec):
            bundle = _transformers(spec, False)
        else:
            raise EraseError(f"CLIP checkpoint not found: {spec}; " + HOW)
    bundle.model.to(device)
    bundle.info.update(threshold=None, input_convention=convention)
    return bundle


def _open_clip_named(name: str, source: str) -> ClipBundle:
    # lazy: open_clip is optional and slow to import
    import open_clip

    try:
        model, preprocess = open_clip.create_model_from_pretrained(name)
    except Exception as err:  # open_clip raises many types for a bad folder or hub id
        raise EraseError(f"could not load the open_clip model {source}: {str(err).splitlines()[0]}") from err
    return ClipBundle(_OpenClipModel(model), _OpenClipProcessor(preprocess, open_clip.get_tokenizer(name)),
                      {"name": f"open_clip {source}", "version": _version("open_clip_torch"), "weights_source": source})


def _transformers(spec: str, local: bool) -> ClipBundle:
    # lazy: transformers takes seconds to import
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(spec, local_files_only=local)
        processor = CLIPProcessor.from_pretrained(spec, local_files_only=local)
    except (OSError, ValueError) as err:
        where = "folder" if local else "hub id"
        raise EraseError(f"could not load CLIP {where} {spec}: {str(err).splitlines()[0]}; " + HOW) from err
    return ClipBundle(_HFModel(model), processor, {"name": f"transformers CLIPModel {Path(spec).name if local else spec}",
                                                   "version": _version("transformers"), "weights_source": spec})


def clip_score_metric(bundle: ClipBundle):
    """torchmetrics ``CLIPScore`` over this checkpoint; update(images uint8 (N, 3, H, W), prompts)."""
    # lazy: torchmetrics' image/multimodal metrics pull in heavy extras
    from torchmetrics.multimodal.clip_score import CLIPScore

    metric = CLIPScore(model_name_or_path=lambda: (bundle.model, bundle.processor))
    bundle.info.setdefault("version", _version("open_clip_torch"))
    bundle.info["metric"] = f"torchmetrics {__import__('torchmetrics').__version__} CLIPScore: 100 x max(cos, 0), mean"
    return metric


def clip_score_update(metric, images: torch.Tensor, prompts: list[str]) -> None:
    """Feed float RGB [0, 1] images (converted to uint8, gray -> RGB) and their prompts."""
    metric.update([_uint8(_rgb(i)) for i in images], list(prompts))
