"""Out-of-distribution (OOD) detection metrics, and OOD scores computed from a ``Prediction``.

Convention throughout: a **higher score means more OOD**. The metrics take the scores of the
in-distribution inputs (``scores_in`` [N_in]) and of the OOD inputs (``scores_out`` [N_out]) and treat
OOD as the positive class, so a perfect detector has AUROC 1, AUPR-out 1, AUPR-in 1 and FPR@95%TPR 0,
and a detector that ignores its input has AUROC 0.5.

The ranking metrics are computed here in float64 rather than with torchmetrics' ``binary_auroc``:
that function passes scores outside [0, 1] through a sigmoid, which in float32 maps every score above
about 17 to exactly 1 and so turns, for example, large energies or logits into ties.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from ..._warn import user_stacklevel
from ._checks import check_fraction, check_vector, percent_key

__all__ = [
    "LOGIT_SCORES",
    "OOD_SCORES",
    "aupr_in",
    "aupr_out",
    "auroc",
    "fpr_at_tpr",
    "ood_metrics",
    "ood_roc_curve",
    "ood_score",
    "scores_for_task",
]


def _checked(scores_in, scores_out) -> tuple[Tensor, Tensor]:  # noqa: ANN001
    _warn_if_labels_first(scores_in, scores_out)
    scores_in = check_vector(scores_in, "scores_in", allow_empty=True)
    scores_out = check_vector(scores_out, "scores_out", allow_empty=True)
    if scores_in.numel() == 0 or scores_out.numel() == 0:
        raise ValueError(
            "OOD metrics need both sides: got "
            f"{scores_in.numel()} in-distribution scores and {scores_out.numel()} OOD scores"
        )
    return scores_in.double(), scores_out.to(scores_in.device).double()


def _warn_if_labels_first(scores_in: object, scores_out: object) -> None:
    """Warn where the call looks like scikit-learn's ``(y_true, scores)``: integer 0/1 labels of both kinds, then as
    many float scores (``auroc(is_out, scores)`` gave 0.5 or so, read as two sets of scores, without a word)."""

    def kind(value: object) -> Optional[str]:  # "i" for integers (bools too), "f" for floats; read off the dtype alone
        if isinstance(value, Tensor):
            return None if value.is_meta else "f" if value.is_floating_point() else None if value.is_complex() else "i"
        if isinstance(value, (np.ndarray, list, tuple)):
            dtype = np.asarray(value).dtype.kind
            return "i" if dtype in "biu" else "f" if dtype == "f" else None
        return None

    try:  # a hint only: inputs it cannot read are left to the metric's own checks and their errors
        if kind(scores_in) != "i" or kind(scores_out) != "f":
            return
        labels = torch.as_tensor(np.asarray(scores_in) if not isinstance(scores_in, Tensor) else scores_in)
        if labels.dim() != 1 or labels.shape != torch.Size(np.shape(scores_out)) or len(labels) < 2:
            return
        both = set(torch.unique(labels.detach()).tolist()) == {0, 1}  # integer labels beside float scores: rare
    except Exception:  # noqa: BLE001 - numpy's and torch's errors of ragged lists, tensors that need grad...
        return
    if both:
        warnings.warn(
            "the OOD metrics take (scores_in, scores_out), two sets of scores (higher = more OOD), not scikit-learn's "
            "(labels, scores): scores_in here is 0/1 integer labels beside as many float scores; for labels is_out "
            "and scores s, pass (s[is_out == 0], s[is_out == 1])",
            UserWarning,
            stacklevel=user_stacklevel(),
        )


def _labelled(scores_in: Tensor, scores_out: Tensor) -> tuple[Tensor, Tensor]:
    scores = torch.cat([scores_in, scores_out])
    is_out = torch.cat([torch.zeros_like(scores_in), torch.ones_like(scores_out)])
    return scores, is_out


def _descending(scores: Tensor, positive: Tensor) -> tuple[Tensor, Tensor]:
    order = scores.argsort(descending=True)
    return scores[order], positive[order]


def _ascending_negated(scores: Tensor, positive: Tensor) -> tuple[Tensor, Tensor]:
    """``_descending(-scores, 1 - positive)`` of descending ``scores``, without sorting again."""
    return -scores.flip(0), 1 - positive.flip(0)


def _curve_counts(scores: Tensor, positive: Tensor) -> tuple[Tensor, Tensor]:
    """Cumulative (true positives, false positives) when predicting positive for ``score >= t``.

    ``scores`` are sorted from the highest down (:func:`_descending`); one entry per distinct score ``t``, so tied
    scores move together.
    """
    last_of_run = torch.ones_like(scores, dtype=torch.bool)
    last_of_run[:-1] = scores[1:] != scores[:-1]
    true_positives = positive.cumsum(0)[last_of_run]
    false_positives = (1 - positive).cumsum(0)[last_of_run]
    return true_positives, false_positives


def _roc(scores: Tensor, positive: Tensor) -> tuple[Tensor, Tensor]:
    true_positives, false_positives = _curve_counts(scores, positive)
    zero = scores.new_zeros(1)
    tpr = torch.cat([zero, true_positives / true_positives[-1]])
    fpr = torch.cat([zero, false_positives / false_positives[-1]])
    return fpr, tpr


def _auroc(scores: Tensor, positive: Tensor) -> Tensor:
    fpr, tpr = _roc(scores, positive)
    return torch.trapezoid(tpr, fpr)


def _average_precision(scores: Tensor, positive: Tensor) -> Tensor:
    true_positives, false_positives = _curve_counts(scores, positive)
    precision = true_positives / (true_positives + false_positives)
    recall = true_positives / true_positives[-1]
    recall_step = torch.diff(recall, prepend=recall.new_zeros(1))
    return (recall_step * precision).sum()


def ood_roc_curve(scores_in: Tensor, scores_out: Tensor) -> tuple[Tensor, Tensor]:
    """ROC curve of OOD detection with OOD as the positive class (higher score = more OOD).

    Args:
        scores_in: scores of in-distribution inputs, shape [N_in].
        scores_out: scores of OOD inputs, shape [N_out].

    Returns:
        ``(fpr, tpr)``, float64 tensors of equal length starting at (0, 0) and ending at (1, 1): the
        fraction of in-distribution (false positive rate) and of OOD (true positive rate) inputs with
        score ``>= t`` for every distinct score ``t``, from the highest down.

    Example:
        >>> fpr, tpr = ood_roc_curve(torch.tensor([0.1, 0.4]), torch.tensor([0.35, 0.8]))
        >>> fpr.tolist(), tpr.tolist()
        ([0.0, 0.0, 0.5, 0.5, 1.0], [0.0, 0.5, 0.5, 1.0, 1.0])
    """
    return _roc(*_descending(*_labelled(*_checked(scores_in, scores_out))))


def auroc(scores_in: Tensor, scores_out: Tensor) -> Tensor:
    """Area under the ROC curve for separating OOD (positive) from in-distribution inputs.

    ``AUROC = P(s_out > s_in) + 1/2 P(s_out = s_in)`` for a random OOD and a random in-distribution
    input (the Mann-Whitney statistic); equals scikit-learn's ``roc_auc_score(is_out, scores)``.
    Higher score = more OOD; 1 is perfect, 0.5 is chance.

    Args:
        scores_in: scores of in-distribution inputs, shape [N_in], N_in >= 1.
        scores_out: scores of OOD inputs, shape [N_out], N_out >= 1.

    Returns:
        A float64 scalar tensor in [0, 1].

    Example:
        >>> auroc(torch.tensor([0.1, 0.4]), torch.tensor([0.35, 0.8]))
        tensor(0.7500, dtype=torch.float64)
    """
    return _auroc(*_descending(*_labelled(*_checked(scores_in, scores_out))))


def aupr_out(scores_in: Tensor, scores_out: Tensor) -> Tensor:
    """Area under the precision-recall curve with OOD inputs as the positive class ("AUPR-out").

    Computed as average precision, ``AP = sum_t (R_t - R_{t-1}) P_t`` over distinct thresholds on the
    score (no interpolation), which is scikit-learn's ``average_precision_score(is_out, scores)``.
    Chance level is the fraction of OOD inputs, ``N_out / (N_in + N_out)``.

    Args:
        scores_in: scores of in-distribution inputs, shape [N_in] (higher = more OOD).
        scores_out: scores of OOD inputs, shape [N_out].

    Returns:
        A float64 scalar tensor in [0, 1].

    Example:
        >>> aupr_out(torch.tensor([0.1, 0.4]), torch.tensor([0.35, 0.8]))  # (1 + 2/3) / 2
        tensor(0.8333, dtype=torch.float64)
    """
    return _average_precision(*_descending(*_labelled(*_checked(scores_in, scores_out))))


def aupr_in(scores_in: Tensor, scores_out: Tensor) -> Tensor:
    """Area under the precision-recall curve with in-distribution inputs as the positive class ("AUPR-in").

    Average precision of detecting *in-distribution* inputs by the negated score, i.e.
    ``average_precision_score(is_in, -scores)``. Chance level is ``N_in / (N_in + N_out)``.

    Args:
        scores_in: scores of in-distribution inputs, shape [N_in] (higher = more OOD).
        scores_out: scores of OOD inputs, shape [N_out].

    Returns:
        A float64 scalar tensor in [0, 1].

    Example:
        >>> aupr_in(torch.tensor([0.1, 0.4]), torch.tensor([0.35, 0.8]))  # (1 + 2/3) / 2
        tensor(0.8333, dtype=torch.float64)
    """
    return _average_precision(*_ascending_negated(*_descending(*_labelled(*_checked(scores_in, scores_out)))))


def fpr_at_tpr(scores_in: Tensor, scores_out: Tensor, *, tpr: float = 0.95) -> Tensor:
    """False positive rate at a true positive rate of ``tpr`` ("FPR@95%TPR" for the default).

    Convention (papers differ): the *positives* here are the **in-distribution** inputs, which a
    detector should accept. The threshold ``t`` is the smallest in-distribution score such that at least
    a fraction ``tpr`` of in-distribution inputs have ``score <= t`` (are accepted), i.e. the
    ``ceil(tpr * N_in)``-th smallest in-distribution score; the result is the fraction of **OOD inputs
    accepted as in-distribution**, ``mean(scores_out <= t)`` (OOD inputs tied with ``t`` count as
    accepted). Lower is better; 0 is perfect. This is OpenOOD's (scikit-learn's ``roc_curve`` with the
    in-distribution inputs positive, at the first TPR >= ``tpr``); Hendrycks et al.'s ``fpr_and_fdr_at_recall``
    takes the recall closest to ``tpr``, which can be the threshold one in-distribution score lower (the
    OOD inputs between the two then make the difference), and torch-uncertainty's ``FPRx`` makes the OOD
    inputs the positives, another quantity.

    Args:
        scores_in: scores of in-distribution inputs, shape [N_in] (higher = more OOD).
        scores_out: scores of OOD inputs, shape [N_out].
        tpr: fraction of in-distribution inputs to accept, in (0, 1].

    Returns:
        A float64 scalar tensor in [0, 1].

    Example:
        >>> scores_in = torch.arange(20.0)  # accept 19 of 20: threshold t = 18
        >>> fpr_at_tpr(scores_in, torch.tensor([5.0, 18.0, 18.5, 30.0]))  # 5 and 18 are accepted
        tensor(0.5000, dtype=torch.float64)
    """
    return _fpr_at_tpr(*_checked(scores_in, scores_out), check_fraction(tpr, "tpr"))


def _fpr_at_tpr(scores_in: Tensor, scores_out: Tensor, tpr: float) -> Tensor:
    # round: 0.95 * 20 is 19.000000000000004; at least one (a tiny tpr rounded to 0 indexed the last score)
    rank = max(1, math.ceil(round(tpr * scores_in.numel(), 9)))
    threshold = scores_in.kthvalue(rank).values  # the rank-th smallest, without sorting every score
    return (scores_out <= threshold).double().mean()


def ood_metrics(scores_in: Tensor, scores_out: Tensor, *, tpr: float = 0.95) -> dict[str, float]:
    """All OOD metrics for one score: ``{"auroc", "aupr_in", "aupr_out", "fpr_at_95_tpr"}``.

    The last key is named after ``tpr`` (``fpr_at_90_tpr`` for ``tpr=0.9``). Higher score = more OOD.

    Args:
        scores_in: scores of the in-distribution inputs, shape [N].
        scores_out: scores of the OOD inputs, shape [M].
        tpr: fraction of in-distribution inputs accepted for the FPR, in (0, 1].

    Returns:
        ``{name: value}`` as Python floats.

    Example:
        >>> ood_metrics(torch.tensor([0.1, 0.2]), torch.tensor([0.9]))["auroc"]
        1.0
    """
    tpr = check_fraction(tpr, "tpr")  # before the key is formatted from it
    percent = percent_key(tpr)
    scores_in, scores_out = _checked(scores_in, scores_out)
    scores, is_out = _descending(*_labelled(scores_in, scores_out))  # one sort serves the three curves
    return {
        "auroc": _auroc(scores, is_out).item(),
        "aupr_in": _average_precision(*_ascending_negated(scores, is_out)).item(),
        "aupr_out": _average_precision(scores, is_out).item(),
        f"fpr_at_{percent}_tpr": _fpr_at_tpr(scores_in, scores_out, tpr).item(),
    }


# --- OOD scores from a Prediction (higher = more OOD) ---


LOGIT_SCORES = ("energy", "max_logit")
"""Scores that need ``Prediction.logits`` (absent when a Prediction was built from probabilities)."""


def _needs_logits(prediction, name: str) -> Tensor:  # noqa: ANN001
    logits = getattr(prediction, "logits", None)
    if logits is None:
        raise ValueError(
            f"OOD score {name!r} needs logits, but this Prediction has none (it was built from probabilities); "
            f"use one of {[key for key in scores_for_task('classification') if key not in LOGIT_SCORES]}"
        )
    return logits


def _max_probability_score(prediction) -> Tensor:  # noqa: ANN001
    return 1 - prediction.max_probability


def _energy_score(prediction) -> Tensor:  # noqa: ANN001
    return -torch.logsumexp(_needs_logits(prediction, "energy"), dim=-1)


def _max_logit_score(prediction) -> Tensor:  # noqa: ANN001
    return -_needs_logits(prediction, "max_logit").max(dim=-1).values


def _per_input(variance: Tensor) -> Tensor:
    return variance.reshape(variance.shape[0], -1).mean(dim=1)


OOD_SCORES: dict[str, Callable[..., Tensor]] = {
    "max_probability": _max_probability_score,
    "predictive_entropy": lambda prediction: prediction.predictive_entropy,
    "mutual_information": lambda prediction: prediction.mutual_information,
    "energy": _energy_score,
    "max_logit": _max_logit_score,
    "total_variance": lambda prediction: _per_input(prediction.total_variance),
    "epistemic_variance": lambda prediction: _per_input(prediction.epistemic_variance),
}
"""Registry of OOD scores of a ``Prediction``, each oriented so that higher = more OOD.

