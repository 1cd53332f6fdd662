"""rl — Random Labeling: train on the forget set with random labels, alongside retain data.

Classifier (SalUn's reference code for CIFAR-10): every epoch is one pass over the forget set with
labels drawn uniformly from all classes, fresh per batch, then one pass over the retain set with
true labels (``pairing: sequential``). Diffusion (SalUn generation): each step sums the relabeled
forget loss and the retain loss (``pairing: joint``); the task's ``relabel`` maps the concept to
another one. ``--epochs`` counts passes over the forget set.

Defaults from the SalUn README for CIFAR-10: SGD lr 0.013, momentum 0.9, wd 5e-4, batch 256, 10
epochs, constant lr.
"""

from dataclasses import dataclass

from erase.engine.method import Method, MethodConfig, Phase
from erase.errors import EraseError
from erase.fields import opt
from erase.registry import register_method


@dataclass
class RLConfig(MethodConfig):
    epochs: float = opt(10.0, "epochs over the forget set")
    lr: float = opt(0.013, "learning rate")
    pairing: str = opt("auto", "sequential forget-then-retain passes per epoch, or joint steps "
                       "(auto: sequential for classifiers, joint for diffusion)", ("auto", "sequential", "joint"))
    retain_epochs: float = opt(1.0, "sequential pairing: passes over the retain set per epoch")


@register_method("rl")
class RandomLabel(Method):
    tasks = ("classifier", "diffusion")
    # SalUn's Stable Diffusion code: Adam, lr 1e-5, batch 8, no weight decay.
    task_defaults = {"diffusion": {"optimizer": "adam", "lr": 1e-5, "weight_decay": 0.0, "batch_size": 8, "epochs": 5.0}}
    Config = RLConfig
    streams = ("forget", "retain")
    default_weights = {"forget_relabeled": 1.0, "retain_loss": 1.0}

    def _joint(self, task_name: str) -> bool:
        """Whether forget and retain batches share each step (else: sequential passes per epoch)."""
        pairing = self.config.pairing
        if pairing == "auto":
            pairing = "sequential" if task_name == "classifier" else "joint"
        return pairing == "joint" or self.config.max_steps > 0

    def check_task_config(self, task_cfg):
        # retain_epochs shapes sequential passes only: a joint run would ignore it silently.
        if self.config.retain_epochs != RLConfig.retain_epochs and self._joint(task_cfg.task_name):
            why = "--max-steps" if self.config.max_steps > 0 else f"--pairing {self.config.pairing}"
            raise EraseError(f"--retain-epochs applies to sequential forget/retain passes; this run pairs forget and "
                             f"retain batches in every step ({why}): pass --pairing sequential without --max-steps, "
                             "or drop --retain-epochs")

    def phases(self, ctx):
        if self._joint(ctx.task.name):
            return [Phase("train", self.steps_for(ctx, "forget"), ("forget", "retain"))]
        epochs = max(1, round(self.config.epochs))
        per_forget = self.steps_for(ctx, "forget", 1.0)
        per_retain = self.steps_for(ctx, "retain", self.config.retain_epochs)
        phases = []
        for e in range(epochs):
            phases.append(Phase(f"forget-{e}", per_forget, ("forget",)))
            if per_retain and self.config.retain_epochs > 0:
                phases.append(Phase(f"retain-{e}", per_retain, ("retain",)))
        return phases

    def losses(self, batch, ctx):
        terms = {}
        if "forget" in batch:
            terms["forget_relabeled"] = ctx.task.loss(ctx.model, ctx.task.relabel(batch["forget"]))
        if "retain" in batch:
            terms["retain_loss"] = ctx.task.loss(ctx.model, batch["retain"])
        return terms
