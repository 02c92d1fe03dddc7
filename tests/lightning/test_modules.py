import copy
import math
import warnings

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import bdl
from bdl.lightning import (
    MLP,
    DeterministicModule,
    DigitsDataModule,
    EnsembleModule,
    MCDropoutModule,
    RegressionGapDataModule,
    SVIModule,
    VariationalModule,
)
from bdl.lightning.data import UncertaintyDataModule
from bdl.data import Splits


def trainer(tmp_path, **kwargs) -> L.Trainer:
    options = dict(
        max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    options.update(kwargs)
    return L.Trainer(**options)


class TinyData(UncertaintyDataModule):
    """32 training points in 4-D with 3 classes, 16 test points and 8 OOD points."""

    def __init__(self, num_train: int = 32, **kwargs) -> None:
        super().__init__(**kwargs)
        self.size = num_train

    def build(self) -> Splits:
        generator = torch.Generator().manual_seed(0)

        def part(n: int) -> TensorDataset:
            return TensorDataset(torch.randn(n, 4, generator=generator), torch.randint(0, 3, (n,), generator=generator))

        return Splits(part(self.size), part(16), part(16), TensorDataset(5 * torch.randn(8, 4, generator=generator)), num_classes=3)


def net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))


def test_variational_module_converts_the_network_and_its_loss_is_the_minibatch_elbo():
    module = VariationalModule(net(), prior_std=0.5, num_data=100)
    assert all(type(m) is not nn.Linear for m in module.model.modules())
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    torch.manual_seed(1)
    terms = module.training_loss(x, y)
    torch.manual_seed(1)
    nll = nn.functional.cross_entropy(module.model(x), y)
    kl = bdl.kl_divergence(module.model)
    assert torch.allclose(terms["nll"], nll) and torch.allclose(terms["kl"], kl)
    assert torch.allclose(terms["loss"], nll + kl / 100)


def test_variational_module_takes_num_data_from_the_data_module_and_warms_the_kl_weight_up(tmp_path):
    weights = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            weights.append(module.current_kl_weight())

    data = TinyData(num_train=32, batch_size=8)  # 4 batches per epoch
    module = VariationalModule(net(), kl_weight=0.5, kl_warmup_epochs=2)
    trainer(tmp_path, max_epochs=3, limit_val_batches=0, callbacks=[Record()]).fit(module, data)
    assert module.num_data == 32
    expected = [0.5 * min(1.0, step / 8) for step in range(12)]
    assert weights == pytest.approx(expected)

    # accumulating 3 batches per optimiser step: 2 steps per epoch (3 + the remaining 1), full weight after 2 epochs
    weights.clear()
    module = VariationalModule(net(), kl_weight=0.5, kl_warmup_epochs=2)
    trainer(tmp_path, max_epochs=3, limit_val_batches=0, accumulate_grad_batches=3, callbacks=[Record()]).fit(module, data)
    steps = [0, 0, 0, 1, 2, 2, 2, 3, 4, 4, 4, 5]  # global_step at each batch's start
    assert weights == pytest.approx([0.5 * min(1.0, step / 4) for step in steps])

    # a factor that changes between epochs (GradientAccumulationScheduler): the weight jumped to 0.5 at epoch 1
    # (global_step 2 over 1 step per epoch), or fell where the factor went down
    for schedule, expected in (({0: 1, 1: 4}, [0, 1 / 16, 2 / 16, 3 / 16] + [1 / 4] * 4 + [1 / 2] * 4),
                               ({0: 4, 1: 1}, [0] * 4 + [1 / 4, 5 / 16, 6 / 16, 7 / 16] + [1 / 2] * 4)):  # fmt: skip
        weights.clear()
        module = VariationalModule(net(), kl_weight=0.5, kl_warmup_epochs=2)
        accumulating = L.pytorch.callbacks.GradientAccumulationScheduler(schedule)
        trainer(tmp_path, max_epochs=3, limit_val_batches=0, callbacks=[Record(), accumulating]).fit(module, data)
        assert weights == pytest.approx(expected)


def test_the_kl_weight_outside_training_steps_is_the_fits_or_the_full_one(tmp_path):
    data = TinyData(num_train=32, batch_size=8)  # 4 batches per epoch
    # outside a fit's training (after trainer.validate) the weight is the full one, as before any Trainer: it raised
    # "the training loader's epoch has no length (an IterableDataset without __len__)", of a run with no training loader
    module = VariationalModule(net(), kl_weight=0.5, kl_warmup_epochs=2, num_data=32)
    trainer(tmp_path).validate(module, TinyData(batch_size=8))
    assert module.current_kl_weight() == 0.5
    # in a fit's validation, the training's weight: 0 in the sanity check (it raised there too), then the last step's
    seen = []

    class RecordValidation(L.Callback):
        def on_validation_start(self, trainer, module):
            seen.append(module.current_kl_weight())

    module = VariationalModule(net(), kl_weight=0.5, kl_warmup_epochs=2, save_report=False)
    trainer(tmp_path, max_epochs=1, num_sanity_val_steps=1, limit_val_batches=1, callbacks=[RecordValidation()]).fit(module, data)
    assert seen == pytest.approx([0.0, 0.5 * 3 / 8]) and module.current_kl_weight() == 0.5  # the epoch's last step's; after: full
    # resumed from the end of epoch 0, the sanity check's weight is one epoch's (it was 0: epoch 0 not yet "completed")
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    trainer(tmp_path, max_epochs=1, num_sanity_val_steps=0, limit_val_batches=1, enable_checkpointing=True, callbacks=[checkpoint]).fit(
        VariationalModule(net(), kl_weight=0.5, kl_warmup_epochs=2, save_report=False), data
    )
    seen.clear()
    module = VariationalModule(net(), kl_weight=0.5, kl_warmup_epochs=2, save_report=False)
    trainer(tmp_path, max_epochs=2, num_sanity_val_steps=1, limit_val_batches=1, callbacks=[RecordValidation()]).fit(
        module, data, ckpt_path=tmp_path / "checkpoints" / "last.ckpt"
    )
    assert seen[0] == pytest.approx(0.25)


def test_variational_module_uses_existing_bayesian_layers_as_they_are():
    model = nn.Sequential(bdl.BayesLinear(4, 8, prior=2.0), nn.ReLU(), nn.Linear(8, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module = VariationalModule(model, num_data=10)
    assert module.model is model and isinstance(module.model[2], nn.Linear)
    # options of the conversion meet a converted network: ignored, and said so (a MOPED centred prior was N(0, 1) silently)
    with pytest.warns(UserWarning, match=r"prior_std, center_prior_on_weights set how a plain network is converted.*ignored"):
        VariationalModule(model, num_data=10, prior_std=0.1, center_prior_on_weights=True)
    assert model[0].weight_prior.scale == 2.0


def test_num_train_samples_averages_the_nll_over_weight_samples():
    module = VariationalModule(net(), num_data=10, num_train_samples=4)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    torch.manual_seed(2)
    terms = module.training_loss(x, y)
    torch.manual_seed(2)
    nlls = [nn.functional.cross_entropy(module.model(x), y) for _ in range(4)]
    assert torch.allclose(terms["nll"], torch.stack(nlls).mean())


def test_ensemble_members_start_apart_and_each_gets_the_gradient_of_its_own_loss():
    module = EnsembleModule(net(), num_members=3)
    members = module.model.members
    assert not torch.equal(members[0][0].weight, members[1][0].weight)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    module.training_loss(x, y)["loss"].backward()
    for member in members:
        alone = [p.detach().clone().requires_grad_() for p in member.parameters()]
        out = torch.func.functional_call(member, dict(zip([n for n, _ in member.named_parameters()], alone)), (x,))
        grads = torch.autograd.grad(nn.functional.cross_entropy(out, y), alone)
        assert all(torch.allclose(p.grad, g, atol=1e-6) for p, g in zip(member.parameters(), grads))
    assert module.sample_prediction(x, None).num_samples == 3


@pytest.mark.parametrize("algorithm, value", [(None, 0.2), ("norm", 0.2), (None, -1.0)])
def test_gradient_clipping_by_norm_clips_each_ensemble_member_by_its_own_norm(tmp_path, algorithm, value):
    # Lightning clipped the norm of all members' gradients together: member 0 ended 0.07 from the network trained
    # alone; clipping the members by hand then took a negative value (which Lightning ignores) and flipped gradients
    data = DataLoader(TensorDataset(torch.randn(32, 4, generator=torch.Generator().manual_seed(0)), torch.arange(32) % 3), batch_size=8)
    options = dict(optimizer="sgd", momentum=0.0, lr=0.5, save_report=False)
    torch.manual_seed(1)
    ensemble = EnsembleModule(net(), num_members=3, **options)
    alone = [DeterministicModule(copy.deepcopy(member), **options) for member in ensemble.model.members]  # as they start
    for module in (ensemble, *alone):
        with warnings.catch_warnings(record=True) as caught:  # of the empty group of no member's parameters, every step
            warnings.simplefilter("always")
            trainer(tmp_path, max_epochs=2, limit_val_batches=0, gradient_clip_val=value, gradient_clip_algorithm=algorithm).fit(module, data)
        assert not [w for w in caught if "no gradient clipping will occur" in str(w.message)]
    for member, single in zip(ensemble.model.members, alone):  # every member as its network trained alone
        assert all(torch.equal(a, b) for a, b in zip(member.parameters(), single.model.parameters()))


class _OwnNoise(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        return self.linear(x) + torch.randn(len(x), 3)


def test_a_deterministic_modules_eval_samples_are_used_and_a_validation_loader_without_targets_is_named(tmp_path):
    # num_eval_samples was read as 1 in trainer.test/predict, where bdl.predict of the module took it
    module = DeterministicModule(_OwnNoise(), num_eval_samples=10)
    assert module.num_val_samples == 1  # 8, the base's: 8 identical forwards per validation batch once they were used
    x = torch.randn(6, 4)
    assert module.sample_prediction(x, module.num_eval_samples).num_samples == 10
    assert trainer(tmp_path).predict(module, DataLoader(TensorDataset(x), batch_size=6))[0].num_samples == 10
    # "object of type 'NoneType' has no len()"
    data = DataLoader(TensorDataset(torch.randn(16, 4), torch.arange(16) % 3), batch_size=8)
    with pytest.raises(ValueError, match=r"the validation loader must give \(inputs, targets\) batches"):
        trainer(tmp_path, num_sanity_val_steps=0).fit(DeterministicModule(net()), data, DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=8))


def test_ensemble_clipping_is_refused_where_lightnings_is_for_an_optimizer_that_unscales_in_its_step(tmp_path):
    # clipped by hand, the members' gradients were clipped while still scaled by the GradScaler (a clip of 100 made
    # the steps 200 times shorter); Lightning refuses this (a CPU GradScaler stands in for 16-mixed on a GPU)
    from lightning.pytorch.plugins.precision import MixedPrecision

    class FusedSGD(EnsembleModule):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, fused=True)

    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    data = DataLoader(TensorDataset(torch.randn(16, 4), torch.arange(16) % 3), batch_size=16)
    with pytest.raises(RuntimeError, match="The current optimizer, SGD, does not allow for gradient clipping"):
        trainer(tmp_path, max_steps=1, gradient_clip_val=100.0, plugins=[plugin], limit_val_batches=0).fit(
            FusedSGD(net(), num_members=2, save_report=False), data
        )


def test_mc_dropout_module_trains_with_dropout_and_predicts_with_it_in_eval_mode():
    model = nn.Sequential(nn.Linear(4, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3))
    module = MCDropoutModule(model).eval()
    prediction = module.sample_prediction(torch.randn(16, 4), 20)
    assert model[1].training is False
    assert bool((prediction.mutual_information > 0).all())
    with pytest.raises(ValueError, match="no dropout layer"):
        MCDropoutModule(net())
    inserted = MCDropoutModule(net(), p=0.1, insert_before=["2"])
    assert inserted.model.dropout_modules


def test_test_run_writes_the_evaluate_report_with_ood_metrics(tmp_path):
    torch.manual_seed(0)
    data = DigitsDataModule(ood="classes", ood_classes=[8, 9], batch_size=128)
    module = VariationalModule(MLP(64, 8, hidden=[32]), lr=1e-2, num_eval_samples=8)
    fit = trainer(tmp_path, max_epochs=3, logger=L.pytorch.loggers.CSVLogger(tmp_path, name="run"))
    fit.fit(module, data)
    results = fit.test(module, data, verbose=False)[0]
    report = module.report
    assert report.metrics["accuracy"] > 0.8
    assert len(report.prediction) == len(data.splits.test) and len(report.ood_prediction) == len(data.splits.ood)
    assert results["test/ood/predictive_entropy/auroc"] == pytest.approx(report.metrics["ood/predictive_entropy/auroc"])
    folder = tmp_path / "run" / "version_0"
    assert {"metrics.json", "report.md", "reliability_diagram.png"} <= {p.name for p in folder.iterdir()}
    logged = (folder / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/nll_epoch", "train/kl_epoch", "val/accuracy", "val/nll", "val/ece"} <= set(logged)


def test_the_ood_loader_is_drawn_with_the_test_loaders_random_numbers():
    # as bdl.evaluate: the test loader given again as the OOD loader is the same prediction, not one of other draws
    torch.manual_seed(0)
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    module = VariationalModule(MLP(4, 3, hidden=[16]), posterior_std_init=0.3, num_eval_samples=8, save_report=False)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    trainer(None).test(module, dataloaders=[loader, DataLoader(TensorDataset(x), batch_size=16)], verbose=False)
    report = module.report
    assert torch.equal(report.ood_prediction.mutual_information, report.prediction.mutual_information)
    assert all(value == 0.5 for key, value in report.metrics.items() if key.endswith("/auroc"))
    # the generator is given back as the test loader left it: what is drawn after is not the OOD loader's draws again
    ood = DataLoader(TensorDataset(x), batch_size=16)
    torch.manual_seed(1)
    trainer(None).test(module, dataloaders=[loader], verbose=False)
    iter(ood)  # (an iterator takes its workers' seed from the generator)
    alone = torch.rand(3)
    torch.manual_seed(1)
    trainer(None).test(module, dataloaders=[loader, ood], verbose=False)
    assert torch.equal(torch.rand(3), alone)


def test_modules_that_train_without_a_kl_warn_of_bayesian_layers():
    # a bayesianized network given to an ensemble or plain module trained its stds on the NLL alone, without a word
    bayesian = bdl.bayesianize(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 3)))
    for build in (lambda: DeterministicModule(bayesian), lambda: MCDropoutModule(bayesian), lambda: EnsembleModule(bayesian, num_members=2)):
        with pytest.warns(UserWarning, match=r"has Bayesian layers \(.*0.*\), which it trains on the NLL alone, without their KL"):
            build()
    with pytest.warns(UserWarning, match=r"has Bayesian layers \(BayesLinear\), which it trains"):
        DeterministicModule(bdl.BayesLinear(4, 3))  # the network itself: named by its type
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        VariationalModule(bayesian, num_data=10)
        DeterministicModule(nn.Linear(4, 3))
        DeterministicModule(bdl.BayesLinear(4, 3).requires_grad_(False))  # frozen: not trained

        class OwnLoss(DeterministicModule):  # a loss of one's own (with a KL, say): not judged
            def training_loss(self, x, y):
                return super().training_loss(x, y)

        OwnLoss(bayesian)


