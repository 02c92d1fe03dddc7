"""Bayesian layers, priors, the ELBO and whole-model conversion."""

from .convert import bayesianize, deterministic, kl_divergence, sample_once, use_estimator
from .functional import ESTIMATORS
from .heads import GaussianHead, gaussian_nll
from .layers import BayesConv1d, BayesConv2d, BayesConv3d, BayesianModule, BayesLinear
from .loss import ELBO, ELBOLoss, elbo_loss
from .priors import GaussianPrior, Prior, ScaleMixturePrior
