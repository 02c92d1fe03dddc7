"""Bayesian layers, priors, the ELBO and whole-model conversion."""

from .convert import bayesianize, deterministic, kl_divergence, sample_once, use_estimator
from .functional import ESTIMATORS
from .heads import GaussianHead, GaussianNLLLoss, GaussianOutput, gaussian_nll
from .layers import BayesConv1d, BayesConv2d, BayesConv3d, BayesianModule, BayesLinear
from .loss import ELBO, ELBOLoss, elbo_loss
from .priors import GaussianPrior, Prior, ScaleMixturePrior

# `from bdl.nn import *`: the public names, not the submodules (`loss` would shadow a caller's variable)
__all__ = [
    "BayesConv1d",
    "BayesConv2d",
    "BayesConv3d",
    "BayesLinear",
    "BayesianModule",
    "ELBO",
    "ELBOLoss",
    "ESTIMATORS",
    "GaussianHead",
    "GaussianNLLLoss",
    "GaussianOutput",
    "GaussianPrior",
    "Prior",
    "ScaleMixturePrior",
    "bayesianize",
    "deterministic",
    "elbo_loss",
    "gaussian_nll",
    "kl_divergence",
    "sample_once",
    "use_estimator",
]
