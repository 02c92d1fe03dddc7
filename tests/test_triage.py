import math

import pytest
import torch
from torch import nn

import bdl
from bdl.predict import Prediction
from bdl.triage import Triage, _scores, _threshold_for_coverage, triage


def labelled(confidences, correct):
    """A two-class prediction whose max probabilities are ``confidences``; wrong where ``correct`` is False."""
    p = torch.tensor(confidences)
    probs = torch.stack([p, 1 - p], dim=-1)[None]  # S=1
    pred = Prediction.from_probs(probs)
    pred.targets = torch.where(torch.tensor(correct), 0, 1)
    return pred


def brute_force_threshold(scores, errors, error_rate):
    """Largest threshold over observed scores whose handled set has an error rate <= error_rate."""
    best = -math.inf
    for t in scores.unique():
        handled = scores <= t
        if errors[handled].float().mean() <= error_rate:
            best = max(best, t.item())
    return best


def test_coverage_threshold_handles_that_fraction_of_validation_inputs():
    torch.manual_seed(0)
    validation = Prediction.from_logits(torch.randn(4, 200, 5))
    result = triage(validation, coverage=0.8, score="mutual_information")
    assert isinstance(result, Triage) and result.review.shape == (200,)
    assert result.coverage == pytest.approx(0.8)
    assert (validation.mutual_information[~result.review] <= validation.mutual_information[result.review].min()).all()
    new = Prediction.from_logits(torch.randn(4, 50, 5))
    applied = triage(new, validation=validation, coverage=0.8, score="mutual_information")
    assert applied.threshold == result.threshold
    assert torch.equal(applied.review, new.mutual_information > result.threshold)


def test_error_rate_threshold_is_the_largest_that_meets_the_target():
    torch.manual_seed(1)
    confidences = (0.5 + 0.5 * torch.rand(300)).tolist()
    # errors more likely at low confidence, so the risk falls as coverage shrinks
    correct = (torch.rand(300) < torch.tensor(confidences)).tolist()
    validation = labelled(confidences, correct)
    errors = validation.predicted_class != validation.targets
    scores = 1 - validation.max_probability
    for target in (0.05, 0.1, 0.2):
        result = triage(validation, error_rate=target, score="max_probability")
        assert result.threshold == pytest.approx(brute_force_threshold(scores, errors, target))
        assert result.error_rate <= target
        handled = ~result.review
        assert result.coverage == pytest.approx(handled.float().mean().item())


def test_tied_scores_are_handled_together():
    validation = labelled([0.9, 0.9, 0.9, 0.6], [True, True, False, False])
    with pytest.warns(UserWarning, match=r"coverage=0.5 of the 4 prediction inputs handles none .*every input goes to review"):
        result = triage(validation, coverage=0.5, score="max_probability")
    assert result.coverage == 0.0 and result.review.all() and result.threshold == -math.inf
    # the three tied inputs have error rate 1/3 (all four: 1/2): allowed at 0.34, not at 0.3
    assert triage(validation, error_rate=0.34, score="max_probability").coverage == 0.75
    with pytest.warns(UserWarning, match=r"error_rate=0.3 is not met by the most certain of the 4 prediction inputs"):
        assert triage(validation, error_rate=0.3, score="max_probability").coverage == 0.0


def test_a_deterministic_models_mutual_information_warns_that_everything_goes_to_review():
    validation = Prediction.from_logits(torch.randn(1, 50, 3).expand(4, 50, 3))  # 4 equal samples: MI 0 everywhere
    new = Prediction.from_logits(torch.randn(1, 5, 3).expand(4, 5, 3))
    with pytest.warns(UserWarning, match="the 50 validation inputs handles none") as caught:
        result = triage(new, validation=validation, coverage=0.8, score="mutual_information")
    assert result.review.all() and caught[0].filename == __file__  # at the caller's line


@pytest.mark.parametrize(
    "coverage, inputs, handled",
    [(1 / 3, 3, 1), (2 / 3, 3, 2), (2 / 3, 300, 200), (1 / 6, 300, 50), (0.9999999999, 5, 4), (1 - 1e-11, 1, 0)],
)
def test_coverage_of_a_fraction_without_a_decimal_form_handles_its_share(coverage, inputs, handled):
    # 2/3 is the float 0.6666666666666666, which as a decimal times 300 is 199.99999999999998: 199 handled; and
    # a coverage just below 1 is not 1 (rounding the product handled all 5 inputs at 0.9999999999)
    scores = torch.arange(inputs, dtype=torch.float64)
    assert _threshold_for_coverage(scores, coverage) == (handled - 1 if handled else -math.inf)
    from bdl.triage import _as_fraction

    assert _as_fraction(2 / 3) * 30_000_000 == 20_000_000 and _as_fraction(0.7) * 41943050 == 29360135
    assert _as_fraction(700003 / 1000003, 1000003) * 1000003 == 700003  # k/n of more than 10^6 inputs: one short


