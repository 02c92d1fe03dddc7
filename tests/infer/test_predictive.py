import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bdl
from bdl.infer import PyroModel, SVIModule, network_outputs, predict_from_samples, private_param_store, sample_guide


def mlp(out=3):
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, out))


def weight_samples(net, num_samples=6):
    return {name: torch.randn(num_samples, *p.shape) for name, p in net.named_parameters()}


def test_vectorised_outputs_equal_one_forward_pass_per_sample():
    model = PyroModel(mlp(), "categorical")
    samples, x = weight_samples(model.net), torch.randn(5, 4)
    vectorised = network_outputs(model, samples, x)
    looped = network_outputs(model, samples, x, vectorize=False)
    assert vectorised.shape == (6, 5, 3)
    torch.testing.assert_close(vectorised, looped)
    torch.testing.assert_close(looped[2], torch.func.functional_call(model.net, {k: v[2] for k, v in samples.items()}, (x,)))


def test_an_unbatched_input_is_named_as_such():
    # one input [4] gave logits [S, 3]: "sample_logits must have shape [S, N, C] of logits, got (6, 3)"
    model = PyroModel(mlp(), "categorical")
    samples = weight_samples(model.net)
    for vectorize in (True, False):
        with pytest.raises(ValueError, match=r"outputs of shape \(3,\) for inputs of shape \(4,\): inputs must be a batch"):
            predict_from_samples(model, samples, torch.randn(4), vectorize=vectorize)
    assert predict_from_samples(model, samples, torch.randn(1, 4)).probs.shape == (1, 3)


def test_classification_prediction_averages_the_per_sample_softmax():
    model = PyroModel(mlp(), "categorical")
    samples, x = weight_samples(model.net), torch.randn(5, 4)
    prediction = predict_from_samples(model, samples, x, keep_samples=True)
    logits = network_outputs(model, samples, x)
    torch.testing.assert_close(prediction.probs, logits.softmax(-1).mean(0))
    assert prediction.sample_probs.shape == (6, 5, 3)


def test_bernoulli_prediction_is_two_class():
    model = PyroModel(mlp(1), "bernoulli")
    samples, x = weight_samples(model.net), torch.randn(5, 4)
    prediction = predict_from_samples(model, samples, x)
    p = torch.sigmoid(network_outputs(model, samples, x)[..., 0]).mean(0)
    torch.testing.assert_close(prediction.probs[:, 1], p)


@pytest.mark.parametrize("likelihood, out", [("gaussian", 2), ("gaussian_homoscedastic", 2), ("gaussian_heteroscedastic", 4)])
def test_regression_prediction_splits_noise_from_weight_uncertainty(likelihood, out):
    model = PyroModel(mlp(out), likelihood, likelihood_options={"noise_std": 0.3} if likelihood == "gaussian" else None)
    samples, x = weight_samples(model.net), torch.randn(5, 4)
    noise_std = torch.rand(6) + 0.1
    if likelihood == "gaussian_homoscedastic":
        samples["noise_std"] = noise_std
    prediction = predict_from_samples(model, samples, x)
    outputs = network_outputs(model, samples, x)
    means = outputs[..., :2]
    if likelihood == "gaussian":
        noise_var = torch.full_like(means, 0.09)
    elif likelihood == "gaussian_homoscedastic":
        noise_var = noise_std.square().reshape(6, 1, 1).expand_as(means)
    else:
        noise_var = (torch.nn.functional.softplus(outputs[..., 2:]) + 1e-4).square()
    torch.testing.assert_close(prediction.mean, means.mean(0))
    torch.testing.assert_close(prediction.epistemic_variance, means.var(0, unbiased=False))
    torch.testing.assert_close(prediction.aleatoric_variance, noise_var.mean(0))
    if likelihood == "gaussian_homoscedastic":  # the noise draws are checked as the weights': [S], the same S
        # 5 draws beside 6 gave torch's "expanded size", and a [3, 2] tensor was read as 6 draws, paired wrongly
        for bad, message in ((noise_std[:5], r"same number S of draws .*\[5, 6\]"), (noise_std.reshape(3, 2), r"samples\['noise_std'\] must have shape \[S\]")):
            with pytest.raises(ValueError, match=message):
                predict_from_samples(model, {**samples, "noise_std": bad}, x)


