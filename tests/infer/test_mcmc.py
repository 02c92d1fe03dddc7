import math
import sys
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.mcmc.util import summary as pyro_summary
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bdl
from bdl.infer import PosteriorSummary, PyroModel, mcmc
from bdl.infer.diagnostics import ess_mean


def test_nuts_recovers_the_exact_posterior_within_monte_carlo_error(nuts_run, linear_regression):
    data, result = linear_regression, nuts_run
    w = data.slope_intercept(result.samples)
    assert w.shape == (400, 2) and result.chain_samples["weight"].shape == (2, 200, 1, 1)
    ess = torch.stack([result.summary["weight"]["n_eff"].reshape(()), result.summary["bias"]["n_eff"].reshape(())]).double()
    assert (ess > 100).all()
    # 4 Monte Carlo standard errors: sd / sqrt(ESS) for the mean, ~ sd / sqrt(2 ESS) for the std
    assert ((w.mean(0) - data.mean).abs() < 4 * data.std / ess.sqrt()).all()
    assert ((w.std(0) / data.std - 1).abs() < 4 / (2 * ess).sqrt()).all()
    assert result.summary.max_r_hat < 1.01
    assert sum(result.diagnostics["divergences"]) == 0 and len(result.diagnostics["acceptance_rate"]) == 2
    assert all(type(count) is int for count in result.diagnostics["divergences"])  # a count (floats before)


def test_nuts_summary_shows_the_slope_interval_covering_the_truth_with_r_hat_and_ess(nuts_run):
    summary = nuts_run.summary
    slope = summary["weight"]
    assert slope["5.0%"].item() < 2.5 < slope["95.0%"].item()
    table = str(summary)
    header = table.splitlines()[0].split()
    assert header == ["parameter", "mean", "std", "5.0%", "25.0%", "50.0%", "75.0%", "95.0%", "n_eff", "r_hat", "ess_bulk", "ess_tail", "rank_r_hat"]
    assert any(line.startswith("weight[0,0]") for line in table.splitlines())


def test_mcmc_prediction_has_the_exact_epistemic_and_aleatoric_variance(nuts_run, linear_regression):
    data, prediction = linear_regression, nuts_run.prediction
    assert prediction.task == "regression" and prediction.mean.shape == (50, 1)
    design = torch.cat([data.x, torch.ones(50, 1)], dim=1).double()
    exact_mean = design @ data.mean
    exact_var = ((design @ data.cov) * design).sum(1)  # Var f(x) = [x, 1] Sigma [x, 1]^T
    torch.testing.assert_close(prediction.aleatoric_variance, torch.full((50, 1), data.noise_std**2))
    assert ((prediction.mean[:, 0].double() - exact_mean).abs() < 4 * exact_var.sqrt() / 10).all()
    assert ((prediction.epistemic_variance[:, 0].double() / exact_var - 1).abs() < 0.3).all()


def test_bdl_predict_of_an_mcmc_result_points_to_its_own_predict(nuts_run, linear_regression):
    # "model must be an nn.Module or a callable, got MCMCResult"
    with pytest.raises(TypeError, match=r"model is a bdl.infer.MCMCResult, which predicts from its own draws: result.predict\(x\)"):
        bdl.predict(nuts_run, linear_regression.x)


def test_summary_uses_pyros_r_hat_and_stans_ess_and_flags_chains_that_disagree():
    generator = torch.Generator().manual_seed(0)
    mixed = torch.randn(2, 400, 3, generator=generator)
    stuck = mixed + torch.tensor([0.0, 3.0]).reshape(2, 1, 1)  # second chain centred elsewhere
    good, bad = PosteriorSummary({"z": mixed}), PosteriorSummary({"z": stuck})
    reference = pyro_summary({"z": mixed.double()})["z"]
    torch.testing.assert_close(good["z"]["r_hat"], reference["r_hat"])
    torch.testing.assert_close(good["z"]["mean"], reference["mean"])
    torch.testing.assert_close(good["z"]["std"], reference["std"])
    torch.testing.assert_close(good["z"]["n_eff"], ess_mean(mixed))  # ArviZ's ESS of the mean (test_diagnostics)
    assert ((good["z"]["n_eff"] / reference["n_eff"] - 1).abs() < 0.05).all()  # near Pyro's on long chains
    torch.testing.assert_close(good["z"]["95.0%"], mixed.reshape(-1, 3).double().quantile(0.95, dim=0), atol=0.02, rtol=0)
    assert good.max_r_hat < 1.01 and bad.max_r_hat > 1.5
    # an element that never changes has no ESS (0 / 0), and must not take the others' with it (Pyro's did)
    frozen = mixed.clone()
    frozen[..., 1] = 0.5
    partly = PosteriorSummary({"z": frozen})["z"]
    assert torch.isnan(partly["n_eff"][1]) and torch.isnan(partly["r_hat"][1])
    torch.testing.assert_close(partly["n_eff"][[0, 2]], good["z"]["n_eff"][[0, 2]])
    torch.testing.assert_close(partly["r_hat"][[0, 2]], reference["r_hat"][[0, 2]])
    # nor hide them from the headline numbers (torch's max is NaN when one element is: a "max_r_hat > 1.01"
    # check passed for chains that disagree)
    frozen_bad = stuck.clone()
    frozen_bad[..., 1] = 0.5
    assert PosteriorSummary({"z": frozen_bad}).max_r_hat == pytest.approx(float(bad["z"]["r_hat"][[0, 2]].max()))
    assert PosteriorSummary({"z": frozen_bad}).min_ess == pytest.approx(float(bad["z"]["n_eff"][[0, 2]].min()))
    assert math.isnan(PosteriorSummary({"z": torch.zeros(2, 10)}).max_r_hat)  # no element moved: no answer
    assert bad.min_ess < 20 < good.min_ess
    with pytest.raises(ValueError, match="num_chains"):
        PosteriorSummary({"z": torch.randn(10)})