def test_digits_as_images_train_a_bayesian_cnn():
    # digits came as 64 features only: a CNN needed an nn.Unflatten of its own (awkward in a config)
    torch.manual_seed(0)
    flat, images = DigitsDataModule(ood="noise"), DigitsDataModule(ood="noise", flatten=False)
    flat.setup(), images.setup()
    for name in ("train", "val", "test", "ood"):
        x, x_flat = getattr(images.splits, name).tensors[0], getattr(flat.splits, name).tensors[0]
        assert x.shape == (len(x_flat), 1, 8, 8) and torch.equal(x.flatten(1), x_flat), name
    cnn = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    module = VariationalModule(cnn, num_eval_samples=4, save_report=False)
    fit = trainer(None, max_epochs=2)
    fit.fit(module, images)
    fit.test(module, images, verbose=False)
    assert module.report.metrics["accuracy"] > 0.6 and "ood/mutual_information/auroc" in module.report.metrics
    with pytest.raises(TypeError, match="flatten must be true or false"):
        DigitsDataModule(flatten="no")


def test_the_ood_loaders_targets_are_not_judged_as_labels():
    # never read, they were judged: image ids as floats (bf16-true casts them to bfloat16) stopped the test run
    module = DeterministicModule(nn.Linear(4, 3), save_report=False)
    test = DataLoader(TensorDataset(torch.randn(16, 4), torch.randint(0, 3, (16,))), batch_size=8)
    ood = DataLoader(TensorDataset(torch.randn(16, 4), torch.arange(300, 316).float().bfloat16()), batch_size=8)
    trainer(None).test(module, dataloaders=[test, ood], verbose=False)
    assert len(module.report.ood_prediction) == 16


def test_regression_modules_log_rmse_and_report_the_gap(tmp_path):
    torch.manual_seed(0)
    data = RegressionGapDataModule(num_samples=200)
    module = DeterministicModule(MLP(1, 1, hidden=[32], activation="tanh", head="gaussian"), task="regression", lr=1e-2)
    fit = trainer(tmp_path, max_epochs=5)
    fit.fit(module, data)
    assert {"val/rmse", "val/nll"} <= set(fit.logged_metrics)
    results = fit.test(module, data, verbose=False)[0]
    assert {"test/rmse", "test/nll", "test/crps", "test/interval_coverage_95"} <= set(results)
    assert math.isfinite(module.report.metrics["rmse"]) and "crps" in module.report.metrics
    assert module.report.ood_prediction is not None  # inputs in the gap
    assert torch.equal(module.report.ood_inputs.reshape(-1), data.splits.ood.tensors[0].reshape(-1))  # drawn in the figure


def test_a_mean_only_regressor_is_evaluated_with_its_noise_variance(tmp_path):
    # trained on N(mean, noise_variance), it was evaluated as if noise-free: huge NLL, ~0 interval coverage
    torch.manual_seed(0)
    x = torch.randn(60, 1)
    y = torch.sin(x) + 0.3 * torch.randn(60, 1)
    module = DeterministicModule(MLP(1, 1, hidden=[8]), task="regression", noise_variance=0.09, lr=1e-2)
    fit = trainer(tmp_path, max_epochs=2)
    fit.fit(module, DataLoader(TensorDataset(x, y), batch_size=20), DataLoader(TensorDataset(x, y), batch_size=60))
    with torch.no_grad():
        mean = module.model(x)
    expected = bdl.metrics.functional.gaussian_nll(mean, torch.full_like(mean, 0.09), y)
    assert float(fit.callback_metrics["val/nll"]) == pytest.approx(float(expected), rel=1e-5)
    assert torch.equal(module.sample_prediction(x, None).aleatoric_variance, torch.full_like(mean, 0.09))


