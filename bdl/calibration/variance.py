"""Variance scaling (Levi et al. 2019, Laves et al. 2020): the regression counterpart of temperature scaling.

One factor ``s^2 > 0`` multiplies a regression prediction's variances, fitted on held-out data: the
Gaussian NLL ``1/2 [log(2 pi s^2 sigma^2) + r^2 / (s^2 sigma^2)]`` of residuals ``r = y - mu`` is smallest at
the closed form ``s^2 = mean(r^2 / sigma^2)``, the mean squared standardised residual, so no optimiser is
needed. ``s^2 > 1`` widens intervals that were too narrow (an overconfident model), ``s^2 < 1`` narrows them;
the predictive mean, and so the RMSE, stay as they are.

The factor applies to the whole predictive distribution of a :class:`bdl.Prediction`: the aleatoric and
epistemic variances both (the Monte Carlo mixture spread ``s`` times wider about its mean), so their split is
kept. It works on predictions, not on a model: a per-sample output cannot widen the spread of the samples'
means without knowing their mean. Scale every prediction you compare with the same scaler (the test and the OOD
sets given to :func:`bdl.evaluate`: an OOD score of the total variance compared a scaled set with an unscaled one).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from ..metrics.functional._checks import as_tensor, check_float
from ..predict import Prediction

__all__ = ["VarianceScaler", "fit_variance_scale"]


def _regression(prediction: Prediction, name: str) -> Prediction:
    if not isinstance(prediction, Prediction):
        raise TypeError(f"`{name}` must be a bdl.Prediction of a regression (bdl.predict(..., task='regression')), got {type(prediction).__name__}")
    if prediction.task != "regression":
        raise ValueError(f"`{name}` is a {prediction.task} prediction: variance scaling is for regression (classification: bdl.TemperatureScaler)")
    return prediction


def fit_variance_scale(mean: Tensor, variance: Tensor, target: Tensor, *, per_output: bool = False) -> Tensor:
    """The factor ``s^2`` of the variances that minimises the Gaussian NLL of ``target``: ``mean(r^2 / variance)``.

    Args:
        mean: predictive means ``[N, D]`` (or ``[N]``).
        variance: predictive variances of the same shape, > 0 (the total variance of a :class:`bdl.Prediction`).
        target: targets of the same shape (``[N]`` next to ``[N, 1]`` too).
        per_output: one factor per output ``[D]`` (each fitted on its own column) instead of one for all.

    Returns:
        ``s^2``, a scalar tensor (``[D]`` with ``per_output``), in float64.

    Example:
        >>> mean, variance = torch.zeros(4000, 1), torch.ones(4000, 1)
        >>> target = 2.0 * torch.randn(4000, 1)  # the noise has 4 times the predicted variance
        >>> bool(abs(fit_variance_scale(mean, variance, target) - 4) < 0.3)
        True
    """
    if not isinstance(per_output, bool):
        raise TypeError(f"`per_output` must be true or false, got {per_output!r}")
    mean, variance = check_float(mean, "mean"), check_float(variance, "variance")
    target = check_float(as_tensor(target, "target"), "target")
    if mean.dim() not in (1, 2) or 0 in mean.shape:  # (a 0-d mean: an IndexError below; [N, 0]: a NaN scale)
        raise ValueError(f"`mean` must have shape [N, D] (or [N]) with N, D >= 1, got {tuple(mean.shape)}")
    if mean.dim() == 1:
        mean = mean[:, None]
    if variance.shape != mean.shape and variance.dim() == 1 and mean.shape[1] == 1:
        variance = variance[:, None]
    if variance.shape != mean.shape:
        raise ValueError(f"`variance` must have the shape of `mean` {tuple(mean.shape)}, got {tuple(variance.shape)}")
    if target.shape != mean.shape and target.numel() == mean.numel() and target.dim() == 1 and mean.shape[1] == 1:
        target = target[:, None]
    if target.shape != mean.shape:
        raise ValueError(f"`target` must have the shape of `mean` {tuple(mean.shape)} (or [N] for one output), got {tuple(target.shape)}")
    zero = variance <= 0
    if bool(zero.any()):  # a mean-only model sampled once, or samples that agree: nothing to scale
        raise ValueError(
            f"`variance` must be > 0, got {int(zero.sum())} of {variance.numel()} outputs with variance <= 0 (a model that "
            "predicts no variance and whose samples agree there): nothing to scale there; leave those inputs out of the "
            "validation data, or give the model a variance head with a floor (bdl.GaussianHead(min_variance=...))"
        )
    target, variance = target.to(mean.device), variance.to(mean.device)  # (validation targets kept on the CPU)
    standardised = (target.double() - mean.double()).square() / variance.double()
    scale = standardised.mean(0) if per_output else standardised.mean()
    return scale.clamp_min(torch.finfo(torch.float64).tiny)  # targets on the means exactly: the smallest factor


class VarianceScaler(nn.Module):
    """Post-hoc variance scaling of regression predictions: ``forward(prediction)`` multiplies its variances by ``s^2``.

    ``s^2`` is fitted by :meth:`fit` on a validation :class:`bdl.Prediction` (closed form, see
    :func:`fit_variance_scale`) and stored as the buffer ``scale`` (saved in ``state_dict``).

    Args:
        scale: the initial factor ``s^2`` (> 0): a number, or a tensor ``[D]`` of one per output.

    Example:
        >>> mean = torch.randn(2000, 1)
        >>> target = mean[:, 0] + torch.randn(2000)  # noise of variance 1
        >>> val, test = (bdl.Prediction.from_regression(mean[None, rows], torch.full((1, 1000, 1), 0.25))  # predicted: 0.25
        ...              for rows in (slice(0, 1000), slice(1000, 2000)))
        >>> scaler = bdl.VarianceScaler().fit(val, target[:1000])
        >>> bool(abs(scaler.scale - 4) < 0.5)
        True
        >>> lower, upper = scaler(test).interval(0.9)
        >>> covered = (lower[:, 0] <= target[1000:]) & (target[1000:] <= upper[:, 0])
        >>> bool(abs(covered.float().mean() - 0.9) < 0.04)
        True
    """

    scale: Tensor

    def __init__(self, scale: Union[float, Tensor] = 1.0) -> None:
        super().__init__()
        self.register_buffer("scale", self._checked(scale))

    @staticmethod
    def _checked(scale: Union[float, Tensor]) -> Tensor:
        if isinstance(scale, Tensor):
            value = scale.detach().double()
        elif isinstance(scale, numbers.Real) and not isinstance(scale, bool):
            value = torch.tensor(float(scale), dtype=torch.float64)
        else:
            raise TypeError(f"`scale` must be a positive number or a tensor [D] of them, got {type(scale).__name__}")
        if value.dim() > 1 or value.numel() == 0 or (not value.is_meta and not bool(((value > 0) & (value < math.inf)).all())):
            raise ValueError(f"`scale` must be a positive finite number or a 1-D tensor of them, got {scale!r}")
        return value

    @property
    def std_scale(self) -> Tensor:
        """``s``, the factor of the standard deviations and interval widths."""
        return self.scale.sqrt()

    def fit(self, prediction: Prediction, target: Optional[Tensor] = None, *, per_output: bool = False) -> "VarianceScaler":
        """Fit ``s^2`` on a validation regression ``prediction`` and its ``target`` (default
        ``prediction.targets``); returns ``self``. ``per_output``: one factor per output column."""
        prediction = _regression(prediction, "prediction")
        if target is None:
            if prediction.targets is None:
                raise ValueError("no `target`: pass the validation targets, or a prediction of (x, y) data (its targets are kept)")
            target = prediction.targets
        scale = fit_variance_scale(prediction.mean, prediction.total_variance, target, per_output=per_output)
        self.scale = scale.to(self.scale.device)
        return self

    def forward(self, prediction: Prediction) -> Prediction:
        """``prediction`` with its aleatoric and epistemic variances times ``s^2`` (the kept samples' means ``s``
        times farther from the mean, their variances times ``s^2``); the mean and the targets as they were."""
        prediction = _regression(prediction, "prediction")
        outputs = prediction.mean.shape[-1]
        if self.scale.dim() == 1 and self.scale.shape[0] != outputs:
            raise ValueError(f"`prediction` has {outputs} outputs, but the scaler holds {self.scale.shape[0]} factors (per_output)")
        scale = self.scale.to(prediction.mean.device, prediction.aleatoric_variance.dtype)
        changes = {
            "aleatoric_variance": prediction.aleatoric_variance * scale,
            "epistemic_variance": prediction.epistemic_variance * scale,
        }
        if prediction.sample_means is not None:
            changes["sample_means"] = prediction.mean + scale.sqrt().to(prediction.sample_means.dtype) * (prediction.sample_means - prediction.mean)
        if prediction.sample_variances is not None:
            changes["sample_variances"] = prediction.sample_variances * scale.to(prediction.sample_variances.dtype)
        scaled = dataclasses.replace(prediction, **changes)
        if bool(torch.isfinite(prediction.total_variance).all()) and not bool(torch.isfinite(scaled.total_variance).all()):
            dtype = prediction.total_variance.dtype  # a half-precision prediction's inf, silently
            wider = ": scale a float32 copy, prediction.to(torch.float32)" if torch.finfo(dtype).bits == 16 else ""
            raise ValueError(f"`prediction`'s variances times the scale overflow {dtype}{wider}")
        zeroed = (scaled.total_variance == 0) & (prediction.total_variance > 0)
        if bool(zeroed.any()):
            # a scale below the dtype's range (fit's smallest factor, for validation targets on the means) zeroed them
            smallest = prediction.total_variance[zeroed].min().item()
            raise ValueError(
                f"`prediction`'s variances times the scale underflow to 0 in {prediction.total_variance.dtype} at "
                f"{int(zeroed.sum())} of {zeroed.numel()} entries (variances from {smallest:.3g}, scale "
                f"{self.scale.min().item():.3g}; a fitted scale this small says the validation targets sat on the predicted means)"
            )
        return scaled

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "VarianceScaler":
        """Moves ``scale`` but keeps it in float64: ``.half()`` or Lightning's "16-true" precision (``.to(dtype)``)
        rounded it (1e-8 to 0: zero variances; 1e6 to inf; 4.0341 to 4.03125 in bfloat16)."""

        def keep_dtype(tensor: Tensor) -> Tensor:
            moved = fn(tensor)
            return moved if moved.dtype == tensor.dtype else tensor.to(moved.device)

        return super()._apply(keep_dtype, recurse)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
        # a per-output scaler's factors load into a scaler made with one (torch: "size mismatch"), checked as given
        incoming = state_dict.get(prefix + "scale")
        if isinstance(incoming, Tensor):
            try:
                checked = self._checked(incoming)
            except ValueError as error:  # which entry of a larger model's state dict
                raise ValueError(f"state dict entry {prefix}scale: {error}") from None
            self.scale = torch.empty_like(checked, device=self.scale.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        values = ", ".join(f"{value:.4g}" for value in self.scale.reshape(-1).tolist())
        return f"scale={values if self.scale.dim() == 0 else '[' + values + ']'}"
