"""iu — influence unlearning with a WoodFisher inverse-Hessian approximation (a one-shot edit).

Reference code: OPTML-Group/Unlearn-Sparse ``unlearn/Wfisher.py`` (the second, winning definitions
of ``sam_grad`` / ``woodfisher`` / ``apply_perturb``) and OPTML-Group/Unlearn-Saliency
``Classification/unlearn/Wfisher.py`` (identical for non-ImageNet data). Model in eval mode, CE with
the true labels, all parameters that require grad, flattened into one vector:

1. forget_grad = Σ_{i∈Df} ∇ℓ_i / (n_f + n_r)  (batch-mean gradients × batch size, summed);
2. retain_grad = Σ_{j∈Dr} ∇ℓ_j · n_f / ((n_f + n_r)·n_r)  (the mean retain gradient × n_f/n);
3. v = forget_grad − retain_grad;
4. k = the recursion over per-sample retain gradients g_0, g_1, … (batch size 1, unshuffled, the
   first retain samples in dataset order, with training augmentation): k ← v, o ← g_0; then for
   each later g: t = o·g; k ← k − (k·g)/(N + t)·o; o ← o − t/(N + t)·o. N = 1000 is hard-coded,
   and the loop stops after index N + 1, i.e. it reads N + 2 samples (or the whole retain set);
5. θ ← θ + α·k (ascent on the forget loss, descent on the retain loss).

What the recursion computes: every update is k ← (I + o gᵀ/N)⁻¹ k (Sherman–Morrison), so
k = (M_1 ⋯ M_m)⁻¹ v with M_n = I + o_n g_nᵀ/N. Because o is only ever rescaled, o_n stays parallel
to g_0, and k − v lies in span(g_0): the reference does *not* apply the empirical-Fisher inverse
(I + Σ g gᵀ/N)⁻¹ that WoodFisher intends (that would need o_n = F_{n−1}⁻¹ g_n, one stored vector per
sample). We reproduce the reference by default (``--hessian reference``); ``--hessian woodbury``
applies the intended inverse exactly, k = (I + Gᵀ G/N)⁻¹ v = v − Gᵀ (N·I + G Gᵀ)⁻¹ G v over the same
N + 2 samples, which stores all of G (samples × parameters floats; refused above 2 GiB).
Gradients see the task's training augmentation, as the reference's loaders do (the classifier
task's ``--no-augment`` turns it off); the augmentation draws are seeded by the run's seed.

Default α: the code default ``--alpha 0.2`` is a placeholder shared by several methods and the
READMEs give no value. The SalUn paper is quoted (second-hand, OPTML-Group/Unlearn-Saliency
issue #11; unverified) as searching α in [1, 20]; a third-party re-run on the same code base uses 2
(SVHN). We default to α = 10, the middle of the quoted range; tune it with ``--alpha``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from erase.engine.method import Method, MethodConfig
from erase.engine.streams import move_to
from erase.errors import EraseError
from erase.fields import opt
from erase.registry import register_method

MAX_WOODBURY_BYTES = 2 * 2**30


@dataclass
class IUConfig(MethodConfig):
    alpha: float = opt(10.0, "step size α of θ ← θ + α·k (reference search range [1, 20], unverified)")
    fisher_samples: int = opt(1000, "N of the WoodFisher recursion; it reads the first N + 2 retain samples")
    hessian: str = opt("reference", "inverse-Fisher approximation: the reference's recursion, or the exact "
                       "Woodbury inverse of I + ΣggᵀN⁻¹ it approximates", ("reference", "woodbury"))

    length_fields = ()  # a closed-form edit: no optimiser steps, so --epochs / --max-steps do not apply

    def validate(self) -> None:
        super().validate()
        if self.fisher_samples < 1:
            raise EraseError(f"--fisher-samples must be >= 1, got {self.fisher_samples}")


def _sample(batch: dict, i: int) -> dict:
    n = len(batch["label"])
    return {k: v[i:i + 1] if torch.is_tensor(v) and v.dim() > 0 and len(v) == n else v for k, v in batch.items()}


@register_method("iu")
class InfluenceUnlearning(Method):
    tasks = ("classifier",)
    Config = IUConfig
    streams = ()
    # Closed form: no learning rate; a tuning grid multiplies the step size instead.
    tunable = ("alpha",)

    def _flat_grad(self, ctx, params, batch) -> torch.Tensor:
        loss = ctx.task.loss(ctx.unwrapped, move_to(batch, ctx.device))
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])

    def gradient_sum(self, ctx, params, name: str) -> tuple[torch.Tensor, int]:
        """(Σ_i ∇ℓ_i over the view, its size): batch-mean gradients times batch sizes."""
        total, count = None, 0
        for batch in ctx.task.iterate(name, augment=True):
            n = len(batch["label"])
            g = self._flat_grad(ctx, params, batch) * n
            total = g if total is None else total + g
            count += n
        return total, count

    def sample_gradients(self, ctx, params):
        """Per-sample retain gradients, in dataset order: the first N + 2 (the reference's loop)."""
        limit = self.config.fisher_samples + 2
        seen = 0
        for batch in ctx.task.iterate("retain", augment=True):
            for i in range(len(batch["label"])):
                yield self._flat_grad(ctx, params, _sample(batch, i))
                seen += 1
                if seen >= limit:
                    return

    def direction(self, ctx) -> torch.Tensor:
        """k, the flat update direction (θ ← θ + α·k)."""
        for name in ("forget", "retain"):
            if name not in ctx.views or len(ctx.views[name]) == 0:
                raise EraseError(f"iu needs a non-empty {name!r} set")
        model = ctx.unwrapped
        params = [p for p in model.parameters() if p.requires_grad]
        was_training = model.training
        model.eval()
        torch.manual_seed(ctx.seed)  # the augmentation draws
        try:
            forget_sum, n_f = self.gradient_sum(ctx, params, "forget")
            retain_sum, n_r = self.gradient_sum(ctx, params, "retain")
            v = forget_sum / (n_f + n_r) - retain_sum * n_f / ((n_f + n_r) * n_r)
            big_n = float(self.config.fisher_samples)
            if self.config.hessian == "woodbury":
                return self._woodbury(ctx, params, v, big_n)
            k, o = v.clone(), None
            for g in self.sample_gradients(ctx, params):
                with torch.no_grad():
                    if o is None:
                        o = g.clone()
                        continue
                    t = torch.dot(o, g)
                    k -= (torch.dot(k, g) / (big_n + t)) * o
                    o -= (t / (big_n + t)) * o
            return k
        finally:
            model.train(was_training)

    def _woodbury(self, ctx, params, v, big_n) -> torch.Tensor:
        d = v.numel()
        m = min(self.config.fisher_samples + 2, len(ctx.views["retain"]))
        if m * d * v.element_size() > MAX_WOODBURY_BYTES:
            raise EraseError(f"--hessian woodbury would store {m} x {d} gradients "
                             f"({m * d * v.element_size() / 2**30:.1f} GiB); lower --fisher-samples")
        g = torch.stack(list(self.sample_gradients(ctx, params)))
        with torch.no_grad():
            gram = (g @ g.T).double()
            eye = torch.eye(len(g), dtype=gram.dtype, device=gram.device)
            inner = torch.linalg.solve(big_n * eye + gram, (g @ v).double())
            return v - g.T @ inner.to(g.dtype)

    def apply(self, ctx):
        k = self.direction(ctx)
        offset = 0
        with torch.no_grad():
            for p in (p for p in ctx.unwrapped.parameters() if p.requires_grad):
                n = p.numel()
                p.add_(self.config.alpha * k[offset:offset + n].view_as(p))
                offset += n
        ctx.state["iu_direction_norm"] = float(k.norm())
