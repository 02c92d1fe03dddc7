"""bdl/calibration/temperature.py."""

import warnings

import pytest
import torch
from torch import nn

import bdl
from bdl.calibration import TemperatureScaledModel, TemperatureScaler, fit_temperature
from bdl.calibration.temperature import _scaled_nll
from bdl.calibration import temperature as temperature_module
from bdl.metrics import functional as M


def distorted_logits(factor, num_examples=5000, num_classes=10):
    """Labels drawn from softmax(f); the model reports factor * f (overconfident for factor > 1)."""
    true_logits = 1.5 * torch.randn(num_examples, num_classes)
    target = torch.distributions.Categorical(logits=true_logits).sample()
    return factor * true_logits, target


@pytest.mark.parametrize("factor", [3.0, 0.4])
def test_fit_recovers_the_distortion_of_the_logits(factor):
    logits, target = distorted_logits(factor)
    temperature = fit_temperature(logits, target).item()
    assert temperature == pytest.approx(factor, rel=0.05)


def test_inference_mode_tensors_and_blocks_fit_the_same_temperature():
    # "Inference tensors cannot be saved for backward" (labels, or float64 logits, made under inference_mode), and
    # inside an inference_mode block "element 0 of tensors does not require grad"
    torch.manual_seed(0)
    logits, target = distorted_logits(3.0, num_examples=500)
    expected = fit_temperature(logits, target)
    with torch.inference_mode():
        inference = logits.double(), target.clone()
        inside = TemperatureScaler().fit(logits, target).temperature.clone()
    torch.testing.assert_close(fit_temperature(*inference).float(), expected.float())
    torch.testing.assert_close(inside.float(), expected.float())


def test_a_scaler_made_in_an_inference_mode_block_is_refitted_outside_it():
    # its parameter is an inference tensor: "Inplace update to inference tensor outside InferenceMode"
    logits, target = distorted_logits(3.0, num_examples=500)
    with torch.inference_mode():
        scaler = TemperatureScaler().double()
    scaler.fit(logits, target)
    torch.testing.assert_close(scaler.temperature, fit_temperature(logits, target).double())
    assert scaler.log_temperature.dtype == torch.float64 and not scaler.log_temperature.is_inference()
    assert list(scaler.state_dict()) == ["log_temperature"]
    torch.testing.assert_close(scaler(logits.double()), logits.double() / scaler.temperature)
    with torch.inference_mode():  # cast outside the block: no inference tensor, yet no version counter either
        cast = TemperatureScaler()
    cast.double().fit(logits, target)
    torch.testing.assert_close(cast.temperature, scaler.temperature)


def test_fitted_temperature_is_a_stationary_minimum_of_the_nll():
    logits, target = distorted_logits(2.0, num_examples=2000)
    temperature = fit_temperature(logits, target)
    log_temperature = temperature.double().log().requires_grad_()
    samples = logits.double()[None]
    loss = _scaled_nll(log_temperature, samples, target)
    (gradient,) = torch.autograd.grad(loss, log_temperature)
    assert abs(gradient.item()) < 1e-5
    for nudge in (0.95, 1.05):
        assert _scaled_nll((temperature.double() * nudge).log(), samples, target) > loss


def test_scaling_an_overconfident_model_lowers_ece_and_nll_and_keeps_accuracy():
    logits, target = distorted_logits(3.0, num_examples=8000)
    validation, test = slice(0, 4000), slice(4000, 8000)
    scaler = TemperatureScaler().fit(logits[validation], target[validation])
    before = torch.softmax(logits[test], dim=1)
    after = torch.softmax(scaler(logits[test]), dim=1)
    assert M.ece(after, target[test]) < 0.5 * M.ece(before, target[test])
    assert M.ece(after, target[test]) < 0.03
    assert M.nll(after, target[test]) < M.nll(before, target[test]) - 0.3
    assert M.accuracy(after, target[test]) == M.accuracy(before, target[test])


