"""Wrong inputs across the public API and the ``bdl`` command give a clear error where they enter.

Every row of :data:`ROWS` is one wrong input: a call, the exception type it must raise, and a regex the
message must match. The regex names the argument and what was expected, so a traceback from deep inside
torch, a wrong exception type or a message that does not say which argument is wrong fails the row.

Calls take the test's ``tmp_path`` (files, run folders). ``bdl`` command rows also check that the failed run
left no ``runs/<name>/version_<n>`` folder behind.
"""

import math
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bdl
from bdl import infer
from bdl.lightning import (
    MLP,
    DeterministicModule,
    DigitsDataModule,
    LeNet5,
    MCDropoutModule,
    RegressionGapDataModule,
    TabularDataModule,
    TwoMoonsDataModule,
    VariationalModule,
)
from bdl.metrics import functional as M

REPO = Path(__file__).parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
TINY = [
    "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
    "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]  # fmt: skip



# ------------------------------------------------------------------------------------------------ helpers
def _bnn() -> nn.Module:
    return nn.Sequential(bdl.BayesLinear(4, 8), nn.ReLU(), bdl.BayesLinear(8, 3))


def _x(n: int = 10) -> torch.Tensor:
    return torch.randn(n, 4)


def _y(n: int = 10) -> torch.Tensor:
    return torch.arange(n) % 3


def _probs(n: int = 10) -> torch.Tensor:
    return torch.softmax(torch.randn(n, 3), -1)


def _prediction() -> bdl.Prediction:
    return bdl.Prediction.from_logits(torch.randn(4, 10, 3))


def _pyro_model() -> infer.PyroModel:
    return infer.PyroModel(nn.Linear(2, 2), "categorical")


def _empty_loader(labels: bool = False) -> DataLoader:
    tensors = (torch.empty(0, 4),) + ((torch.empty(0, dtype=torch.long),) if labels else ())
    return DataLoader(TensorDataset(*tensors), batch_size=4)


def _csv(path: Path, rows: int) -> str:
    path.write_text("a,b,y\n" + "".join(f"{i},{2 * i},{i % 2}\n" for i in range(rows)))
    return str(path)


def _tabular_config(tmp: Path, data_path: str, in_features: int = 2, method: str = "DeterministicModule") -> str:
    config = {
        "seed_everything": 0,
        "model": {
            "class_path": f"bdl.lightning.{method}",
            "init_args": {"model": {"class_path": "bdl.lightning.MLP", "init_args": {"in_features": in_features, "out_features": 2, "hidden": [8]}}},
        },
        "data": {"class_path": "bdl.lightning.TabularDataModule", "init_args": {"path": data_path, "target": "y", "batch_size": 8}},
    }
    path = tmp / "tabular.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def cli(*args: object):
    """A row's call running ``bdl <args> --trainer.default_root_dir <tmp>/runs`` (args may be functions of tmp)."""

    def run(tmp: Path) -> None:
        from bdl.lightning.cli import main

        resolved = [arg(tmp) if callable(arg) else str(arg) for arg in args]
        main([*resolved, *TINY, "--trainer.default_root_dir", str(tmp / "runs")])

    run.is_cli = True
    return run


def _row(name, call, error, pattern, marks=()):
    return pytest.param(call, error, pattern, id=name, marks=marks)


# -------------------------------------------------------------------------------------------------- table
ROWS = [
    # ---- Bayesian layers and priors: sizes, dtypes, devices, scales, names
    _row("BayesLinear-negative-in_features", lambda t: bdl.BayesLinear(-1, 2), ValueError, r"BayesLinear: in_features must be an int >= 0, got -1"),
    _row("BayesLinear-float-out_features", lambda t: bdl.BayesLinear(4, 2.5), TypeError, r"BayesLinear: out_features must be an int, got float"),
    _row("BayesConv2d-zero-in_channels", lambda t: bdl.BayesConv2d(0, 4, 3), ValueError, r"BayesConv2d: in_channels must be an int >= 1, got 0"),
    _row("BayesLinear-wrong-feature-count", lambda t: bdl.BayesLinear(4, 2)(torch.randn(3, 5)), ValueError, r"BayesLinear: input must have 4 features in its last dimension, got shape \(3, 5\)"),
    _row("BayesConv2d-wrong-channels", lambda t: bdl.BayesConv2d(3, 4, 3)(torch.randn(2, 1, 8, 8)), ValueError, r"BayesConv2d: input must be \(N, 3, \*2 spatial dims\).*got shape \(2, 1, 8, 8\)"),
    _row("BayesLinear-int-input", lambda t: bdl.BayesLinear(4, 2)(torch.randint(0, 3, (3, 4))), TypeError, r"BayesLinear: input must be a floating-point tensor of the layer's dtype torch.float32, got torch.int64"),
    _row("BayesLinear-float64-input", lambda t: bdl.BayesLinear(4, 2)(torch.randn(3, 4, dtype=torch.float64)), TypeError, r"input must be a floating-point tensor of the layer's dtype torch.float32, got torch.float64"),
    _row("BayesConv1d-int-input", lambda t: bdl.BayesConv1d(1, 2, 3)(torch.randint(0, 3, (2, 1, 8))), TypeError, r"BayesConv1d: input must be a floating-point tensor .* got torch.int64"),
    _row("BayesLinear-input-on-other-device", lambda t: bdl.BayesLinear(4, 2)(torch.randn(3, 4, device="meta")), ValueError, r"BayesLinear: input is on device meta but the layer's parameters are on cpu"),
    _row("BayesConv2d-input-on-other-device", lambda t: bdl.BayesConv2d(1, 2, 3)(torch.randn(1, 1, 5, 5, device="meta")), ValueError, r"BayesConv2d: input is on device meta but the layer's parameters are on cpu"),
    _row("posterior_std_init-zero", lambda t: bdl.BayesLinear(4, 2, posterior_std_init=0.0), ValueError, r"posterior_std_init must be a positive finite number, got 0.0"),
    _row("posterior_std_init-negative", lambda t: bdl.BayesConv2d(1, 2, 3, posterior_std_init=-1e-3), ValueError, r"posterior_std_init must be a positive finite number, got -0.001"),
    _row("GaussianPrior-negative-scale", lambda t: bdl.GaussianPrior(0.0, -1.0), ValueError, r"GaussianPrior: scale must be a positive finite number, got -1.0"),
    _row("GaussianPrior-zero-scale", lambda t: bdl.GaussianPrior(0.0, 0.0), ValueError, r"GaussianPrior: scale must be a positive finite number, got 0.0"),
    # bools were read as 1 and 0 here, and refused by as_prior
    _row("GaussianPrior-bool-scale", lambda t: bdl.GaussianPrior(0.0, True), ValueError, r"GaussianPrior: scale must be a positive finite number, got True"),
    _row("GaussianPrior-bool-loc", lambda t: bdl.GaussianPrior(False, 1.0), ValueError, r"GaussianPrior: loc must be a finite number .* got False"),
    _row("GaussianPrior-bool-tensor-scale", lambda t: bdl.GaussianPrior(0.0, torch.tensor(True)), ValueError, r"GaussianPrior: scale must be a tensor of positive finite numbers, got a bool tensor"),
    _row("GaussianPrior-bool-tensor-loc", lambda t: bdl.GaussianPrior(torch.tensor([True, False]), 1.0), ValueError, r"GaussianPrior: loc must be a tensor of finite numbers, got a bool tensor"),
    _row("posterior_std_init-bool", lambda t: bdl.BayesLinear(4, 2, posterior_std_init=True), ValueError, r"posterior_std_init must be a positive finite number, got True"),
    _row("kl_weight-bool", lambda t: bdl.elbo_loss(torch.tensor(1.0), torch.tensor(1.0), 10, kl_weight=True), ValueError, r"kl_weight must be a finite number >= 0, got True"),
    _row("GaussianPrior-tensor-scale-with-a-zero", lambda t: bdl.GaussianPrior(0.0, torch.tensor([1.0, 0.0])), ValueError, r"GaussianPrior: scale must be positive and finite everywhere"),
    _row("ScaleMixturePrior-zero-scale2", lambda t: bdl.ScaleMixturePrior(scale2=0.0), ValueError, r"ScaleMixturePrior: scale2 must be a positive finite number, got 0.0"),
    _row("ScaleMixturePrior-mixture_weight-above-1", lambda t: bdl.ScaleMixturePrior(mixture_weight=1.5), ValueError, r"mixture_weight must be in \(0, 1\), got 1.5"),
    _row("ScaleMixturePrior-mixture_weight-1", lambda t: bdl.ScaleMixturePrior(scale1=0.5, mixture_weight=1), ValueError, r"got 1 \(one component: use GaussianPrior\(0.0, scale1\)"),
    _row("prior-as-negative-float", lambda t: bdl.BayesLinear(4, 2, prior=-0.5), ValueError, r"prior: a number is the scale s of the prior N\(0, s\^2\) and must be positive and finite, got -0.5"),
    _row("bayesianize-prior-as-negative-float", lambda t: bdl.bayesianize(nn.Linear(4, 2), prior=-1), ValueError, r"prior: a number is the scale s .* got -1$"),
    _row("weight_prior-assigned-a-negative-float", lambda t: setattr(bdl.BayesLinear(4, 2), "weight_prior", -2), ValueError, r"weight_prior: a number is the scale s .* got -2$"),
    _row("prior-as-a-string", lambda t: bdl.BayesLinear(4, 2, prior="gaussian"), TypeError, r"prior must be a bdl Prior, a positive float .* got str"),
    _row("prior-tensor-of-the-wrong-shape", lambda t: bdl.BayesLinear(4, 2, prior=bdl.GaussianPrior(torch.zeros(3, 3), 1.0)), ValueError, r"GaussianPrior: loc of shape \(3, 3\) does not broadcast to the parameter's shape \(2, 4\)"),
    _row("unknown-estimator", lambda t: bdl.BayesLinear(4, 2, estimator="mc"), ValueError, r"estimator must be one of \['flipout', 'local', 'reparam'\], got 'mc'"),
    _row("unknown-std_transform", lambda t: bdl.BayesLinear(4, 2, std_transform="relu"), ValueError, r"std_transform must be one of \['exp', 'softplus'\], got 'relu'"),
    _row("use_estimator-unknown-name", lambda t: bdl.use_estimator(_bnn(), "mc").__enter__(), ValueError, r"estimator must be one of .*got 'mc'"),
    _row("bayesianize-tensor-prior", lambda t: bdl.bayesianize(nn.Sequential(nn.Linear(3, 4)), prior=bdl.GaussianPrior(torch.zeros(4, 3), 1.0)), ValueError, r"prior: its tensor parameters \{'loc': \(4, 3\)\} do not fit '0' \(weight \(4, 3\), bias \(4,\)\): bayesianize gives every converted layer this prior"),
    _row("bayesianize-include-matches-nothing", lambda t: bdl.bayesianize(nn.Linear(2, 2), include=["nope"]), ValueError, r"include=\['nope'\] selects no nn.Linear/nn.Conv layer"),
    _row("kl_divergence-of-a-non-module", lambda t: bdl.kl_divergence("model"), TypeError, r"model must be an nn.Module, got str"),
    _row("elbo_loss-num_data-zero", lambda t: bdl.elbo_loss(torch.tensor(1.0), torch.tensor(1.0), 0), ValueError, r"num_data must be a positive int \(the training-set size\), got 0"),
    _row("gaussian_nll-negative-variance", lambda t: bdl.gaussian_nll(torch.zeros(3), -torch.ones(3), torch.zeros(3)), ValueError, r"variance must be > 0 everywhere, got a minimum of -1"),
    _row("gaussian_nll-zero-variance", lambda t: bdl.gaussian_nll(torch.zeros(3), torch.zeros(3), torch.ones(3)), ValueError, r"variance must be > 0 everywhere, got a minimum of 0"),
    _row("elbo_loss-empty-nll", lambda t: bdl.elbo_loss(torch.empty(0), torch.tensor(1.0), 10), ValueError, r"nll must be .* B >= 1, got shape \(0,\)"),
    _row("elbo_loss-float-nll", lambda t: bdl.elbo_loss(1.0, torch.tensor(1.0), 10), TypeError, r"nll must be a tensor"),
    # ---- predict and Prediction: num_samples, names, empty data, shapes, dtypes, devices
    _row("predict-num_samples-zero", lambda t: bdl.predict(_bnn(), _x(), num_samples=0), ValueError, r"num_samples must be an int >= 1, got 0"),
    _row("predict-num_samples-negative", lambda t: bdl.predict(_bnn(), _x(), num_samples=-3), ValueError, r"num_samples must be an int >= 1, got -3"),
    _row("predict-num_samples-float", lambda t: bdl.predict(_bnn(), _x(), num_samples=2.5), ValueError, r"num_samples must be an int >= 1, got 2.5"),
    _row("predict-regression-pair-with-none", lambda t: bdl.predict(lambda x: (x[:, :1], None), _x(), num_samples=1, task="regression"), TypeError, r"a regression model must return a mean or a \(mean, variance\) pair of tensors, got a pair of Tensor and NoneType"),
    _row("predict-classification-nested-tuple", lambda t: bdl.predict(lambda x: (x, (x, x)), _x(), num_samples=1), ValueError, r"a classification model must return logits \[B, C\], got tuple$"),
    _row("predict-unknown-task", lambda t: bdl.predict(_bnn(), _x(), task="segmentation"), ValueError, r"task must be one of \['classification', 'regression'\], got 'segmentation'"),
    _row("predict-unknown-method", lambda t: bdl.predict(_bnn(), _x(), method="fast"), ValueError, r"method must be one of \['auto', 'loop', 'batched'\], got 'fast'"),
    _row("predict-batch_size-zero", lambda t: bdl.predict(_bnn(), _x(), batch_size=0), ValueError, r"batch_size must be an int >= 1, got 0"),
    _row("predict-zero-length-tensor", lambda t: bdl.predict(_bnn(), torch.empty(0, 4)), ValueError, r"inputs are empty: nothing to predict"),
    _row("predict-empty-dataloader", lambda t: bdl.predict(_bnn(), _empty_loader()), ValueError, r"inputs are empty: nothing to predict"),
    _row("predict-wrong-feature-count-batched-path", lambda t: bdl.predict(_bnn(), torch.randn(5, 3), method="batched"), ValueError, r"BayesLinear: input must have 4 features in its last dimension, got shape \(5, 3\)"),
    _row("predict-int-inputs", lambda t: bdl.predict(_bnn(), torch.randint(0, 3, (5, 4))), TypeError, r"input must be a floating-point tensor of the layer's dtype torch.float32, got torch.int64"),
    # read as batches: x was predicted first, then the next "batch" was refused as "batches of inputs must be ..."
    _row("predict-x-and-list-y", lambda t: bdl.predict(_bnn(), (_x(), [0] * 10)), TypeError, r"inputs \(x, y\): y must be a tensor of targets \(or None\), got list"),
    _row("predict-x-and-y-of-different-lengths", lambda t: bdl.predict(_bnn(), (_x(), _y(5))), ValueError, r"inputs \(x, y\): x and y must have the same length, got \(10, 4\) and \(5,\)"),
    _row("predict-inputs-of-a-wrong-type", lambda t: bdl.predict(_bnn(), "data"), TypeError, r"batches of inputs must be a tensor or a tuple \(x, y, \.\.\.\), got str"),
    _row("predict-meta-inputs", lambda t: bdl.predict(_bnn(), torch.randn(5, 4, device="meta")), ValueError, r"inputs are on the 'meta' device \(shape \(5, 4\), no values\)"),
    _row("predict-model-on-meta-device", lambda t: bdl.predict(_bnn().to("meta"), _x()), ValueError, r"model: its parameters are on the 'meta' device"),
    _row("predict-ensemble-num_samples-not-a-multiple", lambda t: bdl.predict(bdl.DeepEnsemble.from_factory(lambda: nn.Linear(4, 3), 2), _x(), num_samples=3), ValueError, r"num_samples must be a multiple of the ensemble's 2 members.*got 3"),
    _row("from_probs-rows-not-summing-to-1", lambda t: bdl.Prediction.from_probs(torch.full((2, 5, 3), 0.5)), ValueError, r"rows of `sample_probs` must sum to 1 over the last dimension \(tolerance 0.001\), row \(0, 0\) sums to 1.5"),
    _row("from_probs-negative-probabilities", lambda t: bdl.Prediction.from_probs(-torch.full((2, 5, 3), 1 / 3)), ValueError, r"`sample_probs` must be probabilities in \[0, 1\], got values in \[-0.3333, -0.3333\] \(did you pass logits\? use Prediction.from_logits\)"),
    _row("from_probs-nan", lambda t: bdl.Prediction.from_probs(torch.full((2, 5, 3), math.nan)), ValueError, r"sample_probs must be finite, got 30 NaN/Inf entries"),
    _row("from_logits-2d", lambda t: bdl.Prediction.from_logits(torch.randn(5, 3)), ValueError, r"sample_logits must have shape \[S, N, C\] of logits, got \(5, 3\)"),
    _row("from_logits-int", lambda t: bdl.Prediction.from_logits(torch.randint(0, 3, (2, 5, 3))), TypeError, r"sample_logits must be floating point, got torch.int64"),
    _row("from_logits-zero-samples", lambda t: bdl.Prediction.from_logits(torch.randn(0, 5, 3)), ValueError, r"sample_logits must hold at least one sample \(S >= 1\)"),
    _row("from_logits-inf", lambda t: bdl.Prediction.from_logits(torch.full((2, 5, 3), math.inf)), ValueError, r"sample_logits must be finite"),
    _row("from_regression-negative-variance", lambda t: bdl.Prediction.from_regression(torch.randn(2, 5), -torch.ones(2, 5)), ValueError, r"sample_variances must be >= 0"),
    _row("interval-level-above-1", lambda t: bdl.Prediction.from_regression(torch.randn(2, 5)).interval(1.5), ValueError, r"level must be a number in \(0, 1\), got 1.5"),
    _row("Prediction.cat-of-nothing", lambda t: bdl.Prediction.cat([]), ValueError, r"parts is empty"),
    # ---- metrics: labels, probabilities, shapes, empty inputs, devices, names
    _row("ece-float-labels", lambda t: M.ece(_probs(), _y().float()), TypeError, r"`target` must hold integer class labels, got dtype torch.float32"),
    _row("ece-labels-above-range", lambda t: M.ece(_probs(), _y() + 5), ValueError, r"`target` must hold labels in \[0, 2\] for 3 classes, got labels in \[5, 7\]"),
    _row("nll-negative-labels", lambda t: M.nll(_probs(), _y() - 5), ValueError, r"`target` must hold labels in \[0, 2\] for 3 classes, got labels in \[-5, -3\]"),
    _row("brier-probabilities-not-summing-to-1", lambda t: M.brier_score(_probs() * 0.5, _y()), ValueError, r"rows of `probs` must sum to 1 .*row \d+ sums to 0.5"),
    _row("ece-logits-instead-of-probabilities", lambda t: M.ece(torch.randn(10, 3) * 5, _y()), ValueError, r"`probs` must be probabilities in \[0, 1\].*pass softmax\(logits\), not logits"),
    _row("ood_metrics-tpr-none", lambda t: M.ood_metrics(torch.rand(5), torch.rand(5), tpr=None), TypeError, r"`tpr` must be a number, got NoneType"),
    _row("ood_metrics-tpr-string", lambda t: M.ood_metrics(torch.rand(5), torch.rand(5), tpr="0.9"), TypeError, r"`tpr` must be a number, got str"),
    _row("quantile_calibration_error-levels-string", lambda t: M.quantile_calibration_error(torch.zeros(3), torch.ones(3), torch.zeros(3), levels="0.5"), TypeError, r"`levels` must be a number in \(0, 1\) or a list of them, got '0.5'"),
    _row("evaluate-levels-percent", lambda t: bdl.evaluate(bdl.Prediction.from_regression(torch.randn(2, 4, 1)), torch.randn(4), task="regression", levels=[95]), ValueError, r"`levels` must be a non-empty list of numbers in \(0, 1\), got \[95.0\]"),
    _row("ece-n_bins-zero", lambda t: M.ece(_probs(), _y(), n_bins=0), ValueError, r"`n_bins` must be a positive int, got 0"),
    _row("accuracy-targets-of-another-length", lambda t: M.accuracy(_probs(), _y(3)), ValueError, r"`target` must have shape \[N\] = \[10\] to match the predictions, got shape \(3,\)"),
    _row("accuracy-zero-examples", lambda t: M.accuracy(torch.empty(0, 3), torch.empty(0, dtype=torch.long)), ValueError, r"`probs` must hold at least one example, got shape \(0, 3\)"),
    _row("accuracy-meta-probs", lambda t: M.accuracy(_probs().to("meta"), _y()), ValueError, r"`probs` is on the 'meta' device"),
    _row("auroc-no-in-distribution-scores", lambda t: M.auroc(torch.empty(0), torch.randn(5)), ValueError, r"OOD metrics need both sides: got 0 in-distribution scores and 5 OOD scores"),
    _row("auroc-2d-scores", lambda t: M.auroc(torch.randn(5, 2), torch.randn(5)), ValueError, r"`scores_in` must be 1-D with shape \[N\], got shape \(5, 2\)"),
    _row("ood_score-unknown-name", lambda t: M.ood_score(_prediction(), "bogus"), ValueError, r"unknown OOD score 'bogus'; choose one of \['energy', .*'predictive_entropy'"),
    _row("metrics-gaussian_nll-zero-variance", lambda t: M.gaussian_nll(torch.zeros(5), torch.zeros(5), torch.zeros(5)), ValueError, r"`variance` must be positive, got minimum 0"),
    _row("rmse-shape-mismatch", lambda t: M.rmse(torch.zeros(5), torch.zeros(4)), ValueError, r"shape mismatch: expected equal shapes, got `mean` \(5,\), `target` \(4,\)"),
    _row("risk_at_coverage-zero", lambda t: M.risk_at_coverage(torch.rand(5), torch.zeros(5), coverage=0), ValueError, r"`coverage` must lie in \(0, 1\], got 0"),
    # ---- evaluate and triage
    _row("evaluate-fractional-labels", lambda t: bdl.evaluate(_bnn(), (_x(), _y().float() + 0.5), num_samples=2), TypeError, r"`test targets` must hold integer class labels, got dtype torch.float32"),
    _row("evaluate-labels-out-of-range", lambda t: bdl.evaluate(_bnn(), (_x(), _y() + 3), num_samples=2), ValueError, r"`test targets` must hold labels in \[0, 2\] for 3 classes, got labels in \[3, 5\]"),
    _row("evaluate-without-labels", lambda t: bdl.evaluate(_bnn(), _x(), num_samples=2), ValueError, r"no test targets: pass `test_data` as \(x, y\)"),
    _row("evaluate-num_samples-zero", lambda t: bdl.evaluate(_bnn(), (_x(), _y()), num_samples=0), ValueError, r"num_samples must be an int >= 1, got 0"),
    _row("evaluate-empty-dataloader", lambda t: bdl.evaluate(_bnn(), _empty_loader(labels=True), num_samples=2), ValueError, r"inputs are empty: nothing to predict"),
    _row("evaluate-unknown-ood-score", lambda t: bdl.evaluate(_bnn(), (_x(), _y()), ood_data=_x(5), ood_scores=["bogus"], num_samples=2), ValueError, r"unknown OOD score 'bogus'"),
    _row("evaluate-coverage-above-1", lambda t: bdl.evaluate(_bnn(), (_x(), _y()), num_samples=2, coverage=1.5), ValueError, r"`coverage` must lie in \(0, 1\], got 1.5"),
    _row("evaluate-ood-data-with-wrong-features", lambda t: bdl.evaluate(_bnn(), (_x(), _y()), ood_data=torch.randn(5, 7), num_samples=2), ValueError, r"BayesLinear: input must have 4 features in its last dimension, got shape \(5, 7\)"),
    _row("evaluate-misspelt-option", lambda t: bdl.evaluate(_bnn(), (_x(), _y()), num_sample=2), TypeError, r"evaluate\(\) got unexpected keyword argument\(s\) 'num_sample': neither its own nor bdl.predict's"),
    _row("triage-coverage-zero", lambda t: bdl.triage(_prediction(), coverage=0), ValueError, r"coverage must be a number in \(0, 1\], got 0"),
    _row("triage-unknown-score", lambda t: bdl.triage(_prediction(), coverage=0.5, score="bogus"), ValueError, r"score must be a callable or one of \['max_probability', .*got 'bogus'"),
    _row("triage-error_rate-without-targets", lambda t: bdl.triage(_prediction(), error_rate=0.1), ValueError, r"error_rate needs prediction with targets"),
    # ---- wrappers and calibration
    _row("MCDropout-of-a-model-without-dropout", lambda t: bdl.MCDropout(nn.Linear(2, 2)), ValueError, r"Linear has no dropout layer .*insert_before"),
    _row("DeepEnsemble-of-no-members", lambda t: bdl.DeepEnsemble([]), ValueError, r"members is empty: an ensemble needs at least one network"),
    _row("DeepEnsemble-missing-checkpoint-file", lambda t: bdl.DeepEnsemble.from_checkpoints(lambda: nn.Linear(2, 2), [str(t / "member0.ckpt")]), FileNotFoundError, r"checkpoints\[0\]: no file at '.*member0\.ckpt'"),
    _row("TemperatureScaler-zero-temperature", lambda t: bdl.TemperatureScaler(temperature=0), ValueError, r"`temperature` must be a positive finite number, got 0"),
    _row("rmse-no-outputs", lambda t: M.rmse(torch.zeros(3, 0), torch.zeros(3, 0)), ValueError, r"`mean` must have shape \[N\] or \[N, D\] with N, D >= 1, got shape \(3, 0\)"),
    _row("from_regression-no-outputs", lambda t: bdl.Prediction.from_regression(torch.zeros(2, 3, 0)), ValueError, r"sample_means must have at least one entry in its last dimension"),
    _row("from_logits-no-classes", lambda t: bdl.Prediction.from_logits(torch.zeros(2, 3, 0)), ValueError, r"sample_logits must have at least one entry in its last dimension"),
    _row("ScaleMixturePrior-tensor-scale", lambda t: bdl.ScaleMixturePrior(scale1=torch.tensor([1.0, 2.0])), ValueError, r"scale1 must be a number \(one scale for every weight\), got a tensor of shape \(2,\)"),
    _row("Prediction-string-index", lambda t: bdl.Prediction.from_logits(torch.randn(2, 3, 4))["a"], TypeError, r"a Prediction is indexed over its inputs by an int, a slice"),
    _row("plot_regression_1d-output-out-of-range", lambda t: bdl.plots.plot_regression_1d(torch.randn(5), bdl.Prediction.from_regression(torch.randn(2, 5, 2)), output=5), ValueError, r"`output` must be an int in \[0, 1\] \(the prediction has 2 outputs\), got 5"),
    _row("plot_regression_1d-output-bool", lambda t: bdl.plots.plot_regression_1d(torch.randn(5), bdl.Prediction.from_regression(torch.randn(2, 5, 2)), output=True), ValueError, r"`output` must be an int"),
    _row("plot_regression_1d-flat-target-two-outputs", lambda t: bdl.plots.plot_regression_1d(torch.randn(5), bdl.Prediction.from_regression(torch.randn(2, 5, 2)), target=torch.randn(5), output=1), ValueError, r"`target` must have one value per output \(2\)"),
    _row("PyroModel-of-bayesian-layers", lambda t: infer.PyroModel(bdl.bayesianize(nn.Sequential(nn.Linear(3, 2))), "categorical"), ValueError, r"net has bdl Bayesian layers \('0'\), which sample their own weights: PyroModel puts its prior on a plain network's weights"),
    _row("predict_from_samples-site-shape", lambda t: infer.predict_from_samples(infer.PyroModel(nn.Linear(3, 2), "categorical"), {"weight": torch.randn(5, 3, 2), "bias": torch.randn(5, 2)}, torch.randn(4, 3)), ValueError, r"samples\['weight'\] must have shape \[S, \*\(2, 3\)\]"),
    _row("predict_from_samples-draw-counts", lambda t: infer.predict_from_samples(infer.PyroModel(nn.Linear(3, 2), "categorical"), {"weight": torch.randn(5, 2, 3), "bias": torch.randn(4, 2)}, torch.randn(4, 3)), ValueError, r"the same number S of draws for every site, got \[4, 5\]"),
    _row("deterministic-not-a-module", lambda t: bdl.deterministic("m").__enter__(), TypeError, r"model must be an nn.Module, got str"),
    _row("TemperatureScaler-inf-temperature", lambda t: bdl.TemperatureScaler(temperature=float("inf")), ValueError, r"`temperature` must be a positive finite number, got inf"),
    _row("ELBOLoss-criterion-summing", lambda t: bdl.ELBOLoss(nn.Linear(2, 2), 10, criterion=nn.CrossEntropyLoss(reduction="sum")), ValueError, r"criterion CrossEntropyLoss\(reduction='sum'\) sums over the batch; the ELBO here is per example"),
    _row("ELBOLoss-criterion-string", lambda t: bdl.ELBOLoss(nn.Linear(2, 2), 10, criterion="ce"), TypeError, r"criterion must be a callable criterion\(output, target\)"),
    _row("plot_ood_histogram-bins-zero", lambda t: bdl.plots.plot_ood_histogram(torch.rand(5), torch.rand(5), bins=0), ValueError, r"bins must be a positive int, got 0"),
    _row("TemperatureScaler.fit-float-labels", lambda t: bdl.TemperatureScaler().fit(torch.randn(10, 3), _y().float() + 0.5), TypeError, r"`target` must hold integer class labels, got dtype torch.float32"),
    # ---- Pyro engines: names, scales, labels, num_samples
    _row("make_guide-unknown-name", lambda t: infer.make_guide("bogus", _pyro_model()), ValueError, r"unknown guide 'bogus'; choose one of \['delta', 'lowrank_normal', 'multivariate_normal', 'normal'\]"),
    _row("make_likelihood-unknown-name", lambda t: infer.make_likelihood("poisson"), ValueError, r"unknown likelihood 'poisson'; choose one of \['bernoulli', 'categorical'"),
    _row("make_elbo-unknown-name", lambda t: infer.make_elbo("bogus", infer.make_guide("normal", _pyro_model())), ValueError, r"unknown elbo 'bogus'; choose one of"),
    _row("GaussianLikelihood-zero-noise", lambda t: infer.GaussianLikelihood(noise_std=0), ValueError, r"noise_std must be a positive number, got 0"),
    _row("PyroModel-negative-prior_scale", lambda t: infer.PyroModel(nn.Linear(2, 2), "categorical", prior_scale=-1.0), ValueError, r"prior_scale must be a positive number, got -1.0"),
    _row("categorical-likelihood-labels-out-of-range", lambda t: infer.CategoricalLikelihood()(torch.randn(5, 2), torch.tensor([0, 1, 2, 3, 4])), ValueError, r"targets must be class indices in \[0, 1\] for the network's 2 logits, got labels in \[0, 4\]"),
    _row("categorical-likelihood-float-labels", lambda t: infer.CategoricalLikelihood()(torch.randn(5, 2), torch.full((5,), 0.5)), ValueError, r"targets must be integer class indices of shape \(5,\), got torch.float32"),
    _row("mcmc-unknown-kernel", lambda t: bdl.mcmc(lambda: None, kernel="bogus"), ValueError, r"unknown kernel 'bogus'; choose one of \['hmc', 'nuts'\]"),
    _row("mcmc-num_samples-zero", lambda t: bdl.mcmc(lambda: None, num_samples=0), ValueError, r"num_samples must be an int >= 4, got 0"),
    # ---- Lightning data modules and networks: files, empty data, fractions, noise, sizes, names
    _row("TabularDataModule-missing-file", lambda t: TabularDataModule(str(t / "missing.csv"), "y").setup(), FileNotFoundError, r"TabularDataModule: no file at path '.*missing\.csv'"),
    _row("TabularDataModule-file-without-rows", lambda t: TabularDataModule(_csv(t / "empty.csv", 0), "y").setup(), ValueError, r"TabularDataModule: .*empty\.csv has no data rows"),
    _row("TabularDataModule-unknown-target-column", lambda t: TabularDataModule(_csv(t / "table.csv", 20), "label").setup(), ValueError, r"has no columns \['label'\]; available columns: \['a', 'b', 'y'\]"),
    _row("TabularDataModule-not-csv-or-npz", lambda t: TabularDataModule(str(t / "table.txt"), "y"), ValueError, r"path must name a .csv or .npz file"),
    _row("DigitsDataModule-batch_size-zero", lambda t: DigitsDataModule(batch_size=0), ValueError, r"batch_size must be a positive int, got 0"),
    _row("DigitsDataModule-eval_batch_size-zero", lambda t: DigitsDataModule(eval_batch_size=0), ValueError, r"eval_batch_size must be a positive int, got 0"),
    _row("DigitsDataModule-seed-string", lambda t: DigitsDataModule(seed="0"), ValueError, r"seed must be an int in \[0, 2\^32\), got '0'"),
    _row("DigitsDataModule-unknown-ood", lambda t: DigitsDataModule(ood="bogus"), ValueError, r"ood must be 'classes', 'noise' or None, got 'bogus'"),
    _row("DigitsDataModule-val_fraction-above-1", lambda t: DigitsDataModule(val_fraction=1.5), ValueError, r"val_fraction must be in \[0, 1\) and test_fraction in \(0, 1\), with a sum below 1, got 1.5 and 0.2"),
    _row("DigitsDataModule-holding-out-every-class", lambda t: DigitsDataModule(ood_classes=list(range(10))), ValueError, r"ood_classes must leave at least 2 of the 10 classes to train on"),
    _row("DigitsDataModule-unknown-ood-class", lambda t: DigitsDataModule(ood_classes=[12]), ValueError, r"ood_classes must be class labels in 0..9, got \[12\]"),
    _row("TwoMoonsDataModule-negative-noise", lambda t: TwoMoonsDataModule(noise=-1.0), ValueError, r"noise must be a number >= 0 .*got -1.0"),
    _row("RegressionGapDataModule-negative-noise", lambda t: RegressionGapDataModule(noise=(-0.1, 0.3)), ValueError, r"noise must be 2 numbers >= 0 .*got \(-0.1, 0.3\)"),
    _row("RegressionGapDataModule-gap-not-a-pair", lambda t: RegressionGapDataModule(gap="ab"), ValueError, r"gap must be a pair \(low, high\) of numbers, got 'ab'"),
    _row("RegressionGapDataModule-domain-none", lambda t: RegressionGapDataModule(domain=None), ValueError, r"domain must be a pair \(low, high\) of numbers, got None"),
    _row("MLP-negative-hidden-width", lambda t: MLP(4, 2, hidden=[-3]), ValueError, r"MLP: hidden\[0\] must be a positive int, got -3"),
    _row("MLP-unknown-activation", lambda t: MLP(4, 2, activation="bogus"), ValueError, r"unknown activation 'bogus'; choose one of \['elu', 'gelu', 'relu', 'silu', 'tanh'\]"),
    _row("LeNet5-zero-classes", lambda t: LeNet5(num_classes=0), ValueError, r"LeNet5: num_classes must be a positive int, got 0"),
    _row("LeNet5-8x8-digits", lambda t: LeNet5()(torch.randn(2, 1, 8, 8)), ValueError, r"LeNet5 takes images of at least 12x12 pixels .* got 8x8"),
    _row("LeNet5-channels-last", lambda t: LeNet5()(torch.randn(2, 28, 28, 1)), RuntimeError, r"expected input\[2, 28, 28, 1\] to have 1 channels, but got 28"),
    # ---- Lightning modules
    _row("VariationalModule-negative-prior_std", lambda t: VariationalModule(MLP(4, 2), prior_std=-1.0), ValueError, r"prior_std must be a number > 0.0, got -1.0"),
    _row("VariationalModule-zero-posterior_std_init", lambda t: VariationalModule(MLP(4, 2), posterior_std_init=0.0), ValueError, r"posterior_std_init must be a (positive finite )?number( > 0.0)?, got 0.0"),
    _row("DeterministicModule-zero-noise_variance", lambda t: DeterministicModule(MLP(4, 1), task="regression", noise_variance=0.0), ValueError, r"noise_variance must be a number > 0.0, got 0.0"),
    _row("module-num_eval_samples-zero", lambda t: MCDropoutModule(MLP(4, 2, dropout=0.1), num_eval_samples=0), ValueError, r"num_eval_samples must be a positive int, got 0"),
    _row("SVIModule-num_eval_samples-zero", lambda t: bdl.lightning.SVIModule(infer.PyroModel(nn.Linear(4, 3), "categorical", num_data=10), num_eval_samples=0),
         ValueError, r"^num_eval_samples must be a positive int, got 0"),  # was "num_samples", which it refuses
    _row("MLP-negative-dropout", lambda t: MLP(4, 2, dropout=-1.0), ValueError, r"^MLP: dropout must be a rate in \[0, 1\), got -1.0"),
    _row("module-unknown-optimizer", lambda t: DeterministicModule(MLP(4, 2), optimizer="rmsprop"), ValueError, r"optimizer must be one of \['adam', 'adamw', 'sgd'\], got 'rmsprop'"),
    _row(
        "VariationalModule-negative-prior_std-with-a-Bayesian-net",
        lambda t: VariationalModule(nn.Sequential(bdl.BayesLinear(4, 3)), prior_std=-1.0),
        ValueError, r"prior_std must be a number > 0.0, got -1.0",

    ),
    _row(
        "VariationalModule-unknown-estimator-with-a-Bayesian-net",
        lambda t: VariationalModule(nn.Sequential(bdl.BayesLinear(4, 3)), estimator="mc"),
        ValueError, r"estimator must be one of \['flipout', 'local', 'reparam'\], got 'mc'",

    ),
    _row("training_loss-infinite-label", lambda t: DeterministicModule(nn.Linear(4, 3)).training_loss(_x(4), torch.tensor([0.0, 1.0, math.inf, 2.0])), TypeError, r"targets must be integer class labels \(torch.long\) for classification, got torch.float32"),
    _row("evaluate-bfloat16-labels-past-256", lambda t: bdl.evaluate(nn.Linear(4, 300), (_x(), torch.full((10,), 257.0).bfloat16()), num_samples=1), TypeError, r"class labels in torch.bfloat16 from 256 up may have been rounded to other classes \(257 -> 256"),
    _row(
        "training_loss-float-labels",
        lambda t: DeterministicModule(nn.Linear(4, 3)).training_loss(_x(8), _y(8).float() + 0.5),
        TypeError, r"targets?`? must (hold|be) integer class (labels|indices).*float32",

    ),
    _row(
        "training_loss-labels-out-of-range",
        lambda t: VariationalModule(nn.Linear(4, 3), num_data=8).training_loss(_x(8), _y(8) + 3),
        ValueError, r"targets?`? must hold labels in \[0, 2\] for 3 classes",

    ),
    _row(
        "training_loss-regression-targets-of-another-length",
        lambda t: DeterministicModule(nn.Linear(4, 1), task="regression").training_loss(_x(8), torch.randn(5)),
        ValueError, r"targets?`? must have .*shape.*\(8, 1\).*got.*\(5,\)",

    ),
    # ---- the bdl command: missing files, unknown keys, wrong values (each also leaves no run folder)
    _row("cli-missing-config-file", cli("fit", "--config", lambda t: str(t / "nope.yaml")), SystemExit, r'Parser key "config": File does not exist: .*nope\.yaml'),
    _row("cli-unknown-model-key", cli("fit", "--config", QUICKSTART, "--model.init_args.prior_sdt", "1"), SystemExit, r"prior_sdt.*is not accepted"),
    _row("cli-negative-prior_std", cli("fit", "--config", QUICKSTART, "--model.init_args.prior_std", "-1"), ValueError, r"prior_std must be a number > 0.0, got -1.0"),
    _row("cli-missing-checkpoint", cli("test", "--config", QUICKSTART, "--ckpt_path", lambda t: str(t / "missing.ckpt")), FileNotFoundError, r"checkpoint '.*missing\.ckpt' does not exist"),
    _row("cli-missing-data-file", cli("fit", "--config", lambda t: _tabular_config(t, str(t / "missing.csv"))), FileNotFoundError, r"TabularDataModule: no file at path '.*missing\.csv'"),
]


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bdl"])  # LightningCLI reads sys.argv when pytest's arguments are there
    for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):  # seed_everything sets them
        monkeypatch.delenv(name, raising=False)


