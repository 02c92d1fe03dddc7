"""The ``bdl`` command: Lightning's CLI with bdl's run folders, checkpoints, reports and an ``evaluate`` subcommand.

    bdl fit      --config configs/quickstart.yaml             # train (and evaluate, with evaluate_after_fit)
    bdl evaluate --config configs/quickstart.yaml --ckpt_path runs/quickstart/version_0/checkpoints/last.ckpt
    bdl test | validate | predict --config ... --ckpt_path ...
    bdl fit      --config configs/quickstart.yaml --print_config  # the resolved config, nothing runs

Every run writes to ``runs/<run_name>/version_<n>/`` (``trainer.default_root_dir`` replaces ``runs``): the
resolved ``config.yaml``, ``checkpoints/`` (best by ``checkpoint.monitor`` and last), ``metrics.csv``
(and TensorBoard events when ``tensorboard`` is installed), and for test/evaluate runs the report
(``metrics.json``, ``report.md``, PNG plots); predict runs write ``predictions.pt``. ``run_name`` defaults
to the config file's name.
"""

from __future__ import annotations

import csv
import glob
import importlib.util
import json
import math
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from ..evaluate import _format
from ..predict import Prediction
from .modules import EnsembleModule, _check_one_order, _gather_prediction, _loaded_prior, _loader_at, _storable_prior, _unpadded_size, target_scale

DEFAULT_ROOT = "runs"
# Model arguments that say how to evaluate, not what was trained: with --ckpt_path they come from the command's
# config and arguments, the rest of the model from the checkpoint's hyperparameters.
EVALUATION_OPTIONS = ("num_eval_samples", "num_val_samples", "n_bins", "save_report", "compile")
# The logged metrics whose direction is known: a checkpoint monitor on them must have the matching mode.
HIGHER_IS_BETTER = ("val/accuracy", "val/elbo", "train/elbo")
LOWER_IS_BETTER = ("val/nll", "val/ece", "val/rmse", "train/loss", "train/nll", "train/kl")
REPORT_COLUMNS = {
    "accuracy": "accuracy",
    "nll": "NLL",
    "ece": "ECE",
    "brier_score": "Brier",
    "rmse": "RMSE",
    "crps": "CRPS",
}


class Trainer(L.Trainer):
    """Lightning's ``Trainer`` plus :meth:`evaluate`: test and print the uncertainty report.

    ``limit_*_batches`` and ``overfit_batches`` are redeclared as ``int | float`` so that the command line reads
    ``--trainer.limit_val_batches 1`` as one batch (an int), as Lightning documents. Lightning annotates them
    ``Optional[Union[int, float]]``, but typing caches unions without regard to order and Lightning has created
    ``Optional[Union[float, int]]`` first, so the parser would try float first and read ``1`` as ``1.0``: all
    batches. The other arguments are Lightning's.
    """

    def __init__(
        self,
        *,
        limit_train_batches: int | float | None = None,
        limit_val_batches: int | float | None = None,
        limit_test_batches: int | float | None = None,
        limit_predict_batches: int | float | None = None,
        overfit_batches: int | float = 0.0,
        **kwargs: Any,  # noqa: ANN401 - Lightning's Trainer arguments
    ) -> None:
        given = {
            "limit_train_batches": limit_train_batches,
            "limit_val_batches": limit_val_batches,
            "limit_test_batches": limit_test_batches,
            "limit_predict_batches": limit_predict_batches,
            "overfit_batches": overfit_batches if overfit_batches != 0 else None,
        }
        # pass only what was set, so Lightning's PL_TRAINER_* environment defaults still apply to the rest
        super().__init__(**{name: value for name, value in given.items() if value is not None}, **kwargs)

    def evaluate(
        self,
        model: Optional[L.LightningModule] = None,
        dataloaders: Any = None,  # noqa: ANN401 - as Trainer.test
        ckpt_path: Optional[str] = None,
        verbose: bool = True,
        datamodule: Optional[L.LightningDataModule] = None,
        weights_only: Optional[bool] = None,
    ) -> list[dict[str, float]]:
        """Evaluate a model on the test set (and OOD set): write the bdl.evaluate report and print its table.

        Runs :meth:`test` (the bdl LightningModules write ``metrics.json``, ``report.md`` and the plots
        to the run folder at the end of a test epoch), then prints the headline metrics and the folder.
        """
        # weights_only: as Trainer.test (a run's saved config.yaml holds fit's, which evaluate refused); passed only
        # when set, for Lightning releases before it
        options = {} if weights_only is None else {"weights_only": weights_only}
        started = time.time()
        results = self.test(model, dataloaders, ckpt_path=ckpt_path, verbose=False, datamodule=datamodule, **options)
        module = model if model is not None else self.lightning_module
        report = getattr(module, "report", None)
        log_dir = self.log_dir  # a broadcast under DDP: every process must ask, not only rank 0
        info = None if report is None else report.to_dict()
        saved = Path(getattr(module, "report_dir", None) or log_dir or self.default_root_dir) / "metrics.json"
        # ddp_spawn: the processes that tested wrote it, this one has no report (one this test wrote, not an older one)
        if info is None and saved.is_file() and saved.stat().st_mtime >= started - 1:
            info = json.loads(saved.read_text())
        if verbose and self.is_global_zero and info is not None:
            ood_name = getattr(datamodule, "ood_name", None)
            ood = "" if info["num_ood_examples"] is None else f", {info['num_ood_examples']} OOD inputs ({ood_name or 'OOD set'})"
            # an ensemble's samples are its members' predictions ("2 Monte Carlo samples" read as too few draws)
            members = getattr(module, "num_members", None) if isinstance(module, EnsembleModule) else None
            samples = "Monte Carlo samples per input" if members is None else f"predictions per input from {members} members"
            print(
                f"\n{type(module).__name__} on {type(datamodule).__name__ if datamodule is not None else 'the test data'}: "
                f"{info['num_examples']} test inputs{ood}, {info['num_samples']} {samples}\n"
            )
            metrics = {key: math.nan if value is None else value for key, value in info["metrics"].items()}
            print(summary_table(metrics, ood_name=ood_name))
            folder = getattr(module, "report_dir", None) or (saved.parent if report is None else None)
            if folder is None:  # fast_dev_run, save_report off, or a trainer without a logger: module.report holds it
                why = "fast_dev_run" if self.fast_dev_run else "save_report is off" if not getattr(module, "save_report", True) else "no logger"
                print(f"\n{why}: no report files written")
            else:
                print(f"\nReport (metrics.json, report.md, plots): {folder}")
        elif verbose and self.is_global_zero and hasattr(module, "save_report") and results and any(key.startswith("test/") for key in results[0]):
            # ddp_spawn without a written report (no logger, save_report off): the processes that tested kept it,
            # and only the logged headline metrics came back; `bdl test` printed nothing at all
            headline = {key[len("test/") :]: value for key, value in results[0].items() if key.startswith("test/")}
            print(f"\n{type(module).__name__}: the test's headline metrics (no report came back to this process)\n")
            print(summary_table(headline, ood_name=getattr(datamodule, "ood_name", None)))
        return results


