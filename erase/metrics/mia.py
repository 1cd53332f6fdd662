"""MIA-efficacy: the share of the forget set a membership-inference attack calls "non-member".

The attack is the SalUn / sparse-unlearning one (DESIGN.md §4): the feature is the softmax
probability of the true label; an RBF SVC (C=3, gamma="auto") is fitted on members (label 1)
against as many non-members (label 0), then applied to the forget set. MIA-efficacy = 100 x share
of forget examples predicted non-member; higher means the forget set looks less like training data.

Which examples fit the attack is fixed by one rule, because a single balanced subsample is noisy:
on the benchmark's retrain model (3,600 retain, 1,500 test, 400 forget images) one fit on a random
1,500 of the retain images gave 14.8-23.0 over 20 member subsets (sd 2.6), enough to flip a
learning-rate choice. The rule:

- members: **every** retain example (not the subsample RA may be estimated on); non-members: every
  test example;
- ``draws`` = k fits (default :data:`MIA_DRAWS` = 10): each draw samples the larger of the two sets
  without replacement down to the size of the smaller one, which is used whole, fits the SVC on
  those balanced pairs and scores the forget set; draws come from ``numpy.random.default_rng(seed)``,
  so a seed gives the same value everywhere;
- the value is the mean over the k draws; its standard error is the sample standard deviation
  (ddof 1) of the draw values / sqrt(k): how far the value moves with another resampling seed. It
  does not include the noise of the forget set's or the model's own draw (seeds measure that).

With k = 10 the same model's value moved by sd 0.9 over resampling seeds instead of 2.6. When both
sets have the same size every draw is the same fit, so it runs once and the standard error is 0.
Cost: one fit on 1,500 + 1,500 points takes 0.1-0.2 s of one CPU core, 1-2 s for the k = 10 draws.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.svm import SVC
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

MIA_DRAWS = 10
MIA_SETTINGS = {"feature": "softmax probability of the true label", "classifier": "SVC(kernel='rbf', C=3, gamma='auto')",
                "members": "every retain example", "non_members": "every test example",
                "resampling": "per draw, the larger of members / non-members sampled without replacement to the size of "
                              "the smaller one (used whole); seeded numpy default_rng",
                "draws": MIA_DRAWS,
                "value": "mean over the draws of 100 x share of forget examples predicted non-member",
                "standard_error": "std (ddof 1) of the draw values / sqrt(draws)"}


def true_label_confidence(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return probs.gather(1, labels.view(-1, 1)).squeeze(1)


class MIAEfficacy(Metric):
    """update(probs, labels, split) with split in {"member", "non_member", "target"}.

    ``compute()`` is the mean over the draws; ``compute_with_error()`` gives (mean, standard error).
    """

    full_state_update = False
    higher_is_better = True
    _SPLITS = ("member", "non_member", "target")

    def __init__(self, seed: int = 0, draws: int = MIA_DRAWS, C: float = 3.0, **kwargs):
        super().__init__(**kwargs)
        if draws < 1:
            raise ValueError(f"draws must be >= 1, got {draws}")
        self.seed, self.draws, self.C = seed, draws, C
        for s in self._SPLITS:
            self.add_state(s, default=[], dist_reduce_fx="cat")

    @property
    def settings(self) -> dict:
        return {**MIA_SETTINGS, "draws": self.draws}

    def update(self, probs: torch.Tensor, labels: torch.Tensor, split: str) -> None:
        if split not in self._SPLITS:
            raise ValueError(f"split must be one of {self._SPLITS}")
        getattr(self, split).append(true_label_confidence(probs.float(), labels).detach())

    def _draw_values(self) -> np.ndarray:
        member, non_member, target = (dim_zero_cat(getattr(self, s)).cpu().numpy() for s in self._SPLITS)
        return mia_draw_values(member, non_member, target, self.seed, self.draws, self.C)

    def compute(self) -> torch.Tensor:
        return torch.tensor(float(self._draw_values().mean()))

    def compute_with_error(self) -> tuple[torch.Tensor, torch.Tensor]:
        # the same state synchronisation as torchmetrics' wrapped compute()
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync,
                               should_unsync=self._should_unsync):
            values = self._draw_values()
        mean, se = mean_and_standard_error(values)
        return torch.tensor(mean), torch.tensor(se)


def mia_draw_values(member: np.ndarray, non_member: np.ndarray, target: np.ndarray, seed: int = 0,
                    draws: int = MIA_DRAWS, C: float = 3.0) -> np.ndarray:
    """MIA-efficacy of each of the ``draws`` balanced fits (the module docstring's rule)."""
    member, non_member, target = (np.asarray(a, dtype=np.float64).ravel() for a in (member, non_member, target))
    if len(member) == 0 or len(non_member) == 0 or len(target) == 0:
        raise ValueError("MIA-efficacy needs non-empty member, non-member and target sets")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    n = min(len(member), len(non_member))
    y = np.concatenate([np.ones(n), np.zeros(n)])

    def fit_and_score(m: np.ndarray, nm: np.ndarray) -> float:
        clf = SVC(C=C, gamma="auto", kernel="rbf").fit(np.concatenate([m, nm]).reshape(-1, 1), y)
        return 100.0 * (1.0 - clf.predict(target.reshape(-1, 1)).mean())

    if len(member) == len(non_member):  # nothing to resample: every draw is this one fit
        return np.full(draws, fit_and_score(member, non_member))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(draws):
        m = member if len(member) == n else member[rng.choice(len(member), n, replace=False)]
        nm = non_member if len(non_member) == n else non_member[rng.choice(len(non_member), n, replace=False)]
        values.append(fit_and_score(m, nm))
    return np.array(values)


def mean_and_standard_error(values: np.ndarray) -> tuple[float, float]:
    """Mean of the draw values and its standard error (ddof-1 std / sqrt(k); NaN for one draw)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()), math.nan
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values)))


def mia_efficacy(member: np.ndarray, non_member: np.ndarray, target: np.ndarray, seed: int = 0, C: float = 3.0,
                 draws: int = MIA_DRAWS) -> float:
    """MIA-efficacy: the mean over ``draws`` balanced fits of the attack (``draws=1``: one subsample)."""
    return float(mia_draw_values(member, non_member, target, seed, draws, C).mean())
