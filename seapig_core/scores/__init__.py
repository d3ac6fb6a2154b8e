"""Uncertainty scores. Re-exports :mod:`seapig_core.scores.logits`."""

from seapig_core.scores.logits import (
    SCORES,
    CertaintyRatioScore,
    EnergyScore,
    EntropyScore,
    LogitScore,
    MarginScore,
    MaxLogitScore,
    SoftmaxScore,
    make_score,
)

__all__ = [
    "SCORES",
    "CertaintyRatioScore",
    "EnergyScore",
    "EntropyScore",
    "LogitScore",
    "MarginScore",
    "MaxLogitScore",
    "SoftmaxScore",
    "make_score",
]
