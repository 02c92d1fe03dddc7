"""Variational families (Pyro autoguides) chosen by name, and the ELBOs that fit them."""

from __future__ import annotations

from typing import Callable, Optional, Union

import pyro
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import (
    AutoDelta,
    AutoGuide,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
    init_to_median,
    init_to_value,
)

from torch import nn  # noqa: F401  (used in the examples)

from .model import PyroModel

#: Guide names -> Pyro autoguide classes.
GUIDES: dict[str, type[AutoGuide]] = {
    "normal": AutoNormal,  # mean-field Gaussian (ADVI)
    "lowrank_normal": AutoLowRankMultivariateNormal,  # Gaussian, covariance = low rank + diagonal
    "multivariate_normal": AutoMultivariateNormal,  # full-covariance Gaussian; small models only
    "delta": AutoDelta,  # point mass: MAP estimation
}

#: ELBO names -> Pyro ELBO classes. ``"mean_field"`` uses closed-form KL terms where they exist.
ELBOS: dict[str, type] = {"trace": Trace_ELBO, "mean_field": TraceMeanField_ELBO}


def _init_loc_fn(model: Union[PyroModel, Callable]) -> Callable:
    if isinstance(model, PyroModel):
        # Start at the network's current weights (a trained or well-initialised net), not at prior draws.
        return init_to_value(values=model.current_values(), fallback=init_to_median)
    return init_to_median


def make_guide(
    guide: Union[str, AutoGuide, Callable[[Callable], AutoGuide]],
    model: Union[PyroModel, Callable],
    *,
    init_scale: float = 0.01,
    rank: Optional[int] = None,
) -> AutoGuide:
    """Build an autoguide for ``model`` by name, or from a factory, or pass an instance through.

    Gaussian guides start at the network's current weights (for a :class:`PyroModel`; the prior median
    for a plain Pyro model function) with a small standard deviation ``init_scale``, so SVI starts from a
    near-deterministic network and widens it where the data allow.

    Args:
        guide: ``"normal"`` (``AutoNormal``, mean-field), ``"lowrank_normal"``
            (``AutoLowRankMultivariateNormal``), ``"multivariate_normal"`` (``AutoMultivariateNormal``, small
            models only: the covariance has ``d^2`` entries), ``"delta"`` (``AutoDelta``, MAP), an
            ``AutoGuide`` instance, or a callable ``model -> AutoGuide``.
        model: a :class:`PyroModel` or a Pyro model function.
        init_scale: initial posterior standard deviation of the Gaussian guides, > 0.
        rank: rank of ``"lowrank_normal"`` (default ``round(sqrt(d))``).

    Returns:
        the guide (its parameters are created on its first call).

    Example:
        >>> model = PyroModel(nn.Linear(3, 1), "gaussian")
        >>> guide = make_guide("lowrank_normal", model, rank=2)
        >>> type(guide).__name__
        'AutoLowRankMultivariateNormal'
    """
    if isinstance(guide, AutoGuide):
        return guide
    if not isinstance(guide, str):
        if callable(guide):
            return guide(model)
        raise TypeError(f"guide must be a name, an AutoGuide or a callable model -> AutoGuide, got {type(guide).__name__}")
    if guide not in GUIDES:
        raise ValueError(f"unknown guide {guide!r}; choose one of {sorted(GUIDES)}")
    if not (isinstance(init_scale, (int, float)) and init_scale > 0):
        raise ValueError(f"init_scale must be a positive number, got {init_scale!r}")
    if rank is not None and guide != "lowrank_normal":
        raise ValueError(f"rank applies to the 'lowrank_normal' guide only, got rank={rank} with guide={guide!r}")
    if rank is not None and (not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    init_loc_fn = _init_loc_fn(model)
    if guide == "normal":
        return AutoNormal(model, init_loc_fn=init_loc_fn, init_scale=float(init_scale))
    if guide == "delta":
        return AutoDelta(model, init_loc_fn=init_loc_fn)
    if guide == "lowrank_normal":
        return AutoLowRankMultivariateNormal(model, init_loc_fn=init_loc_fn, init_scale=float(init_scale), rank=rank)
    return AutoMultivariateNormal(model, init_loc_fn=init_loc_fn, init_scale=float(init_scale))


def make_elbo(elbo: str, guide: AutoGuide, *, num_particles: int = 1) -> pyro.infer.ELBO:
    """The ELBO estimator by name: ``"trace"`` (``Trace_ELBO``), ``"mean_field"`` (``TraceMeanField_ELBO``:
    analytic KL terms, valid for mean-field guides), or ``"auto"`` (mean-field for ``AutoNormal``, else trace).

    Args:
        elbo: the name.
        guide: the guide it will be used with (decides ``"auto"``).
        num_particles: Monte Carlo samples per ELBO estimate, >= 1.

    Returns:
        a Pyro ``ELBO``; ``elbo(model, guide)`` is a ``torch.nn.Module`` whose forward is the loss.

    Example:
        >>> type(make_elbo("auto", AutoNormal(PyroModel(nn.Linear(2, 1), "gaussian")))).__name__
        'TraceMeanField_ELBO'
    """
    if not isinstance(num_particles, int) or isinstance(num_particles, bool) or num_particles < 1:
        raise ValueError(f"num_particles must be an int >= 1, got {num_particles!r}")
    if elbo == "auto":
        elbo = "mean_field" if isinstance(guide, AutoNormal) else "trace"
    if elbo not in ELBOS:
        raise ValueError(f"unknown elbo {elbo!r}; choose one of {sorted(ELBOS) + ['auto']}")
    if elbo == "mean_field" and not isinstance(guide, (AutoNormal, AutoDelta)):
        raise ValueError(f"elbo='mean_field' needs a mean-field guide (AutoNormal or AutoDelta), got {type(guide).__name__}")
    return ELBOS[elbo](num_particles=num_particles)
