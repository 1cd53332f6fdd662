"""Judge a diffusion model by what it generates: concept accuracy, other-class accuracy, paraphrases.

An evaluator classifier (the bundled ``fmnist-classifier`` for the bundled models, or any
classifier folder saved by erase) labels every generated image. Concept accuracy is the share of
images generated from the concept's prompt that it assigns to the concept (UA = 100 − that);
other-class accuracy is, per retain concept, the share assigned to that concept, averaged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from erase.classifier.models import classify
from erase.diffusion.sampling import sample_ddpm
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
        groups = [Group("concept", c, k, seeds) for c, k in zip(cs.concepts, task.concept_classes)]
        groups += [Group("retain", r, cs.class_index[r], seeds) for r in cs.retain]
        return groups
    groups = [Group("concept", c, cs.prompt(c), seeds) for c in cs.concepts]
    per_para = seeds[: max(2, n // 4)]
    groups += [Group("paraphrase", c, p, per_para) for c in cs.concepts for p in cs.paraphrases.get(c, [])]
    groups += [Group("retain", r, cs.prompt(r), seeds) for r in cs.retain]
    return groups


@torch.no_grad()
def generate_groups(task, unet, groups: list[Group]) -> list[torch.Tensor]:
    """Images in [0, 1] for every group, in order, with each image's own seed."""
    was = unet.training
    unet.eval()
    out = []
    for g in tqdm(groups, desc="generating", leave=False, disable=not progress_enabled()):
        if task.kind == "ddpm":
            x, _ = sample_ddpm(unet, task.scheduler, [g.cond] * len(g.seeds), g.seeds, task.guidance,
                               task.cfg.sample_steps, task.null_class)
            out.append(task.to_images(x).cpu())
        else:
            # A model that trained its text encoder reads the prompt through it (the task's encoder is the base's).
            out.append(task.generate(unet, task.encode_for(unet, [g.cond]), g.seeds))
    unet.train(was)
    return out


def accuracy_metrics(task, groups: list[Group], images: list[torch.Tensor], evaluator) -> dict:
    names = [n.lower() for n in evaluator.config.class_names]

    def share(g: Group, imgs: torch.Tensor) -> float:
        if g.target.lower() not in names:
            return float("nan")
        return 100.0 * float((classify(evaluator, imgs) == names.index(g.target.lower())).float().mean())

    per_concept = {g.target: share(g, x) for g, x in zip(groups, images) if g.name == "concept"}
    para: dict[str, list[float]] = {}
    for g, x in zip(groups, images):
        if g.name == "paraphrase":
            para.setdefault(g.target, []).append(share(g, x))
    per_class = {g.target: round(share(g, x), 2) for g, x in zip(groups, images) if g.name == "retain"}
    concept = _mean(per_concept.values())
    out = {"concept_acc": round(concept, 2), "UA": round(100 - concept, 2),
           "other_acc": round(_mean(per_class.values()), 2), "other_per_class": per_class}
    if para:
        out["paraphrase_acc"] = round(_mean(_mean(v) for v in para.values()), 2)
    if len(per_concept) > 1:  # several erased concepts: each one's numbers, the headline is their mean
        out["concept_acc_per_concept"] = {c: round(v, 2) for c, v in per_concept.items()}
        if para:
            out["paraphrase_acc_per_concept"] = {c: round(_mean(v), 2) for c, v in para.items()}
    return out


def _mean(values) -> float:
    values = list(values)
    return sum(values) / max(len(values), 1)
