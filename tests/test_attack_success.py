"""Attack success accounting on hand-made judge verdicts, and the evaluator judge."""

from __future__ import annotations

import pytest
import torch

from erase.attacks.judge import class_of, evaluator_judge
from erase.attacks.success import Outcome, outcome, rates, share, summarize, union
from erase.classifier.data import FASHION_MNIST_CLASSES
from erase.classifier.models import ResNetConfig, build_model, classify
from erase.errors import EraseError

# Four prompts. p0 falls before any attack; A breaks p1 (its second image), B breaks p2; nobody breaks p3.
PLAIN = {"p0": [True], "p1": [False], "p2": [False], "p3": [False]}
ATTACKED = {
    "A": {"p0": [False], "p1": [False, True], "p2": [False, False], "p3": [False]},
    "B": {"p0": [False], "p1": [False], "p2": [True], "p3": [False]},
}


def test_outcome_counts_the_plain_image_for_success_but_not_for_adversarial_success():
    o = outcome([True], [False, False])
    assert (o.pre, o.adversarial, o.success) == (True, False, True)
    o = outcome([False], [False, True])
    assert (o.pre, o.adversarial, o.success) == (False, True, True)
    assert not outcome([False], [False]).success


def test_summary_rates_per_attack_and_their_union():
    s = summarize(PLAIN, ATTACKED)
    assert s["prompts"] == 4 and s["pre_asr"] == 25.0
    assert s["attacks"]["A"] == {"pre_asr": 25.0, "asr": 50.0, "adversarial_asr": 25.0}
    assert s["attacks"]["B"] == {"pre_asr": 25.0, "asr": 50.0, "adversarial_asr": 25.0}
    # union: p0 (plain), p1 (A), p2 (B) fall; the adversarial prompts alone break p1 and p2
    assert s["union"] == {"pre_asr": 25.0, "asr": 75.0, "adversarial_asr": 50.0}


def test_adversarial_prompt_alone_on_a_base_model():
    """The base-model sanity check: every plain image shows the concept (ASR is trivially 100 %), so only the
    adversarial-alone rate says whether the attack prompt, without the concept's words, brings it back."""
    plain = {c: [True] for c in "abcd"}
    attacked = {"ring-a-bell": {"a": [True], "b": [False], "c": [False], "d": [False]}}
    s = summarize(plain, attacked)
    assert s["attacks"]["ring-a-bell"]["asr"] == 100.0
    assert s["attacks"]["ring-a-bell"]["adversarial_asr"] == 25.0


def test_union_and_share_edge_cases():
    assert union([Outcome(False, False), Outcome(False, True)]) == Outcome(False, True)
    with pytest.raises(ValueError, match="plain image"):
        union([Outcome(True, False), Outcome(False, False)])
    with pytest.raises(ValueError):
        union([])
    with pytest.raises(ValueError):
        share([])
    assert rates([Outcome(False, False)] * 3 + [Outcome(False, True)])["asr"] == 25.0


def test_summary_refuses_an_attack_that_skipped_a_prompt():
    with pytest.raises(ValueError, match="missing \\['p3'\\]"):
        summarize(PLAIN, {"A": {k: v for k, v in ATTACKED["A"].items() if k != "p3"}})
    with pytest.raises(ValueError, match="unknown"):
        summarize(PLAIN, {"A": {**ATTACKED["A"], "p9": [True]}})


def test_evaluator_judge_is_top1_equals_concept_in_eval_mode():
    torch.manual_seed(0)
    clf = build_model(ResNetConfig(num_classes=10, in_channels=1, width=2, image_size=16,
                                   class_names=list(FASHION_MNIST_CLASSES)))
    clf.train()
    judge = evaluator_judge(clf)
    assert not clf.training  # batch-norm batch statistics would make a verdict depend on the batch
    images = torch.rand(6, 3, 16, 16)
    preds = classify(clf, images)
    for concept in ("trouser", "pants", "Ankle Boot"):
        want = preds == class_of(concept, list(FASHION_MNIST_CLASSES))
        assert torch.equal(judge(images, concept), want)
    assert class_of("pants", list(FASHION_MNIST_CLASSES)) == 1
    with pytest.raises(EraseError, match="cannot judge concept 'garbage truck'"):
        judge(images, "garbage truck")