def test_sample_logits_of_a_bayesian_model_are_scaled_per_sample_before_averaging():
    logits, target = distorted_logits(2.5, num_examples=1000)
    repeated = logits.expand(4, -1, -1)  # S identical samples: the same answer as plain logits
    torch.testing.assert_close(fit_temperature(repeated, target), fit_temperature(logits, target), rtol=1e-4, atol=0)
    noisy = logits + 2.0 * torch.randn(4, *logits.shape)  # samples that disagree
    # brute force: the NLL of the averaged probabilities on a coarse, then a fine grid of temperatures
    def nll(grid):
        probs = torch.softmax(noisy.double() / grid[:, None, None, None], dim=-1).mean(1)  # [G, N, C]
        return -probs[:, torch.arange(1000), target].log().mean(1)

    coarse = torch.logspace(-1, 1, 101, dtype=torch.float64)  # 0.1 .. 10 in steps of 4.7%
    centre = coarse[nll(coarse).argmin()]
    fine = centre * torch.linspace(0.95, 1.05, 101, dtype=torch.float64)  # steps of 0.1%
    best = fine[nll(fine).argmin()].item()
    assert fit_temperature(noisy, target).item() == pytest.approx(best, rel=0.002)
    assert abs(best - fit_temperature(noisy.mean(0), target).item()) > 0.05  # not the same as averaging logits
    log_probs = torch.log_softmax(noisy, dim=-1)  # log-probabilities give the same fit as logits
    torch.testing.assert_close(fit_temperature(log_probs, target), fit_temperature(noisy, target), rtol=1e-4, atol=0)


def test_the_nll_is_summed_over_pieces_of_rows_to_the_same_temperature(monkeypatch):
    logits, target = distorted_logits(2.5, num_examples=1000)
    noisy = logits + 2.0 * torch.randn(3, *logits.shape)
    whole = [fit_temperature(noisy, target), fit_temperature(logits, target)]
    calls = []
    real = temperature_module._scaled_nll
    monkeypatch.setattr(temperature_module, "_scaled_nll", lambda *args: calls.append(args[1].shape) or real(*args))
    monkeypatch.setattr(temperature_module, "_CHUNK_ELEMENTS", 3 * 64 * logits.shape[1])  # pieces of 64 rows, the last of 40
    pieces = [fit_temperature(noisy, target), fit_temperature(logits, target)]
    assert calls[0] == (3, 64, logits.shape[1]) and calls[15] == (3, 40, logits.shape[1])
    torch.testing.assert_close(pieces, whole, rtol=1e-9, atol=0)


def test_an_extreme_temperature_is_flagged_and_tuples_are_refused():
    torch.manual_seed(0)
    logits = torch.randn(30, 3)
    # separable: the NLL falls as T -> 0; with large margins L-BFGS stopped at T = 0.03-0.07, without a warning
    for scale in (1, 10, 30):
        with pytest.warns(UserWarning, match="no minimum"):
            fit_temperature(scale * logits, logits.argmax(1))
    target = logits.argmax(1)
    target[0] = (target[0] + 1) % 3  # one example wrong: a minimum exists
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert 0.01 < float(fit_temperature(10 * logits, target)) < 100
    samples = torch.stack([logits, logits.roll(1, 0)])  # every example right in some sample, not in all: T -> 0 too
    with pytest.warns(UserWarning, match="far outside the usual range"):
        fit_temperature(samples, logits.argmax(1))
    with pytest.raises(TypeError, match="classification logits"):
        TemperatureScaler(2.0)((torch.zeros(2, 1), torch.ones(2, 1)))
    # random logits, every label class 0 (uniform is best): T ~ 8e5, which float16 rounded to inf (log T inf too)
    wrong = torch.randn(40, 3, generator=torch.Generator().manual_seed(1))
    for dtype in (torch.float16, torch.bfloat16):
        with pytest.warns(UserWarning, match="far outside the usual range"):
            scaler = TemperatureScaler().fit(wrong.to(dtype), torch.zeros(40, dtype=torch.long))
        assert scaler.temperature.dtype == torch.float32 and 1e5 < float(scaler.temperature) < 1e7


