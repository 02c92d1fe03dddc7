"""Heteroscedastic regression: a Gaussian output head and its negative log-likelihood.

A :class:`GaussianHead` turns features into the mean and the variance of ``p(y | x) = N(mu(x), sigma^2(x))``
(Nix & Weigend, 1994; Kendall & Gal, 2017), and :func:`gaussian_nll` is the loss that trains it. A model
ending in the head returns a :class:`GaussianOutput` ``(mean, variance)``, which :func:`bdl.predict`
turns into aleatoric (mean of the predicted variances) and epistemic (variance of the predicted means)
parts.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._tensors import in_trace

_HALF_LOG_TWO_PI = 0.5 * math.log(2 * math.pi)


class GaussianOutput(NamedTuple):
    """Mean and variance of a Gaussian predictive, both ``[B, D]`` (a tuple, so ``mean, var = out`` works).

    Example:
        >>> mean, variance = bdl.GaussianHead(4, 1)(torch.randn(3, 4))
        >>> mean.shape, bool((variance > 0).all())
        (torch.Size([3, 1]), True)
    """

    mean: Tensor
    variance: Tensor


def _softplus_variance(raw: Tensor, min_variance: float) -> Tensor:
    return F.softplus(raw) + min_variance


def _exp_variance(raw: Tensor, min_variance: float) -> Tensor:
    return raw.exp() + min_variance


# How the raw network output becomes a variance; names a user passes as ``GaussianHead(variance=...)``.
VARIANCE_TRANSFORMS: dict[str, Callable[[Tensor, float], Tensor]] = {
    "softplus": _softplus_variance,
    "exp": _exp_variance,
}


class GaussianHead(nn.Module):
    """Linear layer that outputs the mean and the variance of a Gaussian per output dimension.

    One ``nn.Linear(in_features, 2 * out_features)`` gives ``(mean, raw)``; the variance is

    - ``variance="softplus"`` (default): ``sigma^2 = softplus(raw) + min_variance``. Grows linearly for
      large ``raw``, so a few badly fitted points cannot blow the loss up; the usual choice.
    - ``variance="exp"``: ``raw`` is the log-variance, ``sigma^2 = exp(raw) + min_variance``
      (Kendall & Gal, 2017). Scale-free, but its gradient grows exponentially.

    ``min_variance`` keeps the likelihood bounded when the model could otherwise shrink the variance
    to 0 on a training point. The inner layer (``head.linear``) is an ordinary ``nn.Linear`` unless
    ``linear=bdl.BayesLinear`` asks for a Bayesian one; :func:`bdl.bayesianize` converts it like any other.

    Args:
        in_features: size of the incoming features.
        out_features: number of regression targets ``D``.
        bias, device, dtype: as ``nn.Linear``.
        variance: ``"softplus"`` or ``"exp"``, see above.
        min_variance: floor added to the variance, >= 0.
        linear: layer class for the ``2 * out_features`` raw outputs, called like ``nn.Linear``.

    Returns (forward):
        :class:`GaussianOutput` ``(mean [B, D], variance [B, D])``.

    Example:
        >>> net = nn.Sequential(nn.Linear(1, 16), nn.ReLU(), bdl.GaussianHead(16, 1))
        >>> mean, variance = net(torch.randn(8, 1))
        >>> mean.shape, bool((variance > 0).all())
        (torch.Size([8, 1]), True)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int = 1,
        bias: bool = True,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
        *,
        variance: str = "softplus",
        min_variance: float = 1e-6,
        linear: Callable[..., nn.Module] = nn.Linear,
    ) -> None:
        super().__init__()
        if variance not in VARIANCE_TRANSFORMS:
            raise ValueError(f"variance must be one of {sorted(VARIANCE_TRANSFORMS)}, got {variance!r}")
        if not (isinstance(min_variance, numbers.Real) and math.isfinite(min_variance) and min_variance >= 0):
            raise ValueError(f"min_variance must be a finite number >= 0, got {min_variance!r}")
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            # numbers.Integral: numpy's integers too (np.prod of a shape), as nn.Linear and BayesLinear take them
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.variance = variance
        self.min_variance = float(min_variance)
        if not callable(linear):
            raise TypeError(f"linear must be a layer class such as nn.Linear or bdl.BayesLinear, got {linear!r}")
        self.linear = linear(in_features, 2 * out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, input: Tensor) -> GaussianOutput:
        mean, raw = self.linear(input).chunk(2, dim=-1)
        return GaussianOutput(mean, VARIANCE_TRANSFORMS[self.variance](raw, self.min_variance))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, variance={self.variance!r}, min_variance={self.min_variance:g}"


_REDUCTIONS = ("mean", "sum", "none")


