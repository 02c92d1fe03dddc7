"""Variational families (Pyro autoguides) chosen by name, and the ELBOs that fit them."""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Optional, Union

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.distribution import Distribution as PyroDistribution
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.trace_mean_field_elbo import _check_mean_field_requirement
from pyro.infer.util import is_validation_enabled
from pyro.poutine import Trace
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_if_enumerated, check_model_guide_match, check_site_shape
from torch import Tensor
from torch.distributions import biject_to, register_kl
from torch.distributions.kl import _kl_normal_normal
from torch.distributions.transforms import ComposeTransform, IndependentTransform, Transform
from pyro.infer import autoguide
from pyro.infer.autoguide import AutoGuide, init_to_median, init_to_value
from pyro.nn import PyroModule

from torch import nn

from ..metrics.functional._checks import check_positive_int
from .model import PyroModel
from .predictive import keep_requires_grad, private_param_store


class _ModuleLocal:
    """An autoguide whose calls keep its parameters on the module (Pyro's ``module_local_params``).

    Called through Pyro itself (``Predictive(model, guide=...)``, ``guide()``, ``AutoDelta.median()``), a
    guide otherwise syncs its parameters with Pyro's global parameter store by full name
    (``AutoNormal.locs.weight``), which every guide of the same structure shares: a second fitted guide took
    the first one's parameter objects, and with them its posterior (its predictions and its next checkpoint).
    """

    def __init__(self, model: Any, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
        # The guide's first call traces the model: with module-local parameters on there, the model's
        # PyroModules ("'_Context' object has no attribute 'param_state'", also for a model function that
        # calls one) and its pyro.param sites (Pyro's "not yet implemented") failed
        super().__init__(_OutsideGuide(model), *args, **kwargs)  # type: ignore[call-arg]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        # a context made while the setting was off has no local store to enter
        context = getattr(self, "_pyro_context", None)
        if context is not None and not hasattr(context, "param_state"):
            context.param_state = {"params": {}, "constraints": {}}
        with pyro.settings.context(module_local_params=True):
            return super().__call__(*args, **kwargs)  # type: ignore[misc]


class _OutsideGuide:
    """A model run as outside a :class:`_ModuleLocal` guide: Pyro's global parameters, in a throw-away store.

    Inside the guide's call the global store is the guide's own, whose parameters Pyro checks are all the
    guide's. A class, not a closure: guides are pickled (``torch.save``).
    """

    def __init__(self, model: Callable) -> None:
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        with pyro.settings.context(module_local_params=False), pyro.get_param_store().scope(), keep_requires_grad():
            return self.model(*args, **kwargs)


class AutoNormal(_ModuleLocal, autoguide.AutoNormal):
    """Pyro's ``AutoNormal`` with module-local parameters (see :class:`_ModuleLocal`)."""


class AutoDelta(_ModuleLocal, autoguide.AutoDelta):
    """Pyro's ``AutoDelta`` with module-local parameters (see :class:`_ModuleLocal`)."""


class AutoLowRankMultivariateNormal(_ModuleLocal, autoguide.AutoLowRankMultivariateNormal):
    """Pyro's ``AutoLowRankMultivariateNormal`` with module-local parameters (see :class:`_ModuleLocal`)."""


class AutoMultivariateNormal(_ModuleLocal, autoguide.AutoMultivariateNormal):
    """Pyro's ``AutoMultivariateNormal`` with module-local parameters (see :class:`_ModuleLocal`)."""


#: Guide names -> autoguide classes (Pyro's, with module-local parameters).
GUIDES: dict[str, type[AutoGuide]] = {
    "normal": AutoNormal,  # mean-field Gaussian (ADVI)
    "lowrank_normal": AutoLowRankMultivariateNormal,  # Gaussian, covariance = low rank + diagonal
    "multivariate_normal": AutoMultivariateNormal,  # full-covariance Gaussian; small models only
    "delta": AutoDelta,  # point mass: MAP estimation
}

class _NormalKL(torch.autograd.Function):
    """Elementwise ``KL(N(m, s^2) || N(m0, s0^2)) = ((s/s0)^2 + ((m - m0)/s0)^2 - 1) / 2 - log(s/s0)`` with
    the backward written out (``dm = g (m - m0) / s0^2``, ``ds = g (s / s0^2 - 1 / s)``): a few passes
    where autograd through ``torch.distributions``' formula records about ten and replays them."""

    @staticmethod
    def forward(ctx, loc: Tensor, scale: Tensor, prior_loc: Tensor, prior_scale: Tensor) -> Tensor:  # type: ignore[no-untyped-def]
        ctx.save_for_backward(loc, scale, prior_loc, prior_scale)
        ratio = scale / prior_scale
        centred = (loc - prior_loc).div_(prior_scale)
        return ratio.square().add_(centred.square_()).sub_(1).mul_(0.5).sub_(ratio.log_())

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[no-untyped-def]
        loc, scale, prior_loc, prior_scale = ctx.saved_tensors
        inv_var = prior_scale.pow(-2)
        grad_loc = (loc - prior_loc).mul_(inv_var).mul_(grad)
        grad_scale = (scale * inv_var).sub_(scale.reciprocal()).mul_(grad)
        return grad_loc, grad_scale, None, None


class _MeanFieldNormal(dist.Normal):
    """The Gaussian of an ``AutoNormal`` site, as :class:`MeanFieldELBO` sees it: its KL to a Normal prior
    is :class:`_NormalKL`."""


@register_kl(_MeanFieldNormal, dist.Normal)
def _kl_mean_field_normal(p: dist.Normal, q: dist.Normal) -> Tensor:
    if q.loc.requires_grad or q.scale.requires_grad or p.loc.shape != q.loc.shape:
        return _kl_normal_normal(p, q)  # a learned prior, or one that broadcasts: the autograd formula
    return _NormalKL.apply(p.loc, p.scale, q.loc, q.scale)


class _TransformedDelta(dist.Delta):
    """``AutoNormal``'s ``Delta`` at ``w = T(u)``, as :class:`MeanFieldELBO` sees it: its ``log_density`` is
    ``log |du/dw|``, so ``log q(w) = log q(u) + log_density``. Pyro's ``KL(Delta || p) = -log p(v)``
    drops that term, so ``TraceMeanField_ELBO`` fits the posterior under ``p(w) |dw/du|`` for every
    latent off the real line (e.g. a noise scale: its learned value came out low); this one keeps it,
    as NumPyro does."""


@register_kl(_TransformedDelta, PyroDistribution)  # Pyro registers its KL(Delta || p) for Pyro's Distribution
def _kl_transformed_delta(p: dist.Delta, q: PyroDistribution) -> Tensor:
    return p.log_density - q.log_prob(p.v)


def _identity(transform: Transform) -> bool:
    while isinstance(transform, IndependentTransform):
        transform = transform.base_transform
    return isinstance(transform, ComposeTransform) and not transform.parts


def _normal_base(fn: dist.Distribution) -> Optional[tuple[dist.Normal, int]]:
    """``(Normal, event dims)`` for a ``Normal`` or ``Normal.to_event(n)``, else None."""
    dims = 0
    while isinstance(fn, dist.Independent):
        dims += fn.reinterpreted_batch_ndims
        fn = fn.base_dist
    return (fn, dims) if type(fn) is dist.Normal else None


class MeanFieldELBO(TraceMeanField_ELBO):
    """``TraceMeanField_ELBO`` whose KL terms are in closed form for ``AutoNormal`` guides too.

    ``AutoNormal`` draws each latent ``w`` through an auxiliary site ``w_unconstrained ~ N(loc, scale^2)``
    and puts a ``Delta`` at its transform, so Pyro's ``TraceMeanField_ELBO`` falls back to the Monte
    Carlo estimate ``-log p(w)`` (its KL of a ``Delta``, which leaves out the transform's log-Jacobian:
    wrong for latents off the real line, such as a noise scale) and, before that, computes every site's
    log-density once more for the trace. For latents on the real line under a Normal prior (every network
    weight of a :class:`~bdl.infer.PyroModel`) the transform is the identity, so this ELBO takes the
    auxiliary Normal as the guide's distribution of ``w`` and uses the closed-form
    ``KL(N(loc, scale^2) || prior)`` (same expectation, no Monte Carlo noise in that term), computed by
    one fused node, and computes only the log-densities the loss uses. Other sites are handled exactly as
    by ``TraceMeanField_ELBO``, except that the KL of a transformed site's ``Delta`` keeps its log-Jacobian,
    so the loss is the negative ELBO of ``Trace_ELBO`` for every site. With Pyro's validation on it also
    runs Pyro's checks.
    """

    def _get_trace(self, model, guide, args, kwargs):  # type: ignore[no-untyped-def]
        if isinstance(poutine.unwrap(guide), poutine.messenger.Messenger):  # a GuideMessenger: Pyro's way
            return super()._get_trace(model, guide, args, kwargs)
        guide_trace = poutine.trace(guide, graph_type="flat").get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace), graph_type="flat").get_trace(*args, **kwargs)
        validate = is_validation_enabled()
        if validate:
            check_model_guide_match(model_trace, guide_trace, self.max_plate_nesting)
        guide_trace = prune_subsample_sites(guide_trace)
        model_trace = prune_subsample_sites(model_trace)
        closed_form = set()
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"] or name not in guide_trace.nodes:
                continue
            auxiliary = guide_trace.nodes.get(f"{name}_unconstrained")
            guide_site = guide_trace.nodes[name]
            delta = guide_site["fn"]
            if type(delta) is dist.Delta and isinstance(delta.log_density, Tensor):  # keep T's log-Jacobian in the KL
                guide_site["fn"] = delta = _TransformedDelta(delta.v, log_density=delta.log_density, event_dim=delta.event_dim)
            if (
                auxiliary is None
                or not isinstance(delta, dist.Delta)
                or not _identity(biject_to(site["fn"].support))
                or delta.v.data_ptr() != auxiliary["value"].data_ptr()
                or delta.v.shape != auxiliary["value"].shape
            ):
                continue  # not an AutoNormal site on the real line: Pyro's treatment, with the Jacobian
            posterior, prior = _normal_base(auxiliary["fn"]), _normal_base(site["fn"])
            if posterior is None or prior is None or posterior[1] != prior[1]:
                continue
            normal, dims = posterior
            guide_site["fn"] = _MeanFieldNormal(normal.loc, normal.scale).to_event(dims) if dims else _MeanFieldNormal(normal.loc, normal.scale)
            del guide_trace.nodes[f"{name}_unconstrained"]
            closed_form.add(name)
        model_trace.compute_log_prob(site_filter=lambda name, site: validate or name not in closed_form)
        scored = Trace()  # the score parts the loss (or validation) reads; written into the shared site dicts
        scored.nodes = {
            name: site
            for name, site in guide_trace.nodes.items()
            if site["type"] == "sample" and (validate or name not in closed_form)
        }
        scored.compute_score_parts()
        if validate:
            for trace in (model_trace, guide_trace):
                for site in trace.nodes.values():
                    if site["type"] == "sample":
                        check_site_shape(site, self.max_plate_nesting)
            check_if_enumerated(guide_trace)
            _check_mean_field_requirement(model_trace, guide_trace)
        return model_trace, guide_trace