Classification:

- ``"max_probability"``: ``1 - max_k p_k`` (Hendrycks & Gimpel 2017's maximum softmax probability, negated);
- ``"predictive_entropy"``: total uncertainty ``H[E_theta p(y|x, theta)]``;
- ``"mutual_information"``: epistemic uncertainty ``H[E p] - E H[p]`` (zero for a deterministic model);
- ``"energy"``: ``E(x) = -logsumexp_k f_k(x)`` of the (sample-averaged) logits (Liu et al. 2020);
- ``"max_logit"``: ``-max_k f_k(x)`` (Hendrycks et al. 2022). The last two need ``Prediction.logits``.

Regression (averaged over output dimensions):

- ``"total_variance"``: aleatoric + epistemic predictive variance;
- ``"epistemic_variance"``: variance of the Monte Carlo means (zero for a deterministic model).
"""

_SCORE_TASKS = {
    "max_probability": "classification", "predictive_entropy": "classification",
    "mutual_information": "classification", "energy": "classification", "max_logit": "classification",
    "total_variance": "regression", "epistemic_variance": "regression",
}


def scores_for_task(task: str) -> list[str]:
    """Names of the :data:`OOD_SCORES` that apply to ``task`` (``"classification"`` or ``"regression"``).

    Example:
        >>> scores_for_task("regression")
        ['total_variance', 'epistemic_variance']
    """
    if task not in ("classification", "regression"):
        raise ValueError(f"`task` must be 'classification' or 'regression', got {task!r}")
    return [name for name in OOD_SCORES if _SCORE_TASKS[name] == task]


def ood_score(prediction, name: str = "max_probability") -> Tensor:  # noqa: ANN001
    """One OOD score per input of a ``Prediction``; higher means more OOD.

    Args:
        prediction: a :class:`bdl.Prediction`.
        name: a key of :data:`OOD_SCORES` for the prediction's task (classification:
            ``"max_probability"``, ``"predictive_entropy"``, ``"mutual_information"``, ``"energy"``,
            ``"max_logit"``; regression: ``"total_variance"``, ``"epistemic_variance"``).

    Returns:
        Scores, shape [N].

    Example:
        >>> from bdl import Prediction
        >>> prediction = Prediction.from_logits(torch.tensor([[[4.0, 0.0], [0.1, 0.0]]]))
        >>> ood_score(prediction, "max_probability")  # the second input is the less certain one
        tensor([0.0180, 0.4750])
    """
    if not isinstance(name, str) or name not in OOD_SCORES:
        raise ValueError(f"unknown OOD score {name!r}; choose one of {sorted(OOD_SCORES)}")
    task = getattr(prediction, "task", None)
    if task != _SCORE_TASKS[name]:
        raise ValueError(
            f"OOD score {name!r} needs a {_SCORE_TASKS[name]} Prediction, got task={task!r}; "
            f"scores for {task!r}: {scores_for_task(task) if task in ('classification', 'regression') else []}"
        )
    return OOD_SCORES[name](prediction)
