"""Streaming selective prediction: a thin ``torchmetrics.Metric`` wrapper of :func:`bdl.metrics.functional.aurc`."""

from __future__ import annotations

from torch import Tensor

from ._base import _Buffered
from .functional import selective as F
from .functional._checks import check_same_shape, check_vector

__all__ = ["AURC"]


class AURC(_Buffered):
    """Streaming :func:`~bdl.metrics.functional.aurc`; keeps every (confidence, loss) pair.

    Example:
        >>> metric = AURC()
        >>> metric.update(torch.tensor([0.9, 0.6]), torch.tensor([0.0, 1.0]))
        >>> metric.update(torch.tensor([0.8]), torch.tensor([1.0]))
        >>> metric.compute()
        tensor(0.3889, dtype=torch.float64)
    """

    higher_is_better = False

    def __init__(self, **kwargs) -> None:  # noqa: ANN003 - torchmetrics options
        super().__init__(("confidence", "loss"), **kwargs)

    def update(self, confidence: Tensor, loss: Tensor) -> None:
        """Add a batch: ``confidence`` [B] (higher = more confident) and non-negative ``loss`` [B]."""
        confidence = check_vector(confidence, "confidence", allow_empty=True)
        loss = check_vector(loss, "loss", allow_empty=True)
        check_same_shape(confidence=confidence, loss=loss)
        self._append(confidence=confidence, loss=loss)

    def compute(self) -> Tensor:
        return self._compute_with(F.aurc)
