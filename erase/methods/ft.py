"""ft — fine-tune on the retain set only (catastrophic forgetting of the forget set).

Defaults follow the sparse-unlearning / SalUn code for CIFAR-10: SGD lr 0.01, 10 epochs.
"""

from dataclasses import dataclass

from erase.engine.method import Method, MethodConfig
from erase.fields import opt
from erase.registry import register_method


@dataclass
class FTConfig(MethodConfig):
    epochs: float = opt(10.0, "epochs over the retain set")
    lr: float = opt(0.01, "learning rate")


@register_method("ft")
class FineTune(Method):
    tasks = ("classifier", "diffusion")
    # SalUn's Stable Diffusion code: Adam, lr 1e-5, batch 8, no weight decay.
    task_defaults = {"diffusion": {"optimizer": "adam", "lr": 1e-5, "weight_decay": 0.0, "batch_size": 8, "epochs": 5.0}}
    Config = FTConfig
    streams = ("retain",)
    default_weights = {"retain_loss": 1.0}

    def losses(self, batch, ctx):
        return {"retain_loss": ctx.task.loss(ctx.model, batch["retain"])}
