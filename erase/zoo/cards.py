"""Model cards: ``README.md`` of each bundled model, rendered from the facts in its ``card.json``.

The training scripts record what they did (recipe, seed, steps, wall time, machine, command) and
``python -m erase.zoo check`` records the quality numbers; this module only formats them, so a
card never states a number that no run produced.
"""

from __future__ import annotations

import json
from pathlib import Path

from erase.storage import atomic_write_text

DATA = ("Fashion-MNIST (Xiao et al., 2017; MIT licence): the 60,000 training images, 28x28 gray, "
        "zero-padded to 32x32; read from Debian's `dataset-fashion-mnist` "
        "(`/usr/share/datasets/fashion-mnist`). Classes: t-shirt, trouser, pullover, dress, coat, sandal, "
        "shirt, sneaker, bag, ankle boot (labels 0-9).")

INTRO = {
    "classifier": (
        "fmnist-classifier", "Evaluator classifier: a CIFAR-stem ResNet-18 at width 16 (normalisation inside the "
        "model; input gray images in [0, 1], shape (N, 1, 32, 32)). It judges generated images (concept "
        "accuracy / UA) and its penultimate features define FID-fmnist.",
        'from erase.classifier.models import load_classifier\nmodel = load_classifier("fmnist-classifier").eval()\n'
        'logits = model(images01)          # (N, 1, 32, 32) in [0, 1]'),
    "sd": (
        "fmnist-tiny-sd", "A tiny text-to-image Stable Diffusion in diffusers format: the CLIP BPE tokenizer "
        "(derived exactly from open_clip's vocabulary), a small CLIPTextModel, a small AutoencoderKL (RGB, "
        "32x32 images -> 4x8x8 latents), a UNet2DConditionModel with cross-attention, a DDIM scheduler on SD "
        "1.x's noise schedule. The same code path as SD v1.4, at 32x32.",
        'from diffusers import StableDiffusionPipeline\npipe = StableDiffusionPipeline.from_pretrained(\n'
        '    "erase/zoo/fmnist-tiny-sd", safety_checker=None, requires_safety_checker=False)\n'
        'images = pipe(["a photo of a trouser"] * 4, num_inference_steps=25, guidance_scale=4.0).images'),
    "flow": (
        "fmnist-tiny-flow", "A tiny SD3-shaped rectified-flow text-to-image model in diffusers format "
        "(`StableDiffusion3Pipeline` without T5): two small CLIPTextModelWithProjection encoders reading the exact CLIP "
        "BPE tokenizer of `fmnist-tiny-sd`, an SD3Transformer2DModel (joint attention, RMS q/k norm as SD 3.5, patch 1) "
        "on 4x8x8 latents of the tiny SD's VAE (with SD3's shift_factor convention), and a flow-matching Euler "
        "scheduler. SD3-shaped rather than FLUX-shaped because `StableDiffusion3Pipeline` runs without its T5 encoder, "
        "while `FluxPipeline` always tokenizes with T5, whose SentencePiece vocabulary cannot be built offline; "
        "the same code path as SD 3 / 3.5, at 32x32.",
        'from diffusers import StableDiffusion3Pipeline\npipe = StableDiffusion3Pipeline.from_pretrained(\n'
        '    "erase/zoo/fmnist-tiny-flow", text_encoder_3=None, tokenizer_3=None)\n'
        'images = pipe(["a photo of a trouser"] * 4, num_inference_steps=25, guidance_scale=4.0).images'),
    "ddpm": (
        "fmnist-ddpm", "A class-conditional pixel-space DDPM (UNet2DModel with class embeddings, 1 x 32 x 32) "
        "trained with a null class for classifier-free guidance: labels 0-9 are the classes, **label 10 is "
        "the null (unconditional) class**. `DDPMPipeline` cannot pass class labels; sample with "
        "`erase.zoo.sampling.sample_ddpm`.",
        'from erase.zoo.sampling import load_ddpm, sample_ddpm\nunet, scheduler = load_ddpm("fmnist-ddpm")\n'
        'x = sample_ddpm(unet, scheduler, labels=[1] * 4, guidance=2.0, steps=50)   # [-1, 1]'),
}


# One command that rebuilds each model from scratch (defaults = the shipped recipe).
REGENERATE = {
    "classifier": "python -m erase.zoo.train_evaluator --output erase/zoo/fmnist-classifier",
    "sd": "python -m erase.zoo.train_tiny_sd --output erase/zoo/fmnist-tiny-sd   # trains the VAE first",
    "flow": "python -m erase.zoo.train_tiny_flow --output erase/zoo/fmnist-tiny-flow   # reuses fmnist-tiny-sd's VAE",
    "ddpm": "python -m erase.zoo.train_ddpm --output erase/zoo/fmnist-ddpm",
}
CHECK = "python -m erase.zoo check   # quality numbers below; --quick for a smoke run"


def card_kind(model_dir: Path) -> str:
    """The card template of a bundled model: "sd", "flow" (SD3-shaped), "ddpm" or "classifier"."""
    index = model_dir / "model_index.json"
    if index.is_file():
        return {"StableDiffusionPipeline": "sd", "StableDiffusion3Pipeline": "flow"}.get(
            json.loads(index.read_text()).get("_class_name"), "ddpm")
    return "classifier"


def _fmt_seconds(s: float) -> str:
    return f"{s:.0f} s ({s / 60:.1f} min)"


