"""Classification metrics on predictive probabilities ``probs`` [N, C] and integer labels ``target`` [N].

All metrics take the *mean predictive* probabilities (for a Bayesian model, the Monte Carlo average
``p(y | x, D) ~ 1/S sum_s softmax(f_s(x))``, i.e. ``Prediction.probs``). Lower is better for every
metric here except :func:`accuracy`.

Binning convention (ECE, MCE, over/under-confidence, classwise ECE, reliability diagrams): ``n_bins``
equal-width bins with edges ``linspace(0, 1, n_bins + 1)``; bin ``b`` holds confidences in
``[edge_b, edge_{b+1})`` and the last bin also holds confidence exactly 1. This is torchmetrics'
``CalibrationError`` convention (``torch.bucketize(..., right=True)``) with one difference:
torchmetrics gives confidences of exactly 1 a bin of their own (``n_bins + 1`` bins in all). The ECEs
agree whenever those examples lie on the same side of the diagonal as the rest of the top bin
(triangle inequality), e.g. for a saturated, overconfident network; tests check both cases. The MCE
does not: merging the two bins averages their gaps, so bdl's MCE can be lower than torchmetrics' when
confidences of exactly 1 are present (confidences 1 and 0.95, both wrong: 0.975 against 1.0).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ._checks import check_labels, check_n_bins, check_probs

__all__ = [
    "CalibrationBins",
    "accuracy",
    "adaptive_ece",
    "brier_score",
    "calibration_bins",
    "classwise_ece",
    "ece",
    "mce",
    "nll",
    "overconfidence",
    "underconfidence",
]


def _checked(probs, target) -> tuple[Tensor, Tensor]:  # noqa: ANN001
    probs = check_probs(probs)
    target = check_labels(target, probs.shape[1], probs.shape[0])
    if probs.dtype in (torch.float16, torch.bfloat16):
        # read, and reported, in float32 (as the regression metrics are): an accuracy of 506/5000 = 0.1012 came
        # back as bfloat16's 0.1016
        probs = probs.float()
    return probs, target.to(probs.device)


def accuracy(probs: Tensor, target: Tensor) -> Tensor:
    """Fraction of examples whose most probable class is the label, ``mean(argmax_k p_nk == y_n)``.

    Ties between classes go to the lowest index (``torch.max``), as in torchmetrics.

    Args:
        probs: predictive probabilities, shape [N, C].
        target: integer labels, shape [N].

    Returns:
        A scalar tensor in [0, 1].

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]])
        >>> accuracy(probs, torch.tensor([0, 1, 1]))
        tensor(0.6667)
    """
    probs, target = _checked(probs, target)
    return (probs.argmax(dim=1) == target).to(probs.dtype).mean()


def nll(probs: Tensor, target: Tensor) -> Tensor:
    """Negative log-likelihood of the labels, ``-1/N sum_n log p_{n, y_n}`` (natural log).

    Probabilities are used as they are down to the smallest normal number of their dtype (about 1.2e-38
    in float32 and bfloat16), and raised to it below, so a probability of 0 costs a finite 87.3 nats.
    Half-precision probabilities are read, and the value given, in float32. scikit-learn's ``log_loss`` clips at the
    machine epsilon instead (1.2e-7 in float32), which caps each confident mistake at 15.9 nats and
    can understate the NLL of an overconfident model by half; the two agree on every probability
    above that epsilon.

    Args:
        probs: predictive probabilities, shape [N, C].
        target: integer labels, shape [N].

    Returns:
        A scalar tensor >= 0.

    Example:
        >>> probs = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
        >>> nll(probs, torch.tensor([0, 1]))  # (log 2 + log 4/3) / 2
        tensor(0.4904)
    """
    probs, target = _checked(probs, target)
    picked = probs.gather(1, target[:, None]).squeeze(1)
    # 0 - mean, not -mean: certain, right predictions gave -0.0, which the report printed as "-0.0000"
    return 0.0 - picked.clamp_min(torch.finfo(picked.dtype).tiny).log().mean()


def brier_score(probs: Tensor, target: Tensor) -> Tensor:
    """Multiclass Brier score, ``1/N sum_n sum_k (p_nk - [y_n = k])^2`` (Brier 1950).

    Convention: summed over classes, averaged over examples, so it lies in [0, 2]. For two classes it is
    twice the binary score ``mean((p_n1 - y_n)^2)`` of scikit-learn's ``brier_score_loss`` (the two
    classes contribute equal squared errors), and it equals ``brier_score_loss(..., scale_by_half=False)``
    for any number of classes.

    Args:
        probs: predictive probabilities, shape [N, C].
        target: integer labels, shape [N].

    Returns:
        A scalar tensor in [0, 2].

    Example:
        >>> probs = torch.tensor([[0.8, 0.2], [0.4, 0.6]])
        >>> brier_score(probs, torch.tensor([0, 0]))  # (0.04 + 0.04 + 0.36 + 0.36) / 2
        tensor(0.4000)
    """
    value, dtype = _brier_wide(probs, target)
    return value.to(dtype)


def _brier_wide(probs, target) -> tuple[Tensor, torch.dtype]:  # noqa: ANN001
    """:func:`brier_score` in float64 (the streaming metric adds the batches' values unrounded), and the dtype
    it is reported in."""
    probs, target = _checked(probs, target)
    # sum_k p_k^2 + 1 - 2 p_y would cancel for confident rows; the exact form over blocks of rows keeps the
    # [N, C] one-hot and difference (2.3 GB at 100,000 x 1,000) to a block's
    total = probs.new_zeros((), dtype=torch.float64)
    step = _block(probs.shape[1])
    for start in range(0, probs.shape[0], step):
        block = probs[start : start + step]
        one_hot = torch.nn.functional.one_hot(target[start : start + step], probs.shape[1]).to(block.dtype)
        total += (block - one_hot).square().sum(dim=1).double().sum()
    return total / probs.shape[0], probs.dtype


_BLOCK_ELEMENTS = 1 << 22


def _block(width: int) -> int:
    """Rows (or columns) of a ``width``-wide (or -tall) matrix per block of about 4M elements."""
    return max(1, _BLOCK_ELEMENTS // max(1, width))


class CalibrationBins(NamedTuple):
    """Per-bin statistics of top-label confidence (see the module docstring for the bin convention).

    Attributes:
        edges: bin edges, shape [B + 1] (float32 for half-precision probabilities).
        confidence: mean confidence in each bin, shape [B] (NaN for empty bins).
        accuracy: fraction correct in each bin, shape [B] (NaN for empty bins).
        count: number of examples in each bin, shape [B], int64.

    Example:
        >>> probs = torch.tensor([[0.95, 0.05], [0.9, 0.1], [0.4, 0.6]])
        >>> edges, confidence, accuracy, count = calibration_bins(probs, torch.tensor([0, 1, 1]), n_bins=2)
        >>> edges, confidence, count
        (tensor([0.0000, 0.5000, 1.0000]), tensor([   nan, 0.8167]), tensor([0, 3]))
    """

    edges: Tensor
    confidence: Tensor
    accuracy: Tensor
    count: Tensor


def _edges(n_bins: int, like: Tensor) -> Tensor:
    """Equal-width bin edges in the dtype of ``like``, float32 for half types: bfloat16's rounding made the
    15 "equal" widths 0.0625-0.0703."""
    dtype = torch.float32 if like.dtype in (torch.float16, torch.bfloat16) else like.dtype
    return torch.linspace(0, 1, n_bins + 1, dtype=dtype, device=like.device)


def _bin_index(values: Tensor, n_bins: int) -> Tensor:
    edges = _edges(n_bins, values)
    return (torch.bucketize(values.to(edges.dtype), edges, right=True) - 1).clamp(0, n_bins - 1)


def _bin_sums(values: Tensor, outcomes: Tensor, n_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-bin ``(count, sum of values, sum of outcomes)`` in float64; the sufficient statistics of ECE."""
    index = _bin_index(values, n_bins)
    count = torch.zeros(n_bins, dtype=torch.float64, device=values.device).index_add_(
        0, index, torch.ones_like(values, dtype=torch.float64)
    )
    value_sum = torch.zeros_like(count).index_add_(0, index, values.double())
    outcome_sum = torch.zeros_like(count).index_add_(0, index, outcomes.double())
    return count, value_sum, outcome_sum


def _top_label(probs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    confidence, predicted = probs.max(dim=1)
    return confidence, (predicted == target).to(probs.dtype)


def _gaps(count: Tensor, confidence_sum: Tensor, correct_sum: Tensor) -> tuple[Tensor, Tensor]:
    """``(weight_b, confidence_b - accuracy_b)`` for every bin; empty bins get weight 0 and gap 0."""
    occupied = count.clamp_min(1)
    gap = torch.where(count > 0, (confidence_sum - correct_sum) / occupied, torch.zeros_like(count))
    return count / count.sum(), gap


def _reduce(count: Tensor, confidence_sum: Tensor, correct_sum: Tensor, kind: str) -> Tensor:
    weight, gap = _gaps(count, confidence_sum, correct_sum)
    if kind == "ece":
        return (weight * gap.abs()).sum()
    if kind == "mce":
        return gap.abs().max()
    if kind == "overconfidence":
        return (weight * gap.clamp_min(0)).sum()
    return (weight * (-gap).clamp_min(0)).sum()  # underconfidence


def calibration_bins(probs: Tensor, target: Tensor, *, n_bins: int = 15) -> CalibrationBins:
    """Equal-width binning of the top-label confidence ``max_k p_nk`` with accuracy per bin.

    The data behind a reliability diagram and :func:`ece`.

    Args:
        probs: predictive probabilities, shape [N, C].
        target: integer labels, shape [N].
        n_bins: number of equal-width bins on [0, 1].

    Returns:
        :class:`CalibrationBins` ``(edges, confidence, accuracy, count)``.

    Example:
        >>> probs = torch.tensor([[0.95, 0.05], [0.9, 0.1], [0.4, 0.6]])
        >>> bins = calibration_bins(probs, torch.tensor([0, 1, 1]), n_bins=2)
        >>> bins.count, bins.accuracy
        (tensor([0, 3]), tensor([   nan, 0.6667]))
    """
    probs, target = _checked(probs, target)
    n_bins = check_n_bins(n_bins)
    confidence, correct = _top_label(probs, target)
    count, confidence_sum, correct_sum = _bin_sums(confidence, correct, n_bins)
    empty = count == 0
    mean_confidence = (confidence_sum / count.clamp_min(1)).masked_fill(empty, float("nan"))
    mean_accuracy = (correct_sum / count.clamp_min(1)).masked_fill(empty, float("nan"))
    edges = _edges(n_bins, probs)
    # counts as integers: in half precision they would round (bfloat16 above 256) or overflow (float16 above 65504)
    return CalibrationBins(edges, mean_confidence.to(probs.dtype), mean_accuracy.to(probs.dtype), count.round().long())


def _binned_metric(probs: Tensor, target: Tensor, n_bins: int, kind: str) -> Tensor:
    probs, target = _checked(probs, target)
    n_bins = check_n_bins(n_bins)
    confidence, correct = _top_label(probs, target)
    return _reduce(*_bin_sums(confidence, correct, n_bins), kind).to(probs.dtype)


def ece(probs: Tensor, target: Tensor, *, n_bins: int = 15) -> Tensor:
    """Expected calibration error with equal-width bins (Naeini et al. 2015; Guo et al. 2017).

    ``ECE = sum_b (n_b / N) |acc_b - conf_b|`` over bins of the top-label confidence, where ``acc_b`` is
    the fraction of correct predictions and ``conf_b`` the mean confidence in bin ``b``. Equals
    :func:`overconfidence` + :func:`underconfidence`. Matches torchmetrics' ``CalibrationError(task="multiclass", norm="l1")``
    (see the module docstring for the one binning difference), also on two classes: its ``task="binary"`` ECE
    bins class 1's probability instead, which :func:`classwise_ece` matches on two classes (up to examples on
    a bin edge; 0.183 against this top-label ECE's 0.043 for 500 examples with ``P(y = 1) = p^2``).

    Args:
        probs: predictive probabilities, shape [N, C].
        target: integer labels, shape [N].
        n_bins: number of equal-width bins on [0, 1].

    Returns:
        A scalar tensor in [0, 1].

    Example:
        >>> probs = torch.tensor([[0.95, 0.05], [0.85, 0.15], [0.25, 0.75], [0.65, 0.35]])
        >>> # bin [0.8, 1): confidence 0.9, accuracy 0.5; bin [0.6, 0.8): confidence 0.7, accuracy 1
        >>> ece(probs, torch.tensor([0, 1, 1, 0]), n_bins=5)  # 0.5 * 0.4 + 0.5 * 0.3
        tensor(0.3500)
    """
    return _binned_metric(probs, target, n_bins, "ece")


def mce(probs: Tensor, target: Tensor, *, n_bins: int = 15) -> Tensor:
    """Maximum calibration error, ``max_b |acc_b - conf_b|`` over non-empty equal-width bins (Naeini et al. 2015).

    Matches torchmetrics' ``CalibrationError(task="multiclass", norm="max")`` without confidences of exactly 1 (see the module
    docstring: torchmetrics bins those apart, and its MCE can be higher then).

    Args:
        probs: predictive probabilities, shape [N, C].
        target: integer labels, shape [N].
        n_bins: number of equal-width bins on [0, 1].

    Returns:
        A scalar tensor in [0, 1].

    Example:
        >>> probs = torch.tensor([[0.95, 0.05], [0.85, 0.15], [0.25, 0.75], [0.65, 0.35]])
        >>> mce(probs, torch.tensor([0, 1, 1, 0]), n_bins=5)
        tensor(0.4000)
    """
    return _binned_metric(probs, target, n_bins, "mce")


def overconfidence(probs: Tensor, target: Tensor, *, n_bins: int = 15) -> Tensor:
    """The part of :func:`ece` from bins where the model is overconfident, ``sum_b (n_b/N) max(conf_b - acc_b, 0)``.

    ``overconfidence + underconfidence = ECE`` and ``overconfidence - underconfidence = mean confidence -
    accuracy``: the two say in which direction a model is miscalibrated and by how much.

    Args:
        probs: predictive probabilities, shape [N, C].
        target: integer labels, shape [N].
        n_bins: number of equal-width bins on [0, 1].

    Returns:
        A scalar tensor in [0, 1].

    Example:
        >>> probs = torch.tensor([[0.95, 0.05], [0.85, 0.15], [0.25, 0.75], [0.65, 0.35]])
        >>> overconfidence(probs, torch.tensor([0, 1, 1, 0]), n_bins=5)
        tensor(0.2000)
    """
    return _binned_metric(probs, target, n_bins, "overconfidence")


def underconfidence(probs: Tensor, target: Tensor, *, n_bins: int = 15) -> Tensor:
    """The part of :func:`ece` from bins where the model is underconfident, ``sum_b (n_b/N) max(acc_b - conf_b, 0)``.

    Args:
        probs: predictive probabilities, shape [N, C].
        target: integer labels, shape [N].
        n_bins: number of equal-width bins on [0, 1].

    Returns:
        A scalar tensor in [0, 1].

    Example:
        >>> probs = torch.tensor([[0.95, 0.05], [0.85, 0.15], [0.25, 0.75], [0.65, 0.35]])
        >>> underconfidence(probs, torch.tensor([0, 1, 1, 0]), n_bins=5)
        tensor(0.1500)
    """
    return _binned_metric(probs, target, n_bins, "underconfidence")


def adaptive_ece(probs: Tensor, target: Tensor, *, n_bins: int = 15) -> Tensor:
    """Top-label ECE with equal-mass bins (Nguyen & O'Connor 2015; Nixon et al. 2019; Roelofs et al. 2022).

    Examples are sorted by confidence and split into ``n_bins`` consecutive groups whose sizes differ by at
    most one; ``ECE_em = sum_b (n_b / N) |acc_b - conf_b|`` over those groups. Less sensitive than the
    equal-width ECE to empty or sparse bins when confidences pile up near 1. Examples tied in confidence
    count with their tie group's mean accuracy, so a group that a bin boundary cuts is shared evenly and the
    value does not depend on the order of the inputs. (Breaking ties by correctness cut a calibrated group
    into an all-wrong and an all-right bin: 1000 predictions at 0.9, 90% right, scored 0.17.)

    Args:
        probs: predictive probabilities, shape [N, C].
        target: integer labels, shape [N].
        n_bins: number of bins (groups); with ``N < n_bins`` every example is its own group.

    Returns:
        A scalar tensor in [0, 1].

    Example:
        >>> probs = torch.tensor([[0.95, 0.05], [0.85, 0.15], [0.25, 0.75], [0.65, 0.35]])
        >>> adaptive_ece(probs, torch.tensor([0, 1, 1, 0]), n_bins=2)
        tensor(0.3500)
    """
    probs, target = _checked(probs, target)
    n_bins = check_n_bins(n_bins)
    return _adaptive_ece_of(*_top_label(probs, target), n_bins)


def _adaptive_ece_of(confidence: Tensor, correct: Tensor, n_bins: int) -> Tensor:
    """:func:`adaptive_ece` from each example's top-label confidence and 0/1 correctness ([N] each)."""
    ordered, order = confidence.double().sort(stable=True)
    _, tie, ties = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)
    accuracy = torch.zeros(len(ties), dtype=torch.float64, device=ordered.device).index_add_(0, tie, correct[order].double())
    gap = ordered - (accuracy / ties)[tie]  # each example's confidence less its tie group's accuracy
    # the bins as torch.tensor_split makes them (the first n % k one longer), summed by differences of the cumulative
    # sum: a Python loop over the bins took 1.7 s for 100,000 of them
    n = len(ordered)
    k = min(n_bins, n)
    sizes = torch.full((k,), n // k, dtype=torch.long, device=ordered.device)
    sizes[: n % k] += 1
    ends = sizes.cumsum(0)
    cumulative = torch.cat([gap.new_zeros(1), gap.cumsum(0)])
    total = (cumulative[ends] - cumulative[ends - sizes]).abs().sum()
    return (total / confidence.numel()).to(confidence.dtype)


def classwise_ece(probs: Tensor, target: Tensor, *, n_bins: int = 15) -> Tensor:
    """Classwise ECE (Kull et al. 2019): the equal-width ECE of every class's probability, averaged over classes.

    ``cwECE = 1/C sum_k sum_b (n_kb / N) |mean_{n in b}[y_n = k] - mean_{n in b} p_nk|``, where the bins
    ``b`` partition the probabilities ``p_nk`` of class ``k`` over all examples. Class ``k``'s term is
    torchmetrics' ``binary_calibration_error(probs[:, k], target == k)`` (up to the binning of probabilities of
    exactly 1, see the module docstring). Unlike the top-label ECE it
    also sees miscalibration of the probabilities of classes that are not predicted.

    Args:
        probs: predictive probabilities, shape [N, C].
        target: integer labels, shape [N].
        n_bins: number of equal-width bins on [0, 1].

    Returns:
        A scalar tensor in [0, 1].

    Example:
        >>> probs = torch.tensor([[0.95, 0.05], [0.85, 0.15], [0.25, 0.75], [0.65, 0.35]])
        >>> classwise_ece(probs, torch.tensor([0, 1, 1, 0]), n_bins=5)
        tensor(0.3500)
    """
    probs, target = _checked(probs, target)
    n_bins = check_n_bins(n_bins)
    count, value_sum, outcome_sum = _classwise_sums(probs, target, n_bins)
    per_class = (value_sum - outcome_sum).abs().sum(dim=1) / probs.shape[0]
    return per_class.mean().to(probs.dtype)


def _classwise_sums(probs: Tensor, target: Tensor, n_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per class and bin ``(count, sum p_nk, sum [y_n = k])``, each [C, B], in float64.

    Over blocks of classes (the bin indices and float64 copies of all N x C probabilities took 5x the
    probabilities' memory); the outcomes need only each example's true class, in the bin of its probability.
    """
    num_examples, num_classes = probs.shape
    device = probs.device
    count = torch.zeros(num_classes * n_bins, dtype=torch.float64, device=device)
    value_sum = torch.zeros_like(count)
    step = _block(num_examples)
    for start in range(0, num_classes, step):
        block = probs[:, start : start + step].contiguous()  # bucketize copies (and warns about) a strided one
        classes = torch.arange(start, start + block.shape[1], device=device)
        index = (_bin_index(block, n_bins) + n_bins * classes).reshape(-1)
        count += torch.bincount(index, minlength=count.numel()).to(torch.float64)
        value_sum.index_add_(0, index, block.reshape(-1).to(torch.float64))
    true_bins = _bin_index(probs.gather(1, target[:, None]).squeeze(1), n_bins) + n_bins * target
    outcome_sum = torch.zeros_like(count).index_add_(0, true_bins, torch.ones(num_examples, dtype=torch.float64, device=device))
    return tuple(t.view(num_classes, n_bins) for t in (count, value_sum, outcome_sum))  # type: ignore[return-value]
