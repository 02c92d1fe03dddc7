import copy

import lightning as L
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn
from pyro.infer.autoguide import AutoNormal as PyroAutoNormal
from pyro.nn import PyroModule, PyroParam
from torch.utils.data import DataLoader, TensorDataset

import bdl
from bdl.infer import PyroModel, SVIModule, svi


def trainer(**options):
    defaults = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    return L.Trainer(**{**defaults, **options})


def check_recovers_the_exact_posterior(fitted, data, corr_tolerance):
    w = data.slope_intercept(fitted.sample_posterior(20_000))
    # Tolerances (one-particle SVI, 400 steps): mean to 0.25 posterior std, std to 20%, correlation (exact
    # -0.58) to corr_tolerance.
    assert ((w.mean(0) - data.mean).abs() / data.std).max() < 0.25
    assert ((w.std(0) / data.std) - 1).abs().max() < 0.2
    exact_corr = data.cov[0, 1] / data.std.prod()
    assert abs(torch.corrcoef(w.T)[0, 1] - exact_corr) < corr_tolerance


def test_full_rank_guide_recovers_the_exact_posterior_of_linear_regression(full_rank_svi, linear_regression):
    """The conjugate posterior is in the family, so SVI must find its mean, stds and correlation."""
    check_recovers_the_exact_posterior(full_rank_svi, linear_regression, corr_tolerance=0.1)


def test_low_rank_guide_recovers_the_exact_posterior_of_linear_regression(linear_regression):
    """Rank 1 + diagonal spans every 2 x 2 covariance; it learns its factor more slowly (looser correlation)."""
    data = linear_regression
    fitted = svi(data.pyro_model(), data.x, data.y, guide="lowrank_normal", rank=1, num_steps=400, optimizer=data.fast_adam, lr_decay=1e-3, init_scale=0.1)
    check_recovers_the_exact_posterior(fitted, data, corr_tolerance=0.25)


def test_mean_field_recovers_the_mean_and_the_precision_diagonal(linear_regression):
    """KL(q || p)-optimal mean field: exact mean, std 1 / sqrt(Lambda_ii) (0.81 of the marginal std), no correlation."""
    data = linear_regression
    fitted = svi(data.pyro_model(), data.x, data.y, guide="normal", num_steps=400, optimizer=data.fast_adam, lr_decay=1e-3, init_scale=0.1)
    w = data.slope_intercept(fitted.sample_posterior(20_000))
    assert ((w.mean(0) - data.mean).abs() / data.std).max() < 0.25
    assert ((w.std(0) / data.mean_field_std) - 1).abs().max() < 0.25
    assert abs(torch.corrcoef(w.T)[0, 1]) < 0.05


def test_svi_warns_when_the_loss_is_still_falling_at_the_end(recwarn):
    # the defaults (lr 1e-2 decayed 100x over 1000 steps) left a weight of 5 at 2.1, and the fit said nothing
    torch.manual_seed(0)
    x = torch.randn(100, 1)
    y = 5 * x[:, 0] + 0.5 * torch.randn(100)

    def model():
        return PyroModel(nn.Linear(1, 1), "gaussian", prior_scale=10.0, likelihood_options={"noise_std": 0.5})

    with pytest.warns(UserWarning, match=r"svi: the loss was still falling at the end \(mean .* over the last 100 steps"):
        short = svi(model(), x, y)
    assert short.sample_posterior(1000)["weight"].mean() < 3
    recwarn.clear()
    fitted = svi(model(), x, y, lr=0.1)  # converged: no warning
    assert not [w for w in recwarn if "still falling" in str(w.message)]
    assert abs(fitted.sample_posterior(1000)["weight"].mean() - 4.94) < 0.1


def test_map_guide_finds_the_posterior_mode(linear_regression):
    data = linear_regression
    fitted = svi(data.pyro_model(), data.x, data.y, guide="delta", num_steps=300, optimizer=data.fast_adam, lr_decay=1e-3)
    w = data.slope_intercept(fitted.sample_posterior(2))
    assert torch.equal(w[0], w[1])  # a point mass
    assert ((w[0] - data.mean).abs() / data.std).max() < 0.1  # Gaussian posterior: mode = mean
    assert fitted.lr_decay == 1e-3 and fitted.hparams.lr_decay == 1e-3  # recorded as 1.0 (a constant rate)


