"""What attacks need from a Stable Diffusion task: tokens in, text-encoder states out, images from a condition.

``AttackView(task)`` gives a :class:`~erase.diffusion.task.DiffusionTask` the shape of
``erase.attacks.base.TextTask`` (a structural protocol: nothing here imports erase.attacks, and
attacks never see the pipeline). Conditions are what the UNet reads: the text encoder's
``last_hidden_state``, exactly as ``DiffusionTask.encode`` builds them, so an attack's embedding and
a replayed prompt's text meet the UNet the same way.
"""

from __future__ import annotations

import torch

from erase.diffusion.sampling import sample_sd
from erase.errors import EraseError


class AttackView:
    def __init__(self, task):
        if task.kind != "sd":
            raise EraseError("attacks need a text-conditioned model (Stable Diffusion); --model is a "
                             "class-conditional DDPM, which has no prompt to attack")
        self.task = task
        self.pipe = task.base.pipe
        self.tokenizer = self.pipe.tokenizer
        self.device = task.device

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """(N, L, D): the condition of each prompt (the task's own encoding)."""
        return self.task.encode(prompts)

    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """(N, L, D) from token ids padded to L, as diffusers' ``encode_prompt`` runs the text encoder."""
        encoder = self.pipe.text_encoder
        ids = ids.to(self.device)
        mask = None
        if getattr(encoder.config, "use_attention_mask", False):
            # Tokens after the first end-of-text are padding (SD 1.x pads with end-of-text itself).
            eos = ids == self.tokenizer.eos_token_id
            mask = (eos.long().cumsum(1) - eos.long() == 0).long()
        return encoder(ids, attention_mask=mask)[0]

    def generate(self, model, cond: torch.Tensor, seeds: list[int], guidance: float | None = None) -> torch.Tensor:
        """Images in [0, 1] on the CPU, one per seed, with the task's sampler, steps and (default) guidance."""
        n = len(seeds)
        cond = cond.to(self.device)
        cond = cond.expand(n, -1, -1) if cond.shape[0] == 1 else cond
        if cond.shape[0] != n:
            raise ValueError(f"{cond.shape[0]} conditions for {n} seeds")
        was = model.training
        model.eval()
        try:
            x, _ = sample_sd(self.pipe, model, cond, self.task.null_condition(n, self.device), seeds,
                             self.task.guidance if guidance is None else guidance, self.task.cfg.sample_steps)
        finally:
            model.train(was)
        return self.task.to_images(x).cpu()
