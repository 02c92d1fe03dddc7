"""Priors over the weights of Bayesian layers.

A prior is a small ``nn.Module`` (so tensor-valued parameters move with ``.to(device)`` and are saved in
``state_dict``) that knows its log density and the KL divergence from a mean-field Gaussian posterior to it.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .functional import kl_normal_normal, kl_normal_normal_exp, normal_log_prob, std_from_rho


def _check_positive(name: str, value: float | Tensor, owner: str) -> None:
    if isinstance(value, Tensor):
        if value.dtype == torch.bool:  # True was read as a scale of 1
            raise ValueError(f"{owner}: {name} must be a tensor of positive finite numbers, got a bool tensor")
        if value.is_meta:  # a model built without memory has no values to check (as loc's)
            return
        if not bool(torch.isfinite(value).all()) or bool((value <= 0).any()):
            raise ValueError(f"{owner}: {name} must be positive and finite everywhere, got a tensor with min {value.min().item():g}")
    elif isinstance(value, bool) or not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):  # True: 1
        raise ValueError(f"{owner}: {name} must be a positive finite number, got {value!r}")


class Prior(nn.Module):
    """Base class of weight priors.

    Subclasses implement :meth:`log_prob`; :meth:`kl_divergence` defaults to a one-sample Monte Carlo
    estimate ``log q(w) - log p(w)`` with ``w = loc + std * eps`` (reparameterised, so it has gradients),
    and subclasses with a closed form override it.

    Example:
        >>> class LaplacePrior(Prior):  # p(w) = exp(-|w| / b) / (2 b)
        ...     def log_prob(self, value):
        ...         return -value.abs() / 0.1 - math.log(2 * 0.1)
        >>> layer = BayesLinear(3, 2, prior=LaplacePrior())
        >>> layer.kl_divergence().shape  # a one-sample Monte Carlo estimate
        torch.Size([])
    """

    def log_prob(self, value: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Elementwise log density of the prior at ``value``."""
        raise NotImplementedError

    def kl_divergence(self, loc: Tensor, std: Tensor, log_std: Optional[Tensor] = None) -> Tensor:
        """``KL(N(loc, std^2) || prior)`` summed over all elements (a scalar tensor)."""
        eps = torch.randn_like(loc)
        weight = torch.addcmul(loc, std, eps)
        if log_std is None:
            log_std = std.log()
        log_q = -0.5 * eps.square() - log_std - 0.5 * math.log(2 * math.pi)
        return (log_q - self.log_prob(weight)).sum()

    def posterior_kl(self, loc: Tensor, rho: Tensor, std_transform: str = "exp") -> Tensor:
        """KL from ``N(loc, std^2)``, ``std = std_transform(rho)``, to this prior; what layers call."""
        std, log_std = std_from_rho(rho, std_transform)
        return self.kl_divergence(loc, std, log_std)

    def check_shape(self, shape: torch.Size) -> None:
        """Raise ``ValueError`` if tensor-valued prior parameters do not broadcast to ``shape``."""
        for name, buffer in self.named_buffers(recurse=False):
            try:
                fits = torch.broadcast_shapes(buffer.shape, shape) == shape
            except RuntimeError:
                fits = False
            if not fits:
                raise ValueError(
                    f"{type(self).__name__}: {name} of shape {tuple(buffer.shape)} does not broadcast to the "
                    f"parameter's shape {tuple(shape)}"
                )


class GaussianPrior(Prior):
    """Gaussian prior ``N(loc, scale^2)`` on every weight, with a closed-form KL.

    ``loc`` and ``scale`` are floats, or tensors broadcastable to the weight (a prior centred on
    pretrained weights, as MOPED does: ``layer.weight_prior = GaussianPrior(loc=pretrained.weight, scale=0.1)``
    and likewise ``layer.bias_prior``; :func:`bdl.bayesianize` with ``center_prior_on_weights=True`` sets both).

    Args:
        loc: prior mean.
        scale: prior standard deviation, > 0.

    Example:
        >>> prior = GaussianPrior(0.0, 0.1)
        >>> layer = BayesLinear(3, 2, prior=prior)
        >>> kl = layer.kl_divergence()
    """

    def __init__(self, loc: float | Tensor = 0.0, scale: float | Tensor = 1.0) -> None:
        super().__init__()
        _check_positive("scale", scale, "GaussianPrior")
        if isinstance(loc, Tensor):  # a meta tensor (a model built without memory) has no values to check
            if loc.dtype == torch.bool:  # failed at the first KL, in torch's words
                raise ValueError("GaussianPrior: loc must be a tensor of finite numbers, got a bool tensor")
            finite = loc.is_meta or bool(torch.isfinite(loc).all())
        else:
            finite = isinstance(loc, numbers.Real) and not isinstance(loc, bool) and math.isfinite(loc)
        if not finite:  # a NaN mean made every KL NaN, found only at the first training step
            raise ValueError(f"GaussianPrior: loc must be a finite number or a tensor of finite numbers, got {loc!r}")
        self.loc: Union[float, Tensor]
        self.scale: Union[float, Tensor]
        for name, value in (("loc", loc), ("scale", scale)):
            if isinstance(value, Tensor):
                self.register_buffer(name, value.detach().clone())
            else:
                setattr(self, name, float(value))

    def log_prob(self, value: Tensor) -> Tensor:
        return normal_log_prob(value, self.loc, self.scale)

    def kl_divergence(self, loc: Tensor, std: Tensor, log_std: Optional[Tensor] = None) -> Tensor:
        return kl_normal_normal(loc, std, self.loc, self.scale, log_std)

    def posterior_kl(self, loc: Tensor, rho: Tensor, std_transform: str = "exp") -> Tensor:
        if std_transform == "exp" and not isinstance(self.loc, Tensor) and not isinstance(self.scale, Tensor):
            return kl_normal_normal_exp(loc, rho, self.loc, self.scale)
        return super().posterior_kl(loc, rho, std_transform)

    def extra_repr(self) -> str:
        def show(v: float | Tensor) -> str:
            return f"tensor{tuple(v.shape)}" if isinstance(v, Tensor) else f"{v:g}"

        return f"loc={show(self.loc)}, scale={show(self.scale)}"


