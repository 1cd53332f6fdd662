"""Store text-token attention probabilities through diffusers attention processors.

``AttentionStore`` installs a recording processor on every attention processor where the model's
layer map (``erase.diffusion.layers``) records text-token attention, the way diffusers'
attend-and-excite pipeline observes attention, not a monkeypatched forward. Every stored map has the
shape (batch·heads, image queries, text tokens):

* SD / SDXL cross-attention (``attn2``): :class:`StoringAttnProcessor`, diffusers' own ``AttnProcessor``
  while it captures what ``Attention.get_attention_scores`` returns;
* SD3 joint attention (``transformer_blocks.*.attn``): :class:`StoringJointAttnProcessor`, the joint
  attention written out (:mod:`erase.diffusion.joint_attention`); stored is the block of the softmax
  where image-token queries meet text-token keys (its rows do not sum to one: the image tokens share
  each query's attention with the text).

``remove()`` puts the original processors back.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import AttnProcessor

from erase.diffusion.joint_attention import joint_attention
from erase.diffusion.layers import denoiser_of, layer_map
from erase.errors import EraseError


class AttentionStore:
    def __init__(self):
        self.maps: dict[str, torch.Tensor] = {}
        self.recording = False
        self._original = None
        self._unet = None

    def install(self, model) -> AttentionStore:
        """Record on ``model``'s denoiser (a UNet, or one inside a wrapper) at the points its layer map names."""
        unet = denoiser_of(model)
        lmap = layer_map(unet)
        problem = lmap.recording_problem()
        if problem:
            raise EraseError(f"{problem} ({type(unet).__name__})")
        points = set(lmap.attention_processor_names(unet))
        if not points:
            raise EraseError(f"this {type(unet).__name__} has no text cross-attention layers to observe")
        recorder = StoringJointAttnProcessor if lmap.family == "sd3-mmdit" else StoringAttnProcessor
        self._unet = unet
        self._original = dict(unet.attn_processors)
        unet.set_attn_processor({name: (recorder(self, name) if name in points else proc)
                                 for name, proc in self._original.items()})
        return self

    def remove(self) -> None:
        if self._unet is not None and self._original is not None:
            self._unet.set_attn_processor(self._original)
        self._unet = self._original = None

    def reset(self) -> None:
        self.maps = {}


class StoringAttnProcessor(AttnProcessor):
    def __init__(self, store: AttentionStore, name: str):
        super().__init__()
        self.store, self.name = store, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        if not self.store.recording or encoder_hidden_states is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        scores = attn.get_attention_scores

        def capture(query, key, attention_mask=None):
            probs = scores(query, key, attention_mask)
            self.store.maps[self.name] = probs
            return probs

        attn.get_attention_scores = capture
        try:
            return super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        finally:
            del attn.get_attention_scores  # the class method shows through again


class StoringJointAttnProcessor:
    """SD3 joint attention that, while the store records, keeps the image-query x text-key probabilities."""

    def __init__(self, store: AttentionStore, name: str):
        self.store, self.name = store, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        n_image = hidden_states.shape[1]

        def keep(probs: torch.Tensor) -> None:
            part = probs[:, :, :n_image, n_image:]
            self.store.maps[self.name] = part.reshape(-1, *part.shape[2:])

        return joint_attention(attn, hidden_states, encoder_hidden_states,
                               on_probs=keep if self.store.recording else None)


def token_positions(tokenizer, prompt: str, concept: str, length: int | None = None) -> list[int]:
    """Positions (in the padded sequence of ``length`` tokens, default the tokenizer's maximum; CLIP's BOS at 0)
    of the concept's tokens inside ``prompt``."""
    ids = tokenizer(prompt, padding="max_length", max_length=length or tokenizer.model_max_length, truncation=True).input_ids
    sub = tokenizer(concept, add_special_tokens=False).input_ids
    for i in range(len(ids) - len(sub) + 1):
        if ids[i:i + len(sub)] == sub:
            return list(range(i, i + len(sub)))
    return []
