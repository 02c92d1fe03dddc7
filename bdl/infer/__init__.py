"""Pyro inference engines: an ``nn.Module`` as a Pyro model, SVI in Lightning, MCMC, and comparisons.

- :class:`PyroModel`: Gaussian priors on all or selected parameters of any network, plus a likelihood
  (:data:`LIKELIHOODS`), with the data plate scaled to the global training-set size.
- :class:`SVIModule` (Lightning) and :func:`svi` (a plain loop): fit an autoguide (:data:`GUIDES`).
- :func:`mcmc`: NUTS / HMC with a :class:`PosteriorSummary` (mean, std, quantiles, n_eff, r_hat, and the
  rank-normalised ess_bulk, ess_tail, rank_r_hat of :mod:`bdl.infer.diagnostics`) of the parameters and,
  from ``MCMCResult.predictive_summary``, of the predictions (function space).
- :func:`compare_predictions`: how close an approximate predictive is to a reference one.

Every engine ends in a :class:`bdl.Prediction`.
"""

from .compare import PredictiveComparison, compare_predictions
from .diagnostics import ess_bulk, ess_mean, ess_tail, rank_normalize, rank_r_hat
from .guides import ELBOS, GUIDES, make_elbo, make_guide
from .likelihoods import (
    LIKELIHOODS,
    BernoulliLikelihood,
    CategoricalLikelihood,
    GaussianLikelihood,
    HeteroscedasticGaussianLikelihood,
    HomoscedasticGaussianLikelihood,
    Likelihood,
    make_likelihood,
)
from .mcmc import KERNELS, MCMCResult, PosteriorSummary, mcmc
from .model import PyroModel, select_parameters
from .predictive import network_outputs, predict_from_samples, predict_function_model, private_param_store, sample_guide

# The SVI trainer subclasses lightning.LightningModule; importing Lightning takes seconds, so its names
# load on first use (``bdl.infer.SVIModule``, ``from bdl.infer import svi``) rather than with ``import bdl``.
_LAZY = {"OPTIMIZERS", "SVIModule", "exponential_decay", "svi"}


def __getattr__(name: str):  # noqa: ANN202 - the attribute asked for
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f"{__name__}.svi_trainer")
        globals().update({lazy: getattr(module, lazy) for lazy in _LAZY})
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# `from bdl.infer import *`: the public names, not the submodules (`model` would shadow a caller's variable); SVIModule,
# svi, OPTIMIZERS and exponential_decay stay out, as importing them imports Lightning (import them by name)
__all__ = [
    "BernoulliLikelihood",
    "CategoricalLikelihood",
    "ELBOS",
    "GUIDES",
    "GaussianLikelihood",
    "HeteroscedasticGaussianLikelihood",
    "HomoscedasticGaussianLikelihood",
    "KERNELS",
    "LIKELIHOODS",
    "Likelihood",
    "MCMCResult",
    "PosteriorSummary",
    "PredictiveComparison",
    "PyroModel",
    "compare_predictions",
    "ess_bulk",
    "ess_mean",
    "ess_tail",
    "make_elbo",
    "make_guide",
    "make_likelihood",
    "mcmc",
    "network_outputs",
    "predict_from_samples",
    "predict_function_model",
    "private_param_store",
    "rank_normalize",
    "rank_r_hat",
    "sample_guide",
    "select_parameters",
]
