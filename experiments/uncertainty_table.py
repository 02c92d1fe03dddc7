"""The results table: every bdl method side by side on four data sets, mean ± std over seeds, plus MNIST-1D reference.

Each run is driven by a config of ``configs/`` (``<data>_<method>.yaml``), loaded with
:class:`bdl.lightning.cli.BDLCLI` (``run=False``) so that the model, data module and Trainer are exactly
what ``bdl fit --config ...`` builds. The script overrides only the seed (``seed_everything`` and the data
split's ``seed``), the number of epochs (``--epochs-scale``), the run folder and the logger; then it fits
with the Trainer and calls ``trainer.test(ckpt_path="best")`` (the checkpoint with the lowest ``val/nll``,
as ``bdl fit`` with ``evaluate_after_fit`` does), whose ``module.report`` (:func:`bdl.evaluate`) gives the
metrics.

Data sets (``--datasets``):

- ``digits``: scikit-learn's 8x8 digits, digits 8 and 9 held out of training as OOD inputs.
- ``mnist1d``: MNIST-1D (Greydanus 2020), classes 8 and 9 held out as OOD inputs.
- ``regression_gap``: the 1-D heteroscedastic regression toy; OOD inputs lie in the gap [-1, 1].
- ``diabetes``: scikit-learn's diabetes data (:class:`bdl.lightning.SklearnRegressionDataModule`); the
  10% of patients with the highest BMI are held out as OOD inputs (covariate shift). RMSE is in units
  of the training target's standard deviation; the NLL in original units is the table's plus log(std).
- ``mnist1d_reference``: logistic regression, the MLP 40-100-100-10 and the CNN on all ten MNIST-1D
  classes, deterministic and Bayesian, beside the paper's test accuracies (32%, 68%, 94%).

Methods (``--methods``):

- ``deterministic``: ``<data>_deterministic.yaml``.
- ``temperature``: the same trained network (same seed; its train time plus the fit), its logits divided by
  a :class:`bdl.TemperatureScaler` fitted on the validation split (classification only).
- ``mc_dropout``, ``ensemble`` (5 members), ``svi`` (Pyro SVI, mean-field Gaussian guide): their configs.
- ``variational_reparam``, ``variational_local``, ``variational_flipout``: ``<data>_variational.yaml``
  with ``model.init_args.estimator`` set.
- ``nuts``: NUTS (:func:`bdl.mcmc`) on the ``PyroModel`` of ``<data>_svi.yaml`` with a smaller network
  (``--nuts-hidden``), full batch, on the training split, for the regression sets only. Weights start at
  the prior median (zero) (Pyro's default random start diverged on diabetes). Train time is the sampling.

Metrics: accuracy or RMSE, NLL, ECE (classification) or the coverage of the central 95% predictive interval
(regression), Brier score (classification) or CRPS (regression, its continuous analogue), AURC
(classification), OOD AUROC and FPR at 95% TPR with the total-uncertainty score (predictive entropy, or
total predictive variance), OOD AUROC with the epistemic score (mutual information, or the variance of the
sampled means: zero, hence 0.5, for a single deterministic network), fit time in seconds (training with its
validation passes) and prediction time in milliseconds for the whole test set (``sample_prediction`` with
the method's number of Monte Carlo samples).

Writes ``<out>/<dataset>.md`` (tables, an automatic check of the expected shape, settings and timings),
``<out>/<dataset>.json`` (every seed's numbers) and ``<out>/<dataset>.png`` (NLL and OOD AUROC per method),
and for the reference ``<out>/mnist1d_reference.md``. A ``## Findings`` section written by hand at the end
of an existing ``<dataset>.md`` is kept when the file is rewritten.

    python experiments/uncertainty_table.py                       # everything, 3 seeds (long on a CPU)
    python experiments/uncertainty_table.py --seeds 1 --datasets digits diabetes --methods deterministic ensemble
    python experiments/uncertainty_table.py --quick                # 1 seed, 1 epoch, 2 batches: a smoke test,
                                                                   # written to a temporary folder unless --out

Run on demand, not in the tests (``tests/experiments/test_uncertainty_table.py`` runs ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


@dataclass(frozen=True)
class Dataset:
    """A data set of the table: its config prefix, task and a one-line description."""

    task: str
    title: str
    description: str


@dataclass(frozen=True)
class Method:
    """A method of the table: the config it starts from, the overrides, and where it applies."""

    label: str
    config: str
    overrides: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ("classification", "regression")


DATASETS: dict[str, Dataset] = {
    "digits": Dataset("classification", "digits, 8 and 9 held out as OOD",
                      "scikit-learn's 8x8 digits (64 features), digits 8 and 9 held out of training as OOD inputs; "
                      "MLP 64-128-8"),
    "mnist1d": Dataset("classification", "MNIST-1D, classes 8 and 9 held out as OOD",
                       "MNIST-1D (Greydanus 2020; signals of length 40), classes 8 and 9 held out of training and "
                       "testing as OOD inputs; bdl.lightning.Conv1dNet (three conv layers, 32 channels)"),
    "regression_gap": Dataset("regression", "1-D regression with a gap",
                              "1-D heteroscedastic regression toy with no training inputs in [-1, 1]; OOD inputs lie "
                              "in the gap; MLP 1-64-64 (tanh) with a Gaussian head (mean, variance)"),
    "diabetes": Dataset("regression", "diabetes, highest 10% BMI as OOD",
                        "scikit-learn's diabetes data (442 patients, 10 features; features and target standardised "
                        "on the training rows), the 10% of patients with the highest BMI held out as OOD inputs "
                        "(SklearnRegressionDataModule, ood='high'); MLP 10-50 (ReLU) with a Gaussian head. RMSE "
                        "and CRPS are in units of the training target's standard deviation; the NLL in original "
                        "units is the table's plus log(std)"),
}  # fmt: skip
REFERENCE = "mnist1d_reference"

METHODS: dict[str, Method] = {
    "deterministic": Method("deterministic", "deterministic"),
    "temperature": Method("deterministic + temperature scaling", "deterministic", tasks=("classification",)),
    "mc_dropout": Method("MC dropout", "mc_dropout"),
    "ensemble": Method("deep ensemble (5)", "ensemble"),
    "variational_reparam": Method("Bayesian layers, reparam", "variational", ("--model.init_args.estimator", "reparam")),
    "variational_local": Method("Bayesian layers, local reparam", "variational", ("--model.init_args.estimator", "local")),
    "variational_flipout": Method("Bayesian layers, flipout", "variational", ("--model.init_args.estimator", "flipout")),
    "svi": Method("Pyro SVI, mean-field", "svi"),
    "nuts": Method("NUTS (bdl.mcmc)", "svi", tasks=("regression",)),
}

# (key in the report, column title, better: "high" / "low" / "0.95" (closest to 0.95), digits)
CLASSIFICATION_COLUMNS = [
    ("accuracy", "accuracy", "high", 4), ("nll", "NLL", "low", 4), ("ece", "ECE", "low", 4),
    ("brier_score", "Brier", "low", 4), ("aurc", "AURC", "low", 4),
    ("ood/predictive_entropy/auroc", "OOD AUROC (entropy)", "high", 4),
    ("ood/predictive_entropy/fpr_at_95_tpr", "FPR95 (entropy)", "low", 4),
    ("ood/mutual_information/auroc", "OOD AUROC (MI)", "high", 4),
]  # fmt: skip
REGRESSION_COLUMNS = [
    ("rmse", "RMSE", "low", 4), ("nll", "NLL", "low", 4), ("interval_coverage_95", "95% coverage", "0.95", 3),
    ("crps", "CRPS", "low", 4),
    ("ood/total_variance/auroc", "OOD AUROC (total var.)", "high", 4),
    ("ood/total_variance/fpr_at_95_tpr", "FPR95 (total var.)", "low", 4),
    ("ood/epistemic_variance/auroc", "OOD AUROC (epist. var.)", "high", 4),
]  # fmt: skip
EPISTEMIC_KEYS = ("ood/mutual_information/auroc", "ood/epistemic_variance/auroc")
SINGLE_NETWORK = ("deterministic", "temperature")  # one forward pass: no epistemic uncertainty to score
TIME_COLUMNS = [("train_s", "train s", "low", 1), ("predict_ms", "predict ms", "low", 1)]

# MNIST-1D reference: the paper's test accuracies (Greydanus 2020, table 1) and the networks of the same shape.
REFERENCE_MODELS = {
    "logistic regression": (0.32, {"class_path": "bdl.lightning.MLP", "init_args": {"in_features": 40, "out_features": 10, "hidden": []}}),
    "MLP 40-100-100-10": (0.68, {"class_path": "bdl.lightning.MLP", "init_args": {"in_features": 40, "out_features": 10, "hidden": [100, 100]}}),
    "CNN (Conv1dNet, 32 channels)": (0.94, {"class_path": "bdl.lightning.Conv1dNet", "init_args": {"in_channels": 1, "num_classes": 10, "channels": 32}}),
}  # fmt: skip


# ----------------------------------------------------------------------------------------------- runs


@dataclass
class RunResult:
    """The numbers of one (data set, method, seed) run, or the error that stopped it."""

    metrics: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: Optional[str] = None


def quiet() -> None:
    """Silence Lightning's per-run banners and the warnings that every tiny run repeats."""
    import lightning.pytorch  # noqa: F401 - it sets its loggers' levels on import: set ours after

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pyro"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in (".*log_every_n_steps.*", ".*does not have many workers.*", ".*smaller than the logging interval.*",
                    ".*args parameter is intended to run from within Python.*", ".*isinstance.treespec, LeafSpec.*"):
        warnings.filterwarnings("ignore", message=pattern)


