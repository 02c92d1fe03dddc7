"""LightningModules, one per way of being Bayesian, sharing one evaluation.

Every module trains its own way and evaluates the same way: validation logs ``val/accuracy``,
``val/nll`` and ``val/ece`` (``val/rmse`` and ``val/nll`` for regression) from a Monte Carlo
:class:`bdl.Prediction`; a test run predicts the test set (and the OOD set: the data module's second
test loader) with ``num_eval_samples`` samples, logs the headline metrics as ``test/<metric>`` and
writes the :func:`bdl.evaluate` report (``metrics.json``, ``report.md``, PNG plots) to the run folder.

- :class:`DeterministicModule`: the plain network (the baseline; one sample).
- :class:`VariationalModule`: Bayesian layers (converted with :func:`bdl.bayesianize` unless the network
  has them), trained on the ELBO with KL weight ``kl_weight / num_data`` and optional KL warm-up.
- :class:`MCDropoutModule`: trained with dropout, predicts through :class:`bdl.MCDropout`.
- :class:`EnsembleModule`: ``num_members`` copies of the network, re-initialised, trained jointly.
- :class:`SVIModule`: Pyro SVI (:class:`bdl.infer.SVIModule`) with the same evaluation.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import inspect
import math
import numbers
import warnings
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Optional, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from lightning.pytorch.utilities import GradClipAlgorithmType, rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import _restricted_classmethod
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, SubsetRandomSampler

from .. import infer
from ..evaluate import Report, evaluate
from ..infer.guides import collapsed_scales
from ..infer.svi_trainer import LoadsWithModel, _as_args, _ResumableRandomState, _steps_when_needed, ignored_hparams, stepping_batches
from ..nn.convert import bayesianize as convert_to_bayesian
from ..nn.convert import kl_divergence
from ..nn.functional import _two_class, check_estimator
from ..nn.heads import gaussian_nll
from ..nn.layers import BayesianModule
from ..nn.priors import Prior
from .._distributed import batch_counts, flat_loaders, raise_on_every_process, validation_batches
from .._messages import first_few
from .._tensors import RandomState, random_state, set_random_state
from .._warn import user_stacklevel
from ..nn.loss import check_trained_parameters, elbo_loss, non_finite_parameters, non_finite_where
from ..metrics.functional._checks import as_class_labels, check_positive_int, targets_like
from ..predict import Prediction, predict
from ..wrappers import DeepEnsemble, MCDropout

TASKS = ("classification", "regression")
LR_SCHEDULES = ("constant", "cosine")
OPTIMIZERS = infer.OPTIMIZERS
# Metrics of the report logged as test/<name> (those present for the task and data).
HEADLINE_METRICS = (
    "accuracy", "nll", "brier_score", "ece", "rmse", "crps", "interval_coverage_95",
    "ood/predictive_entropy/auroc", "ood/mutual_information/auroc", "ood/total_variance/auroc", "ood/epistemic_variance/auroc",
)  # fmt: skip



def _check_number(name: str, value: Any, *, minimum: float = 0.0, strict: bool = False) -> float:  # noqa: ANN401
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be a number {'>' if strict else '>='} {minimum}, got {value!r}")
    return float(value)


def _one_validation_loader(module: L.LightningModule, dataloader_idx: int) -> None:
    # Lightning asked for a dataloader_idx argument, and with one, the second loader's metrics were pooled with the
    # first's (val/nll 1.4865 logged for a loader whose own is 1.7522)
    if dataloader_idx:
        raise ValueError(
            f"{type(module).__name__} validates on one loader (its val/ metrics are one set), got a second: validate each "
            "set with trainer.validate(module, loader), or concatenate them (torch.utils.data.ConcatDataset)"
        )


def _split_batch(batch: Any) -> tuple[Tensor, Optional[Tensor]]:  # noqa: ANN401
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise TypeError(f"batches must be tensors or (inputs, targets) pairs, got {type(batch).__name__}")


def _check_finite(
    module: L.LightningModule, terms: dict[str, Tensor], details: Optional[dict[str, Tensor]] = None, guide: Optional[nn.Module] = None
) -> None:
    """Stop training at the first non-finite loss term, naming the step and the term(s) (e.g. the NLL or the KL),
    of ``details`` (parts of a term, such as an ensemble's members' NLLs) those that are not finite, and of a Pyro
    ``guide``'s scales those that collapsed to 0."""
    error = None
    if not bool(torch.isfinite(terms["loss"]).all()):
        terms = {**terms, **(details or {})}
        bad = [name for name, value in terms.items() if name != "loss" and not bool(torch.isfinite(value).all())]
        values = ", ".join(f"{name}={value.item():.4g}" for name, value in terms.items() if value.numel() == 1)
        error = FloatingPointError(
            f"non-finite training loss at epoch {module.current_epoch}, step {module.global_step}: "
            f"{' and '.join(name.upper() if name in ('nll', 'kl') else name for name in bad) or 'the loss'} "
            f"{'are' if len(bad) > 1 else 'is'} not finite "
            f"({values}); {non_finite_where(module, kl_too='kl' in bad, collapsed=collapsed_scales(guide) if guide is not None else ())}; "
            # Adam's 0/0 step writes NaN into parameters: without any, the cause is elsewhere (a NaN input, an overflow)
            + (non_finite_parameters(module) and _float16_adam(module)
               or "lower the learning rate, check the inputs for NaN/inf, or check the prior and posterior scales")
        )
    raise_on_every_process(module, error, "non-finite training loss")


def _float16_adam(module: L.LightningModule) -> Optional[str]:
    """The cause where an Adam-type optimiser steps float16 parameters (``precision="16-true"``): its ``eps`` and
    the second moments of small gradients are 0 in float16, so a step divides by 0 whatever the learning rate."""
    trainer = module._trainer
    for optimizer in trainer.optimizers if trainer is not None else ():
        for group in optimizer.param_groups:
            eps = group.get("eps")
            if eps is not None and "betas" in group and any(p.dtype == torch.float16 for p in group["params"]):
                if torch.tensor(eps, dtype=torch.float16).item() == 0:
                    return (
                        f"{type(optimizer).__name__} steps float16 parameters: its eps={eps:g} and the squared small "
                        "gradients are 0 in float16, so a step divides by 0 at any learning rate; use precision "
                        "'16-mixed' or 'bf16-mixed' (parameters in float32), or optimizer 'sgd'"
                    )
    return None


def _gather_rows(module: L.LightningModule, value: Tensor, total: Optional[int], dim: int = 0) -> Tensor:
    """Every process's rows (along ``dim``) of a test-set tensor, in the data set's order, without padding.

    With ``total`` (the data set's size, from an unshuffled ``DistributedSampler``) process ``r``'s ``k``-th
    row is row ``r + k * W`` of the data set, padded to a multiple of ``W`` processes by repeating its first
    rows (the test loop's sampler) or not (the predict loop's, which leaves the last processes a row short):
    interleaving the processes' rows restores the order, and the repeats or the short processes' fillers, at
    the end, are cut. Without it the processes' rows are concatenated, as they come.
    """
    counts = module.all_gather(torch.tensor(value.shape[dim], device=value.device)).reshape(-1)
    most = int(counts.max())
    if value.shape[dim] < most:  # all_gather needs one shape: fill up to the longest process's rows
        filler = value.new_zeros((*value.shape[:dim], most - value.shape[dim], *value.shape[dim + 1 :]))
        value = torch.cat([value, filler], dim)
    gathered = module.all_gather(value)  # [W, *value.shape]
    if total is None:
        if bool((counts != most).any()):
            raise ValueError("the processes hold different numbers of rows, and without the data set's size their order is unknown")
        return gathered.movedim(0, dim).flatten(dim, dim + 1)
    interleaved = gathered.movedim(0, dim + 1).flatten(dim, dim + 1)  # rows k * W + r
    # fewer rows than the data set under limit_test_batches: a prefix of it, the repeats only at its end
    return interleaved.narrow(dim, 0, min(total, int(counts.sum())))


def _gather_prediction(module: L.LightningModule, prediction: Prediction, total: Optional[int]) -> Prediction:
    """The prediction over every process (:func:`_gather_rows` of each tensor field)."""
    values = {}
    for field in dataclasses.fields(prediction):
        value = getattr(prediction, field.name)
        if isinstance(value, Tensor):  # per-sample fields are [S, N, ...]: their rows are dim 1
            value = _gather_rows(module, value, total, dim=1 if field.name.startswith("sample_") else 0)
        values[field.name] = value
    return dataclasses.replace(prediction, **values)


def _loader_at(loaders: Any, index: int) -> Any:  # noqa: ANN401 - a loader, or a list/tuple/dict of them
    """The ``index``-th loader, in the order Lightning numbers them (``dataloader_idx``; None where there is none)."""
    loaders = flat_loaders(loaders)
    return loaders[index] if index < len(loaders) else None


def _storable_patterns(patterns: Any) -> Any:  # noqa: ANN401 - None, a pattern or a sequence of them
    """Layer patterns (``include``, ``exclude``, ``insert_before``) as a checkpoint's hyperparameters can keep them:
    module types as ``{"module": ..., "type": ...}`` (a type is pickled as a global, which ``torch.load`` with
    ``weights_only=True``, its default, refuses); :func:`_loaded_patterns` turns them back."""
    if patterns is None or isinstance(patterns, str):
        return patterns
    if isinstance(patterns, type):
        patterns = [patterns]
    return [{"module": p.__module__, "type": p.__qualname__} if isinstance(p, type) else p for p in patterns]


def _loaded_patterns(patterns: Any) -> Any:  # noqa: ANN401
    """:func:`_storable_patterns`' module types imported again."""
    if patterns is None or isinstance(patterns, (str, type)):
        return patterns
    loaded = []
    for pattern in patterns:
        if isinstance(pattern, dict) and set(pattern) == {"module", "type"}:
            found: Any = importlib.import_module(pattern["module"])
            for part in pattern["type"].split("."):
                found = getattr(found, part, None)
            if not isinstance(found, type):
                raise ValueError(f"layer pattern {pattern!r}: no class {pattern['type']!r} in module {pattern['module']!r}")
            pattern = found
        loaded.append(pattern)
    return loaded


def _storable_prior(prior: Optional[Prior]) -> Optional[dict[str, Any]]:
    """A prior as a checkpoint's hyperparameters (and a config) keep it: ``{"class_path": ..., "init_args": ...}``,
    its constructor's arguments read from its attributes of the same names (numbers and strings; a module would be
    pickled, which ``torch.load(weights_only=True)`` refuses); :func:`_loaded_prior` builds it again."""
    if prior is None:
        return None
    init_args = {}
    for name, parameter in inspect.signature(type(prior).__init__).parameters.items():
        if name == "self" or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        value = getattr(prior, name, None)
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.item()
        if not isinstance(value, (numbers.Real, str)):
            raise TypeError(
                f"VariationalModule: prior {prior!r} cannot be kept among the checkpoint's hyperparameters: its argument "
                f"{name!r} is not an attribute holding a number (got {type(value).__name__}); give every converted layer "
                "one prior of numbers, or convert the network yourself (bdl.bayesianize(net, prior=...)) and pass that"
            )
        init_args[name] = value
    return {"class_path": f"{type(prior).__module__}.{type(prior).__qualname__}", "init_args": init_args}


