"""boundary_shrink — Boundary Shrink (Chen et al., CVPR 2023): relabel Df to its nearest wrong class.

Reference code: TY-LEE-KR/Boundary-Unlearning-Code ``boundary_unlearning.py::boundary_shrink`` and
``adv_generator.py::FGSM`` (a mirror of the authors' code); re-implemented in
OPTML-Group/Unlearn-Saliency ``Classification/unlearn/boundary_sh.py``. For every forget batch:

1. a frozen copy of the *original* model (eval mode) is attacked with one untargeted FGSM step of
   size ε = 0.1 in [0, 1] pixel space: x' = clamp(x + ε·sign(∇ₓ CE(fo(x), y)), 0, 1), rounded to
   the 1/255 grid (``--clamp false`` skips both for inputs that are not images in [0, 1]);
2. the neighbour label is y' = argmax fo(x') — it can equal y when the attack fails; the reference
   does not force y' ≠ y;
3. the model being unlearned (train mode) minimises CE(f(x), y') on the *clean* x. Forget set only.

Defaults from the original code (``main.py``, ``boundary_shrink``): SGD lr 1e-5, momentum 0.9,
**no weight decay**, batch 64, 10 epochs over the forget set. SalUn's re-implementation instead uses
its shared optimiser (weight decay 5e-4, batch 256) and a searched lr; a SalUn maintainer states
"the step size of FGSM is fixed at 0.1" (OPTML-Group/Unlearn-WorstCase issue #1). Not reproduced:
the original's attack (de)normalises with mismatched constants (blue mean 0.2265, std of another
CIFAR convention), so its effective pixel-space ε is not exactly 0.1; our models normalise inside,
so the attack works on [0, 1] pixels directly (the sign of the gradient is unaffected by the
per-channel normalisation). The optional 'curv' / 'weight_assign' extras are not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from erase.engine.method import Method, MethodConfig
from erase.errors import EraseError
from erase.fields import opt
from erase.registry import register_method


@dataclass
class BoundaryShrinkConfig(MethodConfig):
    epochs: float = opt(10.0, "epochs over the forget set")
    lr: float = opt(1e-5, "learning rate")
    weight_decay: float = opt(0.0, "weight decay (the original code uses none)")
    batch_size: int = opt(64, "examples per optimiser step")
    epsilon: float = opt(0.1, "FGSM step size in input units ([0, 1] pixels)")
    clamp: bool = opt(True, "clamp attacked inputs to [0, 1] and round them to the 1/255 grid")

    def validate(self) -> None:
        super().validate()
        if self.epsilon < 0:
            raise EraseError(f"--epsilon must be >= 0, got {self.epsilon}")


@register_method("boundary_shrink")
class BoundaryShrink(Method):
    tasks = ("classifier",)
    Config = BoundaryShrinkConfig
    streams = ("forget",)
    default_weights = {"forget_neighbour_ce": 1.0}

    def setup(self, ctx):
        self.original = ctx.frozen_copy()

    def attack(self, batch: dict, ctx) -> torch.Tensor:
        """x' = x + ε·sign(∇ₓ CE(fo(x), y)) under the frozen original (clamped and quantised if asked)."""
        x = batch["image"].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(ctx.task.logits(self.original, {**batch, "image": x}), batch["label"])
            (grad,) = torch.autograd.grad(loss, x)
        x_adv = batch["image"] + self.config.epsilon * grad.sign()
        if self.config.clamp:
            x_adv = torch.round(x_adv.clamp(0, 1) * 255) / 255
        return x_adv.detach()

    @torch.no_grad()
    def neighbour_labels(self, batch: dict, ctx) -> torch.Tensor:
        """y' = argmax fo(x'): the class the original model assigns to the attacked input."""
        x_adv = self.attack(batch, ctx)
        return ctx.task.logits(self.original, {**batch, "image": x_adv}).argmax(dim=1)

    def losses(self, batch, ctx):
        forget = batch["forget"]
        relabeled = {**forget, "label": self.neighbour_labels(forget, ctx)}
        return {"forget_neighbour_ce": ctx.task.loss(ctx.model, relabeled)}