def summary_table(metrics: dict[str, float], *, ood_name: Optional[str] = None) -> str:
    """The headline metrics as a markdown table: accuracy/NLL/ECE/Brier (or RMSE/CRPS) and OOD AUROCs."""
    rows = [(title, metrics[key]) for key, title in REPORT_COLUMNS.items() if key in metrics]
    scores = [key.split("/")[1] for key in metrics if key.startswith("ood/") and key.endswith("/auroc")]
    against = f" vs {ood_name}" if ood_name else ""
    rows += [(f"OOD AUROC{against} ({score.replace('_', ' ')})", metrics[f"ood/{score}/auroc"]) for score in scores]
    width = max([len("metric"), *(len(title) for title, _ in rows)])  # (a regression's "RMSE" rows broke the bar)
    # the value column as wide as its widest entry: an early ResNet's NLL of 12.3456 pushed its row's bar out
    values = [_format(value) for _, value in rows]  # n/a where not finite, as report.md (JSON's null read back NaN)
    value_width = max([len("value"), *map(len, values)])
    lines = [f"| {'metric':<{width}} | {'value':<{value_width}} |", f"|{'-' * (width + 2)}|{'-' * (value_width + 1)}:|"]
    lines += [f"| {title:<{width}} | {value:>{value_width}} |" for (title, _), value in zip(rows, values)]
    return "\n".join(lines)


class PredictionWriter(BasePredictionWriter):
    """Saves a predict run's :class:`bdl.Prediction` (merged over batches) as ``predictions.pt`` in the run folder.

    The file holds a dict of tensors (``probs``, ``predicted_class``, ``predictive_entropy``,
    ``expected_entropy``, ``mutual_information`` for classification; ``mean``, ``aleatoric_variance``,
    ``epistemic_variance`` for regression), one row per input in the data set's order, also when several
    processes (DDP) predicted parts of it; load it with ``torch.load``. A regression on targets its data module
    standardised (``target_std``) also holds ``target_mean`` and ``target_std``, the way back to the original units.
    """

    def __init__(self) -> None:
        super().__init__(write_interval="epoch")

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Sequence[Any], batch_indices: Any) -> None:  # noqa: ANN401
        parts = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        parts = [part for part in parts if isinstance(part, Prediction)]
        if not parts:
            return
        prediction = Prediction.cat(parts)
        folder = Path(trainer.log_dir or trainer.default_root_dir)  # log_dir is a collective under DDP: every process
        if trainer.world_size > 1:  # each process predicted rows r, r + W, ... of the data set: back in order, in one file
            loader = _loader_at(trainer.predict_dataloaders, 0)
            total = _unpadded_size(loader)
            if total is None:
                raise ValueError(
                    "bdl predict under DDP needs Lightning's unshuffled distributed sampler on the predict loader "
                    "(use_distributed_sampler on) to put the processes' rows back in order"
                )
            _check_one_order(pl_module, loader, "predict loader")
            prediction = _gather_prediction(pl_module, prediction, total)
            if trainer.global_rank != 0:
                return
        prediction = prediction.to("cpu")
        if prediction.task == "classification":
            names = ("probs", "predicted_class", "predictive_entropy", "expected_entropy", "mutual_information", "max_probability")
        else:
            names = ("mean", "aleatoric_variance", "epistemic_variance", "total_variance")
        if trainer.fast_dev_run:  # a smoke test: no logger, so the folder would be the working directory
            return
        folder.mkdir(parents=True, exist_ok=True)
        saved: dict[str, Any] = {name: getattr(prediction, name) for name in names}
        scale = target_scale(trainer) if prediction.task == "regression" else None
        if scale is not None:  # standardised units: the way back (mean * std + mean_0, variances * std^2)
            saved.update(target_mean=scale[0], target_std=scale[1])
        torch.save(saved, folder / "predictions.pt")


class Checkpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, whose ``last.ckpt`` (``save_last=True``) is the run's newest resumable state.

    Since Lightning 2.6 ``save_last`` rewrites ``last.ckpt`` only in a step that saves a top-k checkpoint too: with
    the best one kept, ``last.ckpt`` was a copy of it (a 40-epoch quickstart's at epoch 36; ``--ckpt_path last``
    trained epochs 37-39 again, and ``evaluate --ckpt_path last`` read the best epoch's weights). It is saved at
    the end of each training epoch. A run stopped partway through an epoch (``max_steps``, or an early stop at a
    validation with ``val_check_interval`` below 1) keeps the previous epoch end's: Lightning resumed a checkpoint
    saved there to other weights, as if the epoch were over, except where Lightning itself saves one (with a new
    best there, or in a run stopped within its first epoch, which saved none). A ``val/``
    monitor the module does not log gets a one-line error at the first validation (Lightning's came in a
    traceback), after a warning when the sanity check's validation did not log it.
    """

    @property
    def state_key(self) -> str:  # ModelCheckpoint's: a run checkpointed before this class resumes its best score
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        resumed = getattr(self, "_resumed_folder", None)  # the folder of the run's checkpoint a fit resumes in place
        # (the run's own folder, unless a checkpoint.dirpath elsewhere was given, whose files the warning is about)
        own = resumed is not None and (self.dirpath is None or os.path.realpath(os.path.expanduser(self.dirpath)) == os.path.realpath(resumed))
        with warnings.catch_warnings():
            if stage == "fit" and own:  # Lightning's "Checkpoint directory ... exists and is not empty": the run's own
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty\.")
            super().setup(trainer, pl_module, stage)
        self._stage = stage

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # a test, validate or predict run saves no checkpoint: Lightning's "The dirpath has changed ... won't be
        # reloaded" (every evaluate from a checkpoint, twice under DDP) spoke of scores it has no use for; the best
        # path it reloads all the same (test(ckpt_path="best") after a validate from another run's checkpoint)
        if getattr(self, "_stage", "fit") != "fit" and state_dict.get("dirpath", self.dirpath) != self.dirpath:
            self.best_model_path = state_dict.get("best_model_path", self.best_model_path)
            return
        super().load_state_dict(state_dict)

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # not refused here: a module may log a metric only outside the sanity check (SVIModule's val/elbo before
        # num_data is known)
        if self._missing_monitor(trainer):
            rank_zero_warn(f"checkpoint.monitor {self.monitor!r} was not logged by the sanity check's validation: {self._logged(trainer)}")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        # every finished epoch, validated or not (check_val_every_n_epoch); not where max_steps ended it early:
        # Lightning resumed such a checkpoint as if the epoch were over
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._save_newest_last(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking and self._missing_monitor(trainer):
            raise ValueError(f"checkpoint.monitor {self.monitor!r} is not a metric the module logs in validation: {self._logged(trainer)}")
        super().on_validation_end(trainer, pl_module)
        # at an epoch's end: a checkpoint of a validation partway through one (val_check_interval < 1) that a stop
        # then made the last resumed to other weights
        if not self._should_save_on_train_epoch_end(trainer) and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._save_newest_last(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)  # Lightning's: last.ckpt of a run that saved none, wherever it stopped
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._save_newest_last(trainer)

    def _logged(self, trainer: L.Trainer) -> list[str]:
        return sorted(key for key in trainer.callback_metrics if key.startswith("val/"))

    def _missing_monitor(self, trainer: L.Trainer) -> bool:
        logged = self._logged(trainer)
        return self.monitor is not None and self.monitor.startswith("val/") and bool(logged) and self.monitor not in logged

    def _save_newest_last(self, trainer: L.Trainer) -> None:
        # "link" links last.ckpt to the newest saved checkpoint, as Lightning documents; skipped: saved at this step
        if self.save_last is True and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def _tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None


_VERSION_VARIABLE = "BDL_RUN_VERSION"


def _run_version(root: str, name: str, resume: Optional[int] = None) -> int:
    """The run's version number, the same in every process of a multi-process run.

    ``resume`` (the version of the run a fit resumes) is used as is. Otherwise the first process picks
    the next free ``version_<n>`` and puts it in the environment; Lightning's DDP launcher starts the
    other processes with a copy of that environment (and ``LOCAL_RANK`` > 0), and they read it instead of
    listing the folder, which the first one may have created meanwhile.
    """
    if os.environ.get("LOCAL_RANK", "0") != "0" and _VERSION_VARIABLE in os.environ:
        return int(os.environ[_VERSION_VARIABLE])
    version = resume if resume is not None else CSVLogger(save_dir=root, name=name).version
    os.environ[_VERSION_VARIABLE] = str(version)
    return int(version)


class _ContinuedCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger`` that continues the run's ``metrics.csv``, which Lightning's deletes when it
    (re)creates its writer. For a resumed fit, rows logged before the checkpoint (``step`` below its global
    step) are kept; later ones, from an epoch the interrupted run had begun and the resumed fit runs again,
    are not. For a new run (``resume_step`` infinite) every row is kept: under ``ddp_spawn`` each fit or test
    runs in new processes, whose copies of the logger make the writer anew."""

    def __init__(self, *args: Any, resume_step: float, **kwargs: Any) -> None:  # noqa: ANN401
        super().__init__(*args, **kwargs)
        self._resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:  # noqa: ANN401 - Lightning's experiment writer
        if self._experiment is not None:
            return self._experiment
        path = Path(self.log_dir) / "metrics.csv"
        fields: list[str] = []
        kept: list[dict[str, str]] = []
        if path.is_file():
            with path.open(newline="") as file:
                reader = csv.DictReader(file)
                fields = list(reader.fieldnames or [])
                kept = [row for row in reader if row.get("step") and float(row["step"]) < self._resume_step]
        with warnings.catch_warnings():  # its "Previous log files in this directory will be deleted": kept, as above
            warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
            writer = super().experiment  # Lightning's writer, which has just deleted the file
        if fields:
            with path.open("w", newline="") as file:
                rows = csv.DictWriter(file, fieldnames=fields)
                rows.writeheader()
                rows.writerows(kept)
            writer.metrics_keys = fields  # the header new rows are appended under (a new key rewrites it)
        return writer


def _version_of(path: Path) -> Optional[int]:
    """``n`` for a checkpoint at ``.../version_<n>/checkpoints/<file>``, else None."""
    folder = path.parent.parent.name
    if path.parent.name == "checkpoints" and folder.startswith("version_") and folder[8:].isdigit():
        return int(folder[8:])
    return None


def _recorded_best(last: Path) -> Optional[Path]:
    """The best checkpoint that ``last.ckpt``'s ModelCheckpoint state records (its newest state), where that file is
    in the same folder (the run folder may have moved since: the recorded path is absolute); else None."""
    try:
        states = torch.load(last, map_location="cpu", weights_only=True, mmap=True).get("callbacks") or {}
    except Exception:  # noqa: BLE001 - an unreadable last.ckpt: the named file, as before
        return None
    recorded = [state for key, state in states.items() if key.startswith("ModelCheckpoint") and isinstance(state, dict)]
    best = [last.parent / _within(state["best_model_path"], state.get("dirpath")) for state in recorded if state.get("best_model_path")]
    return best[0] if len(best) == 1 and best[0].is_file() else None


def _within(path: str, folder: Optional[str]) -> Path:
    """``path`` relative to the checkpoint ``folder`` it was saved in: a filename with a metric's "/"
    (``{val/nll:.3f}``) makes Lightning write into a subfolder, which the file's name alone left out."""
    try:
        return Path(path).relative_to(folder) if folder else Path(Path(path).name)
    except ValueError:
        return Path(Path(path).name)


def check_checkpoint(path: Union[str, Path]) -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)``, turning a missing, truncated or tampered file into a clear error.

    ``weights_only=True`` unpickles only tensors and plain containers, so a checkpoint from someone else
    cannot run code when loaded.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a readable PyTorch checkpoint, or holds objects other than tensors
            and plain values (names the file and the reason).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises several types for broken files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"checkpoint {str(path)!r} cannot be loaded safely (weights_only=True): it is truncated, corrupted, not a "
            f"PyTorch checkpoint, or holds objects other than tensors and plain values ({type(error).__name__}: {reason})"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"checkpoint {str(path)!r} has no 'state_dict': it is not a Lightning checkpoint")
    if "pytorch-lightning_version" not in checkpoint:  # Lightning's KeyError, a bare traceback
        raise ValueError(
            f"checkpoint {str(path)!r} has a 'state_dict' but no 'pytorch-lightning_version': it is not a Lightning "
            "checkpoint (torch.save of a dict?); save one with trainer.save_checkpoint(path), or load these weights "
            "in Python: module.load_state_dict(torch.load(path)['state_dict'])"
        )
    return checkpoint