def test_a_mean_only_regressor_learns_its_noise_variance_and_is_warned_of_the_default(tmp_path):
    # noise_variance was a fixed 1.0 unless given: 11x the data's noise here, silently (intervals far too wide)
    torch.manual_seed(0)
    x = torch.rand(400, 1) * 6 - 3
    y = torch.sin(x) + 0.3 * torch.randn(400, 1)
    loaders = DataLoader(TensorDataset(x, y), batch_size=50, shuffle=True), DataLoader(TensorDataset(x, y), batch_size=400)
    module = DeterministicModule(MLP(1, 1, hidden=[32], activation="tanh"), task="regression", noise_variance="learn", lr=2e-2)
    trainer(tmp_path, max_epochs=40).fit(module, *loaders)
    with torch.no_grad():
        residual = float((module.model(x) - y).square().mean())
    # the maximum-likelihood noise is the mean squared residual; the data's is 0.09
    learned = float(module.noise_variance.detach())
    assert learned == pytest.approx(residual, rel=0.1) and 0.07 < residual < 0.12
    prediction = module.sample_prediction(x, None)
    assert torch.allclose(prediction.aleatoric_variance, torch.full_like(prediction.mean, learned))
    assert "log_noise_variance" in module.state_dict()
    decayed = DeterministicModule(nn.Linear(1, 1), task="regression", noise_variance="learn", weight_decay=0.1)
    groups = decayed.configure_optimizers().param_groups  # weight decay would pull the variance towards 1
    assert [(len(g["params"]), g["weight_decay"]) for g in groups] == [(2, 0.1), (1, 0.0)] and groups[1]["params"][0] is decayed.log_noise_variance
    with pytest.warns(UserWarning, match="outputs means only, and noise_variance is unset: its likelihood is N\\(mean, 1.0\\)"):
        DeterministicModule(nn.Linear(1, 1), task="regression").training_loss(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DeterministicModule(nn.Linear(1, 1), task="regression", noise_variance=1.0).training_loss(x, y)
        DeterministicModule(MLP(1, 1, head="gaussian"), task="regression").training_loss(x, y)
    with pytest.raises(ValueError, match="noise_variance='learn' is for a network that outputs means only"):
        DeterministicModule(MLP(1, 1, head="gaussian"), task="regression", noise_variance="learn").training_loss(x, y)
    with pytest.raises(ValueError, match="noise_variance='learn' is for task='regression'"):
        DeterministicModule(nn.Linear(1, 2), noise_variance="learn")
    # a number was ignored silently, for a classifier and beside a Gaussian head
    with pytest.raises(ValueError, match="noise_variance=0.1 is for task='regression'"):
        DeterministicModule(nn.Linear(1, 2), noise_variance=0.1)
    with pytest.raises(ValueError, match=r"noise_variance=0.5 is for a network that outputs means only; this one predicts its variance"):
        DeterministicModule(MLP(1, 1, head="gaussian"), task="regression", noise_variance=0.5).training_loss(x, y)
    # 1.0, the default modules saved before noise_variance could be unset kept: their checkpoints load and train
    DeterministicModule(nn.Linear(1, 2), noise_variance=1.0)
    DeterministicModule(MLP(1, 1, head="gaussian"), task="regression", noise_variance=1.0).training_loss(x, y)
    with pytest.raises(ValueError, match="noise_variance is for task='regression'.*this module's task is 'classification'"):
        DeterministicModule(nn.Linear(1, 2)).noise_variance = 0.5  # kept in hparams, the module could not be rebuilt
    with pytest.raises(ValueError, match="noise_variance must be a number > 0 or 'learn', got 'learned'"):
        DeterministicModule(nn.Linear(1, 1), task="regression", noise_variance="learned")
    fixed = DeterministicModule(nn.Linear(1, 1), task="regression")
    fixed.noise_variance = 0.05  # settable, as the attribute it was: kept by checkpoints, and no warning of the default
    assert fixed.hparams["noise_variance"] == 0.05
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fixed.training_loss(x, y)
    module.noise_variance = 0.25  # a learned one starts from there
    assert fixed.noise_variance == 0.05 and float(module.log_noise_variance) == pytest.approx(math.log(0.25))
    with pytest.raises(ValueError, match="noise_variance must be a number > 0"):
        fixed.noise_variance = -1.0


def test_an_ensembles_learned_noise_is_clipped_as_its_members(tmp_path):
    # the members' gradients were clipped one by one, and the shared noise's not at all: log variance 134 (inf)
    x, y = torch.randn(64, 1), 10 * torch.randn(64, 1)
    for cls, options in ((EnsembleModule, dict(num_members=2)), (DeterministicModule, {})):
        torch.manual_seed(0)
        module = cls(MLP(1, 1, hidden=[4]), task="regression", noise_variance="learn", optimizer="sgd", momentum=0.0, lr=1.0, **options)
        trainer(tmp_path, max_steps=1, gradient_clip_val=1e-3, limit_val_batches=0).fit(module, DataLoader(TensorDataset(x, y), batch_size=64))
        assert abs(float(module.log_noise_variance)) <= 1e-3 + 1e-6, cls


def test_a_one_logit_classifier_trains_on_binary_cross_entropy_and_regression_targets_keep_their_shape():
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    module = DeterministicModule(nn.Linear(4, 1))  # a softmax of one column: loss exactly 0, nothing learnt
    logit = module.model(x)[:, 0]
    expected = F.binary_cross_entropy_with_logits(logit, y.float())
    torch.testing.assert_close(module.training_loss(x, y)["loss"], expected)
    # a transposed [D, B] target was reshaped by element count: outputs paired with other examples' targets
    regression = DeterministicModule(nn.Linear(4, 2), task="regression")
    with pytest.raises(ValueError, match="shape of the network's mean output"):
        regression.training_loss(x, torch.randn(2, 8))
    single = DeterministicModule(nn.Linear(4, 1), task="regression")
    assert torch.isfinite(single.training_loss(x, torch.randn(8))["loss"])  # [B] for [B, 1]: fine


def test_the_training_loss_takes_the_labels_evaluation_takes_and_names_a_one_logit_heads_two_classes():
    x, y = torch.randn(8, 4), torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    binary = DeterministicModule(nn.Linear(4, 1))
    expected = F.binary_cross_entropy_with_logits(binary.model(x)[:, 0], y.float())
    # [B, 1] labels and BCEWithLogitsLoss's float labels were refused (a range error for "1 classes", a TypeError)
    for labels in (y[:, None], y.float(), y.float()[:, None], y.to(torch.int32)):
        torch.testing.assert_close(binary.training_loss(x, labels)["loss"], expected)
    with pytest.raises(ValueError, match=r"labels in \[0, 1\] for 2 classes \(the network's outputs, one logit: binary\), got labels from 0 to 2"):
        binary.training_loss(x, torch.tensor([0, 1, 2, 0, 1, 0, 0, 1]))
    multi = DeterministicModule(nn.Linear(4, 3))
    expected = F.cross_entropy(multi.model(x), y)
    for dtype in (torch.int32, torch.int16, torch.uint8):  # blamed on the shape ("expected Long or Byte")
        torch.testing.assert_close(multi.training_loss(x, y.to(dtype))["loss"], expected)
    with pytest.raises(ValueError, match=r"targets of shape \(8, 2\) do not fit logits of shape \(8, 3\)"):
        multi.training_loss(x, torch.zeros(8, 2, dtype=torch.long))
    torch.testing.assert_close(multi.training_loss(x, y.float())["loss"], expected)  # whole numbers, as evaluation takes
    for labels in (torch.rand(8), y.bool()):
        with pytest.raises(TypeError, match="integer class labels"):
            multi.training_loss(x, labels)
    with pytest.raises(ValueError, match=r"class labels of shape \(8,\), got shape \(8, 3\) like the logits' \(one-hot"):
        multi.training_loss(x, F.one_hot(y, 3).float())
    # bf16-true casts float labels to bfloat16, which rounds 257 to 256: another class, silently
    wide = DeterministicModule(nn.Linear(4, 300))
    with pytest.raises(TypeError, match=r"class labels in torch.bfloat16 from 256 up may have been rounded"):
        wide.training_loss(x, torch.full((8,), 257.0).bfloat16())
    assert torch.isfinite(wide.training_loss(x, torch.full((8,), 255.0).bfloat16())["loss"])  # exact below 256


def test_svi_module_loads_from_its_checkpoint(tmp_path):
    def pyro_model():
        return bdl.infer.PyroModel(MLP(4, 3, hidden=[8]), "categorical")

    module = SVIModule(pyro_model(), num_eval_samples=6, lr=0.01)
    trainer(tmp_path, max_steps=2).fit(module, TinyData(batch_size=8))
    path = tmp_path / "svi.ckpt"
    module.trainer.save_checkpoint(path)
    restored = SVIModule.load_from_checkpoint(path, model=pyro_model())  # "got multiple values for num_samples"
    assert restored.num_eval_samples == 6
    # another number of samples at loading: the saved num_samples (6) came back beside it and the pair was refused
    assert SVIModule.load_from_checkpoint(path, model=pyro_model(), num_eval_samples=50).num_eval_samples == 50
    old = torch.load(path, weights_only=True)
    old["hyper_parameters"]["num_samples"] = 6  # as checkpoints of earlier versions kept it
    torch.save(old, tmp_path / "old.ckpt")
    assert SVIModule.load_from_checkpoint(tmp_path / "old.ckpt", model=pyro_model(), num_eval_samples=50).num_eval_samples == 50
    assert SVIModule.load_from_checkpoint(tmp_path / "old.ckpt", model=pyro_model()).num_eval_samples == 6
    for name, value in module.guide.state_dict().items():
        assert torch.equal(restored.guide.state_dict()[name], value), name
    with pytest.raises(TypeError, match="num_eval_samples"):
        SVIModule(pyro_model(), num_eval_samples=6, num_samples=7)
    # the training-set size the fit found (32) comes back: it was None, and the loaded loss unscaled
    assert module.model.num_data == 32 and restored.model.num_data == 32
    variational = VariationalModule(net())
    trainer(tmp_path, max_steps=1).fit(variational, TinyData(batch_size=8))
    variational.trainer.save_checkpoint(path)
    assert VariationalModule.load_from_checkpoint(path, model=net()).num_data == 32
    # without model=: Python's bare "missing 1 required positional argument: 'model'"
    for cls, saved in ((VariationalModule, path), (SVIModule, tmp_path / "old.ckpt")):
        with pytest.raises(TypeError, match=rf"{cls.__name__}.load_from_checkpoint: .* holds the network's weights but not the network.*model=net"):
            cls.load_from_checkpoint(saved)
    # on an instance it returns another module, and left this one untrained: Lightning refuses that
    with pytest.raises(TypeError, match="cannot be called on an instance"):
        variational.load_from_checkpoint(path, model=net())
    with pytest.raises(TypeError, match="cannot be called on an instance"):
        restored.load_from_checkpoint(tmp_path / "old.ckpt", model=pyro_model())


def test_variational_module_takes_another_prior_and_loads_it_from_its_checkpoint(tmp_path):
    # only N(0, prior_std^2) could be chosen: Blundell et al.'s scale mixture needed a network converted by hand
    mixture = bdl.ScaleMixturePrior(scale1=1.0, scale2=math.exp(-6), mixture_weight=0.25)
    module = VariationalModule(net(), prior=mixture)
    layers = [m for m in module.model.modules() if isinstance(m, bdl.BayesLinear)]
    priors = [prior for layer in layers for prior in (layer.weight_prior, layer.bias_prior)]
    assert len(priors) == 4 and len({id(p) for p in priors}) == 4  # a copy each
    assert all(type(p) is bdl.ScaleMixturePrior and (p.scale1, p.scale2, p.mixture_weight) == (1.0, math.exp(-6), 0.25) for p in priors)
    fit = trainer(tmp_path, max_steps=1, limit_val_batches=0)
    fit.fit(module, TinyData(batch_size=8))
    fit.save_checkpoint(tmp_path / "mixture.ckpt")
    restored = VariationalModule.load_from_checkpoint(tmp_path / "mixture.ckpt", model=net(), weights_only=True)
    assert [repr(p) for p in restored.model.modules() if isinstance(p, bdl.Prior)] == [repr(p) for p in priors]
    for name, value in module.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name
    # a config's form (class_path and init_args) is built as the object
    given = VariationalModule(net(), prior={"class_path": "bdl.GaussianPrior", "init_args": {"scale": 0.3}})
    assert all(p.scale == 0.3 for p in given.model.modules() if isinstance(p, bdl.GaussianPrior))
    with pytest.raises(ValueError, match="give prior_std .* or prior, not both"):
        VariationalModule(net(), prior=mixture, prior_std=0.5)
    with pytest.raises(TypeError, match="prior must be a bdl Prior"):
        VariationalModule(net(), prior={"class_path": "torch.nn.Linear", "init_args": {}})  # not any class a checkpoint names
    with pytest.raises(TypeError, match="its argument 'loc' is not an attribute holding a number"):
        VariationalModule(net(), prior=bdl.GaussianPrior(torch.zeros(16, 4), 0.1))
    with pytest.warns(UserWarning, match="prior set how a plain network is converted"):
        VariationalModule(bdl.bayesianize(net()), prior=mixture)
    # a 0-d tensor scale was a buffer of every layer, which the rebuilt prior (numbers) did not expect at loading
    tensor_scale = VariationalModule(net(), prior=bdl.GaussianPrior(0.0, torch.tensor(0.1)))
    fit.strategy.connect(tensor_scale)
    fit.save_checkpoint(tmp_path / "tensor.ckpt")
    assert VariationalModule.load_from_checkpoint(tmp_path / "tensor.ckpt", model=net(), weights_only=True).model[0].weight_prior.scale == pytest.approx(0.1)

    class Mine(VariationalModule):  # its own __init__ frame held the prior object: pickled, refused by weights_only
        def __init__(self, model, **kwargs):
            super().__init__(model, **kwargs)

    mine = Mine(net(), prior=mixture, include=[nn.Linear])
    fit.strategy.connect(mine)
    fit.save_checkpoint(tmp_path / "mine.ckpt")
    restored = Mine.load_from_checkpoint(tmp_path / "mine.ckpt", model=net(), weights_only=True)
    assert isinstance(restored.model[0].weight_prior, bdl.ScaleMixturePrior)
    with pytest.raises(TypeError, match=r"prior: class '__main__.Laplace' cannot be imported here"):
        VariationalModule(net(), prior={"class_path": "__main__.Laplace", "init_args": {"b": 0.2}})
    with pytest.raises(TypeError, match=r"prior \(bdl.ScaleMixturePrior\): .*unexpected keyword argument 'scale3'"):
        VariationalModule(net(), prior={"class_path": "bdl.ScaleMixturePrior", "init_args": {"scale3": 0.2}})


def test_modules_with_layer_types_as_patterns_load_from_their_checkpoint_with_weights_only(tmp_path):
    # a module type in include/exclude/insert_before was pickled into the hyperparameters, a global that
    # torch.load(weights_only=True) (its default) refused
    fit = trainer(tmp_path, max_steps=1, limit_val_batches=0)
    modules = {
        MCDropoutModule: dict(p=0.1, insert_before=[nn.Linear]),
        VariationalModule: dict(exclude=nn.ReLU, include=["0", nn.Linear]),
    }
    for cls, options in modules.items():
        module = cls(net(), **options)
        fit.strategy.connect(module)
        path = tmp_path / f"{cls.__name__}.ckpt"
        fit.save_checkpoint(path)
        restored = cls.load_from_checkpoint(path, model=net(), weights_only=True)
        assert [type(m) for m in restored.model.modules()] == [type(m) for m in module.model.modules()], cls
        for name, value in module.state_dict().items():
            assert torch.equal(restored.state_dict()[name], value), name
    assert sum(isinstance(m, nn.Dropout) for m in restored.model.modules()) == 0
    assert sum(isinstance(m, nn.Dropout) for m in MCDropoutModule.load_from_checkpoint(tmp_path / "MCDropoutModule.ckpt", model=net()).model.modules()) == 2
    with pytest.raises(ValueError, match="no class 'Gone'"):
        MCDropoutModule(net(), p=0.1, insert_before=[{"module": "torch.nn", "type": "Gone"}])


def test_svi_module_gets_num_data_from_the_data_module(tmp_path):
    data = TinyData(num_train=32, batch_size=16)
    module = SVIModule(bdl.infer.PyroModel(net(), "categorical"), lr=1e-2, num_eval_samples=4, num_val_samples=2)
    fit = trainer(tmp_path, max_epochs=1)
    fit.fit(module, data)
    assert module.model.num_data == 32
    assert {"val/elbo", "val/accuracy", "val/nll", "val/ece"} <= set(fit.logged_metrics)
    fit.test(module, data, verbose=False)
    assert module.report.ood_prediction is not None


def test_svi_validation_outside_fit_scales_the_elbo_as_fit_does(tmp_path):
    data = TinyData(num_train=32, batch_size=16)
    module = SVIModule(bdl.infer.PyroModel(net(), "categorical"), lr=1e-2, num_eval_samples=4, num_val_samples=2)
    validating = trainer(tmp_path)
    validating.validate(module, data, verbose=False)  # the likelihood was the batch's alone: off by num_data / batch
    assert module.model.num_data == 32 and "val/elbo" in validating.logged_metrics
    unknown = SVIModule(bdl.infer.PyroModel(net(), "categorical"), num_val_samples=2)
    plain = trainer(tmp_path)
    plain.validate(unknown, DataLoader(data.val_dataloader().dataset, batch_size=16), verbose=False)
    assert unknown.model.num_data is None and "val/elbo" not in plain.logged_metrics and "val/nll" in plain.logged_metrics


def test_bernoulli_models_trained_on_float_labels_are_validated_and_tested_on_them(tmp_path):
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    labels = (x[:, 0] > 0).float()  # 0./1., as binary cross-entropy takes them; the metrics refused them after training
    module = SVIModule(bdl.infer.PyroModel(nn.Linear(3, 1), "bernoulli"), lr=1e-2, num_val_samples=2, num_eval_samples=4, save_report=False)
    fitting = trainer(tmp_path, max_epochs=2)
    fitting.fit(module, DataLoader(TensorDataset(x, labels), batch_size=32), DataLoader(TensorDataset(x, labels[:, None]), batch_size=32))
    assert 0 <= float(fitting.logged_metrics["val/accuracy"]) <= 1
    fitting.test(module, DataLoader(TensorDataset(x, labels), batch_size=32), verbose=False)
    assert torch.equal(module.report.targets, labels.long())
    # integer [B, 1] labels: refused by the metrics at the first validation ("must have shape [N]")
    fitting = trainer(tmp_path, max_epochs=1)
    fitting.fit(module, DataLoader(TensorDataset(x, labels.long()[:, None]), batch_size=32), DataLoader(TensorDataset(x, labels.long()[:, None]), batch_size=32))
    assert 0 <= float(fitting.logged_metrics["val/accuracy"]) <= 1


def test_non_finite_loss_stops_training_with_a_message_naming_the_step(tmp_path):
    data = TinyData(batch_size=8)
    module = DeterministicModule(net(), lr=1e-2)
    with torch.no_grad():
        module.model[0].weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"epoch 0, step 0: NLL is not finite \(.*\); non-finite parameters: model.0.weight \(64 of 64\) \(an earlier step diverged\)"):
        trainer(tmp_path, num_sanity_val_steps=0).fit(module, data)
    inputs = TensorDataset(torch.full((8, 4), float("nan")), torch.zeros(8, dtype=torch.long))
    with pytest.raises(FloatingPointError, match=r"NLL is not finite .*; every parameter is finite \(a NaN/inf in this batch's inputs"):
        trainer(tmp_path, num_sanity_val_steps=0).fit(DeterministicModule(net()), DataLoader(inputs, batch_size=8))


