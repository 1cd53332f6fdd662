"""fmn — Forget-Me-Not attention re-steering (Zhang et al., 2023).

While the model denoises images of the concept under prompts that name it, an attention store
(diffusers attention processors on every cross-attention layer) records the attention
probabilities; the loss is their norm at the concept's token positions, averaged over layers, so
the UNet learns to stop attending to those tokens. Trains the cross-attention layers only (the
reference's ``only_optimize_ca``), for a few dozen steps (reference: 35 steps, lr 2e-6, Adam, on
SD v1.x; larger learning rates suit small models).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from erase.engine.masking import whole
from erase.engine.method import Method, MethodConfig
from erase.errors import EraseError
from erase.fields import opt
from erase.registry import register_method


@dataclass
class FMNConfig(MethodConfig):
    max_steps: int = opt(35, "optimisation steps")
    lr: float = opt(2e-6, "learning rate")
    optimizer: str = opt("adam", "optimiser", ("sgd", "adamw", "adam"))
    weight_decay: float = opt(0.0, "weight decay")
    batch_size: int = opt(4, "concept images per step")


@register_method("fmn")
class ForgetMeNot(Method):
    tasks = ("diffusion",)
    Config = FMNConfig
    streams = ("forget",)
    default_weights = {"attention": 1.0}

    DDPM_ERROR = "fmn re-steers text cross-attention; it needs a text-to-image model, not a DDPM"

    def check_task_config(self, task_cfg):
        if task_cfg.model_has_cross_attention() is False:
            raise EraseError(self.DDPM_ERROR)
        lmap = task_cfg.layer_family()
        problem = lmap.recording_problem() if lmap is not None else None
        if problem:
            raise EraseError(f"fmn re-steers the attention it records: {problem}")

    def check_task(self, task):
        if not task.has_cross_attention:
            raise EraseError(self.DDPM_ERROR)

    def setup(self, ctx):
        self.token_mask = ctx.task.concept_token_mask().to(ctx.device)
        self.store = ctx.task.record_attention(ctx.unwrapped)

    def parameter_masks(self, ctx):
        text = ctx.task.layer_map(ctx.model).is_text_attention
        return {n: whole(text(n)) for n, _ in ctx.model.named_parameters()}

    def losses(self, batch, ctx):
        b = batch["forget"]
        self.store.reset()
        self.store.recording = True
        try:
            ctx.task.loss(ctx.model, b)  # one denoising pass at a random timestep, recording attention
        finally:
            self.store.recording = False
        tokens = self.token_mask[b["prompt"]]  # (B, 77)
        norms = []
        for probs in self.store.maps.values():
            heads = probs.shape[0] // tokens.shape[0]
            sel = probs * tokens.repeat_interleave(heads, 0)[:, None, :].to(probs.dtype)
            norms.append(sel.flatten(1).norm(dim=1).mean())
        return {"attention": torch.stack(norms).mean()}

    def finalize(self, ctx):
        self.store.remove()
