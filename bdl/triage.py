"""Route uncertain inputs to human review, with a threshold chosen on validation data.

Selective prediction (Geifman & El-Yaniv, 2017): the model handles the inputs whose uncertainty score
is at most a threshold and defers the rest. The threshold is set for a target *coverage* (fraction of
inputs handled automatically) or a target *error rate* among the handled inputs, measured on labelled
validation data, then applied to new predictions.
"""

from __future__ import annotations

import decimal
import math
import numbers
import warnings
from fractions import Fraction
from typing import Callable, NamedTuple, Optional, Union

import torch
from torch import Tensor

from ._warn import user_stacklevel
from .metrics.functional._checks import as_class_labels, as_tensor, check_labels, targets_like
from .metrics.functional.ood import OOD_SCORES, ood_score, scores_for_task
from .predict import Prediction, outputs_shape

DEFAULT_SCORES = {"classification": "predictive_entropy", "regression": "total_variance"}


class Triage(NamedTuple):
    """Outcome of :func:`triage` on a prediction for ``N`` inputs.

    Attributes:
        review: bool ``[N]``, True for the inputs to route to a person (score above ``threshold``).
        threshold: the uncertainty above which inputs are reviewed (``-inf``: review everything).
        coverage: fraction of the ``N`` inputs handled automatically.
        error_rate: error rate among the automatically handled inputs, when the prediction has targets
            (and, for regression, a ``tolerance``); else None (also when nothing is handled).

    Example:
        >>> pred = bdl.Prediction.from_probs(torch.tensor([[[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]]]))
        >>> result = bdl.triage(pred, threshold=0.6)  # predictive entropy above 0.6 nats goes to review
        >>> result.review, result.coverage
        (tensor([False,  True, False]), 0.6666666666666666)
    """

    review: Tensor
    threshold: float
    coverage: float
    error_rate: Optional[float]


def _scores(prediction: Prediction, score: Union[str, Callable[[Prediction], Tensor], None], name: str) -> Tensor:
    if not isinstance(prediction, Prediction):
        raise TypeError(f"{name} must be a bdl.Prediction, got {type(prediction).__name__}")
    if score is None:
        score = DEFAULT_SCORES[prediction.task]
    if callable(score):
        values = score(prediction)
        if not isinstance(values, Tensor):  # a numpy array of the right shape was refused for its shape
            raise TypeError(f"score must return a torch.Tensor of shape [{len(prediction)}], got {type(values).__name__}")
        if values.shape != (len(prediction),):
            raise ValueError(f"score must return one value per input [{len(prediction)}], got shape {tuple(values.shape)}")
        if not values.is_floating_point():  # a bool or int score failed in searchsorted
            values = values.to(torch.float64)
        return _finite_scores(values, name)
    if not isinstance(score, str) or score not in OOD_SCORES:
        raise ValueError(f"score must be a callable or one of {scores_for_task(prediction.task)}, got {score!r}")
    try:
        values = ood_score(prediction, score)
    except ValueError as error:  # "this Prediction has no logits": say which one
        raise ValueError(f"{name}: {error}") from None
    return _finite_scores(values, name)


def _finite_scores(values: Tensor, name: str) -> Tensor:
    # a NaN score compares False with every threshold: that input would be handled automatically, unreviewed
    if not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).sum())
        raise ValueError(f"the uncertainty scores of {name} must be finite, got {bad} NaN/Inf of {values.numel()}")
    return values


def _errors(prediction: Prediction, tolerance: Optional[float], name: str) -> Optional[Tensor]:
    """Bool ``[N]`` of wrong predictions (None without targets)."""
    targets = prediction.targets
    if targets is None:
        return None
    if prediction.task == "classification":
        # labels out of range or fractional counted every input wrong, and everything went to review
        # a numpy array or a list of labels failed in as_class_labels ("'numpy.ndarray' object has no attribute ...")
        targets = as_class_labels(as_tensor(targets, f"{name}.targets"))
        targets = check_labels(targets, prediction.probs.shape[-1], len(prediction), f"{name}.targets")
        return prediction.predicted_class != targets.to(prediction.probs.device)
    if tolerance is None:
        return None
    targets = targets_like(targets, prediction.mean, f"{name}.targets")  # NaN counted as right; [D, N] paired wrongly
    return ((targets - prediction.mean).abs() > tolerance).reshape(len(prediction), -1).any(-1)


def _real(value: object, exact: bool = False) -> Optional[float]:
    """``value`` as a float when it is one real number: a Python, numpy or ``Decimal`` number, or a 0-d tensor or
    array of a real dtype (not a bool), read as given (:func:`_as_given`: a target typed as a decimal) or, with
    ``exact``, as its exact value (a threshold: a score's own value); None for anything else."""
    if isinstance(value, bool):
        return None
    if not isinstance(value, (numbers.Real, decimal.Decimal)):
        dtype = str(getattr(value, "dtype", "")).removeprefix("torch.")
        if getattr(value, "shape", None) != () or not dtype.startswith(("float", "int", "uint", "bfloat")):
            return None
    return float(value) if exact else _as_given(value)