def test_a_binary_classifiers_single_logit_is_scaled_as_its_two_class_logits():
    torch.manual_seed(0)
    log_odds = 3 * torch.randn(500, 1)
    target = torch.bernoulli(torch.sigmoid(log_odds[:, 0] / 3)).long()  # overconfident by 3
    two_class = torch.cat([torch.zeros_like(log_odds), log_odds], -1)
    temperature = fit_temperature(log_odds, target)
    torch.testing.assert_close(temperature, fit_temperature(two_class, target))
    assert abs(float(temperature) - 3) < 0.6
    # the labels evaluate takes: 0./1. floats, [N, 1] (refused: "must hold integer class labels", "shape (500, 1)")
    for labels in (target.float(), target.float()[:, None], target[:, None]):
        torch.testing.assert_close(fit_temperature(log_odds, labels), temperature)


def test_a_wrapped_ensemble_is_still_sampled_member_by_member():
    torch.manual_seed(0)
    ensemble = bdl.DeepEnsemble.from_factory(lambda: nn.Linear(4, 3), 3).eval()
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    with torch.no_grad():
        scaler = TemperatureScaler().fit(ensemble(x), y)  # [M, N, C]: the members as samples
        expected = bdl.Prediction.from_logits(ensemble(x) / scaler.temperature)
    prediction = bdl.predict(scaler.wrap(ensemble), x)  # it took the wrapper for one network giving [M, N, C]
    assert prediction.num_samples == 3
    torch.testing.assert_close(prediction.probs, expected.probs)
    assert not hasattr(scaler.wrap(nn.Linear(4, 3)), "sample_outputs")


def test_wrap_divides_a_models_output_and_the_temperature_is_saved():
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 4))
    scaler = TemperatureScaler(2.5)
    scaled = scaler.wrap(model)
    x = torch.randn(6, 3)
    torch.testing.assert_close(scaled(x), model(x) / 2.5)
    state = scaled.state_dict()
    assert torch.exp(state["scaler.log_temperature"]).item() == pytest.approx(2.5)
    restored = TemperatureScaler()
    restored.load_state_dict(scaler.state_dict())
    assert restored.temperature.item() == pytest.approx(2.5)
    assert "temperature=2.5" in repr(scaler)
    assert not any(parameter.requires_grad for parameter in scaler.parameters())  # not trained with the model
    # rebuilt from another scaler's temperature (refused as "must be a positive finite number"); integer logits
    # were divided by T cast to their dtype: 1.5 read as 1, 0.5 as 0 (inf)
    assert TemperatureScaler(scaler.temperature).temperature.item() == pytest.approx(2.5)
    torch.testing.assert_close(TemperatureScaler(0.5)(torch.tensor([3, 6])), torch.tensor([6.0, 12.0]))
    with pytest.raises(TypeError, match=r"`temperature` must be a number \(or a one-element float tensor\), got str"):
        TemperatureScaler("2")


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: TemperatureScaler(0.0), ValueError, "positive"),
        (lambda: TemperatureScaler().fit(torch.randn(5), torch.zeros(5, dtype=torch.long)), ValueError, r"\[N, C\]"),
        (lambda: TemperatureScaler().fit(torch.randn(5, 3), torch.full((5,), 3)), ValueError, "labels"),
        (lambda: TemperatureScaler().fit(torch.randn(5, 3), torch.zeros(4, dtype=torch.long)), ValueError, "shape"),
        (lambda: TemperatureScaler().fit(torch.full((2, 3), float("nan")), torch.zeros(2, dtype=torch.long)),
         ValueError, "finite"),
        (lambda: TemperatureScaler().wrap(lambda x: x), TypeError, "nn.Module"),
        (lambda: TemperatureScaledModel(nn.Linear(2, 2), 2.0), TypeError,
         r"scaler must be a bdl.TemperatureScaler, got float \(wrap it: TemperatureScaler\(2.0\)\)"),
        (lambda: fit_temperature(torch.randn(5, 3), torch.zeros(5, dtype=torch.long), max_iter=0), ValueError, "max_iter"),
        (lambda: fit_temperature(torch.randn(5, 3).softmax(-1), torch.zeros(5, dtype=torch.long)), ValueError, "look like probabilities"),
        # a half-precision softmax's rows are 3e-4 (float16) and 3e-3 (bfloat16) off 1: they fitted T = 0.42
        (lambda: fit_temperature((3 * torch.randn(500, 3)).softmax(-1).half(), torch.zeros(500, dtype=torch.long)),
         ValueError, "look like probabilities"),
        (lambda: fit_temperature((3 * torch.randn(500, 3)).softmax(-1).bfloat16(), torch.zeros(500, dtype=torch.long)),
         ValueError, "look like probabilities"),
        # no samples or no classes: torch's amin error, or "labels in [0, -1] for 0 classes"
        (lambda: fit_temperature(torch.randn(0, 5, 3), torch.zeros(5, dtype=torch.long)), ValueError, r"S, N, C >= 1.*\(0, 5, 3\)"),
        (lambda: fit_temperature(torch.randn(5, 0), torch.zeros(5, dtype=torch.long)), ValueError, r"S, N, C >= 1.*\(5, 0\)"),
    ],
)
def test_bad_input_raises_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_binary_values_all_in_the_unit_interval_are_fitted_with_a_warning_that_they_may_be_probabilities():
    # a binary model's sigmoid outputs were read as log-odds without a word (T = 0.76, test NLL 0.93 against 0.75
    # unscaled); a weak model's real log-odds can lie in [0, 1] too, so they are fitted, with the warning
    target = torch.zeros(50, dtype=torch.long)
    for values in (torch.randn(50, 1).sigmoid(), torch.randn(2, 50, 1).sigmoid()):
        with pytest.warns(UserWarning, match=r"all in \[0, 1\]: if they are sigmoid probabilities, pass the log-odds"):
            assert float(fit_temperature(values, target)) > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_temperature(torch.randn(50, 1), target)


