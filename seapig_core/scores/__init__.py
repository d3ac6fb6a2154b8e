"""Uncertainty scores. Re-exports :mod:`seapig_core.scores.logits` and the thresholds' warning."""

from seapig_core.scores.logits import (
    SCORES,
    CertaintyRatioScore,
    ConfidenceScore,
    EnergyScore,
    EntropyScore,
    LogitScore,
    MarginScore,
    MaxLogitScore,
    ProbabilityMarginScore,
    SoftmaxScore,
    make_score,
)
from seapig_core.scores.thresholds import SelectionWarning

__all__ = [
    "SCORES",
    "CertaintyRatioScore",
    "ConfidenceScore",
    "EnergyScore",
    "EntropyScore",
    "LogitScore",
    "MarginScore",
    "MaxLogitScore",
    "ProbabilityMarginScore",
    "SelectionWarning",
    "SoftmaxScore",
    "make_score",
]
