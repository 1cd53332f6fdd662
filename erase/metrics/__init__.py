"""Metrics as torchmetrics ``Metric`` classes plus the report helpers built on them."""

from erase.metrics.accuracy import TopOneAccuracy
from erase.metrics.classifier import gap_to_retrain, rte, unlearning_metrics
from erase.metrics.concept import ConceptAccuracy
from erase.metrics.mia import MIAEfficacy, mia_efficacy
from erase.metrics.nudity import NudeNetCounts

__all__ = ["ConceptAccuracy", "MIAEfficacy", "NudeNetCounts", "TopOneAccuracy", "gap_to_retrain", "mia_efficacy", "rte",
           "unlearning_metrics"]