def test_non_finite_kl_is_named(tmp_path):
    module = VariationalModule(net(), lr=1e-2)
    with torch.no_grad():
        module.model[2].weight_rho.fill_(1e4)  # posterior std exp(1e4): the KL is infinite, the parameters finite
    module.model[2].weight_mu.requires_grad_(False)
    # the layer was not named (nor, in the CLI, the message in one line: "NLL and KL is not finite")
    with pytest.raises(FloatingPointError, match=r"step 0: NLL and KL are not finite .*; every parameter is finite, but the KL of model.2 \(BayesLinear\) is not;"):
        trainer(tmp_path, num_sanity_val_steps=0).fit(module, TinyData(batch_size=8))


def test_non_finite_svi_loss_is_named_even_without_pyro_validation(tmp_path):
    # with validation (on the first step by default) Pyro itself rejects NaN parameters
    module = SVIModule(bdl.infer.PyroModel(net(), "categorical"), num_val_samples=2, validate="never")
    with torch.no_grad():
        next(module.guide.parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"epoch 0, step 0: .* (is|are) not finite .*; non-finite parameters: .*guide"):
        trainer(tmp_path, num_sanity_val_steps=0).fit(module, TinyData(batch_size=8))


def test_a_non_finite_ensemble_loss_names_the_member(tmp_path, monkeypatch):
    module = EnsembleModule(nn.Linear(4, 3), num_members=3)
    with torch.no_grad():
        module.model.members[1].weight.mul_(1e38)  # finite weights, overflowing logits in member 1 only
    from bdl.lightning import modules as lightning_modules

    checks, check = [], lightning_modules.raise_on_every_process
    # one check (one collective under DDP) per step: it was one in training_loss and one in training_step
    monkeypatch.setattr(lightning_modules, "raise_on_every_process", lambda *args: checks.append(args[2]) or check(*args))
    with pytest.raises(FloatingPointError, match=r"step \d+: NLL and member 1's NLL are not finite \(loss=inf, nll=inf, member 0's NLL=[\d.]+, member 1's NLL=inf"):
        trainer(tmp_path, num_sanity_val_steps=0).fit(module, TinyData(batch_size=8))
    assert checks == ["non-finite training loss"] * (module.global_step + 1)


def test_a_fit_whose_last_step_left_non_finite_parameters_ends_with_an_error(tmp_path):
    # a finite loss (1.5e23) with an infinite gradient on the fit's last step: the parameters became NaN, and the loss
    # check, which only the next step would have run, never fired
    torch.manual_seed(0)
    module = DeterministicModule(net(), lr=1e-2)
    module.model[0].weight.register_hook(lambda grad: grad * float("inf") if module.global_step == 1 else grad)
    with pytest.raises(FloatingPointError, match=r"training ended with non-finite parameters: model.0.weight \(64 of 64\)"):
        trainer(tmp_path, max_steps=2, num_sanity_val_steps=0, limit_val_batches=0).fit(module, TinyData(batch_size=8))


def test_bdl_infer_svi_module_under_a_trainer_stops_at_a_non_finite_loss(tmp_path):
    # bdl.SVIModule (bdl.infer's) checked no loss at all under a Trainer: a NaN fit ended normally
    svi = bdl.SVIModule(bdl.infer.PyroModel(net(), "categorical", num_data=32), optimizer="sgd", lr=1e6, validate="never")
    with pytest.raises(FloatingPointError, match=r"non-finite training loss at epoch 0, step \d+ \(loss=nan"):
        trainer(tmp_path, max_steps=20, num_sanity_val_steps=0, limit_val_batches=0).fit(svi, TinyData(batch_size=8))


def test_a_num_data_other_than_the_training_sets_size_is_warned_of(tmp_path):
    # num_data=1000 for 100 rows weighs the data 10x (posterior standard deviations about 3x too small), without a word
    for module in (VariationalModule(net(), num_data=1000), SVIModule(bdl.infer.PyroModel(net(), "categorical", num_data=1000))):
        with pytest.warns(UserWarning, match=r"num_data=1000, but the training set has 32 examples: the KL is weighted as for 1000 \(posterior narrower"):
            trainer(tmp_path, max_steps=1, num_sanity_val_steps=0, limit_val_batches=0).fit(module, TinyData(batch_size=8))
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))

    class PreBatched(torch.utils.data.Dataset):  # 5 items of 8 rows: its length counts batches
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return x[8 * i : 8 * i + 8], y[8 * i : 8 * i + 8]

    class OwnMeaning(L.LightningDataModule):  # a num_train of its own (None: all rows), read as a size: a TypeError
        num_train = None

        def train_dataloader(self):
            return DataLoader(TensorDataset(x, y), batch_size=8)

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="num_data=")
        trainer(tmp_path, max_steps=1, num_sanity_val_steps=0, limit_val_batches=0).fit(VariationalModule(net(), num_data=32), TinyData(batch_size=8))
        trainer(tmp_path, max_steps=1).fit(VariationalModule(net(), num_data=40), DataLoader(PreBatched(), batch_size=None))
        trainer(tmp_path, max_steps=1).fit(VariationalModule(net(), num_data=40), datamodule=OwnMeaning())
    # a batch sampler's loader has no batch_size either, and its data set's length counts rows: warned
    sampled = DataLoader(TensorDataset(x, y), batch_sampler=torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(range(40)), 8, False))
    with pytest.warns(UserWarning, match="num_data=1000, but the training set has 40 examples"):
        trainer(tmp_path, max_steps=1).fit(VariationalModule(net(), num_data=1000), sampled)


def test_the_training_set_size_of_a_distributed_runs_own_loaders_is_not_guessed(tmp_path):
    # under DDP with use_distributed_sampler=False each process's loader may hold a shard: its 20 rows were taken for
    # num_data (the KL weighted twice over on 2 processes), and a right num_data=40 was warned of, with that advice
    from types import SimpleNamespace

    from bdl.lightning.modules import _training_set_size, _warn_if_num_data_differs

    shard = DataLoader(TensorDataset(torch.randn(20, 4), torch.randint(0, 3, (20,))), batch_size=8)
    distributed = SimpleNamespace(world_size=2, train_dataloader=shard)
    with pytest.raises(ValueError, match=r"distributed run's own training loaders \(no DistributedSampler\): pass num_data, the examples of all processes"):
        _training_set_size(distributed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_if_num_data_differs(40, distributed)
    assert _training_set_size(SimpleNamespace(world_size=1, train_dataloader=shard)) == 20
    sampled = DataLoader(shard.dataset, sampler=DistributedSampler(shard.dataset, num_replicas=2, rank=0), batch_size=8)
    assert _training_set_size(SimpleNamespace(world_size=2, train_dataloader=sampled)) == 20  # Lightning's sampler: all rows
    with pytest.raises(ValueError, match="cannot tell the training-set size from the training loader: pass num_data"):
        _training_set_size(SimpleNamespace(world_size=2, train_dataloader=[sampled, sampled]))  # not "no DistributedSampler"
    # a PyroModel's num_data set back to None after the module was made: a TypeError in the warning's f-string
    svi = SVIModule(bdl.infer.PyroModel(net(), "categorical", num_data=32), num_val_samples=2)
    svi.model.num_data = None
    with pytest.raises(ValueError, match="the PyroModel's num_data is None; set it"):
        trainer(tmp_path, max_steps=1).fit(svi, TinyData(batch_size=8))


def test_an_svi_modules_nan_input_is_blamed_on_the_nll_and_a_nan_validation_loss_stops_the_fit(tmp_path):
    # the KL, logged as loss - nll, was called not finite beside a NaN input; bdl.infer's SVIModule logged a NaN
    # validation loss and went on
    x, y = torch.randn(24, 2), torch.randn(24, 1)
    bad = x.clone()
    bad[20] = float("nan")
    lightning_svi = SVIModule(bdl.infer.PyroModel(nn.Linear(2, 1), "gaussian", num_data=24), validate="never")
    with pytest.raises(FloatingPointError, match=r"step 2: NLL is not finite \(loss=nan, nll=nan\)"):
        trainer(tmp_path, num_sanity_val_steps=0, limit_val_batches=0).fit(lightning_svi, DataLoader(TensorDataset(bad, y), batch_size=8))
    plain = bdl.SVIModule(bdl.infer.PyroModel(nn.Linear(2, 1), "gaussian", num_data=24), validate="never")
    with pytest.raises(FloatingPointError, match=r"step 2 \(loss=nan, nll=nan\); every parameter is finite"):
        trainer(tmp_path, num_sanity_val_steps=0, limit_val_batches=0).fit(plain, DataLoader(TensorDataset(bad, y), batch_size=8))
    plain = bdl.SVIModule(bdl.infer.PyroModel(nn.Linear(2, 1), "gaussian", num_data=24), validate="never")
    with pytest.raises(FloatingPointError, match=r"non-finite validation loss at epoch 0 \(loss=nan, nll=nan\): check the validation inputs"):
        trainer(tmp_path, num_sanity_val_steps=0).fit(plain, DataLoader(TensorDataset(x, y), batch_size=8), DataLoader(TensorDataset(bad, y), batch_size=8))
    # raised at the pass's last batch: a subclass's on_validation_epoch_end without super() trained on (NaN logged)
    class OwnEpochEnd(bdl.SVIModule):
        def on_validation_epoch_end(self) -> None:
            pass

    own = OwnEpochEnd(bdl.infer.PyroModel(nn.Linear(2, 1), "gaussian", num_data=24), validate="never")
    with pytest.raises(FloatingPointError, match=r"non-finite validation loss at epoch 0"):
        trainer(tmp_path, num_sanity_val_steps=0).fit(own, DataLoader(TensorDataset(x, y), batch_size=8), DataLoader(TensorDataset(bad, y), batch_size=8))

    class Stream(torch.utils.data.IterableDataset):  # no length: its last batch is known at the epoch's end only
        def __iter__(self):
            return iter(zip(bad, y))

    plain = bdl.SVIModule(bdl.infer.PyroModel(nn.Linear(2, 1), "gaussian", num_data=24), validate="never")
    with pytest.raises(FloatingPointError, match=r"non-finite validation loss at epoch 0"):
        trainer(tmp_path, num_sanity_val_steps=0).fit(plain, DataLoader(TensorDataset(x, y), batch_size=8), DataLoader(Stream(), batch_size=8))
    # a pass that raised another error after a NaN batch: its stored error killed the next, clean fit
    plain._val_error = FloatingPointError("non-finite validation loss of an earlier pass")
    trainer(tmp_path, num_sanity_val_steps=1).fit(plain, DataLoader(TensorDataset(x, y), batch_size=8), DataLoader(TensorDataset(x, y), batch_size=8))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(task="segmentation"), "task must be one of"),
        (dict(optimizer="lbfgs"), "optimizer must be one of"),
        (dict(lr=0.0), "lr must be a number > 0"),
        (dict(num_val_samples=0), "num_val_samples must be a positive int"),
        (dict(lr_schedule="step"), "lr_schedule must be one of"),
        (dict(optimizer="sgd", momentum=1.5), r"momentum must be in \[0, 1\)"),
    ],
)
def test_bad_options_are_rejected_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DeterministicModule(net(), **kwargs)


def test_ensemble_sample_counts_and_network_sizes_are_checked_when_built():
    # a count that is no multiple of the members failed only at test time, after the whole fit
    with pytest.raises(ValueError, match="num_eval_samples must be a multiple of num_members=3"):
        EnsembleModule(net(), num_members=3, num_eval_samples=4)
    with pytest.raises(ValueError, match="num_val_samples must be a multiple"):
        EnsembleModule(net(), num_members=3, num_val_samples=8)
    assert EnsembleModule(net(), num_members=3, num_eval_samples=6).num_members == 3
    with pytest.warns(UserWarning, match=r"num_members=1 is one network: it has no epistemic uncertainty"):
        EnsembleModule(net(), num_members=1)
    with pytest.raises(TypeError, match="hidden must be a list of layer sizes"):
        MLP(64, 10, hidden=64)
    # numpy's integers, as nn.Linear takes them ("in_features must be a positive int, got np.int64(64)")
    assert MLP(np.prod((8, 8)), np.int64(3), hidden=[np.int64(16)])(torch.randn(2, 64)).shape == (2, 3)
    # a GaussianHead under the default classification task: "'GaussianOutput' object has no attribute 'shape'"
    with pytest.raises(ValueError, match=r"got GaussianOutput; .* needs task='regression'"):
        DeterministicModule(MLP(4, 3, hidden=[8], head="gaussian")).training_loss(torch.randn(5, 4), torch.randint(0, 3, (5,)))