#: ELBO names -> ELBO classes. ``"mean_field"`` uses closed-form KL terms where they exist (also for
#: ``AutoNormal``'s sites, see :class:`MeanFieldELBO`).
ELBOS: dict[str, type] = {"trace": Trace_ELBO, "mean_field": MeanFieldELBO}


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
    if not (isinstance(init_scale, numbers.Real) and math.isfinite(init_scale) and init_scale > 0):
        raise ValueError(f"init_scale must be a positive finite number, got {init_scale!r}")
    if rank is not None and guide != "lowrank_normal":
        raise ValueError(f"rank applies to the 'lowrank_normal' guide only, got rank={rank} with guide={guide!r}")
    rank = None if rank is None else check_positive_int(rank, "rank")
    init_loc_fn = _init_loc_fn(model)
    if guide == "normal":
        return AutoNormal(model, init_loc_fn=init_loc_fn, init_scale=float(init_scale))
    if guide == "delta":
        return AutoDelta(model, init_loc_fn=init_loc_fn)
    if guide == "lowrank_normal":
        return AutoLowRankMultivariateNormal(model, init_loc_fn=init_loc_fn, init_scale=float(init_scale), rank=rank)
    return AutoMultivariateNormal(model, init_loc_fn=init_loc_fn, init_scale=float(init_scale))


