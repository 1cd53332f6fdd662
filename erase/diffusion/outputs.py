"""What a diffusion run leaves behind: evaluation before and after, the erased model, grid and card.

The runner calls ``before_training`` (the base model's images and scores, before any weight
changes), then ``save_model``, ``evaluate`` and ``write_artifacts`` after training.
"""

from __future__ import annotations

from pathlib import Path

import torch


def _evaluator(task):
    from erase.classifier.models import load_classifier

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
    from erase.classifier.data import load_fashion_mnist
    from erase.metrics.fid import fid_metric, fit_reference

    try:
        test = load_fashion_mnist(train=False, pad_to=32)
    except Exception:  # noqa: BLE001 - no data here: the run still reports accuracies
        return None
    return fit_reference(fid_metric(judge).to(task.device), test.get_batch(range(len(test)))["image"], task.device)


class DiffusionOutputs:
    def _fid_of(self, images: list[torch.Tensor]) -> float | None:
        """FID-fmnist of the concept and retain images (the paraphrase images are left out)."""
        if getattr(self, "_fid", None) is None:
            return None
        self._fid.reset()
        for g, x in zip(self._groups, images):
            if g.name != "paraphrase":
                self._fid.update(x.to(self.device), real=False)
        return round(float(self._fid.compute()), 3)

    def before_training(self, model, out: Path) -> None:
        """Generate the base model's evaluation images (and judge them) before any weight changes."""
        from erase.diffusion.data import cached_tensor
        from erase.diffusion.evaluation import accuracy_metrics, eval_groups, generate_groups

        self._groups = eval_groups(self)
        key = {"base-images": self.base.fingerprint, "guidance": self.guidance, "steps": self.cfg.sample_steps,
               "groups": [[g.name, str(g.cond), g.seeds] for g in self._groups]}
        flat = cached_tensor(key, lambda: torch.cat(generate_groups(self, model, self._groups)))
        sizes = [len(g.seeds) for g in self._groups]
        self._before_images = list(flat.split(sizes))
        self._judge = _evaluator(self)
        self._before_metrics = accuracy_metrics(self, self._groups, self._before_images, self._judge) if self._judge else {}
        self._fid = _fid_fmnist(self, self._judge)
        if self._fid is not None:
            self._before_metrics["fid"] = self._fid_of(self._before_images)


    def evaluate(self, model, device=None) -> dict:
        from erase.diffusion.evaluation import accuracy_metrics, generate_groups

        after = generate_groups(self, model, self._groups)
        self._after_images = after
        metrics = {"after": accuracy_metrics(self, self._groups, after, self._judge) if self._judge else {},
                   "before": self._before_metrics}
        fid = self._fid_of(after)
        if fid is not None:
            metrics["after"]["fid"] = fid
        metrics.update({k: v for k, v in metrics["after"].items() if not isinstance(v, dict)})
        metrics["settings"] = {
            "concept": self.concepts.concept, "retain": self.concepts.retain, "paraphrases": self.concepts.paraphrases,
            "evaluator": (self.cfg.evaluator or "fmnist-classifier") if self._judge else None,
            "guidance": self.guidance, "sample_steps": self.cfg.sample_steps,
            "images_per_prompt": self.cfg.eval_images, "seeds": f"{self._groups[0].seeds[0]}.. per prompt",
            "model": self.base.source, "prediction_type": self.base.prediction_type,
        }
        if fid is not None:
            metrics["settings"]["fid"] = ("FID-fmnist: Frechet distance of fmnist-classifier features, the concept and "
                                          "retain images vs the 10000 Fashion-MNIST test images (not Inception FID)")
        if not self._judge:
            metrics["note"] = "no evaluator for this model: pass --evaluator DIR for concept accuracy; see the grid"
        return metrics


    def save_model(self, model, out: Path) -> None:
        from erase.diffusion.export import merge_lora, save_delta, save_lora, save_pipeline

        if self.cfg.save_format == "lora":
            save_lora(self, model, out)
            return
        merge_lora(model)
        if self.cfg.save_format == "delta":
            save_delta(self._base_state, model, out)
        else:
            save_pipeline(self, model, out)
        self._out = out


    def write_artifacts(self, out: Path, resolved: dict, metrics: dict, info: dict) -> None:
        """The before/after grid and the model card (README.md) beside the erased model."""
        import yaml

        from erase.diffusion.grid import before_after_grid
        from erase.storage import atomic_path, atomic_write_text

        k = self.cfg.grid_seeds
        picks = [i for i, g in enumerate(self._groups) if g.name == "concept"]
        picks += [i for i, g in enumerate(self._groups) if g.name == "paraphrase"][:1]
        picks += [i for i, g in enumerate(self._groups) if g.name == "retain"][:4]
        rows = [(str(self._groups[i].cond) if self.kind == "sd" else f"class {self._groups[i].target}",
                 self._before_images[i][:k], self._after_images[i][:k]) for i in picks]
        with atomic_path(out / "grid.png") as tmp:
            before_after_grid(rows).save(tmp, format="PNG")
        b, a = metrics.get("before", {}), metrics.get("after", {})
        keys = [x for x in ("concept_acc", "paraphrase_acc", "other_acc", "fid") if x in a]
        table = ["| metric | base | erased |", "|---|---:|---:|"] + [f"| {x} | {b.get(x, '')} | {a.get(x, '')} |" for x in keys]
        where = {"pipeline": "model/", "lora": "lora/", "delta": "delta.safetensors"}[self.cfg.save_format]
        load = {
            "pipeline": ("```python\nfrom diffusers import StableDiffusionPipeline\n"
                         "pipe = StableDiffusionPipeline.from_pretrained(\"model\")\n```") if self.kind == "sd" else
                        ("```python\nfrom diffusers import DDPMScheduler, UNet2DModel\nunet = UNet2DModel.from_pretrained("
                         "\"model/unet\")\nscheduler = DDPMScheduler.from_pretrained(\"model/scheduler\")  # the class "
                         "in scheduler_config.json\n```"),
            "lora": ("```python\npipe = StableDiffusionPipeline.from_pretrained(BASE)  # the base model above\n"
                     "pipe.load_lora_weights(\"lora\")\n```"),
            "delta": ("```python\nfrom erase.diffusion.export import load_delta\n"
                      "load_delta(base_pipeline, \"delta.safetensors\")  # the base model above\n```"),
        }[self.cfg.save_format]
        card = "\n".join([
            f"# {self.concepts.concept!r} erased from {self.base.source} with {info['method']}", "",
            f"- base model: `{self.base.source}` ({'Stable Diffusion' if self.kind == 'sd' else 'class-conditional DDPM'}, "
            f"{self.base.prediction_type} prediction)",
            f"- method: `{info['method']}`, {info['steps']} steps, {info['total_s']:.0f} s on {info['machine']}",
            f"- evaluator: {metrics['settings']['evaluator'] or 'none'}; guidance {self.guidance}, "
            f"{self.cfg.sample_steps} {type(self.scheduler).__name__.removesuffix('Scheduler')} steps, "
            f"{self.cfg.eval_images} images per prompt",
            f"- weights: `{where}`", "", "## Load", "", load, "", "## Metrics", "", *table, "",
            "## Before / after", "", "![before and after](grid.png)", "", "## Resolved configuration", "",
            "```yaml", yaml.safe_dump(resolved, sort_keys=False).rstrip(), "```", ""])
        atomic_write_text(card, out / "README.md")
        if self.cfg.save_format == "pipeline":
            atomic_write_text(card.replace("(grid.png)", "(../grid.png)"), out / "model" / "README.md")