def test_advi_on_a_normal_model_with_unknown_mean_and_scale():
    """The seed's ADVI example: y ~ N(5, 2), 200 points; a plain Pyro model function, AutoNormal guide."""
    generator = torch.Generator().manual_seed(0)
    y = 5.0 + 2.0 * torch.randn(200, generator=generator)

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        sigma = pyro.sample("sigma", dist.HalfNormal(10.0))
        with pyro.plate("data", len(y)):
            pyro.sample("obs", dist.Normal(mu, sigma), obs=y)

    adam = lambda params: torch.optim.Adam(params, lr=0.2, betas=(0.8, 0.9))  # noqa: E731
    fitted = svi(model, y, guide="normal", num_steps=300, optimizer=adam, lr_decay=1e-2, init_scale=0.1)
    posterior = fitted.sample_posterior(4000)
    mu, sigma = posterior["mu"], posterior["sigma"]
    # exact: mean ~ sample mean, std ~ sample std / sqrt(200) = 0.14
    assert abs(mu.mean() - y.mean()) < 0.05
    assert 0.1 < mu.std() < 0.18
    low, high = mu.quantile(0.05), mu.quantile(0.95)
    assert low < 5.0 < high
    assert abs(sigma.mean() - y.std()) < 0.15


def classification_data(n=64):
    x = torch.randn(n, 2)
    return x, (x[:, 0] + x[:, 1] > 0).long()


def test_guide_parameters_exist_before_the_optimizer_and_are_in_the_state_dict():
    module = SVIModule(PyroModel(nn.Linear(2, 2), "categorical", num_data=64), "normal")
    optimizer = module.configure_optimizers()
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    guide_params = list(module.guide.parameters())
    assert len(guide_params) == 4 and all(id(p) in optimised for p in guide_params)
    assert {"elbo.guide.locs.weight_unconstrained", "elbo.guide.scales.bias_unconstrained"} <= set(module.state_dict())
    # guide initialised at the network's weights with a small scale
    torch.testing.assert_close(module.guide.locs.weight, module.model.net.weight.detach())
    torch.testing.assert_close(module.guide.scales.weight, torch.full((2, 2), 0.01))


def test_lightning_training_logs_elbo_nll_and_kl_separately():
    x, y = classification_data()
    model = PyroModel(nn.Linear(2, 2), "categorical", num_data=64)
    module = SVIModule(model, "normal", lr=0.05)
    run = trainer(max_epochs=3, log_every_n_steps=1)
    run.fit(module, DataLoader(TensorDataset(x, y), batch_size=16), DataLoader(TensorDataset(x, y), batch_size=32))
    metrics = run.callback_metrics
    for name in ("train/elbo_epoch", "train/nll_epoch", "train/kl_epoch", "val/elbo", "val/nll", "val/kl"):
        assert torch.isfinite(metrics[name]), name
    torch.testing.assert_close(metrics["val/elbo"], -(metrics["val/nll"] + metrics["val/kl"]))
    assert metrics["val/kl"] > 0 and metrics["val/nll"] > 0
    # num_data=64 with batches of 32: the NLL is on the scale of the whole training set
    loss, nll, kl = module.loss(x[:32], y[:32])
    with torch.no_grad():
        mean_nll = torch.nn.functional.cross_entropy(module.model.net(x[:32]), y[:32])
    assert 0.5 * 64 * mean_nll < nll < 2 * 64 * mean_nll + 10


def test_checkpoint_restores_and_resumes_the_guide(tmp_path):
    x, y = classification_data()
    data = DataLoader(TensorDataset(x, y), batch_size=16)
    module = SVIModule(PyroModel(nn.Linear(2, 2), "categorical", num_data=64), "lowrank_normal", lr=0.05)
    run = trainer(max_epochs=2)
    run.fit(module, data)
    path = tmp_path / "svi.ckpt"
    run.save_checkpoint(path)

    restored = SVIModule.load_from_checkpoint(path, model=PyroModel(nn.Linear(2, 2), "categorical", num_data=64))
    assert restored.hparams.guide == "lowrank_normal"
    for name, value in module.guide.state_dict().items():
        torch.testing.assert_close(restored.guide.state_dict()[name], value)
    torch.manual_seed(1)
    expected = module.sample_posterior(5)
    torch.manual_seed(1)
    actual = restored.sample_posterior(5)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name])

    # resuming continues from the saved step with the saved guide
    resumed = SVIModule(PyroModel(nn.Linear(2, 2), "categorical", num_data=64), "lowrank_normal", lr=0.05)
    run2 = trainer(max_epochs=3)
    run2.fit(resumed, data, ckpt_path=path)
    assert run2.global_step == 3 * 4
    assert not torch.equal(resumed.guide.loc, module.guide.loc)  # it trained on


