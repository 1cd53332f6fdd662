"""What a diffusion run leaves behind: evaluation before and after, the erased model, grid and card.

``RunOutputs(task, base_model)`` generates and judges the base model's evaluation images before any
weight changes (the task creates it in ``before_training``); after training ``evaluate`` scores the
erased model on the same prompts and seeds and ``write_artifacts`` writes the grid and the model card.
``save_erased`` writes the erased model in the format the run asked for.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from erase.classifier.data import load_fashion_mnist
from erase.classifier.models import load_classifier
from erase.diffusion.data import cached_tensor
from erase.diffusion.evaluation import accuracy_metrics, eval_groups, generate_groups
from erase.diffusion.export import merge_lora, save_delta, save_lora, save_pipeline
from erase.diffusion.grid import before_after_grid
from erase.diffusion.loading import absent_components, pipeline_class
from erase.diffusion.text_model import own_text_encoder
from erase.metrics.fid import fid_metric, fit_reference
from erase.storage import atomic_path, atomic_write_text


def _evaluator(task):
    name = task.cfg.evaluator or ("fmnist-classifier" if task.fmnist else "")
    if not name:
        return None
    return load_classifier(name).to(task.device).eval()


def _fid_fmnist(task, judge):
    """FID-fmnist (the evaluator's features) with the Fashion-MNIST test set as the real side, or None.

    Only for the bundled Fashion-MNIST models judged by ``fmnist-classifier``; the real features are
    computed once per run and kept across ``reset()``.
    """
    if judge is None or not task.fmnist or (task.cfg.evaluator or "fmnist-classifier") != "fmnist-classifier":
        return None

    try:
        test = load_fashion_mnist(train=False, pad_to=32)
    except Exception:  # noqa: BLE001 - no data here: the run still reports accuracies
        return None
    return fit_reference(fid_metric(judge).to(task.device), test.get_batch(range(len(test)))["image"], task.device)


FAMILY = {"sd": "Stable Diffusion", "sdxl": "SDXL", "sd3": "SD3 (rectified flow)", "flux": "FLUX.1 (rectified flow)",
          "ddpm": "class-conditional DDPM"}


class RunOutputs:
    def __init__(self, task, model):
        """Generate the base model's evaluation images (and judge them) before any weight changes."""
        self.task, self.cfg, self.kind = task, task.cfg, task.kind
        self.trains_text_encoder = own_text_encoder(model) is not None  # the card says where that encoder went
        self.groups = eval_groups(task)
        key = {"base-images": task.base.fingerprint, "guidance": task.guidance, "steps": task.cfg.sample_steps,
               "groups": [[g.name, str(g.cond), g.seeds] for g in self.groups], **task.cache_tag()}
        flat = cached_tensor(key, lambda: torch.cat(generate_groups(task, model, self.groups)))
        self.before_images = list(flat.split([len(g.seeds) for g in self.groups]))
        self.after_images: list[torch.Tensor] = []
        self.judge = _evaluator(task)
        self.before_metrics = accuracy_metrics(task, self.groups, self.before_images, self.judge) if self.judge else {}
        self.fid = _fid_fmnist(task, self.judge)
        if self.fid is not None:
            self.before_metrics["fid"] = self._fid_of(self.before_images)

    def _fid_of(self, images: list[torch.Tensor]) -> float | None:
        """FID-fmnist of the concept and retain images (the paraphrase images are left out)."""
        if self.fid is None:
            return None
        self.fid.reset()
        for g, x in zip(self.groups, images):
            if g.name != "paraphrase":
                self.fid.update(x.to(self.task.device), real=False)
        return round(float(self.fid.compute()), 3)

    def evaluate(self, model) -> dict:
        task = self.task
        after = generate_groups(task, model, self.groups)
        self.after_images = after
        metrics = {"after": accuracy_metrics(task, self.groups, after, self.judge) if self.judge else {},
                   "before": self.before_metrics}
        fid = self._fid_of(after)
        if fid is not None:
            metrics["after"]["fid"] = fid
        metrics.update({k: v for k, v in metrics["after"].items() if not isinstance(v, dict)})
        metrics["settings"] = {
            "concept": task.concepts.concept, "retain": task.concepts.retain, "paraphrases": task.concepts.paraphrases,
            "evaluator": (self.cfg.evaluator or "fmnist-classifier") if self.judge else None,
            "guidance": task.guidance, "sample_steps": self.cfg.sample_steps,
            "images_per_prompt": self.cfg.eval_images, "seeds": f"{self.groups[0].seeds[0]}.. per prompt",
            "model": task.base.source, "prediction_type": task.base.prediction_type,
        }
        if fid is not None:
            metrics["settings"]["fid"] = ("FID-fmnist: Frechet distance of fmnist-classifier features, the concept and "
                                          "retain images vs the 10000 Fashion-MNIST test images (not Inception FID)")
        if not self.judge:
            metrics["note"] = "no evaluator for this model: pass --evaluator DIR for concept accuracy; see the grid"
        return metrics

    def write(self, out: Path, resolved: dict, metrics: dict, info: dict) -> None:
        """The before/after grid and the model card (README.md) beside the erased model."""
        k = self.cfg.grid_seeds
        task = self.task
        picks = [i for i, g in enumerate(self.groups) if g.name == "concept"]  # one row pair per erased concept
        for c in task.concepts.concepts:
            picks += [i for i, g in enumerate(self.groups) if g.name == "paraphrase" and g.target == c][:1]
        picks += [i for i, g in enumerate(self.groups) if g.name == "retain"][:4]
        rows = [(str(self.groups[i].cond) if self.kind != "ddpm" else f"class {self.groups[i].target}",
                 self.before_images[i][:k], self.after_images[i][:k]) for i in picks]
        with atomic_path(out / "grid.png") as tmp:
            before_after_grid(rows).save(tmp, format="PNG")
        b, a = metrics.get("before", {}), metrics.get("after", {})
        keys = [x for x in ("concept_acc", "paraphrase_acc", "other_acc", "fid") if x in a]
        table = ["| metric | base | erased |", "|---|---:|---:|"] + [f"| {x} | {b.get(x, '')} | {a.get(x, '')} |" for x in keys]
        where = {"pipeline": "model/", "lora": "lora/", "delta": "delta.safetensors"}[self.cfg.save_format]
        note = ""
        if self.trains_text_encoder:
            note = {"pipeline": " (with the trained text encoder in `model/text_encoder/`)",
                    "delta": " (the changed UNet and text-encoder tensors: apply it to the whole pipeline)"}.get(
                        self.cfg.save_format, "")
        pipe_cls = pipeline_class(self.kind).__name__ if self.kind != "ddpm" else ""
        absent = "".join(f", {k}=None" for k in absent_components(task.base.folder))  # SD3 saved without T5
        load = {
            "pipeline": (f"```python\nfrom diffusers import {pipe_cls}\n"
                         f"pipe = {pipe_cls}.from_pretrained(\"model\"{absent})\n```") if self.kind != "ddpm" else
                        ("```python\nfrom diffusers import DDPMScheduler, UNet2DModel\nunet = UNet2DModel.from_pretrained("
                         "\"model/unet\")\nscheduler = DDPMScheduler.from_pretrained(\"model/scheduler\")  # the class "
                         "in scheduler_config.json\n```"),
            "lora": (f"```python\npipe = {pipe_cls}.from_pretrained(BASE{absent})  # the base model above\n"
                     "pipe.load_lora_weights(\"lora\")\n```"),
            "delta": ("```python\nfrom erase.diffusion.export import load_delta\n"
                      "load_delta(base_pipeline, \"delta.safetensors\")  # the base model above\n```"),
        }[self.cfg.save_format]
        card = "\n".join([
            f"# {task.concepts.concept!r} erased from {task.base.source} with {info['method']}", "",
            f"- base model: `{task.base.source}` ({FAMILY[self.kind]}, "
            f"{task.base.prediction_type} prediction)",
            f"- method: `{info['method']}`, {info['steps']} steps, {info['total_s']:.0f} s on {info['machine']}",
            f"- evaluator: {metrics['settings']['evaluator'] or 'none'}; guidance {task.guidance}, "
            f"{self.cfg.sample_steps} {type(task.scheduler).__name__.removesuffix('Scheduler')} steps, "
            f"{self.cfg.eval_images} images per prompt",
            f"- weights: `{where}`{note}", "", "## Load", "", load, "", "## Metrics", "", *table, "",
            "## Before / after", "", "![before and after](grid.png)", "", "## Resolved configuration", "",
            "```yaml", yaml.safe_dump(resolved, sort_keys=False).rstrip(), "```", ""])
        atomic_write_text(card, out / "README.md")
        if self.cfg.save_format == "pipeline":
            atomic_write_text(card.replace("(grid.png)", "(../grid.png)"), out / "model" / "README.md")


def save_erased(task, model, out: Path, base_state: dict | None) -> None:
    """The erased model as the run asked: a pipeline folder, a LoRA folder or the changed tensors."""
    if task.cfg.save_format == "lora":
        save_lora(task, model, out)
        return
    merge_lora(model)
    if task.cfg.save_format == "delta":
        save_delta(base_state, model, out)
    else:
        save_pipeline(task, model, out)