def test_fixed_threshold_and_the_default_score():
    pred = Prediction.from_logits(torch.randn(3, 20, 4))
    result = triage(pred, threshold=1.0)
    assert torch.equal(result.review, pred.predictive_entropy > 1.0) and result.error_rate is None
    custom = triage(pred, threshold=-0.5, score=lambda p: -p.max_probability)
    assert torch.equal(custom.review, pred.max_probability < 0.5)


def test_regression_error_rate_uses_the_tolerance():
    means = torch.tensor([0.0, 0.0, 0.0, 0.0])
    variances = torch.tensor([0.1, 0.2, 0.3, 0.4])
    pred = Prediction.from_regression(means[None, :, None], variances[None, :, None])
    pred.targets = torch.tensor([0.1, 0.2, 2.0, 3.0])
    result = triage(pred, error_rate=0.0, tolerance=0.5)
    assert result.review.tolist() == [False, False, True, True] and result.error_rate == 0.0
    with pytest.raises(ValueError, match="tolerance"):
        triage(pred, error_rate=0.1)


def test_targets_are_checked_against_the_prediction():
    # labels out of range counted every input wrong (all to review); regression targets were reshaped by element
    # count ([D, N] paired with other inputs) and NaN targets counted right
    pred = Prediction.from_logits(torch.randn(2, 6, 3))
    for bad, message in ((torch.arange(6) % 3 + 3, r"labels in \[0, 2\]"), (torch.arange(6) % 3 + 0.5, "integer class labels")):
        pred.targets = bad
        with pytest.raises((ValueError, TypeError), match=message):
            triage(pred, error_rate=0.2)
    regression = Prediction.from_regression(torch.randn(2, 5, 2), torch.ones(2, 5, 2))
    for bad, message in ((torch.randn(2, 5), "shape"), (torch.full((5, 2), float("nan")), "finite")):
        regression.targets = bad
        with pytest.raises(ValueError, match=message):
            triage(regression, error_rate=0.2, tolerance=1.0)
    regression = Prediction.from_regression(torch.randn(2, 5, 1))
    regression.targets = torch.randn(5)  # [N] for one output: fine
    assert triage(regression, error_rate=0.99, tolerance=10.0).coverage == 1.0


def test_seed_use_case_routes_uncertain_inputs_to_review(one_thread):
    torch.manual_seed(0)

    def data(n):  # labels flip near the boundary x0 = 0: about 8% of them are wrong for any model
        x = torch.randn(n, 2)
        return x, (x[:, 0] + 0.25 * torch.randn(n) > 0).long()

    net = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 2))
    x, y = data(400)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(60):
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    model = bdl.MCDropout(net)
    validation = bdl.predict(model, data(1000), num_samples=30)
    x_new, y_new = data(1000)
    pred = bdl.predict(model, (x_new, y_new), num_samples=30)
    everything = (pred.predicted_class != y_new).float().mean()
    result = bdl.triage(pred, validation=validation, error_rate=0.02)
    # the reviewed inputs lie near the boundary, and the handled ones are mostly right
    assert x_new[result.review, 0].abs().mean() < 0.4 * x_new[~result.review, 0].abs().mean()
    assert 0.3 < result.coverage < 0.95 and result.error_rate < 0.04 < everything


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one of"),
        ({"coverage": 0.5, "threshold": 1.0}, "exactly one of"),
        ({"coverage": 0.0}, "coverage must be a number"),
        ({"error_rate": 1.5}, "error_rate must be a number"),
        ({"error_rate": 0.1}, "targets"),
        ({"coverage": 0.5, "score": "variance"}, "predictive_entropy"),
        ({"coverage": 0.5, "score": "total_variance"}, "regression"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        triage(Prediction.from_logits(torch.randn(2, 5, 3)), **kwargs)


def test_empty_sets_bools_thresholds_and_binary_labels():
    pred = Prediction.from_probs(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]))
    # an empty validation set sent everything to review (threshold -inf), an empty prediction gave coverage NaN
    with pytest.raises(ValueError, match="validation has no inputs"):
        triage(pred, coverage=0.8, validation=pred[:0])
    with pytest.raises(ValueError, match="prediction has no inputs"):
        triage(pred[:0], threshold=0.5)
    # a given threshold was rounded to float32, up to the score just above it: log 2 left [0.5, 0.5] unreviewed
    assert triage(pred, threshold=math.log(2)).review.tolist() == [True, False]
    for kwargs in ({"coverage": True}, {"error_rate": False}, {"threshold": True}):
        with pytest.raises(ValueError):
            triage(pred, **kwargs)
    # a binary classifier's labels as binary cross-entropy takes them, 0./1. of shape [N, 1]: refused
    pred.targets = torch.tensor([[1.0], [0.0]])
    assert triage(pred, error_rate=0.0).review.tolist() == [True, False]
    # which prediction lacks logits
    with pytest.raises(ValueError, match="^validation: .*needs logits"):
        triage(Prediction.from_logits(torch.randn(1, 2, 2)), coverage=0.5, validation=pred, score="energy")