def _loaded_prior(prior: Any) -> Optional[Prior]:  # noqa: ANN401 - a Prior, None or its stored form
    """A :class:`bdl.Prior` from one given, or from :func:`_storable_prior`'s form (a checkpoint's, a config's)."""
    if prior is None or isinstance(prior, Prior):
        return prior
    if isinstance(prior, Mapping) and set(prior) <= {"class_path", "init_args"} and isinstance(prior.get("class_path"), str):
        module_name, _, class_name = prior["class_path"].rpartition(".")
        try:
            found = getattr(importlib.import_module(module_name or "bdl"), class_name, None)
        except ImportError:
            found = None
        if found is None:  # a checkpoint's prior defined in another script's __main__
            raise TypeError(
                f"prior: class {prior['class_path']!r} cannot be imported here: import its module first, or pass the "
                "prior itself (load_from_checkpoint(path, ..., prior=MyPrior(...)))"
            )
        if isinstance(found, type) and issubclass(found, Prior):  # not any class a checkpoint names
            try:
                return found(**prior.get("init_args", {}))
            except TypeError as error:  # "__init__() got an unexpected keyword argument 'scale3'"
                raise TypeError(f"prior ({prior['class_path']}): {error}") from None
    raise TypeError(
        "prior must be a bdl Prior (e.g. bdl.ScaleMixturePrior(1.0, 0.0025, 0.5)), or in a config its class_path and "
        f"init_args, got {prior!r}"
    )


