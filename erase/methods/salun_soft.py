"""salun_soft — soft-thresholding SalUn: random labeling with a proximal ℓ1 step on θ − θo.

What the reference code calls "Soft-thresholding SalUn" (OPTML-Group/Unlearn-Saliency
``Classification/README.md`` before commit f31f82e, which runs ``--unlearn RL_proximal``;
``Classification/unlearn/RL_pro.py``; the Stable Diffusion counterpart is
``SD/train-scripts/proximal_gradient.py``) is not a real-valued gradient mask. The hard 0/1
saliency mask is replaced by proximal gradient descent on RL's loss + β‖θ − θo‖₁: after every
optimiser step, the update Δ = θ − θo is soft-thresholded,

    Δ ← sign(Δ)·max(|Δ| − τ, 0),   i.e. Δ ← s ⊙ Δ with the real-valued factor s = max(1 − τ/|Δ|, 0),

where τ is the r-th smallest |Δ| over all trained coordinates, so the r least-moved coordinates
return exactly to θo and all others shrink by τ. The share r/n decays linearly over training:
r = ⌊ratio·(T − (t + 1))/T·n⌋ after step t of T (``--prox-ratio``, default 0.5: the DDPM
``train.py --mask_ratio`` default, and the same 50 % as SalUn's hard mask; the Classification
arg parser never defines ``--mask_ratio``, and the SD script requires it). The saliency is thus
learned from how far each weight moves rather than taken from the forget gradient at θo;
``RL_proximal`` accepts the hard mask but never uses it (``--hard-mask`` adds it on top).

Everything else is SalUn's (this class subclasses :class:`~erase.methods.salun.SalUn`): random
labels on Df and true labels on Dr — sequential passes for classifiers (the reference's SVHN
branch of ``RL_proximal`` and SalUn's current RL), joint steps for diffusion (as the SD script) —
SGD lr 0.013, momentum 0.9, weight decay 5e-4, batch 256, 10 epochs. The only published command
(README before f31f82e) used lr 0.1 for both SalUn and its soft variant. On a diffusion task the
inherited defaults (Adam, lr 1e-5, batch 8, 5 epochs) match ``proximal_gradient.py``'s; that script
weights the retain loss by ``--alpha`` (default 0.1): ``--loss-weights '{retain_loss: 0.1}'``.

Deviations from the reference, and why:
* θo is the original model. The SD script anchors at the original too, but the classifier's
  ``RL_proximal`` re-reads θo at the start of every epoch (it is a per-epoch function), which
  lets the anchor drift.
* r is recomputed every step (SD script, SVHN branch); the CIFAR branch computes it once per epoch.
* The CIFAR branch concatenates relabeled forget data and retain data into one shuffled loader;
  our classifier pairing is SalUn's current sequential one (see rl.py).
* The thresholding runs in the engine's ``after_step`` hook, right after each optimiser step, so
  checkpoints hold thresholded weights and a resumed run continues exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from erase.errors import EraseError
from erase.fields import opt
from erase.methods.salun import SalUn, SalUnConfig
from erase.registry import register_method


@dataclass
class SalUnSoftConfig(SalUnConfig):
    prox_ratio: float = opt(0.5, "share of coordinates soft-thresholded back to the original weights after "
                            "the first step, decaying linearly to 0 over training")
    hard_mask: bool = opt(False, "also restrict training to SalUn's hard saliency mask (--mask-fraction); "
                          "the reference computes it but does not use it")

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.prox_ratio <= 1:
            raise EraseError(f"--prox-ratio must be in [0, 1], got {self.prox_ratio}")


def soft_threshold_factor(delta: torch.Tensor, count: int) -> tuple[torch.Tensor, float]:
    """The real-valued shrink factor s = max(1 − τ/|Δ|, 0) and τ, the ``count``-th smallest |Δ|.

    ``delta`` is flat. s is 0 exactly where |Δ| ≤ τ (at least ``count`` coordinates), in (0, 1)
    elsewhere; s·Δ = sign(Δ)·max(|Δ| − τ, 0). ``count`` <= 0 gives τ = 0 and s = 1.
    """
    mag = delta.abs()
    if count <= 0:
        return torch.ones_like(mag), 0.0
    tau = torch.kthvalue(mag.float(), min(count, mag.numel())).values.to(mag.dtype)
    safe = torch.where(mag > 0, mag, torch.ones_like(mag))
    factor = torch.where(mag > tau, 1 - tau / safe, torch.zeros_like(mag))
    return factor, float(tau)


@register_method("salun_soft")
class SalUnSoft(SalUn):
    Config = SalUnSoftConfig

    def setup(self, ctx):
        cfg = self.config
        if cfg.hard_mask:
            super().setup(ctx)
        else:
            self.masks = None
        self._params = [p for p in ctx.unwrapped.parameters() if p.requires_grad]
        self._anchor = [p.detach().clone() for p in self._params]

    def count_at(self, ctx, step: int) -> int:
        """r: coordinates returned to θo after optimiser step ``step`` (0-based) of ``ctx.total_steps``."""
        total = max(ctx.total_steps, 1)
        n = sum(p.numel() for p in self._params)
        return int(self.config.prox_ratio * (total - (step + 1)) / total * n)

    @torch.no_grad()
    def proximal_step(self, ctx, step: int) -> None:
        """Soft-threshold θ − θo with the share of optimiser step ``step``; logs τ in ``ctx.state``."""
        count = self.count_at(ctx, step)
        delta = torch.cat([(p - a).reshape(-1) for p, a in zip(self._params, self._anchor)])
        factor, tau = soft_threshold_factor(delta, count)
        offset = 0
        for p, a in zip(self._params, self._anchor):
            k = p.numel()
            s = factor[offset:offset + k].view_as(p)
            p.copy_(a + s * (p - a))
            offset += k
        ctx.state["prox_step"], ctx.state["prox_count"], ctx.state["prox_tau"] = step, count, tau

    def after_step(self, ctx):
        self.proximal_step(ctx, ctx.global_step)