def test_hmc_on_a_model_function_with_predictions_at_new_inputs():
    generator = torch.Generator().manual_seed(1)
    x = torch.linspace(-1, 1, 30)
    y = 1.5 * x + 0.3 * torch.randn(30, generator=generator)

    def model(x, y=None):
        slope = pyro.sample("slope", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(x)):
            return pyro.sample("obs", dist.Normal(slope * x, 0.3), obs=y)

    new_x = torch.tensor([-2.0, 0.0, 2.0])
    # counts as numpy integers (from a sweep's array): taken as bdl's other counts are
    result = mcmc(
        model, x, y, kernel="hmc", num_samples=np.int64(150), warmup_steps=np.int64(100), num_chains=np.int32(1), seed=np.int64(0),
        kernel_options={"trajectory_length": 1.0}, predict_inputs=(new_x,), task="regression",
    )
    exact_precision = (x * x).sum() / 0.09 + 1 / 100
    exact_mean = (x * y).sum() / 0.09 / exact_precision
    slope = result.samples["slope"]
    assert abs(slope.mean() - exact_mean) < 0.25 * exact_precision.rsqrt()  # a quarter of the posterior sd
    # predictions read the observation site: spread = noise and slope uncertainty
    assert result.prediction.mean.shape == (3, 1)
    torch.testing.assert_close(result.prediction.mean[:, 0], exact_mean * new_x, atol=0.15, rtol=0)
    assert 0.2 < result.prediction.total_variance[1, 0].sqrt() < 0.4


