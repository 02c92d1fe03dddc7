"""bdl/calibration/variance.py."""

import pytest
import torch
from torch import nn

import bdl
from bdl import Prediction, VarianceScaler
from bdl.calibration import fit_variance_scale
from bdl.metrics import functional as M


def overconfident(num_inputs=4000, samples=4, factor=4.0, outputs=1, seed=0):
    """A Monte Carlo regression prediction whose total variance is ``1 / factor`` of the targets' spread about
    its mean; the targets drawn with the full variance."""
    generator = torch.Generator().manual_seed(seed)
    centre = torch.randn(num_inputs, outputs, generator=generator)
    sample_means = centre + 0.3 * torch.randn(samples, num_inputs, outputs, generator=generator)
    sample_variances = 0.2 + torch.rand(samples, num_inputs, outputs, generator=generator)
    prediction = Prediction.from_regression(sample_means, sample_variances, keep_samples=True)
    noise = torch.randn(num_inputs, outputs, generator=generator) * (factor * prediction.total_variance).sqrt()
    return prediction, (prediction.mean + noise).squeeze(-1) if outputs == 1 else prediction.mean + noise


def test_the_closed_form_is_the_minimum_of_the_gaussian_nll():
    prediction, target = overconfident(factor=2.5)
    mean, variance = prediction.mean.double(), prediction.total_variance.double()
    scale = fit_variance_scale(mean, variance, target)
    log_scale = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_scale], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = M.gaussian_nll(mean, variance * log_scale.exp(), target.double()[:, None])
        loss.backward()
        return loss

    optimizer.step(closure)
    assert scale.item() == pytest.approx(log_scale.exp().item(), rel=1e-6)
    assert scale.item() == pytest.approx(2.5, rel=0.06)  # the distortion, up to sampling


def test_fitting_on_validation_restores_the_test_coverage_and_nll():
    validation, y_val = overconfident(seed=1)
    test, y_test = overconfident(seed=2)
    scaler = VarianceScaler().fit(validation, y_val)
    scaled = scaler(test)
    for level in (0.5, 0.9, 0.95):
        before = M.interval_coverage(test.mean, test.total_variance, y_test, level=level).item()
        after = M.interval_coverage(scaled.mean, scaled.total_variance, y_test, level=level).item()
        assert before < level - 0.15 and after == pytest.approx(level, abs=0.02), level
    nll_before = M.gaussian_nll(test.mean, test.total_variance, y_test)
    assert M.gaussian_nll(scaled.mean, scaled.total_variance, y_test) < nll_before - 0.1
    torch.testing.assert_close(scaler.std_scale, scaler.scale.sqrt())


def test_the_scaled_prediction_scales_both_parts_and_its_kept_samples():
    prediction, target = overconfident(samples=5)
    prediction.targets = target
    scaled = VarianceScaler(2.0)(prediction)
    assert scaled is not prediction and scaled.targets is target
    torch.testing.assert_close(scaled.mean, prediction.mean)
    torch.testing.assert_close(scaled.aleatoric_variance, 2 * prediction.aleatoric_variance)
    torch.testing.assert_close(scaled.epistemic_variance, 2 * prediction.epistemic_variance)
    torch.testing.assert_close(scaled.total_variance, 2 * prediction.total_variance)
    # the kept samples are the scaled mixture's: summarised again they give the scaled summary
    again = Prediction.from_regression(scaled.sample_means, scaled.sample_variances)
    for name in ("mean", "aleatoric_variance", "epistemic_variance"):
        torch.testing.assert_close(getattr(again, name), getattr(scaled, name))
    torch.testing.assert_close(prediction.sample_means.mean(0), prediction.mean)  # the original left as it was


