"""Which token ids a discrete prompt search may use, and whether a prompt text avoids the concept's words.

The issue's sanity check needs adversarial prompts that do not name the concept. Banning the
concept's own tokens is not enough: a search over ids can spell a word from pieces ("trous" +
"er" is how CLIP tokenises "trouser"), and a decoded prompt is re-tokenised when it is replayed
as text. So one rule serves both the search space and the final check:

- a token is *banned* if it is one of the tokens of a banned word (every piece of "t-shirt":
  "t", "-", "shirt"), or its text contains a banned word of three or more letters ("trousers",
  "pants", "bootcamp" for "boot") — over-banning ("steel" for "tee") costs nothing: t-shirt, the
  widest bundled class, bans 122 of CLIP's 49,408 tokens;
- a prompt text is *clean* if re-tokenising it yields no banned token. The search scores an
  unclean candidate as infeasible, so the prompt it returns is clean by construction.

Special tokens (start/end of text, padding) are never offered to the search: the prompt's frame
(start, K free tokens, end, padding) is fixed.
"""

from __future__ import annotations

import re

import torch

_END_OF_WORD = "</w>"


def _piece(token: str) -> str:
    return token[: -len(_END_OF_WORD)] if token.endswith(_END_OF_WORD) else token


def banned_ids(tokenizer, words: list[str]) -> set[int]:
    """Token ids a prompt avoiding ``words`` must not contain (see the module docstring)."""
    words = [w.strip().lower() for w in words if w.strip()]
    ids: set[int] = set()
    for w in words:
        ids.update(tokenizer(w, add_special_tokens=False).input_ids)
    stems = {part for w in words for part in re.split(r"[^0-9a-z]+", w) if len(part) >= 3}
    if stems:
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        ids.update(i for i, tok in enumerate(vocab) if tok and any(s in _piece(tok).lower() for s in stems))
    return ids - set(tokenizer.all_special_ids)


def allowed_ids(tokenizer, banned: set[int] = frozenset()) -> torch.Tensor:
    """Every ordinary token id not in ``banned`` (a sorted LongTensor)."""
    skip = set(tokenizer.all_special_ids) | set(banned)
    return torch.tensor([i for i in range(len(tokenizer)) if i not in skip], dtype=torch.long)


def clean(tokenizer, texts: list[str], banned: set[int]) -> list[bool]:
    """For each text: True when its re-tokenisation holds no banned token."""
    if not banned:
        return [True] * len(texts)
    ids = tokenizer(texts, add_special_tokens=False).input_ids
    return [not (set(row) & banned) for row in ids]
