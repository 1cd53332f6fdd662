"""Images from a base and an erased model on the same prompts and seeds, resumable and multi-process.

Layout of an output folder (what ``erase/evaluate.py images`` reads back):

    generation.json   settings that produced the images (a rerun with other settings is refused)
    images.csv        one row per image: file, model, case_number, k, prompt, seed, guidance, negative_prompt, concept
    base/<case>_<k>.png, erased/<case>_<k>.png
    grids/<group>.png before/after grids, one per prompt group (a concept, or a prompt)

Image k of a CSV row uses seed ``row.seed + k``, its own CPU generator: the same image whatever
the batch, the process count or the device. Work is split across processes with accelerate's
``PartialState.split_between_processes`` over the full job list (not just the missing images,
so that every process computes the same split even while others are writing); each image is
written atomically and skipped when it already exists, so an interrupted run resumes for free.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from PIL import Image

from erase.classifier.data import CIFAR10_CLASSES, FASHION_MNIST_CLASSES
from erase.diffusion.export import delta_format, load_delta
from erase.diffusion.flux import t5_length
from erase.diffusion.grid import before_after_grid
from erase.diffusion.loading import default_guidance, load_base  # noqa: F401  (default_guidance: erase.generate)
from erase.diffusion.sampling import sample_ddpm
from erase.errors import EraseError
from erase.prompts import PromptRow
from erase.storage import atomic_path, atomic_write_json, load_png

INDEX_COLUMNS = ["file", "model", "case_number", "k", "prompt", "seed", "guidance", "negative_prompt", "concept"]


@dataclass
class Job:
    model: str
    row: PromptRow
    k: int
    guidance: float

    @property
    def seed(self) -> int:
        return self.row.seed + self.k

    @property
    def file(self) -> str:
        return f"{self.model}/{_slug(self.row.case)}_{self.k}.png"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "x"


# --- models ----------------------------------------------------------------------------------------

def _is_delta(path: Path) -> bool:
    return delta_format(path) is not None  # not a safetensors file: load_base reports it


def _run_base(run: Path) -> str | None:
    """The base model an erase run folder was trained from (its config.yaml)."""
    cfg = run / "config.yaml"
    if not cfg.is_file():
        return None
    return (yaml.safe_load(cfg.read_text()) or {}).get("diffusion", {}).get("model")


def resolve_erased(spec: str, base: str | None) -> tuple[str, Path | None, str | None]:
    """(model to load, delta file or None, base implied by a run folder) for an ``--erased`` spec.

    Accepts a diffusers folder, a ``delta.safetensors`` (applied to ``--base``), or an erase run
    folder holding ``model/`` or ``delta.safetensors``.
    """
    p = Path(spec).expanduser()
    if p.is_dir() and not (p / "model_index.json").is_file() and not (p / "unet").is_dir():
        implied = _run_base(p)
        if (p / "model").is_dir():
            return str(p / "model"), None, implied
        if (p / "delta.safetensors").is_file():
            if not (base or implied):
                raise EraseError(f"{p}/delta.safetensors needs its base model: pass --base")
            return base or implied, p / "delta.safetensors", implied
        raise EraseError(f"{p} holds neither a diffusers model, model/, nor delta.safetensors")
    if p.is_file() and p.suffix == ".safetensors" and _is_delta(p):
        if not base:
            raise EraseError(f"{p} is an erase delta (changed tensors only): pass --base with the model it was made from")
        return base, p, None
    return spec, None, None


def load_generator(spec: str, device, delta: Path | None = None):
    # lazy: transformers takes seconds to import
    from transformers.utils import logging as transformers_logging


    transformers_logging.disable_progress_bar()  # "Loading weights" bars per model are noise in generation logs
    model = load_base(spec, device)
    if delta is not None:  # to the pipeline: a delta of a run that trained the text encoder changes it too
        load_delta(model.pipe if model.pipe is not None else model.unet, delta)
        model.source = f"{model.source} + {delta}"
    model.unet.eval()
    return model


def trained_text_encoder(erased, base_pipe) -> list | None:
    """The erased model's CLIP text encoders (SD: one; SDXL / SD3: two) when any differs from the base model's (a run
    that trained them, e.g. advunlearn), else None: then the erased model reads the same conditions as the base."""
    if erased.pipe is None or base_pipe is None:
        return None
    names = [n for n in ("text_encoder", "text_encoder_2") if getattr(erased.pipe, n, None) is not None]
    for name in names:
        mine, theirs = getattr(erased.pipe, name).state_dict(), getattr(base_pipe, name).state_dict()
        if mine.keys() != theirs.keys() or not all(torch.equal(v, theirs[k].to(v.device)) for k, v in mine.items()):
            return [getattr(erased.pipe, n) for n in names]
    return None


def ddpm_class_names(model) -> list[str]:
    """``class_names.json`` beside the UNet, else Fashion-MNIST / CIFAR-10 names for 10 classes, else indices."""
    k = model.unet.config.num_class_embeds - 1
    f = model.folder / "class_names.json" if model.folder else None
    if f is not None and f.is_file():
        return json.loads(f.read_text())
    if k == 10:
        return list(FASHION_MNIST_CLASSES) if "fmnist" in str(model.source) else list(CIFAR10_CLASSES)
    return [str(i) for i in range(k)]


@torch.no_grad()
def render(model, jobs: list[Job], steps: int) -> torch.Tensor:
    """Images in [0, 1] for jobs that share one guidance value."""
    gens = [torch.Generator().manual_seed(j.seed) for j in jobs]
    g = jobs[0].guidance
    if model.kind == "ddpm":
        names = [n.lower() for n in ddpm_class_names(model)]
        labels = []
        for j in jobs:
            c = j.row.concept.strip().lower()
            if c.isdigit() and int(c) < len(names):
                labels.append(int(c))
            elif c in names:
                labels.append(names.index(c))
            else:
                raise EraseError(f"prompt row {j.row.case}: {j.row.concept!r} is not a class of this DDPM ({', '.join(names)})")
        x, _ = sample_ddpm(model.unet, model.scheduler, labels, [j.seed for j in jobs], g, steps,
                           model.unet.config.num_class_embeds - 1)
        return ((x.float() + 1) / 2).clamp(0, 1).cpu()
    negative = [j.row.negative_prompt for j in jobs]
    if model.kind == "flux":
        # FLUX's default call has no negative side: guidance_scale is the embedded guidance (erase.diffusion.flux).
        if any(negative):
            case = next(j.row.case for j in jobs if j.row.negative_prompt)
            raise EraseError(f"prompt row {case} has a negative prompt; FLUX.1 is guidance-distilled and its default "
                             "call reads none: drop the negative_prompt column for FLUX")
        out = model.pipe(prompt=[j.row.prompt for j in jobs], guidance_scale=g, num_inference_steps=steps,
                         generator=gens, output_type="pt", max_sequence_length=t5_length(model.unet))
        return out.images.float().clamp(0, 1).cpu()
    if model.kind == "sdxl" and not any(negative):
        negative = None  # SDXL then guides against zeros (force_zeros_for_empty_prompt), as erase trains it
    out = model.pipe(prompt=[j.row.prompt for j in jobs], negative_prompt=negative, guidance_scale=g,
                     num_inference_steps=steps, generator=gens, output_type="pt")
    return out.images.float().clamp(0, 1).cpu()


# --- files -----------------------------------------------------------------------------------------

def save_png(img: torch.Tensor, path: Path) -> None:
    arr = (img.float().clamp(0, 1) * 255).round().to(torch.uint8)
    arr = arr.expand(3, -1, -1) if arr.shape[0] == 1 else arr
    with atomic_path(path) as tmp:
        Image.fromarray(arr.permute(1, 2, 0).numpy()).save(tmp, format="PNG")


def write_index(out: Path, jobs: list[Job]) -> Path:
    path = out / "images.csv"
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(INDEX_COLUMNS)
        for j in jobs:
            w.writerow([j.file, j.model, j.row.case, j.k, j.row.prompt, j.seed, j.guidance, j.row.negative_prompt,
                        j.row.concept])
    return path


def check_settings(out: Path, settings: dict, overwrite: bool) -> None:
    """Refuse to mix images made with other settings into one folder (resume needs the same ones)."""
    f = out / "generation.json"
    if f.is_file() and not overwrite:
        old = json.loads(f.read_text())
        keys = ("models", "steps", "images_per_prompt", "prompts_sha256", "guidance")
        diff = [k for k in keys if old.get(k) != settings.get(k)]
        if diff:
            raise EraseError(f"{out} holds images generated with other settings (differs in: {', '.join(diff)}); "
                             "pass another --output-dir, or --overwrite to replace them")
    if overwrite:
        for m in settings["models"]:
            shutil.rmtree(out / m, ignore_errors=True)
    atomic_write_json(settings, f)


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_grids(out: Path, jobs: list[Job], models: list[str], seeds: int = 4, prompts_per_grid: int = 4) -> list[Path]:
    """One before/after grid per prompt group: up to ``prompts_per_grid`` prompts x ``seeds`` images.

    Columns are the first images of a prompt in CSV order (its k = 0, 1, … and further rows with
    the same prompt, as in ESD's Imagenette CSV), the same files for both models.
    """
    if len(models) < 2:
        return []
    groups: dict[str, dict[str, list[Job]]] = {}
    for j in jobs:
        if j.model != models[0]:
            continue
        prompts = groups.setdefault(j.row.group, {})
        key = j.row.prompt or f"class {j.row.concept}"
        if key in prompts or len(prompts) < prompts_per_grid:
            cols = prompts.setdefault(key, [])
            if len(cols) < seeds:
                cols.append(j)
    written = []
    for group, prompts in groups.items():
        rows = []
        for label, cols in prompts.items():
            before = torch.stack([load_png(out / j.file) for j in cols])
            after = torch.stack([load_png(out / Job(models[1], j.row, j.k, j.guidance).file) for j in cols])
            rows.append((label, before, after))
        path = out / "grids" / f"{_slug(group)}.png"
        with atomic_path(path) as tmp:
            before_after_grid(rows).save(tmp, format="PNG")
        written.append(path)
    return written
