"""reset_distill — the NeurIPS 2023 unlearning challenge's "6th" method (Stathis Karipidis et al.,
Euclid team / DUTh; 7th on the private leaderboard): reset the first and last layers, then distil.

Sources: xcadet/deepunlearn @ 6830ff6 ``munl/unlearning/kgltop6.py``, adapted from the Kaggle notebook
"unlearning-by-resetting-layers-7th-on-private-lb".

1. The teacher is a frozen copy of the original model. The student's **first convolution** (the
   stem) and its **classifier head** are reset to PyTorch's default initialisation
   (``reset_parameters``). Found by module type: the first conv (on an MLP, the first linear layer)
   and the last ``nn.Linear``.
2. Warm-up: 3 epochs of pure distillation, KL(softmax(t/T) ‖ softmax(s/T)) with ``batchmean`` and
   **no T² factor**, T = 5; SGD lr 9e-4, momentum 0.9, wd 5e-4.
3. Then 3 epochs on the retain set of soft-CE(s/T, t/T) + CE(s, y) + KL_T(s, t); SGD lr 1e-3,
   momentum 0.9, wd 5e-4, cosine annealing with T_max = 3 stepped per epoch (epoch lrs 1e-3,
   7.5e-4, 2.5e-4); a new optimiser after the warm-up. Batch 64 throughout. Soft-CE and KL_T have the
   same gradient (they differ by the teacher's entropy), so the distillation pull counts twice; kept
   as in the reference.

Deviation: the reference warms up on its *validation* loader (held-out data of the same
distribution); this engine's tasks expose no validation split to methods, and training on the test
set would leak into TA, so the warm-up distils on the retain set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from erase.engine.method import Method, MethodConfig, Phase
from erase.errors import EraseError
from erase.fields import opt
from erase.methods._layers import cap, classifier_head, epoch_steps, first_layer, seed_for, seeded_reset
from erase.registry import register_method


def kd_batchmean(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) ‖ softmax(s/T)), ``batchmean``, without the T² factor (as the reference)."""
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1), F.softmax(teacher_logits / temperature, dim=1),
                    reduction="batchmean")


@dataclass
class ResetDistillConfig(MethodConfig):
    epochs: float = opt(3.0, "epochs of CE + distillation on the retain set after the warm-up")
    lr: float = opt(1e-3, "learning rate of the retain epochs (cosine over them, stepped per epoch)")
    batch_size: int = opt(64, "examples per step (reference: 64)")
    warmup_epochs: float = opt(3.0, "epochs of pure distillation right after the reset")
    warmup_lr: float = opt(9e-4, "learning rate of the warm-up")
    temperature: float = opt(5.0, "distillation temperature T")

    def validate(self) -> None:
        super().validate()
        if self.temperature <= 0 or self.warmup_epochs < 0 or self.warmup_lr < 0:
            raise EraseError("reset_distill: --temperature must be > 0, --warmup-epochs and --warmup-lr >= 0")


@register_method("reset_distill")
class ResetDistill(Method):
    tasks = ("classifier",)
    Config = ResetDistillConfig
    streams = ("retain",)
    default_weights = {"warmup_kd": 1.0, "retain_soft_ce": 1.0, "retain_ce": 1.0, "retain_kd": 1.0}
    # The distillation warm-up runs before ``epochs``: part of the length a budget rule scales.
    epoch_fields = ("warmup_epochs",)

    def setup(self, ctx):
        self.teacher = ctx.frozen_copy()

    def _reset(self, ctx):
        model = ctx.unwrapped
        names = [first_layer(model)[0], classifier_head(model)[0]]
        for name in dict.fromkeys(names):
            seeded_reset(model.get_submodule(name), seed_for(ctx.seed, "reset_distill", name))
        ctx.state["reset_distill"] = {"reset": names}

    def phases(self, ctx):
        cfg = self.config
        warm = epoch_steps(self, ctx, "retain", cfg.warmup_epochs)
        phases = [Phase("warmup", warm, ("retain",), lr=cfg.warmup_lr, optimizer="warmup")]
        epochs = max(1, round(cfg.epochs))
        per_epoch = epoch_steps(self, ctx, "retain")
        for e in range(epochs):
            lr = cfg.lr * (1 + math.cos(math.pi * e / epochs)) / 2  # CosineAnnealingLR(T_max=epochs), per epoch
            phases.append(Phase(f"retain-{e}", per_epoch, ("retain",), lr=lr, optimizer="retain"))
        phases = cap(phases, cfg.max_steps)
        phases[0].on_start = self._reset  # the reset happens before whichever phase runs first
        return phases

    def losses(self, batch, ctx):
        t = self.config.temperature
        retain = batch["retain"]
        logits = ctx.task.logits(ctx.model, retain)
        with torch.no_grad():
            teacher = ctx.task.logits(self.teacher, retain)
        if ctx.phase == "warmup":
            return {"warmup_kd": kd_batchmean(logits, teacher, t)}
        soft_targets = F.softmax(teacher / t, dim=1)
        soft_ce = -(soft_targets * F.log_softmax(logits / t, dim=1)).sum(dim=1).mean()
        return {"retain_soft_ce": soft_ce, "retain_ce": F.cross_entropy(logits, retain["label"]),
                "retain_kd": kd_batchmean(logits, teacher, t)}
