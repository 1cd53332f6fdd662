"""grad_reinit — the NeurIPS 2023 unlearning challenge's "2nd" method (Kookmin: Doun Lee, Jinwoo Bae,
Jangho Kim; 3rd on the private leaderboard): gradient-difference targeted re-initialisation.

Sources: the write-up "3rd place solution" (kaggle.com/c/neurips-2023-machine-unlearning/discussion/459200)
and the port in xcadet/deepunlearn @ 6830ff6 ``munl/unlearning/kgltop2.py``.

1. Gradients at the original weights: g = Σ ∇CE over a random retain subset as large as the forget
   set, plus Σ ∇(−CE) over the forget set (the reference accumulates ``backward()`` over batches of 64;
   here per-example sums, which differ from it only by a constant factor that cannot change a ranking).
2. In every convolution, the ``init_rate`` = 30 % of weights with the smallest |g| — where the retain
   and forget gradients cancel — are replaced by He-normal values (``kaiming_normal_``, fan_out, relu,
   as torchvision's ResNet initialises). Per layer, as the code does (``round(rate·numel)`` per conv);
   the write-up says "globally unstructured" (``--scope global``). BatchNorm and the head are not
   touched. On a model without convolutions the linear layers before the head take their place.
3. Fine-tune on the retain set with CE, the gradient of kept weights scaled by 0.1 ("1/10 lr for the
   non-re-initialised weights"; a float phase mask 1 / 0.1 on those layers, other tensors unscaled):
   5 epochs, SGD lr 1e-3, momentum 0.9, wd 5e-4, batch 64, and the reference's LinearAnnealingLR
   stepped per epoch — warm-up over (E+1)//2 epochs then linear decay to 0 at E+1, i.e. epoch factors
   1/3, 2/3, 1, 2/3, 1/3 for E = 5.

The retain subset is drawn with a generator seeded by the run seed (the write-up: drawing a subset
rather than using all of Dr, different per run, scored better). Gradients are taken in eval mode
(BatchNorm running statistics), so collecting them does not change the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from erase.engine.method import Method, MethodConfig, Phase
from erase.errors import EraseError
from erase.fields import opt
from erase.methods._layers import cap, epoch_steps, feature_layers, generator
from erase.registry import register_method


def linear_annealing_factors(epochs: int) -> list[float]:
    """Per-epoch lr factors of the reference's LinearAnnealingLR((E+1)//2 warm-up, E+1 total)."""
    warm, total = (epochs + 1) // 2, epochs + 1
    return [(e + 1) / warm if e + 1 <= warm else (total - e - 1) / (total - warm) for e in range(epochs)]


def _batches(view, positions: torch.Tensor, size: int):
    for start in range(0, len(positions), size):
        yield view.get_batch(positions[start:start + size])


@dataclass
class GradReinitConfig(MethodConfig):
    epochs: float = opt(5.0, "fine-tuning epochs over the retain set")
    lr: float = opt(1e-3, "peak learning rate of the per-epoch linear warm-up / decay")
    batch_size: int = opt(64, "retain examples per step (reference: 64)")
    init_rate: float = opt(0.3, "share of convolution weights (smallest |gradient difference|) to re-initialise")
    kept_grad_scale: float = opt(0.1, "gradient scale of the weights that were not re-initialised")
    scope: str = opt("layer", "rank |g| within each layer (reference code) or over all layers (write-up)", ("layer", "global"))
    retain_subset: int = opt(0, "retain examples for the gradient (0: as many as the forget set)")

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.init_rate <= 1 or self.kept_grad_scale < 0:
            raise EraseError("grad_reinit: --init-rate must be in [0, 1] and --kept-grad-scale >= 0")
        if self.retain_subset < 0:
            raise EraseError(f"grad_reinit: --retain-subset must be >= 0, got {self.retain_subset}")


