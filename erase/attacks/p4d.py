"""p4d — Prompting4Debugging: Red-Teaming Text-to-Image Diffusion Models by Finding Problematic Prompts
(Chin et al., ICML 2024; joycenerd/P4D).

Find a prompt P' under which the *erased* model predicts the noise the *base* model predicts under
the original prompt P, on the base model's image of P:

    min_{P'} ‖ε̂_erased(x_t, t | P') − ε_base(x_t, t | P)‖²,   t ~ U[0, T)   (``optimize_n.py:L150-249``)

P' is a set of continuous token embeddings optimised PEZ-style: the forward pass uses each one's
nearest vocabulary embedding by cosine (``nn_project``, ``L68-96``), and the gradient with respect
to the projected embedding updates the continuous one (``L244``) — a straight-through estimator.
So the loss always sees a real prompt, and the prompt found is replayable text.

- ``--variant n`` (P4D-N): N = ``length`` learnable tokens replace the whole prompt, initialised
  from random vocabulary tokens (``initialize_prompt``, ``L21-47``);
- ``--variant k`` (P4D-K): the prompt is kept, with one learnable token before it and one after every
  ``every`` of its tokens, ⌊L/k⌋ + 1 in all (``optimize_k.py:L21-54``; the prompt's own tokens do not train).

Defaults are the official ones (``configs/esd_nudity_optmz_config.json``): AdamW lr 0.1, weight decay
0.1, 3,000 iterations, N = 16, k = 3, a look every 50 steps, 3 images per prompt. Selection differs
from the official repo, which keeps the prompt whose erased-model images are most similar (CLIP
ViT-H-14 image-image cosine) to the target and judges it at the end: erase asks the run's judge at
every look and stops at the first prompt whose image shows the concept — the rule of the
Diffusion-MU-Attack reproduction (``src/tasks/P4D_.py``), which needs no CLIP weights. Without a
judge the last prompt is kept. The bundled tiny SD's ``erase.yaml`` sets the reduced budget the
benchmark uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from erase.attacks.base import AttackConfig, AttackContext, AttackResult, register_attack
from erase.attacks.optimised import GradientAttack, Objective, Tensors, optimise
from erase.attacks.slots import SLOT, decode, embeds, frame, nearest_tokens, words
from erase.attacks.vocabulary import allowed_ids
from erase.fields import below_minimum, opt
from erase.prompts import PromptRow


@dataclass
class P4DConfig(AttackConfig):
    images: int = opt(3, "images generated per adversarial prompt; success if any shows the concept (official "
                      "`--num-samples` 3)")
    variant: str = opt("n", "P4D-N: learnable tokens replace the prompt; P4D-K: a learnable token after every k "
                       "prompt tokens", ("n", "k"))
    length: int = opt(16, "P4D-N: learnable tokens (official `prompt_len` 16)")
    every: int = opt(3, "P4D-K: a learnable token after every k prompt tokens (official k = 3)")
    steps: int = opt(3000, "optimisation steps (official `iter` 3000)")
    lr: float = opt(0.1, "AdamW learning rate of the continuous embeddings (official 0.1)")
    weight_decay: float = opt(0.1, "AdamW weight decay (official 0.1)")
    check_every: int = opt(50, "steps between looks: decode, generate, judge (official `eval_step` 50)")

    def problems(self) -> list[str]:
        problems = super().problems()
        return (problems + below_minimum(self, 1, "length", "every", "steps", "check_every")
                + below_minimum(self, 0, "lr", "weight_decay"))


def interleave(tokens: list[int], every: int) -> list:
    """P4D-K's parts: a slot, then the prompt's tokens with a slot after every ``every`` of them."""
    parts: list = [SLOT]
    for i in range(0, len(tokens), every):
        chunk = tokens[i:i + every]
        parts += [chunk, SLOT] if len(chunk) == every else [chunk]  # ⌊L/k⌋ + 1 slots in all
    return parts


@register_attack("p4d")
class P4D(GradientAttack):
    Config = P4DConfig

    def run(self, row: PromptRow, ctx: AttackContext) -> AttackResult:
        cfg, task = self.config, ctx.task
        tok = task.tokenizer
        base = self.needs_base(ctx)
        vocab = allowed_ids(tok).to(task.device)
        table = ctx.token_table()
        if cfg.variant == "n":
            prompt = frame(tok, [SLOT] * cfg.length)
        else:
            prompt = frame(tok, interleave(words(tok, row.prompt), cfg.every))
        ids = prompt.ids[None].to(task.device)
        with torch.no_grad():
            original = task.encode([row.prompt])  # what the base model reads: P, through the base text encoder
        x0 = self.target_latents(ctx, row)
        g = ctx.rng(row)
        init = table[vocab[torch.randint(len(vocab), (len(prompt.slots),), generator=g).to(task.device)]].float()

        def projected(values: torch.Tensor) -> torch.Tensor:
            return table[nearest_tokens(values, table, vocab)].float()

        def loss(batch: dict, values: torch.Tensor, step: int) -> torch.Tensor:
            hard = values + (projected(values) - values).detach()  # forward: real tokens; backward: to the continuous
            x0b = batch["latents"]
            t = torch.randint(0, task.num_train_timesteps, (x0b.shape[0],), device=x0b.device)
            x_t, _ = self.noisy(ctx, x0b, t)
            with torch.no_grad():
                target = task.predict(base, x_t, t, original)
            pred = task.predict(ctx.model, x_t, t, ctx.encode_ids(ids, embeds(table, prompt, hard)))
            return F.mse_loss(pred.float(), target.float())

        def text_of(values: torch.Tensor) -> str:
            return decode(tok, prompt.with_ids(nearest_tokens(values, table, vocab)))

        objective = Objective(Tensors(latents=x0), cfg.steps, cfg.lr, loss, "adamw", cfg.weight_decay,
                              check=lambda v: self.judged(ctx, row, text_of(v)), check_every=cfg.check_every)
        values, summary = optimise(ctx, row, self.name, init, objective)
        text = text_of(values)
        info = {"attack": self.name, "variant": cfg.variant, "learnable_tokens": len(prompt.slots), **summary}
        with torch.no_grad():
            return self.finish(row, ctx, ctx.encode([text]), text, None, info)