def test_batches_share_the_posterior_samples_and_keep_targets():
    model = PyroModel(mlp(), "categorical")
    samples = weight_samples(model.net)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    whole = predict_from_samples(model, samples, x)
    batched = predict_from_samples(model, samples, DataLoader(TensorDataset(x, y), batch_size=4))
    torch.testing.assert_close(batched.probs, whole.probs)
    assert torch.equal(batched.targets, y)
    with pytest.raises(ValueError, match="latent sites"):
        predict_from_samples(model, {"0.weight": samples["0.weight"]}, x)


def test_guide_samples_have_the_parameter_shapes_and_the_guide_spread():
    from pyro.infer.autoguide import AutoNormal

    model = PyroModel(mlp(), "categorical")
    guide = AutoNormal(model, init_scale=0.05)
    with private_param_store():
        samples = sample_guide(guide, 4000)
    assert samples["0.weight"].shape == (4000, 8, 4) and samples["2.bias"].shape == (4000, 3)
    assert set(samples) == {"0.weight", "0.bias", "2.weight", "2.bias"}  # not AutoNormal's auxiliary "_unconstrained" draws
    torch.testing.assert_close(samples["0.weight"].std(0), torch.full((8, 4), 0.05), atol=0.005, rtol=0)
    assert len(pyro.get_param_store()) == 0


def test_svi_module_predicts_through_bdl_predict_like_any_bdl_model():
    x = torch.randn(7, 4)
    module = SVIModule(PyroModel(mlp(2), "gaussian", num_data=10, likelihood_options={"noise_std": 0.5}), "normal", init_scale=0.1)
    torch.manual_seed(0)
    direct = module.predict(x, num_samples=2000)
    torch.manual_seed(1)
    through_bdl = bdl.predict(module, x, num_samples=2000, task="regression")
    assert through_bdl.num_samples == 2000
    torch.testing.assert_close(through_bdl.aleatoric_variance, torch.full((7, 2), 0.25))
    torch.testing.assert_close(through_bdl.mean, direct.mean, atol=0.02, rtol=0)
    torch.testing.assert_close(through_bdl.epistemic_variance, direct.epistemic_variance, atol=0.01, rtol=0.15)


def test_bdl_predict_takes_an_svi_fits_task_and_refuses_the_prior_of_a_bare_pyro_model():
    # a PyroModel's forward draws from the prior: its sampled noise was the "epistemic" variance, silently; an
    # svi fit of a regression was predicted as a classifier ("must return logits")
    torch.manual_seed(0)
    x = torch.randn(40, 1)
    y = 2 * x + 0.1 * torch.randn(40, 1)
    model = PyroModel(nn.Linear(1, 1), "gaussian", likelihood_options={"noise_std": 0.1})
    for call in (lambda: bdl.predict(model, x, task="regression"), lambda: bdl.evaluate(model, (x, y), task="regression")):
        with pytest.raises(TypeError, match="model is a bdl.infer.PyroModel, whose forward draws its weights from the prior"):
            call()
    fit = bdl.infer.svi(model, x, y, lr=0.1, num_steps=300)
    prediction = bdl.predict(fit, x, num_samples=50)
    assert prediction.task == "regression" and prediction.mean.shape == (40, 1)
    with pytest.raises(ValueError, match=r"task='classification', but the model is a regression fit"):
        bdl.predict(fit, x, task="classification")  # (a classifier's logits were read as means)
    torch.testing.assert_close(prediction.aleatoric_variance, torch.full((40, 1), 0.01))