def test_predictions_of_a_model_function_that_does_not_broadcast_over_draws():
    x = torch.randn(40, 2)
    y = x @ torch.tensor([1.0, -2.0]) + 0.1 * torch.randn(40)

    def model(x, y=None):  # `x @ w` cannot take a batch of draws of w
        w = pyro.sample("w", dist.Normal(torch.zeros(2), 10.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("obs", dist.Normal(x @ w, 0.1), obs=y)

    new_x = torch.randn(5, 2)
    # the run's samples were lost to a shape error in the vectorised prediction at the end
    result = mcmc(model, x, y, num_samples=30, warmup_steps=30, num_chains=1, seed=0, predict_inputs=(new_x,), task="regression")
    samples = result.samples["w"]
    torch.testing.assert_close(result.prediction.mean[:, 0], new_x @ samples.mean(0), atol=0.05, rtol=0)
    with pytest.raises(RuntimeError):
        result.predict((new_x,), task="regression", parallel=True)


def test_mcmc_validates_its_arguments(linear_regression):
    data = linear_regression
    model = PyroModel(nn.Linear(1, 1), "gaussian", num_data=1000)
    with pytest.raises(ValueError, match="num_data"):
        mcmc(model, data.x, data.y, num_samples=10)
    with pytest.raises(ValueError, match="hmc"):
        mcmc(model, data.x, data.y, kernel="gibbs")
    with pytest.raises(ValueError, match="chain_method"):
        mcmc(model, data.x, data.y, chain_method="vectorized")
    with pytest.raises(ValueError, match="num_chains"):
        mcmc(model, data.x, data.y, num_chains=0)
    with pytest.raises(ValueError, match=r"warmup_steps must be an int >= 0 or None, got -1"):
        mcmc(model, data.x, data.y, warmup_steps=-1)
    with pytest.raises(ValueError, match=r"num_samples must be an int >= 4, got 2.0"):
        mcmc(model, data.x, data.y, num_samples=2.0)
    # each checked after every chain had run (a lost run), or by Pyro/numpy/random without naming the argument
    fits = PyroModel(nn.Linear(1, 1), "gaussian")
    with pytest.raises(ValueError, match=r"quantiles must be numbers in \(0, 1\), got \(0.05, 95\)"):
        mcmc(fits, data.x, data.y, quantiles=(0.05, 95))
    with pytest.raises(ValueError, match="quantiles must be distinct levels"):
        mcmc(fits, data.x, data.y, quantiles=(0.05, 0.05))
    with pytest.raises(TypeError, match="predict_inputs must be a tensor, batches of tensors or a Dataset, got ndarray: convert numpy"):
        mcmc(fits, data.x, data.y, predict_inputs=data.x.numpy())
    with pytest.raises(TypeError, match="predict_inputs must be the tuple of the model's arguments, got dict"):
        mcmc(lambda x: None, data.x, predict_inputs={"x": data.x}, task="regression")
    for seed in (-1, 2**40, 1.5, True):
        with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*32\) or None"):
            mcmc(fits, data.x, data.y, seed=seed)
    with pytest.raises(ValueError, match=r"kernel_options\['jit_compile'\] works for model functions only"):
        mcmc(fits, data.x, data.y, kernel_options={"jit_compile": True})
    with pytest.raises(TypeError, match="kernel_options must be a dict of the Pyro kernel's arguments, got list"):
        mcmc(fits, data.x, data.y, kernel_options=[("target_accept_prob", 0.9)])
    for target in (2.0, 0.0, "high"):  # Pyro took 2.0 and adapted its step size towards it
        with pytest.raises(ValueError, match=r"kernel_options\['target_accept_prob'\] must be a number in \(0, 1\)"):
            mcmc(fits, data.x, data.y, kernel_options={"target_accept_prob": target})
    # a network random in eval mode: every transition diverged after minutes, with advice about the step size
    network = nn.Sequential(nn.Linear(1, 8), nn.Dropout(0.5), nn.Linear(8, 1))
    nn.init.constant_(network[2].bias, 1000.0)  # noise 1e-5 of the output: within a tolerance of 1e-4
    with pytest.raises(ValueError, match="mcmc: the network's output is random in eval mode"):
        mcmc(PyroModel(bdl.MCDropout(network), "gaussian"), data.x, data.y)


def test_parallel_chains_sample_the_exact_posterior_in_worker_processes(linear_regression, monkeypatch):
    """chain_method="parallel": Pyro runs each chain in its own process where there are more CPUs than chains;
    made to do so here on any machine. The workers are spawned: forked ones failed on a CUDA machine once
    autograd had run (autograd's device threads cannot be forked)."""
    import torch.multiprocessing

    monkeypatch.setattr(torch.multiprocessing, "cpu_count", lambda: 8)
    torch.ones(1, requires_grad=True).sum().backward()  # autograd's threads have started in this process
    data = linear_regression
    result = mcmc(data.pyro_model(), data.x, data.y, num_samples=100, warmup_steps=60, num_chains=2,
                  chain_method="parallel", seed=0, kernel_options={"full_mass": True})  # fmt: skip
    assert result.chain_samples["weight"].shape == (2, 100, 1, 1) and len(result.diagnostics["divergences"]) == 2
    w = data.slope_intercept(result.samples)
    ess = result.summary["weight"]["n_eff"].reshape(()).double()
    assert ((w.mean(0) - data.mean).abs() < 4 * data.std / ess.sqrt()).all()
    assert result.summary.max_r_hat < 1.05 and result.prediction.mean.shape == (50, 1)


def test_unseeded_parallel_runs_seed_their_chain_processes_afresh(linear_regression, monkeypatch):
    # Pyro seeds the chain processes from torch.initial_seed(), which draws do not move: every unseeded call
    # sampled the same chains
    import sys

    bdl_mcmc = sys.modules["bdl.infer.mcmc"]  # the module: bdl.infer.mcmc the attribute is the function
    seeds = []

    class Stop(Exception):
        pass

    class Recording:
        def __init__(self, *args, **kwargs):
            pass

        def run(self, *args):
            seeds.append(torch.initial_seed())
            raise Stop

    monkeypatch.setattr(bdl_mcmc, "MCMC", Recording)
    data = linear_regression
    torch.manual_seed(5)
    for _ in range(2):
        with pytest.raises(Stop):
            mcmc(data.pyro_model(), data.x, data.y, num_chains=2, chain_method="parallel")
    assert seeds[0] != seeds[1]
    assert torch.initial_seed() == 5  # bdl's data modules take their data order from it


def test_predictive_summary_is_the_r_hat_and_ess_of_each_chains_predictions(nuts_run, linear_regression):
    x = linear_regression.x[:5]
    summary = nuts_run.predictive_summary(x)
    weight, bias = nuts_run.chain_samples["weight"], nuts_run.chain_samples["bias"]  # [2, 200, 1, 1], [2, 200, 1]
    means = (weight[:, :, None, 0, 0] * x[:, 0] + bias).unsqueeze(-1)  # f(x) per chain and draw: [2, 200, 5, 1]
    reference = pyro_summary({"mean": means.double()})["mean"]
    torch.testing.assert_close(summary["mean"]["r_hat"], reference["r_hat"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(summary["mean"]["n_eff"], ess_mean(means), rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(summary["mean"]["mean"], means.double().mean((0, 1)), rtol=1e-4, atol=1e-5)
    # the known noise variance is the same in every draw: converged and exact, not NaN
    assert (summary["variance"]["r_hat"] == 1).all() and torch.isinf(summary["variance"]["n_eff"]).all()
    assert (summary["variance"]["rank_r_hat"] == 1).all() and torch.isinf(summary["variance"]["ess_bulk"]).all()
    assert torch.isinf(summary["variance"]["ess_tail"]).all()
    assert 1 - 1e-3 < summary.max_r_hat < 1.01 and summary.min_ess > 100
    assert summary.max_rank_r_hat < 1.05 and summary.min_ess_bulk > 100 and summary.min_ess_tail > 100  # 2 x 200 draws


def _two_chain_result(model, chains):
    """An MCMCResult from given draws ``{site: [2, S, ...]}`` (no sampling)."""
    from bdl.infer.mcmc import MCMCResult

    samples = {name: value.reshape(-1, *value.shape[2:]) for name, value in chains.items()}
    return MCMCResult(samples, chains, PosteriorSummary(chains), {"divergences": [0.0, 0.0], "acceptance_rate": [0.8, 0.8]}, None, model)


def test_chains_in_symmetric_copies_of_a_mode_disagree_in_weight_space_but_agree_in_function_space():
    # tanh(-z) = -tanh(z): flipping a hidden unit's input weights, bias and output weight, and swapping the
    # two hidden units, leave the network's function unchanged
    model = PyroModel(nn.Sequential(nn.Linear(1, 2), nn.Tanh(), nn.Linear(2, 1)), "gaussian", likelihood_options={"noise_std": 0.1})
    generator = torch.Generator().manual_seed(0)
    mode = {"0.weight": torch.tensor([[1.5], [-0.7]]), "0.bias": torch.tensor([0.3, 0.2]), "2.weight": torch.tensor([[2.0, 1.0]]), "2.bias": torch.tensor([0.1])}

    def draws():
        return {name: value + 0.02 * torch.randn(400, *value.shape, generator=generator) for name, value in mode.items()}

    first, second = draws(), draws()
    flipped = {
        "0.weight": -second["0.weight"].flip(1),  # hidden units swapped and sign-flipped
        "0.bias": -second["0.bias"].flip(1),
        "2.weight": -second["2.weight"].flip(2),
        "2.bias": second["2.bias"],
    }
    symmetric = _two_chain_result(model, {name: torch.stack([first[name], flipped[name]]) for name in mode})
    x = torch.linspace(-2, 2, 7).unsqueeze(1)
    assert symmetric.summary.max_r_hat > 10  # the weight-space diagnostic calls this unconverged
    function_space = symmetric.predictive_summary(x)
    assert function_space.max_r_hat < 1.02 and function_space.min_ess > 300
    assert symmetric.summary.max_rank_r_hat > 1.5 and function_space.max_rank_r_hat < 1.02
    # chains that differ in function are flagged in function space too
    shifted = {**second, "2.bias": second["2.bias"] + 0.5}
    different = _two_chain_result(model, {name: torch.stack([first[name], shifted[name]]) for name in mode})
    assert different.predictive_summary(x).max_r_hat > 1.5 and different.predictive_summary(x).max_rank_r_hat > 1.5


def test_predictive_summary_of_class_probabilities_reports_saturated_ones_as_converged():
    def model(x, y=None):
        scale = pyro.sample("scale", dist.Normal(0.0, 1.0))
        first = scale * x  # [S, N] when the samples are vectorised
        logits = pyro.deterministic("logits", torch.stack([first, torch.zeros_like(first), torch.full_like(first, -200.0)], -1))
        with pyro.plate("data", x.shape[-1]):
            return pyro.sample("obs", dist.Categorical(logits=logits), obs=y)

    generator = torch.Generator().manual_seed(0)
    result = _two_chain_result(model, {"scale": 1 + 0.1 * torch.randn(2, 300, generator=generator)})
    summary = result.predictive_summary(torch.tensor([0.5, 1.0]), output_site="logits", task="classification")
    probs = summary["probs"]
    assert probs["r_hat"].shape == (2, 3)
    # class 2's probability is 0 in every draw (logit -200): converged, exact; the others mixed
    assert (probs["r_hat"][:, 2] == 1).all() and torch.isinf(probs["n_eff"][:, 2]).all()
    assert (probs["r_hat"][:, :2] < 1.02).all() and (probs["n_eff"][:, :2] > 300).all()
    with pytest.raises(ValueError, match="task"):
        result.predictive_summary(torch.tensor([0.5]))
    # chains that never moved from a common start are not "converged": every output stays NaN
    stuck = _two_chain_result(model, {"scale": torch.ones(2, 300)})
    stuck_probs = stuck.predictive_summary(torch.tensor([0.5]), output_site="logits", task="classification")["probs"]
    assert torch.isnan(stuck_probs["r_hat"]).all() and torch.isnan(stuck_probs["n_eff"]).all()


def test_summary_n_eff_is_at_most_s_log10_s_on_short_chains():
    draws = torch.randn(4, 10, generator=torch.Generator().manual_seed(292), dtype=torch.float64)  # 40 independent draws
    summary = PosteriorSummary({"a": draws})
    # ArviZ's ess(method="mean") gives 64.08239965311849 = 40 log10(40) (Stan's cap); Pyro's ESS gave 568.8
    assert float(summary["a"]["n_eff"]) == pytest.approx(64.08239965311849, rel=1e-10)
    assert summary.min_ess == pytest.approx(64.08239965311849, rel=1e-10)


def test_summary_of_draws_with_nan_warns_naming_them_and_has_nan_headline_numbers():
    generator = torch.Generator().manual_seed(0)
    clean = torch.randn(4, 200, generator=generator, dtype=torch.float64)
    broken = torch.randn(4, 200, generator=generator, dtype=torch.float64)
    broken[0, 100:] = math.nan  # half of one chain
    with pytest.warns(RuntimeWarning, match=r"w\[0\] hold NaN"):
        summary = PosteriorSummary({"w": torch.stack([broken, clean], -1), "b": torch.randn(4, 200, generator=generator)})
    row = summary["w"]
    for column in summary.columns:
        assert torch.isnan(row[column][0]), column  # quantiles too: sorting put the NaN last, "5.0%" looked fine
    # the clean element keeps its own numbers (Pyro's ESS of the site was NaN for both)
    assert float(row["n_eff"][1]) == pytest.approx(float(ess_mean(clean)), rel=1e-12)
    assert float(row["r_hat"][1]) < 1.01 and float(row["n_eff"][1]) > 400
    # the broken element's R-hat is unknown, so is the largest: it was the clean element's, 0.997
    for name in ("max_r_hat", "max_rank_r_hat", "min_ess", "min_ess_bulk", "min_ess_tail"):
        assert math.isnan(getattr(summary, name)), name
    # an element equal in every draw is still left out (0 / 0): not a reason for NaN
    frozen = torch.stack([clean, torch.full_like(clean, 0.5)], -1)
    assert PosteriorSummary({"w": frozen}).min_ess == pytest.approx(float(ess_mean(clean)), rel=1e-12)
    # but one infinite in every draw is not a 0 / 0 to leave out: max_r_hat looked converged (1.0009)
    with pytest.warns(RuntimeWarning, match=r"the draws of w\[1\] hold NaN or infinite values"):
        overflowed = PosteriorSummary({"w": torch.stack([clean, torch.full_like(clean, math.inf)], -1)})
    assert math.isnan(overflowed.max_r_hat) and math.isnan(overflowed.max_rank_r_hat)


def test_quantile_columns_keep_levels_below_a_tenth_of_a_percent_and_refuse_equal_labels():
    draws = torch.randn(2, 2000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    summary = PosteriorSummary({"a": draws}, quantiles=(0.0005, 0.001, 0.0254, 0.025))
    assert summary.columns[2:6] == ["0.05%", "0.1%", "2.54%", "2.5%"]
    exact = pyro.ops.stats.quantile(draws.reshape(-1), [0.0005, 0.001, 0.0254, 0.025], dim=0)
    for label, value in zip(summary.columns[2:6], exact):
        assert float(summary["a"][label]) == float(value)  # each its own level: "0.1%" twice showed one value
    assert len({float(summary["a"][label]) for label in summary.columns[2:6]}) == 4
    assert PosteriorSummary({"a": draws}).columns[2:7] == ["5.0%", "25.0%", "50.0%", "75.0%", "95.0%"]  # as they were
    with pytest.raises(ValueError, match="distinct"):
        PosteriorSummary({"a": draws}, quantiles=(0.5, 0.5))
    # levels as tensors (torch.tensor([0.05, 0.95]), iterated): read as numbers; they were refused as out of (0, 1)
    assert PosteriorSummary({"a": draws}, quantiles=torch.tensor([0.05, 0.5])).columns[2:4] == ["5.0%", "50.0%"]
    with pytest.raises(ValueError, match=r"quantiles must be numbers in \(0, 1\)"):
        PosteriorSummary({"a": draws}, quantiles=("5%",))
    assert PosteriorSummary({"a": draws}, quantiles=(q for q in (0.05, 0.5))).columns[2:4] == ["5.0%", "50.0%"]  # "no len()"
    for level in (0.5, torch.tensor(0.5), np.float64(0.5), np.array(0.5)):  # one level ("iteration over a 0-d tensor")
        assert PosteriorSummary({"a": draws}, quantiles=level).columns[2] == "50.0%"


def regression_model(x, y=None):
    """Module level, so worker processes can import it."""
    slope = pyro.sample("slope", dist.Normal(0.0, 2.0))
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("obs", dist.Normal(slope * x, 0.5), obs=y)


class SamplingStarted(Exception):
    pass


@pytest.fixture
def no_sampling(monkeypatch):
    """bdl's MCMC replaced by one that stops at once: what mcmc checks before sampling, without sampling."""
    import sys

    class Stopping:
        def __init__(self, *args, **kwargs):
            raise SamplingStarted

    monkeypatch.setattr(sys.modules["bdl.infer.mcmc"], "MCMC", Stopping)


def _fake_main(monkeypatch, path=None):
    """``__main__`` replaced by a module holding ``regression_model``'s code as ``model`` (with ``__file__`` = ``path``)."""
    import sys
    import types

    main = types.ModuleType("__main__")
    if path is not None:
        main.__file__ = str(path)
    model = types.FunctionType(regression_model.__code__, regression_model.__globals__, "model")
    model.__module__, model.__qualname__ = "__main__", "model"
    main.model = model
    monkeypatch.setitem(sys.modules, "__main__", main)
    return model


@pytest.mark.parametrize("case", ["local", "notebook", "main_guard", "stdin"])
def test_parallel_chains_refuse_a_model_that_worker_processes_cannot_load(case, monkeypatch, no_sampling, tmp_path):
    """Spawned workers that could not unpickle the model died, and Pyro waited for their chains forever: a trial
    process spawned first must load it."""
    import torch.multiprocessing

    monkeypatch.setattr(torch.multiprocessing, "cpu_count", lambda: 4)  # Pyro runs 2 chains in processes
    x = torch.linspace(-1, 1, 20)
    if case == "local":

        def model(x, y=None):
            return regression_model(x, y)

        expected = "cannot be sent to one \\((AttributeError|PicklingError)"
    elif case == "notebook":
        model, expected = _fake_main(monkeypatch), "a trial one could not load the model \\(exit code 1"
    elif case == "main_guard":
        script = tmp_path / "script.py"
        script.write_text('import pyro\n\nif __name__ == "__main__":\n    def model(x, y=None):\n        pass\n    main()\n')
        model, expected = _fake_main(monkeypatch, script), "a trial one could not load the model"
    else:  # python - < script.py: the worker runs __main__'s "file" first, whatever the model
        _fake_main(monkeypatch, "<stdin>")
        model, expected = regression_model, "a trial one could not load the model .*: the script, '<stdin>', is no file"
    with pytest.raises(ValueError, match=rf"parallel.*{expected}.*chain_method=\"sequential\""):
        mcmc(model, x, 1.5 * x, num_samples=20, warmup_steps=20, num_chains=2, chain_method="parallel", seed=0)


def test_parallel_chains_refuse_a_script_whose_workers_would_run_its_mcmc_call_again(tmp_path):
    """A script without an ``if __name__ == "__main__":`` guard: each spawned worker ran it again up to its mcmc
    call, failed there, and Pyro waited for the chains forever (the static checks of the first version passed it)."""
    import subprocess
    import sys

    script = tmp_path / "no_guard.py"
    script.write_text(
        "import torch, torch.multiprocessing\n"
        "torch.multiprocessing.cpu_count = lambda: 4  # Pyro runs 2 chains in processes on any machine\n"
        "import pyro, pyro.distributions as dist\n"
        "from bdl.infer import mcmc\n\n"
        "def model(x, y=None):\n"
        "    w = pyro.sample('w', dist.Normal(0.0, 1.0))\n"
        "    with pyro.plate('data', x.shape[0]):\n"
        "        return pyro.sample('obs', dist.Normal(w * x, 0.5), obs=y)\n\n"
        "x = torch.linspace(-1, 1, 20)\n"
        "mcmc(model, x, 1.5 * x, num_samples=4, warmup_steps=4, num_chains=2, chain_method='parallel')\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
    assert done.returncode != 0 and "a trial one could not load the model" in done.stderr, done.stderr[-2000:]


def test_parallel_chains_are_refused_in_a_daemonic_process(monkeypatch):
    # a DataLoader's worker may start no process: the message blamed the model's definition
    import types

    import torch.multiprocessing

    monkeypatch.setattr(torch.multiprocessing, "cpu_count", lambda: 4)
    bdl_mcmc = sys.modules["bdl.infer.mcmc"]
    monkeypatch.setattr(bdl_mcmc.multiprocessing, "current_process", lambda: types.SimpleNamespace(daemon=True))
    x = torch.linspace(-1, 1, 20)
    with pytest.raises(ValueError, match="a daemonic process .* may not do: use chain_method=\"sequential\" there"):
        mcmc(regression_model, x, 1.5 * x, num_samples=20, num_chains=2, chain_method="parallel")


def test_parallel_chains_name_data_with_an_autograd_graph_as_what_cannot_be_sent(monkeypatch):
    import torch.multiprocessing

    monkeypatch.setattr(torch.multiprocessing, "cpu_count", lambda: 4)
    x = torch.linspace(-1, 1, 20, requires_grad=True) * 1.0  # not a leaf: refused by the pickler
    with pytest.raises(ValueError, match=r"the data \(a tensor with an autograd graph: pass it detached, x.detach\(\)\) cannot be sent"):
        mcmc(regression_model, x, 1.5 * x, num_samples=20, num_chains=2, chain_method="parallel")


def test_parallel_chains_accept_a_model_that_worker_processes_can_load(monkeypatch, no_sampling, tmp_path, linear_regression):
    import torch.multiprocessing

    monkeypatch.setattr(torch.multiprocessing, "cpu_count", lambda: 4)
    x = torch.linspace(-1, 1, 20)
    script = tmp_path / "script.py"
    script.write_text('def model(x, y=None):\n    pass\n\nif __name__ == "__main__":\n    main()\n')
    data = linear_regression
    for model in (regression_model, _fake_main(monkeypatch, script)):  # importable; defined at a script's top level
        with pytest.raises(SamplingStarted):
            mcmc(model, x, 1.5 * x, num_samples=20, num_chains=2, chain_method="parallel", seed=0)
    with pytest.raises(SamplingStarted):
        mcmc(data.pyro_model(), data.x, data.y, num_samples=20, num_chains=2, chain_method="parallel", seed=0)
    # chains that run one after another (more chains than spare CPUs) are not checked: a local model works there
    local = lambda x, y=None: regression_model(x, y)  # noqa: E731
    with pytest.raises(SamplingStarted):
        mcmc(local, x, 1.5 * x, num_samples=20, num_chains=4, chain_method="parallel", seed=0)


def test_predict_inputs_that_do_not_fit_the_model_are_refused_before_sampling(no_sampling):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(30, 3, generator=generator)
    y = (x[:, 0] > 0).long()
    model = PyroModel(nn.Linear(3, 2), "categorical")
    with pytest.raises(ValueError, match=r"predict_inputs do not fit the network.*\(1, 7\)"):  # was after sampling
        mcmc(model, x, y, num_samples=20, predict_inputs=torch.randn(5, 7), seed=0)
    nan = torch.randn(5, 3)
    nan[3, 1] = float("nan")  # "sample_means must be finite" once every chain had run
    for inputs in (nan, TensorDataset(nan), DataLoader(TensorDataset(nan), batch_size=2)):
        with pytest.raises(ValueError, match=r"predict_inputs hold NaN or Inf in rows \[3\] \(1 of 5\); checked before sampling"):
            mcmc(model, x, y, num_samples=20, predict_inputs=inputs, seed=0)
    with pytest.raises(SamplingStarted):  # a loader that never reads the NaN row
        mcmc(model, x, y, num_samples=20, predict_inputs=DataLoader(TensorDataset(nan), sampler=[0, 1, 2, 4]), seed=0)
    with pytest.raises(SamplingStarted):  # inputs that fit, as a tensor or as batches
        mcmc(model, x, y, num_samples=20, predict_inputs=torch.randn(5, 3), seed=0)
    with pytest.raises(SamplingStarted):
        mcmc(model, x, y, num_samples=20, predict_inputs=[(torch.randn(5, 3), torch.zeros(5))], seed=0)
    line = torch.linspace(-1, 1, 20)
    with pytest.raises(ValueError, match="output_site 'mean' is not a site"):
        mcmc(regression_model, line, line, num_samples=20, predict_inputs=(line,), task="regression", output_site="mean")
    with pytest.raises(ValueError, match="model function fails on predict_inputs"):
        mcmc(regression_model, line, line, num_samples=20, predict_inputs=("not a tensor",), task="regression")
    state = torch.get_rng_state()
    with pytest.raises(SamplingStarted):
        mcmc(regression_model, line, line, num_samples=20, predict_inputs=(line[:3],), task="regression")
    assert torch.equal(torch.get_rng_state(), state)  # the trial run drew from a forked generator


def _normed_line() -> nn.Module:
    """A PyroModule regression line behind a BatchNorm (not Bayesian), in training mode as built."""
    from pyro.nn import PyroModule, PyroSample

    class Normed(PyroModule):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.BatchNorm1d(1)
            self.fc = PyroModule[nn.Linear](1, 1)
            self.fc.weight = PyroSample(dist.Normal(0.0, 2.0).expand([1, 1]).to_event(2))
            self.fc.bias = PyroSample(dist.Normal(0.0, 2.0).expand([1]).to_event(1))

        def forward(self, x, y=None):
            mean = self.fc(self.norm(x)).squeeze(-1)  # outside the plate: one weight for every row
            with pyro.plate("data", x.shape[0]):
                return pyro.sample("obs", dist.Normal(mean, 0.5), obs=y)

    return Normed()


def test_the_predict_inputs_check_leaves_valid_inputs_and_the_model_as_they_were(no_sampling):
    # the first version of the check moved a BatchNorm's statistics (training mode), used up a stream's first
    # batch, refused a convolutional network's longer sequences and a prior it could not sample
    from pyro.infer.autoguide import init_to_value
    from torch.distributions import constraints
    from torch.utils.data import DataLoader, IterableDataset

    x = torch.randn(30, 1, generator=torch.Generator().manual_seed(0))
    normed = _normed_line()
    with pytest.raises(SamplingStarted):
        mcmc(normed, x, 1.5 * x[:, 0], num_samples=20, predict_inputs=(5 + x[:10],), task="regression")
    assert normed.norm.running_mean.item() == 0 and normed.training

    class Once(IterableDataset):  # a stream that can be read once
        def __init__(self) -> None:
            self.rows = iter(torch.randn(12, 3))

        def __iter__(self):
            yield from self.rows

    stream = DataLoader(Once(), batch_size=4)
    with pytest.raises(SamplingStarted):
        mcmc(PyroModel(nn.Linear(3, 2)), x.expand(30, 3), torch.arange(30) % 2, num_samples=20, predict_inputs=stream)
    assert sum(len(batch) for batch in stream) == 12
    # a loader's rows as its own collate_fn makes them ([2, 2] items flattened): read without it they failed
    flattening = DataLoader(torch.randn(10, 2, 2), batch_size=5, collate_fn=lambda items: torch.stack(items).flatten(1))
    with pytest.raises(SamplingStarted):
        mcmc(PyroModel(nn.Linear(4, 2)), torch.randn(30, 4), torch.arange(30) % 2, num_samples=20, predict_inputs=flattening)
    batches = [(torch.randn(10, 4), torch.zeros(10)) for _ in range(4)]  # items that are batches: batch_size=None
    with pytest.raises(SamplingStarted):
        mcmc(PyroModel(nn.Linear(4, 2)), torch.randn(30, 4), torch.arange(30) % 2, num_samples=20,
             predict_inputs=DataLoader(batches, batch_size=None))  # fmt: skip

    class PerPosition(nn.Module):  # x [B, T] -> [B, T], any length
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(1, 1, 3, padding=1)

        def forward(self, x):
            return self.conv(x[:, None, :])[:, 0, :]

    sequences = torch.randn(16, 10)
    with pytest.raises(SamplingStarted):
        mcmc(PyroModel(PerPosition(), "gaussian"), sequences, sequences, num_samples=20, predict_inputs=torch.randn(4, 12))

    def flat_prior(x, y=None):
        w = pyro.sample("w", dist.ImproperUniform(constraints.real, (), ()))
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("obs", dist.Normal(w * x, 0.5), obs=y)

    line = torch.linspace(-1, 1, 20)
    options = {"init_strategy": init_to_value(values={"w": torch.tensor(0.0)}), "max_plate_nesting": 1}
    with pytest.raises(SamplingStarted):
        mcmc(flat_prior, line, line, num_samples=20, predict_inputs=(line[:3],), task="regression", kernel_options=options)


def test_a_module_model_predicts_in_eval_mode():
    # result.prediction ran a PyroModule in training mode: its BatchNorm's statistics moved to the new inputs
    x = torch.randn(30, 1, generator=torch.Generator().manual_seed(0))
    normed = _normed_line()
    mcmc(normed, x, 1.5 * x[:, 0], num_samples=6, warmup_steps=6, predict_inputs=(5 + x[:10],), task="regression", seed=0)
    assert normed.norm.running_mean.item() == 0 and normed.training
    normed.norm.eval()  # a frozen submodule stays frozen: restoring the top module's mode set it training again
    mcmc(normed, x, 1.5 * x[:, 0], num_samples=6, warmup_steps=6, predict_inputs=(5 + x[:10],), task="regression", seed=0)
    assert normed.training and not normed.norm.training


def test_mcmc_names_the_first_row_of_data_holding_nan():
    x, y = torch.randn(20, 3, generator=torch.Generator().manual_seed(0)), torch.arange(20) % 2
    x[4, 1] = math.nan
    with pytest.raises(ValueError, match=r"mcmc: x \(the inputs\) must be finite, got NaN or inf in 1 of 20 rows, the first at row 4"):
        mcmc(PyroModel(nn.Linear(3, 2)), x, y, num_samples=4, warmup_steps=2, num_chains=1)
    targets = torch.zeros(20)
    targets[[7, 9]] = math.inf
    with pytest.raises(ValueError, match=r"y \(the targets\) must be finite, got NaN or inf in 2 of 20 rows, the first at row 7"):
        mcmc(PyroModel(nn.Linear(3, 1), "gaussian"), x.nan_to_num(), targets, num_samples=4, warmup_steps=2, num_chains=1)


def test_divergent_transitions_after_warmup_raise_a_warning_with_the_count_per_chain():
    y = torch.randn(20, generator=torch.Generator().manual_seed(0)) + 3

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(y)):
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=y)

    with pytest.warns(UserWarning, match=r"divergent transitions after warm-up \(per chain: \[\d+, \d+\]\).*target_accept_prob") as caught:
        result = mcmc(model, y, num_samples=30, warmup_steps=0, num_chains=2, seed=0, kernel_options={"step_size": 3.0, "adapt_step_size": False})
    counts = [int(count) for count in result.diagnostics["divergences"]]
    assert sum(counts) > 0 and any(f"per chain: {counts}" in str(warning.message) for warning in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # an adapted step size: no divergence, no warning
        quiet = mcmc(model, y, num_samples=30, warmup_steps=50, num_chains=2, seed=0)
    assert sum(quiet.diagnostics["divergences"]) == 0


def test_a_network_whose_outputs_are_not_finite_on_the_data_is_named_when_sampling_cannot_start():
    # Pyro's "Model specification seems incorrect - cannot find valid initial params", with nothing of the cause
    class LogFeatures(nn.Module):
        def forward(self, x):
            return x.log()

    x = torch.tensor([[1.0, 2.0], [-1.0, 2.0], [3.0, 1.0]])
    with pytest.raises(ValueError, match=r"the network's outputs are not finite for rows \[1\] of the data \(1 of 3\), whose inputs are finite"):
        mcmc(PyroModel(nn.Sequential(LogFeatures(), nn.Linear(2, 1)), "gaussian"), x, torch.zeros(3, 1), num_samples=4, warmup_steps=2, seed=0)
