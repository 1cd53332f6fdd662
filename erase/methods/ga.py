"""ga — gradient ascent on the forget set (NegGrad): maximise the task loss on Df.

Defaults follow the sparse-unlearning / SalUn code for CIFAR-10: SGD lr 1e-4, 5 epochs over Df.
GA is unbounded: past a few epochs it destroys the model, which is why it is a baseline.
"""

from dataclasses import dataclass

from erase.engine.method import Method, MethodConfig
from erase.fields import opt
from erase.registry import register_method


@dataclass
class GAConfig(MethodConfig):
    epochs: float = opt(5.0, "epochs over the forget set")
    lr: float = opt(1e-4, "learning rate")


@register_method("ga")
class GradientAscent(Method):
    tasks = ("classifier", "diffusion")
    # SalUn's Stable Diffusion code: Adam, lr 1e-5, batch 8, no weight decay.
    task_defaults = {"diffusion": {"optimizer": "adam", "lr": 1e-5, "weight_decay": 0.0, "batch_size": 8, "epochs": 5.0}}
    Config = GAConfig
    streams = ("forget",)
    default_weights = {"forget_loss": -1.0}

    def losses(self, batch, ctx):
        return {"forget_loss": ctx.task.loss(ctx.model, batch["forget"])}
