"""Ring-A-Bell's concept vector: the mean text-encoder difference of prompts with and without the concept.

    c = mean_i [ TE(p_i+) - TE(p_i-) ]

over the full token-wise ``last_hidden_state`` (L x D: 77 x 768 for SD 1.x), not a pooled vector
(the official ``Get_Concept_Vector.ipynb``; its nudity pairs are 50 hand-written prompts with and
without nudity, ``Nudity_prompt.csv`` / ``NoNudity_prompt.csv``).

Pairs come from a CSV (columns ``with_concept,without_concept``; e.g. the official nudity pairs
merged into one file), or are built from prompt templates: each template filled with the concept
against the *same* template filled with another concept, so the difference isolates the concept's
words and the template cancels.

- A concept the bundled Fashion-MNIST models know (a class or any of its synonyms in
  ``erase.captions.CLASS_NAMES``): every training template x every name of the class, against the
  same template x each other class's canonical name (``a photo of pants`` - ``a photo of a dress``).
  These are the captions the bundled text encoder was trained on, so both sides are in-distribution.
- Any other concept: ``erase.captions.GENERIC_TEMPLATES`` x the concept against the same templates
  x each Imagenette class (the other objects erase evaluates on). For abstract concepts (nudity,
  a style) give a pair CSV instead: "a photo of a church" is a poor "without" for "nudity".
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import torch

from erase import captions
from erase.errors import EraseError

PAIR_COLUMNS = ("with_concept", "without_concept")


def class_of_name(concept: str) -> str | None:
    """The bundled Fashion-MNIST class that ``concept`` names (canonically or by a synonym), else None."""
    key = concept.strip().lower()
    return next((c for c, names in captions.CLASS_NAMES.items() if key in (n.lower() for n in names)), None)


def concept_words(concept: str) -> list[str]:
    """Every name of ``concept``: all names of its bundled class, or the concept itself."""
    cls = class_of_name(concept)
    return list(captions.CLASS_NAMES[cls]) if cls else [concept.strip()]


def template_pairs(concept: str) -> list[tuple[str, str]]:
    """(with, without) prompt pairs built from templates (see the module docstring)."""
    cls = class_of_name(concept)
    if cls:
        names, templates = captions.CLASS_NAMES[cls], captions.TRAIN_TEMPLATES
        others = [c for c in captions.CLASS_NAMES if c != cls]
    else:
        names, templates = [concept.strip()], captions.GENERIC_TEMPLATES
        others = [c for c in captions.IMAGENETTE_CLASSES if c.lower() != concept.strip().lower()]
    return [(captions.fill(t, n), captions.fill(t, o)) for t in templates for n in names for o in others]


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """(with, without) pairs from a CSV with columns ``with_concept,without_concept``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise EraseError(f"--pairs {path}: no such file")
    with open(p, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = {(n or "").strip().lower(): n for n in reader.fieldnames or []}
        if not all(c in header for c in PAIR_COLUMNS):
            raise EraseError(f"--pairs {path}: expected columns {', '.join(PAIR_COLUMNS)}, got "
                             f"{', '.join(reader.fieldnames or []) or 'none'}")
        pairs = [((r[header["with_concept"]] or "").strip(), (r[header["without_concept"]] or "").strip())
                 for r in reader]
    if not pairs:
        raise EraseError(f"--pairs {path} holds no pairs")
    for i, (pos, neg) in enumerate(pairs):
        if not pos or not neg:
            raise EraseError(f"--pairs {path}, line {i + 2}: both prompts of a pair must be given")
    return pairs


@torch.no_grad()
def concept_vector(encode: Callable[[list[str]], torch.Tensor], pairs: list[tuple[str, str]],
                   batch_size: int = 64) -> torch.Tensor:
    """c = mean_i [encode(p_i+) - encode(p_i-)] in float32; ``encode`` maps prompts to (N, ...) tensors."""
    if not pairs:
        raise ValueError("a concept vector needs at least one prompt pair")
    total = None
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        diff = encode([p for p, _ in chunk]).float() - encode([n for _, n in chunk]).float()
        total = diff.sum(0) if total is None else total + diff.sum(0)
    return total / len(pairs)
