"""Regression metrics for a Gaussian predictive distribution ``N(mean, variance)`` per output.

Shapes: ``mean``, ``variance`` and ``target`` are [N] or [N, D] and must match, except that a target of
shape [N] is accepted for a prediction of shape [N, 1] (a common slip that broadcasting would silently
turn into an [N, N] comparison). Every metric averages over all N * D elements. For a Bayesian model
pass ``Prediction.mean`` and ``Prediction.total_variance`` (aleatoric + epistemic), which approximates
the predictive mixture of Gaussians by one Gaussian with the same first two moments.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from ._checks import check_float, check_fraction, check_same_shape, moved

__all__ = [
    "crps_gaussian",
    "gaussian_nll",
    "interval_coverage",
    "interval_width",
    "mae",
    "quantile_calibration_curve",
    "quantile_calibration_error",
    "rmse",
]

_LOG_TWO_PI = math.log(2 * math.pi)


def _check_shapes(mean: Tensor, **others: Tensor) -> dict[str, Tensor]:
    if mean.dim() not in (1, 2) or mean.numel() == 0:  # [N, 0]: every metric NaN
        raise ValueError(f"`mean` must have shape [N] or [N, D] with N, D >= 1, got shape {tuple(mean.shape)}")
    checked = {}
    for name, value in others.items():
        if mean.dim() == 2 and mean.shape[1] == 1 and value.shape == mean.shape[:1]:
            value = value.unsqueeze(1)
        checked[name] = moved(value, mean.device, torch.promote_types(mean.dtype, value.dtype))
    check_same_shape(mean=mean, **checked)
    return checked


def _wide(t: Tensor) -> Tensor:
    """Half types in float32: a squared residual overflows float16 above 256 (the NLL forms it before dividing
    by the variance), and bfloat16 keeps 8 bits of each term of a sum."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _point(mean, target) -> tuple[Tensor, Tensor]:  # noqa: ANN001
    mean = check_float(mean, "mean")
    target = _check_shapes(mean, target=check_float(target, "target"))["target"]
    return _wide(mean), _wide(target)


def _gaussian(mean, variance, target) -> tuple[Tensor, Tensor, Tensor]:  # noqa: ANN001
    mean = check_float(mean, "mean")
    checked = _check_shapes(mean, variance=check_float(variance, "variance"), target=check_float(target, "target"))
    variance = checked["variance"]
    if (variance <= 0).any():
        raise ValueError(f"`variance` must be positive, got minimum {variance.min().item():.4g}")
    return _wide(mean), _wide(variance), _wide(checked["target"])


def _half_width_factor(level: float, like: Tensor) -> Tensor:
    """``z = Phi^{-1}((1 + level) / 2)``: the central ``level`` interval is ``mean +- z * std``."""
    level = check_fraction(level, "level", open_right=True)
    z = -torch.special.ndtri(torch.tensor((1 - level) / 2, dtype=torch.float64))  # (1 + level) / 2 rounds to 1 near 1
    return z.to(dtype=like.dtype, device=like.device)


def rmse(mean: Tensor, target: Tensor) -> Tensor:
    """Root mean squared error, ``sqrt(mean((mean - target)^2))``.

    Args:
        mean: predicted means, shape [N] or [N, D].
        target: targets, same shape (or [N] for a mean of shape [N, 1]).

    Returns:
        A scalar tensor >= 0.

    Example:
        >>> rmse(torch.tensor([0.0, 1.0]), torch.tensor([3.0, 5.0]))  # sqrt((9 + 16) / 2)
        tensor(3.5355)
    """
    mean, target = _point(mean, target)
    residual = mean - target
    # scaled by the largest residual, which no square overflows (a float32 residual above 1.8e19 squared to inf,
    # where MAE and CRPS stay finite); float64 would not do on MPS, nor for float64 residuals of 1e200
    scale = residual.abs().max()
    if not scale > 0 or torch.isinf(scale):  # all zero: 0; a residual past the dtype's range: inf, as MAE's
        return residual.square().mean().sqrt()
    return scale * (residual / scale).square().mean().sqrt()