def test_instances_do_not_share_parameters_through_pyros_param_store():
    first = SVIModule(PyroModel(nn.Linear(2, 2), "categorical", num_data=64), "normal", lr=0.1)
    second = SVIModule(PyroModel(nn.Linear(2, 2), "categorical", num_data=64), "normal", lr=0.1)
    before = {k: v.clone() for k, v in second.guide.state_dict().items()}
    x, y = classification_data()
    optimizer = first.configure_optimizers()
    for _ in range(5):
        optimizer.zero_grad()
        first.loss(x, y)[0].backward()
        optimizer.step()
    second.loss(x, y)  # a call after the first trained must still use its own parameters
    for name, value in second.guide.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert not torch.equal(first.guide.locs.weight, second.guide.locs.weight)
    assert len(pyro.get_param_store()) == 0
    # called through Pyro itself (Predictive, guide()), a guide synced its parameters with the global store by
    # name: the second guide took the first one's parameter objects, and its posterior
    from pyro.infer import Predictive

    for module in (first, second):
        Predictive(module.elbo.model, guide=module.guide, num_samples=2)(x, y)
    for name, value in second.guide.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert second.guide.locs.weight_unconstrained is not first.guide.locs.weight_unconstrained
    delta = [SVIModule(PyroModel(nn.Linear(2, 2), "categorical", num_data=64), "delta") for _ in range(2)]
    values = [module.guide.median(x, y)["weight"].clone() for module in delta]  # the second took the first's
    assert not torch.equal(values[0], values[1])


@pytest.mark.parametrize("guide", ["normal", "delta", "multivariate_normal"])
def test_training_a_guide_leaves_the_users_network_alone(guide):
    # AutoNormal/AutoDelta keep their initial values' memory as locations: with the network's own tensors
    # there, every optimiser step trained the user's network too
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2))
    before = {name: value.clone() for name, value in net.state_dict().items()}
    x, y = classification_data()
    fitted = svi(PyroModel(net, "categorical", num_data=len(x)), x, y, guide=guide, num_steps=20, lr=0.05)
    for name, value in net.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert fitted.guide is not None


