"""Other ways to get randomness from a network: MC dropout and deep ensembles."""

from .ensemble import ENSEMBLE_METHODS, DeepEnsemble
from .mc_dropout import DROPOUT_TYPES, MCDropout

__all__ = [
    "DROPOUT_TYPES",
    "DeepEnsemble",
    "ENSEMBLE_METHODS",
    "MCDropout",
]