def _own_rows(loader: Any, rank: int, world_size: int, seen: int, rows: int) -> int:  # noqa: ANN401
    """How many of a batch's ``rows`` on process ``rank`` are the data set's own, after ``seen`` rows before it:
    a ``DistributedSampler`` gives process ``r`` the positions ``r, r + W, ...`` of its order (shuffled or not)
    padded by repeating its first entries to a multiple of ``W``, so process ``r`` owns its first
    ``ceil((N - r) / W)`` rows (all, for another sampler)."""
    total = _unpadded_size(loader, shuffled=True)
    if total is None or world_size <= 1:
        return rows
    own = -(-(total - rank) // world_size)
    return max(0, min(rows, own - seen))


def _unpadded_size(loader: Any, shuffled: bool = False) -> Optional[int]:  # noqa: ANN401
    """The data set size behind a loader whose unshuffled (or, with ``shuffled``, any) ``DistributedSampler``
    splits it without dropping rows (else None): the loader's sampler in the test loop; in the predict loop its
    batch sampler's (Lightning keeps the loader's own sampler there and splits the batches)."""
    for sampler in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if isinstance(sampler, DistributedSampler) and (shuffled or not sampler.shuffle) and not sampler.drop_last:
            return len(sampler.dataset)
    return None


def _check_one_order(module: L.LightningModule, loader: Any, what: str) -> None:  # noqa: ANN401
    """Raise where the processes drew different orders from a loader's own sampler (call on every process).

    Under DDP Lightning wraps a sampler of the loader's own (``DistributedSamplerWrapper``) and every process
    lists it: a random one (a ``SubsetRandomSampler`` without a common seed) gave each process another order,
    and the rows were split among them as if it were one, some counted twice and others not at all, silently."""
    for sampler in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        wrapped = getattr(sampler, "dataset", None)
        order = getattr(wrapped, "_sampler_list", None)  # Lightning's _DatasetSamplerWrapper, listed this pass
        if order is not None:
            break
    else:
        return
    try:
        digest = zlib.crc32(torch.as_tensor(order, dtype=torch.int64).numpy().tobytes())
    except (TypeError, ValueError, RuntimeError):  # not integer indices
        digest = zlib.crc32(repr(order).encode())
    digests = module.all_gather(torch.tensor(digest, dtype=torch.int64, device=module.device)).reshape(-1)
    if not bool((digests == digests[0]).all()):
        raise ValueError(
            f"the {what}'s {type(wrapped._sampler).__name__} gave the processes different orders (a random "
            "sampler without a common seed), so its rows would be split as if they were one order: some counted "
            "twice, others dropped; seed every process alike (lightning.seed_everything) before the loader is made, "
            "give the loader a sampler of fixed order, or evaluate on one process"
        )


def _warn_if_steps_round_away(trainer: L.Trainer) -> None:
    """Warn where trained half-precision parameters (``precision="bf16-true"``/``"16-true"``) are too large for
    their optimiser's steps: an Adam step of about ``lr`` below half their spacing rounds back, every step. A
    posterior std's rho near log(1e-3) = -6.9 is 0.031 apart in bfloat16: at lr 3e-3 the stds never trained, and
    SVI's guide scales neither, with no word of why."""
    frozen, trained = [], 0
    names = {id(parameter): name for name, parameter in trainer.lightning_module.named_parameters()}
    peaks: dict[int, float] = {}  # CyclicLR keeps its peaks on itself, one per group
    for config in getattr(trainer, "lr_scheduler_configs", None) or ():
        for group, peak in zip(config.scheduler.optimizer.param_groups, getattr(config.scheduler, "max_lrs", ())):
            peaks[id(group)] = float(peak)
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            # the largest rate the schedule reaches (a warm-up starts far below it: LinearLR, OneCycleLR, CyclicLR)
            lr = max([float(group.get(key) or 0) for key in ("lr", "initial_lr", "max_lr")] + [peaks.get(id(group), 0.0)])
            if not lr > 0:  # nothing moves at 0 anyway
                continue
            for parameter in group["params"]:
                dtype = parameter.dtype
                if not parameter.requires_grad or dtype not in (torch.float16, torch.bfloat16) or not parameter.numel():
                    continue
                trained += 1
                # above the smallest power of two whose spacing (2^k eps) is over 2 lr, a step either way rounds
                # back (at a power of two itself the spacing below is half: 1.0 moves down at 3e-3 in bfloat16)
                threshold = 2.0 ** math.ceil(math.log2(2 * lr / torch.finfo(dtype).eps))
                while threshold * torch.finfo(dtype).eps / 2 <= lr:
                    threshold *= 2
                if int(torch.count_nonzero(parameter.detach().abs() > threshold)) > parameter.numel() / 2:
                    frozen.append(names.get(id(parameter), f"a {tuple(parameter.shape)} parameter"))
    if frozen:
        rank_zero_warn(
            f"{len(frozen)} of the {trained} trained {str(trainer.precision)} parameter tensors (e.g. {', '.join(frozen[:3])}) "
            "hold values whose spacing in their half-precision dtype is more than twice the learning rate: each "
            "optimiser step of about lr rounds back, so they stay as initialised (posterior stds' rho, guide scales); "
            "use precision 'bf16-mixed' (parameters in float32)",
            category=UserWarning,
        )


class _Evaluation:
    """Validation metrics, the test report and ``predict_step``, for any module with :meth:`sample_prediction`.

    Mixed into LightningModules; expects ``task``, ``num_eval_samples``, ``num_val_samples`` and ``n_bins``.
    """

    task: str
    num_eval_samples: Optional[int]
    num_val_samples: Optional[int]
    n_bins: int
    save_report: bool = True
    report: Optional[Report] = None

    def setup(self, stage: str) -> None:
        # a regression module on class labels failed deep in a reshape ("shape '[64, 8]' is invalid")
        datamodule = running_datamodule(self.trainer)
        task = getattr(datamodule, "task", None)
        if task in TASKS and task != self.task:  # another vocabulary ("multiclass") is the data module's own
            raise ValueError(
                f"the model's task is {self.task!r} but {type(datamodule).__name__}'s is {task!r}: set the model's task "
                f"(model.init_args.task, or the likelihood of an SVI model) to {task!r}"
            )
        if stage in ("validate", "test") and self.trainer.world_size > 1:
            # beside Lightning's advice to validate or test on one device (its DistributedSampler repeats rows to pad
            # the processes' shares), which read as if bdl's metrics were off: they are not (a filter that hid the
            # advice stayed installed after a failed test, and hid it from a subclass's own per-process metrics)
            rank_zero_info(
                f"bdl: {type(self).__name__}'s {getattr(stage, 'value', stage)} metrics leave out the rows Lightning's DistributedSampler repeats "
                "to pad the processes' shares (each input counts once); metrics a subclass logs itself do not"
            )

    def _setup_metrics(self) -> None:
        from .. import metrics as M

        if self.task == "classification":
            self.val_metrics = nn.ModuleDict(
                {"accuracy": torchmetrics.MeanMetric(), "nll": M.NLL(), "ece": M.ECE(n_bins=self.n_bins)}
            )
        else:
            self.val_metrics = nn.ModuleDict({"rmse": torchmetrics.MeanSquaredError(squared=False), "nll": M.GaussianNLL()})

    def sample_prediction(self, x: Tensor, num_samples: Optional[int]) -> Prediction:
        """A Monte Carlo :class:`bdl.Prediction` for the inputs ``x`` (``num_samples`` None: the method's default)."""
        raise NotImplementedError

    def _labels(self, y: Tensor) -> Tensor:
        """Classification targets as the metrics take them: whole-number floats (a Bernoulli likelihood trains on
        0./1. labels, as binary cross-entropy does) become integer labels ``[B]``; anything else is left to the
        metrics' checks."""
        return as_class_labels(y) if self.task == "classification" else y

    def on_validation_epoch_start(self) -> None:
        self._val_rows_seen = 0
        self._val_error = None
        # Lightning's bf16-true/16-true cast the module with .to(dtype), which torchmetrics lets through to the
        # metrics' states: bfloat16 counts stop at 256 (val/accuracy of 216 inputs read 0.848 for 183 right)
        wide = torch.float32 if self.device.type == "mps" else torch.float64  # MPS has no float64
        for metric in self.modules():
            if isinstance(metric, torchmetrics.Metric):
                metric.set_dtype(wide)

    def _own_val_rows(self, rows: int) -> int:
        """How many of this validation batch's ``rows`` are not the repeats Lightning's sampler adds to give every
        process as many (under DDP an odd-sized validation set counted them; they choose best.ckpt): the first
        ones. Call once per batch: it counts the rows seen."""
        trainer = self._trainer
        if trainer is None or trainer.world_size <= 1:
            return rows
        loader = _loader_at(getattr(trainer, "val_dataloaders", None), 0)
        seen = getattr(self, "_val_rows_seen", 0)
        self._val_rows_seen = seen + rows
        return _own_rows(loader, trainer.global_rank, trainer.world_size, seen, rows)

    def _unpadded(self, prediction: Prediction, y: Tensor, keep: Optional[int] = None) -> tuple[Optional[Prediction], Tensor]:
        """The batch without the sampler's repeats (``keep``: :meth:`_own_val_rows`, if already counted); None
        when it holds only repeats."""
        keep = self._own_val_rows(len(y)) if keep is None else keep
        if keep == len(y):
            return prediction, y
        return (prediction[:keep] if keep else None), y[:keep]

    def _update_val_metrics(self, prediction: Prediction, y: Tensor, keep: Optional[int] = None) -> None:
        unpadded, y = self._unpadded(prediction, y, keep)
        if unpadded is None:  # only repeats: nothing to add
            return
        metrics, error = self.val_metrics, None
        if self.task == "classification":
            prediction = unpadded
            y = self._labels(y)
            metrics["accuracy"].update((prediction.predicted_class == y).float())
            metrics["nll"].update(prediction.probs, y)
            metrics["ece"].update(prediction.probs, y)
        else:
            prediction = unpadded
            y = targets_like(y, prediction.mean, "targets")
            metrics["rmse"].update(prediction.mean, y)
            variance = prediction.total_variance
            positive = variance > 0
            if bool(positive.all()):
                metrics["nll"].update(prediction.mean, variance, y)
                if not bool(torch.isfinite(metrics["nll"].total)):  # a variance so small that the NLL overflows
                    error = self._non_finite("validation", "the Gaussian NLL is infinite: a predicted variance is too small for the error")
            elif bool(positive.any()):  # a mean-only model predicts 0 everywhere; some zeros are an underflow
                zeros = int((~positive).sum())
                error = self._non_finite("validation", f"the predicted variance is 0 for {zeros} of {variance.numel()} outputs (its NLL infinite)")
        if error is not None:
            raise error

    def _run_validation_batch(self, batch_idx: int, step: Callable[[], None]) -> None:
        """Run one validation batch's ``step``, then log the metrics; under DDP stop every process if one failed.

        Under DDP an error of one process's batch (a non-finite prediction, a bad target) waits for that process's
        last batch, the rest of its batches skipped, and is raised there on every process, in the one collective
        of the pass: a process that raised at once left the others waiting in their next collective, and a
        collective in every batch hung where the processes hold different numbers of batches (a sampler of the
        loader's own). A loader of no length has no known last batch: a collective in every batch, as before.
        """
        trainer = self._trainer
        distributed = trainer is not None and trainer.world_size > 1
        if batch_idx == 0:  # as on_validation_epoch_start, which a subclass may override without calling super
            self._val_rows_seen, self._val_error = 0, None
            for metric in self._val_metric_objects():  # a pass that failed before its end left its updates
                metric.reset()
            if distributed:  # the pass's order has just been drawn; a collective, before any step can fail
                try:
                    _check_one_order(self, _loader_at(getattr(trainer, "val_dataloaders", None), 0), "validation loader")
                except ValueError as error:
                    self._val_error = error
        if getattr(self, "_val_error", None) is None:
            try:
                step()
            except Exception as error:
                if not distributed:
                    raise
                self._val_error = error
        batches = validation_batches(self)
        if distributed and batch_idx + 1 < batches < math.inf:
            return
        error, self._val_error = getattr(self, "_val_error", None), None
        raise_on_every_process(self, error, "validation failed")
        # a metric no process has updated is left out (a mean-only regressor with no variance has no predictive NLL);
        # every process logs the same ones: with a validation set smaller than the number of processes, a process
        # holding only the sampler's repeats logged none, and the others waited for it in the metrics' synchronisation
        # for ever
        metrics = self.val_metrics
        updated = [metric.update_count > 0 for metric in metrics.values()]
        if distributed:
            flags = torch.tensor(updated, dtype=torch.float32, device=self.device)
            updated = (trainer.strategy.reduce(flags, reduce_op="sum") > 0).tolist()
        for (name, metric), logged in zip(metrics.items(), updated):
            if logged:
                self.log(f"val/{name}", metric, on_step=False, on_epoch=True, prog_bar=name in ("accuracy", "rmse"))

    def _val_metric_objects(self) -> list[torchmetrics.Metric]:
        return list(self.val_metrics.values())

    def _non_finite(self, stage: str, what: str) -> FloatingPointError:
        return FloatingPointError(
            f"non-finite {stage} metric at epoch {self.current_epoch}, step {self.global_step}: {what}; a variance head "
            "needs a floor (e.g. GaussianHead(min_variance=1e-6))"
        )

    @contextlib.contextmanager
    def _naming_batch(self, stage: str, batch_idx: int) -> Iterator[None]:
        """A ValueError of a batch's targets (a NaN, a label out of range) with the stage, epoch and batch: it named
        neither."""
        try:
            yield
        except ValueError as error:
            raise ValueError(f"{stage} at epoch {self.current_epoch}, batch {batch_idx} of the {stage} loader: {error}") from error

    def _checked_prediction(self, x: Tensor, num_samples: Optional[int], stage: str, batch_idx: int, dataloader_idx: int = 0) -> Prediction:
        """:meth:`sample_prediction`, with a non-finite output reported with the stage, epoch, step and batch."""
        prediction, failure = None, None
        try:
            prediction = self.sample_prediction(x, num_samples)
        except ValueError as error:
            if "non-finite" not in str(error):
                raise
            # the rows predict names are the batch's (row 5 of batch 2 was "rows [5] of the inputs")
            loader = ("the test loader", "the OOD loader")[dataloader_idx == 1] if stage == "test" else (
                f"{stage} loader {dataloader_idx}" if dataloader_idx else f"the {stage} loader"
            )
            message = str(error).replace("of the inputs", "of that batch").replace("in the order the loader gave them", "of that batch")
            failure = FloatingPointError(
                f"non-finite prediction in {stage} at epoch {self.current_epoch}, step {self.global_step}, in batch "
                f"{batch_idx} of {loader}: {message}"
            )
        if failure is not None:  # validation and test raise it on every process at the pass's end
            raise failure
        assert prediction is not None  # no failure
        datamodule = running_datamodule(self._trainer)
        classes = getattr(datamodule, "num_classes", None) if self.task == "classification" else None
        if isinstance(classes, int) and prediction.probs.shape[-1] != classes:
            # the NLL trains such a network without complaint, with probability on classes the data never has
            raise ValueError(
                f"the network outputs {prediction.probs.shape[-1]} class scores but {type(datamodule).__name__} has "
                f"{classes} classes (num_classes, held-out OOD classes excluded): set the network's output size to {classes}"
            )
        return prediction

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:  # noqa: ANN401
        _one_validation_loader(self, dataloader_idx)
        self._run_validation_batch(batch_idx, lambda: self._validate(batch, batch_idx))

    def _validate(self, batch: Any, batch_idx: int) -> None:  # noqa: ANN401
        x, y = _split_batch(batch)
        _check_val_targets(y)
        prediction = self._checked_prediction(x, self.num_val_samples, "validation", batch_idx)
        with self._naming_batch("validation", batch_idx):
            self._update_val_metrics(prediction, y)

    def on_test_epoch_start(self) -> None:
        self._test_outputs: dict[int, list[tuple[Prediction, Optional[Tensor], Optional[Tensor]]]] = defaultdict(list)
        self._test_error: Optional[Exception] = None
        self._test_random_state: Optional[RandomState] = None
        self._random_state_after_test: Optional[RandomState] = None

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:  # noqa: ANN401
        """Predict a test (``dataloader_idx`` 0) or OOD (1) batch; the report is made at the test's end.

        Under DDP an error of one process's batch waits for that process's last batch, and is raised there on every
        process (see :meth:`_run_validation_batch`)."""
        trainer = self._trainer
        distributed = trainer is not None and trainer.world_size > 1
        if batch_idx == 0 and dataloader_idx == 0:  # as on_test_epoch_start, which a subclass may override
            self._test_error = None
        if getattr(self, "_test_error", None) is None:
            try:
                self._test_batch(batch, batch_idx, dataloader_idx)
            except Exception as error:
                if not distributed:
                    raise
                self._test_error = error
        if distributed:
            counts = batch_counts(trainer, "test")
            last = max((index for index, count in enumerate(counts) if count), default=0)
            if math.inf in counts or (dataloader_idx == last and batch_idx + 1 == counts[last]):
                error, self._test_error = getattr(self, "_test_error", None), None
                raise_on_every_process(self, error, "test failed")

    def _test_batch(self, batch: Any, batch_idx: int, dataloader_idx: int) -> None:  # noqa: ANN401
        if dataloader_idx > 1:  # predicted, then left out of the report
            raise ValueError(
                f"{type(self).__name__} tests on a test loader and an optional OOD loader, got a third: test each OOD set "
                "in a run of its own, or concatenate them (torch.utils.data.ConcatDataset)"
            )
        x, y = _split_batch(batch)
        if batch_idx == 0:  # common random numbers, as bdl.evaluate draws them: the OOD loader's batch k compares with
            if dataloader_idx == 0:  # the test loader's under the same draws (a batch's weight samples are shared)
                self._test_random_state = random_state()
            elif getattr(self, "_test_random_state", None) is not None:  # and given back after (as predict's blocks)
                self._random_state_after_test = random_state()
                set_random_state(self._test_random_state)
        prediction = self._checked_prediction(x, self.num_eval_samples, "test", batch_idx, dataloader_idx)
        one_dimensional = x.dim() == 2 and x.shape[1] == 1  # kept for the 1-D regression figure
        # (the OOD loader's targets are never read: not judged either, as image ids in bfloat16 were)
        with self._naming_batch("test", batch_idx):
            labels = None if y is None or dataloader_idx == 1 else self._labels(y)
        self._test_outputs[dataloader_idx].append((prediction, labels, x if one_dimensional else None))

    def _collect(self, index: int) -> tuple[Optional[Prediction], Optional[Tensor], Optional[Tensor]]:
        parts = self._test_outputs.get(index)
        if not parts:
            return None, None, None
        prediction = Prediction.cat([part[0] for part in parts])
        targets = torch.cat([part[1] for part in parts]) if all(part[1] is not None for part in parts) else None
        inputs = torch.cat([part[2] for part in parts]) if all(part[2] is not None for part in parts) else None
        if self.trainer.world_size > 1:
            loaders = self.trainer.test_dataloaders
            loader = _loader_at(loaders, index)
            # Lightning's DistributedSampler pads the test set to a multiple of the processes: cut the repeats
            total = _unpadded_size(loader)
            if total is None:  # concatenated as they come, repeats and all (each input twice without a sampler)
                sampler = getattr(loader, "sampler", None)
                shuffled = isinstance(sampler, DistributedSampler) and sampler.shuffle
                raise ValueError(
                    f"test loader {index} " + ("is shuffled (a DistributedSampler with shuffle=True)" if shuffled else
                    f"has a {type(sampler).__name__}, not Lightning's unshuffled DistributedSampler") + ": the processes' "
                    "rows cannot be put back in order without repeats; keep use_distributed_sampler on and the test "
                    "loader unshuffled, or test on one process"
                )  # fmt: skip
            _check_one_order(self, loader, f"test loader {index}")
            prediction = _gather_prediction(self, prediction, total)
            targets = None if targets is None else _gather_rows(self, targets, total)
            inputs = None if inputs is None else _gather_rows(self, inputs, total)
        return prediction.to("cpu"), None if targets is None else targets.cpu(), None if inputs is None else inputs.cpu()

    def on_test_epoch_end(self) -> None:
        after = getattr(self, "_random_state_after_test", None)
        if after is not None:  # the generator as the test loader left it: draws after the test do not repeat the OOD's
            set_random_state(after)
            self._random_state_after_test = None
        prediction, targets, inputs = self._collect(0)
        if prediction is None or targets is None:
            raise ValueError("the test loader must give (inputs, targets) batches to evaluate the model")
        ood_prediction, _, ood_inputs = self._collect(1)
        test_data = (inputs, targets) if inputs is not None else targets
        self.report = evaluate(prediction, test_data, ood_data=ood_prediction, n_bins=self.n_bins)
        self.report.ood_inputs = ood_inputs  # for the 1-D regression figure (a ready Prediction does not carry them)
        _note_target_scale(self.report, target_scale(self.trainer))
        self._test_outputs.clear()
        headline = {f"test/{key}": value for key in HEADLINE_METRICS if (value := self.report.metrics.get(key)) is not None}
        # the same values in every process: Lightning warned at each key without sync_dist; their max is exact, where
        # a mean (a sum, then / 3) moved some by a rounding step
        self.log_dict(headline, sync_dist=True, reduce_fx="max")
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # every process: log_dir broadcasts
        # without a logger (logger=False, or fast_dev_run, a smoke test that Lightning gives none) there is no run
        # folder, and the report went to the working directory: module.report holds it
        self.report_dir = None  # not an earlier test's folder
        if (
            self.save_report
            and self.trainer.loggers
            and self.trainer.is_global_zero
            and not self.trainer.sanity_checking
            and not self.trainer.fast_dev_run
        ):
            self.report.save(folder)
            self.report_dir = folder
        elif self.save_report and not self.trainer.loggers and not self.trainer.fast_dev_run and not self.trainer.sanity_checking:
            rank_zero_info(
                "bdl: the trainer has no logger, so the test report is written to no folder; module.report holds it (in the "
                "process that tested: under ddp_spawn not the calling one)"
            )

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Prediction:  # noqa: ANN401
        """A :class:`bdl.Prediction` per batch (merge them with ``Prediction.cat``)."""
        x, _ = _split_batch(batch)
        return self._checked_prediction(x, self.num_eval_samples, "predict", batch_idx, dataloader_idx)


def running_datamodule(trainer: Optional[L.Trainer]) -> Optional[L.LightningDataModule]:
    """The data module of the trainer's running call (fit, validate, test, predict), or None where it was given
    loaders: ``trainer.datamodule`` is the last one any call was given, which Lightning keeps (a fit on a 50-row
    loader after a validate on a data module scaled its KL by the other data set's size, 650)."""
    selector = getattr(getattr(trainer, "_data_connector", None), "_datahook_selector", None)
    return getattr(selector, "datamodule", None)


def target_scale(trainer: L.Trainer) -> Optional[tuple[float, float]]:
    """``(mean, std)`` the data module of the running call standardised the regression targets with (one number
    each, ``target_mean``/``target_std``, as :class:`bdl.lightning.SklearnRegressionDataModule` gives), else None:
    the report's numbers are in its units."""
    data = running_datamodule(trainer)  # a report on raw targets claimed an earlier call's standardisation
    mean, std = (_one_number(getattr(data, name, None)) for name in ("target_mean", "target_std"))
    if mean is None or std is None or not std > 0:  # none, or one per output (not a single scale)
        return None
    return mean, std


def _one_number(value: Any) -> Optional[float]:  # noqa: ANN401
    """``value`` as a float if it is one finite real number (a 1-element tensor or array too), else None."""
    if isinstance(value, Tensor):
        value = value.item() if value.numel() == 1 else None
    elif isinstance(value, np.ndarray):
        value = value.item() if value.size == 1 else None
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _note_target_scale(report: Report, scale: Optional[tuple[float, float]]) -> None:
    if scale is None or report.task != "regression":
        return
    mean, std = scale
    report.settings.update(target_mean=mean, target_std=std)  # metrics.json: the way back to the original units
    report.notes.append(
        f"targets are standardised with the training rows' mean {mean:.6g} and std {std:.6g}: in the original units "
        f"RMSE, MAE, CRPS and interval widths are {std:.6g} times these, variances {std**2:.6g} times, and the NLL is {math.log(std):+.4g} "
        "from these (+ log std)"
    )


class UncertaintyModule(LoadsWithModel, _ResumableRandomState, _Evaluation, L.LightningModule):
    """Base of the network-based methods: the optimiser, the data-fit term and the shared evaluation.

    Subclasses define :meth:`training_loss` and, where prediction is not the network itself,
    :attr:`predictive_model`. The data-fit term is the per-example negative log-likelihood: cross-entropy
    of logits for classification; for regression the Gaussian NLL of the network's ``(mean, variance)``
    output (e.g. from :class:`bdl.GaussianHead`), or of a mean output with a fixed ``noise_variance``.

    Args:
        model: the network, any ``nn.Module`` (class path and init args in a config).
        task: ``"classification"`` (the network gives logits) or ``"regression"``.
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"`` (with ``momentum``).
        lr: learning rate, > 0.
        weight_decay: weight decay of the optimiser, >= 0; not applied to Bayesian layers' ``*_rho`` (their
            posterior stds), which it would pull towards 1.
        momentum: momentum of SGD.
        lr_schedule: ``"constant"`` or ``"cosine"`` (annealed to 0 over the run, per step).
        num_eval_samples: Monte Carlo samples per test/predict input (None: the method's default).
        num_val_samples: Monte Carlo samples per validation input (None: the method's default).
        n_bins: bins of the calibration metrics.
        save_report: write the test report (``metrics.json``, ``report.md``, PNG plots) to the run folder (the
            logger's; a trainer without a logger writes none); ``module.report`` holds it either way.
        noise_variance: the Gaussian noise variance of a regression network that outputs means only (its
            likelihood in training, and the aleatoric variance of its predictions): a number > 0, or
            ``"learn"`` to fit it with the network (one variance for every output, the parameter
            ``log_noise_variance``, shared by an ensemble's members: standardise targets of unlike scales, or
            give the network a :class:`bdl.GaussianHead` for a variance per output and input). Learned beside
            weight samples (Bayesian layers, MC dropout), it takes in their spread too, which predictions count
            again as epistemic variance. None: 1.0, with a warning when such a network starts training (its NLL,
            intervals and ``val/nll`` assume that noise).
        compile: compile the network with ``torch.compile`` (in place, ``nn.Module.compile``: checkpoints
            keep their keys); ``True`` for torch's defaults or a dict of ``torch.compile`` options such as
            ``{"mode": "max-autotune"}``. Measured on an H100 for a Bayesian 784-1200-1200-10 MLP at batch
            128: no gain in a Lightning fit (7.5 ms per step compiled, 6.1-8.1 ms eager; Lightning's own
            per-step work and the eager KL and optimizer dominate at that size), although compiling the
            whole loss outside Lightning took the bare step from 4.7 to 3.1 ms; on a CPU compiling made
            steps slower (README, "torch.compile"). Larger convolutional networks are not measured yet.

    Example:
        >>> class Plain(UncertaintyModule):  # what a method adds: its training loss
        ...     def training_loss(self, x, y):
        ...         nll = self.nll(self.model(x), y)
        ...         return {"loss": nll, "nll": nll}
        >>> module = Plain(nn.Linear(4, 3), lr=1e-2)
        >>> module.sample_prediction(torch.randn(5, 4), 1).probs.shape
        torch.Size([5, 3])
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        task: Literal["classification", "regression"] = "classification",
        optimizer: Literal["adam", "adamw", "sgd"] = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        num_eval_samples: Optional[int] = 32,
        num_val_samples: Optional[int] = 8,
        n_bins: int = 15,
        save_report: bool = True,
        noise_variance: float | Literal["learn"] | None = None,
        compile: bool | dict[str, Any] = False,  # noqa: A002 - the name torch and Lightning users know
    ) -> None:
        super().__init__()
        if not isinstance(compile, (bool, dict)):
            raise TypeError(f"compile must be true, false or a dict of torch.compile options, got {compile!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
        self.task = task
        self.optimizer_name = optimizer
        self.lr = _check_number("lr", lr, strict=True)
        self.weight_decay = _check_number("weight_decay", weight_decay)
        self.momentum = _check_number("momentum", momentum)
        if self.momentum >= 1:  # SGD's velocity would grow without bound
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.lr_schedule = lr_schedule
        self.num_eval_samples = None if num_eval_samples is None else check_positive_int(num_eval_samples, "num_eval_samples")
        self.num_val_samples = None if num_val_samples is None else check_positive_int(num_val_samples, "num_val_samples")
        self.n_bins = check_positive_int(n_bins, "n_bins")
        self.save_report = bool(save_report)
        self._noise_variance_given = noise_variance is not None
        # a number was ignored silently; 1.0 is what modules saved before noise_variance could be unset kept
        if (isinstance(noise_variance, bool) or noise_variance not in (None, 1.0)) and task != "regression":
            raise ValueError(f"noise_variance={noise_variance!r} is for task='regression' (a mean-only network's noise), got task={task!r}")
        if noise_variance == "learn":
            self.log_noise_variance = nn.Parameter(torch.zeros(()))
        elif isinstance(noise_variance, str):
            raise ValueError(f"noise_variance must be a number > 0 or 'learn', got {noise_variance!r}")
        else:
            self._fixed_noise_variance = _check_number("noise_variance", 1.0 if noise_variance is None else noise_variance, strict=True)
        bayesian = [  # trained ones (a frozen layer's stds stay as they are)
            name or type(module).__name__
            for name, module in model.named_modules()
            if isinstance(module, BayesianModule) and any(p.requires_grad for p in module.parameters())
        ]
        if bayesian and type(self).training_loss in _NLL_ONLY_LOSSES:  # their stds fit the data alone, drawn at every forward
            warnings.warn(
                f"{type(self).__name__}: the network has Bayesian layers ({first_few(bayesian)}), which it trains on the "
                "NLL alone, without their KL to the prior: use VariationalModule for a Bayesian network",
                stacklevel=user_stacklevel(),
            )
        self.model = model
        if compile is not False:
            model.compile(**({} if compile is True else compile))
        self.save_hyperparameters(ignore=ignored_hparams(["model"]))
        self._setup_metrics()

    # ------------------------------------------------------------------ what subclasses define
    def on_fit_start(self) -> None:
        super().on_fit_start()
        _warn_if_steps_round_away(self.trainer)

    def on_train_end(self) -> None:
        check_trained_parameters(self)  # a last step whose loss was finite and whose gradient was not

    @property
    def predictive_model(self) -> nn.Module:
        """What :func:`bdl.predict` samples from (the network by default)."""
        return self.model

    def training_loss(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """``{"loss": ..., "nll": ..., ...}`` for one training batch; every entry is logged as ``train/<key>``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared
    @property
    def noise_variance(self) -> Tensor | float:
        """The noise variance of a mean-only regression network: the learned one (a tensor with its gradient)
        for ``noise_variance="learn"``, else the number given."""
        if hasattr(self, "log_noise_variance"):
            return self.log_noise_variance.exp()
        return self._fixed_noise_variance

    @noise_variance.setter
    def noise_variance(self, value: float) -> None:
        if self.task != "regression":  # kept in hparams, it made the module unbuildable from them
            raise ValueError(f"noise_variance is for task='regression' (a mean-only network's noise), this module's task is {self.task!r}")
        value = _check_number("noise_variance", value, strict=True)
        if hasattr(self, "log_noise_variance"):  # a learned one starts from there
            with torch.no_grad():
                self.log_noise_variance.fill_(math.log(value))
        else:  # kept by checkpoints too (a load had 1.0 again), and set: no warning of the default
            self._fixed_noise_variance = value
            self._noise_variance_given = True
            if "noise_variance" in self.hparams:
                self.hparams["noise_variance"] = value

    def forward(self, x: Tensor) -> Any:  # noqa: ANN401 - the network's output
        return self.model(x)

    def nll(self, output: Any, y: Tensor) -> Tensor:  # noqa: ANN401 - logits, a mean, or (mean, variance)
        """Mean per-example negative log-likelihood of the targets ``y`` under the network's ``output``."""
        if isinstance(output, Mapping):
            raise TypeError(
                f"the network returned a dict (keys {list(output)}); the loss reads logits, a mean, or a (mean, variance) "
                "pair: wrap it in an nn.Module whose forward returns that, e.g. net(x)['logits']"
            )
        if self.task == "classification":
            # labels as evaluation takes them: [B, 1] labels, any integer dtype, whole-number float labels (a one-logit
            # head's 0./1., as BCEWithLogitsLoss takes them), not half-precision ones that may have been rounded
            y = as_class_labels(y)
            if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
                raise TypeError(f"targets must be integer class labels (torch.long) for classification, got {y.dtype}")
            if isinstance(output, (tuple, list)):  # a GaussianHead's (mean, variance): "'GaussianOutput' has no 'shape'"
                raise ValueError(
                    f"a classification model must return logits [B, C], got {type(output).__name__}; a model that returns "
                    "(mean, variance), e.g. with a GaussianHead, needs task='regression'"
                )
            logits = _two_class(output)  # one logit: binary cross-entropy, as predict reads it
            try:
                return F.cross_entropy(logits, y.long())
            except (IndexError, RuntimeError) as error:  # shapes unlike the logits or labels out of range
                if y.shape == logits.shape:  # one-hot rows, or class probabilities
                    raise ValueError(
                        f"targets must be class labels of shape {tuple(logits.shape[:1])}, got shape {tuple(y.shape)} like the "
                        "logits' (one-hot or class probabilities: pass the labels, e.g. y.argmax(-1))"
                    ) from None
                if logits.dim() < 2 or tuple(y.shape) != (logits.shape[0], *logits.shape[2:]):
                    raise ValueError(f"targets of shape {tuple(y.shape)} do not fit logits of shape {tuple(output.shape)}: {error}") from None
                classes = logits.shape[1]
                if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
                    raise ValueError(
                        f"targets must hold labels in [0, {classes - 1}] for {classes} classes (the network's outputs"
                        f"{', one logit: binary' if output.shape[1] == 1 else ''}), got labels from {int(y.min())} to {int(y.max())}"
                    ) from None
                raise
        if isinstance(output, (tuple, list)):
            # a learned one was never trained (and DDP stops at a parameter without a gradient), a number ignored
            learned = hasattr(self, "log_noise_variance")
            if learned or (self._noise_variance_given and self._fixed_noise_variance != 1.0):  # 1.0: an earlier default
                given = "'learn'" if learned else repr(self._fixed_noise_variance)
                raise ValueError(
                    f"noise_variance={given} is for a network that outputs means only; this one predicts its variance "
                    f"(it returned {type(output).__name__}, a Gaussian head's (mean, variance)): leave noise_variance unset"
                )
            mean, variance = output
        else:
            self._warn_of_default_noise()
            noise = self.noise_variance
            mean, variance = output, (noise.to(output.dtype).expand_as(output) if isinstance(noise, Tensor) else torch.full_like(output, noise))
        try:  # a transposed [D, B] was reshaped by element count: outputs paired with other examples' targets
            y = targets_like(y, mean, "targets", finite=False)  # NaN: a non-finite loss, stopped by _check_finite
        except ValueError:
            raise ValueError(
                f"targets must have the shape of the network's mean output {tuple(mean.shape)} (or one value per "
                f"example), got shape {tuple(y.shape)}"
            ) from None
        return gaussian_nll(mean, variance, y)

    def sample_prediction(self, x: Tensor, num_samples: Optional[int]) -> Prediction:
        return self._with_noise(predict(self.predictive_model, x, num_samples=num_samples, task=self.task))

    def _warn_of_default_noise(self) -> None:
        if self._noise_variance_given or getattr(self, "_noise_warned", False):
            return
        self._noise_warned = True
        rank_zero_warn(
            f"{type(self).__name__}: the network outputs means only, and noise_variance is unset: its likelihood is "
            "N(mean, 1.0), which the NLL, the intervals and a val/nll checkpoint assume. Set noise_variance to the "
            "targets' noise variance, or to 'learn' to fit it, or end the network with a bdl.GaussianHead"
        )

    def _with_noise(self, prediction: Prediction) -> Prediction:
        """A mean-only regression network's prediction with the likelihood it was trained on: its aleatoric
        variance is ``noise_variance`` (``predict`` alone gives 0, and the NLL, intervals and checkpoint
        choice by ``val/nll`` ignored the noise). A Gaussian head's predicted variances are never all 0."""
        if self.task != "regression" or bool((prediction.aleatoric_variance != 0).any()):
            return prediction
        noise = torch.full_like(prediction.aleatoric_variance, float(torch.as_tensor(self.noise_variance).detach()))
        return dataclasses.replace(prediction, aleatoric_variance=noise)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:  # noqa: ANN401
        x, y = _split_batch(batch)
        if y is None:
            raise ValueError("training batches must be (inputs, targets) pairs")
        terms = self.training_loss(x, y)
        _check_finite(self, terms, self._diagnostic_terms())
        # synchronised: under DDP the epoch means were each process's own (rank 0's in the logs); this costs a
        # collective per term and step, small beside the gradients' own
        for name, value in terms.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=True, prog_bar=name == "loss", batch_size=len(x), sync_dist=True)
        return terms["loss"]

    def _diagnostic_terms(self) -> dict[str, Tensor]:
        """Parts of the last training loss to name where it is not finite (an ensemble's members' NLLs)."""
        return {}

    def configure_optimizers(self) -> Any:  # noqa: ANN401 - Lightning's optimizer config
        named = [(name, p) for name, p in self.named_parameters() if p.requires_grad]
        # no decay on the posterior std parameters: with std = exp(rho) it pulls every std towards 1 whatever
        # the data and the KL say (SGD, weight decay 5e-4: stds 15x their value without it)
        # nor on a learned noise variance, which it would pull towards 1
        undecayed = [name.endswith("_rho") or name == "log_noise_variance" for name, _ in named]
        params: Any = [p for (_, p), plain in zip(named, undecayed) if not plain]
        stds = [p for (_, p), plain in zip(named, undecayed) if plain]
        if stds and self.weight_decay:
            params = [{"params": params}, {"params": stds, "weight_decay": 0.0}]
        else:
            params = params + stds
        options: dict[str, Any] = {"lr": self.lr, "weight_decay": self.weight_decay}
        if self.optimizer_name == "sgd":
            options["momentum"] = self.momentum
        optimizer = OPTIMIZERS[self.optimizer_name](params, **options)
        if self.lr_schedule == "constant":
            return optimizer
        # the closed form of CosineAnnealingLR to 0, its length read at the first step, not here (see _steps_when_needed)
        steps = _steps_when_needed(lambda: stepping_batches(self.trainer))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps()) / steps())) if step else 1.0
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class DeterministicModule(UncertaintyModule):
    """The plain network trained on the NLL: the baseline every Bayesian method is compared with.

    Predictions use one forward pass (no Monte Carlo), so epistemic uncertainty is zero.

    Args:
        model: the network.
        num_eval_samples: forward passes per test/predict input (1: the network is deterministic; more only
            where it draws noise of its own).
        num_val_samples: forward passes per validation input (1, as ``num_eval_samples``).
        **kwargs: :class:`UncertaintyModule` options (task, optimizer, lr, ...).

    Example:
        >>> module = DeterministicModule(nn.Linear(4, 3), lr=1e-2)
        >>> module.training_loss(torch.randn(8, 4), torch.randint(0, 3, (8,)))["loss"].shape
        torch.Size([])
    """

    def __init__(self, model: nn.Module, *, num_eval_samples: Optional[int] = 1, num_val_samples: Optional[int] = 1, **kwargs: Any) -> None:  # noqa: ANN401
        super().__init__(model, num_eval_samples=num_eval_samples, num_val_samples=num_val_samples, **kwargs)

    def training_loss(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        nll = self.nll(self.model(x), y)
        return {"loss": nll, "nll": nll}

    def sample_prediction(self, x: Tensor, num_samples: Optional[int]) -> Prediction:
        # num_eval_samples was read as 1 whatever it was (bdl.predict of the module took it): a network that draws
        # noise of its own gave another prediction in trainer.test than in bdl.predict
        return self._with_noise(predict(self.model, x, num_samples=1 if num_samples is None else num_samples, task=self.task))


class VariationalModule(UncertaintyModule):
    """Bayesian layers trained on the ELBO (Bayes by Backprop).

    ``loss = mean_batch NLL + beta_t * KL(q || p) / num_data`` (see :func:`bdl.elbo_loss`), where the NLL
    is averaged over ``num_train_samples`` forward passes (fresh weights each) and
    ``beta_t = kl_weight * min(1, t / warm-up)`` rises linearly from 0 over the first
    ``kl_warmup_epochs`` epochs (KL annealing; 0 = no warm-up). ``num_data`` is the size of the whole
    training set, taken from the data module (all processes together under DDP) unless given.

    A network without Bayesian layers is converted with :func:`bdl.bayesianize` (``include``/``exclude``
    select layers; ``center_prior_on_weights`` for pretrained networks); one that has them is used as is (those
    options then ignored, with a warning).

    Args:
        model: the network.
        prior_std: standard deviation of the ``N(0, prior_std^2)`` prior of converted layers.
        prior: another prior of converted layers instead, e.g. ``bdl.ScaleMixturePrior(1.0, math.exp(-6), 0.5)``
            (Blundell et al.'s; in a config its ``class_path`` and ``init_args``); every layer gets a copy.
        posterior_std_init: initial posterior standard deviation of converted layers.
        estimator: ``"reparam"``, ``"local"`` or ``"flipout"`` for converted layers.
        include, exclude: layer names/patterns to convert or leave deterministic.
        center_prior_on_weights: centre the priors on the network's current weights (MOPED).
        kl_weight: the KL multiplier ``beta`` after warm-up (1 = the ELBO).
        kl_warmup_epochs: epochs over which ``beta`` rises from 0 to ``kl_weight``.
        num_train_samples: weight samples per training step.
        num_data: training-set size (default: from the data module or the training loader).
        **kwargs: :class:`UncertaintyModule` options (task, optimizer, lr, ...).

    Example:
        >>> module = VariationalModule(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)), num_data=100)
        >>> terms = module.training_loss(torch.randn(8, 4), torch.randint(0, 3, (8,)))
        >>> sorted(terms)
        ['kl', 'kl_weight', 'loss', 'nll']
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        prior_std: float = 1.0,
        posterior_std_init: float = 1e-3,
        estimator: Literal["reparam", "local", "flipout"] = "reparam",
        include: Optional[Sequence[str]] = None,
        exclude: Optional[Sequence[str]] = None,
        center_prior_on_weights: bool = False,
        prior: Optional[Prior] = None,
        kl_weight: float = 1.0,
        kl_warmup_epochs: float = 0.0,
        num_train_samples: int = 1,
        num_data: Optional[int] = None,
        **kwargs: Any,  # noqa: ANN401
    ) -> None:
        prior_std = _check_number("prior_std", prior_std, strict=True)  # checked even when unused (a Bayesian net)
        posterior_std_init = _check_number("posterior_std_init", posterior_std_init, strict=True)
        check_estimator(estimator)
        given_prior = _loaded_prior(prior)
        if given_prior is not None and prior_std != VariationalModule.__init__.__kwdefaults__["prior_std"]:
            raise ValueError(f"give prior_std (a Gaussian prior's scale) or prior, not both: got prior_std={prior_std:g} and prior={given_prior!r}")
        prior = _storable_prior(given_prior)  # as the hyperparameters keep it (read from this frame, as the patterns)
        # and the layers get it as a load rebuilds it: a 0-d tensor scale was a buffer, which the load did not expect
        given_prior = _loaded_prior(prior)
        # the patterns as given (a checkpoint's stored types imported), and as the hyperparameters keep them: read
        # from this frame by save_hyperparameters (a class defined in a function is converted, not stored)
        given_include, given_exclude = _loaded_patterns(include), _loaded_patterns(exclude)
        include, exclude = _storable_patterns(include), _storable_patterns(exclude)
        if isinstance(model, nn.Module) and not any(isinstance(m, BayesianModule) for m in model.modules()):
            model = convert_to_bayesian(
                model,
                include=given_include,
                exclude=given_exclude,
                prior=prior_std if given_prior is None else given_prior,
                center_prior_on_weights=center_prior_on_weights,
                posterior_std_init=posterior_std_init,
                estimator=estimator,
            )
        elif isinstance(model, nn.Module):
            given = {"prior_std": prior_std, "posterior_std_init": posterior_std_init, "estimator": estimator,
                     "include": include, "exclude": exclude, "center_prior_on_weights": center_prior_on_weights, "prior": prior}  # fmt: skip
            defaults = VariationalModule.__init__.__kwdefaults__
            ignored = [name for name, value in given.items() if value != defaults[name]]
            if ignored:  # a MOPED user's centred prior was silently N(0, 1)
                warnings.warn(
                    f"VariationalModule: {', '.join(ignored)} set how a plain network is converted, but this one has Bayesian "
                    "layers already, used as they are: they are ignored. Pass the plain network, or convert it with those "
                    "options yourself (bdl.bayesianize)",
                    stacklevel=user_stacklevel(),
                )
        super().__init__(model, **kwargs)
        # a subclass's own __init__ frame (read by save_hyperparameters too) held the objects: pickled, unloadable
        for name, storable in (("prior", prior), ("include", include), ("exclude", exclude)):
            if name in self.hparams:
                self.hparams[name] = storable
        if not any(isinstance(m, BayesianModule) for m in self.model.modules()):
            raise ValueError("the model has no layer bdl can make Bayesian (nn.Linear, nn.Conv1d/2d/3d) after include/exclude")
        self.kl_weight = _check_number("kl_weight", kl_weight)
        self.kl_warmup_epochs = _check_number("kl_warmup_epochs", kl_warmup_epochs)
        self.num_train_samples = check_positive_int(num_train_samples, "num_train_samples")
        self.num_data = None if num_data is None else check_positive_int(num_data, "num_data")
        self._num_data_from_data = num_data is None  # then each fit reads its own training set's size

    def on_train_start(self) -> None:  # the training loader exists from here on
        if self._num_data_from_data:
            self.num_data = _training_set_size(self.trainer)
        else:
            _warn_if_num_data_differs(self.num_data, self.trainer)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["bdl_num_data"] = self.num_data  # found by the fit: not among the hyperparameters

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.num_data is None:  # a loaded module's loss scales the KL as the trained one's did
            self.num_data = checkpoint.get("bdl_num_data")

    def current_kl_weight(self) -> float:
        """``beta_t``: the KL weight of this step (after warm-up, ``kl_weight``); in a fit's validation, its last
        training step's; in the sanity check, that of the epochs already trained (0, or a resumed fit's); outside a
        running fit (after ``trainer.validate``, or once the fit ended), ``kl_weight``."""
        state = None if self._trainer is None else self.trainer.state
        if self.kl_warmup_epochs == 0 or state is None or state.fn != TrainerFn.FITTING or state.status != TrainerStatus.RUNNING:
            return self.kl_weight
        # before the training loader is read: by epochs processed (current_epoch counts completed ones, which a
        # checkpoint saved at an epoch's end does not yet include)
        if self.trainer.sanity_checking:
            trained = self.trainer.fit_loop.epoch_progress.current.processed
            return self.kl_weight * min(1.0, trained / self.kl_warmup_epochs)
        if not math.isfinite(self.trainer.num_training_batches):  # taken as one batch: the warm-up ended in 2 steps
            raise ValueError(
                f"kl_warmup_epochs={self.kl_warmup_epochs} is scheduled in epochs, and the training loader's epoch has "
                "no length (an IterableDataset without __len__): give the dataset a __len__, or set kl_warmup_epochs=0"
            )
        batches = max(self.trainer.num_training_batches, 1)
        # in epochs: this epoch's optimiser steps (one per accumulate_grad_batches batches, and one for a remainder)
        # so far over its number, after the epochs before. Not global_step over this epoch's steps: a
        # GradientAccumulationScheduler changes the factor between epochs, and the weight jumped to 1 (or fell)
        accumulate = max(self.trainer.accumulate_grad_batches, 1)
        batch = max(self.trainer.fit_loop.epoch_loop.batch_idx, 0)
        progress = (self.current_epoch + (batch // accumulate) / math.ceil(batches / accumulate)) / self.kl_warmup_epochs
        return self.kl_weight * min(1.0, progress)

    def training_loss(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        if self.num_data is None:
            raise ValueError("VariationalModule needs num_data (the training-set size) outside a Trainer fit")
        nll = torch.stack([self.nll(self.model(x), y) for _ in range(self.num_train_samples)]).mean()
        kl_weight = self.current_kl_weight()
        loss, nll, kl = elbo_loss(nll, kl_divergence(self.model), self.num_data, kl_weight=kl_weight)
        return {"loss": loss, "nll": nll, "kl": kl.detach(), "kl_weight": torch.tensor(kl_weight)}


def _length(value: Any) -> Optional[int]:  # noqa: ANN401
    try:
        return len(value)
    except (TypeError, NotImplementedError):  # Lightning takes a sampler whose epoch has no known length
        return None


def _flat_indices(indices: Any) -> bool:  # noqa: ANN401
    """Whether ``indices`` is a flat sequence of row indices (integers), not a list of lists or of other things."""
    if isinstance(indices, Tensor):
        return indices.dim() == 1 and not indices.is_floating_point() and indices.dtype != torch.bool
    if isinstance(indices, np.ndarray):
        return indices.ndim == 1 and np.issubdtype(indices.dtype, np.integer)
    return all(isinstance(index, numbers.Integral) and not isinstance(index, bool) for index in indices)


def _warn_if_num_data_differs(num_data: Optional[int], trainer: L.Trainer) -> None:
    """Warn where a given ``num_data`` is not the training set's size: the KL is weighted as for that many examples
    (num_data=1000 for 100 rows weighs the data 10x: posterior standard deviations about sqrt(10) ~ 3x too small
    where the data dominate, without a word)."""
    if num_data is None:  # (set to None after the module was made: the fit's own check says so)
        return
    told = _told_num_train(running_datamodule(trainer))
    loader = trainer.train_dataloader
    if told is None and getattr(loader, "batch_size", 1) is None and getattr(loader, "batch_sampler", 1) is None:
        return  # a loader of ready batches (automatic batching off): its data set's length counts batches, not rows
    try:
        size = _training_set_size(trainer)
    except (ValueError, TypeError):  # a loader that cannot tell
        return
    if size > 0 and size != num_data:
        rank_zero_warn(
            f"num_data={num_data}, but the training set has {size} examples: the KL is weighted as for {num_data} "
            f"(posterior {'narrower' if num_data > size else 'wider'} than the data's); leave num_data out to use the "
            "training set's size"
        )


def _training_set_size(trainer: L.Trainer) -> int:
    """Size of the whole training set: the data module's ``num_train``, else the rows of the training loader's
    subset sampler (``SubsetRandomSampler(train_indices)`` over a data set that also holds the validation rows),
    else its dataset's."""
    told = _told_num_train(running_datamodule(trainer))
    if told is not None:
        return told
    loader = trainer.train_dataloader
    batch_sampler = getattr(loader, "batch_sampler", None)
    samplers = (getattr(batch_sampler, "sampler", None), getattr(loader, "sampler", None))
    distributed = any(isinstance(sampler, DistributedSampler) for sampler in samplers)
    if trainer.world_size > 1 and isinstance(loader, DataLoader) and not distributed:  # (several loaders: told below)
        # each process's own loader (use_distributed_sampler=False): one shard of the data (a size per process, the
        # KL weighted twice over on 2 processes) or the whole of it, which cannot be told
        raise ValueError(
            "cannot tell the training-set size from a distributed run's own training loaders (no DistributedSampler): "
            "pass num_data, the examples of all processes together"
        )
    for sampler in samplers:
        if isinstance(sampler, DistributedSampler):  # Lightning's under DDP, over the dataset or the user's sampler
            sampler = getattr(sampler.dataset, "_sampler", None)
        # the rows a subset sampler (torch's, or one of its kind: flat `indices`, one draw of each per epoch) or a
        # flat index list draws from; another sampler's `indices` may mean anything (one list per class, say); a
        # BatchSampler's own sampler first, a plain loader's after
        indices = getattr(sampler, "indices", None) if not isinstance(sampler, (Sequence, Tensor, np.ndarray)) else sampler
        subset = indices is sampler or isinstance(sampler, SubsetRandomSampler) or _length(sampler) == _length(indices)
        if isinstance(indices, (Sequence, Tensor, np.ndarray)) and subset and _flat_indices(indices):
            return len(np.unique(np.asarray(indices)))  # the rows, each once (a sampler may list a row twice)
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):  # no dataset, or an IterableDataset without a length
        raise ValueError("cannot tell the training-set size from the training loader: pass num_data") from None


