"""Selective prediction: how the error falls when a model may abstain on its least confident inputs.

Inputs are a confidence per example (higher = more confident, e.g. ``Prediction.max_probability`` or
``-Prediction.predictive_entropy``) and a loss per example (for classification the 0/1 error
``predicted_class != target``, a bool tensor read as 0/1). Accepting the ``n`` most confident of ``N`` examples gives coverage
``n / N`` and selective risk ``1/n sum_{i <= n} loss_(i)`` (Geifman & El-Yaniv 2017).

Ties: examples with equal confidence cannot be told apart by any threshold, so the curve uses the
*expected* risk under a random order within each tie group: every loss in a tie group is replaced by
the group's mean loss. This makes every quantity here independent of the order of the inputs, and
equal to the plain sorted-order definition when confidences are distinct.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from ._checks import check_fraction, check_same_shape, check_vector

__all__ = ["aurc", "coverage_at_risk", "excess_aurc", "risk_at_coverage", "risk_coverage_curve"]


def _sorted_losses(confidence, loss) -> Tensor:  # noqa: ANN001
    """Losses sorted from the most to the least confident, tie groups replaced by their mean, float64."""
    confidence = check_vector(confidence, "confidence")
    loss = check_vector(loss, "loss")
    check_same_shape(confidence=confidence, loss=loss)
    if (loss < 0).any():
        raise ValueError(f"`loss` must be non-negative, got minimum {loss.min().item():.4g}")
    order = confidence.argsort(descending=True)
    confidence, loss = confidence[order], loss.to(confidence.device)[order].double()
    _, group, sizes = torch.unique_consecutive(confidence, return_inverse=True, return_counts=True)
    group_mean = torch.zeros(sizes.numel(), dtype=torch.float64, device=loss.device).index_add_(0, group, loss)
    return (group_mean / sizes)[group]


def risk_coverage_curve(confidence: Tensor, loss: Tensor) -> tuple[Tensor, Tensor]:
    """Selective risk at every coverage ``n / N``, ``n = 1..N``, accepting the most confident first.

    ``risk(n) = 1/n sum_{i <= n} loss_(i)`` with examples ordered by decreasing confidence and tie
    groups averaged (module docstring).

    Args:
        confidence: confidence per example, shape [N] (higher = more confident).
        loss: non-negative loss per example, shape [N] (0/1 error for classification).

    Returns:
        ``(coverage, risk)``, float64 tensors of shape [N]; ``coverage`` runs from ``1/N`` to 1.

    Example:
        >>> coverage, risk = risk_coverage_curve(torch.tensor([0.9, 0.6, 0.8]), torch.tensor([0.0, 1.0, 1.0]))
        >>> coverage.tolist(), risk.tolist()
        ([0.3333333333333333, 0.6666666666666666, 1.0], [0.0, 0.5, 0.6666666666666666])
    """
    losses = _sorted_losses(confidence, loss)
    accepted = torch.arange(1, losses.numel() + 1, dtype=torch.float64, device=losses.device)
    return accepted / losses.numel(), losses.cumsum(0) / accepted


def aurc(confidence: Tensor, loss: Tensor) -> Tensor:
    """Area under the risk-coverage curve, ``AURC = 1/N sum_{n=1}^N risk(n)`` (Geifman et al. 2019).

    Lower is better. It mixes how good the model is (the risk at full coverage) with how well its
    confidence ranks its errors; :func:`excess_aurc` removes the first part.

    Args:
        confidence: confidence per example, shape [N] (higher = more confident).
        loss: non-negative loss per example, shape [N].

    Returns:
        A float64 scalar tensor.

    Example:
        >>> aurc(torch.tensor([0.9, 0.6, 0.8]), torch.tensor([0.0, 1.0, 1.0]))  # (0 + 1/2 + 2/3) / 3
        tensor(0.3889, dtype=torch.float64)
    """
    return risk_coverage_curve(confidence, loss)[1].mean()


def excess_aurc(confidence: Tensor, loss: Tensor) -> Tensor:
    """AURC minus the AURC of an oracle confidence that ranks the losses perfectly ("E-AURC", Geifman et al. 2019).

    The oracle accepts the examples in increasing order of loss. 0 means the confidence orders the
    errors as well as possible. This is the exact oracle of the ``N`` examples (any losses); Geifman et
    al.'s code takes the 0/1 oracle's large-``N`` form ``r + (1 - r) ln(1 - r)`` (``r`` the error rate), which
    sits below it for small ``N``: confidences ``[0.9, 0.8, 0.7]`` with losses ``[0, 0, 1]`` have E-AURC 0
    here and 0.048 by that form.

    Args:
        confidence: confidence per example, shape [N] (higher = more confident).
        loss: non-negative loss per example, shape [N].

    Returns:
        A float64 scalar tensor >= 0.

    Example:
        >>> # the most confident example is the wrong one: AURC (1 + 1/2 + 1/3)/3, oracle (0 + 0 + 1/3)/3
        >>> excess_aurc(torch.tensor([0.9, 0.6, 0.8]), torch.tensor([1.0, 0.0, 0.0]))
        tensor(0.5000, dtype=torch.float64)
    """
    loss_tensor = check_vector(loss, "loss")
    return aurc(confidence, loss) - aurc(-loss_tensor, loss_tensor)


def risk_at_coverage(confidence: Tensor, loss: Tensor, *, coverage: float = 0.9) -> Tensor:
    """Selective risk when accepting the ``ceil(coverage * N)`` most confident examples.

    Args:
        confidence: confidence per example, shape [N] (higher = more confident).
        loss: non-negative loss per example, shape [N].
        coverage: fraction of examples to accept, in (0, 1].

    Returns:
        A float64 scalar tensor.

    Example:
        >>> risk_at_coverage(torch.tensor([0.9, 0.6, 0.8, 0.7]), torch.tensor([0.0, 1.0, 1.0, 0.0]), coverage=0.5)
        tensor(0.5000, dtype=torch.float64)
    """
    coverage = check_fraction(coverage, "coverage")
    _, risk = risk_coverage_curve(confidence, loss)
    # round: 0.9 * 10 is 9.000000000000002; at least one (a tiny coverage rounded to 0 indexed the last risk)
    accepted = max(1, math.ceil(round(coverage * risk.numel(), 9)))
    return risk[accepted - 1]


def coverage_at_risk(confidence: Tensor, loss: Tensor, *, risk: float = 0.05) -> Tensor:
    """Largest coverage ``n / N`` whose selective risk is at most ``risk``; 0 if even the top example fails.

    Args:
        confidence: confidence per example, shape [N] (higher = more confident).
        loss: non-negative loss per example, shape [N].
        risk: the largest acceptable selective risk, finite and >= 0.

    Returns:
        A float64 scalar tensor in [0, 1].

    Example:
        >>> coverage_at_risk(torch.tensor([0.9, 0.6, 0.8, 0.7]), torch.tensor([0.0, 1.0, 1.0, 0.0]), risk=0.4)
        tensor(0.7500, dtype=torch.float64)
    """
    if isinstance(risk, bool) or not isinstance(risk, numbers.Real):  # a tensor was called negative
        raise TypeError(f"`risk` must be a number, got {type(risk).__name__}")
    if not 0 <= risk < math.inf:  # NaN too; an infinite risk (coverage 1) could not be saved in a report's JSON
        raise ValueError(f"`risk` must be a finite non-negative number, got {risk!r}")
    coverage, selective_risk = risk_coverage_curve(confidence, loss)
    # a small relative slack so that a risk of exactly `risk` is not lost to float rounding
    ok = selective_risk <= risk * (1 + 1e-12) + 1e-15
    return coverage[ok].max() if ok.any() else coverage.new_zeros(())