def test_a_float64_function_model_is_predicted_in_float64():
    # the regression read was cast to the default float32: an epistemic variance 7.6% off about a mean of 1e4
    from bdl.infer import predict_function_model

    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0))
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("obs", dist.Normal(1e4 + w * x, 1e-3), obs=y)

    w = 1e-3 * torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for parallel in (True, False):
        prediction = predict_function_model(model, {"w": w}, torch.ones(3, dtype=torch.float64), output_site="obs", task="regression", parallel=parallel)
        assert prediction.mean.dtype == prediction.epistemic_variance.dtype == torch.float64
        assert prediction.epistemic_variance[0].item() == pytest.approx(w.var(unbiased=False).item(), rel=1e-6)


def test_function_model_predictions_read_the_named_site():
    def model(x, y=None):
        slope = pyro.sample("slope", dist.Normal(0.0, 1.0))
        logit = slope * x  # broadcasts over a leading sample dim when vectorised
        logits = pyro.deterministic("logits", torch.stack([torch.zeros_like(logit), logit], dim=-1))
        with pyro.plate("data", x.shape[-1]):
            return pyro.sample("obs", dist.Categorical(logits=logits), obs=y)

    x = torch.linspace(-2, 2, 5)
    module = SVIModule(model, "normal", example_args=(x, torch.zeros(5, dtype=torch.long)), init_scale=0.1)
    prediction = module.predict((x,), num_samples=500, output_site="logits", task="classification")
    assert prediction.probs.shape == (5, 2)
    # slope ~ N(0 + guide init, ...): symmetric logits at x = 0
    torch.testing.assert_close(prediction.probs[2], torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="task"):
        module.predict((x,), output_site="logits")


def test_a_site_of_probabilities_read_as_logits_is_named():
    # softmaxed again (probabilities flattened towards uniform), then refused in words of a method never called
    from bdl.infer import predict_function_model

    def model(x, y=None):
        slope = pyro.sample("slope", dist.Normal(0.0, 1.0))
        logit = slope * x
        probs = pyro.deterministic("probs", torch.stack([torch.zeros_like(logit), logit], dim=-1).softmax(-1))
        with pyro.plate("data", x.shape[-1]):
            return pyro.sample("obs", dist.Categorical(probs=probs), obs=y)

    slopes = torch.randn(50, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"output_site 'probs' holds probabilities .* record the logits there"):
        predict_function_model(model, {"slope": slopes}, torch.linspace(-2, 2, 5), output_site="probs", task="classification")
    assert predict_function_model(model, {"slope": slopes}, torch.linspace(-2, 2, 5), output_site="obs", task="classification").probs.shape == (5, 2)


def _slope_model(x, y=None):
    slope = pyro.sample("slope", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[-1]):
        return pyro.sample("obs", dist.Normal(slope * x, 0.5), obs=y)


@pytest.mark.parametrize("parallel", [True, False])
def test_a_function_models_observation_site_splits_noise_from_the_draws_spread(parallel):
    """Regression on the observation site reads its distribution per draw: the predicted means are the draws'
    slope * x exactly, the aleatoric variance the noise's 0.25 (its sampled values mixed the noise into the
    epistemic variance and the mean)."""
    from bdl.infer import predict_function_model

    slopes = torch.tensor([1.0, 2.0, 4.0])
    x = torch.tensor([0.5, 1.0, -2.0])
    prediction = predict_function_model(_slope_model, {"slope": slopes}, x, output_site="obs", task="regression", parallel=parallel, keep_samples=True)
    means = slopes[:, None] * x
    torch.testing.assert_close(prediction.sample_means[..., 0], means)
    torch.testing.assert_close(prediction.mean[:, 0], means.mean(0))
    torch.testing.assert_close(prediction.epistemic_variance[:, 0], means.var(0, unbiased=False))
    torch.testing.assert_close(prediction.aleatoric_variance, torch.full((3, 1), 0.25))