def _told_num_train(datamodule: Optional[L.LightningDataModule]) -> Optional[int]:
    """The data module's ``num_train`` where it is a count of rows; None where it has none, or one of another kind
    (None before its setup, say: the training loader is read instead, where int(None) failed in Python's words)."""
    told = getattr(datamodule, "num_train", None)
    if isinstance(told, numbers.Integral) and not isinstance(told, bool) and told > 0:
        return int(told)
    return None


class MCDropoutModule(UncertaintyModule):
    """A network with dropout trained on the NLL, predicting with dropout on (Gal & Ghahramani 2016).

    The network is wrapped in :class:`bdl.MCDropout` (its dropout layers stay stochastic at prediction;
    BatchNorm stays in eval mode). ``p`` and ``insert_before`` insert dropout into a network without it.

    Args:
        model: the network, with dropout layers unless ``p`` is given.
        p: dropout rate for the layers :class:`bdl.MCDropout` inserts (None: use the network's own dropout).
        insert_before: names or types of the layers to insert dropout before (see :class:`bdl.MCDropout`).
        **kwargs: :class:`UncertaintyModule` options (task, optimizer, lr, num_eval_samples, ...).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
        >>> module = MCDropoutModule(net)
        >>> module.sample_prediction(torch.randn(5, 4), 10).mutual_information.shape
        torch.Size([5])
    """

    def __init__(self, model: nn.Module, *, p: Optional[float] = None, insert_before: Optional[Sequence[str]] = None, **kwargs: Any) -> None:  # noqa: ANN401
        given = _loaded_patterns(insert_before)
        insert_before = _storable_patterns(insert_before)  # as the hyperparameters keep it (see VariationalModule)
        super().__init__(MCDropout(model, p=p, insert_before=given), **kwargs)
        self.model.train(self.training)

    def training_loss(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        nll = self.nll(self.model(x), y)
        return {"loss": nll, "nll": nll}


class EnsembleModule(UncertaintyModule):
    """A deep ensemble (Lakshminarayanan et al. 2017): ``num_members`` copies of the network trained in one run.

    Member 0 is the given network; the others are copies with their parameters re-initialised (every
    submodule's ``reset_parameters``, children before parents), so members start apart. A network whose
    ``__init__`` initialises its layers its own way should apply that scheme in a ``reset_parameters`` of its
    own too (as :class:`bdl.lightning.ResNet` does), or the other members start from the layers' defaults.
    Frozen parameters (``requires_grad=False``, e.g. a pretrained backbone) and the buffers of modules whose
    parameters are all frozen (for a module without parameters, such as ``BatchNorm(affine=False)``: those of the
    closest enclosing module that has some) are kept: every member starts from them.
    One optimiser steps all members; the loss is the sum of the members' mean NLLs, so each member follows
    the gradient of its own loss (logged: ``train/nll``, the members' average), clipped by its own norm under
    the Trainer's ``gradient_clip_val``. Prediction uses each member once (``num_eval_samples`` None).

    Args:
        model: the network of member 0 (the others are re-initialised copies).
        num_members: members, >= 1.
        num_eval_samples: samples per test/predict input, a multiple of ``num_members`` (None: one per member).
        num_val_samples: samples per validation input, a multiple of ``num_members`` (None: one per member).
        **kwargs: :class:`UncertaintyModule` options (task, optimizer, lr, ...).

    Example:
        >>> module = EnsembleModule(nn.Linear(4, 3), num_members=3)
        >>> module.sample_prediction(torch.randn(5, 4), None).num_samples
        3
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        num_members: int = 5,
        num_eval_samples: Optional[int] = None,
        num_val_samples: Optional[int] = None,
        **kwargs: Any,  # noqa: ANN401
    ) -> None:
        num_members = check_positive_int(num_members, "num_members")
        if num_members == 1:  # its report's mutual information is 0 everywhere, its OOD AUROC by it 0.5: said nowhere
            rank_zero_warn(
                "EnsembleModule with num_members=1 is one network: it has no epistemic uncertainty (mutual information "
                "0, variance of the members' means 0); use num_members >= 2 (5 is usual)"
            )
        for name, value in (("num_eval_samples", num_eval_samples), ("num_val_samples", num_val_samples)):
            # each round of an ensemble's prediction is one sample per member: found only at test time otherwise
            if value is not None and (check_positive_int(value, name) % num_members):
                raise ValueError(f"{name} must be a multiple of num_members={num_members} (one sample per member per round), got {value}")
        members = [model] + [_reinitialized(model) for _ in range(num_members - 1)]
        super().__init__(DeepEnsemble(members), num_eval_samples=num_eval_samples, num_val_samples=num_val_samples, **kwargs)
        self.num_members = num_members

    def training_loss(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        losses = self.model.member_losses(self.model(x), y, self.nll)
        self._member_nlls = losses.detach()  # which member, where the loss is not finite: one diverged, the others not
        return {"loss": losses.sum(), "nll": losses.mean().detach()}

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: Optional[float] = None, gradient_clip_algorithm: Optional[str] = None
    ) -> None:
        """The Trainer's ``gradient_clip_val`` by norm clips each member's gradient by its own norm (and that of
        the parameters of no member, a learned ``noise_variance``, by theirs): Lightning's clipped the norm of all
        members' gradients together, so one member's large gradient shrank every other member's step (and the
        clip tightened as sqrt(num_members)). Clipping by value is Lightning's."""
        if (gradient_clip_algorithm or "norm") != GradClipAlgorithmType.NORM:  # an enum or a str
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        if not (gradient_clip_val or self.trainer.gradient_clip_val or 0) > 0:  # called at every step, also without
            return
        # through Lightning's checks and precision plugin, as its own clipping (a negative value clips nothing, a fused
        # optimizer under a GradScaler is refused), with the optimizer's groups narrowed to one member's parameters
        groups = optimizer.param_groups
        parts = [{id(parameter) for parameter in member.parameters()} for member in self.model.members]
        # and the parameters of no member (a learned noise variance, shared: its step went unclipped, to exp(134))
        parts.append({id(p) for group in groups for p in group["params"]} - set().union(*parts))
        try:
            for own in parts:
                optimizer.param_groups = [{**group, "params": [p for p in group["params"] if id(p) in own]} for group in groups]
                if any(group["params"] for group in optimizer.param_groups):  # none: Lightning's "no clipping will occur"
                    self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        finally:
            optimizer.param_groups = groups

    def _diagnostic_terms(self) -> dict[str, Tensor]:
        nlls = getattr(self, "_member_nlls", None)
        return {} if nlls is None else {f"member {i}'s NLL": nll for i, nll in enumerate(nlls)}