def test_cosine_schedule_anneals_the_learning_rate_to_zero(tmp_path):
    data = TinyData(batch_size=8)
    module = DeterministicModule(net(), lr=0.1, lr_schedule="cosine")
    fit = trainer(tmp_path, max_epochs=2, limit_val_batches=0)
    fit.fit(module, data)
    assert fit.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)
    # a GradientAccumulationScheduler: Lightning's estimate takes epoch 0's factor for every epoch, so the
    # schedule ended early (4 then 1: lr 0 for the last epochs) or late (1 then 4: never annealed)
    for schedule in ({0: 4, 1: 1}, {0: 1, 1: 4}, ({0: 1, 1: 4}, {0: 4, 1: 1})):  # two schedulers: the last sets it
        for module in (DeterministicModule(net(), lr=0.1, lr_schedule="cosine"), SVIModule(bdl.infer.PyroModel(net(), "categorical"), lr=0.1, lr_decay=0.01)):
            rates = []
            record = L.pytorch.callbacks.LambdaCallback(on_train_batch_start=lambda run, *_: rates.append(run.optimizers[0].param_groups[0]["lr"]))
            accumulating = [L.pytorch.callbacks.GradientAccumulationScheduler(s) for s in (schedule if isinstance(schedule, tuple) else (schedule,))]
            fit = trainer(tmp_path, max_epochs=3, limit_val_batches=0, callbacks=[record, *accumulating])
            fit.fit(module, data)
            final = fit.optimizers[0].param_groups[0]["lr"]
            assert final == pytest.approx(0.0 if isinstance(module, DeterministicModule) else 1e-3, abs=1e-9), (schedule, module)
            assert min(rates) > final + 1e-4, (schedule, module)  # every step before the last at a rate above the end's


def test_predict_step_returns_predictions_that_merge():
    module = VariationalModule(net(), num_data=10, num_eval_samples=5)
    loader = DataLoader(TensorDataset(torch.randn(10, 4)), batch_size=4)
    parts = L.Trainer(logger=False, enable_progress_bar=False, accelerator="cpu").predict(module, loader)
    merged = bdl.Prediction.cat(parts)
    assert merged.probs.shape == (10, 3) and merged.num_samples == 5


def test_num_data_comes_from_a_plain_training_loader_too(tmp_path):
    dataset = TensorDataset(torch.randn(24, 4), torch.randint(0, 3, (24,)))
    module = VariationalModule(net())
    svi = SVIModule(bdl.infer.PyroModel(net(), "categorical"), num_val_samples=2)
    for model in (module, svi):
        trainer(tmp_path, max_steps=1).fit(model, DataLoader(dataset, batch_size=8))
    assert module.num_data == 24 and svi.model.num_data == 24
    # a second fit on another training set (fine-tuning) scales the KL by its size, not by the first one's
    larger = TensorDataset(torch.randn(40, 4), torch.randint(0, 3, (40,)))
    for model in (module, svi):
        trainer(tmp_path, max_steps=1).fit(model, DataLoader(larger, batch_size=8))
    assert module.num_data == 40 and svi.model.num_data == 40
    class NoCount(L.LightningDataModule):  # num_train None (before its setup, say): int(None) failed in Python's words
        num_train = None

        def train_dataloader(self):
            return DataLoader(larger, batch_size=8)

    for model in (VariationalModule(net()), SVIModule(bdl.infer.PyroModel(net(), "categorical"), num_val_samples=2)):
        trainer(tmp_path, max_steps=1).fit(model, datamodule=NoCount())
        assert (model.num_data if isinstance(model, VariationalModule) else model.model.num_data) == 40
    given = VariationalModule(net(), num_data=1000)  # a size the user gave stays
    trainer(tmp_path, max_steps=1).fit(given, DataLoader(larger, batch_size=8))
    assert given.num_data == 1000
    # a trainer that ran a call on a data module keeps it as trainer.datamodule: a later fit on a loader took that
    # data module's num_train (32) for its own training set's size
    for model in (VariationalModule(net()), SVIModule(bdl.infer.PyroModel(net(), "categorical"), num_val_samples=2)):
        reused = trainer(tmp_path, max_steps=1)
        reused.validate(model, datamodule=TinyData(batch_size=8), verbose=False)
        reused.fit(model, DataLoader(larger, batch_size=8))
        assert (model.num_data if isinstance(model, VariationalModule) else model.model.num_data) == 40


def test_num_data_of_a_loader_over_a_subset_of_its_data_set_is_the_subsets_size(tmp_path):
    # the usual split on one Dataset, DataLoader(full, sampler=SubsetRandomSampler(train_indices)), scaled the KL
    # by the whole data set (1000 rows for 100 trained on)
    from types import SimpleNamespace

    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
    from torch.utils.data import IterableDataset, SubsetRandomSampler

    from bdl.lightning.modules import _training_set_size

    full = TensorDataset(torch.randn(1000, 4), torch.randint(0, 3, (1000,)))
    module = VariationalModule(net())
    trainer(tmp_path, max_steps=1).fit(module, DataLoader(full, batch_size=50, sampler=SubsetRandomSampler(torch.arange(100))))
    assert module.num_data == 100
    trainer(tmp_path, max_steps=1).fit(module, DataLoader(full, batch_size=50, sampler=list(range(300))))
    assert module.num_data == 300
    trainer(tmp_path, max_steps=1).fit(module, DataLoader(full, batch_size=50, sampler=np.arange(200)))
    assert module.num_data == 200
    batches = torch.utils.data.BatchSampler(SubsetRandomSampler(torch.arange(100)), 50, False)
    trainer(tmp_path, max_steps=1).fit(module, DataLoader(full, batch_sampler=batches))
    assert module.num_data == 100

    class ClassBalanced(torch.utils.data.Sampler):  # its `indices` are one list per class: read as 3 rows
        def __init__(self, labels: torch.Tensor) -> None:
            self.indices = [torch.nonzero(labels == c).flatten() for c in labels.unique()]

        def __iter__(self):
            yield from (int(rows[torch.randint(len(rows), ())]) for _ in range(10) for rows in self.indices)

        def __len__(self) -> int:
            return 10 * len(self.indices)

    trainer(tmp_path, max_steps=1).fit(module, DataLoader(full, batch_size=10, sampler=ClassBalanced(full.tensors[1])))
    assert module.num_data == 1000

    class SubsetInOrder(torch.utils.data.Sampler):  # a user's subset sampler: flat indices, each drawn once
        def __init__(self, indices: list[int]) -> None:
            self.indices = indices

        def __iter__(self):
            return iter(self.indices)

        def __len__(self) -> int:
            return len(self.indices)

    trainer(tmp_path, max_steps=1).fit(module, DataLoader(full, batch_size=10, sampler=SubsetInOrder(list(range(50)))))
    assert module.num_data == 50
    trainer(tmp_path, max_steps=1).fit(module, DataLoader(full, batch_size=10, sampler=SubsetInOrder(list(range(50)) * 2)))
    assert module.num_data == 50  # each row once, however often the sampler lists it

    class UnknownLength(SubsetInOrder):  # Lightning accepts a sampler whose epoch length is unknown
        def __len__(self) -> int:
            raise NotImplementedError

    trainer(tmp_path, max_steps=1).fit(module, DataLoader(full, batch_size=10, sampler=UnknownLength(list(range(50)))))
    assert module.num_data == 1000
    # under DDP Lightning wraps the user's sampler: the whole subset still, not one process's share of it
    wrapped = DistributedSamplerWrapper(SubsetRandomSampler(torch.arange(100)), num_replicas=2, rank=0)
    assert _training_set_size(SimpleNamespace(world_size=2, train_dataloader=DataLoader(full, sampler=wrapped))) == 100
    spread = torch.utils.data.DistributedSampler(full, num_replicas=2, rank=0)
    assert _training_set_size(SimpleNamespace(world_size=2, train_dataloader=DataLoader(full, sampler=spread))) == 1000

    class Stream(IterableDataset):  # no length: torch's bare "object of type 'Stream' has no len()"
        def __iter__(self):
            yield from zip(torch.randn(16, 4), torch.randint(0, 3, (16,)))

    with pytest.raises(ValueError, match="cannot tell the training-set size from the training loader: pass num_data"):
        trainer(tmp_path, max_steps=1).fit(VariationalModule(net()), DataLoader(Stream(), batch_size=8))

def test_non_finite_predictions_and_bad_targets_in_evaluation_name_the_stage_epoch_batch_and_rows(tmp_path):
    module = DeterministicModule(net(), lr=1e-2)
    with torch.no_grad():
        module.model[2].bias.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="non-finite prediction in validation at epoch 0, step 0, in batch 0 of the validation loader: .*logits"):
        trainer(tmp_path).fit(module, TinyData(batch_size=8))  # the sanity check validates first
    # row 5 of the third batch: the message said "rows [5] of the inputs", and a target error named no batch at all
    x, y = torch.randn(24, 4), torch.randint(0, 3, (24,))
    x[2 * 8 + 5, 1] = float("nan")
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    with pytest.raises(FloatingPointError, match=r"in test at epoch 0, step 0, in batch 2 of the test loader: .* \(rows \[5\] of that batch\)"):
        trainer(tmp_path).test(DeterministicModule(net()), loader)
    svi = SVIModule(bdl.infer.PyroModel(net(), "categorical", num_data=24), num_eval_samples=2)
    with pytest.raises(FloatingPointError, match=r"in test at epoch 0, step 0, in batch 2 of the test loader: .* \(rows \[5\] of that batch\)"):
        trainer(tmp_path).test(svi, loader)  # bdl.infer's predictions: a bare ValueError naming rows of the inputs
    labels = y.clone()
    labels[20] = 3
    with pytest.raises(ValueError, match=r"validation at epoch 0, batch 2 of the validation loader: `target` must hold labels in \[0, 2\]"):
        trainer(tmp_path).validate(DeterministicModule(net()), DataLoader(TensorDataset(torch.randn(24, 4), labels), batch_size=8))


class UnderflowingHead(nn.Module):
    """A regression network whose predicted variance is ``floor`` (or 0 for inputs with a positive first feature)."""

    def __init__(self, floor: float, zero_some: bool = False) -> None:
        super().__init__()
        self.linear, self.floor, self.zero_some = nn.Linear(1, 1), floor, zero_some

    def forward(self, x):
        mean = self.linear(x)
        variance = torch.full_like(mean, self.floor)
        return mean, (variance * (x <= 0)) if self.zero_some else variance


@pytest.mark.parametrize("floor, zero_some, message", [(1e-44, False, "NLL is infinite"), (1.0, True, r"variance is 0 for \d+ of")])
def test_a_variance_that_underflows_stops_validation_with_the_step(tmp_path, floor, zero_some, message):
    # the NLL was logged as inf (and checkpoints chosen on it), or batches with a zero variance were left out
    module = DeterministicModule(UnderflowingHead(floor, zero_some), task="regression", lr=1e-2)
    with pytest.raises(FloatingPointError, match=f"non-finite validation metric at epoch 0, step 0: .*{message}"):
        trainer(tmp_path).validate(module, RegressionGapDataModule(num_samples=60))


def test_non_finite_predictions_of_a_predict_run_name_the_stage(tmp_path):
    module = DeterministicModule(net(), lr=1e-2)
    with torch.no_grad():
        module.model[2].bias.fill_(float("nan"))
    data = TinyData(batch_size=8)
    with pytest.raises(FloatingPointError, match="non-finite prediction in predict"):
        trainer(tmp_path).predict(module, data.setup() or data.test_dataloader())


class OtherProcessFailed:
    """A stand-in for a 2-process DDP strategy whose other process found a non-finite value."""

    def __init__(self) -> None:
        self.decisions = []

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:  # noqa: A002 - Lightning's name
        self.decisions.append((decision, all))
        return True  # some process failed


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_every_process_stops_when_another_one_finds_a_non_finite_value(task, monkeypatch):
    # Each check takes part in the processes' decision, also where its own values are finite: one process
    # raising alone left the others waiting in their next collective (gloo: "connection closed by peer").
    strategy = OtherProcessFailed()
    module, _, x, y = _under_two_processes(task, strategy, monkeypatch, num_val_batches=2)
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)
    # one decision per validation pass, at this process's last batch (processes may hold different numbers of batches)
    module.validation_step((x, y), 0)
    assert not strategy.decisions
    with pytest.raises(FloatingPointError, match=r"validation failed on another process at epoch 3, step 7 \(this is process 0 of 2\)"):
        module.validation_step((x, y), 1)
    assert strategy.decisions == [(False, False)]
    with pytest.raises(FloatingPointError, match="non-finite training loss on another process at epoch 3, step 7"):
        module.training_step((x, y), 0)
    assert strategy.decisions and all(decision == (False, False) for decision in strategy.decisions)


def _under_two_processes(task, strategy, monkeypatch, num_val_batches):
    """A DeterministicModule of ``task`` in a stand-in for a 2-process DDP trainer, and a batch (x, y) for it."""
    from types import SimpleNamespace

    classifier = task == "classification"
    module = DeterministicModule(net() if classifier else nn.Sequential(nn.Linear(1, 1)), task=task, noise_variance=None if classifier else 0.5)
    fake = SimpleNamespace(
        world_size=2, global_rank=0, strategy=strategy, current_epoch=3, global_step=7, sanity_checking=False, num_val_batches=[num_val_batches]
    )
    monkeypatch.setattr(module, "_trainer", fake)
    x = torch.randn(8, 4 if classifier else 1)
    return module, fake, x, torch.randint(0, 3, (8,)) if classifier else torch.randn(8)


