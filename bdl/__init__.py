"""bdl: Bayesian deep learning for PyTorch.

One path for every method: a model with randomness -> Monte Carlo samples -> a ``Prediction``
-> metrics -> a report.
"""

__version__ = "0.1.0"

# glibc's malloc thresholds raised once, as freeing a 32 MiB tensor would: without it every training step and
# prediction of a few-MiB tensors pays thousands of page faults (bdl/_malloc.py; BDL_MALLOC_WARMUP=0 skips it)
from ._malloc import warm_up_malloc as _warm_up_malloc

_warm_up_malloc()

# --- nn: Bayesian layers, priors, KL, ELBO, bayesianize (bdl/nn) ---
from .nn import (
    ELBO,
    BayesConv1d,
    BayesConv2d,
    BayesConv3d,
    BayesianModule,
    BayesLinear,
    ELBOLoss,
    GaussianHead,
    GaussianPrior,
    Prior,
    ScaleMixturePrior,
    bayesianize,
    deterministic,
    elbo_loss,
    gaussian_nll,
    kl_divergence,
    sample_once,
    use_estimator,
)

# --- wrappers and prediction: MCDropout, DeepEnsemble, predict, Prediction (bdl/wrappers, bdl/predict.py) ---
from .nn.heads import GaussianHead, GaussianNLLLoss, GaussianOutput, gaussian_nll
from .predict import Prediction, common_random_numbers, predict
from .triage import Triage, triage
from .wrappers import DeepEnsemble, MCDropout

# --- metrics, calibration, plots, evaluate (bdl/metrics, bdl/calibration, bdl/plots.py, bdl/evaluate.py) ---
from . import metrics, plots
from .calibration import TemperatureScaler, VarianceScaler
from .evaluate import Report, evaluate

# --- Pyro inference: SVI, MCMC (bdl/infer) ---
from . import infer
from .infer import PyroModel, compare_predictions, mcmc


# `from bdl import *`: the public names, not the subpackages (bdl.nn would shadow `from torch import nn`); SVIModule
# and svi stay out, as importing them imports Lightning
__all__ = [
    "BayesConv1d",
    "BayesConv2d",
    "BayesConv3d",
    "BayesLinear",
    "BayesianModule",
    "DeepEnsemble",
    "ELBO",
    "ELBOLoss",
    "GaussianHead",
    "GaussianNLLLoss",
    "GaussianOutput",
    "GaussianPrior",
    "MCDropout",
    "Prediction",
    "Prior",
    "PyroModel",
    "Report",
    "ScaleMixturePrior",
    "TemperatureScaler",
    "Triage",
    "VarianceScaler",
    "bayesianize",
    "common_random_numbers",
    "compare_predictions",
    "deterministic",
    "elbo_loss",
    "evaluate",
    "gaussian_nll",
    "kl_divergence",
    "mcmc",
    "predict",
    "sample_once",
    "triage",
    "use_estimator",
]


def __dir__() -> list[str]:
    return sorted({*globals(), "SVIModule", "svi", "data", "lightning"})


def __getattr__(name: str):  # noqa: ANN202 - SVIModule or svi, loaded with Lightning on first use
    if name in ("SVIModule", "svi"):
        return getattr(infer, name)
    if name in ("data", "lightning"):  # bdl.data.load_digits, bdl.lightning.VariationalModule after `import bdl`
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