def _check_val_targets(y: Optional[Tensor]) -> None:
    if y is None:  # "object of type 'NoneType' has no len()", deep in the metrics
        raise ValueError("the validation loader must give (inputs, targets) batches to measure the model")


def _frozen_buffers(model: nn.Module) -> list[tuple[str, Tensor]]:
    """Buffers of the modules that have parameters, all frozen (``requires_grad=False``), and of parameter-free
    modules (``BatchNorm(affine=False)``) whose closest enclosing module with parameters has them all frozen."""
    found = []
    for prefix, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if not own:  # judged by the closest enclosing module with parameters (their BatchNorm's statistics are theirs)
            parts = prefix.split(".") if prefix else []
            for depth in range(len(parts) - 1, -1, -1):
                own = list(model.get_submodule(".".join(parts[:depth])).parameters())
                if own:
                    break
        if own and not any(p.requires_grad for p in own):
            found += [(f"{prefix}.{name}" if prefix else name, b) for name, b in module.named_buffers(recurse=False) if b is not None]
    return found


def _reset_parametrized(module: nn.Module) -> bool:
    """``reset_parameters`` of a module with parametrizations (weight_norm, spectral_norm): run on the computed
    weight, it wrote into a temporary, and every member kept member 0's. Run on a stand-in of the module's own
    class whose parametrized tensors are plain, then set through the parametrizations (their right_inverse).
    False where a parametrization has no right_inverse: nothing to set them through."""
    cls = type(module).__mro__[1]  # the class before parametrize made one of its own
    reset = getattr(cls, "reset_parameters", None) or getattr(cls, "_reset_parameters", None)
    invertible = all(hasattr(p, "right_inverse") for name in module.parametrizations for p in module.parametrizations[name])
    if not callable(reset) or not invertible:  # the module's own reset (its other parameters); a warning names these
        return False
    stand_in = object.__new__(cls)
    stand_in.__dict__.update(module.__dict__)
    plain = {name: nn.Parameter(getattr(module, name).detach().clone()) for name in module.parametrizations}
    stand_in._parameters = {**module._parameters, **plain}  # the others (a bias) are the module's own: reset in place
    stand_in._modules = {key: value for key, value in module._modules.items() if key != "parametrizations"}
    reset(stand_in)
    with torch.no_grad():
        for name, value in plain.items():
            setattr(module, name, value.detach())
            for parametrization in module.parametrizations[name]:
                # spectral_norm's power-iteration vectors were member 0's: in eval mode (no iteration) a member's
                # weight was scaled by another's sigma, its norm 10-30 where 1 was meant. Fresh ones, as torch makes
                if hasattr(parametrization, "_power_method") and hasattr(parametrization, "_u"):
                    matrix = parametrization._reshape_weight_to_matrix(module.parametrizations[name].original)
                    parametrization._u.copy_(F.normalize(torch.randn_like(parametrization._u), dim=0, eps=parametrization.eps))
                    parametrization._v.copy_(F.normalize(torch.randn_like(parametrization._v), dim=0, eps=parametrization.eps))
                    parametrization._power_method(matrix, 15)
    return True


