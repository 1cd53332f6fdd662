"""reset_noise — the NeurIPS 2023 unlearning challenge's "7th" method (Sun, "sunkroos"; 8th on the
private leaderboard): reset the head, inject noise into random layers, fine-tune — retain set only.

Sources: the write-up "7th place solution" (kaggle.com/c/neurips-2023-machine-unlearning/discussion/459095)
and the port of its notebook in xcadet/deepunlearn @ 6830ff6 ``munl/unlearning/kgltop7.py``.

* At the start the classifier head (the last ``nn.Linear``) is reset (``reset_parameters``).
* 9 epochs of CE on the retain set, batch 64, a **new SGD optimiser every epoch** (momentum reset).
* Epochs 0–4 (``epochs − fine_epochs``): only a random subset trains — 9 parameter tensors drawn
  without replacement from the non-normalisation tensors (weights and biases separately, the head's
  included) plus **all** normalisation tensors; the rest is frozen (a phase mask). SGD lr 2e-4,
  momentum 0.9, wd 5e-4. From epoch 1 on (epoch 0 is the "reset epoch"), before training, int(0.7·9) = 6
  of the 9 drawn tensors get additive noise N(0, 0.04²) — but, as in the reference code, only those
  not drawn in any earlier epoch (``--no-noise-fresh-only`` noises all 6).
* Epochs 5–8: every parameter trains, lr [2e-4, 2e-4, 2e-4, 1e-3] (``lr`` × ``fine_lr_scales``).

Normalisation tensors are found by module type; the reference matches "bn" in the parameter name,
which on torchvision's ResNet misses the BatchNorm inside ``downsample`` (those count as selectable
there). The draws use a generator seeded by the run seed (the reference's are unseeded).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from erase.engine.method import Method, MethodConfig, Phase
from erase.errors import EraseError
from erase.fields import opt
from erase.methods._layers import cap, classifier_head, epoch_steps, floats, generator, is_norm_parameter, seed_for, seeded_reset
from erase.registry import register_method


@dataclass
class ResetNoiseConfig(MethodConfig):
    epochs: float = opt(9.0, "epochs over the retain set in all")
    fine_epochs: int = opt(4, "last epochs in which every parameter trains")
    lr: float = opt(2e-4, "learning rate of the random-subset epochs; fine epochs use lr x fine_lr_scales")
    fine_lr_scales: str = opt("1,1,1,5", "per fine epoch lr multipliers (reference: 2e-4, 2e-4, 2e-4, 1e-3); last repeats")
    batch_size: int = opt(64, "retain examples per step (reference: 64)")
    layers_per_epoch: int = opt(9, "non-normalisation parameter tensors that train in each random-subset epoch")
    noise_ratio: float = opt(0.7, "share of the drawn tensors that get noise (int(ratio x layers_per_epoch))")
    noise_std: float = opt(0.04, "std of the additive Gaussian noise (absolute)")
    noise_fresh_only: bool = opt(True, "noise only tensors not drawn in an earlier epoch (the reference code's rule)")

    def validate(self) -> None:
        super().validate()
        if self.fine_epochs < 0 or self.layers_per_epoch < 1 or not 0 <= self.noise_ratio <= 1 or self.noise_std < 0:
            raise EraseError("reset_noise: need --fine-epochs >= 0, --layers-per-epoch >= 1, --noise-ratio in [0, 1], "
                             "--noise-std >= 0")
        floats(self.fine_lr_scales, "fine_lr_scales")


@register_method("reset_noise")
class ResetNoise(Method):
    tasks = ("classifier",)
    Config = ResetNoiseConfig
    streams = ("retain",)
    default_weights = {"retain_ce": 1.0}

    def plan(self, ctx) -> list[dict]:
        """Per random-subset epoch: the drawn tensors and the ones that get noise (deterministic in the seed)."""
        cfg = self.config
        model = ctx.unwrapped
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        selectable = [n for n in names if not is_norm_parameter(model, n)]
        norms = [n for n in names if is_norm_parameter(model, n)]
        if not selectable:
            raise EraseError("reset_noise: the model has no non-normalisation parameters to draw from")
        g = generator(ctx.seed, "reset_noise")
        k = min(cfg.layers_per_epoch, len(selectable))
        n_noise = int(cfg.noise_ratio * k)
        seen: set[str] = set()
        plan = []
        for e in range(max(0, round(cfg.epochs) - cfg.fine_epochs)):
            drawn = sorted(selectable[i] for i in torch.randperm(len(selectable), generator=g)[:k].tolist())
            noisy: list[str] = []
            if e >= 1:  # epoch 0 is the reset epoch: no noise
                picks = sorted(drawn[i] for i in torch.randperm(len(drawn), generator=g)[:n_noise].tolist())
                noisy = [n for n in picks if not (cfg.noise_fresh_only and n in seen)]
            seen.update(drawn + norms)
            plan.append({"train": drawn + norms, "noise": noisy})
        return plan

    def _start(self, epoch: int, noisy: list[str]):
        def on_start(ctx):
            model = ctx.unwrapped
            if epoch == 0:
                head = classifier_head(model)[0]
                seeded_reset(model.get_submodule(head), seed_for(ctx.seed, "reset_noise", "head"))
            params = dict(model.named_parameters())
            g = generator(ctx.seed, "reset_noise", "noise", epoch)
            with torch.no_grad():
                for n in noisy:
                    p = params[n]
                    p.add_((torch.randn(p.shape, generator=g) * self.config.noise_std).to(p.device, p.dtype))
            ctx.state.setdefault("reset_noise", {})[str(epoch)] = {"noised": noisy}

        return on_start

    def phases(self, ctx):
        cfg = self.config
        per_epoch = epoch_steps(self, ctx, "retain")
        params = dict(ctx.unwrapped.named_parameters())
        phases = []
        for e, step in enumerate(self.plan(ctx)):
            train = set(step["train"])
            masks = {n: torch.zeros((), dtype=torch.bool, device=p.device).expand(p.shape)
                     for n, p in params.items() if n not in train}
            phases.append(Phase(f"subset-{e}", per_epoch, ("retain",), lr=cfg.lr, optimizer=f"epoch-{e}",
                                masks=masks, on_start=self._start(e, step["noise"])))
        scales = floats(cfg.fine_lr_scales, "fine_lr_scales")
        start = len(phases)
        for j in range(min(cfg.fine_epochs, max(1, round(cfg.epochs)))):
            phases.append(Phase(f"fine-{j}", per_epoch, ("retain",), lr=cfg.lr * scales[min(j, len(scales) - 1)],
                                optimizer=f"epoch-{start + j}", on_start=self._start(0, []) if start + j == 0 else None))
        return cap(phases, cfg.max_steps)

    def losses(self, batch, ctx):
        return {"retain_ce": ctx.task.loss(ctx.model, batch["retain"])}