def config_path(dataset: str, config: str) -> Path:
    path = CONFIGS / f"{dataset}_{config}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no config {path} for data set {dataset!r}")
    return path


def config_epochs(path: Path) -> int:
    return int(yaml.safe_load(path.read_text())["trainer"]["max_epochs"])


def build(
    config: Path, args: argparse.Namespace, seed: int, folder: Path, overrides: Sequence[str] = (), epochs: Optional[int] = None
) -> tuple[Any, Any, Any]:
    """``(module, datamodule, trainer)`` from a config, as ``bdl fit`` builds them, with the seed and epochs set."""
    from bdl.lightning.cli import BDLCLI

    epochs = epochs if epochs is not None else config_epochs(config)
    epochs = 1 if args.quick else max(1, round(epochs * args.epochs_scale))
    cli_args = [
        "--config", str(config), "--seed_everything", str(seed), "--data.init_args.seed", str(seed),
        "--trainer.max_epochs", str(epochs), "--trainer.default_root_dir", str(folder),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *overrides,
    ]  # fmt: skip
    if not args.keep_runs:
        cli_args += ["--trainer.logger", "false"]  # kept runs get bdl's CSV log (metrics.csv per epoch)
    if "mnist1d" in config.name:
        cli_args += ["--data.init_args.cache_dir", str(args.runs_dir / "mnist1d_cache")]
    if args.quick:
        cli_args += ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "2"]
    try:
        cli = BDLCLI(args=cli_args, run=False)
    except SystemExit as exit_:  # the parser prints what is wrong and exits: make it this run's error, not the script's end
        raise ValueError(f"{config.name} with {' '.join(overrides) or 'no overrides'} does not parse (exit {exit_.code}; see above)") from None
    return cli.model, cli.datamodule, cli.trainer