class EveryProcessAlike(OtherProcessFailed):
    """A stand-in for a 2-process DDP strategy whose other process decides as this one."""

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:  # noqa: A002 - Lightning's name
        super().reduce_boolean_decision(decision, all)
        return decision

    def reduce(self, value: torch.Tensor, reduce_op: str = "mean") -> torch.Tensor:
        return value * 2 if reduce_op == "sum" else value


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_a_validation_error_under_ddp_is_raised_at_the_passs_last_batch_its_other_batches_skipped(task, monkeypatch):
    # a process raising in its batch left the others in their next collective; a collective in every batch hung
    # where the processes hold different numbers of batches: the error waits for one decision at the last batch
    classifier = task == "classification"
    strategy = EveryProcessAlike()
    module, fake, x, y = _under_two_processes(task, strategy, monkeypatch, num_val_batches=4)
    logged = []
    monkeypatch.setattr(module, "log", lambda name, *args, **kwargs: logged.append(name))
    module.validation_step((x, y), 0)
    module.validation_step((x * float("nan"), y), 1)  # no error yet
    predicted = []
    monkeypatch.setattr(module, "sample_prediction", lambda *args: predicted.append(args) or None)
    module.validation_step((x, y), 2)  # skipped
    assert not predicted and not strategy.decisions
    with pytest.raises(FloatingPointError, match=r"^non-finite prediction in validation at epoch 3, step 7, in batch 1 of the validation loader"):
        module.validation_step((x, y), 3)
    assert strategy.decisions == [(True, False)] and not predicted and not logged
    # the next pass starts clean (batch 0 of the failed pass is not counted in it), and logs at its last batch
    monkeypatch.undo()
    monkeypatch.setattr(module, "_trainer", fake)
    monkeypatch.setattr(module, "log", lambda name, *args, **kwargs: logged.append(name))
    for batch_idx in range(4):
        module.validation_step((x, y), batch_idx)
    assert logged == (["val/accuracy", "val/nll", "val/ece"] if classifier else ["val/rmse", "val/nll"])
    assert [metric.update_count for metric in module.val_metrics.values()] == [4] * len(module.val_metrics)
    # on one process: logged in every batch (a loader of no length has no known last batch), errors raised at once
    fake.world_size, logged[:] = 1, []
    module.validation_step((x, y), 0)
    assert len(logged) == len(module.val_metrics)
    with pytest.raises(FloatingPointError, match="in batch 1 of the validation loader"):
        module.validation_step((x * float("nan"), y), 1)


def test_a_loader_of_no_length_under_ddp_decides_in_every_batch(monkeypatch):
    # Lightning counts such a loader's batches as limit_val_batches (5 here), which its stream (2 batches) never
    # reaches: waiting for that last batch logged no val/ metric and dropped the error
    from types import SimpleNamespace

    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from zip(x, y)

    loader = DataLoader(Stream(), batch_size=4)
    module = DeterministicModule(net())
    strategy = EveryProcessAlike()
    fake = SimpleNamespace(world_size=2, global_rank=0, strategy=strategy, current_epoch=0, global_step=0, sanity_checking=False,
                           num_val_batches=[5], val_dataloaders=loader, num_test_batches=[5], test_dataloaders=[loader])  # fmt: skip
    monkeypatch.setattr(module, "_trainer", fake)
    logged = []
    monkeypatch.setattr(module, "log", lambda name, *args, **kwargs: logged.append(name))
    module.validation_step((x[:4], y[:4]), 0)
    assert logged == ["val/accuracy", "val/nll", "val/ece"] and strategy.decisions == [(False, False)]
    with pytest.raises(FloatingPointError, match="in batch 1 of the validation loader"):
        module.validation_step((x[4:] * float("nan"), y[4:]), 1)
    module.on_test_epoch_start()
    module.test_step((x[:4], y[:4]), 0)
    with pytest.raises(FloatingPointError, match="in batch 1 of the test loader"):
        module.test_step((x[4:] * float("nan"), y[4:]), 1)
    assert strategy.decisions == [(False, False), (True, False), (False, False), (True, False)]
    # loaders nested in dicts and lists are numbered as Lightning numbers them (flattened in order)
    from bdl._distributed import batch_counts  # noqa: PLC0415

    sized = DataLoader(TensorDataset(x, y), batch_size=4)
    nested = SimpleNamespace(num_test_batches=[2, 5, 2], test_dataloaders={"b": [sized, loader], "a": sized})
    assert batch_counts(nested, "test") == [2, math.inf, 2]
    # a sized loader of the same count: one decision, at its last batch
    fake.val_dataloaders = DataLoader(TensorDataset(x, y), batch_size=4)
    fake.num_val_batches, strategy.decisions[:] = [2], []
    module.validation_step((x[:4], y[:4]), 0)
    assert strategy.decisions == []
    module.validation_step((x[4:], y[4:]), 1)
    assert strategy.decisions == [(False, False)]


def test_bdl_svi_module_stops_every_process_at_a_non_finite_loss(monkeypatch):
    # bdl.SVIModule (bdl.infer's) raised on the process whose loss failed only: the other died with gloo's
    # "Connection closed by peer" (or waited for NCCL's timeout)
    from types import SimpleNamespace

    module = bdl.SVIModule(bdl.infer.PyroModel(net(), "categorical", num_data=8), validate="never")
    strategy = OtherProcessFailed()
    monkeypatch.setattr(module, "_trainer", SimpleNamespace(world_size=2, global_rank=0, strategy=strategy, current_epoch=3, global_step=7))
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)
    with pytest.raises(FloatingPointError, match=r"non-finite training loss on another process at epoch 3, step 7 \(this is process 0 of 2\)"):
        module.training_step((torch.randn(8, 4), torch.randint(0, 3, (8,))), 0)
    assert strategy.decisions == [(False, False)]


def test_a_term_an_svi_subclass_adds_to_the_loss_is_checked_too(tmp_path):
    # its loss() check ran inside super().loss(), before the subclass's term: a NaN penalty trained on
    class Penalised(SVIModule):
        def loss(self, *args):
            loss, nll, kl = super().loss(*args)
            return loss + (float("nan") if self.global_step >= 1 else 0.0), nll, kl

    module = Penalised(bdl.infer.PyroModel(net(), "categorical"), num_val_samples=2, validate="never")
    with pytest.raises(FloatingPointError, match=r"epoch 0, step 1: the loss is not finite \(loss=nan, nll="):
        trainer(tmp_path, max_steps=3, num_sanity_val_steps=0, limit_val_batches=0).fit(module, TinyData(batch_size=8))


def test_a_non_finite_svi_validation_loss_is_raised_not_dropped(tmp_path):
    # the ELBO's mean metric dropped a NaN batch with a warning: val/elbo was the other batches' mean
    class NaNInValidation(SVIModule):
        def loss(self, *args):
            loss, nll, kl = super().loss(*args)
            return (loss * float("nan") if not self.training else loss), nll, kl

    module = NaNInValidation(bdl.infer.PyroModel(net(), "categorical", num_data=40), num_val_samples=2)
    with pytest.raises(FloatingPointError, match=r"non-finite validation loss at epoch 0, step 0, in batch 0 of the validation loader: the negative ELBO is nan"):
        trainer(tmp_path).validate(module, TinyData(batch_size=8))


def test_frozen_non_finite_parameters_and_unbuilt_lazy_layers_end_a_fit_quietly(tmp_path):
    # the end-of-fit check named a frozen inf (a bound) as a diverged step, and failed on a lazy layer never built
    class Bounded(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.unused = net(), nn.LazyLinear(3)
            self.bound = nn.Parameter(torch.tensor(float("inf")), requires_grad=False)

        def forward(self, x):
            return self.body(x).clamp_max(self.bound)

    trainer(tmp_path, max_steps=2, num_sanity_val_steps=0, limit_val_batches=0).fit(DeterministicModule(Bounded()), TinyData(batch_size=8))


@pytest.mark.parametrize("module_class", [VariationalModule, MCDropoutModule, EnsembleModule])
def test_compile_option_trains_and_evaluates_through_the_compiled_network(module_class, tmp_path):
    # dynamo counts recompilations per code object for the whole process: after the MC dropout compile tests the
    # Bayesian layers' forward hit the limit of 8 here (fullgraph: a hard failure) when run in that order
    torch._dynamo.reset()
    graphs = []

    def counting_backend(graph_module, example_inputs):  # eager execution of what dynamo traced, counted
        graphs.append(graph_module)
        return graph_module.forward

    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    module = module_class(model, compile={"backend": counting_backend, "fullgraph": True})
    keys = set(module.state_dict())
    fit = trainer(tmp_path, limit_val_batches=1)
    fit.fit(module, TinyData(batch_size=8))
    assert graphs  # the network ran compiled, in one graph per call (fullgraph)
    report = fit.test(module, TinyData(batch_size=8), verbose=False)
    assert math.isfinite(report[0]["test/nll"]) and set(module.state_dict()) == keys  # no _orig_mod. prefixes


def test_compile_option_rejects_anything_but_a_bool_or_options():
    with pytest.raises(TypeError, match="compile must be true, false or a dict of torch.compile options"):
        DeterministicModule(net(), compile="yes")


def test_ensemble_members_start_from_the_networks_own_initialisation():
    # the copies were re-initialised layer by layer with PyTorch's defaults: a ResNet's members 1..M-1 had
    # convolutions 2.5x smaller than member 0's (torchvision's Kaiming-normal) and logits 25x smaller
    from bdl.lightning import ResNet

    torch.manual_seed(0)
    module = EnsembleModule(ResNet(18, num_classes=10), num_members=3)
    stds = [float(member.net.layer1[0].conv1.weight.std()) for member in module.model.members]
    assert max(stds) / min(stds) < 1.1, stds
    first = [member.net.layer1[0].conv1.weight for member in module.model.members]
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])  # still apart


def test_ensemble_members_reset_attention_and_warn_about_parameters_without_a_reset():
    # torch's MultiheadAttention names its method _reset_parameters: every member had member 0's in-projection
    torch.manual_seed(0)
    net = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), nn.Flatten(), nn.Linear(8, 3))
    module = EnsembleModule(net, num_members=3)
    weights = [member[0].self_attn.in_proj_weight for member in module.model.members]
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])

    class WithToken(nn.Module):  # a learned token without reset_parameters stays member 0's in every member
        def __init__(self):
            super().__init__()
            self.token = nn.Parameter(torch.randn(4))
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(x + self.token)

    with pytest.warns(UserWarning, match=r"parameters \['token'\] keep member 0's values"):
        EnsembleModule(WithToken(), num_members=2)
    # weight_norm / spectral_norm: reset_parameters wrote into the computed weight, and every member kept member
    # 0's stored tensors (with a warning blaming a missing reset_parameters)
    for parametrization in (nn.utils.parametrizations.weight_norm, nn.utils.parametrizations.spectral_norm):
        normed = nn.Sequential(parametrization(nn.Linear(4, 8)), nn.ReLU(), nn.Linear(8, 3))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            members = EnsembleModule(normed, num_members=3).model.members
        for name, value in members[0][0].named_parameters():
            assert not torch.equal(value, dict(members[1][0].named_parameters())[name]), name
        x = torch.randn(5, 4)
        assert not torch.allclose(members[0](x), members[1](x)) and members[1][0].weight.shape == (8, 4)
    # spectral_norm's power-iteration vectors were member 0's: in eval mode a member's weight had norm 10-30, not 1
    torch.manual_seed(0)
    members = EnsembleModule(nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(64, 64))), num_members=3).eval().model.members
    assert all(abs(float(torch.linalg.matrix_norm(member[0].weight, ord=2)) - 1) < 0.1 for member in members)
    # an orthogonal weight (its stored tensor is -I in every member, its weight apart): no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        members = EnsembleModule(nn.Sequential(nn.utils.parametrizations.orthogonal(nn.Linear(4, 4))), num_members=2).model.members
    assert not torch.allclose(members[0][0].weight, members[1][0].weight)

    class Symmetric(nn.Module):  # torch's tutorial parametrization, without right_inverse: kept, with a warning
        def forward(self, weight):
            return weight.triu() + weight.triu(1).transpose(0, 1)

    layer = nn.Linear(4, 4)
    nn.utils.parametrize.register_parametrization(layer, "weight", Symmetric())
    with pytest.warns(UserWarning, match=r"\['0.parametrizations.weight.original'\] keep member 0's values .* a parametrization without right_inverse"):
        members = EnsembleModule(nn.Sequential(layer), num_members=2).model.members  # it failed in setattr
    assert not torch.equal(members[0][0].bias, members[1][0].bias)
    # a frozen pretrained backbone (and its BatchNorm statistics) was re-initialised in members 1..M-1
    backbone = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8, affine=False)))
    backbone[1].running_mean.fill_(3.0)
    backbone[2][1].running_mean.fill_(5.0)  # a BatchNorm without parameters: frozen with the block around it
    backbone.requires_grad_(False)
    head = nn.Sequential(nn.Linear(8, 3), nn.BatchNorm1d(3, affine=False))
    head[1].running_mean.fill_(7.0)
    ensemble = EnsembleModule(nn.Sequential(backbone, head), num_members=3).model
    for member in ensemble.members[1:]:
        assert torch.equal(member[0][0].weight, backbone[0].weight) and bool((member[0][1].running_mean == 3).all())
        assert bool((member[0][2][1].running_mean == 5).all())
        assert not torch.equal(member[1][0].weight, ensemble.members[0][1][0].weight)  # the head starts apart
        assert bool((member[1][1].running_mean == 0).all())  # and its statistics afresh


