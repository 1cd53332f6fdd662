"""Prompt vocabulary: the bundled models' captions (Fashion-MNIST class names, synonyms, templates)
and the generic templates and Imagenette classes erase prompts any other Stable Diffusion model with.

Why the held-out set holds out *captions*, not *words*. The tiny SD's text encoder is trained
from scratch on these captions, so a word it never saw keeps its random initial embedding: the
base model could not draw trousers for an unseen "pants" either, and "does the erased model still
draw trousers for 'pants'?" would be vacuous. So every synonym (including "pants") is trained,
and robustness is measured on paraphrases the model never saw as a whole: the held-out templates
below, built only from words that occur in the training templates, filled with every name of a
class. An erasure method that only breaks the exact prompt "a photo of a trouser" keeps high
accuracy there; one that erases the concept does not.

Ten per cent of training captions are empty, so the model also learns the unconditional
prediction that classifier-free guidance needs.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

from erase.classifier.data import FASHION_MNIST_CLASSES

IMAGENETTE_CLASSES = ["tench", "English springer", "cassette player", "chain saw", "church", "French horn",
                      "garbage truck", "gas pump", "golf ball", "parachute"]
GENERIC_TEMPLATES = ["a photo of a {c}", "an image of a {c}", "a picture of a {c}", "a photo of the {c}"]
GENERIC_PARAPHRASES = ["a painting of a {c}", "a close-up photo of a {c}", "a {c} in the street"]

# Every name is a noun phrase for one class; the first is the canonical (check) name.
CLASS_NAMES: dict[str, list[str]] = {
    "t-shirt": ["t-shirt", "tee", "top", "t-shirt top"],
    "trouser": ["trouser", "trousers", "pants", "jeans"],
    "pullover": ["pullover", "sweater", "jumper"],
    "dress": ["dress", "gown"],
    "coat": ["coat", "jacket"],
    "sandal": ["sandal", "sandals"],
    "shirt": ["shirt", "blouse", "button-up shirt"],
    "sneaker": ["sneaker", "sneakers", "trainers"],
    "bag": ["bag", "handbag", "purse"],
    "ankle boot": ["ankle boot", "boot", "boots"],
}
PLURAL = {"trousers", "pants", "jeans", "sandals", "sneakers", "trainers", "boots"}

# "{a}" becomes "a ", "an " or "" (plurals), so captions stay grammatical.
TRAIN_TEMPLATES = [
    "a photo of {a}{c}",
    "an image of {a}{c}",
    "a picture of {a}{c}",
    "{a}{c}",
    "{c}",
    "a photo of the {c}",
    "a black and white photo of {a}{c}",
    "a small photo of {a}{c}",
    "the {c}",
    "an image of the {c}",
]
# Only words of TRAIN_TEMPLATES, in combinations never trained (see the module docstring).
HELD_OUT_TEMPLATES = [
    "a picture of the {c}",
    "a black and white image of the {c}",
    "a small picture of {a}{c}",
]
CHECK_TEMPLATE = "a photo of {a}{c}"  # the prompt of `python -m erase.zoo check`
EMPTY_CAPTION_RATE = 0.1


def _article(name: str) -> str:
    if name in PLURAL:
        return ""
    return "an " if name[0] in "aeiou" else "a "


def fill(template: str, name: str) -> str:
    return template.format(a=_article(name), c=name)


def class_prompt(label: int, template: str = CHECK_TEMPLATE) -> str:
    """The canonical prompt of a class, e.g. ``class_prompt(1) == "a photo of a trouser"``."""
    return fill(template, FASHION_MNIST_CLASSES[label])


def training_captions(label: int) -> list[str]:
    return [fill(t, n) for n in CLASS_NAMES[FASHION_MNIST_CLASSES[label]] for t in TRAIN_TEMPLATES]


def held_out_captions(label: int) -> list[str]:
    """Paraphrases never used in training (every name x every held-out template)."""
    trained = set(training_captions(label))
    out = [fill(t, n) for n in CLASS_NAMES[FASHION_MNIST_CLASSES[label]] for t in HELD_OUT_TEMPLATES]
    return [c for c in out if c not in trained]


def all_training_captions() -> list[str]:
    """Every distinct training caption, the empty one first (so it can be pre-tokenized once)."""
    return [""] + [c for label in range(len(FASHION_MNIST_CLASSES)) for c in training_captions(label)]


def sample_caption_ids(labels, rng: random.Random, empty_rate: float = EMPTY_CAPTION_RATE) -> list[int]:
    """For each label, an index into :func:`all_training_captions` (0 = empty caption).

    A class's names are equally likely and so are its templates, so "pants" is as common as
    "trouser"; the canonical check prompt is one caption among ~40 per class, not a privileged one.
    """
    offsets, k = [], 1
    for label in range(len(FASHION_MNIST_CLASSES)):
        offsets.append(k)
        k += len(training_captions(label))
    ids = []
    for label in labels:
        label = int(label)
        if rng.random() < empty_rate:
            ids.append(0)
            continue
        names = CLASS_NAMES[FASHION_MNIST_CLASSES[label]]
        n, t = rng.randrange(len(names)), rng.randrange(len(TRAIN_TEMPLATES))
        ids.append(offsets[label] + n * len(TRAIN_TEMPLATES) + t)
    return ids


def write_prompt_files(directory: str = "prompts", seed: int = 0) -> list[str]:
    """Write ``fmnist_classes.csv`` (the check prompts) and ``fmnist_heldout.csv`` (paraphrases).

    Columns: ``label,class,prompt,seed``; the seed is the first of the 64 seeds the check uses.
    """
    Path(directory).mkdir(parents=True, exist_ok=True)
    files = []
    for name, rows in (
        ("fmnist_classes.csv", [(i, c, class_prompt(i), seed + i) for i, c in enumerate(FASHION_MNIST_CLASSES)]),
        ("fmnist_heldout.csv", [(i, c, p, seed + i) for i, c in enumerate(FASHION_MNIST_CLASSES)
                                for p in held_out_captions(i)]),
    ):
        path = Path(directory) / name
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["label", "class", "prompt", "seed"])
            w.writerows(rows)
        files.append(str(path))
    return files


if __name__ == "__main__":
    print("\n".join(write_prompt_files()))
