"""scrub — SCalable Remembering and Unlearning unBound (Kurmanji et al., NeurIPS 2023).

The student starts from the original weights; the teacher is a frozen copy of them. Every epoch
is, in order (reference: meghdadk/SCRUB @ 98ffb11, ``large_scale_unlearning.ipynb`` cell "SCRUB
unlearning" calling ``thirdparty/repdistiller/helper/loops.py::train_distill``):

1. only while ``epoch < msteps``: one *max* pass over the forget set, loss ``−KL_T(teacher ‖ student)``
   (gradient ascent on the distillation loss pushes the student away from the teacher on Df);
2. one *min* pass over the retain set, loss ``γ·CE(student, y) + α·KL_T(teacher ‖ student)``.

``KL_T`` is repdistiller's ``DistillKL``: Σ softmax(t/T)·(log softmax(t/T) − log softmax(s/T)),
summed over classes and examples, divided by the batch size and multiplied by T². Both passes step
one shared SGD optimiser (momentum 0.9, wd 5e-4). The learning rate of (1-based) epoch e is
``lr · decay^#{m ∈ lr_decay_epochs : e > m}`` (``adjust_learning_rate``), constant within 3 epochs.

Defaults are the reference's CIFAR-10 large-scale setting: SGD lr 5e-4, 3 epochs, msteps 2, T 4,
γ 0.99, α 0.001 (β·0 for the unused feature-distillation term), lr decay at epochs 3,5,9 by 0.1.

Batch sizes. The reference draws forget batches of 512 and retain batches of 256; the engine has
one batch size per method (``--batch-size``, default 256 = the reference's retain batch). The max
pass therefore takes ceil(|Df|/256) steps where the reference takes ceil(|Df|/512), and it runs at
``lr × ceil(|Df|/forget_batch_size) / ceil(|Df|/batch_size)`` (×0.5 for a large forget set): k
small steps at lr/k move the weights by as much as one big step at lr, to first order, and the
loss is a per-example mean, so the max pass's total step matches the reference's. Set
``--forget-batch-size 0`` to run the max pass at the full lr.

Deviation: SCRUB's loaders use no augmentation (``augment=False``); this engine's streams use the
task's training augmentation (``--no-augment`` on the classifier task turns it off for all streams).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from erase.engine.method import Method, MethodConfig, Phase
from erase.errors import EraseError
from erase.fields import opt
from erase.methods._layers import cap, epoch_steps, floats
from erase.registry import register_method


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """repdistiller's ``DistillKL``: KL(softmax(t/T) ‖ softmax(s/T)) summed, / batch, × T²."""
    log_s = F.log_softmax(student_logits / temperature, dim=1)
    p_t = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_s, p_t, reduction="sum") * temperature**2 / student_logits.shape[0]


@dataclass
class SCRUBConfig(MethodConfig):
    epochs: float = opt(3.0, "SCRUB epochs (sgda_epochs); each is [max pass over Df if epoch < msteps] + min pass over Dr")
    lr: float = opt(5e-4, "learning rate (sgda_learning_rate; CIFAR-10 large-scale setting)")
    batch_size: int = opt(256, "examples per step for both passes (the reference's retain batch)")
    msteps: int = opt(2, "number of leading epochs that start with a max pass over the forget set")
    temperature: float = opt(4.0, "distillation temperature T (kd_T)")
    gamma: float = opt(0.99, "weight of the retain cross-entropy in the min pass")
    alpha: float = opt(0.001, "weight of KL(teacher || student) on the retain set in the min pass")
    forget_batch_size: int = opt(512, "the reference's forget batch; the max pass's lr is scaled so its total step "
                                 "matches this batch size (0: no scaling)")
    lr_decay_epochs: str = opt("3,5,9", "1-based epochs after which the lr is multiplied by --lr-decay-rate")
    lr_decay_rate: float = opt(0.1, "lr decay factor")

    def validate(self) -> None:
        super().validate()
        if self.temperature <= 0 or self.msteps < 0 or self.forget_batch_size < 0:
            raise EraseError("scrub: --temperature must be > 0, --msteps and --forget-batch-size >= 0")
        floats(self.lr_decay_epochs, "lr_decay_epochs")


@register_method("scrub")
class SCRUB(Method):
    tasks = ("classifier",)
    Config = SCRUBConfig
    streams = ("forget", "retain")
    default_weights = {"forget_kl": -1.0, "retain_ce": 0.99, "retain_kl": 0.001}

    def __init__(self, config: SCRUBConfig):
        super().__init__(config)
        # γ and α are config fields; --loss-weights can still override any term.
        self.default_weights = {"forget_kl": -1.0, "retain_ce": config.gamma, "retain_kl": config.alpha}

    def setup(self, ctx):
        self.teacher = ctx.frozen_copy()

    def phases(self, ctx):
        cfg = self.config
        n_max, n_min = epoch_steps(self, ctx, "forget"), epoch_steps(self, ctx, "retain")
        max_scale = 1.0
        if cfg.forget_batch_size:
            ref = math.ceil(len(ctx.views["forget"]) / (cfg.forget_batch_size * ctx.grad_accum))
            max_scale = ref / n_max
        decay_at = floats(cfg.lr_decay_epochs, "lr_decay_epochs")
        phases = []
        for e in range(max(1, round(cfg.epochs))):
            lr = cfg.lr * cfg.lr_decay_rate ** sum(e + 1 > m for m in decay_at)
            if e < cfg.msteps:
                phases.append(Phase(f"max-{e}", n_max, ("forget",), lr=lr, lr_scale=max_scale))
            phases.append(Phase(f"min-{e}", n_min, ("retain",), lr=lr))
        return cap(phases, cfg.max_steps)

    def losses(self, batch, ctx):
        t = self.config.temperature
        if ctx.phase.startswith("max"):
            forget = batch["forget"]
            with torch.no_grad():
                teacher = ctx.task.logits(self.teacher, forget)
            return {"forget_kl": distill_kl(ctx.task.logits(ctx.model, forget), teacher, t)}
        retain = batch["retain"]
        logits = ctx.task.logits(ctx.model, retain)
        with torch.no_grad():
            teacher = ctx.task.logits(self.teacher, retain)
        return {"retain_ce": F.cross_entropy(logits, retain["label"]), "retain_kl": distill_kl(logits, teacher, t)}
