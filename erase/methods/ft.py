"""ft — fine-tune on the retain set only (catastrophic forgetting of the forget set).

Defaults follow the sparse-unlearning / SalUn code for CIFAR-10: SGD lr 0.01, 10 epochs.
"""

from dataclasses import dataclass

from erase.methods.base import Method, MethodConfig, opt
from erase.registry import register_method


@dataclass
class FTConfig(MethodConfig):
    epochs: float = opt(10.0, "epochs over the retain set")
    lr: float = opt(0.01, "learning rate")


@register_method("ft")
class FineTune(Method):
    tasks = ("classifier", "diffusion")
    Config = FTConfig
    streams = ("retain",)
    default_weights = {"retain_loss": 1.0}

    def losses(self, batch, ctx):
        return {"retain_loss": ctx.task.loss(ctx.model, batch["retain"])}
