"""kl_uniform — the NeurIPS 2023 unlearning challenge's "1st" method (Fanchuan; 2nd on the private
leaderboard, 1st on the public one): KL to the uniform distribution, then adversarial rounds.

Sources: the write-up "2nd place solution" (kaggle.com/c/neurips-2023-machine-unlearning/discussion/458721)
and the port in xcadet/deepunlearn @ 6830ff6 ``munl/unlearning/kgltop1.py``.

* Stage 1 — one pass over the forget set: ``KLDivLoss(batchmean)(log_softmax(f(x_f)), U)`` with U the
  uniform distribution, i.e. KL(U ‖ p) = −mean log p − log C (not KL(p ‖ U) as the prose says).
  Its own SGD: lr 0.005, momentum 0.9, no weight decay.
* Stage 2 — ``epochs`` (8) rounds of
  (a) a *forget round*, len(forget loader) steps pairing each forget batch with a retain batch:
      ``mean_ij −log_softmax_j(z_f z_rᵀ / t)`` on the logits z (retain logits detached), t = 1.15 —
      cross-entropy towards a uniform target over the retain batch, which pushes every forget
      output equally far from all retain outputs. SGD lr 3e-4, momentum 0.9, no weight decay, cosine
      annealing to 1e-6 over all 8·len(forget loader) forget steps;
  (b) a *retain round*: one epoch of CE on the retain set, SGD lr 0.001·B/64 (0.004 at the write-up's
      best batch B = 256), momentum 0.9, weight decay 1e-2, no schedule.
  The three optimisers keep their own momentum (Phase optimizer keys ``stage1``/``forget``/``retain``).

The reference's cosine schedule is stepped per forget batch across all rounds; each forget round
gives the engine that exact curve through ``Phase.lr_at``.

Deviation (small):
* The reference's forget round draws retain batches from a second, independent retain loader; here
  forget and retain rounds share the one retain stream (same shuffling-without-replacement per pass,
  the retain round's epochs simply start at a different offset).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from erase.engine.method import Method, MethodConfig, Phase
from erase.errors import EraseError
from erase.fields import opt
from erase.methods._layers import cap, epoch_steps
from erase.registry import register_method


def kl_uniform_loss(logits: torch.Tensor) -> torch.Tensor:
    """KL(U ‖ softmax(logits)), batch mean (PyTorch ``KLDivLoss(reduction="batchmean")`` with target U)."""
    log_p = F.log_softmax(logits, dim=1)
    c = logits.shape[1]
    return -log_p.mean(dim=1).mean() - math.log(c)


def contrastive_uniform_loss(forget_logits: torch.Tensor, retain_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """mean over (i, j) of −log_softmax_j(z_f,i · z_r,j / t): every retain example an equal 'positive'."""
    sim = forget_logits @ retain_logits.detach().T / temperature
    return -F.log_softmax(sim, dim=-1).mean()


@dataclass
class KLUniformConfig(MethodConfig):
    epochs: float = opt(8.0, "stage-2 epochs, each a forget round then a retain round (write-up: 8 at batch 256)")
    batch_size: int = opt(256, "batch size of every loader (write-up: 256 worked best)")
    lr: float = opt(0.0, "retain-round learning rate; 0 = the reference's 0.001 x batch_size / 64 (0.004 at 256)")
    weight_decay: float = opt(1e-2, "weight decay of the retain-round optimiser")
    stage1_lr: float = opt(0.005, "learning rate of the stage-1 KL-to-uniform pass")
    stage1_epochs: float = opt(1.0, "passes over the forget set in stage 1")
    forget_lr: float = opt(3e-4, "initial learning rate of the forget rounds (cosine-annealed)")
    forget_min_lr: float = opt(1e-6, "final learning rate of the forget rounds' cosine annealing (eta_min)")
    forget_weight_decay: float = opt(0.0, "weight decay of the stage-1 and forget-round optimisers")
    temperature: float = opt(1.15, "temperature t of the forget-round contrastive loss")

    length_fields = ("epochs", "stage1_epochs")  # --epochs 0 with stage 1 is a valid (stage-1 only) run

    def validate(self) -> None:
        super().validate()
        if self.temperature <= 0 or min(self.stage1_lr, self.forget_lr, self.forget_min_lr, self.stage1_epochs) < 0:
            raise EraseError("kl_uniform: --temperature must be > 0 and the stage-1/forget lrs and epochs >= 0")


@register_method("kl_uniform")
class KLUniform(Method):
    tasks = ("classifier",)
    Config = KLUniformConfig
    streams = ("forget", "retain")
    default_weights = {"forget_kl_uniform": 1.0, "forget_contrast": 1.0, "retain_ce": 1.0}
    # The stage-1 KL-to-uniform pass runs before the ``epochs`` rounds: part of the length a budget rule scales.
    epoch_fields = ("stage1_epochs",)

    def retain_lr(self) -> float:
        cfg = self.config
        return cfg.lr if cfg.lr > 0 else 0.001 * cfg.batch_size / 64

    def forget_lr(self, k: int, total: int) -> float:
        """The reference's CosineAnnealingLR(T_max = rounds·steps, eta_min) at forget-round step ``k``."""
        cfg = self.config
        return cfg.forget_min_lr + (cfg.forget_lr - cfg.forget_min_lr) * (1 + math.cos(math.pi * k / total)) / 2

    def forget_round_lrs(self, rounds: int, steps: int) -> list[float]:
        """Mean learning rate of each forget round (for reports; the rounds run the exact per-step curve)."""
        return [sum(self.forget_lr(e * steps + i, rounds * steps) for i in range(steps)) / steps for e in range(rounds)]

    def phases(self, ctx):
        cfg = self.config
        n_forget, n_retain = epoch_steps(self, ctx, "forget"), epoch_steps(self, ctx, "retain")
        phases = [Phase("stage1", epoch_steps(self, ctx, "forget", cfg.stage1_epochs), ("forget",),
                        lr=cfg.stage1_lr, optimizer="stage1", weight_decay=cfg.forget_weight_decay)]
        rounds = max(0, round(cfg.epochs))
        for e, lr in enumerate(self.forget_round_lrs(rounds, n_forget)):
            phases.append(Phase(f"forget-{e}", n_forget, ("forget", "retain"), lr=lr, optimizer="forget",
                                weight_decay=cfg.forget_weight_decay,
                                lr_at=lambda i, e=e: self.forget_lr(e * n_forget + i, rounds * n_forget)))
            phases.append(Phase(f"retain-{e}", n_retain, ("retain",), lr=self.retain_lr(), optimizer="retain",
                                weight_decay=cfg.weight_decay))
        return cap(phases, cfg.max_steps)

    def losses(self, batch, ctx):
        if ctx.phase == "stage1":
            return {"forget_kl_uniform": kl_uniform_loss(ctx.task.logits(ctx.model, batch["forget"]))}
        if ctx.phase.startswith("forget"):
            z_f = ctx.task.logits(ctx.model, batch["forget"])
            with torch.no_grad():  # the reference detaches them; the forward still updates BN statistics
                z_r = ctx.task.logits(ctx.model, batch["retain"])
            return {"forget_contrast": contrastive_uniform_loss(z_f, z_r, self.config.temperature)}
        return {"retain_ce": ctx.task.loss(ctx.model, batch["retain"])}