def _as_given(value: numbers.Real) -> float:
    """A target as the decimal number it was written as: a float32 (or float16, bfloat16) one, numpy's from an array or a config, is
    read by its shortest decimal form, so ``np.float32(0.7)`` is 0.7 and not 0.69999999 (which handled 699 of 1000
    inputs, not 700); any other as ``float``."""
    value_float = float(value)
    dtype = str(getattr(value, "dtype", "")).removeprefix("torch.")
    narrow = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype)
    if narrow is None:
        return value_float
    for digits in range(1, 10):  # 9 significant digits identify every float32 (and every narrower float)
        decimal = float(f"{value_float:.{digits}g}")
        if torch.tensor(decimal, dtype=narrow).item() == value_float:
            return decimal
    return value_float


def _as_fraction(value: float, inputs: int = 1) -> Fraction:
    """The fraction ``value`` stands for: the simplest with a denominator up to ``max(10^6, inputs)`` that is the
    same float (2/3, which as its decimal 0.6666666666666666 handled 199 of 300 inputs; k/n of n inputs), else its
    shortest decimal, exactly (0.7 * 41943050 in floats is one short; 0.9999999999 is not 1, which rounding the
    product took it for)."""
    decimal = Fraction(repr(value))
    simple = decimal.limit_denominator(max(10**6, inputs))
    return simple if float(simple) == value else decimal


def _threshold_for_coverage(scores: Tensor, coverage: float) -> float:
    """The largest threshold that handles at most ``coverage`` of the inputs (ties are kept together)."""
    ordered = scores.sort().values
    count = math.floor(_as_fraction(coverage, len(ordered)) * len(ordered))
    if 0 < count < len(ordered) and ordered[count] == ordered[count - 1]:
        # a threshold between tied scores does not exist: handle fewer, up to the first of the run (found by
        # bisection: stepping back one at a time took 1.4 s at 200,000 inputs with 95% of the scores tied)
        count = int(torch.searchsorted(ordered, ordered[count - 1 : count]))
    return ordered[count - 1].item() if count > 0 else -math.inf


def _threshold_for_error_rate(scores: Tensor, errors: Tensor, error_rate: float) -> float:
    """The largest threshold whose handled inputs have an error rate at most ``error_rate``."""
    order = scores.argsort()
    ordered, wrong = scores[order], errors[order].to(torch.float64)
    risk = wrong.cumsum(0) / torch.arange(1, len(ordered) + 1, dtype=torch.float64, device=wrong.device)
    # only cut after the last of a run of tied scores
    cut = torch.ones_like(ordered, dtype=torch.bool)
    cut[:-1] = ordered[1:] != ordered[:-1]
    allowed = (risk <= error_rate + 1e-12) & cut
    if not allowed.any():
        return -math.inf
    last = int(allowed.nonzero().max())
    return ordered[last].item()


