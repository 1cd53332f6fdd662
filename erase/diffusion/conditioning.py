"""SDXL's text condition: the token embeddings cross-attention reads plus the pooled embedding, as one value.

Methods pass a condition around without looking inside it (``task.condition``, ``null_condition``,
``concept_condition`` -> ``task.predict(model, x_t, t, cond)`` / ``partial_sample_under``), and the
task indexes, moves, expands and concatenates it. For SD 1.x/2.x that value is a tensor (N, L, D);
for SDXL it is a :class:`PooledText`, which supports exactly those operations, so the methods stay
unchanged. How SDXL's ``encode_prompt`` builds the two parts (diffusers,
``pipeline_stable_diffusion_xl.py``):

* ``embeds`` (N, 77, D1 + D2): the penultimate hidden states of ``text_encoder`` and ``text_encoder_2``,
  concatenated on the feature axis — what every ``attn2.to_k`` / ``to_v`` reads (so UCE / RECE edit
  with these rows);
* ``pooled`` (N, P): ``text_encoder_2``'s projected end-of-text state, which enters the UNet through
  ``added_cond_kwargs["text_embeds"]`` together with the size/crop time ids (:func:`time_ids`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PooledText:
    embeds: torch.Tensor  # (N, L, D) token embeddings for cross-attention
    pooled: torch.Tensor  # (N, P) pooled text embedding for the added conditioning

    def __post_init__(self):
        if self.embeds.shape[0] != self.pooled.shape[0]:
            raise ValueError(f"{self.embeds.shape[0]} token embeddings but {self.pooled.shape[0]} pooled embeddings")

    def __getitem__(self, idx) -> PooledText:
        embeds = self.embeds[idx]
        if embeds.dim() == 2:  # one row taken: keep the batch axis, as a condition always has one
            return PooledText(embeds[None], self.pooled[idx][None])
        return PooledText(embeds, self.pooled[idx])

    def __len__(self) -> int:
        return self.embeds.shape[0]

    @property
    def shape(self) -> torch.Size:
        return self.embeds.shape

    @property
    def device(self) -> torch.device:
        return self.embeds.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embeds.dtype

    def to(self, *args, **kwargs) -> PooledText:
        return PooledText(self.embeds.to(*args, **kwargs), self.pooled.to(*args, **kwargs))

    def expand(self, n: int, *_) -> PooledText:
        """``n`` copies of a one-row condition (``tensor.expand(n, -1, -1)``'s meaning)."""
        return PooledText(self.embeds.expand(n, -1, -1), self.pooled.expand(n, -1))

    def detach(self) -> PooledText:
        return PooledText(self.embeds.detach(), self.pooled.detach())

    def zeros_like(self) -> PooledText:
        return PooledText(torch.zeros_like(self.embeds), torch.zeros_like(self.pooled))


Condition = torch.Tensor | PooledText


def cat_conditions(conds: list[Condition]) -> Condition:
    """``torch.cat`` along the batch axis, for tensors and for :class:`PooledText` alike."""
    if isinstance(conds[0], PooledText):
        return PooledText(torch.cat([c.embeds for c in conds]), torch.cat([c.pooled for c in conds]))
    return torch.cat(conds)


def token_embeddings(cond: Condition) -> torch.Tensor:
    """The (N, L, D) rows the text cross-attention's keys and values read."""
    return cond.embeds if isinstance(cond, PooledText) else cond


def time_ids(resolution: int, n: int, device, dtype) -> torch.Tensor:
    """SDXL's micro-conditioning for ``n`` square images: (original h, w, crop top, left, target h, w), as the
    pipeline's ``_get_add_time_ids`` builds it for its defaults (original = target = the image size, no crop)."""
    row = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], device=device, dtype=dtype)
    return row.expand(n, -1)