def _line_model(x, y=None):
    """Intercept and slope in one vector latent, unpacked by index: valid for one draw at a time."""
    b = pyro.sample("b", dist.Normal(torch.zeros(2), 10.0).to_event(1))
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("obs", dist.Normal(b[0] + b[1] * x, 0.5), obs=y)


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_a_model_that_broadcasts_draws_into_other_numbers_is_predicted_draw_by_draw(task):
    # under a batch of draws b[0] and b[1] are the first two draws: with 2 inputs, as many as the vector's
    # entries, the vectorised pass broadcast without an error into wrong means and no epistemic variance
    from bdl.infer import predict_function_model

    def model(x, y=None):
        if task == "regression":
            return _line_model(x, y)
        b = pyro.sample("b", dist.Normal(torch.zeros(2), 10.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            logit = b[0] + b[1] * x
            return pyro.sample("obs", dist.Categorical(logits=torch.stack([-logit, logit], -1)), obs=y)

    draws = torch.tensor([[1.0, 3.0], [0.5, 2.0], [2.0, -1.0], [0.0, 4.0]])
    x = torch.tensor([0.0, 1.0])
    vectorised, looped = (
        predict_function_model(model, {"b": draws}, x, output_site="obs", task=task, parallel=parallel, keep_samples=True)
        for parallel in (True, False)
    )
    logits = draws[:, :1] + draws[:, 1:] * x  # [S, N]
    if task == "regression":
        torch.testing.assert_close(vectorised.sample_means[..., 0], logits)
        torch.testing.assert_close(vectorised.epistemic_variance[:, 0], logits.var(0, unbiased=False))
    else:
        torch.testing.assert_close(vectorised.probs, torch.softmax(torch.stack([-logits, logits], -1), -1).mean(0))
    torch.testing.assert_close(vectorised.mean if task == "regression" else vectorised.probs,
                               looped.mean if task == "regression" else looped.probs)  # fmt: skip


@pytest.mark.parametrize("num_samples", [16, 20])  # 20: as many draws as inputs
def test_a_vector_latent_outside_the_plates_is_predicted_vectorised(num_samples):
    # one slope per output, w ~ Normal(0, 1).to_event(1): Predictive padded the draws [S, D] by their dimensions and
    # read D as a plate dimension, so x[:, None] * w failed ("size of tensor a (20) must match ... (16)"), or, with
    # S = N, broadcast into other numbers and fell back to one run per draw
    from bdl.infer import predict_function_model

    calls = []

    def model(x, y=None):
        calls.append(1)
        w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("obs", dist.Normal(x[:, None] * w, 0.1).to_event(1), obs=y)

    x, w = torch.randn(20, generator=torch.Generator().manual_seed(0)), torch.randn(num_samples, 2, generator=torch.Generator().manual_seed(1))
    prediction = predict_function_model(model, {"w": w}, x, output_site="obs", task="regression", keep_samples=True)
    torch.testing.assert_close(prediction.sample_means, x[None, :, None] * w[:, None, :])
    torch.testing.assert_close(prediction.aleatoric_variance, torch.full((20, 2), 0.01))
    assert len(calls) < num_samples  # vectorised: the draws were not run one by one


def test_a_matrix_latent_used_as_x_at_w_is_predicted_vectorised_as_pyro_lays_out_its_draws():
    # its draws padded to the plate nesting ([S, 1, D, C]) give logits [S, 1, N, C], which Pyro spreads over [S, S, N]:
    # when that layout was the only one tried, a reshape error, or S times the memory and a run per draw (7 s against
    # 0.05 s at S = 200, N = 1000); tried as given first, or on two draws before all, it runs vectorised
    from bdl.infer import predict_function_model

    calls = []

    def model(x, y=None):
        calls.append(1)
        weights = pyro.sample("W", dist.Normal(torch.zeros(4, 3), 1.0).to_event(2))
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("obs", dist.Categorical(logits=x @ weights), obs=y)

    x, draws = torch.randn(50, 4, generator=torch.Generator().manual_seed(0)), torch.randn(40, 4, 3, generator=torch.Generator().manual_seed(1))
    prediction = predict_function_model(model, {"W": draws}, x, output_site="obs", task="classification")
    torch.testing.assert_close(prediction.probs, torch.softmax(x @ draws, -1).mean(0))
    assert len(calls) < 40


def test_sampled_values_are_read_from_the_vectorised_run_without_running_the_draws_alone():
    # a Cauchy observation has no finite moments: its sampled values, which every run draws anew, made the check of
    # the vectorised run fail every time, and the model then ran once per draw (1003 runs for 1000 draws)
    from bdl.infer import predict_function_model

    calls = []

    def model(x, y=None):
        calls.append(1)
        slope = pyro.sample("slope", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("obs", dist.Cauchy(slope * x, 0.5), obs=y)

    prediction = predict_function_model(model, {"slope": torch.randn(200)}, torch.randn(5), output_site="obs", task="regression")
    assert prediction.mean.shape == (5, 1) and len(calls) < 10  # not once per draw (Pyro's vectorised run takes 2)

    # and the broadcast of b[0] + b[1] * x is still caught there: by the values' density under both runs
    def line(x, y=None):
        b = pyro.sample("b", dist.Normal(torch.zeros(2), 10.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("obs", dist.Cauchy(b[0] + b[1] * x, 1e-3), obs=y)

    draws = torch.tensor([[1.0, 3.0], [0.5, 2.0], [2.0, -1.0], [0.0, 4.0]])
    x = torch.tensor([0.0, 1.0])
    torch.manual_seed(0)
    prediction = predict_function_model(line, {"b": draws}, x, output_site="obs", task="regression", keep_samples=True)
    torch.testing.assert_close(prediction.sample_means[..., 0], draws[:, :1] + draws[:, 1:] * x, atol=0.1, rtol=0)


# Observation sites of a slope model, from the two-class logits (0, slope * x) or, for "three", (0, l, -l)
OBSERVATIONS = {
    "categorical": lambda logits: dist.Categorical(logits=logits),
    "bernoulli": lambda logits: dist.Bernoulli(logits=logits[..., 1]),
    "one_hot": lambda logits: dist.OneHotCategorical(logits=logits),
    "masked": lambda logits: dist.Categorical(logits=logits).mask(torch.ones(logits.shape[:-1], dtype=torch.bool)),
    "three": lambda logits: dist.Categorical(logits=torch.cat([logits, -logits[..., 1:]], -1)),
}


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("observation", sorted(OBSERVATIONS))
def test_a_function_models_observation_site_gives_its_class_probabilities(observation, parallel):
    """Categorical, Bernoulli (as two classes), OneHotCategorical (its one-hot draws were read as logits) and a
    masked Categorical (refused) observation sites: the softmax of their logits, averaged over the draws."""
    from bdl.infer import predict_function_model

    def model(x, y=None):
        slope = pyro.sample("slope", dist.Normal(0.0, 1.0))
        logit = slope * x
        with pyro.plate("data", x.shape[-1]):
            return pyro.sample("obs", OBSERVATIONS[observation](torch.stack([torch.zeros_like(logit), logit], -1)), obs=y)

    slopes, x = torch.tensor([0.5, -1.0, 6.0]), torch.tensor([1.0, 2.0])
    logit = slopes[:, None] * x
    logits = [torch.zeros_like(logit), logit] + ([-logit] if observation == "three" else [])
    prediction = predict_function_model(model, {"slope": slopes}, x, output_site="obs", task="classification", parallel=parallel)
    torch.testing.assert_close(prediction.probs, torch.stack(logits, -1).softmax(-1).mean(0))


def test_mcmc_function_model_predictive_summary_sees_chains_that_disagree_through_the_noise():
    """Two chains at slopes 2.4 and 2.8: the R-hat of the predicted means is the R-hat of slope * x; read from
    noisy observations (sd 1) it fell to 1.14 where the means' was 1.88."""
    from pyro.ops.stats import split_gelman_rubin

    from bdl.infer.mcmc import MCMCResult, PosteriorSummary

    generator = torch.Generator().manual_seed(0)
    chains = torch.stack([2.4 + 0.05 * torch.randn(200, generator=generator), 2.8 + 0.05 * torch.randn(200, generator=generator)])

    def model(x, y=None):
        slope = pyro.sample("slope", dist.Normal(0.0, 10.0))
        with pyro.plate("data", x.shape[-1]):
            return pyro.sample("obs", dist.Normal(slope * x, 1.0), obs=y)

    result = MCMCResult({"slope": chains.reshape(-1)}, {"slope": chains}, PosteriorSummary({"slope": chains}), {}, None, model)
    x = torch.tensor([0.5, 1.0])
    summary = result.predictive_summary((x,), task="regression")
    expected = split_gelman_rubin((chains[..., None] * x).double(), chain_dim=0, sample_dim=1)
    torch.testing.assert_close(summary["mean"]["r_hat"][:, 0], expected, rtol=1e-5, atol=0)
    assert torch.equal(summary["variance"]["r_hat"], torch.ones(2, 1))  # the known noise: the same in every draw


def test_mcmc_refuses_prediction_inputs_of_a_function_model_without_a_task():
    with pytest.raises(ValueError, match="task"):
        bdl.mcmc(_slope_model, torch.ones(3), torch.ones(3), num_samples=4, warmup_steps=2, num_chains=1, predict_inputs=(torch.ones(2),))


@pytest.mark.parametrize("parallel", [True, False])
def test_a_latent_output_site_is_read_as_its_posterior_draws(parallel):
    """A per-input latent (f ~ Normal(w x, 0.1), then obs ~ Normal(f, 1)) given in the samples: its draws, not its
    distribution given w."""
    from bdl.infer import predict_function_model

    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[-1]):
            f = pyro.sample("f", dist.Normal(w * x, 0.1))
            return pyro.sample("obs", dist.Normal(f, 1.0), obs=y)

    x = torch.tensor([0.5, 1.0, 2.0])
    f = torch.tensor([[5.0, 6.0, 7.0], [7.0, 8.0, 9.0]])
    prediction = predict_function_model(model, {"w": torch.zeros(2), "f": f}, x, output_site="f", task="regression", parallel=parallel)
    torch.testing.assert_close(prediction.mean[:, 0], f.mean(0))
    torch.testing.assert_close(prediction.epistemic_variance[:, 0], f.var(0, unbiased=False))
    assert torch.equal(prediction.aleatoric_variance, torch.zeros(3, 1))


def test_non_finite_outputs_name_the_input_rows_and_the_cause():
    # the likelihood's check said "sample_means must be finite, got 50 NaN/Inf entries out of 250": no row, no cause
    model = PyroModel(mlp(1), "gaussian")
    samples = weight_samples(model.net)
    x = torch.randn(7, 4)
    x[5, 2] = float("nan")
    loader = DataLoader(TensorDataset(x), batch_size=3)
    for inputs in (x, loader):
        with pytest.raises(ValueError, match=r"non-finite outputs \(NaN or Inf\) for 1 of the batch's \d inputs \(rows \[5\] of the inputs\); those inputs hold NaN or Inf"):
            predict_from_samples(model, samples, inputs)
    unused = {"unused_diagnostic": torch.full((6,), float("inf")), "step_size": torch.tensor(float("nan"))}
    assert torch.isfinite(predict_from_samples(model, samples | unused, x[:5]).mean).all()  # sites the model does not read
    samples["0.weight"][2, 0, 1] = float("nan")  # a draw, not the inputs or the network's own weights
    with pytest.raises(ValueError, match=r"samples\['0.weight'\] holds NaN or Inf in draws \[2\] \(1 of 6\)"):
        predict_from_samples(model, samples, x[:5])


def test_an_output_site_in_a_subsampled_plate_is_refused():
    # every run (and every draw of a vectorised one) picked its own 10 of the 50 inputs: 10 rows that mixed inputs, and
    # an epistemic variance of 1.75 for draws that were all the same
    from bdl.infer import predict_function_model

    def model(x, y=None):
        slope = pyro.sample("slope", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0], subsample_size=10) as rows:
            return pyro.sample("obs", dist.Normal(slope * x[rows], 0.1), obs=None if y is None else y[rows])

    for parallel in (True, False):
        with pytest.raises(ValueError, match=r"output_site 'obs' is in plate 'data', subsampled \(10 of its 50 elements\) anew at each run"):
            predict_function_model(model, {"slope": torch.full((20,), 2.0)}, torch.linspace(-1, 1, 50), output_site="obs", task="regression", parallel=parallel)

    # told by the plate, not by two runs that may pick the same rows (1 of 2 of a plate of 2: kept 16 times in 40)
    def one_of_two(x, y=None):
        slope = pyro.sample("slope", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 2, subsample_size=1) as rows:
            return pyro.sample("obs", dist.Normal(slope * x[rows], 0.1), obs=y)

    for seed in range(10):
        torch.manual_seed(seed)
        with pytest.raises(ValueError, match="anew at each run"):
            predict_function_model(one_of_two, {"slope": torch.full((4,), 2.0)}, torch.tensor([-1.0, 1.0]), output_site="obs", task="regression")

    # fixed indices (subsample=, as bdl's own likelihoods pass them; a tensor, a list) are the same rows in every run: kept
    def fixed(indices):
        def model(x, y=None):
            slope = pyro.sample("slope", dist.Normal(0.0, 1.0))
            with pyro.plate("data", x.shape[0], subsample=indices) as rows:
                return pyro.sample("obs", dist.Normal(slope * x[torch.as_tensor(rows)], 0.1), obs=y)

        return model

    x, slopes = torch.linspace(-1, 1, 6), torch.tensor([1.0, 3.0])
    for indices in (torch.tensor([1, 3]), [1, 3]):
        prediction = predict_function_model(fixed(indices), {"slope": slopes}, x, output_site="obs", task="regression")
        torch.testing.assert_close(prediction.mean[:, 0], 2.0 * x[[1, 3]])


def _picked_features(x, w):
    return x[:, w > 0].sum(-1)  # the features a draw picks: an IndexError under a batch of draws


def _filled(x, w):
    return torch.full_like(x[:, 0], w[..., 0]) + x.sum(-1)  # a TypeError (a fill value of several) under a batch


def _asserted(x, w):
    mean = (x * w).sum(-1)
    assert mean.shape == x.shape[:1]  # a model's own shape check: an AssertionError under a batch
    return mean


@pytest.mark.parametrize("mean_of, error", [(_picked_features, IndexError), (_filled, TypeError), (_asserted, AssertionError)])
def test_parallel_none_runs_a_model_that_fails_under_a_batch_of_draws_one_draw_at_a_time(mean_of, error):
    # the fallback caught RuntimeError and ValueError only: these raised, also at the end of a bdl.mcmc run with
    # predict_inputs, whose samples were then lost; parallel=True raises the model's own error
    from bdl.infer import predict_function_model

    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("obs", dist.Normal(mean_of(x, w), 0.1), obs=y)

    x, w = torch.randn(10, 3, generator=torch.Generator().manual_seed(0)), torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    prediction = predict_function_model(model, {"w": w}, x, output_site="obs", task="regression", parallel=None)
    torch.testing.assert_close(prediction.mean[:, 0], torch.stack([mean_of(x, draw) for draw in w]).mean(0))
    with pytest.raises(error):
        predict_function_model(model, {"w": w}, x, output_site="obs", task="regression", parallel=True)
