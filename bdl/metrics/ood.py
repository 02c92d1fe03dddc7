"""Streaming OOD-detection metrics: thin ``torchmetrics.Metric`` wrappers of :mod:`bdl.metrics.functional.ood`.

Each ``update(scores, is_ood)`` takes a batch of scores (higher = more OOD) and a boolean mask saying
which inputs are OOD, so in- and out-of-distribution inputs may arrive in the same or separate batches.
The scores are kept and the metric is computed exactly at the end (ranking metrics need all of them).
These replace torchmetrics' ``BinaryAUROC``/``BinaryAveragePrecision`` because those squash scores
outside [0, 1] through a sigmoid, which ties large scores such as energies (see the functional module).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torchmetrics.utilities import dim_zero_cat

from ._base import _Buffered, _syncs_each_step
from .functional import ood as F
from .functional._checks import as_tensor, check_fraction, check_vector

__all__ = ["OODAUPRIn", "OODAUPROut", "OODAUROC", "OODFPRAtTPR"]


class _OODMetric(_Buffered):
    higher_is_better = True
    _function: Callable[..., Tensor] = staticmethod(F.auroc)

    def __init__(self, **kwargs) -> None:  # noqa: ANN003 - torchmetrics options
        super().__init__(("scores", "is_ood"), **kwargs)

    @staticmethod
    def _checked(scores: Tensor, is_ood: Tensor) -> tuple[Tensor, Tensor]:
        scores = check_vector(scores, "scores", allow_empty=True)
        is_ood = as_tensor(is_ood, "is_ood")
        if is_ood.shape != scores.shape:
            raise ValueError(
                f"`is_ood` must have the shape of `scores` {tuple(scores.shape)}, got {tuple(is_ood.shape)}"
            )
        if is_ood.dtype != torch.bool:
            if is_ood.is_floating_point():  # 0. and 1. were refused as if they were other values
                hint = "use .bool()"
                if not ((is_ood == 0) | (is_ood == 1)).all():  # scores, as the second argument: update(is_ood, scores)
                    hint = "update takes (scores, is_ood): scores first"
                raise ValueError(f"`is_ood` must be boolean or integers 0 and 1, got dtype {is_ood.dtype} ({hint})")
            if ((is_ood != 0) & (is_ood != 1)).any():
                raise ValueError("`is_ood` must be boolean or hold only 0 and 1")
            is_ood = is_ood.bool()
        return scores, is_ood

    def update(self, scores: Tensor, is_ood: Tensor) -> None:
        """Add a batch: ``scores`` [B] (higher = more OOD) and ``is_ood`` [B] (bool, or 0/1 integers)."""
        scores, is_ood = self._checked(scores, is_ood)
        # kept in the scores' dtype, not as bool: a process without updates syncs an empty placeholder of the
        # metric's float dtype, and gloo aborted on the mismatched all-gather
        self._append(scores=scores, is_ood=is_ood.to(scores.dtype))

    def forward(self, scores: Tensor, is_ood: Tensor) -> Tensor:
        """Add the batch (as :meth:`update`) and return the metric of this batch alone, NaN when the batch holds
        only one side: batches may hold in- and out-of-distribution inputs apart, and the metric over all of
        them is what :meth:`compute` gives. (torchmetrics' own ``forward`` computes the batch value through
        :meth:`compute`, which refuses one side, and its state then held the failed batch alone.) With
        ``dist_sync_on_step`` in a distributed run the batch value is that of every process's batch together."""
        self.update(scores, is_ood)
        scores, is_ood = self._checked(scores, is_ood)
        if _syncs_each_step(self):  # each process returned its own batch's value, other metrics the synced one
            # float64 on every process, as _sync_dist sends: gloo aborted on mismatched dtypes (an empty batch's)
            scores, is_ood = (dim_zero_cat(self._gather_step(t.double())) for t in (scores, is_ood))
            is_ood = is_ood.bool()
        if bool(is_ood.all()) or not bool(is_ood.any()):
            value = torch.tensor(float("nan"), dtype=torch.float64, device=scores.device)
        else:
            value = self._value(scores[~is_ood], scores[is_ood])
        self._forward_cache = value  # what Lightning logs for on_step
        return value

    def _split(self) -> tuple[Tensor, Tensor]:
        scores, is_ood = self._gathered()
        is_ood = is_ood.bool()
        return scores[~is_ood], scores[is_ood]

    def _value(self, scores_in: Tensor, scores_out: Tensor) -> Tensor:
        return type(self)._function(scores_in, scores_out)

    def compute(self) -> Tensor:
        scores_in, scores_out = self._split()
        if not scores_in.numel() or not scores_out.numel():
            raise ValueError(
                f"{type(self).__name__} needs both sides: got {scores_in.numel()} in-distribution scores and "
                f"{scores_out.numel()} OOD scores since the last reset (e.g. Lightning's sanity check runs the first "
                "num_sanity_val_steps validation batches only: with the OOD inputs last, interleave them or set "
                "num_sanity_val_steps=0)"
            )
        return self._value(scores_in, scores_out)


class OODAUROC(_OODMetric):
    """Streaming :func:`~bdl.metrics.functional.auroc` (OOD as the positive class).

    Example:
        >>> metric = OODAUROC()
        >>> metric.update(torch.tensor([0.1, 0.4]), torch.tensor([False, False]))
        >>> metric.update(torch.tensor([0.35, 0.8]), torch.tensor([True, True]))
        >>> metric.compute()
        tensor(0.7500, dtype=torch.float64)
    """

    _function = staticmethod(F.auroc)


class OODAUPRIn(_OODMetric):
    """Streaming :func:`~bdl.metrics.functional.aupr_in` (in-distribution as the positive class).

    Example:
        >>> metric = OODAUPRIn()
        >>> metric.update(torch.tensor([0.1, 0.35, 0.4, 0.8]), torch.tensor([0, 1, 0, 1]))
        >>> metric.compute()
        tensor(0.8333, dtype=torch.float64)
    """

    _function = staticmethod(F.aupr_in)


class OODAUPROut(_OODMetric):
    """Streaming :func:`~bdl.metrics.functional.aupr_out` (OOD as the positive class).

    Example:
        >>> metric = OODAUPROut()
        >>> metric.update(torch.tensor([0.1, 0.35, 0.4, 0.8]), torch.tensor([0, 1, 0, 1]))
        >>> metric.compute()
        tensor(0.8333, dtype=torch.float64)
    """

    _function = staticmethod(F.aupr_out)


class OODFPRAtTPR(_OODMetric):
    """Streaming :func:`~bdl.metrics.functional.fpr_at_tpr`: OOD inputs accepted when ``tpr`` of the others are.

    Args:
        tpr: fraction of in-distribution inputs to accept, in (0, 1].

    Example:
        >>> metric = OODFPRAtTPR(tpr=0.95)
        >>> metric.update(torch.arange(20.0), torch.zeros(20, dtype=torch.bool))
        >>> metric.update(torch.tensor([5.0, 18.0, 18.5, 30.0]), torch.ones(4, dtype=torch.bool))
        >>> metric.compute()
        tensor(0.5000, dtype=torch.float64)
    """

    higher_is_better = False

    def __init__(self, tpr: float = 0.95, **kwargs) -> None:  # noqa: ANN003
        super().__init__(**kwargs)
        self.tpr = check_fraction(tpr, "tpr")

    def _value(self, scores_in: Tensor, scores_out: Tensor) -> Tensor:
        return F.fpr_at_tpr(scores_in, scores_out, tpr=self.tpr)

    def extra_repr(self) -> str:
        return f"tpr={self.tpr}"