def test_labels_as_arrays_or_lists_and_a_scores_wrong_type_are_named():
    # numpy or list labels failed in as_class_labels with an AttributeError; a numpy score of the right shape
    # was refused for its shape ("one value per input [3], got (3,)")
    pred = labelled([0.9, 0.6, 0.7], [True, True, False])
    expected = triage(pred, error_rate=0.0)
    for labels in (pred.targets.numpy(), pred.targets.tolist()):
        pred.targets = labels
        result = triage(pred, error_rate=0.0)
        assert result.review.tolist() == expected.review.tolist() == [False, True, True] and result.error_rate == 0.0
    with pytest.raises(TypeError, match=r"score must return a torch.Tensor of shape \[3\], got ndarray"):
        triage(pred, coverage=0.5, score=lambda p: p.probs.numpy().max(1))
    with pytest.raises(ValueError, match=r"one value per input \[3\], got shape \(3, 2\)"):
        triage(pred, coverage=0.5, score=lambda p: p.probs)
    regression = Prediction.from_regression(torch.randn(2, 5, 1))
    regression.targets = torch.randn(5)
    with pytest.raises(ValueError, match="error_rate on a regression needs a tolerance"):
        triage(regression, error_rate=0.2)


def test_a_boolean_score_is_read_as_numbers():
    pred = Prediction.from_logits(torch.randn(2, 6, 3))
    flag = lambda p: torch.tensor([True, False, True, False, False, True])  # noqa: E731 - failed in searchsorted
    assert triage(pred, coverage=0.5, score=flag).review.tolist() == [True, False, True, False, False, True]


def test_non_finite_scores_are_refused():
    pred = Prediction.from_logits(torch.randn(2, 5, 3))
    nan_scores = lambda p: torch.tensor([0.1, float("nan"), 0.3, 0.2, 0.5])  # noqa: E731
    with pytest.raises(ValueError, match="finite"):  # a NaN score would pass every threshold: never reviewed
        triage(pred, coverage=0.5, score=nan_scores)


def test_rejects_a_non_prediction():
    with pytest.raises(TypeError, match="Prediction"):
        triage(torch.randn(5), threshold=0.1)
    with pytest.raises(TypeError, match="validation must be a bdl.Prediction"):
        triage(Prediction.from_logits(torch.randn(2, 5, 3)), validation=torch.randn(5), coverage=0.5)
    # another model's validation prediction (7 classes against 3): a threshold on entropies of another scale
    with pytest.raises(ValueError, match=r"validation predicts outputs of shape \(7,\) per input, prediction \(3,\)"):
        triage(Prediction.from_logits(torch.randn(2, 5, 3)), validation=Prediction.from_logits(torch.randn(2, 9, 7)), coverage=0.8)


@pytest.mark.parametrize("coverage", [0.05, 0.3, 0.5, 0.77, 0.9, 0.95, 1.0])
def test_coverage_threshold_with_many_ties_is_the_largest_that_handles_at_most_that_fraction(coverage):
    generator = torch.Generator().manual_seed(int(coverage * 100))
    scores = torch.randint(0, 6, (500,), generator=generator).double() ** 2  # a few values, heavily tied
    allowed = [value for value in scores.unique().tolist() if (scores <= value).double().mean() <= coverage + 1e-12]
    assert _threshold_for_coverage(scores, coverage) == (max(allowed) if allowed else -math.inf)