def mae(mean: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error, ``mean(|mean - target|)``.

    Args:
        mean: predicted means (or medians), shape [N] or [N, D].
        target: targets, same shape (or [N] for a mean of shape [N, 1]).

    Returns:
        A scalar tensor >= 0.

    Example:
        >>> mae(torch.tensor([0.0, 1.0]), torch.tensor([3.0, 5.0]))
        tensor(3.5000)
    """
    mean, target = _point(mean, target)
    return (mean - target).abs().mean()


def gaussian_nll(mean: Tensor, variance: Tensor, target: Tensor) -> Tensor:
    """Negative log-likelihood of the targets under ``N(mean, variance)``, constant included.

    ``NLL = mean(1/2 log(2 pi variance) + (target - mean)^2 / (2 variance))``, i.e.
    ``-Normal(mean, variance.sqrt()).log_prob(target).mean()``: ``torch.nn.functional.gaussian_nll_loss``
    with ``full=True`` for variances of at least its ``eps`` (1e-6), which it raises smaller ones to. Averaged over all N * D elements, like every metric here; the training loss
    :func:`bdl.gaussian_nll` sums over the D outputs of each example instead, so it is D times this.

    Args:
        mean: predicted means, shape [N] or [N, D].
        variance: predicted variances (> 0), same shape.
        target: targets, same shape (or [N] for a mean of shape [N, 1]).

    Returns:
        A scalar tensor.

    Example:
        >>> gaussian_nll(torch.zeros(2), torch.ones(2), torch.zeros(2))  # log(2 pi) / 2
        tensor(0.9189)
    """
    mean, variance, target = _gaussian(mean, variance, target)
    return 0.5 * (_LOG_TWO_PI + variance.log() + (target - mean).square() / variance).mean()


def crps_gaussian(mean: Tensor, variance: Tensor, target: Tensor) -> Tensor:
    """Continuous ranked probability score of ``N(mean, variance)``, closed form (Gneiting & Raftery 2007).

    ``CRPS = sigma [z (2 Phi(z) - 1) + 2 phi(z) - 1/sqrt(pi)]`` with ``z = (target - mean) / sigma``,
    averaged over elements. It equals ``E|X - y| - 1/2 E|X - X'|`` for independent ``X, X' ~ N(mean,
    variance)``, is in the units of the target, and reduces to the absolute error as ``sigma -> 0``.

    Args:
        mean: predicted means, shape [N] or [N, D].
        variance: predicted variances (> 0), same shape.
        target: targets, same shape (or [N] for a mean of shape [N, 1]).

    Returns:
        A scalar tensor >= 0.

    Example:
        >>> crps_gaussian(torch.zeros(1), torch.ones(1), torch.zeros(1))  # 2 phi(0) - 1/sqrt(pi)
        tensor(0.2337)
    """
    mean, variance, target = _gaussian(mean, variance, target)
    std = variance.sqrt()
    z = (target - mean) / std
    density = torch.exp(-0.5 * z.square()) / math.sqrt(2 * math.pi)
    score = std * (z * (2 * torch.special.ndtr(z) - 1) + 2 * density - 1 / math.sqrt(math.pi))
    return score.mean()


def interval_coverage(mean: Tensor, variance: Tensor, target: Tensor, *, level: float = 0.95) -> Tensor:
    """Prediction interval coverage probability (PICP) of the central ``level`` interval.

    The fraction of targets inside ``mean +- z sqrt(variance)``, ``z = Phi^{-1}((1 + level) / 2)``
    (the interval of ``Prediction.interval(level)``). A calibrated model gets about ``level``; less means
    overconfident intervals, more means too wide ones.

    Args:
        mean: predicted means, shape [N] or [N, D].
        variance: predicted variances (> 0), same shape.
        target: targets, same shape (or [N] for a mean of shape [N, 1]).
        level: nominal coverage of the interval, in (0, 1).

    Returns:
        A scalar tensor in [0, 1].

    Example:
        >>> interval_coverage(torch.zeros(4), torch.ones(4), torch.tensor([0.0, 1.0, -1.5, 2.5]), level=0.95)
        tensor(0.7500)
    """
    mean, variance, target = _gaussian(mean, variance, target)
    half_width = _half_width_factor(level, mean) * variance.sqrt()
    return ((target - mean).abs() <= half_width).to(mean.dtype).mean()


def interval_width(variance: Tensor, *, level: float = 0.95) -> Tensor:
    """Mean width of the central ``level`` interval of ``N(mean, variance)``, ``mean(2 z sqrt(variance))``.

    Read it next to :func:`interval_coverage`: of two models with the right coverage, the one with
    narrower intervals is the sharper.

    Args:
        variance: predicted variances (> 0), shape [N] or [N, D].
        level: nominal coverage of the interval, in (0, 1).

    Returns:
        A scalar tensor > 0.

    Example:
        >>> interval_width(torch.ones(3), level=0.95)  # 2 * 1.95996
        tensor(3.9199)
    """
    variance = check_float(variance, "variance")
    if variance.numel() == 0:
        raise ValueError("`variance` must not be empty")
    if (variance <= 0).any():
        raise ValueError(f"`variance` must be positive, got minimum {variance.min().item():.4g}")
    return (2 * _half_width_factor(level, variance) * variance.sqrt()).mean()


Levels = Union[Sequence[float], Tensor, None]


def _flat(levels: Any) -> list[Any]:  # noqa: ANN401
    """The entries of a number, a (nested) sequence or a tensor of levels."""
    if hasattr(levels, "tolist") and not isinstance(levels, numbers.Real):  # a tensor or a numpy array
        levels = levels.tolist()
    if isinstance(levels, (list, tuple)):
        return [v for item in levels for v in _flat(item)]
    return [levels]


def _levels(levels: Levels, like: Tensor) -> Tensor:
    if levels is None:
        return torch.linspace(0.05, 0.95, 19, dtype=like.dtype, device=like.device)
    if isinstance(levels, (str, bytes)) or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in _flat(levels)):
        raise TypeError(f"`levels` must be a number in (0, 1) or a list of them, got {levels!r}")
    levels = torch.as_tensor(levels, dtype=like.dtype, device=like.device).reshape(-1)
    if levels.numel() == 0 or not bool(((levels > 0) & (levels < 1)).all()):  # NaN fails both
        raise ValueError(f"`levels` must be a non-empty list of numbers in (0, 1), got {levels.tolist()}")
    return levels


def quantile_calibration_curve(
    mean: Tensor, variance: Tensor, target: Tensor, *, levels: Optional[Levels] = None
) -> tuple[Tensor, Tensor]:
    """Observed frequency of ``target <= q_p`` against the nominal level ``p`` (Kuleshov et al. 2018).

    ``q_p`` is the ``p``-quantile of ``N(mean, variance)``, so ``observed_p = mean(Phi((target - mean) /
    sigma) <= p)``. A calibrated model lies on the diagonal ``observed_p = p``.

    Args:
        mean: predicted means, shape [N] or [N, D].
        variance: predicted variances (> 0), same shape.
        target: targets, same shape (or [N] for a mean of shape [N, 1]).
        levels: nominal levels in (0, 1); default ``0.05, 0.10, ..., 0.95``.

    Returns:
        ``(levels, observed)``, both of shape [L].

    Example:
        >>> levels, observed = quantile_calibration_curve(
        ...     torch.zeros(4), torch.ones(4), torch.tensor([-2.0, -0.5, 0.5, 2.0]), levels=[0.25, 0.5, 0.75])
        >>> observed
        tensor([0.2500, 0.5000, 0.7500])
    """
    mean, variance, target = _gaussian(mean, variance, target)
    levels = _levels(levels, mean)
    cdf = torch.special.ndtr((target - mean) / variance.sqrt()).reshape(-1)
    # counted in the sorted cdf, not by an [L, N * D] comparison (8x the inputs' memory at 19 levels, 43x at 99)
    below = torch.searchsorted(cdf.sort().values, levels.to(cdf.dtype), right=True)
    observed = below.to(mean.dtype) / cdf.numel()
    return levels, observed


def quantile_calibration_error(
    mean: Tensor, variance: Tensor, target: Tensor, *, levels: Optional[Levels] = None
) -> Tensor:
    """Mean absolute gap between nominal and observed quantile levels, ``1/L sum_p |observed_p - p|``.

    The regression counterpart of ECE (Kuleshov et al. 2018 use squared gaps; absolute gaps keep the
    units of a probability). See :func:`quantile_calibration_curve`.

    Args:
        mean: predicted means, shape [N] or [N, D].
        variance: predicted variances (> 0), same shape.
        target: targets, same shape (or [N] for a mean of shape [N, 1]).
        levels: nominal levels in (0, 1); default ``0.05, 0.10, ..., 0.95``.

    Returns:
        A scalar tensor in [0, 1).

    Example:
        >>> # every target at the mean: observed is 0 below the median and 1 from it on
        >>> quantile_calibration_error(torch.zeros(3), torch.ones(3), torch.zeros(3), levels=[0.25, 0.75])
        tensor(0.2500)
    """
    levels, observed = quantile_calibration_curve(mean, variance, target, levels=levels)
    return (observed - levels).abs().mean()
