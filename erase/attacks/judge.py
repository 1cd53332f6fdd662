"""The judge of attack success: the run's evaluator classifier, asked "does this image show the concept?".

An image shows the concept when the evaluator's top-1 class is the concept (UnlearnDiffAtk judges
objects the same way with a ResNet-50's top-1). A concept may be named by a synonym the bundled
models know (``pants`` is the class ``trouser``, from ``erase.captions.CLASS_NAMES``).
"""

from __future__ import annotations

import torch

from erase.attacks.base import Judge
from erase.captions import CLASS_NAMES
from erase.classifier.models import classify
from erase.errors import EraseError


def class_of(concept: str, class_names: list[str]) -> int:
    """The evaluator's class index for ``concept`` (its name or a bundled synonym)."""
    names = [n.lower() for n in class_names]
    key = concept.strip().lower()
    if key not in names:
        key = next((c for c, syn in CLASS_NAMES.items() if key in (s.lower() for s in syn)), key)
    if key not in names:
        raise EraseError(f"the evaluator cannot judge concept {concept!r}: its classes are {', '.join(class_names)}")
    return names.index(key)


def evaluator_judge(evaluator) -> Judge:
    """A judge from an erase classifier (``erase.classifier.models.load_classifier``), put in eval mode
    (batch-norm statistics of the batch being judged would make a verdict depend on its neighbours)."""
    evaluator.eval()
    class_names = list(evaluator.config.class_names)

    def judge(images: torch.Tensor, concept: str) -> torch.Tensor:
        return classify(evaluator, images) == class_of(concept, class_names)

    return judge
