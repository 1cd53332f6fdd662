"""unlearndiffatk — To Generate or Not? Safety-Driven Unlearned Diffusion Models Are Still Easy to Generate Unsafe
Images ... For Now (Zhang et al., ECCV 2024; OPTML-Group/Diffusion-MU-Attack).

The erased model is its own "diffusion classifier": k adversarial tokens, inserted after the start
token ([start, adv(k), prompt, end]), are optimised so that the *erased* model denoises the base
model's image of the prompt well,

    min_{P'} ‖ε − ε_θ*(√ᾱ_t x₀ + √(1−ᾱ_t) ε, t | P')‖²     (``src/tasks/classifier_.py:L76-87``)

with x₀ the VAE latent of the original model's image of the prompt (its seed and guidance). Each
adversarial token is a relaxed one-hot row over the vocabulary (init uniform 1/|V|, kept on the
probability simplex by projection after every step); the forward pass draws a real token from each
row (a straight-through estimator whose backward clips the gradient to [-1, 1], ``text_grad_.py``),
so the loss always sees a real prompt. Timesteps are attacked in turn, ascending, ``iterations``
Adam steps each (fresh noise every step); after each timestep the rows' argmax is decoded into a
prompt, the erased model generates one image from it (the row's seed and guidance) and the judge
looks: the attack stops as soon as the concept is back (early stop, as the official object/nudity
runs do).

Defaults are the official ones (``configs/*/*.json`` and ``classifier_.py:L67-70`` at
OPTML-Group/Diffusion-MU-Attack): k = 3 for objects and styles (5 for nudity: ``--set prefix=5``),
50 timesteps 10, 30, ..., 990, 40 iterations, Adam lr 0.01 with weight decay 0.1 — at most 2,000
gradient steps and 51 images per prompt. The bundled tiny SD's ``erase.yaml`` sets the reduced
budget the benchmark uses. Special tokens are left out of the vocabulary (a decoded end-of-text
would cut the replayed prompt short). The prompt is replayed as text: decode, then re-tokenise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from erase.attacks.base import AttackConfig, AttackContext, AttackResult, register_attack
from erase.attacks.optimised import GradientAttack, Objective, Tensors, optimise
from erase.attacks.slots import SLOT, decode, embeds, frame
from erase.attacks.vocabulary import allowed_ids
from erase.fields import below_minimum, opt
from erase.prompts import PromptRow


@dataclass
class UnlearnDiffAtkConfig(AttackConfig):
    prefix: int = opt(3, "k: adversarial tokens after the start token (official: 3 for objects and styles, 5 for nudity)")
    timesteps: int = opt(50, "timesteps attacked in turn, evenly spaced and ascending (official 50: 10, 30, ..., 990)")
    iterations: int = opt(40, "Adam steps per timestep; the judge looks after each timestep (official `iteration` 40)")
    lr: float = opt(0.01, "Adam learning rate of the relaxed one-hot rows (official 0.01)")
    weight_decay: float = opt(0.1, "Adam weight decay (official 0.1)")
    early_stop: bool = opt(True, "stop a prompt's attack once the judge sees the concept (official for objects and "
                           "nudity; style runs have none)")

    def problems(self) -> list[str]:
        problems = super().problems()
        return (problems + below_minimum(self, 1, "prefix", "timesteps", "iterations")
                + below_minimum(self, 0, "lr", "weight_decay"))


class _SampleOneHot(torch.autograd.Function):
    """Forward: one real token per row, drawn from the row's distribution. Backward: the gradient, clipped."""

    @staticmethod
    def forward(ctx, probs: torch.Tensor) -> torch.Tensor:
        picked = torch.multinomial(probs.clamp_min(0) + 1e-12, 1).squeeze(1)
        return F.one_hot(picked, probs.shape[1]).to(probs.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return F.hardtanh(grad)


def project_simplex(rows: torch.Tensor) -> torch.Tensor:
    """Each row's Euclidean projection onto {u >= 0, Σu = 1} (exact, by sorting; official: bisection)."""
    u, _ = rows.sort(dim=1, descending=True)
    cumsum = u.cumsum(1) - 1
    k = torch.arange(1, rows.shape[1] + 1, device=rows.device, dtype=rows.dtype)
    support = (u - cumsum / k) > 0
    rho = support.to(rows.dtype).cumsum(1).argmax(1, keepdim=True)  # last index where the condition holds
    theta = cumsum.gather(1, rho) / (rho + 1).to(rows.dtype)
    return (rows - theta).clamp_min(0)


def timestep_schedule(n: int, total: int) -> list[int]:
    """n timesteps at the centres of n equal bins of [0, total): 10, 30, ..., 990 for n = 50 of 1000."""
    return [int((2 * i + 1) * total // (2 * n)) for i in range(n)]


@register_attack("unlearndiffatk")
class UnlearnDiffAtk(GradientAttack):
    Config = UnlearnDiffAtkConfig

    def run(self, row: PromptRow, ctx: AttackContext) -> AttackResult:
        cfg, task = self.config, ctx.task
        tok = task.tokenizer
        vocab = allowed_ids(tok).to(task.device)
        table = ctx.token_table()
        prompt = frame(tok, [*[SLOT] * cfg.prefix, row.prompt])
        ids = prompt.ids[None].to(task.device)
        x0 = self.target_latents(ctx, row)
        steps = timestep_schedule(cfg.timesteps, task.num_train_timesteps)

        def loss(batch: dict, probs: torch.Tensor, step: int) -> torch.Tensor:
            picked = _SampleOneHot.apply(probs) @ table[vocab]  # (k, D_tok): real tokens, relaxed gradient
            t = torch.full((1,), steps[min(step // cfg.iterations, len(steps) - 1)], device=task.device)
            x_t, target = self.noisy(ctx, batch["latents"], t)
            cond = ctx.encode_ids(ids, embeds(table, prompt, picked))
            return F.mse_loss(task.predict(ctx.model, x_t, t, cond).float(), target.float())

        def text_of(probs: torch.Tensor) -> str:
            return decode(tok, prompt.with_ids(vocab[probs.argmax(1)]))

        def project(probs: torch.Tensor) -> None:
            probs.copy_(project_simplex(probs))

        init = project_simplex(torch.full((cfg.prefix, len(vocab)), 1.0 / len(vocab), device=task.device))
        objective = Objective(Tensors(latents=x0), cfg.timesteps * cfg.iterations, cfg.lr, loss, "adam",
                              cfg.weight_decay, project=project,
                              check=(lambda p: self.judged(ctx, row, text_of(p))) if cfg.early_stop else None,
                              check_every=cfg.iterations)
        probs, summary = optimise(ctx, row, self.name, init, objective)
        text = text_of(probs)
        info = {"attack": self.name, "prefix_ids": vocab[probs.argmax(1)].tolist(),
                "timesteps_tried": -(-summary["steps"] // cfg.iterations), **summary}
        with torch.no_grad():
            return self.finish(row, ctx, ctx.encode([text]), text, None, info)
