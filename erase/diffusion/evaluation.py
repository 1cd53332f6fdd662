"""Judge a diffusion model by what it generates: concept accuracy, other-class accuracy, paraphrases.

An evaluator classifier (the bundled ``fmnist-classifier`` for the bundled models, or any
classifier folder saved by erase) labels every generated image. Concept accuracy is the share of
images generated from the concept's prompt that it assigns to the concept (UA = 100 − that);
other-class accuracy is, per retain concept, the share assigned to that concept, averaged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from erase.progress import progress_enabled

EVAL_SEED = 10_000


@dataclass
class Group:
    name: str          # "concept", "paraphrase", "retain"
    target: str        # canonical concept name the images should show
    cond: object       # prompt text (SD) or class index (DDPM)
    seeds: list[int]


def eval_groups(task) -> list[Group]:
    cs, n = task.concepts, task.cfg.eval_images
    seeds = list(range(EVAL_SEED, EVAL_SEED + n))
    if task.kind == "ddpm":
        groups = [Group("concept", cs.concept, task.concept_class, seeds)]
        groups += [Group("retain", r, cs.class_index[r], seeds) for r in cs.retain]
        return groups
    groups = [Group("concept", cs.concept, cs.prompt(cs.concept), seeds)]
    per_para = seeds[: max(2, n // 4)]
    groups += [Group("paraphrase", cs.concept, p, per_para) for p in cs.paraphrases]
    groups += [Group("retain", r, cs.prompt(r), seeds) for r in cs.retain]
    return groups


@torch.no_grad()
def generate_groups(task, unet, groups: list[Group]) -> list[torch.Tensor]:
    """Images in [0, 1] for every group, in order, with each image's own seed."""
    from erase.diffusion.sampling import sample_ddpm, sample_sd

    was = unet.training
    unet.eval()
    out = []
    for g in tqdm(groups, desc="generating", leave=False, disable=not progress_enabled()):
        if task.kind == "ddpm":
            x, _ = sample_ddpm(unet, task.scheduler, [g.cond] * len(g.seeds), g.seeds, task.guidance,
                               task.cfg.sample_steps, task.null_class)
        else:
            emb = task.encode([g.cond]).expand(len(g.seeds), -1, -1)
            x, _ = sample_sd(task.base.pipe, unet, emb, task.null_condition(len(g.seeds), task.device), g.seeds,
                             task.guidance, task.cfg.sample_steps)
        out.append(task.to_images(x).cpu())
    unet.train(was)
    return out


@torch.no_grad()
def classify(evaluator, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Evaluator class ids for images in [0, 1] (any channel count or size; adapted to the evaluator)."""
    cfg = evaluator.config
    device = next(evaluator.parameters()).device
    preds = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device).float()
        if x.shape[1] != cfg.in_channels:
            x = x.mean(1, keepdim=True).expand(-1, cfg.in_channels, -1, -1)
        if x.shape[-1] != cfg.image_size:
            x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear", antialias=True, align_corners=False)
        preds.append(evaluator(x).argmax(1).cpu())
    return torch.cat(preds)


def accuracy_metrics(task, groups: list[Group], images: list[torch.Tensor], evaluator) -> dict:
    names = [n.lower() for n in evaluator.config.class_names]

    def share(g: Group, imgs: torch.Tensor) -> float:
        if g.target.lower() not in names:
            return float("nan")
        return 100.0 * float((classify(evaluator, imgs) == names.index(g.target.lower())).float().mean())

    concept = [share(g, x) for g, x in zip(groups, images) if g.name == "concept"][0]
    para = [share(g, x) for g, x in zip(groups, images) if g.name == "paraphrase"]
    per_class = {g.target: round(share(g, x), 2) for g, x in zip(groups, images) if g.name == "retain"}
    out = {"concept_acc": round(concept, 2), "UA": round(100 - concept, 2),
           "other_acc": round(sum(per_class.values()) / max(len(per_class), 1), 2), "other_per_class": per_class}
    if para:
        out["paraphrase_acc"] = round(sum(para) / len(para), 2)
    return out
