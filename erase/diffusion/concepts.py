"""Concepts, their prompts, and the classes an evaluator knows them by.

For the bundled Fashion-MNIST models the concept is a class (``trouser``, or a synonym such as
``pants``), retain concepts default to the nine other classes, and the held-out paraphrases come
from ``erase.captions``. For any other Stable Diffusion model the concept is free text and the
retain concepts default to the Imagenette classes (as ESD/SalUn evaluate "garbage truck").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from erase import captions
from erase.captions import GENERIC_PARAPHRASES, GENERIC_TEMPLATES, IMAGENETTE_CLASSES
from erase.classifier.data import FASHION_MNIST_CLASSES
from erase.errors import EraseError


@dataclass
class ConceptSet:
    concept: str                       # canonical name of the concept to erase
    retain: list[str]                  # canonical names of concepts to keep
    templates: list[str]               # "{c}"-templates for forget/retain training prompts
    eval_template: str                 # the prompt used for concept / other-class accuracy
    paraphrases: list[str] = field(default_factory=list)   # held-out full prompts naming the concept
    class_index: dict[str, int] = field(default_factory=dict)  # canonical name -> evaluator class

    def prompt(self, name: str, template: str | None = None) -> str:
        return fill(template or self.eval_template, name)


def fill(template: str, name: str) -> str:
    if "{a}" in template:
        return captions.fill(template, name)
    return template.format(c=name)


def fmnist_concepts(concept: str, retain: list[str]) -> ConceptSet:
    def canonical(word: str) -> str:
        w = word.strip().lower()
        if w.isdigit() and int(w) < len(FASHION_MNIST_CLASSES):
            return FASHION_MNIST_CLASSES[int(w)]
        for name, synonyms in captions.CLASS_NAMES.items():
            if w == name or w in synonyms:
                return name
        raise EraseError(f"unknown Fashion-MNIST concept {word!r}; choose a class or synonym: "
                         + ", ".join(f"{n} ({'/'.join(s[1:])})" if s[1:] else n for n, s in captions.CLASS_NAMES.items()))

    c = canonical(concept)
    keep = [canonical(r) for r in retain] if retain else [n for n in FASHION_MNIST_CLASSES if n != c]
    if c in keep:
        raise EraseError(f"--retain-concepts includes the concept being erased ({c})")
    paraphrases = [captions.fill(t, n) for t in captions.HELD_OUT_TEMPLATES for n in captions.CLASS_NAMES[c]]
    return ConceptSet(c, keep, list(captions.TRAIN_TEMPLATES), captions.CHECK_TEMPLATE, paraphrases,
                      {n: i for i, n in enumerate(FASHION_MNIST_CLASSES)})


def generic_concepts(concept: str, retain: list[str], paraphrases: list[str]) -> ConceptSet:
    c = concept.strip()
    keep = [r.strip() for r in retain if r.strip()] or [n for n in IMAGENETTE_CLASSES if n.lower() != c.lower()]
    para = paraphrases or [t.format(c=c) for t in GENERIC_PARAPHRASES]
    index = {n: i for i, n in enumerate(IMAGENETTE_CLASSES)} if c in IMAGENETTE_CLASSES else {}
    return ConceptSet(c, keep, list(GENERIC_TEMPLATES), GENERIC_TEMPLATES[0], para, index)


def class_concepts(concept: str, retain: list[str], names: list[str]) -> ConceptSet:
    """Concepts that are classes of a class-conditional model, named or by index."""
    lower = [n.lower() for n in names]

    def canonical(word: str) -> str:
        w = word.strip()
        if w.isdigit() and int(w) < len(names):
            return names[int(w)]
        if w.lower() in lower:
            return names[lower.index(w.lower())]
        raise EraseError(f"unknown class {word!r}; this model's classes: {', '.join(names)} (or their indices)")

    c = canonical(concept)
    keep = [canonical(r) for r in retain] if retain else [n for n in names if n != c]
    if c in keep:
        raise EraseError(f"--retain-concepts includes the concept being erased ({c})")
    return ConceptSet(c, keep, ["{c}"], "{c}", [], {n: i for i, n in enumerate(names)})


def make_concepts(concept: str, retain: str, paraphrases: str, fmnist: bool,
                  class_names: list[str] | None = None) -> ConceptSet:
    if not concept or not concept.strip():
        raise EraseError("--concept is empty: name the concept to erase, e.g. --concept trouser")
    retain_list = [r for r in (retain or "").split(",") if r.strip()]
    para = [p.strip() for p in (paraphrases or "").split("|") if p.strip()]
    if fmnist:
        cs = fmnist_concepts(concept, retain_list)
        if class_names is not None:
            cs.templates, cs.eval_template, cs.paraphrases = ["{c}"], "{c}", []
            return cs
        if para:
            cs.paraphrases = para
        return cs
    if class_names is not None:
        return class_concepts(concept, retain_list, class_names)
    return generic_concepts(concept, retain_list, para)
