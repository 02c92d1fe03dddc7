"""Training runs with Lightning: one LightningModule per method, DataModules, networks, and the ``bdl`` command.

Configs name these by class path, e.g. ``bdl.lightning.VariationalModule`` and ``bdl.lightning.DigitsDataModule``.
"""

from .. import _distributed  # noqa: F401 - the process group destroyed at exit
from .data import (
    DigitsDataModule,
    MNIST1DDataModule,
    RegressionGapDataModule,
    TwoMoonsDataModule,
    UncertaintyDataModule,
)
from .models import MLP, Conv1dNet, LeNet5, ResNet
from .modules import (
    METHODS,
    DeterministicModule,
    EnsembleModule,
    MCDropoutModule,
    SVIModule,
    UncertaintyModule,
    VariationalModule,
)
from .tabular import SklearnRegressionDataModule, TabularDataModule
from .vision import CIFAR10DataModule, MNISTDataModule


# `from bdl.lightning import *`: the public names, not the submodules (`data` would shadow a caller's variable)
__all__ = [
    "CIFAR10DataModule",
    "Conv1dNet",
    "DeterministicModule",
    "DigitsDataModule",
    "EnsembleModule",
    "LeNet5",
    "METHODS",
    "MCDropoutModule",
    "MLP",
    "MNIST1DDataModule",
    "MNISTDataModule",
    "RegressionGapDataModule",
    "ResNet",
    "SVIModule",
    "SklearnRegressionDataModule",
    "TabularDataModule",
    "TwoMoonsDataModule",
    "UncertaintyDataModule",
    "UncertaintyModule",
    "VariationalModule",
]