def gaussian_nll(mean: Tensor, variance: Tensor, target: Tensor, *, reduction: str = "mean") -> Tensor:
    """Negative log-likelihood of ``target`` under ``N(mean, variance)``, per example.

    ``NLL_i = sum_d [ 1/2 log(2 pi sigma_id^2) + (y_id - mu_id)^2 / (2 sigma_id^2) ]``, the full Gaussian
    NLL (constant included) summed over the output dimensions of each example, so it is the
    per-example data term of :func:`bdl.elbo_loss`. (``torch.nn.GaussianNLLLoss`` instead averages over
    every element and drops the constant by default.) The arguments come in the order of a
    :class:`GaussianOutput`, ``(mean, variance)``, then the target: torch's ``F.gaussian_nll_loss`` takes
    ``(input, target, var)``, and a call in its order is read with the target as the variance.

    Args:
        mean: predicted means ``[B, D]`` (or ``[B]``).
        variance: predicted variances, same shape, > 0.
        target: targets, same shape as ``mean``; ``[B]`` is accepted when ``mean`` is ``[B, 1]``.
        reduction: ``"mean"`` over examples (default), ``"sum"``, or ``"none"`` for the ``[B]`` vector.

    Returns:
        A scalar, or ``[B]`` with ``reduction="none"``; float32 for half-precision ``mean`` (computed in it).

    Example:
        >>> mean, variance = torch.zeros(4, 1), torch.ones(4, 1)
        >>> round(bdl.gaussian_nll(mean, variance, torch.zeros(4)).item(), 4)  # 1/2 log(2 pi)
        0.9189
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(_REDUCTIONS)}, got {reduction!r}")
    for name, value in (("mean", mean), ("variance", variance), ("target", target)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(value).__name__}")
    if variance.shape != mean.shape:
        raise ValueError(f"variance must have the shape of mean {tuple(mean.shape)}, got {tuple(variance.shape)}")
    if target.shape != mean.shape:
        if mean.dim() == 2 and mean.shape[1] == 1 and target.shape == mean.shape[:1]:
            target = target.unsqueeze(-1)
        else:
            raise ValueError(f"target must have the shape of mean {tuple(mean.shape)}, got {tuple(target.shape)}")
    # (not where values cannot be read: compiled, or under torch.func's vmap of per-example gradients)
    # log of a negative variance is NaN, of 0 too (-inf + inf); a NaN or inf one gave a NaN or inf loss, silently
    if not in_trace(variance) and not bool(((variance > 0) & (variance < math.inf)).all()):
        nan, inf = int(variance.isnan().sum()), int(variance.isinf().sum())
        if nan or inf:
            raise ValueError(
                f"variance must be finite, got {nan} NaN and {inf} infinite value(s) (an exp variance head overflows "
                "above about 88 in float32: GaussianHead(variance='softplus') does not)"
            )
        raise ValueError(
            f"variance must be > 0 everywhere, got a minimum of {variance.min().item():.4g} (a variance head needs a "
            "floor, e.g. GaussianHead(min_variance=1e-6))"
        )
    if mean.dtype in (torch.float16, torch.bfloat16):  # a residual above 256 squared overflows float16: inf
        mean, variance, target = mean.float(), variance.float(), target.float()
    per_element = 0.5 * (variance.log() + (target - mean).square() / variance) + _HALF_LOG_TWO_PI
    per_example = per_element.flatten(1).sum(-1) if per_element.dim() > 1 else per_element  # flatten: N = 0 too
    if reduction == "mean":
        return per_example.mean()
    if reduction == "sum":
        return per_example.sum()
    return per_example


class GaussianNLLLoss(nn.Module):
    """Module form of :func:`gaussian_nll` taking a model's ``(mean, variance)`` output as one argument.

    Fits where a criterion ``criterion(output, target)`` is expected, e.g. ``bdl.ELBOLoss(model, num_data,
    criterion=bdl.GaussianNLLLoss())``.

    Args:
        reduction: ``"mean"`` over examples, ``"sum"`` or ``"none"``.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), bdl.GaussianHead(8, 2))
        >>> loss = bdl.GaussianNLLLoss()(net(torch.randn(5, 3)), torch.randn(5, 2))
        >>> loss.backward()
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {list(_REDUCTIONS)}, got {reduction!r}")
        self.reduction = reduction

    def forward(self, output: Sequence[Tensor], target: Tensor) -> Tensor:
        if not (isinstance(output, (tuple, list)) and len(output) == 2):
            raise TypeError(
                "output must be a (mean, variance) pair such as a GaussianHead returns, "
                f"got {type(output).__name__}{'' if not isinstance(output, Tensor) else ' ' + str(tuple(output.shape))}"
            )
        return gaussian_nll(output[0], output[1], target, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"
