"""The maths of every bdl metric, as plain functions on tensors.

``bdl.metrics`` wraps some of them in ``torchmetrics.Metric`` classes for streaming use; these functions
are the reference. Inputs are validated here and bad input raises ``ValueError``/``TypeError`` naming
the argument.
"""

from .classification import (
    CalibrationBins,
    accuracy,
    adaptive_ece,
    brier_score,
    calibration_bins,
    classwise_ece,
    ece,
    mce,
    nll,
    overconfidence,
    underconfidence,
)
from .ood import (
    LOGIT_SCORES,
    OOD_SCORES,
    aupr_in,
    aupr_out,
    auroc,
    fpr_at_tpr,
    ood_metrics,
    ood_roc_curve,
    ood_score,
    scores_for_task,
)
from .regression import (
    crps_gaussian,
    gaussian_nll,
    interval_coverage,
    interval_width,
    mae,
    quantile_calibration_curve,
    quantile_calibration_error,
    rmse,
)
from .selective import aurc, coverage_at_risk, excess_aurc, risk_at_coverage, risk_coverage_curve

# `from bdl.metrics.functional import *`: the functions, not the submodules (`regression`, `ood`, ...)
__all__ = [
    "CalibrationBins",
    "LOGIT_SCORES",
    "OOD_SCORES",
    "accuracy",
    "adaptive_ece",
    "aupr_in",
    "aupr_out",
    "auroc",
    "aurc",
    "brier_score",
    "calibration_bins",
    "classwise_ece",
    "coverage_at_risk",
    "crps_gaussian",
    "ece",
    "excess_aurc",
    "fpr_at_tpr",
    "gaussian_nll",
    "interval_coverage",
    "interval_width",
    "mae",
    "mce",
    "nll",
    "ood_metrics",
    "ood_roc_curve",
    "ood_score",
    "overconfidence",
    "quantile_calibration_curve",
    "quantile_calibration_error",
    "risk_at_coverage",
    "risk_coverage_curve",
    "rmse",
    "scores_for_task",
    "underconfidence",
]
