"""l1_sparse — sparsity-aware unlearning (Jia et al., NeurIPS 2023): fine-tune on Dr + γ_e·‖θ‖₁.

Reference code: OPTML-Group/Unlearn-Sparse ``unlearn/FT_prune.py`` → ``unlearn/FT.py::FT_l1`` (the
same in OPTML-Group/Unlearn-Saliency ``Classification/unlearn/FT.py``). ``--unlearn FT_prune`` does
no pruning; it is fine-tuning on the retain set with an ℓ1 penalty:

* loss per batch = CE(f(x_r), y_r) + γ_e·‖θ‖₁, where ‖θ‖₁ is the *un-normalised* sum of |w| over
  every parameter of the model (convolutions, BN affine, head, biases);
* γ decays linearly **per epoch**: γ_e = γ·(1 − e/(E − no_l1_epochs)) for epoch index
  e = 0..E−1 below E − no_l1_epochs, else 0. With no_l1_epochs = 0 the last epoch still uses γ/E
  (it never reaches 0). With ``--max-steps`` the run is E = steps / steps-per-epoch epochs long.

Defaults: SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 256, 10 epochs, constant lr (the
Sparse README command and its shared optimiser). γ: the paper value is not in the code or README
(the code default ``--alpha 0.2`` is a placeholder shared by several methods), so it is
**unverified**; we default to γ = 5e-4, the value we recall from the sparse-unlearning paper's
CIFAR-10 setting (unverified). For scale: re-runs on the same code base by a third party
(Scissorhands scripts, SVHN / CelebA-HQ) use 1e-4. The gradient of γ‖θ‖₁ is γ·sign(θ) per
coordinate, so γ does not depend on the model's size; at lr 0.01 it shrinks each weight by at most
γ·lr = 5e-6 per step, comparable to the weight decay's pull on a weight of magnitude 0.01.
Tune it with ``--gamma``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from erase.engine.method import Method, MethodConfig
from erase.errors import EraseError
from erase.fields import opt
from erase.registry import register_method


@dataclass
class L1SparseConfig(MethodConfig):
    epochs: float = opt(10.0, "epochs over the retain set")
    lr: float = opt(0.01, "learning rate")
    gamma: float = opt(5e-4, "initial weight γ of the ℓ1 penalty γ_e·Σ|θ|, decayed linearly per epoch "
                       "(paper value unverified; see the module docs)")
    no_l1_epochs: float = opt(0.0, "final epochs trained without the ℓ1 term (the reference's --no-l1-epochs)")

    def validate(self) -> None:
        super().validate()
        if self.gamma < 0 or self.no_l1_epochs < 0:
            raise EraseError("--gamma and --no-l1-epochs must be >= 0")


@register_method("l1_sparse")
class L1Sparse(Method):
    tasks = ("classifier", "diffusion")
    # No reference for diffusion: the optimiser of SalUn's Stable Diffusion baselines, as ft / ga use.
    task_defaults = {"diffusion": {"optimizer": "adam", "lr": 1e-5, "weight_decay": 0.0,
                                   "batch_size": 8, "epochs": 5.0}}
    Config = L1SparseConfig
    streams = ("retain",)
    default_weights = {"retain_loss": 1.0, "l1": 1.0}

    def _steps_per_epoch(self, ctx) -> int:
        return max(1, math.ceil(len(ctx.views["retain"]) / (self.config.batch_size * ctx.grad_accum)))

    def gamma_at(self, ctx, step: int) -> float:
        """γ_e for the epoch that optimiser step ``step`` falls in."""
        cfg = self.config
        per_epoch = self._steps_per_epoch(ctx)
        epochs = cfg.epochs if cfg.max_steps <= 0 else ctx.total_steps / per_epoch
        l1_epochs = epochs - cfg.no_l1_epochs
        epoch = step // per_epoch
        if l1_epochs <= 0:
            return cfg.gamma  # the reference's special case: E == no_l1_epochs keeps a constant γ
        if epoch >= l1_epochs:
            return 0.0
        return cfg.gamma * (1.0 - epoch / l1_epochs)

    def losses(self, batch, ctx):
        gamma = self.gamma_at(ctx, ctx.global_step)
        terms = {"retain_loss": ctx.task.loss(ctx.model, batch["retain"])}
        if gamma > 0:
            terms["l1"] = gamma * torch.stack([p.abs().sum() for p in ctx.model.parameters()]).sum()
        return terms
