"""retrain — train from scratch on the retain set with the original recipe (the gold standard).

The same file trains the original model (``python -m erase.classifier.pretrain`` runs it with an
empty forget set), so "original recipe" is literally the same code and defaults.

Recipe (Fashion-MNIST, CIFAR-stem ResNet-18, width 16: 92.3 % test accuracy in 4 epochs; see
DESIGN.md §6): SGD momentum 0.9, weight decay 5e-4, one-cycle schedule peaking at lr 0.1, label
smoothing 0.1, batch 128, flip + shift augmentation.
"""

from dataclasses import dataclass

from erase.engine.method import Method, MethodConfig
from erase.fields import opt
from erase.registry import register_method


@dataclass
class RetrainConfig(MethodConfig):
    epochs: float = opt(4.0, "epochs over the retain set")
    lr: float = opt(0.1, "peak learning rate of the one-cycle schedule")
    batch_size: int = opt(128, "examples per optimiser step")
    lr_schedule: str = opt("onecycle", "learning-rate schedule", ("constant", "cosine", "linear", "onecycle", "step"))
    label_smoothing: float = opt(0.1, "label smoothing of the cross-entropy")


@register_method("retrain")
class Retrain(Method):
    tasks = ("classifier",)
    Config = RetrainConfig
    streams = ("retain",)
    default_weights = {"retain_ce": 1.0}
    from_scratch = True

    def losses(self, batch, ctx):
        return {"retain_ce": ctx.task.loss(ctx.model, batch["retain"], label_smoothing=self.config.label_smoothing)}