def test_validation_metrics_keep_their_precision_when_lightning_casts_the_module(tmp_path):
    # bf16-true casts the module with .to(dtype), metric states included: bfloat16 counts stop at 256
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(600, 4, generator=generator), torch.randint(0, 3, (600,), generator=generator)
    module = DeterministicModule(nn.Linear(4, 3))
    fit = trainer(tmp_path, precision="bf16-true")
    fit.validate(module, DataLoader(TensorDataset(x, y), batch_size=64), verbose=False)
    with torch.no_grad():
        logits = module.model(x.bfloat16()).float()
    expected = {"val/accuracy": (logits.argmax(1) == y).float().mean(), "val/nll": F.cross_entropy(logits, y)}
    for key, value in expected.items():
        assert float(fit.callback_metrics[key]) == pytest.approx(float(value), rel=1e-3), key


def test_module_options_that_worked_before_this_sessions_checks_still_work(tmp_path):
    # a lazy layer in an ensemble (the check for parameters no reset reaches read its uninitialised values)
    lazy = EnsembleModule(nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 3)), num_members=2)
    trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(lazy, TinyData(batch_size=8))

    def build():  # a class defined in a function, as a layer pattern (its stored form cannot be imported back)
        class Block(nn.Sequential):
            pass

        return Block, nn.Sequential(Block(nn.Linear(4, 8), nn.Dropout(0.1)), nn.Linear(8, 3))

    block, network = build()
    assert any(isinstance(m, bdl.BayesLinear) for m in VariationalModule(network, include=[block]).modules())
    block, network = build()
    assert MCDropoutModule(network, p=0.1, insert_before=[block]).model._target_names == ["0"]

    class MulticlassData(TinyData):  # a data module's own task vocabulary (torchmetrics') is not bdl's
        task = "multiclass"

    trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(DeterministicModule(net()), MulticlassData(batch_size=8))
    # a NaN regression target is a non-finite loss, not a shape error
    regression = DeterministicModule(nn.Linear(4, 1), task="regression")
    y = torch.randn(8)
    y[0] = float("nan")
    assert torch.isnan(regression.training_loss(torch.randn(8, 4), y)["loss"])


def test_weight_decay_leaves_the_posterior_std_parameters_alone():
    # decaying rho towards 0 pulls every std = exp(rho) towards 1, whatever the data and the KL say
    module = VariationalModule(net(), num_data=32, optimizer="sgd", weight_decay=5e-4)
    module.trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    optimizer = module.configure_optimizers()
    decays = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    for name, parameter in module.named_parameters():
        assert decays[id(parameter)] == (0.0 if name.endswith("_rho") else 5e-4), name


def test_distributed_rows_are_counted_once_and_predict_runs_no_collective(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from torch.utils.data import DistributedSampler

    from bdl.lightning import modules as lightning_modules
    from bdl.metrics import OODAUROC

    # validation under DDP: an odd-sized set's padded repeats were counted (they choose best.ckpt). 7 rows on
    # 2 processes: process 1 gets rows 1, 3, 5 and a repeat of row 0, in batches of 2
    data = TensorDataset(torch.randn(7, 4), torch.randint(0, 3, (7,)))
    kept = 0
    for rank in (0, 1):
        loader = DataLoader(data, batch_size=2, sampler=DistributedSampler(data, num_replicas=2, rank=rank, shuffle=False))
        module = DeterministicModule(net())
        module._trainer = SimpleNamespace(world_size=2, global_rank=rank, val_dataloaders={"val": loader})
        module.on_validation_epoch_start()
        for x, y in loader:
            prediction, labels = module._unpadded(bdl.predict(module.model, x, num_samples=1), y)
            kept += len(labels)
            assert prediction is None or len(prediction) == len(labels)
    assert kept == 7
    # a shuffled validation loader: DistributedSampler pads after shuffling, so the repeats are still at the end
    kept = 0
    for rank in (0, 1):
        sampler = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=True, seed=3)
        loader = DataLoader(data, batch_size=2, sampler=sampler)
        module = DeterministicModule(net())
        module._trainer = SimpleNamespace(world_size=2, global_rank=rank, val_dataloaders=loader)
        module.on_validation_epoch_start()
        for x, y in loader:
            kept += len(module._unpadded(bdl.predict(module.model, x, num_samples=1), y)[1])
    assert kept == 7
    # SVI's val/elbo left the repeats in too: process 1's last batch is row 5 and a repeat of row 0
    loader = DataLoader(data, batch_size=2, sampler=DistributedSampler(data, num_replicas=2, rank=1, shuffle=False))
    module = SVIModule(bdl.infer.PyroModel(net(), "categorical", num_data=7), num_val_samples=2)
    module._trainer = SimpleNamespace(
        world_size=2, global_rank=1, val_dataloaders=loader, training=False, sanity_checking=False, num_val_batches=[2], strategy=EveryProcessAlike()
    )
    lossed, logged, loss = [], [], module.loss
    module.loss = lambda *args: lossed.append(len(args[0])) or loss(*args)
    module.log = lambda name, value, **options: logged.append((name, options.get("batch_size")))
    module._checked_prediction = lambda x, num_samples, stage, *where: None
    module._update_val_metrics = lambda prediction, y, keep=None: logged.append(("metrics", keep))
    module.on_validation_epoch_start()
    for batch_idx, batch in enumerate(loader):
        module.validation_step(batch, batch_idx)
    assert lossed == [2, 1] and logged == [("val/elbo", None), ("metrics", 2), ("val/elbo", None), ("metrics", 1)]
    # a weighted mean of its own: Lightning's sync of unequal batch sizes rounded their average to an int
    assert float(module.val_elbo.weight) == 3.0
    # the test gather under limit_test_batches: fewer rows than the data set (narrowing to its size failed)
    gathered = SimpleNamespace(all_gather=lambda value: torch.stack([value, value if value.dim() == 0 else value + 1]))
    assert lightning_modules._gather_rows(gathered, torch.tensor([0.0, 2.0]), total=289).tolist() == [0.0, 1.0, 2.0, 3.0]
    # the predict loop's sampler does not pad: process 1 of 2 holds one row fewer of 3 (here its filler, -1, is cut)
    short = SimpleNamespace(all_gather=lambda value: torch.tensor([2, 1]) if value.dim() == 0 else torch.stack([value, torch.tensor([1.0, -1.0])]))
    assert lightning_modules._gather_rows(short, torch.tensor([0.0, 2.0]), total=3).tolist() == [0.0, 1.0, 2.0]
    # predict's unpadded sampler gives the processes unequal batch counts: a collective per batch deadlocked
    calls = []
    monkeypatch.setattr(lightning_modules, "raise_on_every_process", lambda module, error, what: calls.append(what))
    module = DeterministicModule(net())
    trainer(tmp_path).predict(module, DataLoader(TensorDataset(torch.randn(6, 4)), batch_size=4))
    assert not any("predict" in what for what in calls)
    # OOD states sync in the scores' dtype: a process without updates syncs a float placeholder (bool aborted gloo)
    metric = OODAUROC()
    metric.update(torch.tensor([0.1, 0.9]), torch.tensor([False, True]))
    assert metric.is_ood[0].dtype == torch.float32 and metric.compute() == 1.0


def test_a_module_that_overrides_the_validation_epoch_hooks_still_logs_its_metrics(tmp_path):
    # a Lightning hook a user overrides without calling super: the validation metrics must not depend on it
    class WithOwnHooks(DeterministicModule):
        def on_validation_epoch_start(self) -> None:
            pass

        def on_validation_epoch_end(self) -> None:
            self.log("val/extra", 1.0)

    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    module = WithOwnHooks(MLP(4, 2, hidden=[8]), lr=1e-2)
    fit = trainer(tmp_path, max_epochs=2)
    fit.fit(module, DataLoader(TensorDataset(x, y), batch_size=16), DataLoader(TensorDataset(x[:20], y[:20]), batch_size=8))
    assert {"val/accuracy", "val/nll", "val/ece", "val/extra"} <= set(fit.callback_metrics)
    with torch.no_grad():
        accuracy = float((module.model(x[:20]).argmax(1) == y[:20]).float().mean())
    assert float(fit.callback_metrics["val/accuracy"]) == pytest.approx(accuracy)


def test_predict_and_evaluate_take_an_ensemble_module_as_its_ensemble():
    # its forward gives the members' outputs [M, B, C]: "the model returned an output of shape (3, 6, 3) for a batch
    # of 6 inputs", from a checkpoint loaded back as from one built in Python
    from bdl.lightning import EnsembleModule

    module = EnsembleModule(nn.Linear(4, 3), num_members=3)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    pred, reference = bdl.predict(module, x), bdl.predict(module.model, x)
    assert pred.num_samples == 3 and torch.equal(pred.probs, reference.probs)
    assert bdl.evaluate(module, (x, y)).metrics["accuracy"] == bdl.evaluate(module.model, (x, y)).metrics["accuracy"]