def _computed_alike(name: str, copied: nn.Module, model: nn.Module) -> bool:
    """For a parametrization's stored tensor (``0.parametrizations.weight.original``), whether the tensor it computes
    is alike in both (orthogonal's stored -I is, while its weight lives elsewhere); True for other parameters."""
    owner, found, rest = name.partition(".parametrizations.")
    if not found and name.startswith("parametrizations."):
        owner, found, rest = "", True, name[len("parametrizations."):]
    if not found:
        return True
    tensor = rest.split(".", 1)[0]
    with torch.no_grad():
        return torch.equal(getattr(copied.get_submodule(owner), tensor), getattr(model.get_submodule(owner), tensor))


def _reinitialized(model: nn.Module) -> nn.Module:
    """A copy with fresh parameters: every submodule's ``reset_parameters``, children before their parents, so a
    network's own scheme (ResNet's Kaiming-normal convolutions) has the last word over its layers' defaults."""
    copied = copy.deepcopy(model)

    def reset(module: nn.Module) -> None:
        for child in module.children():
            reset(child)
        # torch's MultiheadAttention and Transformer name theirs _reset_parameters: members shared the attention's
        # in-projection with member 0
        method = getattr(module, "reset_parameters", None) or getattr(module, "_reset_parameters", None)
        if callable(method) and not (nn.utils.parametrize.is_parametrized(module) and _reset_parametrized(module)):
            method()

    # a frozen part (a pretrained backbone under a trainable head) is shared knowledge, not an initialisation: it
    # and the buffers of modules whose parameters are all frozen (its BatchNorm statistics) stay member 0's
    lazy = nn.parameter.UninitializedParameter  # a lazy layer's parameters have no values yet: nothing to compare
    frozen = {name: value.detach().clone() for name, value in copied.named_parameters() if not value.requires_grad and not isinstance(value, lazy)}
    frozen.update((name, value.clone()) for name, value in _frozen_buffers(copied))
    reset(copied)
    with torch.no_grad():
        state = dict([*copied.named_parameters(), *copied.named_buffers()])
        for name, value in frozen.items():
            state[name].copy_(value)
    kept = [
        name for (name, new), old in zip(copied.named_parameters(), model.parameters())
        if new.requires_grad and not isinstance(new, lazy) and new.numel() > 1 and torch.equal(new, old)
        and not bool((new == new.reshape(-1)[0]).all()) and _computed_alike(name, copied, model)
    ]  # fmt: skip
    if kept:  # constant initial values (LayerNorm's ones) are alike by design; random ones are member 0's
        warnings.warn(
            f"EnsembleModule: parameters {kept[:5]}{' ...' if len(kept) > 5 else ''} keep member 0's values in every member "
            "(their module has no reset_parameters, or a parametrization without right_inverse): the members start "
            "alike there; give that module a reset_parameters",
            stacklevel=3,
        )
    return copied


