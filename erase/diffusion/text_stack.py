"""A pipeline's CLIP text encoders as one, for token-level work: token ids (and replaced token embeddings) in,
the condition the denoiser reads out.

Attacks search token space (UnlearnDiffAtk's relaxed one-hot over the vocabulary, P4D's projected
embeddings, concept inversion's new word, Ring-a-Bell's genetic search over ids). SD 1.x/2.x has one
text encoder; SDXL and SD3 have two CLIP encoders that read the same ids (their tokenizers share the
vocabulary and merges; SDXL's second pads with ``!`` instead of end-of-text) and build the condition
together. :class:`TextStack` makes them one encoder to the attacks:

* the token-embedding table is the encoders' tables side by side, (V, D1 + D2): a token's embedding
  is its embedding in every encoder, and an optimised embedding (N, L, D1 + D2) is cut back into
  each encoder's part (SDXL's own textual inversion also learns one vector per encoder);
* :meth:`encode_ids` builds the condition exactly as the pipeline's ``encode_prompt`` does for the
  same ids (tests compare them): SD, the encoder's last hidden state; SDXL, both penultimate states
  side by side plus the second encoder's projected end-of-text state; SD3, both penultimate states
  side by side (zero-padded to the joint width), then the 256 zero rows of the absent T5, plus both
  projected end-of-text states. SD3 *with* T5 is refused: T5 reads its own tokens, which an attack on
  CLIP ids cannot drive. So is FLUX, whose token condition is T5's alone (CLIP enters only pooled).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from erase.diffusion.conditioning import Condition, PooledText
from erase.diffusion.text_encoding import encode_ids, replaced_token_embeddings
from erase.errors import EraseError


def token_access_refusal(kind: str, has_t5: bool = False) -> str | None:
    """Why token-level work (attacks, AdvUnlearn) cannot run on a ``kind`` model, or None when it can."""
    if kind == "sd3" and has_t5:
        return ("token-level work (attacks) on SD3 reads CLIP tokens only; this pipeline also has T5, whose own tokens "
                "an attack on CLIP ids cannot drive: load it with text_encoder_3=None (a folder whose "
                "model_index.json lists text_encoder_3 as null)")
    if kind == "flux":
        return ("token-level work (attacks) reads CLIP tokens; FLUX's token condition is T5's alone (CLIP enters only "
                "pooled), whose own tokens an attack on CLIP ids cannot drive: not supported for FLUX yet")
    if kind not in ("sd", "sdxl", "sd3"):
        return f"a {kind} model has no text encoder"
    return None


class TextStack:
    def __init__(self, kind: str, pipe):
        refusal = token_access_refusal(kind, getattr(pipe, "text_encoder_3", None) is not None)
        if refusal:
            raise EraseError(refusal)
        self.kind = kind
        self.tokenizer = pipe.tokenizer
        if kind == "sd":
            self.encoders = [pipe.text_encoder]
            self.pads = [None]
        else:  # SDXL, SD3 without T5
            self.encoders = [pipe.text_encoder, pipe.text_encoder_2]
            self.pads = [pipe.tokenizer.pad_token_id, pipe.tokenizer_2.pad_token_id]
            if kind == "sd3":
                self.joint_dim = pipe.transformer.config.joint_attention_dim
                self.t5_tokens = 256  # StableDiffusion3Pipeline's default max_sequence_length
        self.widths = [e.get_input_embeddings().weight.shape[1] for e in self.encoders]

    def with_encoders(self, encoders: list[nn.Module]) -> TextStack:
        """The same stack reading through ``encoders`` (trained copies, in this stack's order)."""
        other = copy.copy(self)
        other.encoders = self._pick(encoders)
        return other

    def token_table(self, encoders: nn.Module | list[nn.Module] | None = None) -> torch.Tensor:
        """(V, D1 + ...) the input token embeddings of every encoder (or of ``encoders``), side by side (frozen)."""
        return torch.cat([e.get_input_embeddings().weight.detach() for e in self._pick(encoders)], dim=-1)

    def _pick(self, encoders: nn.Module | list[nn.Module] | None) -> list[nn.Module]:
        if encoders is None:
            return self.encoders
        encoders = [encoders] if isinstance(encoders, nn.Module) else list(encoders)
        if len(encoders) != len(self.encoders):
            raise ValueError(f"{len(encoders)} text encoders for a {self.kind} model, which reads {len(self.encoders)}")
        return encoders

    def _ids_for(self, ids: torch.Tensor, k: int) -> torch.Tensor:
        """The ids encoder ``k`` reads: the same tokens, padded with its own tokenizer's pad id after end-of-text."""
        pad = self.pads[k]
        if pad is None or pad == self.pads[0]:
            return ids
        eos = ids == self.tokenizer.eos_token_id
        after = (eos.long().cumsum(1) - eos.long()) > 0
        return ids.masked_fill(after, pad)

    def encode_ids(self, ids: torch.Tensor, token_embeds: torch.Tensor | None = None,
                   encoders: nn.Module | list[nn.Module] | None = None) -> Condition:
        """The condition of token ids ``ids`` (N, L), optionally with the input token embeddings replaced by
        ``token_embeds`` (N, L, D1 + ...); keeps gradients outside ``torch.no_grad``. ``encoders``: trained copies
        (one module for SD, a list in the stack's order) to read through instead."""
        encoders = self._pick(encoders)
        if self.kind == "sd":
            return encode_ids(encoders[0], self.tokenizer, ids, token_embeds)
        parts = (token_embeds.split(self.widths, dim=-1) if token_embeds is not None else [None] * len(encoders))
        outs = []
        for k, (enc, emb) in enumerate(zip(encoders, parts)):
            device = next(enc.parameters()).device
            k_ids = self._ids_for(ids, k).to(device)
            if emb is None:
                outs.append(enc(k_ids, output_hidden_states=True))
            else:
                with replaced_token_embeddings(enc, emb.to(device)):
                    outs.append(enc(k_ids, output_hidden_states=True))
        tokens = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)
        if self.kind == "sdxl":
            return PooledText(tokens, outs[-1][0])  # the second encoder's projected end-of-text state
        tokens = nn.functional.pad(tokens, (0, self.joint_dim - tokens.shape[-1]))
        tokens = torch.cat([tokens, tokens.new_zeros(tokens.shape[0], self.t5_tokens, self.joint_dim)], dim=1)
        return PooledText(tokens, torch.cat([o[0] for o in outs], dim=-1))
