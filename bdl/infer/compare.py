"""How close is an approximate posterior's predictive to a reference (MCMC) one on the same inputs."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..predict import Prediction


@dataclass(frozen=True)
class PredictiveComparison:
    """Agreement of two posterior predictives over the same N inputs, from :func:`compare_predictions`.

    Every value is a mean over the inputs (for regression over the inputs and output dimensions), except
    ``max_total_variation`` (a maximum) and ``num_inputs`` (a count). The fields of the other task are None.

    Attributes:
        task: ``"classification"`` or ``"regression"``.
        num_inputs: the number of inputs N compared.
        class_agreement: fraction of inputs whose predicted classes agree (classification).
        total_variation: mean over inputs of ``TV(p, q) = 1/2 sum_c |p_c - q_c|`` (0 = identical, 1 = disjoint).
        max_total_variation: the largest per-input total variation.
        mean_difference: mean ``|mu_a - mu_r|`` of the predictive means (regression).
        std_difference: mean ``|sigma_a - sigma_r|`` of the predictive standard deviations.
        std_ratio: mean ``sigma_a / sigma_r`` (< 1: the approximation is overconfident); 1 for an input where
            both are 0, ``inf`` where only the reference's is.
        wasserstein: mean 2-Wasserstein distance between the Gaussian predictives of each input and output
            dimension, ``sqrt((mu_a - mu_r)^2 + (sigma_a - sigma_r)^2)``.

    Example:
        >>> probs = torch.tensor([[[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]]])  # 1 sample, 3 inputs, 2 classes
        >>> other = torch.tensor([[[0.8, 0.2], [0.4, 0.6], [0.2, 0.8]]])
        >>> comparison = compare_predictions(bdl.Prediction.from_probs(probs), bdl.Prediction.from_probs(other))
        >>> print(comparison)
        task=classification, num_inputs=3, class_agreement=0.6667, total_variation=0.1, max_total_variation=0.2
    """

    task: str
    num_inputs: int
    class_agreement: Optional[float] = None
    total_variation: Optional[float] = None
    max_total_variation: Optional[float] = None
    mean_difference: Optional[float] = None
    std_difference: Optional[float] = None
    std_ratio: Optional[float] = None
    wasserstein: Optional[float] = None

    def as_dict(self) -> dict:
        """The non-empty fields as a dict."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def __str__(self) -> str:
        return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.as_dict().items())


def compare_predictions(approximate: "Prediction", reference: "Prediction") -> PredictiveComparison:
    """Compare an approximate posterior predictive (VI, dropout, ...) with a reference (MCMC) one.

    Both predictions must be on the same inputs in the same order. For classification the predictive
    distributions are compared by total variation and predicted-class agreement; for regression by the
    differences of predictive means and standard deviations (``sqrt`` of the total variance) and the
    2-Wasserstein distance between the Gaussian approximations of the predictives.

    Args:
        approximate: the :class:`bdl.Prediction` of the approximation.
        reference: the :class:`bdl.Prediction` of the reference (e.g. ``bdl.mcmc(...).prediction``).

    Returns:
        a :class:`PredictiveComparison`.

    Example:
        >>> probs = torch.softmax(torch.randn(8, 5, 3), dim=-1)
        >>> reference = bdl.Prediction.from_probs(probs)
        >>> compare_predictions(reference, reference).total_variation
        0.0
    """
    for name, value in (("approximate", approximate), ("reference", reference)):
        if not hasattr(value, "task"):
            raise TypeError(f"{name} must be a bdl.Prediction, got {type(value).__name__}")
    if approximate.task != reference.task:
        raise ValueError(f"the predictions are of different tasks: approximate={approximate.task!r}, reference={reference.task!r}")
    if len(approximate) == 0 or len(reference) == 0:  # a raw torch error (classification) or NaN fields (regression)
        raise ValueError(f"no inputs to compare: approximate has {len(approximate)}, reference {len(reference)}")
    if approximate.task == "classification":
        p, q = approximate.probs, reference.probs.to(approximate.probs.device)
        if p.shape != q.shape:
            raise ValueError(f"probs must have the same shape [N, C], got approximate {tuple(p.shape)} and reference {tuple(q.shape)}")
        tv = 0.5 * (p - q).abs().sum(dim=-1)
        agreement = (p.argmax(dim=-1) == q.argmax(dim=-1)).double().mean()
        return PredictiveComparison(
            task="classification",
            num_inputs=p.shape[0],
            class_agreement=float(agreement),
            total_variation=float(tv.mean()),
            max_total_variation=float(tv.max()),
        )
    mu_a, mu_r = approximate.mean, reference.mean.to(approximate.mean.device)
    if mu_a.shape != mu_r.shape:
        raise ValueError(f"means must have the same shape [N, D], got approximate {tuple(mu_a.shape)} and reference {tuple(mu_r.shape)}")
    sd_a = approximate.total_variance.clamp_min(0).sqrt()
    sd_r = reference.total_variance.to(sd_a.device).clamp_min(0).sqrt()
    return PredictiveComparison(
        task="regression",
        num_inputs=mu_a.shape[0],
        mean_difference=float((mu_a - mu_r).abs().mean()),
        std_difference=float((sd_a - sd_r).abs().mean()),
        # a reference std of 0 (a mean-only prediction): clamped to float's tiny, identical predictives read 0
        # ("overconfident") and one such input among ratios of 1 gave 1.7e37
        std_ratio=float(torch.where(sd_r > 0, sd_a / sd_r, torch.where(sd_a > 0, torch.inf, 1.0)).mean()),
        wasserstein=float(((mu_a - mu_r).square() + (sd_a - sd_r).square()).sqrt().mean()),
    )