def test_one_factor_per_output():
    prediction, target = overconfident(outputs=2)
    target = prediction.mean + (target - prediction.mean) * torch.tensor([1.0, 0.5])  # the second output's noise / 2
    scaler = VarianceScaler().fit(prediction, target, per_output=True)
    assert scaler.scale.shape == (2,)
    assert scaler.scale[0].item() == pytest.approx(4.0, rel=0.08) and scaler.scale[1].item() == pytest.approx(1.0, rel=0.08)
    assert VarianceScaler().fit(prediction, target).scale.shape == ()
    torch.testing.assert_close(scaler(prediction).total_variance, prediction.total_variance * scaler.scale.float())
    with pytest.raises(ValueError, match="`prediction` has 1 outputs, but the scaler holds 2 factors \\(per_output\\)"):
        scaler(overconfident(num_inputs=10)[0])


def test_a_mean_only_mc_dropout_model_gets_intervals_that_hold():
    # its intervals are the samples' spread alone (see evaluate's note); scaled on validation data, they cover
    torch.manual_seed(0)
    x = torch.rand(1200, 1) * 4 - 2
    y = torch.sin(2 * x[:, 0]) + 0.3 * torch.randn(1200)
    net = nn.Sequential(nn.Linear(1, 64), nn.Tanh(), nn.Dropout(0.1), nn.Linear(64, 1))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        nn.functional.mse_loss(net(x[:800])[:, 0], y[:800]).backward()
        optimizer.step()
    model = bdl.MCDropout(net)
    validation = bdl.predict(model, (x[800:1000], y[800:1000]), num_samples=16, task="regression")
    test = bdl.predict(model, x[1000:], num_samples=16, task="regression")
    before = M.interval_coverage(test.mean, test.total_variance, y[1000:], level=0.9).item()
    after = VarianceScaler().fit(validation)(test)
    assert before < 0.7
    assert M.interval_coverage(after.mean, after.total_variance, y[1000:], level=0.9).item() == pytest.approx(0.9, abs=0.06)
    assert bdl.evaluate(after, y[1000:]).metrics["interval_coverage_90"] == pytest.approx(0.9, abs=0.06)


def test_overflow_is_named_only_where_the_scaling_made_it():
    prediction, _ = overconfident(num_inputs=10)
    with pytest.raises(ValueError, match=r"overflow torch.float32$"):  # no advice to widen a float32 one
        VarianceScaler(1e39)(prediction)
    infinite = Prediction.from_regression(torch.tensor([[[0.0]], [[600.0]]])).to(torch.float16)  # 9e4: inf already
    assert not torch.isfinite(VarianceScaler(0.25)(infinite).total_variance).any()
    with torch.device("meta"):  # built as a module's part on the meta device, then loaded
        meta = VarianceScaler()
    assert meta.scale.is_meta


def test_a_scale_that_zeroes_the_variances_is_named():
    prediction = Prediction.from_regression(torch.zeros(1, 4, 1), torch.ones(1, 4, 1))
    fitted = VarianceScaler().fit(prediction, torch.zeros(4))  # targets on the means: float64's smallest factor
    for scaler in (fitted, VarianceScaler(1e-50)):  # each zeroed every float32 variance, silently
        with pytest.raises(ValueError, match=r"underflow to 0 in torch.float32 at 4 of 4 entries \(variances from 1, scale .*a fitted scale this small says"):
            scaler(prediction)
    assert VarianceScaler(1e-50)(prediction.to(torch.float64)).total_variance.min() == pytest.approx(1e-50)


def test_the_scale_stays_float64_through_module_dtype_casts():
    # .half() rounded 1e-8 to 0 (zero variances) and 1e6 to inf; Lightning's 16-true precision calls .to(dtype)
    prediction = Prediction.from_regression(torch.zeros(1, 4, 1), torch.ones(1, 4, 1))
    for cast in (lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.float()):
        for value in (1e-8, 4.0341, 1e6):
            scaler = cast(VarianceScaler(value))
            assert scaler.scale.dtype == torch.float64 and scaler.scale.item() == value
            assert scaler(prediction).total_variance.flatten()[0].item() == pytest.approx(value, rel=1e-6)


