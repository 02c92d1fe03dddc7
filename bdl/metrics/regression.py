"""Streaming regression metrics: thin ``torchmetrics.Metric`` wrappers of :mod:`bdl.metrics.functional.regression`.

For RMSE and MAE use torchmetrics' ``MeanSquaredError(squared=False)`` and ``MeanAbsoluteError``, which
compute the same numbers as :func:`~bdl.metrics.functional.rmse` and :func:`~bdl.metrics.functional.mae`.
Every ``update`` takes ``(mean, variance, target)`` of one batch, shapes [B] or [B, D].
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._base import _Metric, _RunningMean, empty_batch, require_data
from .functional import regression as F

__all__ = ["CRPS", "GaussianNLL", "IntervalCoverage", "QuantileCalibrationError"]


class GaussianNLL(_RunningMean):
    """Streaming :func:`~bdl.metrics.functional.gaussian_nll` (constant included), averaged over all elements.

    Example:
        >>> metric = GaussianNLL()
        >>> metric.update(torch.zeros(2), torch.ones(2), torch.zeros(2))
        >>> metric.compute()
        tensor(0.9189, dtype=torch.float64)
    """

    higher_is_better = False

    def update(self, mean: Tensor, variance: Tensor, target: Tensor) -> None:
        """Add a batch of predictive means, variances and targets."""
        if empty_batch(mean, variance, target):
            return
        self._add(F.gaussian_nll(mean, variance, target), torch.as_tensor(mean).numel())


class CRPS(_RunningMean):
    """Streaming :func:`~bdl.metrics.functional.crps_gaussian`, averaged over all elements.

    Example:
        >>> metric = CRPS()
        >>> metric.update(torch.zeros(1), torch.ones(1), torch.zeros(1))
        >>> metric.compute()
        tensor(0.2337, dtype=torch.float64)
    """

    higher_is_better = False

    def update(self, mean: Tensor, variance: Tensor, target: Tensor) -> None:
        """Add a batch of predictive means, variances and targets."""
        if empty_batch(mean, variance, target):
            return
        self._add(F.crps_gaussian(mean, variance, target), torch.as_tensor(mean).numel())


class IntervalCoverage(_RunningMean):
    """Streaming :func:`~bdl.metrics.functional.interval_coverage` (PICP) of the central ``level`` interval.

    Args:
        level: nominal coverage, in (0, 1).

    Example:
        >>> metric = IntervalCoverage(level=0.95)
        >>> metric.update(torch.zeros(4), torch.ones(4), torch.tensor([0.0, 1.0, -1.5, 2.5]))
        >>> metric.compute()
        tensor(0.7500, dtype=torch.float64)
    """

    higher_is_better: Optional[bool] = None  # the target is `level`, not 1

    def __init__(self, level: float = 0.95, **kwargs) -> None:  # noqa: ANN003
        super().__init__(**kwargs)
        F._half_width_factor(level, torch.zeros(()))  # validates `level`
        self.level = float(level)
        # A state that holds the level: a MetricCollection merges metrics whose states are equal after the first
        # update (compute groups), and two levels that both covered every target there reported one value after.
        self.add_state("nominal_level", default=torch.tensor(self.level, dtype=torch.float64), dist_reduce_fx="max")

    def update(self, mean: Tensor, variance: Tensor, target: Tensor) -> None:
        """Add a batch of predictive means, variances and targets."""
        if empty_batch(mean, variance, target):
            return
        self._add(F.interval_coverage(mean, variance, target, level=self.level), torch.as_tensor(mean).numel())

    def extra_repr(self) -> str:
        return f"level={self.level}"


class QuantileCalibrationError(_Metric):
    """Streaming :func:`~bdl.metrics.functional.quantile_calibration_error`; keeps one count per level.

    Args:
        levels: nominal levels in (0, 1); default ``0.05, 0.10, ..., 0.95``.

    Example:
        >>> metric = QuantileCalibrationError(levels=[0.25, 0.75])
        >>> metric.update(torch.zeros(3), torch.ones(3), torch.zeros(3))
        >>> metric.compute()
        tensor(0.2500, dtype=torch.float64)
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, levels: Optional[F.Levels] = None, **kwargs) -> None:  # noqa: ANN003
        super().__init__(**kwargs)
        levels = F._levels(levels, torch.zeros((), dtype=torch.float64))
        # a state, not a buffer: a MetricCollection then never merges two metrics of different levels (IntervalCoverage)
        self.add_state("levels", default=levels, dist_reduce_fx="max")
        self.add_state("below", default=torch.zeros_like(levels), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, mean: Tensor, variance: Tensor, target: Tensor) -> None:
        """Add a batch of predictive means, variances and targets."""
        if empty_batch(mean, variance, target):
            return
        _, observed = F.quantile_calibration_curve(mean, variance, target, levels=self.levels)
        size = torch.as_tensor(mean).numel()
        self.below += observed.double() * size
        self.count += size

    def compute(self) -> Tensor:
        require_data(self, self.count)
        return (self.below / self.count - self.levels).abs().mean()
