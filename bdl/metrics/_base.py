"""Two small bases for the ``torchmetrics.Metric`` wrappers: a running mean and a concatenating buffer."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


class _RunningMean(Metric):
    """Accumulates ``sum(batch_mean * batch_size)`` and ``sum(batch_size)``: exact for any split into batches."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:  # noqa: ANN003 - torchmetrics options
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def _add(self, batch_mean: Tensor, batch_size: int) -> None:
        self.total += batch_mean.detach().double() * batch_size
        self.count += batch_size

    def compute(self) -> Tensor:
        return self.total / self.count


class _Buffered(Metric):
    """Keeps every update's tensors (concatenated, gathered across processes) and applies a functional metric."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, names: tuple[str, ...], **kwargs) -> None:  # noqa: ANN003
        super().__init__(**kwargs)
        self._names = names
        for name in names:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def _append(self, **tensors: Tensor) -> None:
        for name, tensor in tensors.items():
            getattr(self, name).append(tensor.detach())

    def _gathered(self) -> list[Tensor]:
        return [dim_zero_cat(getattr(self, name)) for name in self._names]

    def _compute_with(self, function: Callable[..., Tensor], *args, **kwargs) -> Tensor:  # noqa: ANN002, ANN003
        return function(*self._gathered(), *args, **kwargs)