def _run_folders(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.glob("*/version_*")) if root.exists() else []


@pytest.mark.parametrize("call, error, pattern", ROWS)
def test_bad_input_raises_a_clear_error_naming_the_argument(call, error, pattern, tmp_path, capsys):
    with pytest.raises(error) as raised:
        call(tmp_path)
    assert type(raised.value) is error or error is SystemExit, f"expected {error.__name__}, got {type(raised.value).__name__}"
    message = str(raised.value) + "\n" + capsys.readouterr().err  # the command writes parse errors to stderr
    assert re.search(pattern, message, flags=re.DOTALL), f"{pattern!r} not found in the error message:\n{message[-2000:]}"
    if getattr(call, "is_cli", False):
        assert _run_folders(tmp_path / "runs") == [], "the failed run left a run folder behind"


def test_the_table_covers_at_least_45_wrong_inputs():
    assert len(ROWS) >= 45 and len({row.id for row in ROWS}) == len(ROWS)


@pytest.mark.parametrize(
    "args, pattern",
    [
        pytest.param(
            ["fit", "--config", lambda t: _tabular_config(t, _csv(t / "empty.csv", 0))],
            r"TabularDataModule: .*empty\.csv has no data rows",
            id="data-file-without-rows",
        ),
        pytest.param(
            ["fit", "--config", lambda t: _tabular_config(t, _csv(t / "table.csv", 40), in_features=3, method="VariationalModule")],
            r"BayesLinear: input must have 3 features in its last dimension, got shape \(\d+, 2\)",
            id="network-input-size-unlike-the-data",
        ),
    ],
)
def test_cli_run_that_fails_before_training_leaves_no_run_folder(args, pattern, tmp_path):
    # the error itself must be clear; then the folder is checked
    try:
        cli(*args)(tmp_path)
    except Exception as error:  # noqa: BLE001 - any type: only the message and the folder matter here
        if not re.search(pattern, str(error)):
            pytest.fail(f"{pattern!r} not in the error message: {type(error).__name__}: {error}")
    else:
        pytest.fail("the run did not fail")
    assert _run_folders(tmp_path / "runs") == [], "the failed run left a run folder behind"
