"""reinit_kp — the NeurIPS 2023 unlearning challenge's 8th method (Kyungpook/LG, Jaesin Ahn et al.;
9th on the private leaderboard, 3rd on the public one): forget-set-free cycles of random layer
re-initialisation and knowledge-preserving distillation.

Source: the write-up "9th Place Solution (Forget set-free Approach)"
(kaggle.com/c/neurips-2023-machine-unlearning/discussion/458715); its notebook and PDF are not in
our reference index, so the points it leaves open are decided here and marked *choice*.

Every cycle c:
1. *forget phase* (``on_start``): draw k_c layers uniformly **with replacement** from the pool and
   re-initialise them with PyTorch's default initialisation (``reset_parameters``; BatchNorm also
   resets its running statistics). The pool is every convolution, linear and normalisation layer
   **except the classifier head and the projection shortcuts** (the write-up's Table 7); selection is
   random and layer-wise (it beat element-wise and Fisher-based selection, Tables 2 and 6).
2. *remember phase*: train on the **retain set only** with the knowledge-preserving loss
   MSE(f_θ(x̃), f_θo(x̃)) between the student's and the frozen original model's outputs on retain
   images with additive Gaussian noise, x̃ = x + σ·ε (MSE beat CE and L1, Table 4).

Defaults: the write-up's "algorithm B" — 4 cycles of [2, 1, 1, 1] epochs with per-epoch learning rates
[5e-4, 1e-3, 1e-3, 1e-3, 1e-3] (``lr`` 1e-3 × ``epoch_lr_scales``); σ = 0.01 (its final settings).

Choices for what the write-up leaves open:
* *growing share* — the write-up draws 6 layers per cycle; the authors' project page
  (junhyunb.github.io/en/projects/neurips2023-unlearning) adds a "progressively increasing
  re-initialization ratio". We draw k_c = max(1, round(share_c·|pool|)) with shares
  0.09, 0.12, 0.15, 0.18: the last cycle is the write-up's 6 draws on ResNet-18 (pool of 34 layers),
  earlier cycles grow linearly towards it (k = 3, 4, 5, 6 on ResNet-18).
* "layer" = a conv / linear / norm module (its weight and bias together), not a parameter tensor.
* "outputs" = logits (MSE on logits is the classic logit-matching distillation); no CE term
  (``--loss-weights '{retain_ce: 1}'`` adds one).
* σ is in the task's input space (images in [0, 1] here; the model normalises internally). The
  write-up's settings say σ = 0.01 while its augmentation ablation used 0.1.
* optimiser: SGD momentum 0.9, weight decay 5e-4 (the challenge starting kit's), a fresh optimiser
  per cycle (a re-initialised layer should not inherit momentum from before its reset); the
  remember phase uses the training streams' augmentation plus the noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from erase.engine.method import Method, MethodConfig, Phase
from erase.errors import EraseError
from erase.fields import opt
from erase.methods._layers import (
    CONV,
    NORM,
    cap,
    classifier_head,
    epoch_steps,
    floats,
    generator,
    has_own_parameters,
    is_shortcut,
    seed_for,
    seeded_reset,
)
from erase.registry import register_method


def reinit_pool(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv / linear / norm layers with parameters, minus the classifier head and projection shortcuts."""
    head, _ = classifier_head(model)
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (CONV, nn.Linear, *NORM)) and has_own_parameters(m) and n != head and not is_shortcut(n)]