def time_predictions(predict: Callable[[torch.Tensor], Any], loader: Any, device: torch.device) -> float:  # noqa: ANN401
    """Milliseconds to predict every batch of ``loader`` with ``predict``, after one untimed batch (one-time costs:
    an ensemble's stacked copy, allocator growth, CUDA kernels' first launch)."""
    with torch.no_grad():
        predict(next(iter(loader))[0].to(device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for batch in loader:
            predict(batch[0].to(device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 1000 * (time.perf_counter() - start)


def in_distribution_test_loader(data: Any) -> Any:  # noqa: ANN401
    loaders = data.test_dataloader()
    return loaders[0] if isinstance(loaders, list) else loaders


def report_metrics(report: Any) -> dict[str, float]:  # noqa: ANN401
    return {key: float(value) for key, value in report.metrics.items()}


def fit_and_test(module: Any, data: Any, trainer: Any) -> tuple[dict[str, float], float]:  # noqa: ANN401
    """Fit, test the best checkpoint (lowest ``val/nll``); ``(metrics, fit seconds)``."""
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    train_s = time.perf_counter() - start
    checkpoint = trainer.checkpoint_callback
    best = "best" if checkpoint is not None and checkpoint.best_model_path else None
    trainer.test(module, datamodule=data, ckpt_path=best, verbose=False)
    return report_metrics(module.report), train_s


def run_network_method(dataset: str, method: str, seed: int, args: argparse.Namespace) -> dict[str, RunResult]:
    """Train one config-driven method; for ``deterministic`` also the temperature-scaled variant if asked.

    Returns ``{method name: result}`` (``deterministic`` and ``temperature`` come from one training).
    """
    spec = METHODS[method]
    folder = args.runs_dir / dataset / method / f"seed{seed}"
    module, data, trainer = build(config_path(dataset, spec.config), args, seed, folder, spec.overrides)
    metrics, train_s = fit_and_test(module, data, trainer)
    loader = in_distribution_test_loader(data)
    module.eval()
    predict_ms = time_predictions(lambda x: module.sample_prediction(x, module.num_eval_samples), loader, module.device)
    results = {}
    names = [method] if method != "deterministic" else [name for name in ("deterministic", "temperature") if name in args.methods]
    if "deterministic" in names:
        results["deterministic"] = RunResult({**metrics, "train_s": train_s, "predict_ms": predict_ms})
    if "temperature" in names and DATASETS[dataset].task == "classification":
        results["temperature"] = temperature_scaled(module, data, trainer, train_s)
    elif method != "deterministic":
        results[method] = RunResult({**metrics, "train_s": train_s, "predict_ms": predict_ms})
    return results


def temperature_scaled(module: Any, data: Any, trainer: Any, train_s: float) -> RunResult:  # noqa: ANN401
    """The trained deterministic network with its logits divided by a temperature fitted on the validation split."""
    import bdl

    start = time.perf_counter()
    module.eval()
    logits, targets = [], []
    with torch.no_grad():
        for x, y in data.val_dataloader():
            logits.append(module.model(x.to(module.device)))
            targets.append(y.to(module.device))
    scaler = bdl.TemperatureScaler().fit(torch.cat(logits), torch.cat(targets))
    fit_s = time.perf_counter() - start
    module.model = scaler.wrap(module.model)  # DeterministicModule predicts with self.model: the same evaluation
    trainer.test(module, datamodule=data, verbose=False)
    predict_ms = time_predictions(lambda x: module.sample_prediction(x, 1), in_distribution_test_loader(data), module.device)
    temperature = float(scaler.temperature)
    metrics = {**report_metrics(module.report), "train_s": train_s + fit_s, "predict_ms": predict_ms, "temperature": temperature}
    return RunResult(metrics, [f"T = {temperature:.3f}"])


def nuts_settings(args: argparse.Namespace) -> tuple[int, int, int, int]:
    """``(chains, warm-up steps, draws per chain, max tree depth)`` of the NUTS runs."""
    if args.quick:
        return 1, 4, 4, 2
    return args.nuts_chains, args.nuts_warmup, args.nuts_samples, args.nuts_tree_depth


def run_nuts(dataset: str, seed: int, args: argparse.Namespace) -> RunResult:
    """NUTS on the svi config's PyroModel (smaller network), full batch on the training split."""
    import bdl
    from pyro.infer.autoguide.initialization import init_to_median

    folder = args.runs_dir / dataset / "nuts" / f"seed{seed}"
    hidden = "[" + ", ".join(map(str, args.nuts_hidden)) + "]"
    module, data, _ = build(config_path(dataset, "svi"), args, seed, folder, ("--model.init_args.model.init_args.net.init_args.hidden", hidden))
    model = module.model
    model.num_data = None  # MCMC: every call sees the whole training set
    data.setup("fit")
    x_train, y_train = data.splits.train.tensors
    chains, warmup, draws, depth = nuts_settings(args)
    start = time.perf_counter()
    result = bdl.mcmc(
        model, x_train, y_train, num_samples=draws, warmup_steps=warmup, num_chains=chains,
        kernel_options={"max_tree_depth": depth, "init_strategy": init_to_median}, predict_inputs=x_train[:1], seed=seed,
    )  # fmt: skip
    train_s = time.perf_counter() - start
    x_test, y_test = data.splits.test.tensors
    start = time.perf_counter()
    prediction = result.predict(x_test)
    predict_ms = 1000 * (time.perf_counter() - start)
    ood_prediction = result.predict(data.splits.ood.tensors[0]) if data.splits.ood is not None else None
    report = bdl.evaluate(prediction, (x_test, y_test), ood_data=ood_prediction)
    divergences = int(sum(result.diagnostics["divergences"]))
    chains = len(result.diagnostics["divergences"])
    draws = next(iter(result.samples.values())).shape[0] // chains  # the samples hold every chain's draws
    metrics = {**report_metrics(report), "train_s": train_s, "predict_ms": predict_ms, "divergences": divergences}
    notes = [f"{chains} chain(s) x {draws} draws, {divergences} divergent"]
    if chains > 1:
        summary = result.summary
        metrics.update(max_r_hat=summary.max_r_hat, min_ess=summary.min_ess, max_rank_r_hat=summary.max_rank_r_hat, min_ess_bulk=summary.min_ess_bulk)
        notes[0] += f", weight space: max R-hat {summary.max_r_hat:.2f} (rank-normalised {summary.max_rank_r_hat:.2f}), min ESS {summary.min_ess:.0f}"
        # weight-space R-hat cannot tell a network's symmetric copies of one mode from chains that disagree: the
        # predictions can
        function_space = result.predictive_summary(x_test)
        metrics.update(
            function_space_max_r_hat=function_space.max_r_hat,
            function_space_min_ess=function_space.min_ess,
            function_space_max_rank_r_hat=function_space.max_rank_r_hat,
        )
        notes[0] += (
            f"; function space (test predictions): max R-hat {function_space.max_r_hat:.2f} (rank-normalised "
            f"{function_space.max_rank_r_hat:.2f}), min ESS {function_space.min_ess:.0f}"
        )
    return RunResult(metrics, notes)


def applies(method: str, dataset: str) -> bool:
    return DATASETS[dataset].task in METHODS[method].tasks


def run_dataset(dataset: str, args: argparse.Namespace) -> tuple[dict[str, list[RunResult]], float]:
    """Every asked method on one data set over the seeds: ``({method: [result per seed]}, seconds)``."""
    methods = [method for method in args.methods if applies(method, dataset)]
    results: dict[str, list[RunResult]] = {method: [] for method in methods}
    start = time.perf_counter()
    for seed in args.seeds:
        done: set[str] = set()
        for method in methods:
            if method in done:
                continue
            trained = "deterministic" if method == "temperature" else method
            names = {"deterministic", "temperature"} & set(methods) if trained == "deterministic" else {method}
            began = time.perf_counter()
            try:
                if method == "nuts":
                    outcome = {"nuts": run_nuts(dataset, seed, args)}
                else:
                    outcome = run_network_method(dataset, trained, seed, args)
            except Exception as error:  # noqa: BLE001 - one failed run is reported in its row, the rest still run
                traceback.print_exc()
                outcome = {name: RunResult(error=f"{type(error).__name__}: {error}") for name in names}
            for name, result in outcome.items():
                results[name].append(result)
                done.add(name)
                status = "failed: " + result.error if result.error else f"{time.perf_counter() - began:.1f} s"
                print(f"[{dataset}] seed {seed} {name}: {status}", flush=True)
    return results, time.perf_counter() - start


def run_reference(args: argparse.Namespace) -> tuple[dict[str, dict[str, list[RunResult]]], float]:
    """The MNIST-1D reference: ``{model: {"deterministic" | "bayesian": [result per seed]}}`` on all ten classes."""
    results: dict[str, dict[str, list[RunResult]]] = {name: {"deterministic": [], "bayesian": []} for name in REFERENCE_MODELS}
    start = time.perf_counter()
    for seed in args.seeds:
        for name, (_, net) in REFERENCE_MODELS.items():
            for kind, config in (("deterministic", "deterministic"), ("bayesian", "variational")):
                folder = args.runs_dir / REFERENCE / f"{name.split()[0]}_{kind}" / f"seed{seed}"
                overrides = ("--model.init_args.model", json.dumps(net), "--data.init_args.ood_classes", "[]")
                began = time.perf_counter()
                try:
                    module, data, trainer = build(config_path("mnist1d", config), args, seed, folder, overrides, epochs=args.reference_epochs)
                    metrics, train_s = fit_and_test(module, data, trainer)
                    result = RunResult({**metrics, "train_s": train_s})
                except Exception as error:  # noqa: BLE001
                    traceback.print_exc()
                    result = RunResult(error=f"{type(error).__name__}: {error}")
                results[name][kind].append(result)
                status = "failed: " + result.error if result.error else f"{time.perf_counter() - began:.1f} s"
                print(f"[{REFERENCE}] seed {seed} {name} {kind}: {status}", flush=True)
    return results, time.perf_counter() - start


# ----------------------------------------------------------------------------------------------- tables


def values(results: list[RunResult], key: str) -> list[float]:
    return [result.metrics[key] for result in results if result.error is None and key in result.metrics]


def mean(results: list[RunResult], key: str) -> float:
    found = values(results, key)
    return statistics.fmean(found) if found else math.nan


def cell(results: list[RunResult], key: str, digits: int) -> str:
    errors = [result.error for result in results if result.error]
    if errors:
        return f"failed ({len(errors)} of {len(results)} seeds)"
    found = values(results, key)
    if not found:
        return "n/a"
    if len(found) == 1:
        return f"{found[0]:.{digits}f}"
    return f"{statistics.fmean(found):.{digits}f} ± {statistics.stdev(found):.{digits}f}"


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["| " + " | ".join(text.ljust(width) for text, width in zip(header, widths)) + " |",
             "|" + "|".join("-" * (width + 2) if i == 0 else "-" * (width + 1) + ":" for i, width in enumerate(widths)) + "|"]
    lines += ["| " + " | ".join(text.ljust(width) if i == 0 else text.rjust(width) for i, (text, width) in enumerate(zip(row, widths))) + " |"
              for row in rows]  # fmt: skip
    return "\n".join(lines)


def columns_for(dataset: str) -> list[tuple[str, str, str, int]]:
    return (CLASSIFICATION_COLUMNS if DATASETS[dataset].task == "classification" else REGRESSION_COLUMNS) + TIME_COLUMNS


def results_table(dataset: str, results: dict[str, list[RunResult]]) -> str:
    columns = columns_for(dataset)
    header = ["method"] + [f"{title} {'↑' if better == 'high' else '↓' if better == 'low' else '→0.95'}"
                           for _, title, better, _ in columns]  # fmt: skip
    rows = [[METHODS[method].label] + ["n/a" if method in SINGLE_NETWORK and key in EPISTEMIC_KEYS else cell(runs, key, digits)
                                       for key, _, _, digits in columns]
            for method, runs in results.items()]  # fmt: skip
    return markdown_table(header, rows)


def shape_check(dataset: str, results: dict[str, list[RunResult]]) -> list[str]:
    """Lines saying, per method, whether its mean NLL, calibration and OOD AUROC beat the deterministic baseline."""
    baseline = results.get("deterministic")
    if not baseline or any(result.error for result in baseline):
        return ["(no deterministic baseline in this run: nothing to compare with)"]
    classification = DATASETS[dataset].task == "classification"
    checks = [("nll", "NLL lower", lambda a, b: a < b)]
    if classification:
        total_auroc_key = "ood/predictive_entropy/auroc"
        checks += [("ece", "ECE lower", lambda a, b: a < b),
                   (total_auroc_key, "OOD AUROC (entropy) higher", lambda a, b: a > b),
                   ("ood/mutual_information/auroc", "OOD AUROC (MI) above 0.5 and the baseline's (entropy)", lambda a, b: a > b)]  # fmt: skip
    else:
        total_auroc_key = "ood/total_variance/auroc"
        checks += [("interval_coverage_95", "95% coverage closer to 0.95", lambda a, b: abs(a - 0.95) < abs(b - 0.95)),
                   (total_auroc_key, "OOD AUROC (total var.) higher", lambda a, b: a > b),
                   ("ood/epistemic_variance/auroc", "OOD AUROC (epist. var.) above 0.5 and the baseline's (total var.)", lambda a, b: a > b)]  # fmt: skip
    header = ["method vs deterministic"] + [title for _, title, _ in checks]
    rows = []
    for method, runs in results.items():
        if method == "deterministic" or any(result.error for result in runs):
            continue
        row = [METHODS[method].label]
        for key, _, better in checks:
            mine, theirs = mean(runs, key), mean(baseline, key)
            # the baseline has no epistemic score: chance, and its total one (compared with chance alone, every method
            # passed on digits, where each one's MI ranks the OOD digits below the single network's entropy)
            if key in EPISTEMIC_KEYS:
                theirs = math.nan if method in SINGLE_NETWORK else max(0.5, mean(baseline, total_auroc_key))
            row.append("n/a" if math.isnan(mine) or math.isnan(theirs) else ("yes" if better(mine, theirs) else "**no**"))
        rows.append(row)
    return [markdown_table(header, rows)] if rows else ["(no other method in this run)"]


def plot(dataset: str, results: dict[str, list[RunResult]], path: Path) -> None:
    """Bar charts of NLL and the two OOD AUROCs per method (mean, with the std over seeds as error bars)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    total, epistemic = (("ood/predictive_entropy/auroc", "OOD AUROC, predictive entropy"), ("ood/mutual_information/auroc", "OOD AUROC, mutual information"))
    if DATASETS[dataset].task == "regression":
        total, epistemic = ("ood/total_variance/auroc", "OOD AUROC, total variance"), ("ood/epistemic_variance/auroc", "OOD AUROC, epistemic variance")
    methods = [method for method in results if values(results[method], "nll")]
    labels = [METHODS[method].label.replace(", ", "\n").replace(" + ", "\n+ ") for method in methods]
    figure = Figure(figsize=(max(9.0, 1.6 * len(methods) + 2), 4.4), layout="constrained")
    axes = figure.subplots(1, 3)
    for ax, (key, title) in zip(axes, [("nll", "NLL (lower is better)"), total, epistemic]):
        means = [math.nan if key in EPISTEMIC_KEYS and method in SINGLE_NETWORK else mean(results[method], key) for method in methods]
        spreads = [statistics.stdev(values(results[method], key)) if len(values(results[method], key)) > 1 else 0.0 for method in methods]
        ax.bar(range(len(methods)), means, yerr=spreads, capsize=3, color=[f"C{i}" for i in range(len(methods))])
        ax.set_xticks(range(len(methods)), labels, rotation=90, fontsize=7)
        ax.set_title(title, fontsize=9)
        if "AUROC" in title:
            ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
            ax.set_ylim(0, 1)
    figure.suptitle(f"{dataset}: {DATASETS[dataset].title}", fontsize=10)
    figure.savefig(path, dpi=110)


def kept_findings(path: Path) -> str:
    """The hand-written ``## Findings`` section of an existing results file (to the end), or ''."""
    if not path.is_file():
        return ""
    text = path.read_text()
    index = text.find("\n## Findings")
    return text[index + 1 :] if index >= 0 else ""


def settings_line(args: argparse.Namespace) -> str:
    epochs = "1 epoch, 2 training / 1 validation / 2 test batches (--quick)" if args.quick else f"the configs' epochs x {args.epochs_scale:g}"
    return (
        f"Seeds {', '.join(map(str, args.seeds))} (model initialisation and data split); {epochs}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s), {platform.machine()} "
        f"{os.cpu_count()}-core machine shared with other work (times are indicative)"
    )


def spread_line(args: argparse.Namespace) -> str:
    """What the ± in the tables is (the reference table's said "sample std over 1 seed(s)" with no std shown)."""
    return f"Mean ± sample std (n - 1) over {len(args.seeds)} seed(s)" + (" (one seed: no std)" if len(args.seeds) == 1 else "")


def write_dataset(dataset: str, results: dict[str, list[RunResult]], seconds: float, args: argparse.Namespace) -> Path:
    out = args.out
    path = out / f"{dataset}.md"
    findings = kept_findings(path)
    spec = DATASETS[dataset]
    configs = sorted({f"configs/{dataset}_{METHODS[method].config}.yaml" for method in results})
    notes = [f"- {METHODS[method].label}, seed {seed}: {note}" for method, runs in results.items()
             for seed, run in zip(args.seeds, runs) for note in run.notes]  # fmt: skip
    errors = [f"- {METHODS[method].label}, seed {seed}: {run.error}" for method, runs in results.items()
              for seed, run in zip(args.seeds, runs) if run.error]  # fmt: skip
    nuts = "nuts" in results
    lines = [
        f"# {dataset}: {spec.title}",
        "",
        f"{spec.description}.",
        "",
        "Written by `python experiments/uncertainty_table.py " + " ".join(sys.argv[1:]) + "`. " + settings_line(args) + ".",
        f"{spread_line(args)}; this data set took {duration(seconds)}.",
        "",
        results_table(dataset, results),
        "",
        "Columns: " + ("ECE with 15 equal-width bins; Brier score summed over classes; AURC with the max probability "
                       "as confidence; OOD scores: predictive entropy (total) and mutual information (epistemic; n/a for a "
                       "single network, whose mutual information is zero up to rounding: the check compares it with chance, "
                       "0.5, and the baseline's entropy AUROC)"
                       if spec.task == "classification" else
                       "95% coverage: fraction of test targets inside the central 95% Gaussian predictive interval "
                       "(total variance), ideally 0.95; CRPS of the Gaussian predictive; OOD scores: total predictive "
                       "variance and epistemic variance (variance of the sampled means; n/a for a single network, whose "
                       "epistemic variance is zero: the check compares it with chance, 0.5, and the baseline's total-variance "
                       "AUROC)") +
        "; train s: `trainer.fit` wall time, validation passes included (NUTS: sampling); predict ms: the test set "
        "with the method's Monte Carlo samples. Evaluated at the checkpoint with the lowest validation NLL.",
        "",
        "Configs: " + ", ".join(f"`{name}`" for name in configs) +
        (". NUTS: the `{}_svi.yaml` model with hidden layers {}, {} chain(s) x ({} warm-up + {} draws), max tree "
         "depth {}, weights started at the prior median".format(dataset, args.nuts_hidden, *nuts_settings(args)) if nuts else "") + ".",
        "",
        "## Expected shape (automatic check of the means against the deterministic baseline)",
        "",
        *shape_check(dataset, results),
        "",
        f"![NLL and OOD AUROC per method]({dataset}.png)",
    ]  # fmt: skip
    if notes:
        lines += ["", "## Run notes", "", *notes]
    if errors:
        lines += ["", "## Failed runs", "", *errors]
    text = "\n".join(lines) + "\n"
    if findings:
        text += "\n" + findings
    path.write_text(text)
    (out / f"{dataset}.json").write_text(json.dumps({
        "dataset": dataset, "seeds": args.seeds, "seconds": seconds, "settings": settings_line(args),
        # strict JSON: an undefined metric (a stuck chain's R-hat) is null, as in bdl's metrics.json
        "results": {method: [{"metrics": {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in run.metrics.items()},
                              "notes": run.notes, "error": run.error} for run in runs]
                    for method, runs in results.items()},
    }, indent=1, allow_nan=False) + "\n")  # fmt: skip
    plot(dataset, results, out / f"{dataset}.png")
    return path


def write_reference(results: dict[str, dict[str, list[RunResult]]], seconds: float, args: argparse.Namespace) -> Path:
    header = ["model", "paper accuracy", "accuracy, deterministic", "accuracy, Bayesian", "NLL, deterministic", "NLL, Bayesian",
              "ECE, deterministic", "ECE, Bayesian", "train s, deterministic", "train s, Bayesian"]  # fmt: skip
    rows = []
    for name, (paper, _) in REFERENCE_MODELS.items():
        runs = results[name]
        rows.append([name, f"{paper:.2f}"] + [cell(runs[kind], key, digits) for key, digits in
                                             (("accuracy", 4), ("nll", 4), ("ece", 4), ("train_s", 1)) for kind in ("deterministic", "bayesian")])  # fmt: skip
    path = args.out / f"{REFERENCE}.md"
    findings = kept_findings(path)
    epochs = 1 if args.quick else max(1, round(args.reference_epochs * args.epochs_scale))
    text = "\n".join([
        "# MNIST-1D reference: the paper's three models, deterministic and Bayesian",
        "",
        "All ten classes (no OOD hold-out); 3,600 training, 400 validation and the paper's 1,000 test signals. "
        "Deterministic: `configs/mnist1d_deterministic.yaml`; Bayesian: `configs/mnist1d_variational.yaml` "
        "(every layer a Bayesian layer, flipout, prior N(0, 1), KL warm-up 5 epochs); the network replaced by "
        "the model of each row (logistic regression = one linear layer 40-10; the MLP with ReLU; the CNN is "
        "bdl.lightning.Conv1dNet: three conv layers (kernels 5, 3, 3, stride 2, 32 channels), global average "
        "pooling, linear, where the paper's CNN has 25 channels and a linear layer on the flattened features). "
        f"Adam, lr 0.003, batch 128, {epochs} epochs (the paper: 6,000 steps of batch 100, lr 0.01), evaluated at "
        "the checkpoint with the lowest validation NLL. Paper accuracies: Greydanus (2020), MNIST-1D, table 1.",
        "",
        "Written by `python experiments/uncertainty_table.py " + " ".join(sys.argv[1:]) + "`. " + settings_line(args) +
        f". {spread_line(args)}; took {duration(seconds)}.",
        "",
        markdown_table(header, rows),
    ]) + "\n"  # fmt: skip
    if findings:
        text += "\n" + findings
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=[*DATASETS, REFERENCE], choices=[*DATASETS, REFERENCE], metavar="NAME",
                        help=f"data sets (default all): {', '.join([*DATASETS, REFERENCE])}")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="NAME",
                        help=f"methods (default all): {', '.join(METHODS)}")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds, 0 .. seeds-1 (default 3)")
    parser.add_argument("--epochs-scale", type=float, default=1.0, help="multiply every config's max_epochs (rounded, at least 1)")
    parser.add_argument("--reference-epochs", type=int, default=60, help="epochs of the MNIST-1D reference runs (times --epochs-scale)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run: 1 seed, 1 epoch, 2 batches, 4 NUTS draws")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the tables and plots (default experiments/results; with --quick a temporary folder, "
                             "so that a smoke run does not overwrite the results)")
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="keep every run's folder here (config, checkpoints, metrics.csv, the report with its figures); "
                             "default: a temporary folder, removed")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the models are tiny)")
    parser.add_argument("--nuts-hidden", type=int, nargs="+", default=[16], help="hidden layer sizes of the NUTS network")
    parser.add_argument("--nuts-samples", type=int, default=50, help="NUTS draws kept per chain")
    parser.add_argument("--nuts-warmup", type=int, default=100, help="NUTS warm-up steps per chain")
    parser.add_argument("--nuts-chains", type=int, default=2, help="NUTS chains (2 or more for R-hat)")
    parser.add_argument("--nuts-tree-depth", type=int, default=5, help="NUTS max tree depth (at most 2^depth - 1 steps per draw)")
    args = parser.parse_args(argv)
    for name in ("seeds", "threads", "reference_epochs", "nuts_samples", "nuts_chains", "nuts_tree_depth"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.nuts_samples < 4:
        parser.error(f"--nuts-samples must be >= 4 (for the posterior summary), got {args.nuts_samples}")
    if args.nuts_warmup < 0:
        parser.error(f"--nuts-warmup must be >= 0, got {args.nuts_warmup}")
    if not 0 < args.epochs_scale < math.inf:  # inf failed every run (epochs as an int)
        parser.error(f"--epochs-scale must be a finite number > 0, got {args.epochs_scale}")
    if any(size < 1 for size in args.nuts_hidden):
        parser.error(f"--nuts-hidden sizes must be >= 1, got {' '.join(map(str, args.nuts_hidden))}")
    args.seeds = [0] if args.quick else list(range(args.seeds))
    if args.out is None and not args.quick:  # --quick: a temporary folder, made by main (parsing makes nothing)
        args.out = ROOT / "experiments" / "results"
    for dataset in args.datasets:
        if dataset != REFERENCE and not any(applies(method, dataset) for method in args.methods):
            parser.error(f"no method of --methods {' '.join(args.methods)} applies to the data set {dataset} (its task: {DATASETS[dataset].task})")
    args.keep_runs = args.runs_dir is not None
    args.datasets = list(dict.fromkeys(args.datasets))
    args.methods = [method for method in METHODS if method in args.methods]  # the table's order
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet()
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="uncertainty_table_quick_"))
    args.out.mkdir(parents=True, exist_ok=True)
    temporary = args.runs_dir is None
    args.runs_dir = Path(tempfile.mkdtemp(prefix="uncertainty_table_")) if temporary else args.runs_dir
    from bdl.evaluate import Report

    figures = Report.figures
    if temporary:
        # Every test run saves its report; drawing its PNGs costs seconds a run, for a folder that is removed.
        Report.figures = lambda self: {}  # metrics.json and report.md only (restored below: main can be imported)
    start, failed, timings = time.perf_counter(), False, []
    try:
        for dataset in args.datasets:
            if dataset == REFERENCE:
                reference, seconds = run_reference(args)
                path = write_reference(reference, seconds, args)
                failed |= any(run.error for kinds in reference.values() for runs in kinds.values() for run in runs)
            else:
                results, seconds = run_dataset(dataset, args)
                path = write_dataset(dataset, results, seconds, args)
                failed |= any(run.error for runs in results.values() for run in runs)
            timings.append((dataset, seconds))
            print(f"\n{path.read_text()}", flush=True)
    finally:
        Report.figures = figures
        if temporary:
            shutil.rmtree(args.runs_dir, ignore_errors=True)
    total = time.perf_counter() - start
    print("Time per data set: " + ", ".join(f"{name} {duration(seconds)}" for name, seconds in timings) + f"; total {duration(total)}")
    print(f"Tables and plots in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