def _training_section(title: str, rec: dict) -> list[str]:
    lines = [f"### {title}", ""]
    if "recipe" in rec:
        lines.append("- recipe: " + ", ".join(f"{k}={v}" for k, v in rec["recipe"].items()))
    for key, label in (("params", "parameters"), ("steps", "optimiser steps"), ("final_loss", "final training loss (EMA-smoothed)"),
                       ("test_mse", "test MSE on [-1, 1]"), ("scaling_factor", "latent scaling_factor (1 / latent std)"),
                       ("null_class", "null class index"), ("test_accuracy", "test accuracy (%)")):
        if key in rec:
            v = rec[key]
            lines.append(f"- {label}: {round(v, 5) if isinstance(v, float) else v}")
    if "seconds" in rec:
        lines.append(f"- wall time: {_fmt_seconds(rec['seconds'])}"
                     + (f" ({rec['seconds_note']})" if rec.get("seconds_note") else ""))
    if "machine" in rec:
        lines.append(f"- machine: {rec['machine']}" + (f"; {rec['where']}" if rec.get("where") else ""))
    if "command" in rec:
        lines.append(f"- command: `{rec['command']}`")
    if rec.get("note"):
        lines.append(f"- note: {rec['note']}")
    return lines + [""]


def _quality_section(kind: str, q: dict) -> list[str]:
    if kind == "classifier":
        return ["## Quality", "", f"- Fashion-MNIST test accuracy: **{q['test_accuracy']} %** "
                f"({q['test_images']} test images).", ""]
    lines = ["## Quality (`python -m erase.zoo check`)", "",
             f"{q['images_per_class']} images per class, seed {q['seed']} + label, sampler {q['settings']}"
             + (f", prompt \"{q['prompt_template']}\"" if "prompt_template" in q else ", conditioned on the label")
             + f", judged by `{q['evaluator']}` (test accuracy {q['evaluator_test_accuracy']} %).", "",
             "| class | accuracy (%) |", "|---|---|"]
    lines += [f"| {c} | {a} |" for c, a in q["per_class_accuracy"].items()]
    lines += ["", f"- mean conditional accuracy: **{q['mean_accuracy']} %** (min class {q['min_class_accuracy']} %)",
              f"- FID-fmnist: **{q['fid_fmnist']}** (Frechet distance of the evaluator's penultimate features vs "
              f"{q['fid_reference_images']} test images; not an Inception FID)"]
    if "held_out" in q:
        lines.append(f"- held-out paraphrases (never in training captions): mean accuracy {q['held_out']['mean_accuracy']} % "
                     f"(min class {q['held_out']['min_class_accuracy']} %)")
    if "vae_reconstruction_accuracy" in q:
        lines.append(f"- evaluator accuracy on VAE reconstructions of test images: {q['vae_reconstruction_accuracy']} %")
    lines.append(f"- measured on: {q['machine']}")
    return lines + [""]


def render(model_dir: str | Path) -> str:
    model_dir = Path(model_dir)
    card = json.loads((model_dir / "card.json").read_text()) if (model_dir / "card.json").is_file() else {}
    kind = card_kind(model_dir)
    name, intro, usage = INTRO[kind]
    lines = [f"# {name}", "", intro, "", "## Data", "", DATA, ""]
    if kind in ("sd", "flow"):
        cap = card.get("training", {}).get("captions", {})
        lines += ["Captions: templates x class names with synonyms (`erase/zoo/captions.py`), "
                  f"{int(100 * cap.get('empty_rate', 0.1))} % empty captions for classifier-free guidance. "
                  "Held-out paraphrases (templates never trained: "
                  + ", ".join(f'"{t}"' for t in cap.get("held_out_templates", [])) + ") are listed in "
                  "`prompts/fmnist_heldout.csv`; every *word* of them was trained, because an unseen word has an "
                  "untrained embedding in a text encoder trained from scratch.", ""]
    lines += ["## Training", ""]
    if kind == "sd" and "vae" in card:
        lines += _training_section("VAE (AutoencoderKL)", card["vae"])
    if kind == "flow" and "vae" in card.get("training", {}):
        v = card["training"]["vae"]
        lines += ["### VAE (AutoencoderKL)", "", f"- {v['source']}; SD3's convention z = (x - shift_factor) x "
                  f"scaling_factor with shift_factor {v['shift_factor']} (training latents' mean) and scaling_factor "
                  f"{v['scaling_factor']} (1 / their std)", ""]
    if "training" in card:
        title = {"sd": "Text encoder + UNet (joint)", "flow": "Two CLIP text encoders + SD3 transformer (joint)",
                 "ddpm": "UNet2DModel", "classifier": "ResNet-18"}[kind]
        lines += _training_section(title, card["training"])
    if "quality" in card:
        lines += _quality_section(kind, card["quality"])
    lines += ["## Regenerate", "", "```bash", REGENERATE[kind]]
    lines += [CHECK] if kind != "classifier" else []
    lines += ["```", "", "## Use", "", "```python", usage, "```", "",
              "Weights are fp16 safetensors; configs ask for float32 on load. No local paths are stored.", ""]
    return "\n".join(lines)


def write_readme(model_dir: str | Path) -> Path:
    path = Path(model_dir) / "README.md"
    atomic_write_text(render(model_dir), path)
    return path
