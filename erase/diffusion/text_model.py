"""A denoiser that reads text through its own text encoders: the denoiser plus trainable text encoders, one module.

Methods that erase a concept from the *text encoder* (AdvUnlearn trains the CLIP text encoder, and
optionally the UNet's cross-attention) need the engine to optimise, checkpoint and resume both parts;
the engine trains one ``nn.Module``. :class:`TextConditionedUNet` is that module: ``unet`` (the UNet, or
SD3's transformer) and ``text_encoder`` (SDXL / SD3: also ``text_encoder_2``) are its children (state-dict
keys ``unet.*``, ``text_encoder.*``, ``text_encoder_2.*``: the pipeline's own attribute names), and calling it
is calling the denoiser — with the family's usual arguments, or with token ``ids`` (and optionally
replaced input token embeddings) that it encodes through its own text encoders first
(:class:`~erase.diffusion.text_stack.TextStack` builds the pipeline's condition from them, and ``denoise``, the
task's prediction for that family, feeds it to the denoiser). So ``DenoisingTask.predict(model, x_t, t, cond)``
works unchanged, and a loss that encodes inside the call goes through the DDP wrapper's forward
(gradients of the text encoders are synchronised across processes).

It is also what an attack gets as the erased model when that model has its own text encoders
(``erase.robustness.run``): generation then takes the unconditional condition from the same encoders,
as the pipeline with the erased text encoders does.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch import nn

from erase.diffusion.text_encoding import token_ids
from erase.diffusion.text_stack import TextStack

ENCODER_NAMES = ("text_encoder", "text_encoder_2")  # the pipeline attributes of the trained CLIP encoders, in order


class TextConditionedUNet(nn.Module):
    """``denoise(denoiser, x_t, t, cond) -> prediction`` is the task's prediction for the family (SD: the UNet
    on ``encoder_hidden_states``); ``stack`` the family's text stack, whose encoders are replaced by
    ``encoders`` (trained copies, in the stack's order)."""

    def __init__(self, unet: nn.Module, encoders: list[nn.Module], stack: TextStack,
                 denoise: Callable | None = None):
        super().__init__()
        self.unet = unet
        for name, enc in zip(ENCODER_NAMES, encoders):
            setattr(self, name, enc)
        self.stack = stack.with_encoders(encoders)
        self.tokenizer = stack.tokenizer  # not a module: no weights, not in the state dict
        self._denoise = denoise

    @property
    def text_encoders(self) -> list[nn.Module]:
        return list(self.stack.encoders)

    # The denoiser's read-only facts, for code that reads them off "the denoiser" (samplers, attacks).
    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def encode_ids(self, ids: torch.Tensor, token_embeds: torch.Tensor | None = None):
        """The conditions of token ids through this model's text encoders (keeps gradients)."""
        return self.stack.encode_ids(ids, token_embeds)

    def encode(self, prompts: list[str]):
        """The conditions of ``prompts`` as this model reads them (no gradients)."""
        with torch.no_grad():
            return self.encode_ids(token_ids(self.tokenizer, prompts)).detach()

    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """(N, L, D_tok) the text encoders' input token embeddings of ``ids`` (their own lookup, side by side,
        detached)."""
        with torch.no_grad():  # each encoder's own lookup of just these ids (no copy of the whole tables)
            return torch.cat([e.get_input_embeddings()(ids.to(e.device)) for e in self.stack.encoders], dim=-1)

    def forward(self, *args, ids=None, token_embeds=None, **kwargs):
        """The denoiser's output; with ``ids`` the condition is encoded here (``token_embeds`` replacing the
        lookup) and the positional arguments are (x_t, t)."""
        if ids is None:
            return self.unet(*args, **kwargs)
        cond = self.encode_ids(ids, token_embeds)
        sample, timestep = args[:2]
        if self._denoise is None:  # SD: the UNet reads the encoder's hidden states
            return self.unet(sample, timestep, encoder_hidden_states=cond.to(sample.dtype), **kwargs)
        return SimpleNamespace(sample=self._denoise(self.unet, sample, timestep, cond))


def denoiser(model: nn.Module) -> nn.Module:
    """The UNet (or transformer) inside ``model`` (itself for a plain one)."""
    return model.unet if isinstance(model, TextConditionedUNet) else model


def own_text_encoder(model: nn.Module) -> list[nn.Module] | None:
    """``model``'s own text encoders, or None when it reads the task's conditions."""
    return model.text_encoders if isinstance(model, TextConditionedUNet) else None