class ScaleMixturePrior(Prior):
    """Scale mixture of two zero-mean Gaussians (Blundell et al. 2015, "Weight Uncertainty in Neural Networks").

    ``p(w) = pi N(w | 0, scale1^2) + (1 - pi) N(w | 0, scale2^2)``: a wide component and a narrow one
    (``scale2 << scale1``) that pulls many weights towards zero. The KL has no closed form and is
    estimated by Monte Carlo with one reparameterised sample per call (unbiased).

    Args:
        scale1: standard deviation of the first (wide) component, > 0.
        scale2: standard deviation of the second (narrow) component, > 0.
        mixture_weight: ``pi``, the weight of the first component, in (0, 1).

    Example:
        >>> prior = ScaleMixturePrior(scale1=1.0, scale2=math.exp(-6), mixture_weight=0.5)
        >>> layer = BayesLinear(3, 2, prior=prior)
        >>> layer.kl_divergence().shape
        torch.Size([])
    """

    def __init__(self, scale1: float = 1.0, scale2: float = math.exp(-6), mixture_weight: float = 0.5) -> None:
        super().__init__()
        for name, value in (("scale1", scale1), ("scale2", scale2), ("mixture_weight", mixture_weight)):
            if isinstance(value, Tensor) and value.is_meta:  # kept as floats: a meta tensor has no value to keep
                raise ValueError(f"ScaleMixturePrior: {name} must be a number (kept as a float), got a meta tensor")
        for name, value in (("scale1", scale1), ("scale2", scale2)):
            if isinstance(value, Tensor) and value.numel() != 1:  # float() of it failed, naming nothing
                raise ValueError(f"ScaleMixturePrior: {name} must be a number (one scale for every weight), got a tensor of shape {tuple(value.shape)}")
            _check_positive(name, value, "ScaleMixturePrior")
        if isinstance(mixture_weight, Tensor) and mixture_weight.numel() == 1:
            mixture_weight = mixture_weight.item()  # as the scales: one number
        if not (isinstance(mixture_weight, numbers.Real) and 0 < mixture_weight < 1):
            hint = ""
            if isinstance(mixture_weight, numbers.Real) and mixture_weight in (0, 1):  # blitz's default prior_pi=1
                hint = f" (one component: use GaussianPrior(0.0, {'scale1' if mixture_weight == 1 else 'scale2'}), whose KL is exact)"
            raise ValueError(f"ScaleMixturePrior: mixture_weight must be in (0, 1), got {mixture_weight!r}{hint}")
        self.scale1 = float(scale1)
        self.scale2 = float(scale2)
        self.mixture_weight = float(mixture_weight)

    def log_prob(self, value: Tensor) -> Tensor:
        first = normal_log_prob(value, 0.0, self.scale1) + math.log(self.mixture_weight)
        second = normal_log_prob(value, 0.0, self.scale2) + math.log1p(-self.mixture_weight)
        # log(e^a + e^b) = max + log1p(e^-|a - b|), not torch.logaddexp: its double backward (a gradient penalty's
        # create_graph) overflowed to inf / inf = NaN once the log densities differed by 709, at any |w| > 0.1 here
        # (both -inf where w^2 overflows: their difference is NaN, read as a distance of inf, so the sum stays -inf)
        return torch.maximum(first, second) + (first - second).abs().nan_to_num(nan=math.inf).neg().exp().log1p()

    def extra_repr(self) -> str:
        return f"scale1={self.scale1:g}, scale2={self.scale2:g}, mixture_weight={self.mixture_weight:g}"


def as_prior(prior: Prior | float | None, name: str = "prior") -> Prior:
    """``None`` -> ``N(0, 1)``; a float ``s`` -> ``N(0, s^2)``; a :class:`Prior` is returned as is."""
    if prior is None:
        return GaussianPrior(0.0, 1.0)
    if isinstance(prior, Prior):
        return prior
    if isinstance(prior, numbers.Real) and not isinstance(prior, bool):
        if not (math.isfinite(prior) and prior > 0):  # GaussianPrior's own message named its "scale", not prior
            raise ValueError(f"{name}: a number is the scale s of the prior N(0, s^2) and must be positive and finite, got {prior!r}")
        return GaussianPrior(0.0, float(prior))
    raise TypeError(f"{name} must be a bdl Prior, a positive float (the scale of N(0, s^2)) or None, got {type(prior).__name__}")