def test_sample_outputs_run_the_network_in_eval_mode_after_a_fit():
    # after svi the module is in training mode: a direct call fired dropout and moved BatchNorm's statistics
    torch.manual_seed(0)
    x, y = torch.randn(64, 3), torch.randint(0, 3, (64,))
    net = nn.Sequential(nn.Linear(3, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
    module = svi(PyroModel(net, "categorical"), x, y, guide="delta", num_steps=5)
    assert module.training
    statistics = net[1].running_mean.clone()
    draws = module.sample_outputs(10 * torch.randn(32, 3), 4)  # a point-mass posterior: equal draws in eval mode
    assert torch.equal(draws[0], draws[3]) and not draws.requires_grad
    assert torch.equal(net[1].running_mean, statistics) and module.training and net[3].training
    assert module(torch.randn(1, 3)).shape == (1, 3)  # one input: BatchNorm in training mode raised
    # it draws its own samples: bdl.predict's method is ignored, as documented ('batched' was refused as inexact)
    probs = []
    for method in ("loop", "batched"):
        torch.manual_seed(1)
        probs.append(bdl.predict(module, x, num_samples=3, method=method).probs)
    assert torch.equal(*probs)


def test_trainer_predict_gives_a_prediction_per_batch():
    # Lightning's default predict_step called forward(batch): "'list' object has no attribute 'device'"
    x, y = classification_data()
    module = svi(PyroModel(nn.Linear(2, 2), "categorical"), x, y, guide="delta", num_steps=5)
    batches = trainer().predict(module, DataLoader(TensorDataset(x, y), batch_size=40))
    assert [type(b).__name__ for b in batches] == ["Prediction"] * 2
    torch.testing.assert_close(bdl.Prediction.cat(batches).probs, module.predict(x).probs)  # a point mass: equal draws
    with pytest.raises(TypeError, match="needs a PyroModel"):
        svi(counts_model, torch.tensor([1.0, 3.0]), num_steps=2).predict_step(torch.ones(2), 0)


def test_fit_refuses_a_model_without_num_data():
    x, y = classification_data()
    module = SVIModule(PyroModel(nn.Linear(2, 2), "categorical"), "normal")
    with pytest.raises(ValueError, match="num_data"):
        trainer(max_epochs=1).fit(module, DataLoader(TensorDataset(x, y), batch_size=16))


def test_invalid_options_are_rejected_with_the_valid_names():
    model = PyroModel(nn.Linear(2, 2), "categorical", num_data=64)
    with pytest.raises(ValueError, match="lowrank_normal"):
        SVIModule(model, "laplace")
    with pytest.raises(ValueError, match="mean_field"):
        SVIModule(model, "normal", elbo="renyi")
    with pytest.raises(ValueError, match="mean-field guide"):
        SVIModule(model, "multivariate_normal", elbo="mean_field")
    with pytest.raises(ValueError, match="adam"):
        SVIModule(model, "normal", optimizer="lbfgs")
    with pytest.raises(ValueError, match="rank"):
        SVIModule(model, "normal", rank=2)
    with pytest.raises(ValueError, match=r"validate must be one of \['first', 'always', 'never'\], got 'once'"):
        SVIModule(model, "normal", validate="once")
    # infinity passed the checks that refuse 0 and NaN, and failed later ("loss is not finite", Pyro's "loc")
    with pytest.raises(ValueError, match="lr must be a positive finite number, got inf"):
        SVIModule(model, "normal", lr=float("inf"))
    with pytest.raises(ValueError, match="init_scale must be a positive finite number, got inf"):
        SVIModule(model, "normal", init_scale=float("inf"))
    with pytest.raises(ValueError, match="min_std must be a finite number >= 0, got inf"):
        PyroModel(nn.Linear(2, 2), "gaussian_heteroscedastic", likelihood_options={"min_std": float("inf")})

    def linear_model(x, y=None):
        slope = pyro.sample("slope", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(slope * x, 1.0), obs=y)

    with pytest.raises(TypeError, match=r"needs arguments to set the guide up .*missing 1 required.*pass example_args=\(x, y\)"):
        SVIModule(linear_model)  # Python's own message alone never named example_args
    assert SVIModule(linear_model, example_args=(torch.zeros(3),)).guide is not None


@pytest.mark.parametrize("validate, expected", [("first", [True, False, False]), ("always", [True] * 3), ("never", [False] * 3)])
def test_pyro_validation_runs_on_the_steps_asked_for(validate, expected, monkeypatch):
    flags = []
    real = pyro.validation_enabled

    def recording(is_validate=True):
        flags.append(is_validate)
        return real(is_validate)

    x, y = classification_data()
    module = SVIModule(PyroModel(nn.Linear(2, 2), "categorical", num_data=64), "normal", validate=validate)
    monkeypatch.setattr(pyro, "validation_enabled", recording)
    for _ in range(3):
        module.loss(x, y)
    assert flags == expected


def counts_model(y):
    rate = pyro.sample("log_rate", dist.Normal(0.0, 1.0)).exp()
    with pyro.plate("data", len(y)):
        pyro.sample("obs", dist.Poisson(rate), obs=y)


def test_first_step_validation_catches_observations_outside_the_support():
    counts = torch.tensor([1.0, -2.0, 3.0])  # a negative count: outside the Poisson's support
    with pytest.raises(ValueError, match="support"):
        SVIModule(counts_model, "normal", example_args=(counts,)).loss(counts)
    unchecked = SVIModule(counts_model, "normal", example_args=(counts,), validate="never")
    unchecked.loss(counts)  # not caught: the reason to check at least the first step
    # Lightning's sanity check validates first, without gradients: that batch used the check up
    module = SVIModule(counts_model, "normal", example_args=(counts,))
    with torch.no_grad():
        module.loss(torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="support"):
        module.loss(counts)


@pytest.mark.slow
def test_pyro_bnn_on_digits_is_as_accurate_as_a_plain_mlp():
    from bdl.data import load_digits

    splits = load_digits(seed=0)
    x_test, y_test = splits.test.tensors

    def net():
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    torch.manual_seed(0)
    mlp = net()
    optimizer = torch.optim.Adam(mlp.parameters(), lr=1e-2)
    for _ in range(10):
        for xb, yb in DataLoader(splits.train, batch_size=128, shuffle=True):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(mlp(xb), yb).backward()
            optimizer.step()
    mlp_accuracy = (mlp(x_test).argmax(1) == y_test).float().mean().item()

    torch.manual_seed(0)
    model = PyroModel(net(), "categorical", num_data=len(splits.train), prior_scale=1.0)
    module = SVIModule(model, "normal", lr=2e-2)
    trainer(max_epochs=8).fit(module, DataLoader(splits.train, batch_size=128, shuffle=True))
    prediction = module.predict(DataLoader(splits.test, batch_size=256), num_samples=50)
    bnn_accuracy = (prediction.predicted_class == prediction.targets).float().mean().item()
    assert bnn_accuracy > 0.9 and bnn_accuracy > mlp_accuracy - 0.03, (bnn_accuracy, mlp_accuracy)
    assert (prediction.mutual_information >= -1e-6).all() and prediction.mutual_information.mean() > 0


def test_a_validation_batch_larger_than_the_training_set_is_evaluated():
    # the sanity check failed with "num_data must be the size of the whole training set (>= the batch size 50)":
    # a dense validation grid over a small training set; a training batch that large is still refused
    torch.manual_seed(0)
    train = DataLoader(TensorDataset(torch.randn(20, 2), torch.randint(0, 2, (20,))), batch_size=10)
    val = DataLoader(TensorDataset(torch.randn(100, 2), torch.randint(0, 2, (100,))), batch_size=50)
    module = SVIModule(PyroModel(nn.Linear(2, 2), "categorical", num_data=20), lr=1e-2)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train, val)
    assert torch.isfinite(trainer.callback_metrics["val/elbo"])
    with pytest.raises(ValueError, match="num_data must be the size of the whole training set"):
        module.loss(torch.randn(50, 2), torch.randint(0, 2, (50,)))


def test_a_pyro_model_without_targets_or_with_another_data_size_is_refused():
    # svi(model, x) fitted the 50 targets as latent variables (slope -0.07 for 3) and loss(x) raised KeyError: 'obs';
    # num_data=1000 for 20 points shrank the posterior std 6x
    x, y = torch.randn(20, 1), torch.randn(20)

    def model(num_data=20):
        return PyroModel(nn.Linear(1, 1), "gaussian", num_data=num_data)

    with pytest.raises(ValueError, match=r"needs the data as tensors: svi\(model, x, y"):
        svi(model(), x, num_steps=1)
    with pytest.raises(ValueError, match="needs \\(inputs, targets\\) batches"):
        SVIModule(model()).loss(x)
    with pytest.raises(ValueError, match=r"num_data \(1000\) must be None or the number of data points given \(20\)"):
        svi(model(1000), x, y, num_steps=1)


def test_posterior_draws_are_detached_copies_and_zero_samples_are_refused():
    # a delta guide's draws were views of its parameters: they required grad and changed with later steps
    x = torch.randn(30, 2)
    fitted = svi(PyroModel(nn.Linear(2, 1), "gaussian", num_data=30), x, x.sum(1), guide="delta", num_steps=10)
    draws = fitted.sample_posterior(3)
    before = draws["weight"].clone()
    assert not draws["weight"].requires_grad
    optimizer = torch.optim.SGD([p for p in fitted.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        fitted.loss(x, x.sum(1))[0].backward()
        optimizer.step()
    assert torch.equal(draws["weight"], before)
    for call in (lambda: fitted.sample_posterior(0), lambda: fitted.predict(x, num_samples=0)):  # 0 meant the default
        with pytest.raises(ValueError, match="num_samples must be a positive int, got 0"):
            call()


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_svi_stops_at_the_first_non_finite_loss_naming_the_step():
    # lr=1e8 diverges in a few steps: svi stepped on through NaN losses and returned a module with NaN parameters;
    # the cause is named: the guide's scales underflowed to 0
    x, y = torch.randn(20, 3, generator=torch.Generator().manual_seed(0)), torch.arange(20) % 2

    def fit(num_steps):
        torch.manual_seed(0)
        return svi(PyroModel(nn.Linear(3, 2), num_data=20), x, y, num_steps=num_steps, lr=1e8)

    with pytest.raises(FloatingPointError, match=r"svi: the loss is not finite at step (\d+) of 30 \(loss=(nan|inf|-inf)\); every parameter is finite, but the guide's scale is 0 in scales.weight \(6 of 6 entries\).*; lower lr=1e\+08") as caught:
        fit(30)
    step = int(caught.value.args[0].split("at step ")[1].split()[0])
    assert 1 < step < 30
    before = fit(step - 1)  # the same random stream: every loss before that step is finite
    assert len(before.losses) == step - 1 and all(torch.isfinite(torch.tensor(before.losses)))


def test_svi_names_the_first_row_of_data_holding_nan():
    # Pyro failed in the Categorical's argument check with a dump of NaN logits, not naming the data
    x, y = torch.randn(20, 3, generator=torch.Generator().manual_seed(0)), torch.arange(20) % 2
    x[4, 1] = float("nan")
    with pytest.raises(ValueError, match=r"svi: x \(the inputs\) must be finite, got NaN or inf in 1 of 20 rows, the first at row 4: x\[4\] = \[.*nan"):
        svi(PyroModel(nn.Linear(3, 2), num_data=20), x, y, num_steps=2)
    targets = torch.randn(20)
    targets[11] = float("nan")
    with pytest.raises(ValueError, match=r"y \(the targets\) must be finite, got NaN or inf in 1 of 20 rows, the first at row 11"):
        svi(PyroModel(nn.Linear(3, 1), "gaussian", num_data=20), x.nan_to_num(), targets, num_steps=2)
    with pytest.raises(ValueError, match=r"svi: x \(the inputs\) has no rows, got shape \(0, 3\)"):  # torch's reshape error
        svi(PyroModel(nn.Linear(3, 2)), x[:0], y[:0], num_steps=2)


def _pyro_line(shift: bool = False, sigma: bool = False) -> nn.Module:
    """y = slope x + bias + noise 0.5 as a PyroModule, slope and bias ~ N(0, 1); ``shift``: plus a learnt
    nn.Parameter; ``sigma``: the noise a learnt PyroParam."""
    from pyro.distributions import constraints
    from pyro.nn import PyroSample

    class Line(PyroModule):
        def __init__(self) -> None:
            super().__init__()
            self.fc = PyroModule[nn.Linear](1, 1)
            self.fc.weight = PyroSample(dist.Normal(0.0, 1.0).expand([1, 1]).to_event(2))
            self.fc.bias = PyroSample(dist.Normal(0.0, 1.0).expand([1]).to_event(1))
            self.shift = nn.Parameter(torch.zeros(())) if shift else None
            if sigma:
                self.sigma = PyroParam(torch.tensor(2.0), constraint=constraints.positive)

        def forward(self, x, y=None):
            mean = self.fc(x).squeeze(-1) + (0.0 if self.shift is None else self.shift)
            with pyro.plate("data", x.shape[0]):
                return pyro.sample("obs", dist.Normal(mean, self.sigma if sigma else 0.5), obs=y)

    return Line()


@pytest.mark.parametrize("call", ["module", "function", "bound forward"])
def test_svi_trains_a_model_made_of_pyro_modules_to_the_conjugate_posterior_mean(call):
    # "'_Context' object has no attribute 'param_state'": the guide's first call traced the PyroModules with
    # module-local parameters on, whose contexts had no local store (a model function calling one too)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(50, 1, generator=generator)
    y = 1.5 * x[:, 0] + 0.5 * torch.randn(50, generator=generator)
    features = torch.cat([x, torch.ones_like(x)], 1).double()
    precision = torch.eye(2, dtype=torch.float64) + features.T @ features / 0.25
    mean = torch.linalg.solve(precision, features.T @ y.double() / 0.25)  # (slope, intercept)
    net = _pyro_line()
    model = {"module": net, "function": lambda x, y=None: net(x, y), "bound forward": net.forward}[call]
    pyro.set_rng_seed(0)
    module = svi(model, x, y, num_steps=500, lr=0.05)
    locs = dict(module.guide.named_parameters())
    fitted = torch.stack([locs["locs.fc.weight_unconstrained"].reshape(()), locs["locs.fc.bias_unconstrained"].reshape(())])
    torch.testing.assert_close(fitted.double(), mean, atol=0.05, rtol=0)


def test_a_module_parameter_that_a_model_function_hides_from_svi_is_refused():
    net = _pyro_line(shift=True)
    x = torch.randn(20, 1, generator=torch.Generator().manual_seed(0))
    for guide in ("normal", PyroAutoNormal(lambda x, y=None: net(x, y))):
        with pytest.raises(ValueError, match=r"sites \['shift'\] would not be trained: .*; \['shift'\] belong to a module the model function calls: pass that module as the model"):
            svi(lambda x, y=None: net(x, y), x, x[:, 0], guide=guide, num_steps=2)
    svi(net, x, x[:, 0] + 1, guide="normal", num_steps=100, lr=0.05)  # the module itself: its shift is trained
    assert net.shift.item() > 0.3  # 0 untrained; it shares the offset of 1 with the bias


def test_svi_leaves_a_pyro_modules_frozen_and_non_contiguous_parameters_as_they_are_meant():
    # a frozen feature layer under a Bayesian head was unfrozen by Pyro's parameter store and trained; a channels_last
    # (non-contiguous) parameter, which the store copies, was refused as "would not be trained"
    class Model(PyroModule):
        def __init__(self) -> None:
            super().__init__()
            self.frozen = PyroModule[nn.Linear](1, 1).requires_grad_(False)
            self.line = _pyro_line()
            self.strided = nn.Parameter(torch.zeros(2, 2).t())  # not contiguous

        def forward(self, x, y=None):
            return self.line(self.frozen(x) + self.strided.sum(), y)

    x = torch.randn(20, 1, generator=torch.Generator().manual_seed(0))
    for guide in ("normal", "delta"):
        model = Model()
        before = model.frozen.weight.detach().clone()
        svi(model, x, x[:, 0] + 1, guide=guide, num_steps=30, lr=0.05)
        assert torch.equal(model.frozen.weight, before) and not model.frozen.weight.requires_grad
        assert model.strided.requires_grad and model.strided.abs().sum() > 0 and not model.strided.is_contiguous()
    # a frozen module called by a function: not refused (frozen is meant), and still frozen, with a user's guide too
    features = PyroModule[nn.Linear](1, 1).requires_grad_(False)
    model = lambda x, y=None: _line_after(features, x, y)  # noqa: E731
    for guide in ("normal", PyroAutoNormal(model)):
        svi(model, x, x[:, 0], guide=guide, num_steps=2)
        assert not features.weight.requires_grad
    # and after NUTS, whose set-up traces Pyro blocks (a later svi trained the layer)
    model = Model()
    bdl.mcmc(model, x, x[:, 0], num_samples=4, warmup_steps=4, seed=0)
    assert not model.frozen.weight.requires_grad


def _line_after(features: nn.Module, x: torch.Tensor, y=None):
    slope = pyro.sample("slope", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("obs", dist.Normal(slope * features(x)[:, 0], 0.5), obs=y)


def test_a_copied_fitted_guide_is_accepted_again_and_the_advice_is_per_site():
    net = _pyro_line(sigma=True)
    x = torch.randn(20, 1, generator=torch.Generator().manual_seed(0))
    fitted = svi(net, x, x[:, 0], num_steps=5, lr=0.05)
    SVIModule(net, copy.deepcopy(fitted.guide), example_args=(x, x[:, 0])).loss(x, x[:, 0])  # refused: the copy's stale parameters

    def mixed(x, y=None):  # a pyro.param of its own, and a module's PyroParam
        b = pyro.param("b", torch.tensor(0.5))
        return net(x + b, y)

    with pytest.raises(ValueError, match=r"sites \['b', 'sigma'\] would not be trained: .*; make \['b'\] parameters of the model, .*; \['sigma'\] belong to a module the model function calls: pass that module"):
        svi(mixed, x, x[:, 0], num_steps=2)
    # a guide set up already needs no example arguments (a model function's did: "missing argument 'x'")
    function = lambda x, y=None: _line_after(nn.Identity(), x, y)  # noqa: E731
    SVIModule(function, svi(function, x, x[:, 0], num_steps=2).guide).loss(x, x[:, 0])


def test_a_guide_functions_pyro_param_that_svi_would_not_train_is_refused():
    # an AutoCallable's pyro.param stayed at its initial value: w's posterior mean -0.002 where Pyro's SVI learns 1.99
    from pyro import poutine
    from pyro.infer.autoguide import AutoCallable, AutoGuideList

    def model(x, y=None):
        w, b = pyro.sample("w", dist.Normal(0.0, 1.0)), pyro.sample("b", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("obs", dist.Normal(w * x + b, 0.5), obs=y)

    def guide_w(x, y=None):
        return {"w": pyro.sample("w", dist.Normal(pyro.param("w_loc", torch.tensor(0.0)), 0.1))}

    guide = AutoGuideList(model)
    guide.append(AutoCallable(model, guide_w))
    guide.append(PyroAutoNormal(poutine.block(model, hide=["w"])))
    x = torch.randn(20, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"sites \['w_loc'\] would not be trained: .*\['w_loc'\] are the guide's: make them a PyroModule guide's PyroParam"):
        svi(model, x, 2 * x, guide=guide, num_steps=2)


def test_a_model_pyro_param_that_svi_would_not_train_is_refused():
    # with a user's guide the model's pyro.param stayed at its initial value (sigma 2.0, where Pyro's own SVI
    # learns 0.3); with bdl's guides Pyro stopped with "not yet implemented"
    from pyro.distributions import constraints

    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        sigma = pyro.param("sigma", torch.tensor(2.0), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("obs", dist.Normal(w * x, sigma), obs=y)

    x = torch.randn(20, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"the pyro.param sites \['sigma'\] would not be trained: .*PyroParam"):
        svi(model, x, 1.5 * x, guide=PyroAutoNormal(model), num_steps=2)
    with pytest.raises(ValueError, match=r"the pyro.param sites \['sigma'\] would not be trained: .*PyroParam"):
        svi(model, x, 1.5 * x, num_steps=2)  # bdl's guides: Pyro stopped with "not yet implemented"
    module = SVIModule(model, example_args=(x, 1.5 * x))
    for _ in range(2):  # the second loss of a refused module trained silently
        with pytest.raises(ValueError, match=r"sites \['sigma'\] would not be trained"):
            module.loss(x, 1.5 * x)

    def points(x, y=None):  # no latent site: torch's "optimizer got an empty parameter list"
        return pyro.sample("obs", dist.Normal(pyro.param("w", torch.tensor(0.0)) * x, 1.0), obs=y)

    with pytest.raises(ValueError, match="SVIModule: nothing to train: the guide and the model hold no parameter"):
        svi(points, x, 1.5 * x, num_steps=2)


@pytest.mark.parametrize("guide", ["normal", "lowrank_normal", "multivariate_normal"])
@pytest.mark.parametrize("lightning_module", [False, True])
def test_a_guide_scale_that_underflowed_to_zero_is_named_as_the_cause(guide, lightning_module):
    # every parameter stays finite, so the error said "a NaN/inf in this batch's inputs" (bdl.lightning's) or named
    # no cause; a low-rank guide failed in a bare Cholesky error
    from bdl.lightning import SVIModule as LightningSVIModule

    x, y = torch.randn(32, 2, generator=torch.Generator().manual_seed(0)), torch.arange(32) % 2
    net = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 2))
    if lightning_module:
        module = LightningSVIModule(PyroModel(net, "categorical"), guide=guide, validate="never")
    else:
        module = SVIModule(PyroModel(net, "categorical", num_data=32), guide=guide, validate="never")
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.endswith(("scale_unconstrained", "scales.0.weight_unconstrained")):
                parameter[0] = -1e4  # softplus(-1e4) is 0 in float32
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    site, entries = ("scales.0.weight", "2 of 8") if guide == "normal" else ("scale", "1 of 22")
    if guide == "lowrank_normal":
        message = rf"SVIModule: the guide's covariance is singular \(linalg.cholesky: .*\): its scale is 0 in {site} \({entries} entries\)"
    else:
        message = rf"step 0.*; every parameter is finite, but the guide's scale is 0 in {site} \({entries} entries\) \(an unconstrained"
    with pytest.raises(FloatingPointError, match=message):
        trainer(max_epochs=1).fit(module, loader)


def test_svi_module_predict_runs_a_function_model_that_does_not_broadcast_over_draws_one_draw_at_a_time():
    # x @ w fails under a batch of draws w; predict's default (parallel=True) raised where MCMCResult.predict's fell back
    def model(x, y=None):
        w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("obs", dist.Normal(x @ w, 0.1), obs=y)

    x = torch.randn(30, 3, generator=torch.Generator().manual_seed(0))
    y = x @ torch.tensor([1.0, -1.0, 0.5])
    pyro.set_rng_seed(0)
    fitted = svi(model, x, y, num_steps=5, num_samples=8)
    with pytest.raises(RuntimeError):
        fitted.predict((x,), task="regression", parallel=True)
    pyro.set_rng_seed(1)
    prediction = fitted.predict((x,), task="regression", keep_samples=True)
    pyro.set_rng_seed(1)
    draws = fitted.sample_posterior(8)["w"]  # the same draws
    torch.testing.assert_close(prediction.sample_means[..., 0], draws @ x.T)


def test_collapsed_scales_names_the_guides_scales_not_sites_called_scale():
    # a network parameter named "scale" at 0 was read as a collapsed guide scale (AutoNormal's locs.scale, AutoDelta's
    # scale), and a loss that an overflowing input made NaN blamed it
    from bdl.infer.guides import collapsed_scales, make_guide
    from bdl.infer.predictive import private_param_store

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.zeros(1))
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            return self.lin(x) * self.scale

    model = PyroModel(Gated(), "categorical")
    for name in ("normal", "delta"):
        guide = make_guide(name, model)
        with private_param_store():
            guide(torch.randn(3, 2), torch.zeros(3, dtype=torch.long))
        assert collapsed_scales(guide) == []
    with torch.no_grad():
        guide = make_guide("normal", model)
        with private_param_store():
            guide(torch.randn(3, 2), torch.zeros(3, dtype=torch.long))
        guide.scales.scale_unconstrained.fill_(-1e4)
    assert collapsed_scales(guide) == ["scales.scale (1 of 1 entries)"]


def test_collapsed_scales_reads_a_guide_lists_parts_and_a_cholesky_factors_diagonal():
    # an AutoGuideList's parameters are named by part ("0.scales.a", "1.scale"): none was found
    from pyro import poutine
    from pyro.distributions import constraints
    from pyro.infer.autoguide import AutoDiagonalNormal, AutoGuideList, AutoMultivariateNormal
    from bdl.infer.guides import collapsed_scales
    from bdl.infer.predictive import private_param_store

    def two_sites(y):
        a = pyro.sample("a", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("obs", dist.Normal(a.sum(-1, keepdim=True) + b, 1.0), obs=y)

    guides = AutoGuideList(two_sites)
    guides.append(PyroAutoNormal(poutine.block(two_sites, expose=["a"])))
    guides.append(AutoDiagonalNormal(poutine.block(two_sites, expose=["b"])))
    with private_param_store():
        guides(torch.randn(20))
        with torch.no_grad():
            guides[0].scales.a_unconstrained.fill_(-1e4)
            guides[1].scale_unconstrained.fill_(-1e4)
        assert collapsed_scales(guides) == ["0.scales.a (2 of 2 entries)", "1.scale (1 of 1 entries)"]

    class CholeskyGuide(AutoMultivariateNormal):  # a scale_tril whose diagonal is its own (Pyro's: unit, and a scale)
        scale_tril_constraint = constraints.lower_cholesky

    guide = CholeskyGuide(two_sites)
    with private_param_store():
        guide(torch.randn(20))
        with torch.no_grad():
            guide.scale_tril_unconstrained[1, 1] = -1e4  # exp(-1e4): 0
        assert collapsed_scales(guide) == ["scale_tril (1 of 3 entries)"]
