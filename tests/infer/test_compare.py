import pytest
import torch

import bdl
from bdl.infer import compare_predictions


def test_identical_predictions_agree_completely():
    probs = torch.softmax(torch.randn(6, 10, 3), dim=-1)
    prediction = bdl.Prediction.from_probs(probs)
    comparison = compare_predictions(prediction, prediction)
    assert comparison.class_agreement == 1.0 and comparison.total_variation == 0.0
    assert comparison.num_inputs == 10 and comparison.mean_difference is None


def test_total_variation_and_agreement_known_values():
    reference = bdl.Prediction.from_probs(torch.tensor([[[0.9, 0.1], [0.6, 0.4]]]))
    approximate = bdl.Prediction.from_probs(torch.tensor([[[0.7, 0.3], [0.3, 0.7]]]))
    comparison = compare_predictions(approximate, reference)
    assert comparison.total_variation == pytest.approx((0.2 + 0.3) / 2)
    assert comparison.max_total_variation == pytest.approx(0.3)
    assert comparison.class_agreement == 0.5


def test_regression_compares_predictive_means_and_stds():
    reference = bdl.Prediction.from_regression(torch.zeros(1, 4, 1), torch.full((1, 4, 1), 4.0))  # N(0, 2^2)
    approximate = bdl.Prediction.from_regression(torch.full((1, 4, 1), 1.5), torch.ones(1, 4, 1))  # N(1.5, 1)
    comparison = compare_predictions(approximate, reference)
    assert comparison.mean_difference == pytest.approx(1.5)
    assert comparison.std_difference == pytest.approx(1.0)
    assert comparison.std_ratio == pytest.approx(0.5)
    assert comparison.wasserstein == pytest.approx((1.5**2 + 1.0) ** 0.5)
    assert "std_ratio=0.5" in str(comparison)
    # a reference std of 0 (mean-only predictions): identical ones read 0 ("overconfident"), one such input 1.7e37
    point = bdl.Prediction.from_regression(torch.zeros(1, 4, 1))
    assert compare_predictions(point, point).std_ratio == 1.0
    assert compare_predictions(reference, point).std_ratio == float("inf")


def test_mismatched_predictions_are_rejected():
    classification = bdl.Prediction.from_probs(torch.full((2, 3, 2), 0.5))
    regression = bdl.Prediction.from_regression(torch.zeros(2, 3, 1))
    with pytest.raises(ValueError, match="different tasks"):
        compare_predictions(classification, regression)
    with pytest.raises(ValueError, match="same shape"):
        compare_predictions(classification, bdl.Prediction.from_probs(torch.full((2, 4, 2), 0.5)))
    with pytest.raises(TypeError, match="bdl.Prediction"):
        compare_predictions(torch.zeros(3), classification)
    for empty in (bdl.Prediction.from_probs(torch.full((2, 0, 2), 0.5)), bdl.Prediction.from_regression(torch.zeros(2, 0, 1))):
        with pytest.raises(ValueError, match="no inputs to compare: approximate has 0, reference 0"):
            compare_predictions(empty, empty)


def test_svi_with_a_full_rank_guide_matches_the_nuts_reference(full_rank_svi, nuts_run, linear_regression):
    comparison = compare_predictions(full_rank_svi.predict(linear_regression.x, num_samples=2000), nuts_run.prediction)
    assert comparison.task == "regression" and comparison.num_inputs == 50
    # Predictive sd ~ 0.51 = sqrt(noise 0.25 + weight variance ~0.01); both are the exact posterior up to
    # MC/SVI error (seen: mean difference 0.004, std ratio 0.9997). Halving the weight variance moves the
    # std ratio to 0.99, so the tolerances below catch a wrong posterior spread.
    assert comparison.mean_difference < 0.015 and abs(comparison.std_ratio - 1) < 0.005 and comparison.wasserstein < 0.015
