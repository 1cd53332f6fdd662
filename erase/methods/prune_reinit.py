"""prune_reinit — the NeurIPS 2023 unlearning challenge's "4th" method (Sebastian Oleszko; 5th on the
private leaderboard): prune, re-initialise, then entropy-regularised fine-tuning.

Sources: the write-up "5th Place Solution" (kaggle.com/c/neurips-2023-machine-unlearning/discussion/459148)
and the port in xcadet/deepunlearn @ 6830ff6 ``munl/unlearning/kgltop4.py``.

1. Global unstructured L1 pruning (``prune.global_unstructured(L1Unstructured, amount=0.99)``) over the
   weights *and biases* of every convolution and linear layer (the head included): the 99 % smallest
   |θ| over all of them are set to 0.
2. Every pruned **weight** is re-drawn from U(−√k, √k), k = 1/fan_in (conv: 1/(c_in·kh·kw)); pruned
   biases stay 0.
3. Fine-tune on the retain set only for int(3.2 · batches per epoch) steps, SGD lr 5e-4, momentum 0.9,
   wd 5e-4, batch 64, no schedule, with
   loss = CE(f(x), y; class weights count_c^−0.1 over the retain set) + MSE(H(softmax f(x)), H(softmax f_θo(x))),
   H the per-example entropy and f_θo the frozen original model.
4. Finally the weights are rounded to float16 and back ("quantize"; ``--no-quantize-fp16`` skips it).

The reference loop stops after max_iters + 1 steps (an off-by-one); we run int(3.2·batches).
The pruning mask is computed once at the start; pruned weights are re-drawn, not kept at zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from erase.engine.method import Method, MethodConfig, Phase
from erase.errors import EraseError
from erase.fields import opt
from erase.methods._layers import WEIGHT, cap, epoch_steps, generator, has_own_parameters
from erase.registry import register_method


def entropy(logits: torch.Tensor) -> torch.Tensor:
    log_p = F.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


@dataclass
class PruneReinitConfig(MethodConfig):
    epochs: float = opt(3.2, "fine-tuning epochs over the retain set (reference: 3.2)")
    lr: float = opt(5e-4, "learning rate (constant)")
    batch_size: int = opt(64, "retain examples per step (reference: 64)")
    prune_amount: float = opt(0.99, "share of conv/linear weights and biases pruned by global |θ| (then re-drawn)")
    class_weight_power: float = opt(-0.1, "CE class weights = (retain count of the class) ** power (0: unweighted)")
    quantize_fp16: bool = opt(True, "round the final weights to float16 and back, as the reference does")

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.prune_amount <= 1:
            raise EraseError("prune_reinit: --prune-amount must be in [0, 1]")


@register_method("prune_reinit")
class PruneReinit(Method):
    tasks = ("classifier",)
    Config = PruneReinitConfig
    streams = ("retain",)
    default_weights = {"retain_ce": 1.0, "entropy_mse": 1.0}

    def setup(self, ctx):
        self.teacher = ctx.frozen_copy()
        counts = torch.zeros(ctx.task.num_classes)
        for batch in ctx.task.iterate("retain"):
            counts += torch.bincount(batch["label"].flatten().cpu(), minlength=ctx.task.num_classes).float()
        p = self.config.class_weight_power
        self.class_weights = counts.clamp(min=1).pow(p).to(ctx.device) if p else None

    def _prune_and_reinit(self, ctx):
        model = ctx.unwrapped
        layers = [m for _, m in model.named_modules() if isinstance(m, WEIGHT) and has_own_parameters(m)]
        tensors = [t for m in layers for t in (m.weight, m.bias) if t is not None]
        if not tensors:
            raise EraseError("prune_reinit: the model has no convolution or linear layer")
        flat = torch.cat([t.detach().abs().flatten() for t in tensors])
        k = round(self.config.prune_amount * flat.numel())
        pruned = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        if k:
            pruned[torch.topk(flat, k, largest=False).indices] = True
        g = generator(ctx.seed, "prune_reinit")
        start, n_pruned = 0, 0
        with torch.no_grad():
            for m in layers:
                for t, is_weight in ((m.weight, True), (m.bias, False)):
                    if t is None:
                        continue
                    mask = pruned[start:start + t.numel()].view_as(t)
                    start += t.numel()
                    n_pruned += int(mask.sum())
                    if is_weight:
                        bound = math.sqrt(1.0 / (t[0].numel()))  # k = 1/fan_in = 1/(c_in·kh·kw)
                        fresh = ((torch.rand(t.shape, generator=g) - 0.5) * 2 * bound).to(t.device, t.dtype)
                        t.copy_(torch.where(mask, fresh, t))
                    else:
                        t.masked_fill_(mask, 0.0)
        ctx.state["prune_reinit"] = {"pruned": n_pruned, "of": int(flat.numel())}

    def phases(self, ctx):
        steps = int(self.config.epochs * epoch_steps(self, ctx, "retain"))
        return cap([Phase("finetune", max(1, steps), ("retain",), on_start=self._prune_and_reinit)],
                   self.config.max_steps)

    def losses(self, batch, ctx):
        retain = batch["retain"]
        logits = ctx.task.logits(ctx.model, retain)
        with torch.no_grad():
            target = entropy(ctx.task.logits(self.teacher, retain))
        return {"retain_ce": F.cross_entropy(logits, retain["label"], weight=self.class_weights),
                "entropy_mse": F.mse_loss(entropy(logits), target)}

    def finalize(self, ctx):
        if self.config.quantize_fp16:
            with torch.no_grad():
                for t in list(ctx.model.parameters()) + list(ctx.model.buffers()):
                    if t.is_floating_point():
                        t.copy_(t.half().to(t.dtype))

