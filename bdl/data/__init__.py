"""Small offline data sets as tensors: scikit-learn's digits (with an OOD class split), and toys."""

from .offline import Splits, load_digits, load_mnist1d, regression_with_gap, two_moons

__all__ = [
    "Splits",
    "load_digits",
    "load_mnist1d",
    "regression_with_gap",
    "two_moons",
]