def _class_of(path: str) -> Any:  # noqa: ANN401 - the class, or the path where it does not import
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return path


def _check_same_class(model: Any, checkpoint: dict[str, Any], ckpt_path: str) -> None:  # noqa: ANN401
    """A ValueError where the config's model class is not the checkpoint's: Lightning builds the checkpoint's, which
    then ran with the other class's evaluation options (a VariationalModule evaluated with 1 sample) in a run
    folder named after the config."""
    named = model.get("class_path") if hasattr(model, "get") else None
    saved = (checkpoint.get("hyper_parameters") or {}).get("_class_path")
    if named and saved and _class_of(str(named)) is not _class_of(str(saved)) and str(named) != str(saved):
        raise ValueError(
            f"--ckpt_path {ckpt_path} holds a {saved}, but the config's model is a {named}: pass the config of the run "
            "that wrote the checkpoint (its config.yaml, beside checkpoints/)"
        )


TRAINING_OPTIONS = (
    "optimizer", "lr", "weight_decay", "momentum", "lr_schedule", "lr_decay", "kl_warmup_epochs", "kl_weight",
    "num_train_samples", "num_data", "prior_std", "prior", "posterior_std_init", "elbo", "num_particles", "init_scale", "validate",
)  # fmt: skip
"""Module arguments that change how a fit trains (the loss, its prior, the starting stds), not the trained model,
whose stds and guide scales the state dict holds: free to differ when evaluating a checkpoint."""