def collapsed_scales(guide: nn.Module) -> list[str]:
    """The scales of a Pyro guide that collapsed to 0, as ``"name (k of n entries)"``: its scale parameters
    (``scales.*``, ``scale``, the diagonal of a Cholesky-factor ``scale_tril``) with entries at 0 while finite.
    Their unconstrained values underflowed (``softplus(-104)`` is 0 in float32), so the guide's log-density, and
    with it the ELBO, is infinite or NaN, or a low-rank guide's covariance singular, with every trained parameter
    finite. Empty for a guide that is no PyroModule; an ``AutoGuideList``'s parts are read by their own names.

    Example:
        >>> guide = make_guide("normal", PyroModel(nn.Linear(2, 1), "gaussian"))
        >>> with private_param_store():
        ...     _ = guide()  # creates the parameters
        >>> with torch.no_grad():
        ...     _ = guide.scales.weight_unconstrained.fill_(-1e4)
        >>> collapsed_scales(guide)
        ['scales.weight (2 of 2 entries)']
    """
    if not isinstance(guide, PyroModule):
        return []
    found = []
    with torch.no_grad(), private_param_store():
        for name, value in guide.named_pyro_params():
            parts, owner = name.split("."), guide
            # an AutoGuideList names its parts' parameters by index ("0.scales.a"): read them as the part's own
            while isinstance(owner, autoguide.AutoGuideList) and parts[0].isdigit():
                owner, parts = owner[int(parts[0])], parts[1:]
            # the guide's own parameter, not a site of that name (AutoNormal's locs.scale; a Delta's are named by site)
            if isinstance(owner, autoguide.AutoDelta) or parts[0] not in ("scale", "scales", "scale_tril"):
                continue
            if parts[-1] == "scale_tril":  # a Cholesky factor's (Pyro's own has a unit diagonal, and a scale)
                value = value.diagonal(dim1=-2, dim2=-1)
            zero = int((value == 0).sum())
            if zero:
                found.append(f"{name} ({zero} of {value.numel()} entries)")
    return found


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
        'MeanFieldELBO'
    """
    num_particles = check_positive_int(num_particles, "num_particles")
    if elbo == "auto":
        elbo = "mean_field" if isinstance(guide, autoguide.AutoNormal) else "trace"
    if elbo not in ELBOS:
        raise ValueError(f"unknown elbo {elbo!r}; choose one of {sorted(ELBOS) + ['auto']}")
    if elbo == "mean_field" and not isinstance(guide, (autoguide.AutoNormal, autoguide.AutoDelta)):
        raise ValueError(f"elbo='mean_field' needs a mean-field guide (AutoNormal or AutoDelta), got {type(guide).__name__}")
    return ELBOS[elbo](num_particles=num_particles)
