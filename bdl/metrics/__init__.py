"""Measuring uncertainty: calibration, OOD detection, selective prediction and regression metrics.

``bdl.metrics.functional`` holds the maths as plain functions on tensors (the reference definitions);
the classes here are thin ``torchmetrics.Metric`` wrappers that accumulate over batches and sync across
processes. Where torchmetrics already has a metric with the same definition (accuracy, RMSE, MAE) use it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import functional
from .functional import OOD_SCORES, ood_score, scores_for_task

# The Metric classes load on first use: importing torchmetrics pulls in scipy.signal and torchvision
# (about 2.5 s), which `import bdl` and the functional metrics do not need.
_CLASSES = {
    "ECE": "classification", "MCE": "classification", "NLL": "classification", "AdaptiveECE": "classification",
    "BrierScore": "classification", "ClasswiseECE": "classification",
    "OODAUROC": "ood", "OODAUPRIn": "ood", "OODAUPROut": "ood", "OODFPRAtTPR": "ood",
    "CRPS": "regression", "GaussianNLL": "regression", "IntervalCoverage": "regression",
    "QuantileCalibrationError": "regression",
    "AURC": "selective",
}

if TYPE_CHECKING:
    from .classification import ECE, MCE, NLL, AdaptiveECE, BrierScore, ClasswiseECE
    from .ood import OODAUPRIn, OODAUPROut, OODAUROC, OODFPRAtTPR
    from .regression import CRPS, GaussianNLL, IntervalCoverage, QuantileCalibrationError
    from .selective import AURC


def __getattr__(name: str) -> Any:  # noqa: ANN401 - a Metric class
    if name in _CLASSES:
        return getattr(importlib.import_module(f"{__name__}.{_CLASSES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_CLASSES])

# `from bdl.metrics import *`: the Metric classes too (loaded through __getattr__ then)
__all__ = ["OOD_SCORES", "ood_score", "scores_for_task", *_CLASSES]