def test_float32_targets_mean_their_decimal_value():
    # np.float32(0.7) is 0.69999999: triage handled 699 of 1000 inputs (6 of 10), and 9 of 10 at an error rate of 0.7
    np = pytest.importorskip("numpy")
    for n in (10, 1000):
        prediction = Prediction.from_logits(torch.linspace(0.01, 3, n, dtype=torch.float64)[None, :, None])
        assert int((~triage(prediction, score="max_probability", coverage=np.float32(0.7)).review).sum()) == 7 * n // 10
    prediction = Prediction.from_logits(torch.linspace(0.01, 3, 10, dtype=torch.float64)[None, :, None])
    prediction.targets = torch.tensor([0] * 7 + [1] * 3)  # every input predicted 1: 7 wrong
    assert int((~triage(prediction, score="max_probability", error_rate=np.float32(0.7)).review).sum()) == 10
    # exactly 10% wrong, every 10th input from the first, by a score that handles them in order: the error rate is
    # 0.1 at 10, 20, ..., 100 inputs; np.float16(0.1) is 0.09998, below every one of them (none handled)
    logits = torch.randn(100, 3)
    labels = logits.argmax(1)
    labels[::10] = (labels[::10] + 1) % 3
    prediction = Prediction.from_logits(logits[None])
    prediction.targets = labels
    def in_order(p):
        return torch.arange(len(p), dtype=torch.float32)
    for target in (0.1, np.float32(0.1), np.float16(0.1)):
        assert int((~triage(prediction, score=in_order, error_rate=target).review).sum()) == 100


def test_a_tolerance_for_a_classification_triage_is_refused():
    # it was ignored: a user who thought it counted near-misses as right got the plain error rate
    pred = Prediction.from_logits(torch.randn(2, 10, 3))
    with pytest.raises(ValueError, match="tolerance is for regression predictions"):
        triage(pred, coverage=0.5, tolerance=0.1)


def test_targets_may_be_0d_tensors_arrays_or_decimals():
    # a 0-d tensor (a value computed with torch) and a Decimal were refused as "not a number"
    from decimal import Decimal

    import numpy as np

    prediction = Prediction.from_logits(torch.linspace(0.01, 3, 10, dtype=torch.float64)[None, :, None])
    prediction.targets = torch.tensor([0] * 7 + [1] * 3)
    for coverage in (torch.tensor(0.7), np.array(0.7, dtype=np.float32), Decimal("0.7"), torch.tensor(0.7, dtype=torch.float64)):
        assert int((~triage(prediction, score="max_probability", coverage=coverage).review).sum()) == 7
    assert int((~triage(prediction, score="max_probability", error_rate=torch.tensor(0.7)).review).sum()) == 10
    by_threshold = triage(prediction, score="max_probability", threshold=torch.tensor(0.4, dtype=torch.float64))
    assert by_threshold.threshold == 0.4
    for wrong in (torch.tensor([0.7]), torch.tensor(True), np.array([0.7]), Decimal("NaN"), "0.7"):
        with pytest.raises(ValueError, match="coverage must be a number in"):
            triage(prediction, coverage=wrong)
    regression = Prediction.from_regression(torch.zeros(1, 4, 1))
    regression.targets = torch.tensor([[0.0], [0.5], [2.0], [0.1]])
    result = triage(regression, threshold=1.0, tolerance=torch.tensor(1.0))
    assert result.error_rate == 0.25
    with pytest.raises(ValueError, match="tolerance must be a number >= 0"):
        triage(regression, threshold=1.0, tolerance=torch.tensor([1.0]))


def test_a_float32_threshold_is_the_scores_exact_value():
    # np.float32(score) went through the decimal reading meant for targets: 0.98869514 moved one input to review
    import numpy as np

    prediction = Prediction.from_logits(torch.randn(1, 1000, 3, generator=torch.Generator().manual_seed(0)))
    ordered = _scores(prediction, None, "prediction").sort().values  # predictive entropy, float32
    assert len(ordered.unique()) == 1000
    for k in range(0, 1000, 9):  # about half of float32 values have a shortest decimal below them
        for given in (ordered[k].item(), np.float32(ordered[k].item()), ordered[k]):
            assert int((~triage(prediction, threshold=given).review).sum()) == k + 1
