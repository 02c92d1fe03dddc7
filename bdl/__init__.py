"""bdl: Bayesian deep learning for PyTorch.

One path for every method: a model with randomness -> Monte Carlo samples -> a ``Prediction``
-> metrics -> a report.
"""

__version__ = "0.1.0"

# --- nn: Bayesian layers, priors, KL, ELBO, bayesianize (bdl/nn) ---
from .nn import (
    ELBO,
    BayesConv1d,
    BayesConv2d,
    BayesConv3d,
    BayesianModule,
    BayesLinear,
    ELBOLoss,
    GaussianPrior,
    Prior,
    ScaleMixturePrior,
    bayesianize,
    deterministic,
    elbo_loss,
    kl_divergence,
    use_estimator,
)

# --- wrappers and prediction: MCDropout, DeepEnsemble, predict, Prediction (bdl/wrappers, bdl/predict.py) ---

# --- metrics, calibration, plots, evaluate (bdl/metrics, bdl/calibration, bdl/plots.py, bdl/evaluate.py) ---

# --- Pyro inference: SVI, MCMC (bdl/infer) ---