# the losses without a KL term: a Bayesian network given to a module that trains with one of them is warned about
_NLL_ONLY_LOSSES = frozenset((DeterministicModule.training_loss, MCDropoutModule.training_loss, EnsembleModule.training_loss))


class SVIModule(_Evaluation, infer.SVIModule):
    """:class:`bdl.infer.SVIModule` (Pyro SVI) with the evaluation of the other modules.

    Logs ``train/elbo``, ``train/nll`` and ``train/kl`` as the Pyro module does, plus the validation metrics
    and the test report. A :class:`bdl.infer.PyroModel` given with ``num_data=None`` gets the data
    module's training-set size when fitting starts.

    Args:
        model: a :class:`bdl.infer.PyroModel`.
        guide: guide name (see :data:`bdl.infer.GUIDES`).
        num_eval_samples: posterior samples per test/predict input.
        num_val_samples: posterior samples per validation input.
        n_bins: bins of the calibration metrics.
        save_report: write the test report (``metrics.json``, ``report.md``, PNG plots) to the run folder (the
            logger's; a trainer without a logger writes none); ``module.report`` holds it either way.
        **kwargs: :class:`bdl.infer.SVIModule` options (elbo, lr, lr_decay, init_scale, ...).

    Example:
        >>> from bdl.infer import PyroModel
        >>> model = PyroModel(nn.Linear(4, 3), "categorical", num_data=100)
        >>> module = bdl.lightning.SVIModule(model, num_eval_samples=8)  # (bdl.SVIModule is the plain Pyro one)
        >>> module.sample_prediction(torch.randn(5, 4), None).num_samples
        8
    """

    # num_samples is set from num_eval_samples: kept as a hyperparameter too, load_from_checkpoint(...,
    # num_eval_samples=100) passed the saved one back beside it, and the check in __init__ refused the pair
    _hparams_not_saved = ("num_samples",)

    def __init__(
        self,
        model: infer.PyroModel,
        guide: str = "normal",
        *,
        num_eval_samples: int = 32,
        num_val_samples: int = 8,
        n_bins: int = 15,
        save_report: bool = True,
        **kwargs: Any,  # noqa: ANN401
    ) -> None:
        if not isinstance(model, infer.PyroModel):
            raise TypeError(f"model must be a bdl.infer.PyroModel, got {type(model).__name__}")
        num_eval_samples = check_positive_int(num_eval_samples, "num_eval_samples")  # before it is num_samples below
        # bdl.infer.SVIModule saves its num_samples among the hyperparameters: load_from_checkpoint passes it
        # back next to num_eval_samples, from which it is set (they were passed twice, and every load failed)
        if kwargs.pop("num_samples", num_eval_samples) != num_eval_samples:
            raise TypeError("SVIModule takes num_eval_samples (posterior samples per test input), not num_samples")
        super().__init__(model, guide, num_samples=num_eval_samples, **kwargs)
        self.task = model.task
        self.num_eval_samples = check_positive_int(num_eval_samples, "num_eval_samples")
        self.num_val_samples = check_positive_int(num_val_samples, "num_val_samples")
        self.n_bins = check_positive_int(n_bins, "n_bins")
        self.save_report = bool(save_report)
        self._num_data_from_data = model.num_data is None  # then each fit (or validate) reads its data's size
        self._setup_metrics()
        self.val_elbo = torchmetrics.MeanMetric()

    @_restricted_classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> "SVIModule":  # noqa: ANN401 - Lightning's
        """Lightning's ``load_from_checkpoint``; a ``num_eval_samples`` given here replaces the ``num_samples`` that
        checkpoints of earlier versions kept beside it (the pair was refused as two numbers of samples)."""
        if "num_eval_samples" in kwargs and "num_samples" not in kwargs:
            kwargs["num_samples"] = kwargs["num_eval_samples"]
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def on_fit_start(self) -> None:
        _ResumableRandomState.on_fit_start(self)  # num_data is checked when training starts (the loader exists then)
        _warn_if_steps_round_away(self.trainer)

    def on_train_start(self) -> None:
        if self._num_data_from_data:
            self.model.num_data = _training_set_size(self.trainer)
        else:
            _warn_if_num_data_differs(self.model.num_data, self.trainer)
        self._check_num_data()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.model.num_data is None:  # load_from_checkpoint too: each fit reads its own data's size anyway
            self.model.num_data = checkpoint.get("bdl_num_data")

    def sample_prediction(self, x: Tensor, num_samples: Optional[int]) -> Prediction:
        return self.predict(x, num_samples=num_samples or self.num_eval_samples)

    def _check_loss(self, loss: Tensor, nll: Tensor, kl: Tensor) -> None:
        # the loss a subclass's loss() returns (a term it adds too), its terms and the parameters named; the kl is
        # loss - nll, which says nothing of the guide's KL where the NLL is not finite (a NaN input read "NLL and KL")
        told = bool(torch.isfinite(loss).all()) or bool(torch.isfinite(nll).all())  # (a finite loss has a finite NLL)
        terms = {"loss": loss, "nll": nll, "kl": kl} if told else {"loss": loss, "nll": nll}
        _check_finite(self, terms, guide=self.guide)

    def on_validation_start(self) -> None:
        # a validate run outside fit: scale the likelihood as fit does, so val/elbo means the same in both
        told = _told_num_train(running_datamodule(self.trainer))
        if self._num_data_from_data and told is not None:
            self.model.num_data = told

    def on_validation_epoch_end(self) -> None:
        # the pass's decision ran at its last batch (_run_validation_batch): not bdl.infer.SVIModule's fallback for
        # its own validation_step, a collective more
        pass

    def _validate(self, batch: Any, batch_idx: int) -> None:  # noqa: ANN401
        x, y = _split_batch(batch)
        _check_val_targets(y)
        keep = self._own_val_rows(len(x))
        # else the ELBO of the batch alone, not comparable with fit's; under DDP without the sampler's repeats, in a
        # weighted mean of its own: Lightning's sync of unequal batch sizes rounded their average to an int (2% off)
        loss = None
        if self.model.num_data is not None:
            if keep:
                args = [a[:keep] if isinstance(a, Tensor) and a.dim() and len(a) == len(x) else a for a in _as_args(batch)]
                with torch.no_grad():
                    loss, _, _ = self.loss(*args)
                if bool(torch.isfinite(loss).all()):  # else raised below (the metric dropped it with a warning)
                    self.val_elbo.update(-loss, weight=keep)
            self.log("val/elbo", self.val_elbo, on_step=False, on_epoch=True)  # val/nll is the predictive NLL, as elsewhere
        prediction = self._checked_prediction(x, self.num_val_samples, "validation", batch_idx)
        with self._naming_batch("validation", batch_idx):
            self._update_val_metrics(prediction, y, keep)
        if loss is not None and not bool(torch.isfinite(loss).all()):  # after the checks that name a cause (a NaN
            raise FloatingPointError(  # prediction); val/elbo was the other batches' mean
                f"non-finite validation loss at epoch {self.current_epoch}, step {self.global_step}, in batch {batch_idx} "
                f"of the validation loader: the negative ELBO is {loss.item()}; check the inputs and targets for NaN/inf"
            )

    def _val_metric_objects(self) -> list[torchmetrics.Metric]:
        return [*super()._val_metric_objects(), self.val_elbo]


METHODS: dict[str, type[L.LightningModule]] = {
    "deterministic": DeterministicModule,
    "variational": VariationalModule,
    "mc_dropout": MCDropoutModule,
    "ensemble": EnsembleModule,
    "svi": SVIModule,
}

__all__ = [
    "UncertaintyModule", "DeterministicModule", "VariationalModule", "MCDropoutModule", "EnsembleModule", "SVIModule",
    "METHODS", "HEADLINE_METRICS",
]  # fmt: skip