@register_method("grad_reinit")
class GradReinit(Method):
    tasks = ("classifier",)
    Config = GradReinitConfig
    streams = ("forget", "retain")
    default_weights = {"retain_ce": 1.0}

    def setup(self, ctx):
        cfg = self.config
        model = ctx.unwrapped
        layers = feature_layers(model)
        if not layers:
            raise EraseError("grad_reinit: the model has no convolution or hidden linear layer to re-initialise")
        names = {f"{n}.weight" if n else "weight": m.weight for n, m in layers}
        grads = self.gradient_difference(ctx, names)
        self.reinit = self.select(grads)
        # Float masks for the fine-tuning phases: 1 on re-initialised weights, kept_grad_scale elsewhere.
        self.masks = {n: torch.where(m, 1.0, cfg.kept_grad_scale) for n, m in self.reinit.items()}

    def gradient_difference(self, ctx, names: dict) -> dict[str, torch.Tensor]:
        """Σ_i ∇CE(x_r,i) − Σ_j ∇CE(x_f,j) at the current weights, for the named weights."""
        model, task = ctx.unwrapped, ctx.task
        retain, forget = ctx.views["retain"], ctx.views["forget"]
        size = self.config.retain_subset or len(forget)
        g = generator(ctx.seed, "grad_reinit", "subset")
        subset = torch.randperm(len(retain), generator=g)[:size]
        acc = {n: torch.zeros_like(p) for n, p in names.items()}
        was = model.training
        model.eval()
        bs = task.eval_batch_size
        try:
            for sign, view, positions in ((1.0, retain, subset), (-1.0, forget, torch.arange(len(forget)))):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(ctx.seed)  # the training augmentation of the views, if any
                    for batch in _batches(view, positions, bs):
                        batch = {k: v.to(ctx.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                        loss = task.loss(model, batch) * (sign * len(batch["label"]))
                        grads = torch.autograd.grad(loss, list(names.values()), allow_unused=True)
                        for n, gr in zip(names, grads):
                            if gr is not None:
                                acc[n] += gr
        finally:
            model.train(was)
        return acc

    def select(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Bool masks: True on the init_rate share of weights with the smallest |g| (per layer or global)."""
        rate = self.config.init_rate
        if self.config.scope == "global":
            flat = torch.cat([g.abs().flatten() for g in grads.values()])
            k = round(rate * flat.numel())
            chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
            if k:
                chosen[torch.topk(flat, k, largest=False).indices] = True
            out, start = {}, 0
            for n, g in grads.items():
                out[n] = chosen[start:start + g.numel()].view_as(g)
                start += g.numel()
            return out
        out = {}
        for n, g in grads.items():
            k = round(rate * g.numel())
            m = torch.zeros(g.numel(), dtype=torch.bool, device=g.device)
            if k:
                m[torch.topk(g.abs().flatten(), k, largest=False).indices] = True
            out[n] = m.view_as(g)
        return out

    def _reinitialise(self, ctx):
        params = dict(ctx.unwrapped.named_parameters())
        g = generator(ctx.seed, "grad_reinit", "init")
        with torch.no_grad():
            for n, mask in self.reinit.items():
                p = params[n]
                fan_out = p.shape[0] * (p[0][0].numel() if p.dim() > 2 else 1)
                std = math.sqrt(2.0 / fan_out)  # kaiming_normal_(mode="fan_out", nonlinearity="relu")
                fresh = (torch.randn(p.shape, generator=g) * std).to(p.device, p.dtype)
                p.copy_(torch.where(mask, fresh, p))
        ctx.state["grad_reinit"] = {"reinitialised": int(sum(int(m.sum()) for m in self.reinit.values())),
                                    "of": int(sum(m.numel() for m in self.reinit.values()))}

    def phases(self, ctx):
        cfg = self.config
        epochs = max(1, round(cfg.epochs))
        per_epoch = epoch_steps(self, ctx, "retain")
        phases = [Phase(f"finetune-{e}", per_epoch, ("retain",), lr=cfg.lr * f, masks=self.masks,
                        on_start=self._reinitialise if e == 0 else None)
                  for e, f in enumerate(linear_annealing_factors(epochs))]
        return cap(phases, cfg.max_steps)

    def losses(self, batch, ctx):
        return {"retain_ce": ctx.task.loss(ctx.model, batch["retain"])}
