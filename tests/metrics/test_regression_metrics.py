"""bdl/metrics/functional/regression.py and bdl/metrics/regression.py."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, stats
from sklearn.metrics import mean_absolute_error, mean_squared_error

from bdl.metrics import CRPS, GaussianNLL, IntervalCoverage, QuantileCalibrationError
from bdl.metrics import functional as M


def gaussian_data(num_examples=20000, dims=1, *, true_std=1.0, predicted_std=1.0):
    mean = torch.randn(num_examples, dims, dtype=torch.float64)
    target = mean + true_std * torch.randn(num_examples, dims, dtype=torch.float64)
    return mean, torch.full_like(mean, predicted_std**2), target


def test_rmse_and_mae_match_sklearn():
    mean, target = torch.randn(200, 3, dtype=torch.float64), torch.randn(200, 3, dtype=torch.float64)
    assert M.rmse(mean, target).item() == pytest.approx(math.sqrt(mean_squared_error(target, mean)))
    assert M.mae(mean, target).item() == pytest.approx(mean_absolute_error(target, mean))


def test_gaussian_nll_matches_torch_distributions_and_gaussian_nll_loss():
    mean, target = torch.randn(100, 2), torch.randn(100, 2)
    variance = torch.rand(100, 2) + 0.1
    expected = -torch.distributions.Normal(mean, variance.sqrt()).log_prob(target).mean()
    torch.testing.assert_close(M.gaussian_nll(mean, variance, target), expected)
    full = torch.nn.functional.gaussian_nll_loss(mean, target, variance, full=True, eps=0.0)
    torch.testing.assert_close(M.gaussian_nll(mean, variance, target), full)


def test_half_precision_inputs_are_read_in_float32():
    # a residual of 300 squared overflowed float16 (max 65504): RMSE and the NLL came out infinite
    mean, target, variance = torch.tensor([1000.0, 0.0]), torch.tensor([1300.0, 1.0]), torch.tensor([1e4, 1.0])
    for dtype in (torch.float16, torch.bfloat16):
        half = [t.to(dtype) for t in (mean, variance, target)]
        reference = [t.to(dtype).float() for t in (mean, variance, target)]  # the same rounded inputs
        torch.testing.assert_close(M.rmse(half[0], half[2]), M.rmse(reference[0], reference[2]))
        torch.testing.assert_close(M.gaussian_nll(*half), M.gaussian_nll(*reference))
        metric = GaussianNLL()
        metric.update(*half)
        assert torch.isfinite(metric.compute())


def test_gaussian_nll_is_the_training_loss_per_output_dimension():
    import bdl

    mean, target = torch.randn(30, 3), torch.randn(30, 3)
    variance = torch.rand(30, 3) + 0.1
    torch.testing.assert_close(3 * M.gaussian_nll(mean, variance, target), bdl.gaussian_nll(mean, variance, target))


def test_crps_matches_known_values_scipy_and_a_monte_carlo_estimate():
    # z = 0, sigma = 1: 2 phi(0) - 1/sqrt(pi) = 0.233695...
    assert M.crps_gaussian(torch.zeros(1), torch.ones(1), torch.zeros(1)).item() == pytest.approx(
        2 * stats.norm.pdf(0) - 1 / math.sqrt(math.pi), rel=1e-6
    )
    mean, std, target = torch.tensor([0.5]), torch.tensor([2.0]), torch.tensor([-1.3])
    crps = M.crps_gaussian(mean.double(), std.double().square(), target.double()).item()
    # CRPS = integral (F(x) - 1[x >= y])^2 dx, by quadrature with scipy's normal CDF
    integral_below, _ = integrate.quad(lambda x: stats.norm.cdf(x, 0.5, 2.0) ** 2, -40, -1.3)
    integral_above, _ = integrate.quad(lambda x: (1 - stats.norm.cdf(x, 0.5, 2.0)) ** 2, -1.3, 40)
    assert crps == pytest.approx(integral_below + integral_above, rel=1e-6)  # quad's default accuracy is 1.5e-8
    # E|X - y| - 1/2 E|X - X'| by Monte Carlo; 400k draws give a standard error near 0.003
    draws = 0.5 + 2.0 * torch.randn(2, 400_000, dtype=torch.float64)
    estimate = (draws[0] + 1.3).abs().mean() - 0.5 * (draws[0] - draws[1]).abs().mean()
    assert crps == pytest.approx(estimate.item(), abs=0.015)


def test_crps_tends_to_the_absolute_error_as_the_variance_vanishes():
    mean, target = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    crps = M.crps_gaussian(mean, torch.full_like(mean, 1e-12), target)
    assert crps.item() == pytest.approx(M.mae(mean, target).item(), abs=1e-5)


def test_interval_coverage_and_width_on_calibrated_and_overconfident_data():
    for level in (0.5, 0.9, 0.95):
        mean, variance, target = gaussian_data()
        coverage = M.interval_coverage(mean, variance, target, level=level).item()
        # binomial standard error sqrt(level (1 - level) / 20000) <= 0.0036: 4 standard errors
        assert coverage == pytest.approx(level, abs=4 * math.sqrt(level * (1 - level) / 20000))
        z = stats.norm.ppf((1 + level) / 2)
        assert M.interval_width(variance, level=level).item() == pytest.approx(2 * z, rel=1e-6)
    mean, variance, target = gaussian_data(true_std=2.0)
    assert M.interval_coverage(mean, variance, target, level=0.95).item() == pytest.approx(
        2 * stats.norm.cdf(1.959964 / 2) - 1, abs=0.015
    )


def test_interval_coverage_uses_the_predictions_interval_bounds_inclusively():
    mean, variance = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    z = stats.norm.ppf(0.975)
    target = torch.tensor([z, -z, z * 1.0001], dtype=torch.float64)
    assert M.interval_coverage(mean, variance, target, level=0.95).item() == pytest.approx(2 / 3)


def test_rmse_of_huge_residuals_and_intervals_near_level_one_stay_finite():
    # float32 residuals of 1e20 squared to inf (MAE and CRPS finite); (1 + level) / 2 rounded to 1: z = inf
    residual = torch.tensor([1e20, 2e20])
    assert M.rmse(residual, torch.zeros(2)).item() == pytest.approx(math.sqrt(2.5e40), rel=1e-6)
    assert M.rmse(residual.double() * 1e180, torch.zeros(2)).item() == pytest.approx(math.sqrt(2.5) * 1e200, rel=1e-6)
    assert M.rmse(torch.zeros(3), torch.zeros(3, dtype=torch.float64)).dtype == torch.float64  # the promoted dtype
    assert M.rmse(torch.zeros(3), torch.zeros(3)).item() == 0
    assert M.rmse(torch.tensor([3e38, 0.0]), torch.tensor([-3e38, 0.0])).item() == math.inf  # inf / inf gave NaN
    from bdl import Prediction

    level = 1 - 2**-53
    prediction = Prediction.from_regression(torch.zeros(1, 3, 1), torch.ones(1, 3, 1))
    low, high = prediction.interval(level)
    width = M.interval_width(torch.ones(3), level=level).item()
    assert math.isfinite(width) and width == pytest.approx((high - low).mean().item(), rel=1e-6)


def test_quantile_calibration_error_small_when_calibrated_large_when_not():
    mean, variance, target = gaussian_data()
    assert M.quantile_calibration_error(mean, variance, target).item() < 0.01
    mean, variance, target = gaussian_data(true_std=2.0)  # intervals half as wide as they should be
    levels, observed = M.quantile_calibration_curve(mean, variance, target)
    expected = torch.tensor(stats.norm.cdf(stats.norm.ppf(levels.numpy()) / 2))
    torch.testing.assert_close(observed, expected, atol=0.015, rtol=0)
    assert M.quantile_calibration_error(mean, variance, target).item() > 0.1


def test_observed_quantile_levels_are_the_fraction_of_cdf_values_at_or_below_each_level():
    # counted in the sorted cdf values (an [L, N] comparison took 43x the inputs' memory at 99 levels); targets at
    # a level's quantile exactly count as below it
    mean, variance = torch.zeros(6, 2, dtype=torch.float64), torch.ones(6, 2, dtype=torch.float64)
    levels = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    target = torch.tensor([[-3.0, 0.0], [0.0, 1.0], [-0.5, 2.0], [0.3, -0.1], [5.0, 0.0], [-1.0, 0.7]], dtype=torch.float64)
    target[0, 0] = stats.norm.ppf(0.25)
    cdf = torch.special.ndtr(target).reshape(-1)
    _, observed = M.quantile_calibration_curve(mean, variance, target, levels=levels)
    torch.testing.assert_close(observed, (cdf[None, :] <= levels[:, None]).double().mean(1))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), size=st.integers(1, 40))
def test_regression_metrics_are_invariant_to_permuting_examples(seed, size):
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(size, 2, generator=generator, dtype=torch.float64)
    variance = torch.rand(size, 2, generator=generator, dtype=torch.float64) + 0.05
    target = torch.randn(size, 2, generator=generator, dtype=torch.float64)
    permutation = torch.randperm(size, generator=generator)
    for function in (M.gaussian_nll, M.crps_gaussian, M.interval_coverage, M.quantile_calibration_error):
        assert function(mean[permutation], variance[permutation], target[permutation]).item() == pytest.approx(
            function(mean, variance, target).item(), abs=1e-12
        )


def test_a_flat_target_is_accepted_for_a_single_output_prediction():
    mean, variance = torch.randn(10, 1), torch.ones(10, 1)
    target = torch.randn(10)
    torch.testing.assert_close(M.rmse(mean, target), M.rmse(mean[:, 0], target))
    torch.testing.assert_close(M.crps_gaussian(mean, variance, target), M.crps_gaussian(mean[:, 0], variance[:, 0], target))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: M.rmse(torch.randn(10, 2), torch.randn(10)), "shape mismatch"),
        (lambda: M.gaussian_nll(torch.randn(4), torch.zeros(4), torch.randn(4)), "positive"),
        (lambda: M.crps_gaussian(torch.randn(4), torch.ones(4), torch.tensor([0.0, float("nan"), 0, 0])), "finite"),
        (lambda: M.interval_coverage(torch.randn(4), torch.ones(4), torch.randn(4), level=1.0), "level"),
        (lambda: M.quantile_calibration_error(torch.randn(4), torch.ones(4), torch.randn(4), levels=[0.0, 0.5]), "levels"),
        (lambda: M.quantile_calibration_error(torch.randn(4), torch.ones(4), torch.randn(4), levels=[0.5, math.nan]), "levels"),
        (lambda: M.mae(torch.zeros(0), torch.zeros(0)), "N, D >= 1"),
        (lambda: M.mae(torch.zeros(2, 2, 2), torch.zeros(2, 2, 2)), r"\[N\] or \[N, D\]"),
    ],
)
def test_bad_input_raises_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_streaming_regression_metrics_equal_the_functional():
    mean, variance, target = gaussian_data(1000, 2, true_std=1.5)
    pairs = [
        (GaussianNLL(), M.gaussian_nll),
        (CRPS(), M.crps_gaussian),
        (IntervalCoverage(level=0.9), lambda m, v, t: M.interval_coverage(m, v, t, level=0.9)),
        (QuantileCalibrationError(levels=[0.1, 0.5, 0.9]),
         lambda m, v, t: M.quantile_calibration_error(m, v, t, levels=[0.1, 0.5, 0.9])),
    ]
    for metric, function in pairs:
        for batch in range(0, 1000, 300):
            metric.update(mean[batch : batch + 300], variance[batch : batch + 300], target[batch : batch + 300])
        assert metric.compute().item() == pytest.approx(function(mean, variance, target).item(), abs=1e-10)
    with pytest.raises(ValueError, match="level"):
        IntervalCoverage(level=0.0)


def test_a_metric_collection_keeps_metrics_of_different_levels_apart():
    # torchmetrics merges metrics whose states are equal after the first update (compute groups): two coverage
    # levels that both covered every target in the first batch reported one level's value from then on
    from torchmetrics import MetricCollection

    collection = MetricCollection({
        "coverage_50": IntervalCoverage(0.5), "coverage_95": IntervalCoverage(0.95),
        "qce_low": QuantileCalibrationError([0.1, 0.2]), "qce_high": QuantileCalibrationError([0.8, 0.9]),
    })  # fmt: skip
    mean, variance = torch.zeros(50), torch.ones(50)
    first = torch.zeros(50)  # inside every interval, below no quantile above the median
    second = torch.linspace(-3, 3, 50)
    collection.update(mean, variance, first)
    collection.update(mean, variance, second)
    values = collection.compute()
    targets = torch.cat([first, second])
    mean, variance = torch.zeros(100), torch.ones(100)
    for level in (0.5, 0.95):
        expected = M.interval_coverage(mean, variance, targets, level=level)
        torch.testing.assert_close(values[f"coverage_{round(level * 100)}"], expected.double())
    for name, levels in (("qce_low", [0.1, 0.2]), ("qce_high", [0.8, 0.9])):
        expected = M.quantile_calibration_error(mean, variance, targets, levels=levels)
        torch.testing.assert_close(values[name], expected.double())
    assert values["coverage_50"] < values["coverage_95"]


@pytest.mark.parametrize("metric", [GaussianNLL, CRPS, IntervalCoverage, QuantileCalibrationError])
def test_an_empty_batch_adds_nothing(metric):
    mean, variance, target = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.0])
    with_empty, without = metric(), metric()
    with_empty.update(torch.empty(0), torch.empty(0), torch.empty(0))
    with_empty.update(mean, variance, target)
    without.update(mean, variance, target)
    assert with_empty(torch.empty(0), torch.empty(0), torch.empty(0)).isnan()  # forward: the state is kept
    assert torch.equal(with_empty.compute(), without.compute())


@pytest.mark.parametrize("level", [0, -0.5, 1, 1.5])
def test_a_level_outside_the_open_unit_interval_is_refused_with_that_interval(level):
    # level=1 was refused with "(0, 1)" but 0 and 1.5 with "(0, 1]", which allows 1
    with pytest.raises(ValueError, match=rf"`level` must lie in \(0, 1\), got {level}"):
        M.interval_width(torch.ones(3), level=level)


def test_integer_targets_are_read_exactly_and_kept_off_float64_on_mps():
    # float32 rounded them from 2^24: an RMSE of 1 for targets on the means
    mean = torch.tensor([16777217.0, 100000001.0], dtype=torch.float64)
    target = torch.tensor([16777217, 100000001])
    assert M.rmse(mean, target).item() == 0
    assert M.gaussian_nll(mean, torch.ones(2, dtype=torch.float64), target).item() == pytest.approx(0.5 * math.log(2 * math.pi))
    # MPS has no float64: integer targets read there (or moved there for an MPS model's means) are float32
    from bdl.metrics.functional._checks import device_dtype

    assert device_dtype(torch.float64, torch.device("mps")) is torch.float32
    assert device_dtype(torch.float64, torch.device("cpu")) is torch.float64
    assert device_dtype(torch.float16, torch.device("mps")) is torch.float16
