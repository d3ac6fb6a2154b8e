"""seapig-core: selective prediction from classifier logits.

Turn logits into uncertainty scores (higher = more uncertain), fit a temperature and a
rejection threshold on labelled calibration data, and select the samples to predict on.
The library never imports Prefect; the pipeline lives in the repository's ``tasks/`` and
``flows/``.
"""

from seapig_core._version import __version__
from seapig_core.dataframe import boundary_score, score_frame
from seapig_core.extract import Extraction, extract_logits
from seapig_core.persistence import load_score
from seapig_core.probabilities import logits_from_probabilities
from seapig_core.scores import (
    SCORES,
    CertaintyRatioScore,
    ConfidenceScore,
    EnergyScore,
    EntropyScore,
    LogitScore,
    MarginScore,
    MaxLogitScore,
    ProbabilityMarginScore,
    SelectionWarning,
    SoftmaxScore,
    make_score,
)
from seapig_core.temperature import TemperatureFitError

__all__ = [
    "SCORES",
    "CertaintyRatioScore",
    "ConfidenceScore",
    "EnergyScore",
    "EntropyScore",
    "Extraction",
    "LogitScore",
    "MarginScore",
    "MaxLogitScore",
    "ProbabilityMarginScore",
    "SelectionWarning",
    "SoftmaxScore",
    "TemperatureFitError",
    "__version__",
    "boundary_score",
    "extract_logits",
    "load_score",
    "logits_from_probabilities",
    "make_score",
    "score_frame",
]