@dataclass
class ReinitKPConfig(MethodConfig):
    epochs: float = opt(5.0, "not used: the length is the sum of --cycle-epochs (write-up algorithm B: 5)")
    lr: float = opt(1e-3, "base learning rate; epoch i runs at lr x epoch_lr_scales[i]")
    batch_size: int = opt(64, "retain examples per step (the challenge's loaders used 64)")
    cycle_epochs: str = opt("2,1,1,1", "epochs of each re-init + remember cycle (write-up algorithm B)")
    epoch_lr_scales: str = opt("0.5,1,1,1,1", "per-epoch lr multipliers (algorithm B: 5e-4, then 1e-3); the last repeats")
    reinit_shares: str = opt("0.09,0.12,0.15,0.18", "per cycle, layers drawn (with replacement) as a share of the "
                             "pool; the last repeats (6 of 34 layers = the write-up's 6 on ResNet-18 in the last cycle)")
    noise_std: float = opt(0.01, "std of the Gaussian noise added to retain inputs (write-up settings; 0.1 in its ablation)")

    length_fields = ()  # the length is --cycle-epochs, checked below

    def validate(self) -> None:
        super().validate()
        for flag in ("cycle_epochs", "epoch_lr_scales", "reinit_shares"):
            if min(floats(getattr(self, flag), flag)) < 0:
                raise EraseError(f"reinit_kp: --{flag.replace('_', '-')} must be >= 0")
        if self.max_steps == 0 and sum(floats(self.cycle_epochs, "cycle_epochs")) == 0:
            raise EraseError("nothing to train: --cycle-epochs are all 0 and --max-steps 0; give one of them a positive value")
        if self.noise_std < 0:
            raise EraseError("reinit_kp: --noise-std must be >= 0")


@register_method("reinit_kp")
class ReinitKP(Method):
    tasks = ("classifier",)
    Config = ReinitKPConfig
    streams = ("retain",)
    default_weights = {"retain_kp_mse": 1.0, "retain_ce": 0.0}
    # Its length is the sum of the cycles (``epochs`` is unused), so a budget rule scales those.
    epoch_fields = ("cycle_epochs",)

    def setup(self, ctx):
        self.teacher = ctx.frozen_copy()
        pool = reinit_pool(ctx.unwrapped)
        if not pool:
            raise EraseError("reinit_kp: the model has no layer to re-initialise besides the head and shortcuts")

    def draws(self, pool_size: int, cycle: int) -> int:
        shares = floats(self.config.reinit_shares, "reinit_shares")
        return max(1, round(shares[min(cycle, len(shares) - 1)] * pool_size))

    def _reinit(self, cycle: int):
        def on_start(ctx):
            model = ctx.unwrapped
            pool = reinit_pool(model)
            k = self.draws(len(pool), cycle)
            picks = torch.randint(len(pool), (k,), generator=generator(ctx.seed, "reinit_kp", cycle)).tolist()
            names = sorted({pool[i][0] for i in picks})
            for name in names:
                seeded_reset(model.get_submodule(name), seed_for(ctx.seed, "reinit_kp", cycle, name))
            ctx.state.setdefault("reinit_kp", {})[str(cycle)] = {"draws": k, "pool": len(pool), "layers": names}

        return on_start

    def phases(self, ctx):
        cfg = self.config
        per_epoch = epoch_steps(self, ctx, "retain")
        scales = floats(cfg.epoch_lr_scales, "epoch_lr_scales")
        phases, epoch = [], 0
        for c, n in enumerate(floats(cfg.cycle_epochs, "cycle_epochs")):
            whole, frac = int(n), n - int(n)
            parts = [1.0] * whole + ([frac] if frac > 1e-9 else [])
            for j, part in enumerate(parts):
                lr = cfg.lr * scales[min(epoch, len(scales) - 1)]
                phases.append(Phase(f"cycle-{c}-epoch-{j}", max(1, round(part * per_epoch)), ("retain",), lr=lr,
                                    optimizer=f"cycle-{c}", on_start=self._reinit(c) if j == 0 else None))
                epoch += 1
        return cap(phases, cfg.max_steps)

    def losses(self, batch, ctx):
        retain = batch["retain"]
        image = retain["image"]
        if self.config.noise_std > 0:
            image = image + self.config.noise_std * torch.randn_like(image)
        noisy = {**retain, "image": image}
        logits = ctx.task.logits(ctx.model, noisy)
        with torch.no_grad():
            target = ctx.task.logits(self.teacher, noisy)
        return {"retain_kp_mse": F.mse_loss(logits, target), "retain_ce": F.cross_entropy(logits, retain["label"])}
