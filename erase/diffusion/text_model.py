"""A denoiser that reads text through its own text encoder: the UNet plus a trainable text encoder, one module.

Methods that erase a concept from the *text encoder* (AdvUnlearn trains the CLIP text encoder, and
optionally the UNet's cross-attention) need the engine to optimise, checkpoint and resume both parts;
the engine trains one ``nn.Module``. :class:`TextConditionedUNet` is that module: ``unet`` and
``text_encoder`` are its children (state-dict keys ``unet.*`` and ``text_encoder.*``), and calling it is
calling the UNet — with ``encoder_hidden_states`` given as usual, or with token ``ids`` (and optionally
replaced input token embeddings) that it encodes through its own text encoder first. So
``DenoisingTask.predict(model, x_t, t, cond)`` works unchanged, and a loss that encodes inside the call
goes through the DDP wrapper's forward (gradients of the text encoder are synchronised across processes).

It is also what an attack gets as the erased model when that model has its own text encoder
(``erase.robustness.run``): generation then takes the unconditional condition from the same encoder,
as ``StableDiffusionPipeline`` with the erased text encoder does.
"""

from __future__ import annotations

import torch
from torch import nn

from erase.diffusion.text_encoding import encode_ids, token_ids


class TextConditionedUNet(nn.Module):
    def __init__(self, unet: nn.Module, text_encoder: nn.Module, tokenizer):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer  # not a module: no weights, not in the state dict

    # The UNet's read-only facts, for code that reads them off "the denoiser" (samplers, attacks).
    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def encode_ids(self, ids: torch.Tensor, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """(N, L, D) conditions from token ids through this model's text encoder (keeps gradients)."""
        return encode_ids(self.text_encoder, self.tokenizer, ids, token_embeds)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """(N, L, D) conditions of ``prompts`` as this model reads them (no gradients)."""
        with torch.no_grad():
            return self.encode_ids(token_ids(self.tokenizer, prompts)).detach()

    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """(N, L, D_tok) the text encoder's input token embeddings of ``ids`` (its own lookup, detached)."""
        layer = self.text_encoder.get_input_embeddings()
        with torch.no_grad():
            return layer(ids.to(layer.weight.device)).detach()

    def forward(self, sample, timestep, encoder_hidden_states=None, *, ids=None, token_embeds=None, **kwargs):
        """The UNet's output; with ``ids`` the condition is encoded here (``token_embeds`` replacing the lookup)."""
        if ids is not None:
            encoder_hidden_states = self.encode_ids(ids, token_embeds)
        if encoder_hidden_states is None:
            raise ValueError("give encoder_hidden_states or token ids")
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states.to(sample.dtype), **kwargs)


def denoiser(model: nn.Module) -> nn.Module:
    """The UNet inside ``model`` (itself for a plain UNet)."""
    return model.unet if isinstance(model, TextConditionedUNet) else model


def own_text_encoder(model: nn.Module) -> nn.Module | None:
    """``model``'s own text encoder, or None when it reads the task's conditions."""
    return model.text_encoder if isinstance(model, TextConditionedUNet) else None
