"""Training runs with Lightning: one LightningModule per method, DataModules, networks, and the ``bdl`` command.

Configs name these by class path, e.g. ``bdl.lightning.VariationalModule`` and ``bdl.lightning.DigitsDataModule``.
"""

import atexit

import torch

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


def _destroy_process_group() -> None:
    # a distributed run's worker processes (ddp_spawn's; ddp's beside the one that launched them) exit with gloo's
    # process group alive: Lightning destroys it at exit for NCCL only, and gloo's threads, left to interpreter exit,
    # can abort a process that trained and tested (SIGABRT, "terminate called without an active exception")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


atexit.register(_destroy_process_group)  # every process that runs a bdl module imports this package

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
