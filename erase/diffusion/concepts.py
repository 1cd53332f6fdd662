"""Concepts, their prompts, and the classes an evaluator knows them by.

For the bundled Fashion-MNIST models the concept is a class (``trouser``, or a synonym such as
``pants``), retain concepts default to the nine other classes, and the held-out paraphrases come
from ``erase.captions``. For any other Stable Diffusion model the concept is free text and the
retain concepts default to the Imagenette classes (as ESD/SalUn evaluate "garbage truck").
Several concepts can be erased in one run (``--concept trouser,sneaker,bag`` or ``--concept-file``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from erase import captions
from erase.captions import GENERIC_PARAPHRASES, GENERIC_TEMPLATES, IMAGENETTE_CLASSES
from erase.classifier.data import FASHION_MNIST_CLASSES
from erase.errors import EraseError


@dataclass
class ConceptSet:
    concepts: list[str]                # canonical names of the concepts to erase (one or many)
    retain: list[str]                  # canonical names of concepts to keep
    templates: list[str]               # "{c}"-templates for forget/retain training prompts
    eval_template: str                 # the prompt used for concept / other-class accuracy
    paraphrases: dict[str, list[str]] = field(default_factory=dict)  # concept -> held-out prompts naming it
    class_index: dict[str, int] = field(default_factory=dict)  # canonical name -> evaluator class

    @property
    def concept(self) -> str:
        """The erased concepts as one label ("trouser" or "trouser, sneaker, bag")."""
        return ", ".join(self.concepts)

    def prompt(self, name: str, template: str | None = None) -> str:
        return fill(template or self.eval_template, name)


def fill(template: str, name: str) -> str:
    if "{a}" in template:
        return captions.fill(template, name)
    return template.format(c=name)


def split_concepts(text: str) -> list[str]:
    """'trouser, sneaker,bag' -> ['trouser', 'sneaker', 'bag']; an empty entry is an error."""
    if not text or not text.strip():
        raise EraseError("--concept is empty: name the concept to erase, e.g. --concept trouser (or several: "
                         "--concept trouser,sneaker)")
    parts = [c.strip() for c in text.split(",")]
    if any(not c for c in parts):
        raise EraseError(f"--concept {text!r} has an empty entry; separate concepts with single commas")
    return parts


def read_concept_file(path: str) -> list[str]:
    """One concept per line; blank lines and '#' comments are skipped."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise EraseError(f"--concept-file {path}: no such file")
    names = [line.split("#", 1)[0].strip() for line in p.read_text().splitlines()]
    names = [n for n in names if n]
    if not names:
        raise EraseError(f"--concept-file {path} names no concept")
    return names


def _unique(canon: list[str], given: list[str]) -> list[str]:
    seen: dict[str, str] = {}
    for c, g in zip(canon, given):
        if c.lower() in seen:
            raise EraseError(f"--concept names {c!r} twice ({seen[c.lower()]!r} and {g!r})")
        seen[c.lower()] = g
    return canon


def fmnist_concepts(concepts: list[str], retain: list[str]) -> ConceptSet:
    def canonical(word: str) -> str:
        w = word.strip().lower()
        if w.isdigit() and int(w) < len(FASHION_MNIST_CLASSES):
            return FASHION_MNIST_CLASSES[int(w)]
        for name, synonyms in captions.CLASS_NAMES.items():
            if w == name or w in synonyms:
                return name
        raise EraseError(f"unknown Fashion-MNIST concept {word!r}; choose a class or synonym: "
                         + ", ".join(f"{n} ({'/'.join(s[1:])})" if s[1:] else n for n, s in captions.CLASS_NAMES.items()))

    cs = _unique([canonical(c) for c in concepts], concepts)
    keep = [canonical(r) for r in retain] if retain else [n for n in FASHION_MNIST_CLASSES if n not in cs]
    _check_retain(cs, keep)
    paraphrases = {c: [captions.fill(t, n) for t in captions.HELD_OUT_TEMPLATES for n in captions.CLASS_NAMES[c]]
                   for c in cs}
    return ConceptSet(cs, keep, list(captions.TRAIN_TEMPLATES), captions.CHECK_TEMPLATE, paraphrases,
                      {n: i for i, n in enumerate(FASHION_MNIST_CLASSES)})


def generic_concepts(concepts: list[str], retain: list[str], paraphrases: list[str]) -> ConceptSet:
    cs = _unique([c.strip() for c in concepts], concepts)
    lower = {c.lower() for c in cs}
    keep = [r.strip() for r in retain if r.strip()] or [n for n in IMAGENETTE_CLASSES if n.lower() not in lower]
    _check_retain(cs, keep)
    para = {c: [t.format(c=c) for t in GENERIC_PARAPHRASES] for c in cs}
    if paraphrases:
        para = {cs[0]: paraphrases}
    index = {n: i for i, n in enumerate(IMAGENETTE_CLASSES)} if all(c in IMAGENETTE_CLASSES for c in cs) else {}
    return ConceptSet(cs, keep, list(GENERIC_TEMPLATES), GENERIC_TEMPLATES[0], para, index)


def class_concepts(concepts: list[str], retain: list[str], names: list[str]) -> ConceptSet:
    """Concepts that are classes of a class-conditional model, named or by index."""
    lower = [n.lower() for n in names]

    def canonical(word: str) -> str:
        w = word.strip()
        if w.isdigit() and int(w) < len(names):
            return names[int(w)]
        if w.lower() in lower:
            return names[lower.index(w.lower())]
        raise EraseError(f"unknown class {word!r}; this model's classes: {', '.join(names)} (or their indices)")

    cs = _unique([canonical(c) for c in concepts], concepts)
    keep = [canonical(r) for r in retain] if retain else [n for n in names if n not in cs]
    _check_retain(cs, keep)
    return ConceptSet(cs, keep, ["{c}"], "{c}", {}, {n: i for i, n in enumerate(names)})


def _check_retain(concepts: list[str], keep: list[str]) -> None:
    both = [c for c in concepts if c.lower() in {k.lower() for k in keep}]
    if both:
        raise EraseError(f"--retain-concepts includes a concept being erased ({', '.join(both)})")
    if not keep:
        raise EraseError("no concept is left to retain: erase fewer concepts or name --retain-concepts")


def make_concepts(concepts: list[str], retain: str, paraphrases: str, fmnist: bool,
                  class_names: list[str] | None = None) -> ConceptSet:
    retain_list = [r for r in (retain or "").split(",") if r.strip()]
    para = [p.strip() for p in (paraphrases or "").split("|") if p.strip()]
    if para and len(concepts) > 1:
        raise EraseError("--paraphrases names held-out prompts of one concept; with several concepts erase leaves "
                         "them at the defaults (drop --paraphrases, or run one concept at a time)")
    if fmnist:
        cs = fmnist_concepts(concepts, retain_list)
        if class_names is not None:
            cs.templates, cs.eval_template, cs.paraphrases = ["{c}"], "{c}", {}
            return cs
        if para:
            cs.paraphrases = {cs.concepts[0]: para}
        return cs
    if class_names is not None:
        return class_concepts(concepts, retain_list, class_names)
    return generic_concepts(concepts, retain_list, para)
