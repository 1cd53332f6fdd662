"""Store cross-attention probabilities through diffusers attention processors.

``AttentionStore`` installs a :class:`StoringAttnProcessor` on every cross-attention layer
(``attn2``) of a UNet — the way diffusers' attend-and-excite pipeline observes attention, not a
monkeypatched forward. The processor is diffusers' own ``AttnProcessor``; while the store is
recording, it captures what ``Attention.get_attention_scores`` returns (the softmax maps of shape
(batch·heads, queries, tokens)). ``remove()`` puts the original processors back.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import AttnProcessor

from erase.errors import EraseError


class AttentionStore:
    def __init__(self):
        self.maps: dict[str, torch.Tensor] = {}
        self.recording = False
        self._original = None
        self._unet = None

    def install(self, unet) -> AttentionStore:
        self._unet = unet
        self._original = dict(unet.attn_processors)
        procs = {name: (StoringAttnProcessor(self, name) if ".attn2." in name else proc)
                 for name, proc in self._original.items()}
        if not any(".attn2." in n for n in procs):
            raise EraseError("this UNet has no cross-attention layers (attn2) to observe")
        unet.set_attn_processor(procs)
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


def token_positions(tokenizer, prompt: str, concept: str) -> list[int]:
    """Positions (in the 77-token sequence, BOS at 0) of the concept's tokens inside ``prompt``."""
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    sub = tokenizer(concept, add_special_tokens=False).input_ids
    for i in range(1, len(ids) - len(sub) + 1):
        if ids[i:i + len(sub)] == sub:
            return list(range(i, i + len(sub)))
    return []