_PATTERNS = ("include", "exclude", "insert_before")  # one pattern on its own is a list of one


def _plain(value: Any) -> Any:  # noqa: ANN401 - a hyperparameter's value
    """A hyperparameter as comparable text or numbers: lists for tuples, ``module.Type`` for a layer type (a
    checkpoint keeps one as ``{"module": ..., "type": ...}``)."""
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict) and set(value) == {"module", "type"}:
        return f"{value['module']}.{value['type']}"
    if isinstance(value, dict):  # a network's config: its lists and tuples alike
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    return value


def _init_args(model: Any) -> Any:  # noqa: ANN401 - a config's model entry
    """A config's model ``init_args`` (None where the entry holds none)."""
    return model.get("init_args") if hasattr(model, "get") else None


def _check_python_checkpoint(model: Any, saved: dict[str, Any], ckpt_path: str, training: bool) -> None:  # noqa: ANN401
    """A ValueError where a checkpoint saved from Python holds module arguments other than the config's (besides
    the evaluation options, and, unless resuming a fit, the training options): the config's module was evaluated
    in their place, silently (an MC dropout rate of 0.2 for the 0.5 it was trained with)."""
    init_args = _init_args(model)
    if init_args is None:
        return
    skipped = EVALUATION_OPTIONS + (() if training else TRAINING_OPTIONS)

    def comparable(key: str, value: Any) -> Any:  # noqa: ANN401 - one layer pattern on its own is a list of one
        if key == "noise_variance" and value is None:  # unset is 1.0, which modules saved before that default kept
            value = 1.0
        if key == "prior" and value is not None:  # as built: bdl.ScaleMixturePrior is bdl.nn.priors.ScaleMixturePrior
            try:  # its full class path and every argument (a repr may leave some out, or round them)
                return _storable_prior(_loaded_prior(value.as_dict() if hasattr(value, "as_dict") else value))
            except (TypeError, ValueError, ImportError):
                return value
        return _plain([value] if key in _PATTERNS and value is not None and not isinstance(value, (list, tuple)) else value)

    differ = [
        f"{key}={comparable(key, value)!r} (the config: {comparable(key, init_args[key])!r})"
        for key, value in saved.items()
        if key != "model" and not key.startswith("_") and key not in skipped and key in init_args
        and comparable(key, value) != comparable(key, init_args[key])
    ]
    if differ:
        raise ValueError(
            f"--ckpt_path {ckpt_path} was saved from Python (not by the bdl command) with {', '.join(differ)}: the config "
            "must build the module that was trained; pass those values (--model.init_args.<name>), or evaluate it from "
            "Python (bdl.lightning.cli.Trainer.evaluate)"
        )


def _warn_of_overridden_arguments(init_args: Any, saved: dict[str, Any], ckpt_path: str) -> None:  # noqa: ANN401
    """Warn where this command's module arguments differ from those a bdl checkpoint was made with: Lightning builds
    the module from the checkpoint's, and a resume's ``--model.init_args.lr 0.5`` was dropped without a word."""
    if init_args is None:
        return
    given = init_args.as_dict() if hasattr(init_args, "as_dict") else dict(init_args)
    differ = [
        f"{key} (its config)" if isinstance(value, dict) else f"{key}={_plain(saved[key])!r} (this command: {_plain(value)!r})"
        for key, value in given.items()
        if key in saved and key not in EVALUATION_OPTIONS and not key.startswith("_") and _plain(value) != _plain(saved[key])
    ]
    if differ:
        rank_zero_warn(
            f"--ckpt_path {ckpt_path}: the module is built from the checkpoint's arguments (Lightning's rule), which "
            f"differ from this command's: {', '.join(differ)}; only {', '.join(EVALUATION_OPTIONS)} come from the command"
        )


