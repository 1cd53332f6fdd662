"""Prompts with learnable slots: token ids framed as the text encoder reads them, and the embeddings that fill them.

Gradient attacks optimise some input token embeddings of a prompt and keep the others: UnlearnDiffAtk's
k prefix tokens after the start token, P4D-N's N tokens that replace the prompt, P4D-K's token after
every k prompt tokens, concept inversion's one new word. A :class:`Slotted` prompt is the ids of the
whole frame ``[start, tokens..., end, padding...]`` with the positions of the slots; the slots hold a
carrier id (any ordinary token: its embedding is replaced, so it never reaches the encoder) and
:func:`embeds` puts the optimised vectors there, through the task's ``encode_ids(ids, token_embeds)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SLOT = object()  # marks a learnable token in the parts given to frame()


@dataclass
class Slotted:
    ids: torch.Tensor    # (L,) the frame, slots holding ``carrier``
    slots: torch.Tensor  # (m,) positions of the learnable tokens, in order

    def with_ids(self, slot_ids: torch.Tensor) -> torch.Tensor:
        """(L,) the frame with real token ids in the slots (to decode the prompt a projection found)."""
        ids = self.ids.clone()
        ids[self.slots] = slot_ids.to(ids.dtype).cpu()
        return ids


def words(tokenizer, text: str) -> list[int]:
    """The tokens of ``text`` without start/end."""
    return list(tokenizer(text, add_special_tokens=False).input_ids) if text.strip() else []


def frame(tokenizer, parts: list, carrier: int | None = None) -> Slotted:
    """``parts``: texts, token-id lists and :data:`SLOT` markers, in order. Prompt tokens past the encoder's
    length are dropped from the end (as ``encode_prompt`` truncates); slots are always kept."""
    carrier = tokenizer.eos_token_id if carrier is None else carrier
    length = tokenizer.model_max_length
    pieces = [p if p is SLOT else (list(p) if not isinstance(p, str) else words(tokenizer, p)) for p in parts]
    n_slots = sum(p is SLOT for p in pieces)
    room = length - 2 - n_slots
    if room < 0:
        raise ValueError(f"{n_slots} learnable tokens do not fit in {length} tokens with start and end")
    ids, slots = [tokenizer.bos_token_id], []
    for p in pieces:
        if p is SLOT:
            slots.append(len(ids))
            ids.append(carrier)
        else:
            take = p[:room]
            room -= len(take)
            ids.extend(take)
    ids.append(tokenizer.eos_token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids += [pad] * (length - len(ids))
    return Slotted(torch.tensor(ids, dtype=torch.long), torch.tensor(slots, dtype=torch.long))


def embeds(table: torch.Tensor, prompt: Slotted, values: torch.Tensor) -> torch.Tensor:
    """(1, L, D_tok): the frame's token embeddings from ``table`` (V, D_tok), ``values`` (m, D_tok) in the slots."""
    out = table[prompt.ids.to(table.device)].clone()
    out[prompt.slots.to(table.device)] = values.to(out.dtype)
    return out[None]


def decode(tokenizer, ids: torch.Tensor) -> str:
    """The text of a frame's ids (special tokens dropped), as a replayable prompt."""
    return tokenizer.decode(ids.tolist(), skip_special_tokens=True).strip()


def nearest_tokens(values: torch.Tensor, table: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """For each row of ``values``, the allowed token whose embedding is nearest by cosine (P4D's ``nn_project``)."""
    candidates = torch.nn.functional.normalize(table[allowed.to(table.device)].float(), dim=-1)
    scores = torch.nn.functional.normalize(values.float(), dim=-1) @ candidates.T
    return allowed.to(table.device)[scores.argmax(-1)]
