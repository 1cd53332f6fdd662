"""Top-1 accuracy in percent as a torchmetrics ``Metric`` (DDP-safe sum states)."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class TopOneAccuracy(Metric):
    """update(scores (N, C) logits or probabilities, labels (N,)); compute() -> accuracy x 100.

    ``forget=True`` turns it into unlearning accuracy: UA = 100 - accuracy.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, forget: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.forget = forget
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        self.correct += (scores.argmax(dim=1) == labels).sum()
        self.total += labels.numel()

    def compute(self) -> torch.Tensor:
        acc = 100.0 * self.correct.float() / self.total.clamp(min=1)
        return 100.0 - acc if self.forget else acc
