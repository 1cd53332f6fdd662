"""The text encoder as attacks and text-encoder methods need it: from token ids, and from token embeddings.

``encode_ids(encoder, tokenizer, ids)`` is what diffusers' ``encode_prompt`` computes for the same
ids (``last_hidden_state``; an attention mask only where the encoder's config asks for one), so an
optimised condition and a replayed prompt meet the UNet the same way. ``token_embeds`` replaces the
encoder's input token embeddings (N, L, D_tok) — the relaxed one-hot prefix of UnlearnDiffAtk, the
new token of concept inversion, AdvUnlearn's adversarial prefix — through a forward hook on the
encoder's input embedding layer: the ids still go in, so position embeddings and the pooled
end-of-text state are the model's own, and no transformers internals are re-implemented.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def token_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    """(N, L) ids padded to the tokenizer's length, as ``encode_prompt`` tokenises (truncating)."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


@contextmanager
def replaced_token_embeddings(encoder: nn.Module, embeds: torch.Tensor):
    """While inside, the encoder's input embedding layer returns ``embeds`` (N, L, D_tok) instead of its lookup."""
    layer = encoder.get_input_embeddings()

    def hook(_module, _inputs, output):
        if output.shape[:-1] != embeds.shape[:-1]:
            raise ValueError(f"token embeddings {tuple(embeds.shape)} do not match the ids {tuple(output.shape[:-1])}")
        return embeds.to(output.dtype)

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def encode_ids(encoder: nn.Module, tokenizer, ids: torch.Tensor, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """(N, L, D) conditions; keeps gradients (to ``token_embeds`` and the encoder) outside ``torch.no_grad``."""
    device = next(encoder.parameters()).device
    ids = ids.to(device)
    mask = None
    if getattr(encoder.config, "use_attention_mask", False):
        # Tokens after the first end-of-text are padding (SD 1.x pads with end-of-text itself).
        eos = ids == tokenizer.eos_token_id
        mask = (eos.long().cumsum(1) - eos.long() == 0).long()
    if token_embeds is None:
        return encoder(ids, attention_mask=mask)[0]
    with replaced_token_embeddings(encoder, token_embeds.to(device)):
        return encoder(ids, attention_mask=mask)[0]
