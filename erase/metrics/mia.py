"""MIA-efficacy: the share of the forget set a membership-inference attack calls "non-member".

Exactly as the SalUn / sparse-unlearning evaluation (DESIGN.md §4): the feature is the softmax
probability of the true label; an RBF SVC (C=3, gamma="auto") is fitted on retain examples
(members, label 1) against an equal number of test examples (non-members, label 0), then applied
to the forget set. MIA-efficacy = 100 x share of forget examples predicted non-member; higher
means the forget set looks less like training data.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.svm import SVC
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

MIA_SETTINGS = {"feature": "softmax probability of the true label", "classifier": "SVC(kernel='rbf', C=3, gamma='auto')",
                "members": "retain subset (random, seeded) of the test-set size", "non_members": "test set",
                "value": "100 x share of forget examples predicted non-member"}


def true_label_confidence(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return probs.gather(1, labels.view(-1, 1)).squeeze(1)


class MIAEfficacy(Metric):
    """update(probs, labels, split) with split in {"member", "non_member", "target"}."""

    full_state_update = False
    higher_is_better = True
    _SPLITS = ("member", "non_member", "target")

    def __init__(self, seed: int = 0, C: float = 3.0, **kwargs):
        super().__init__(**kwargs)
        self.seed, self.C = seed, C
        for s in self._SPLITS:
            self.add_state(s, default=[], dist_reduce_fx="cat")

    def update(self, probs: torch.Tensor, labels: torch.Tensor, split: str) -> None:
        if split not in self._SPLITS:
            raise ValueError(f"split must be one of {self._SPLITS}")
        getattr(self, split).append(true_label_confidence(probs.float(), labels).detach())

    def compute(self) -> torch.Tensor:
        member, non_member, target = (dim_zero_cat(getattr(self, s)).cpu().numpy() for s in self._SPLITS)
        return torch.tensor(mia_efficacy(member, non_member, target, self.seed, self.C))


def mia_efficacy(member: np.ndarray, non_member: np.ndarray, target: np.ndarray, seed: int = 0, C: float = 3.0) -> float:
    """Fit the attack on balanced member/non-member confidences and score the target set."""
    if len(member) == 0 or len(non_member) == 0 or len(target) == 0:
        raise ValueError("MIA-efficacy needs non-empty member, non-member and target sets")
    n = min(len(member), len(non_member))
    rng = np.random.default_rng(seed)
    member = member[rng.permutation(len(member))[:n]]
    non_member = non_member[rng.permutation(len(non_member))[:n]]
    x = np.concatenate([member, non_member]).reshape(-1, 1)
    y = np.concatenate([np.ones(n), np.zeros(n)])
    clf = SVC(C=C, gamma="auto", kernel="rbf").fit(x, y)
    predicted_member = clf.predict(np.asarray(target).reshape(-1, 1))
    return float(100.0 * (1.0 - predicted_member.mean()))