def test_the_advice_for_probabilities_works_when_some_are_zero():
    # the error for probabilities said "pass log-probabilities (probs.log())", which a saturated float32 softmax
    # (exact zeros) turned into -inf, refused in turn
    torch.manual_seed(0)
    logits = torch.randn(300, 3) * 3
    logits[0] = torch.tensor([120.0, 0.0, 0.0])
    target = torch.distributions.Categorical(logits=logits / 3).sample()
    probs = logits.softmax(-1)
    assert bool((probs == 0).any())
    with pytest.raises(ValueError, match=r"probs\.clamp_min\(torch\.finfo\(probs\.dtype\)\.tiny\)\.log\(\)"):
        fit_temperature(probs, target)
    advised = fit_temperature(probs.clamp_min(torch.finfo(probs.dtype).tiny).log(), target)
    assert float(advised) == pytest.approx(float(fit_temperature(logits, target)), rel=1e-3)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 100.0, -104.0])
def test_a_loaded_temperature_is_checked_as_a_given_one(value):
    # a NaN log-temperature gave NaN logits, an infinite temperature (exp(100) in float32 too) uniform probabilities, a
    # zero one (exp(-104)) NaN, silently
    scaler = bdl.TemperatureScaler(2.0)
    with pytest.raises(ValueError, match=r"state dict entry log_temperature must give a positive finite temperature in torch.float32"):
        scaler.load_state_dict({"log_temperature": torch.tensor(value)})
    assert float(scaler.temperature) == pytest.approx(2.0)
    wrapped = bdl.TemperatureScaler().wrap(nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"entry scaler.log_temperature"):
        wrapped.load_state_dict({**wrapped.state_dict(), "scaler.log_temperature": torch.tensor(value)})
    with pytest.raises(ValueError, match="positive finite number in float32, got 1e[+]?39"):
        bdl.TemperatureScaler(1e39)