class BDLCLI(LightningCLI):
    """``LightningCLI`` with bdl's defaults: any LightningModule/DataModule by class path, run folders, ``evaluate``.

    Adds the config keys ``run_name`` (the run folder's name; default: the config file's name),
    ``evaluate_after_fit`` (after ``fit``, evaluate the best checkpoint on the test/OOD sets) and a
    ``checkpoint`` group (Lightning's ``ModelCheckpoint``; default: keep the best by ``val/nll`` and the last).
    """

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:  # noqa: ANN401
        kwargs.setdefault("trainer_class", Trainer)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)  # the bdl modules have their own optimizer options
        kwargs.setdefault("trainer_defaults", {"callbacks": [PredictionWriter()]})
        # no abbreviated options: argparse took --trainer.max_epoch for max_epochs, where a misspelt key is refused
        given = dict(kwargs.get("parser_kwargs") or {})  # merged into, not replaced by, a caller's own
        kwargs["parser_kwargs"] = {
            "allow_abbrev": False,
            **given,
            **{name: {"allow_abbrev": False, **given.get(name, {})} for name in self.subcommands()},
        }
        super().__init__(L.LightningModule, L.LightningDataModule, args=args, run=run, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "evaluate": {"model", "dataloaders", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_name", type=Optional[str], default=None, help="Run folder name (default: the config file's name).")
        parser.add_argument("--evaluate_after_fit", type=bool, default=False, help="After fit, evaluate the best checkpoint.")
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.set_defaults(
            {"checkpoint.monitor": "val/nll", "checkpoint.mode": "min", "checkpoint.save_last": True, "checkpoint.filename": "best"}
        )

    def _parse_ckpt_path(self) -> None:
        """Resolve ``--ckpt_path last``/``best``, check a given checkpoint, and take the model from it.

        For a checkpoint the ``bdl`` command wrote, Lightning replaces the config's model arguments with the
        checkpoint's hyperparameters (the model that was trained); bdl then puts back this command's evaluation
        options (:data:`EVALUATION_OPTIONS`), which Lightning's merge silently dropped. A checkpoint saved from
        Python names no class: the config's model is kept, and refused where its arguments differ from the
        checkpoint's (:func:`_check_python_checkpoint`).
        """
        self._resume_version: Optional[int] = None
        self.subcommand = self.config.get("subcommand")  # LightningCLI sets it only after this method
        config = self._subconfig() if self.subcommand else None
        ckpt_path = None if config is None else config.get("ckpt_path")
        if ckpt_path is None and self.subcommand in ("evaluate", "test", "validate", "predict"):
            # Lightning runs the model as the config builds it: a report on untrained weights, said nowhere
            rank_zero_warn(
                f"bdl {self.subcommand} without --ckpt_path: the model has the weights the config initialises it "
                "with (untrained); pass --ckpt_path runs/<run>/version_<n>/checkpoints/<file>.ckpt to use a trained one"
            )
        if ckpt_path is None or ckpt_path in ("hpc", "registry"):
            return super()._parse_ckpt_path()
        if ckpt_path in ("last", "best"):
            # Lightning would look for them in this command's new run folder, find nothing and go on untrained
            ckpt_path = config["ckpt_path"] = str(self._newest_checkpoint(config, ckpt_path))
        checkpoint = check_checkpoint(ckpt_path)
        _check_same_class(config.get("model"), checkpoint, ckpt_path)
        if self.subcommand == "fit":  # resuming the run the checkpoint belongs to: keep logging into its folder
            version = _version_of(Path(ckpt_path))
            own = Path(config.get("trainer", {}).get("default_root_dir") or DEFAULT_ROOT) / self.run_name() / f"version_{version}"
            if version is not None and Path(ckpt_path).resolve().parent.parent == own.resolve():
                self._resume_version = version
                self._resume_step = int(checkpoint.get("global_step", 0))
                self._resumed_folder = str(Path(ckpt_path).parent)
        saved = checkpoint.get("hyper_parameters") or {}
        if "_class_path" not in saved:
            # saved outside the bdl command (a module trained in Python): its hyperparameters name no class and hold
            # no network, and Lightning's merge of them failed in jsonargparse's words. The config builds the module,
            # which the checkpoint's weights load into (strictly: another network is an error); what no weight holds
            # (an MC dropout rate, the layers it was inserted before) must be the config's too
            _check_python_checkpoint(config.get("model"), saved, ckpt_path, training=self.subcommand == "fit")
            return
        model = config.get("model")
        init_args = _init_args(model)
        chosen = {key: init_args[key] for key in EVALUATION_OPTIONS if init_args is not None and key in init_args}
        _warn_of_overridden_arguments(init_args, saved, ckpt_path)
        super()._parse_ckpt_path()  # a new config object
        model = self._subconfig().get("model")
        if chosen and hasattr(model, "get") and model.get("init_args") is not None:
            for key, value in chosen.items():
                if key in model["init_args"]:
                    model["init_args"][key] = value

    def _newest_checkpoint(self, config: Any, which: str) -> Path:  # noqa: ANN401 - the subcommand's config
        """``last.ckpt`` (``which="last"``) or the best checkpoint of the newest ``version_<n>`` of this run that has one;
        with a ``checkpoint.dirpath``, the newest such file in that folder (where the run wrote them)."""
        name = "last" if which == "last" else (config.get("checkpoint", {}).get("filename") or "best")
        dirpath = (config.get("checkpoint") or {}).get("dirpath")
        if dirpath is not None:  # "~/ckpts" as ModelCheckpoint reads it
            return self._newest_in_folder(Path(os.path.expanduser(str(dirpath))), which, name)
        root = Path(config.get("trainer", {}).get("default_root_dir") or DEFAULT_ROOT) / self.run_name()
        found = [(version, path) for path in root.glob(f"version_*/checkpoints/{name}.ckpt") if (version := _version_of(path)) is not None]
        if which == "best":
            # the best as the run recorded it: with save_top_k > 1 Lightning names the kept files best, best-v1, ...
            # and reuses freed names (best.ckpt held a worse epoch), and a templated filename ("ep{epoch}") names none
            for path in root.glob("version_*/checkpoints/last.ckpt"):
                recorded = _recorded_best(path)
                if recorded is not None and (version := _version_of(path)) is not None:
                    found = [entry for entry in found if entry[0] != version] + [(version, recorded)]
        if not found:
            doing = "resume" if self.subcommand == "fit" else self.subcommand
            raise FileNotFoundError(
                f"--ckpt_path {which}: no {root}/version_*/checkpoints/{name}.ckpt to {doing} from; "
                + ("start the run without --ckpt_path (or pass a checkpoint file)" if self.subcommand == "fit" else "pass a checkpoint file")
            )
        return max(found)[1]

    def _newest_in_folder(self, folder: Path, which: str, name: str) -> Path:
        """The newest ``last.ckpt`` in a fixed checkpoint folder (Lightning names a later run's ``last-v1.ckpt``, ...),
        or the best checkpoint it records, else the newest ``<name>.ckpt`` (or ``<name>-v<n>.ckpt``)."""
        def versions(name: str) -> list[Path]:  # <name>.ckpt and a later run's <name>-v1.ckpt, ..., oldest first
            where, stem = folder / Path(name).parent, Path(name).name  # a filename "sub/best" writes into sub/
            found = [path for path in where.glob(f"{glob.escape(stem)}*.ckpt") if path.stem == stem or (
                path.stem[len(stem) : len(stem) + 2] == "-v" and path.stem[len(stem) + 2 :].isdigit())]  # fmt: skip
            return sorted(found, key=lambda path: path.stat().st_mtime)

        lasts = versions("last")
        if which == "best" and lasts and (recorded := _recorded_best(lasts[-1])) is not None:
            return recorded
        named = versions(name) if which == "best" else lasts
        if not named:
            doing = "resume" if self.subcommand == "fit" else self.subcommand
            raise FileNotFoundError(f"--ckpt_path {which}: no {folder}/{name}.ckpt (the checkpoint.dirpath given) to {doing} from; pass a checkpoint file")
        return named[-1]

    def _subconfig(self) -> Any:  # noqa: ANN401
        return self.config[self.subcommand] if self.subcommand else self.config

    def run_name(self) -> str:
        """The run folder's name: ``run_name``, else the (last) config file's name, else the model's class name."""
        config = self._subconfig()
        if config.get("run_name"):
            return str(config["run_name"])
        files = [path for path in (config.get("config") or []) if path is not None]
        if files:
            return Path(str(files[-1])).stem
        model = config.get("model")
        class_path = model.get("class_path") if hasattr(model, "get") else None
        if class_path:  # known before the model is built (a resume resolves its folder first)
            return str(class_path).rsplit(".", 1)[-1]
        return type(self.model).__name__

    def before_instantiate_classes(self) -> None:
        # the saved config.yaml names its run: given to a later command, it finds the same folder (its own
        # file name is "config")
        self._subconfig()["run_name"] = self.run_name()
        checkpoint = self._subconfig().get("checkpoint") or {}
        monitor, mode = checkpoint.get("monitor"), checkpoint.get("mode")
        metric = str(monitor).removesuffix("_epoch").removesuffix("_step")
        better = "higher" if metric in HIGHER_IS_BETTER else "lower" if metric in LOWER_IS_BETTER else None
        if better is not None and mode != ("max" if better == "higher" else "min"):
            # Lightning keeps whatever the mode asks for: the worst checkpoint, named "best"
            raise ValueError(
                f"checkpoint.monitor {monitor!r} is better when {better}, but checkpoint.mode is {mode!r}, which keeps "
                f"the worst checkpoint as the best; pass --checkpoint.mode {'max' if better == 'higher' else 'min'}"
            )

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:  # noqa: ANN401
        trainer_config = self._subconfig().get("trainer", {})
        if trainer_config.get("logger") in (None, True):
            root = trainer_config.get("default_root_dir") or DEFAULT_ROOT
            version = _run_version(root, self.run_name(), resume=getattr(self, "_resume_version", None))
            folder = Path(root) / self.run_name() / f"version_{version}"
            self._new_run_folder = None if folder.exists() else folder
            self._new_root = None if Path(root).exists() else Path(root)  # runs/ itself, on a first run
            resume = getattr(self, "_resume_version", None) is not None and version == self._resume_version
            self._resumes_in_place = resume  # (the checkpoint callback is told in _instantiate_trainer)
            # a new run's logger continues its metrics.csv too: under ddp_spawn every fit or test starts new processes,
            # whose copies of the logger start the file afresh (the test after a fit deleted the training curve)
            csv_logger = _ContinuedCSVLogger(save_dir=root, name=self.run_name(), version=version, resume_step=self._resume_step if resume else math.inf)
            loggers: list[Logger] = [csv_logger]
            if _tensorboard_available():
                from lightning.pytorch.loggers import TensorBoardLogger

                loggers.append(TensorBoardLogger(save_dir=root, name=self.run_name(), version=version, default_hp_metric=False))
            kwargs.setdefault("logger", loggers)
        return super().instantiate_trainer(**kwargs)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> L.Trainer:
        # the ``checkpoint`` group's callback: after_fit evaluates its best file, whatever other ModelCheckpoints
        # the user adds (Lightning's "best" means the first one's); none with enable_checkpointing false, which
        # Lightning refuses next to a ModelCheckpoint
        self._checkpoint = next((callback for callback in callbacks if isinstance(callback, ModelCheckpoint)), None)
        if config.get("enable_checkpointing") is False and self._checkpoint is not None:
            callbacks = [callback for callback in callbacks if callback is not self._checkpoint]
            self._checkpoint = None
        if isinstance(self._checkpoint, Checkpoint):  # Lightning's "Checkpoint directory ... is not empty" on a resume
            self._checkpoint._resumed_folder = getattr(self, "_resumed_folder", None) if getattr(self, "_resumes_in_place", False) else None
        if config.get("fast_dev_run"):
            # Lightning saves no checkpoint in a fast_dev_run but save_last's at the end of training, which without a
            # logger went to checkpoints/last.ckpt in the working directory
            callbacks = [callback for callback in callbacks if not isinstance(callback, ModelCheckpoint)]
            self._checkpoint = None
        return super()._instantiate_trainer(config, callbacks)

    def test(self, **kwargs: Any) -> Any:  # noqa: ANN401 - LightningCLI runs this for `bdl test` (Trainer.test's arguments)
        """``bdl test``: for bdl's modules, :meth:`Trainer.evaluate` (the test run, printing bdl's table); Lightning's
        table repeated the test set's metrics, logged at the epoch's end, under the OOD loader's column, as if they
        were measured on the OOD inputs. Other modules get Lightning's test."""
        model = kwargs.get("model") or self.model
        if not hasattr(model, "save_report"):  # not a bdl module (bdl.lightning's, or SVIModule): no report to show
            return self.trainer.test(**kwargs)
        return self.trainer.evaluate(**kwargs)

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            self._remove_failed_run_folder()
            raise

    def _remove_failed_run_folder(self) -> None:
        """After a run that failed before saving a checkpoint, delete the run folder it created (nothing in it is
        worth keeping: the config and logs of a run that never trained); folders with checkpoints stay, to resume."""
        folder = getattr(self, "_new_run_folder", None)
        trainer = getattr(self, "trainer", None)
        if folder is None or not folder.is_dir() or (trainer is not None and not trainer.is_global_zero):
            return
        if any((folder / "checkpoints").glob("*.ckpt")):
            return
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        if folder.parent.is_dir() and not any(folder.parent.iterdir()):
            folder.parent.rmdir()
        root = getattr(self, "_new_root", None)  # made for this run: a first fit that failed left an empty runs/
        if root is not None and root.is_dir() and not any(root.iterdir()):
            root.rmdir()

    def after_fit(self) -> None:
        if not self._subconfig().get("evaluate_after_fit"):
            return
        checkpoint = getattr(self, "_checkpoint", None)
        ckpt_path = checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None
        for logger in self.trainer.loggers:  # the fit is over: every row it logged stays (ddp_spawn tests start a new writer)
            if isinstance(logger, _ContinuedCSVLogger):
                logger._resume_step = math.inf
        self.trainer.evaluate(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path)


def main(args: Optional[Sequence[str]] = None) -> None:
    """Run the ``bdl`` command with ``args`` (default: the command line); errors propagate as exceptions.

    A distributed run's process group is destroyed at the end (Lightning keeps it for later ``fit``/``test``
    calls): left to interpreter exit, gloo's worker threads can abort the process (SIGABRT, "terminate called
    without an active exception"), which the two-process CPU test saw once after a successful run.
    """
    try:
        BDLCLI(args=list(args) if args is not None else None)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def console() -> None:
    """Entry point of the ``bdl`` console script: like :func:`main`, but bad input ends in a one-line message.

    A ``ValueError``, ``TypeError``, ``FileNotFoundError``, ``FloatingPointError`` or Lightning's
    ``MisconfigurationException`` (a wrong value, a missing data file or checkpoint, a training loss that
    stopped being finite, a trainer option this machine cannot run, such as ``accelerator: gpu``) prints ``bdl: error: <message>`` and exits with status 2, as the CLI's own argument errors
    do; set ``BDL_TRACEBACK=1`` to see the traceback instead.
    """
    try:
        main()
    except (ValueError, TypeError, FileNotFoundError, FloatingPointError, MisconfigurationException) as error:
        if os.environ.get("BDL_TRACEBACK"):
            raise
        # under DDP every process fails alike: the copies of other processes than 0 are labelled as theirs
        rank = getattr(rank_zero_only, "rank", 0) or 0
        print(f"bdl: error{f' (process {rank})' if rank else ''}: {_message(error)}", file=sys.stderr)
        sys.exit(2)


_SECTIONS = {"LightningModule": "model", "LightningDataModule": "data"}


def _message(error: BaseException, outer: str = "") -> str:
    """What went wrong, for one line: a class that a config named and that refused its arguments says so itself,
    after its config section (or, nested, its key in the enclosing class's arguments) and class path, instead of
    under jsonargparse's "Does not validate against any of the Union subtypes" and a dump of the whole resolved
    config. ``outer``: the enclosing level's text."""
    text, cause = str(error), error.__cause__
    if not (text.startswith("Does not validate against any of the Union subtypes") and isinstance(cause, (ValueError, TypeError))):
        return text
    subtypes = re.search(r"^Subtypes: (.*)$", text, flags=re.MULTILINE)
    section = next((name for base, name in _SECTIONS.items() if subtypes and f".{base}'>" in subtypes.group(1)), None)
    # the value this level refused (the first class path of the text was a nested one's: "model (bdl.ScaleMixturePrior)")
    given = re.search(r"^Given value: Namespace\(class_path='([\w.]+)'", text, flags=re.MULTILINE)
    class_path = given.group(1) if given else None
    if section is None and class_path:  # a nested class (a prior): its key among the enclosing class's arguments
        key = re.search(rf"(\w+)=Namespace\(class_path='{re.escape(class_path)}'", outer)
        section = key.group(1) if key else None
    where = " ".join(part for part in (section, f"({class_path})" if class_path else None) if part)
    return f"{where}: {_message(cause, text)}" if where else _message(cause, text)


if __name__ == "__main__":
    console()
