"""ssd — Selective Synaptic Dampening (Foster et al., AAAI 2024): a closed-form, training-free edit.

Reference code: if-loops/selective-synaptic-dampening ``src/ssd.py::ParameterPerturber``
(``calc_importance``, ``modify_weight``) and ``src/forget_random_strategies.py::ssd_tuning``:

* importance (a diagonal "Fisher"), model in eval mode: for each mini-batch, the squared gradient
  of the batch-mean CE; averaged over the number of batches — the mean of squared *batch*
  gradients, not of per-sample ones. It is computed with
  :func:`erase.saliency.gradient_statistics` (``power=2, reduce="mean_of_power"``) over every
  parameter;
* I_D on the full training set D = retain ∪ forget, iterated unshuffled as
  ``ConcatDataset(retain, forget)`` (batches may straddle the boundary; we rebatch the two views
  the same way), and I_f on the forget set, both without augmentation, batch 128 (``-b``);
* for every coordinate with I_f > α·I_D (strict): θ ← β·θ with β = min(λ·I_D/I_f, 1)
  (``exponent`` 1, ``lower_bound`` 1). All other coordinates are untouched. No training.

Defaults from every ``forget_*_main.py``: α (``selection_weighting``) = 10, λ
(``dampening_constant``) = 1, batch 128. ``streams = ()`` and no phases: the engine only calls
``setup`` and ``apply``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from erase.engine.method import Method, MethodConfig
from erase.errors import EraseError
from erase.fields import opt
from erase.registry import register_method
from erase.saliency import gradient_statistics


@dataclass
class SSDConfig(MethodConfig):
    batch_size: int = opt(128, "batch size of the importance estimates (it changes their scale)")
    alpha: float = opt(10.0, "selection weighting α: dampen coordinates with I_f > α·I_D")
    dampening: float = opt(1.0, "dampening constant λ: scale selected weights by min(λ·I_D/I_f, 1)")

    length_fields = ()  # a closed-form edit: no optimiser steps, so --epochs / --max-steps do not apply

    def validate(self) -> None:
        super().validate()
        if self.alpha < 0 or self.dampening < 0:
            raise EraseError("--alpha and --dampening must be >= 0")


def rebatch(batches: Iterable[dict], size: int) -> Iterator[dict]:
    """Re-chunk a stream of dict batches (tensors with a leading batch axis) into batches of ``size``."""
    pending: dict | None = None
    for b in batches:
        pending = b if pending is None else {k: torch.cat([pending[k], b[k]]) for k in b}
        n = len(next(iter(pending.values())))
        while n >= size:
            yield {k: v[:size] for k, v in pending.items()}
            pending = {k: v[size:] for k, v in pending.items()}
            n -= size
    if pending is not None and len(next(iter(pending.values()))):
        yield pending


@register_method("ssd")
class SelectiveSynapticDampening(Method):
    tasks = ("classifier",)
    Config = SSDConfig
    streams = ()
    # Training-free: no learning rate; a tuning grid multiplies the selection threshold instead.
    tunable = ("alpha",)

    def importances(self, ctx) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(I_D, I_f): mean squared batch gradients on retain ∪ forget and on forget."""
        for name in ("forget", "retain"):
            if name not in ctx.views or len(ctx.views[name]) == 0:
                raise EraseError(f"ssd needs a non-empty {name!r} set")
        bs = self.config.batch_size
        stats = dict(power=2, reduce="mean_of_power", device=ctx.device)
        full = rebatch((b for name in ("retain", "forget") for b in ctx.task.iterate(name)), bs)
        imp_d = gradient_statistics(ctx.unwrapped, ctx.task.loss, full, desc="importance on D", progress=ctx.progress, **stats)
        imp_f = gradient_statistics(ctx.unwrapped, ctx.task.loss, rebatch(ctx.task.iterate("forget"), bs),
                                    desc="importance on Df", progress=ctx.progress, **stats)
        return imp_d, imp_f

    def apply(self, ctx):
        cfg = self.config
        imp_d, imp_f = self.importances(ctx)
        selected = total = 0
        with torch.no_grad():
            for name, p in ctx.unwrapped.named_parameters():
                d, f = imp_d[name], imp_f[name]
                where = f > cfg.alpha * d
                beta = (cfg.dampening * d / torch.where(where, f, torch.ones_like(f))).clamp(max=1.0)
                p.mul_(torch.where(where, beta, torch.ones_like(beta)).to(p.dtype))
                selected += int(where.sum())
                total += where.numel()
        ctx.state["ssd_selected"], ctx.state["ssd_share"] = selected, selected / max(total, 1)
