"""Streaming classification metrics: thin ``torchmetrics.Metric`` wrappers of :mod:`bdl.metrics.functional`.

For accuracy use torchmetrics' ``MulticlassAccuracy(num_classes, average="micro")``, which is the same
number as :func:`bdl.metrics.functional.accuracy`. The calibration metrics here keep per-bin sums rather
than every example (torchmetrics' ``CalibrationError`` keeps every confidence), so their memory does not
grow with the data and they sync across processes by summation.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from ._base import _Buffered, _Metric, _RunningMean, empty_batch, require_data
from .functional import classification as F
from .functional._checks import check_n_bins
from .functional.classification import _brier_wide

__all__ = ["ECE", "MCE", "AdaptiveECE", "BrierScore", "ClasswiseECE", "NLL"]


class NLL(_RunningMean):
    """Streaming :func:`~bdl.metrics.functional.nll`: mean negative log-likelihood of the labels.

    Example:
        >>> metric = NLL()
        >>> metric.update(torch.tensor([[0.5, 0.5]]), torch.tensor([0]))
        >>> metric.update(torch.tensor([[0.25, 0.75]]), torch.tensor([1]))
        >>> metric.compute()
        tensor(0.4904, dtype=torch.float64)
    """

    higher_is_better = False

    def update(self, probs: Tensor, target: Tensor) -> None:
        """Add a batch: ``probs`` [B, C] predictive probabilities, ``target`` [B] integer labels."""
        if empty_batch(probs, target):
            return
        self._add(F.nll(probs, target), len(target))  # checked there: a tensor, array or list of N labels


class BrierScore(_RunningMean):
    """Streaming :func:`~bdl.metrics.functional.brier_score` (summed over classes, averaged over examples).

    Example:
        >>> metric = BrierScore()
        >>> metric.update(torch.tensor([[0.8, 0.2], [0.4, 0.6]]), torch.tensor([0, 0]))
        >>> metric.compute()
        tensor(0.4000, dtype=torch.float64)
    """

    higher_is_better = False

    def update(self, probs: Tensor, target: Tensor) -> None:
        """Add a batch: ``probs`` [B, C] predictive probabilities, ``target`` [B] integer labels."""
        if empty_batch(probs, target):
            return
        self._add(_brier_wide(probs, target)[0], len(target))


class _BinnedCalibration(_Metric):
    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    _kind = "ece"

    def __init__(self, n_bins: int = 15, **kwargs) -> None:  # noqa: ANN003 - torchmetrics options
        super().__init__(**kwargs)
        self.n_bins = check_n_bins(n_bins)
        for name in ("count", "confidence_sum", "correct_sum"):
            self.add_state(name, default=torch.zeros(n_bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, probs: Tensor, target: Tensor) -> None:
        """Add a batch: ``probs`` [B, C] predictive probabilities, ``target`` [B] integer labels."""
        if empty_batch(probs, target):
            return
        probs, target = F._checked(probs, target)
        count, confidence_sum, correct_sum = F._bin_sums(*F._top_label(probs, target), self.n_bins)
        self.count += count
        self.confidence_sum += confidence_sum
        self.correct_sum += correct_sum

    def compute(self) -> Tensor:
        require_data(self, self.count)
        return F._reduce(self.count, self.confidence_sum, self.correct_sum, self._kind)

    def extra_repr(self) -> str:
        return f"n_bins={self.n_bins}"


class ECE(_BinnedCalibration):
    """Streaming :func:`~bdl.metrics.functional.ece` (equal-width bins); keeps three sums per bin.

    Args:
        n_bins: number of equal-width bins on [0, 1].

    Example:
        >>> metric = ECE(n_bins=5)
        >>> metric.update(torch.tensor([[0.95, 0.05], [0.85, 0.15]]), torch.tensor([0, 1]))
        >>> metric.update(torch.tensor([[0.25, 0.75], [0.65, 0.35]]), torch.tensor([1, 0]))
        >>> metric.compute()
        tensor(0.3500, dtype=torch.float64)
    """

    _kind = "ece"


class MCE(_BinnedCalibration):
    """Streaming :func:`~bdl.metrics.functional.mce` (largest gap over non-empty equal-width bins).

    Args:
        n_bins: number of equal-width bins on [0, 1].

    Example:
        >>> metric = MCE(n_bins=5)
        >>> probs = torch.tensor([[0.95, 0.05], [0.85, 0.15], [0.25, 0.75], [0.65, 0.35]])
        >>> metric.update(probs, torch.tensor([0, 1, 1, 0]))
        >>> metric.compute()
        tensor(0.4000, dtype=torch.float64)
    """

    _kind = "mce"


class ClasswiseECE(_Metric):
    """Streaming :func:`~bdl.metrics.functional.classwise_ece`; keeps three sums per class and bin.

    Args:
        num_classes: number of classes C.
        n_bins: number of equal-width bins on [0, 1].

    Example:
        >>> metric = ClasswiseECE(num_classes=2, n_bins=5)
        >>> probs = torch.tensor([[0.95, 0.05], [0.85, 0.15], [0.25, 0.75], [0.65, 0.35]])
        >>> metric.update(probs, torch.tensor([0, 1, 1, 0]))
        >>> metric.compute()
        tensor(0.3500, dtype=torch.float64)
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, num_classes: int, n_bins: int = 15, **kwargs) -> None:  # noqa: ANN003
        super().__init__(**kwargs)
        # numbers.Integral: numpy's integers, from len(np.unique(y)), were refused as "not an integer"
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
            raise ValueError(f"`num_classes` must be an integer >= 2, got {num_classes!r}")
        self.num_classes, self.n_bins = int(num_classes), check_n_bins(n_bins)
        for name in ("count", "probability_sum", "outcome_sum"):
            self.add_state(name, default=torch.zeros(num_classes, n_bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, probs: Tensor, target: Tensor) -> None:
        """Add a batch: ``probs`` [B, C] predictive probabilities, ``target`` [B] integer labels."""
        if empty_batch(probs, target):
            return
        probs, target = F._checked(probs, target)
        if probs.shape[1] != self.num_classes:
            raise ValueError(f"`probs` must have {self.num_classes} columns, got shape {tuple(probs.shape)}")
        count, probability_sum, outcome_sum = F._classwise_sums(probs, target, self.n_bins)
        self.count += count
        self.probability_sum += probability_sum
        self.outcome_sum += outcome_sum

    def compute(self) -> Tensor:
        require_data(self, self.count[0])
        num_examples = self.count[0].sum()
        return ((self.probability_sum - self.outcome_sum).abs().sum(dim=1) / num_examples).mean()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, n_bins={self.n_bins}"


class AdaptiveECE(_Buffered):
    """Streaming :func:`~bdl.metrics.functional.adaptive_ece` (equal-mass bins need every example: each one's
    top-label confidence and correctness are kept, two numbers whatever the number of classes).

    Args:
        n_bins: number of equal-mass bins.

    Example:
        >>> metric = AdaptiveECE(n_bins=2)
        >>> probs = torch.tensor([[0.95, 0.05], [0.85, 0.15], [0.25, 0.75], [0.65, 0.35]])
        >>> metric.update(probs, torch.tensor([0, 1, 1, 0]))
        >>> metric.compute()
        tensor(0.3500)
    """

    higher_is_better = False

    def __init__(self, n_bins: int = 15, **kwargs) -> None:  # noqa: ANN003
        super().__init__(("confidence", "correct"), **kwargs)
        self.n_bins = check_n_bins(n_bins)

    def update(self, probs: Tensor, target: Tensor) -> None:
        """Add a batch: ``probs`` [B, C] predictive probabilities, ``target`` [B] integer labels."""
        if empty_batch(probs, target):
            return
        confidence, correct = F._top_label(*F._checked(probs, target))
        if confidence.dtype in (torch.float16, torch.bfloat16):  # batches of several dtypes concatenate in float32
            confidence, correct = confidence.float(), correct.float()
        self._append(confidence=confidence, correct=correct)

    def compute(self) -> Tensor:
        return self._compute_with(F._adaptive_ece_of, self.n_bins)

    def extra_repr(self) -> str:
        return f"n_bins={self.n_bins}"