def test_a_trainer_without_a_logger_writes_no_report_files(tmp_path, monkeypatch, caplog, capsys):
    # the README's example (logger=False) left metrics.json, report.md and four PNGs in the working directory
    from bdl.lightning.cli import Trainer

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    module = VariationalModule(MLP(64, 8, hidden=[16]), num_eval_samples=4)
    data = DigitsDataModule(ood="classes", ood_classes=[8, 9], batch_size=256)
    test = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    test.test(module, data, verbose=False)
    assert module.report is not None and module.report_dir is None
    assert list(tmp_path.iterdir()) == []
    assert "no logger, so the test report is written to no folder; module.report holds it" in caplog.text + capsys.readouterr().err
    quiet = VariationalModule(MLP(64, 8, hidden=[16]), num_eval_samples=4, save_report=False)
    logger = L.pytorch.loggers.CSVLogger(tmp_path / "quiet", name="run")
    Trainer(logger=logger, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu").evaluate(quiet, datamodule=data)
    assert "save_report is off: no report files written" in capsys.readouterr().out  # it said "no logger"
    logged = trainer(tmp_path / "logged", logger=L.pytorch.loggers.CSVLogger(tmp_path / "logged", name="run"))
    logged.test(module, data, verbose=False)
    assert (tmp_path / "logged" / "run" / "version_0" / "metrics.json").is_file() and module.report_dir is not None


def test_predict_redirects_only_bdl_modules_and_gives_them_their_noise_variance():
    # any module with a predictive_model attribute was redirected (a user's wrapper lost its forward); a mean-only
    # regressor's prediction had aleatoric variance 0, where its own test report has its noise_variance
    class Tempered(nn.Module):
        def __init__(self):
            super().__init__()
            self.predictive_model = nn.Linear(4, 3)

        def forward(self, x):
            return self.predictive_model(x) / 2

    wrapper, x = Tempered(), torch.randn(5, 4)
    torch.testing.assert_close(bdl.predict(wrapper, x, num_samples=1).probs, (wrapper.predictive_model(x) / 2).softmax(-1))
    module = DeterministicModule(nn.Linear(4, 1), task="regression", noise_variance=0.25)
    pred = bdl.predict(module, x)  # the module's task and sample count (predict's defaults crashed in its noise step)
    assert pred.task == "regression" and pred.num_samples == 1
    assert torch.equal(pred.aleatoric_variance, torch.full((5, 1), 0.25))
    torch.testing.assert_close(pred.aleatoric_variance, module.sample_prediction(x, 1).aleatoric_variance)
    assert bdl.evaluate(module, (x, torch.randn(5))).task == "regression"
    with pytest.raises(ValueError, match="task='classification', but the model is a regression module"):
        bdl.predict(module, x, task="classification")
    assert bdl.predict(VariationalModule(nn.Linear(4, 3), num_eval_samples=8, num_data=10), x).num_samples == 8  # was 32
    # torch.compile(module), as Lightning's docs show it, was not redirected: the ensemble's [M, B, C] again
    assert bdl.predict(torch.compile(EnsembleModule(nn.Linear(4, 3), num_members=3)), x).num_samples == 3


def test_predict_takes_an_svi_modules_task_and_sample_count():
    # a bdl.lightning.SVIModule (not an UncertaintyModule) was read as a classifier with 32 samples
    import pyro

    from bdl.lightning import SVIModule

    pyro.set_rng_seed(0)
    x, y = torch.randn(12, 4), torch.randn(12, 1)
    module = SVIModule(bdl.infer.PyroModel(MLP(4, 1, hidden=[8]), "gaussian", num_data=12), num_eval_samples=6, lr=1e-2)
    pred = bdl.predict(module, x)
    assert (pred.task, pred.num_samples) == ("regression", 6)
    assert bdl.evaluate(module, (x, y)).task == "regression"
    with pytest.raises(ValueError, match="but the model is a regression module"):
        bdl.predict(module, x, task="classification")


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        generator = torch.Generator().manual_seed(0)
        return iter([(torch.randn(4, generator=generator), torch.tensor(i % 3)) for i in range(20)])


def test_loaders_the_modules_cannot_score_are_refused(tmp_path):
    x, y = torch.randn(24, 4), torch.randint(0, 3, (24,))
    data = DataLoader(TensorDataset(x, y), batch_size=8)
    # a second validation loader: Lightning asked for dataloader_idx, and with it the loaders' metrics were pooled
    for module in (DeterministicModule(net(), save_report=False), SVIModule(bdl.PyroModel(net(), num_data=24), save_report=False)):
        with pytest.raises(ValueError, match=f"{type(module).__name__} validates on one loader .*, got a second"):
            trainer(tmp_path).fit(module, data, [data, data])
    # a third test loader was predicted and left out of the report
    with pytest.raises(ValueError, match="tests on a test loader and an optional OOD loader, got a third"):
        trainer(tmp_path).test(DeterministicModule(net(), save_report=False), [data, data, data])
    # a KL warm-up over an epoch of unknown length ended after kl_warmup_epochs steps
    with pytest.raises(ValueError, match=r"kl_warmup_epochs=2.0 is scheduled in epochs, and the training loader's epoch has no length"):
        trainer(tmp_path).fit(VariationalModule(net(), num_data=20, kl_warmup_epochs=2, save_report=False), DataLoader(_Stream(), batch_size=4))
    # a cosine schedule over a run without an end: "cannot convert float infinity to integer"
    with pytest.raises(ValueError, match="lr_schedule='cosine', lr_decay < 1\\) needs a run of known length"):
        trainer(tmp_path, max_epochs=-1, max_steps=-1, max_time={"seconds": 30}).fit(DeterministicModule(net(), lr_schedule="cosine", save_report=False), data)
    for steps in (-1, 0, float("inf")):  # a number of steps given directly: the lr decayed in one step, or OverflowError
        with pytest.raises(ValueError, match="needs a run of known length"):
            bdl.infer.exponential_decay(torch.optim.SGD(net().parameters(), lr=0.1), 0.1, steps)
    with pytest.raises(ValueError, match="needs a run of known length: set the Trainer's max_steps"):  # the lr was 0 after one step
        trainer(tmp_path, max_epochs=3).fit(DeterministicModule(net(), lr_schedule="cosine", save_report=False), DataLoader(_Stream(), batch_size=4))


def test_numpy_numbers_among_the_options_leave_checkpoints_loadable(tmp_path):
    # accepted (np.int64 counts, np.float64 rates), but kept as numpy scalars among the hyperparameters, which
    # torch.load(weights_only=True), as Lightning and bdl evaluate load, refused: no checkpoint of the run loaded
    import numpy as np

    from bdl.infer import PyroModel

    data = TinyData(batch_size=np.int64(16))
    modules = [MCDropoutModule(MLP(4, 3, hidden=[8], dropout=0.1), num_eval_samples=np.int64(4), lr=np.float64(1e-2), save_report=False),
               SVIModule(PyroModel(MLP(4, 3, hidden=[8]), "categorical", num_data=np.int64(32)), num_eval_samples=np.int64(4),
                         lr=np.float64(1e-2), num_particles=np.int64(2), guide="lowrank_normal", rank=np.int64(2))]  # fmt: skip
    for module in modules:
        fit = trainer(tmp_path, enable_checkpointing=True, default_root_dir=tmp_path / type(module).__name__)
        fit.fit(module, data)
        checkpoint = torch.load(fit.checkpoint_callback.best_model_path, weights_only=True)
        assert type(checkpoint["hyper_parameters"]["num_eval_samples"]) is int  # Pyro's options too (they refused them)
        assert type(checkpoint["hyper_parameters"]["lr"]) is float
        fit.test(module, data, ckpt_path="best", verbose=False)


def test_bf16_true_warns_where_optimiser_steps_round_away(tmp_path):
    # rho near log(1e-3) = -6.9 is 0.031 apart in bfloat16: Adam steps of about lr = 3e-3 rounded back, and the
    # posterior stds (SVI: the guide scales) never trained, with no word of why
    from bdl.infer import PyroModel

    for module, frozen in ((VariationalModule(MLP(4, 3, hidden=[8]), lr=3e-3, save_report=False), "weight_rho"),
                           (SVIModule(PyroModel(MLP(4, 3, hidden=[8]), "categorical"), lr=1e-2), "scales")):  # fmt: skip
        with pytest.warns(UserWarning, match=rf"parameter tensors \(e\.g\. .*{frozen}.*use precision 'bf16-mixed'"):
            trainer(tmp_path, max_steps=1, precision="bf16-true", limit_val_batches=0).fit(module, TinyData(batch_size=16))
    with warnings.catch_warnings():  # float32 parameters under bf16-mixed, and a plain network's weights, move
        warnings.filterwarnings("error", message=".*rounds back.*")
        trainer(tmp_path, max_steps=1, precision="bf16-mixed", limit_val_batches=0).fit(
            VariationalModule(MLP(4, 3, hidden=[8]), save_report=False), TinyData(batch_size=16))
        trainer(tmp_path, max_steps=1, precision="bf16-true", limit_val_batches=0).fit(
            DeterministicModule(MLP(4, 3, hidden=[8]), lr=3e-3, save_report=False), TinyData(batch_size=16))
        # a LayerNorm weight of 1.0 moves down at 3e-3 (the spacing below a power of two is half); a warm-up starts at
        # 1e-5 but reaches 3e-3: both were flagged as staying as initialised
        normed = nn.Sequential(nn.Linear(4, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 3))
        trainer(tmp_path, max_steps=1, precision="bf16-true", limit_val_batches=0).fit(
            WarmUp(normed, lr=3e-3, save_report=False), TinyData(batch_size=16))
        trainer(tmp_path, max_steps=1, precision="bf16-true", limit_val_batches=0).fit(  # its peak is on the scheduler
            Cyclic(copy.deepcopy(normed), lr=3e-3, save_report=False), TinyData(batch_size=16))


class Cyclic(DeterministicModule):
    def configure_optimizers(self):  # noqa: ANN201
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        return [optimizer], [torch.optim.lr_scheduler.CyclicLR(optimizer, base_lr=1e-5, max_lr=self.lr, step_size_up=5)]


class WarmUp(DeterministicModule):
    def configure_optimizers(self):  # noqa: ANN201
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        return [optimizer], [torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / 300, total_iters=10)]


def test_adam_on_float16_parameters_is_named_as_the_cause_of_a_non_finite_loss(tmp_path):
    # 16-true: Adam's eps=1e-8 and small squared gradients are 0 in float16, and the error said "lower the learning rate"
    torch.manual_seed(0)
    module = DeterministicModule(MLP(4, 3, hidden=[64]), lr=1e-6, save_report=False)
    with pytest.raises(FloatingPointError, match=r"Adam steps float16 parameters: its eps=1e-08 .* at any learning rate"):
        trainer(tmp_path, max_steps=5, precision="16-true", limit_val_batches=0).fit(module, TinyData(batch_size=16))
    # a NaN input at step 0 (every parameter finite): the generic advice, not Adam's eps
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    x[0, 0] = math.nan
    module = DeterministicModule(MLP(4, 3, hidden=[64]), lr=1e-6, save_report=False)
    with pytest.raises(FloatingPointError, match=r"step 0: .*every parameter is finite.*check the inputs for NaN/inf") as caught:
        trainer(tmp_path, max_steps=5, precision="16-true", limit_val_batches=0).fit(module, DataLoader(TensorDataset(x, y), batch_size=16))
    assert "Adam" not in str(caught.value)


def test_a_checkpoint_tested_on_other_splits_than_it_was_trained_on_is_warned_of(tmp_path):
    # another seed in evaluate put rows the model trained on into its test set, and the report overstated it, silently
    from bdl.lightning import DigitsDataModule

    module = DeterministicModule(MLP(64, 8, hidden=[8]), save_report=False)
    fit = trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0, enable_checkpointing=True)
    fit.fit(module, DigitsDataModule(ood_classes=[8, 9]))
    path = fit.checkpoint_callback.last_model_path or fit.checkpoint_callback.best_model_path
    assert torch.load(path, weights_only=True)["DigitsDataModule"]["split_fingerprint"]["test"][:2] == ["TensorDataset", 289]
    for seed, warned in ((0, False), (1, True)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer(tmp_path).test(module, DigitsDataModule(ood_classes=[8, 9], seed=seed), ckpt_path=path, verbose=False)
        messages = [str(w.message) for w in caught if "other data splits" in str(w.message)]
        assert bool(messages) == warned
    assert "(train, val, test differ): rows it trained on may now be in the validation or test set" in messages[0]


def test_split_fingerprints_tolerate_other_kernels_nans_and_another_ood_set():
    # identical splits warned: float32 data built by other CPU kernels (last bits) summed to another value at 1e-9, a
    # NaN made every sum NaN (never equal), and another OOD set (no training data) read as training rows in the test set
    from torch.utils.data import Subset

    from bdl.lightning.data import _fingerprint, _same_fingerprint

    x = torch.randn(1000, 3)
    x = (x - x.mean(0)) / x.std(0)  # standardised: each column sums to about 0
    ulp = x.clone()
    ulp[0, 0] = torch.nextafter(ulp[0, 0], torch.tensor(math.inf))
    assert _same_fingerprint(_fingerprint(TensorDataset(x)), _fingerprint(TensorDataset(ulp)))
    assert not _same_fingerprint(_fingerprint(TensorDataset(x)), _fingerprint(TensorDataset(x[1:])))
    assert not _same_fingerprint(_fingerprint(TensorDataset(x[:-1])), _fingerprint(TensorDataset(x[1:])))  # another row
    x[5, 1] = float("nan")
    assert _same_fingerprint(_fingerprint(TensorDataset(x)), _fingerprint(TensorDataset(x.clone())))
    inf = math.inf
    finite, plus, minus = (TensorDataset(torch.tensor([[v, 1.0], [2.0, 3.0]])) for v in (5.0, inf, -inf))
    assert not _same_fingerprint(_fingerprint(plus), _fingerprint(minus)) and not _same_fingerprint(_fingerprint(plus), _fingerprint(finite))
    tiny = 5e-10 * torch.rand(40, 2)  # small values: an absolute floor of 1e-6 took every split for the same
    assert not _same_fingerprint(_fingerprint(TensorDataset(tiny[:20])), _fingerprint(TensorDataset(tiny[20:])))
    class Rows(torch.utils.data.Dataset):  # its data by other names than the usual ones: it was fingerprinted [type, len]
        def __init__(self, X, Y):
            self.X, self.Y = X, Y

        def __len__(self):
            return len(self.X)

        def __getitem__(self, i):
            return self.X[i], self.Y[i]

    rows, labels_ = torch.randn(100, 3), torch.arange(100) % 2
    assert not _same_fingerprint(_fingerprint(Rows(rows[:50], labels_[:50])), _fingerprint(Rows(rows[50:], labels_[50:])))
    base = TensorDataset(torch.arange(10.0))
    assert _fingerprint(Subset(base, torch.arange(5)))[:2] == ["Subset", 5]  # tensor indices, summed as a tensor
    assert not _same_fingerprint(_fingerprint(Subset(base, [0, 1, 2])), _fingerprint(Subset(base, [0, 1, 3])))
    large = torch.arange(50_000)  # one index in 50,000 moved: a tolerance on the sum of squares let it through
    assert not _same_fingerprint(_fingerprint(Subset(base, large[:-1])), _fingerprint(Subset(base, torch.cat([large[:-2], large[-1:]]))))
    labels = torch.arange(20) % 3  # integer labels, exactly: one row's label changed
    assert not _same_fingerprint(_fingerprint(TensorDataset(x[:20], labels)), _fingerprint(TensorDataset(x[:20], labels + (torch.arange(20) == 0))))
    assert _fingerprint(TensorDataset(torch.zeros(2, 3, device="meta"))) == ["TensorDataset", 2]  # no sum to take

    data = TinyData()
    data.setup()
    other = TinyData()
    other.setup()
    other.splits.ood = TensorDataset(torch.randn(8, 4))  # another OOD set: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other.load_state_dict(data.state_dict())

    class Cached(torch.utils.data.Dataset):  # a cache filled as it is read: fingerprinted at the first checkpoint, it differed
        def __init__(self, X, Y):
            self.X, self.Y, self.cache = X, Y, torch.zeros_like(X)

        def __len__(self):
            return len(self.X)

        def __getitem__(self, i):
            self.cache[i] = 2 * self.X[i]
            return self.cache[i], self.Y[i]

    class Toy(UncertaintyDataModule):
        def build(self):
            inputs, labels = torch.randn(30, 3, generator=torch.Generator().manual_seed(0)), torch.arange(30) % 2
            return Splits(*(Cached(inputs[i : i + 10], labels[i : i + 10]) for i in (0, 10, 20)), num_classes=2)

    read = Toy(batch_size=4)
    read.setup()
    for _ in read.train_dataloader():
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh = Toy(batch_size=4)
        fresh.setup()
        fresh.load_state_dict(read.state_dict())

