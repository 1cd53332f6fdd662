"""ga_plus — NegGrad+: descend on the retain loss and ascend on the forget loss in the same step.

Loss per step: CE(Dr) − λ·CE(Df), one retain batch and one forget batch per optimiser step.

Reference code: meghdadk/SCRUB ``thirdparty/repdistiller/helper/loops.py::train_negrad`` and the
``run_neggrad_epoch`` cell of ``small_scale_unlearning.ipynb``: every step draws a retain batch and
the next forget batch (``zip(retain_loader, cycle(forget_loader))``, so an epoch is one pass over the
retain set) and minimises α·CE(retain) − (1−α)·CE(forget). That is our loss times α, with
λ = (1−α)/α; for SGD the factor α only rescales the learning rate.

Defaults, from ``small_scale_unlearning.ipynb`` (its main unlearning notebook): α = 0.95, i.e.
λ = 0.05/0.95 ≈ 0.0526; 10 epochs over the retain set; SGD lr 0.01 with **no momentum and no
weight decay** (``SGD(lr, weight_decay=0)``); batch 128 (``large_scale_ictest.ipynb``'s ``ng_bs``).
``large_scale_ictest.ipynb`` (CIFAR-10 ResNet) uses α = 0.9999 (λ ≈ 1e-4), which is fine-tuning
in all but name. Not reproduced: the small-scale notebook also adds an L2 pull towards the
original weights, (wd/2)·‖θ − θo‖², to the retain term; the large-scale ``train_negrad`` does not.
"""

from __future__ import annotations

from dataclasses import dataclass

from erase.engine.method import Method, MethodConfig
from erase.errors import EraseError
from erase.fields import opt
from erase.registry import register_method


@dataclass
class GAPlusConfig(MethodConfig):
    epochs: float = opt(10.0, "epochs over the retain set (one forget batch is drawn per retain batch)")
    lr: float = opt(0.01, "learning rate")
    momentum: float = opt(0.0, "SGD momentum (the reference uses plain SGD)")
    weight_decay: float = opt(0.0, "weight decay (the reference uses none)")
    batch_size: int = opt(128, "examples per optimiser step, per stream")
    forget_weight: float = opt(0.05 / 0.95, "λ in CE(Dr) − λ·CE(Df); the reference's α maps to λ = (1 − α)/α")

    def validate(self) -> None:
        super().validate()
        if self.forget_weight < 0:
            raise EraseError(f"--forget-weight must be >= 0, got {self.forget_weight}")


@register_method("ga_plus")
class GradientAscentPlus(Method):
    tasks = ("classifier", "diffusion")
    # No reference for diffusion: the optimiser of SalUn's Stable Diffusion baselines, as ft / ga use.
    task_defaults = {"diffusion": {"optimizer": "adam", "lr": 1e-5, "weight_decay": 0.0,
                                   "batch_size": 8, "epochs": 5.0}}
    Config = GAPlusConfig
    streams = ("retain", "forget")  # the first stream sizes an epoch: passes over the retain set
    default_weights = {"retain_loss": 1.0, "forget_loss": -1.0}

    def weights(self) -> dict[str, float]:
        w = super().weights()
        if "forget_loss" not in self.config.loss_weights:
            w["forget_loss"] = -self.config.forget_weight
        return w

    def losses(self, batch, ctx):
        return {"retain_loss": ctx.task.loss(ctx.model, batch["retain"]),
                "forget_loss": ctx.task.loss(ctx.model, batch["forget"])}