def test_integer_targets_are_read_exactly():
    # float32 rounded them from 2^24: RMSE 1 and a scale of 1 for targets on the means
    mean = torch.tensor([16777217.0, 100000001.0], dtype=torch.float64)
    target = torch.tensor([16777217, 100000001])
    assert fit_variance_scale(mean, torch.ones(2, dtype=torch.float64), target).item() < 1e-300
    assert M.rmse(mean, target).item() == 0 and M.mae(mean, target).item() == 0


def test_state_dict_and_repr():
    scaler = VarianceScaler(torch.tensor([2.0, 3.0]))
    fresh = VarianceScaler()  # one factor: loads the per-output ones (torch: "size mismatch for scale")
    fresh.load_state_dict(scaler.state_dict())
    torch.testing.assert_close(fresh.scale, scaler.scale)
    with pytest.raises(ValueError, match="`scale` must be a positive finite number"):
        fresh.load_state_dict({"scale": torch.tensor(-1.0, dtype=torch.float64)})
    model = nn.Sequential(nn.Linear(2, 2), VarianceScaler())  # the entry of a larger state dict is named
    with pytest.raises(ValueError, match=r"state dict entry 1.scale: `scale` must be a positive finite number"):
        model.load_state_dict({**model.state_dict(), "1.scale": torch.tensor(0.0, dtype=torch.float64)})
    assert repr(scaler) == "VarianceScaler(scale=[2, 3])" and repr(VarianceScaler(1.5)) == "VarianceScaler(scale=1.5)"


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda p, y: VarianceScaler(0.0), ValueError, "`scale` must be a positive finite number"),
        (lambda p, y: VarianceScaler(torch.ones(2, 2)), ValueError, "a 1-D tensor of them"),
        (lambda p, y: VarianceScaler("2"), TypeError, "`scale` must be a positive number"),
        (lambda p, y: VarianceScaler(torch.tensor([])), ValueError, "a 1-D tensor of them"),
        (lambda p, y: VarianceScaler().fit(p, y, per_output="no"), TypeError, "`per_output` must be true or false"),
        (lambda p, y: VarianceScaler(1e5)(p.to(torch.float16)), ValueError, r"`prediction`'s variances times the scale overflow torch.float16: scale a float32 copy"),
        (lambda p, y: VarianceScaler().fit(Prediction.from_logits(torch.randn(2, 5, 3)), y[:5]), ValueError, "classification prediction: variance scaling is for regression"),
        (lambda p, y: VarianceScaler().fit(p.mean, y), TypeError, "must be a bdl.Prediction of a regression"),
        (lambda p, y: VarianceScaler().fit(p), ValueError, "no `target`: pass the validation targets"),
        (lambda p, y: VarianceScaler().fit(p, y[:10]), ValueError, r"`target` must have the shape of `mean` \(4000, 1\)"),
        (lambda p, y: VarianceScaler().fit(Prediction.from_regression(torch.ones(1, 3, 1)), y[:3]), ValueError, "3 of 3 outputs with variance <= 0 .*leave those inputs out of the validation data"),
        (lambda p, y: fit_variance_scale(p.mean, p.total_variance, torch.full_like(y, float("nan"))), ValueError, "`target` must be finite, got 4000 NaN/Inf"),
        # a NaN scale; an IndexError
        (lambda p, y: fit_variance_scale(torch.zeros(3, 0), torch.ones(3, 0), torch.zeros(3, 0)), ValueError, r"`mean` must have shape \[N, D\] \(or \[N\]\) with N, D >= 1, got \(3, 0\)"),
        (lambda p, y: fit_variance_scale(torch.tensor(0.0), torch.ones(3), torch.zeros(3)), ValueError, r"`mean` must have shape .* got \(\)"),
    ],
)
def test_bad_inputs_are_named(call, error, message):
    prediction, target = overconfident()
    with pytest.raises(error, match=message):
        call(prediction, target)