def triage(
    prediction: Prediction,
    *,
    score: Union[str, Callable[[Prediction], Tensor], None] = None,
    threshold: Optional[float] = None,
    coverage: Optional[float] = None,
    error_rate: Optional[float] = None,
    validation: Optional[Prediction] = None,
    tolerance: Optional[float] = None,
) -> Triage:
    """Which inputs to route to human review: those whose uncertainty score exceeds a threshold.

    Give exactly one of ``threshold`` (used as is), ``coverage`` (the threshold that handles at most
    that fraction of the ``validation`` inputs automatically) or ``error_rate`` (the threshold that
    handles the most ``validation`` inputs while their error rate stays at most ``error_rate``). The
    threshold is chosen on ``validation`` (default: ``prediction`` itself, which then needs targets
    for ``error_rate``) and applied to ``prediction``. Inputs with tied scores are always handled
    together, so the achieved coverage can be below the target. Where no threshold meets the target (a tie at
    the cut takes in every input, or even the most certain input is wrong), the threshold is ``-inf``: every input
    goes to review, with a warning. A chosen threshold is one of the validation scores: with ``coverage=1`` it is
    the largest, so new inputs more uncertain than every validation input still go to review.

    The targets hold on ``validation``; on new inputs they are estimates, with the sampling error of a
    fraction of ``len(validation)`` inputs. An ``error_rate`` target is met on new data somewhat less often
    than not: the threshold handling the *most* validation inputs at that rate sits where the validation
    errors happen to be few. For a margin, set a lower target or use a larger validation set.

    Errors are wrong predicted classes; for regression an input is wrong when ``|y - mean|`` exceeds
    ``tolerance`` in any output dimension.

    Args:
        prediction: the :class:`bdl.Prediction` to triage.
        score: name of an uncertainty score (higher = more uncertain; classification:
            ``"predictive_entropy"`` (default), ``"mutual_information"``, ``"max_probability"`` (uses
            ``1 - max p``, exactly 0 in float32 for every input with a logit gap above about 17: all tied), ``"energy"``, ``"max_logit"``; regression: ``"total_variance"`` (default),
            ``"epistemic_variance"``, averaged over the output dimensions; see
            :data:`bdl.metrics.functional.OOD_SCORES`), or a function
            ``Prediction -> [N]``.
        threshold: a fixed threshold.
        coverage: target fraction handled automatically, in (0, 1].
        error_rate: target error rate among the handled inputs, in [0, 1).
        validation: labelled :class:`bdl.Prediction` (``targets`` set, e.g. by predicting on a
            DataLoader of ``(x, y)``) to choose the threshold on.
        tolerance: absolute error above which a regression prediction counts as wrong.

    Returns:
        :class:`Triage` ``(review, threshold, coverage, error_rate)`` for ``prediction``.

    Example:
        >>> net = bdl.MCDropout(nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3)))
        >>> x_val, y_val = torch.randn(200, 4), torch.randint(0, 3, (200,))
        >>> validation = bdl.predict(net, (x_val, y_val), num_samples=30)
        >>> pred = bdl.predict(net, torch.randn(50, 4), num_samples=30)
        >>> result = bdl.triage(pred, validation=validation, coverage=0.8)
        >>> result.review.shape, result.review.dtype
        (torch.Size([50]), torch.bool)
    """
    chosen = [name for name, value in (("threshold", threshold), ("coverage", coverage), ("error_rate", error_rate)) if value is not None]
    if len(chosen) != 1:
        raise ValueError(f"give exactly one of threshold, coverage, error_rate; got {chosen or 'none'}")
    if tolerance is not None:
        given, tolerance = tolerance, _real(tolerance)
        if tolerance is None or not tolerance >= 0:
            raise ValueError(f"tolerance must be a number >= 0, got {given!r}")
    if tolerance is not None and getattr(prediction, "task", None) == "classification":  # it was ignored
        raise ValueError("tolerance is for regression predictions (an absolute error); a classification's errors are wrong classes")
    scores = _scores(prediction, score, "prediction")
    if len(scores) == 0:
        raise ValueError("prediction has no inputs: nothing to triage")
    reference = prediction if validation is None else validation
    if validation is not None:
        if not isinstance(validation, Prediction):
            raise TypeError(f"validation must be a bdl.Prediction (bdl.predict on labelled data), got {type(validation).__name__}")
        if validation.task != prediction.task:
            raise ValueError(f"validation is a {validation.task} prediction, prediction a {prediction.task} one")
        # a threshold on another model's scores (3 against 7 classes: entropies of another scale) means nothing here
        ours, theirs = outputs_shape(prediction), outputs_shape(validation)
        if ours != theirs:
            raise ValueError(f"validation predicts outputs of shape {theirs} per input, prediction {ours}: predict both with the same model")
        if len(validation) == 0 and threshold is None:  # no threshold can be chosen: everything went to review
            raise ValueError("validation has no inputs: a threshold cannot be chosen on it")
    if threshold is not None:
        chosen_threshold = _real(threshold, exact=True)  # np.float32(score) is that score, not its decimal form
        if chosen_threshold is None or math.isnan(chosen_threshold):
            raise ValueError(f"threshold must be a number, got {threshold!r}")
    elif coverage is not None:
        target = _real(coverage)
        if target is None or not 0 < target <= 1:
            raise ValueError(f"coverage must be a number in (0, 1], got {coverage!r}")
        chosen_threshold = _threshold_for_coverage(_scores(reference, score, "validation"), target)
    else:
        target = _real(error_rate)
        if target is None or not 0 <= target < 1:
            raise ValueError(f"error_rate must be a number in [0, 1), got {error_rate!r}")
        name = "prediction" if validation is None else "validation"
        errors = _errors(reference, tolerance, name)
        if errors is None:
            if reference.task == "classification" or reference.targets is None:
                raise ValueError(f"error_rate needs {name} with targets (set {name}.targets, and pass tolerance= for regression)")
            raise ValueError("error_rate on a regression needs a tolerance (the absolute error above which a prediction is wrong)")
        reference_scores = _scores(reference, score, name)
        chosen_threshold = _threshold_for_error_rate(reference_scores, errors.to(reference_scores.device), target)
    if threshold is None and chosen_threshold == -math.inf:  # documented, but easily taken for a working triage
        inputs = f"the {len(reference)} {'validation' if validation is not None else 'prediction'} inputs"
        why = (
            f"coverage={target:g} of {inputs} handles none (under one input, or tied scores at the cut, which are "
            "handled together: a model without epistemic uncertainty scores every input alike)"
            if coverage is not None
            else f"error_rate={target:g} is not met by the most certain of {inputs} (or by the run of inputs tied with it)"
        )
        warnings.warn(f"triage: {why}; every input goes to review", UserWarning, stacklevel=user_stacklevel())
    # in float64: a float32 comparison rounded a given threshold (log 2) up to the score just above it
    review = scores.double() > chosen_threshold
    handled = ~review
    errors = _errors(prediction, tolerance, "prediction")
    achieved = None
    if errors is not None and handled.any():
        achieved = errors.to(handled.device)[handled].double().mean().item()
    return Triage(review, chosen_threshold, handled.double().mean().item(), achieved)
