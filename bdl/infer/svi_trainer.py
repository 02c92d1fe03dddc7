"""Stochastic variational inference with Pyro, trained by Lightning (Pyro's ``ELBOModule`` pattern)."""

from __future__ import annotations

import math
import numbers
import re
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Sequence, Union

import lightning as L
import numpy as np
import pyro
import torch
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.utilities.model_helpers import _restricted_classmethod
from pyro import poutine
from pyro.infer.autoguide import AutoGuide
from torch import Tensor, nn

from ..metrics.functional._checks import check_positive_int
from .._distributed import raise_on_every_process, validation_batches
from .._messages import first_few
from .._warn import user_stacklevel
from ..nn.loss import check_trained_parameters, non_finite_where
from .guides import collapsed_scales, make_elbo, make_guide
from .model import PyroModel, check_finite_data, check_full_data
from .predictive import (
    TASKS,
    _eval_mode,
    network_outputs,
    predict_from_samples,
    predict_function_model,
    private_param_store,
    sample_guide,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..predict import Prediction

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}

VALIDATE = ("first", "always", "never")
"""When :class:`SVIModule` lets Pyro validate distribution arguments and supports (its ``validate`` option)."""


def exponential_decay(optimizer: torch.optim.Optimizer, lr_decay: float, num_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step schedule ``lr_t = lr * lr_decay^(t / num_steps)`` (Pyro's ``ClippedAdam`` ``lrd`` in torch form).

    Args:
        optimizer: the torch optimizer.
        lr_decay: final / initial learning rate, in (0, 1].
        num_steps: steps over which to decay (the rate stays at ``lr * lr_decay`` afterwards), or a callable
            that gives them, read at the first step.

    Returns:
        a ``LambdaLR`` to ``step()`` after every optimizer step.

    Example:
        >>> optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> scheduler = exponential_decay(optimizer, 0.01, num_steps=2)
        >>> _ = [(optimizer.step(), scheduler.step()) for _ in range(2)]
        >>> round(optimizer.param_groups[0]["lr"], 6)
        0.01
    """
    if not (isinstance(lr_decay, numbers.Real) and 0 < lr_decay <= 1):
        raise ValueError(f"lr_decay must be in (0, 1], got {lr_decay!r}")
    steps = _steps_when_needed(num_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: float(lr_decay) ** (min(step, steps()) / steps()) if step else 1.0)


def _run_length(total: float) -> int:
    # inf: "cannot convert float infinity to integer", naming nothing; -1 (Lightning's max_steps, for a loader
    # without a length): the schedule ended after one step
    if not math.isfinite(total) or total <= 0:
        raise ValueError(
            "a learning rate that decays over the run (lr_schedule='cosine', lr_decay < 1) needs a run of known "
            "length: set the Trainer's max_steps, or max_epochs with a training loader that has a length"
        )
    return max(int(total), 1)


def stepping_batches(trainer: L.Trainer) -> float:
    """The optimiser steps of ``trainer``'s fit: Lightning's ``estimated_stepping_batches``, with a
    ``GradientAccumulationScheduler``'s factor taken per epoch (Lightning takes the first epoch's for every epoch:
    a cosine schedule accumulating 4 then 1 reached lr 0 with 4 of 6 epochs to go)."""
    estimate = trainer.estimated_stepping_batches  # max_steps, infinite runs, and the loader's length set up
    schedulers = [c for c in trainer.callbacks if isinstance(c, GradientAccumulationScheduler)]
    batches, epochs = trainer.num_training_batches, trainer.max_epochs
    if not schedulers or not math.isfinite(batches) or epochs is None or epochs < 0:
        return estimate
    # the last scheduler's: each sets the factor at every epoch's start, in the order given
    total = sum(math.ceil(batches / schedulers[-1].get_accumulate_grad_batches(epoch)) for epoch in range(max(epochs, 1)))
    return min(total, trainer.max_steps) if trainer.max_steps != -1 else total


def _steps_when_needed(num_steps: Union[int, Callable[[], int]]) -> Callable[[], int]:
    """``num_steps``, or the value of a callable read once at the schedule's first step (not at step 0, which
    LambdaLR computes as it is built). Lightning's ``trainer.estimated_stepping_batches``, read in
    ``configure_optimizers``, builds the training loader's iterator before ``on_fit_start`` restores a resumed
    fit's random state: a shuffled loader of the user's then drew its order one number early (not bit-identical)."""
    if not callable(num_steps):
        total = _run_length(num_steps)
        return lambda: total
    known: list[int] = []

    def steps() -> int:
        if not known:
            known.append(_run_length(num_steps()))
        return known[0]

    return steps


class _RecordingModel(nn.Module):
    """Runs the model under ``poutine.trace`` and keeps the traces of the current step.

    Pyro's ELBO returns only the total loss; the observed sites of these traces give the expected
    negative log-likelihood, and KL = loss - NLL, so both are logged without a second forward pass.
    Holding ``model`` as a submodule also puts its parameters in ``elbo.parameters()``.
    """

    def __init__(self, model: Union[nn.Module, Callable]) -> None:
        super().__init__()
        self.model = model
        self.traces: list[poutine.Trace] = []

    def forward(self, *args, **kwargs):
        trace = poutine.trace(self.model).get_trace(*args, **kwargs)
        self.traces.append(trace)
        return trace.nodes["_RETURN"]["value"]

    def pop_nll(self) -> Tensor:
        """Mean over the recorded traces of ``-sum_observed scale * log p(y | ...)``; clears the record."""
        values = []
        with torch.no_grad():
            for trace in self.traces:
                trace.compute_log_prob(site_filter=lambda name, site: site["is_observed"])
                observed = [site["log_prob_sum"] for site in trace.nodes.values() if site["type"] == "sample" and site["is_observed"]]
                values.append(-torch.stack([torch.as_tensor(v).reshape(()) for v in observed]).sum() if observed else torch.zeros(()))
        self.traces.clear()
        return torch.stack([v.to(values[0].device) for v in values]).mean() if values else torch.tensor(float("nan"))


def _as_args(batch: Any) -> tuple:
    if isinstance(batch, (tuple, list)):
        return tuple(batch)
    if isinstance(batch, dict):
        raise TypeError("SVIModule: batches must be a tensor or a tuple of model arguments, got a dict")
    return (batch,)


def ignored_hparams(names: Sequence[str]) -> list[str]:
    """The constructor arguments ``names`` a module leaves out of its checkpoint's hyperparameters (objects: the
    network, which the state dict holds, guide instances, callables), less ``model`` when LightningCLI builds
    the module: its hyperparameters are then the run's config, where the network is plain data (class path and
    arguments). Kept, ``bdl evaluate --ckpt_path`` and ``load_from_checkpoint(path)`` rebuild the network that
    was trained: without it, one built from this command's config (another dropout rate, say) got the weights."""
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters

    if _given_hyperparameters.get() is not None:
        return [name for name in names if name != "model"]
    return list(names)


class LoadsWithModel:
    """``load_from_checkpoint`` that says what to pass where the checkpoint holds no network: a module built in
    Python saves the network's weights, not the network (an object), and loading it without ``model=`` failed
    with Python's bare "missing 1 required positional argument: 'model'"."""

    @_restricted_classmethod  # Lightning's: called on an instance, it left that instance untrained, silently
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401 - Lightning's
        try:
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        except TypeError as error:
            if "model" in kwargs or not re.search(r"required positional arguments?: .*'model'", str(error)):
                raise
            raise TypeError(
                f"{cls.__name__}.load_from_checkpoint: {checkpoint_path} holds the network's weights but not the network, "
                "which a module built in Python keeps out of its hyperparameters: pass one of the same architecture, "
                f"{cls.__name__}.load_from_checkpoint(path, model=net) (a checkpoint of the bdl command has its config)"
            ) from error


def plain_hyperparameters(checkpoint: dict[str, Any]) -> None:
    """numpy scalars among a checkpoint's (module's and data module's) hyperparameters as Python numbers, in place:
    ``torch.load(weights_only=True)``, as Lightning and ``bdl evaluate`` load, refuses numpy's types (a run with
    ``num_eval_samples=np.int64(8)`` trained to the end, then none of its checkpoints loaded)."""
    for key in ("hyper_parameters", "datamodule_hyper_parameters"):
        if isinstance(checkpoint.get(key), dict):
            checkpoint[key] = _plain(checkpoint[key])


def _plain(value: Any) -> Any:  # noqa: ANN401
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_plain(item) for item in value)
    return value


class _ResumableRandomState:
    """Saves the random number generators' states in checkpoints and restores them on load.

    A run resumed from a checkpoint written at the end of an epoch (as ``last.ckpt`` is by default) then
    draws the same data order and the same Monte Carlo noise (weights, dropout masks, Pyro samples) as a
    run that was never interrupted, also with DataLoaders that have no generator of their own.
    """

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        plain_hyperparameters(checkpoint)
        states = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            states["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint["bdl_random_state"] = states

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Applied when the resumed fit starts (on_fit_start), not here: restoring the loops and the sanity check
        # come in between (the sanity check under Lightning's isolate_rng). Not later either: the training
        # loader's iterator is made right after on_fit_start and draws its base seed from the global generator
        # (a DataLoader without a generator of its own), as the uninterrupted run's does after the checkpoint.
        self._pending_random_state = checkpoint.get("bdl_random_state")
        # Lightning loads the weights before its 64-true plugin casts the module: float64 weights went into float32
        # parameters, and a resumed double-precision run started from them rounded. The cast comes first here.
        if self._trainer is not None and str(self._trainer.precision) == "64-true":
            self.double()

    def on_fit_start(self) -> None:
        states, self._pending_random_state = getattr(self, "_pending_random_state", None), None
        if states is None or self.trainer.ckpt_path is None:  # load_from_checkpoint and a fresh fit: nothing to resume
            return
        torch.set_rng_state(states["torch"])
        if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states["cuda"])


def _untrained_param_sites(trace: Optional[poutine.Trace], store: dict[str, Tensor], trained: set[int]) -> dict[str, str]:
    """The ``pyro.param`` sites of a loss's model ``trace`` and parameter ``store`` whose values the optimizer would
    not train (``trained``: the ids of its parameters), each -> ``"model"`` (a model's ``pyro.param``),
    ``"module"`` (a PyroModule's ``PyroParam`` or ``nn.Parameter``, called by a model function) or ``"guide"``.

    Each step runs in a fresh store: such a site stays at its initial value (sigma 2.0 where Pyro learns 0.3). A
    frozen ``nn.Parameter`` is meant so.
    """
    untrained, in_model = {}, set()
    for name, site in trace.nodes.items() if trace is not None else ():
        if site["type"] != "param":
            continue
        in_model.add(name)
        given = site["args"][1] if len(site["args"]) > 1 else None  # a PyroModule's nn.Parameter; None: a PyroParam
        stored = getattr(site["value"], "unconstrained", lambda: site["value"])()  # the store's (a contiguous copy)
        if id(given) in trained or id(stored) in trained or (isinstance(given, nn.Parameter) and not given.requires_grad):
            continue
        untrained[name] = "module" if given is None or isinstance(given, nn.Parameter) else "model"
    for name, value in store.items():
        if name not in in_model and id(value) not in trained:
            untrained[name] = "guide"  # a guide function's pyro.param (AutoCallable)
    return dict(sorted(untrained.items()))


_ADVICE = {
    "model": "make {} parameters of the model, e.g. a PyroModule's PyroParam or nn.Parameter",
    "module": "{} belong to a module the model function calls: pass that module as the model (a PyroModule whose forward is the model)",
    "guide": "{} are the guide's: make them a PyroModule guide's PyroParam, or use an autoguide",
}


def _untrained_advice(untrained: dict[str, str]) -> str:
    advice = ["each step runs in a fresh parameter store and the optimizer trains the guide's parameters and the model's own"]
    for kind, text in _ADVICE.items():
        names = [name for name, of in untrained.items() if of == kind]
        if names:
            advice.append(text.format(names))
    return "; ".join(advice)


class SVIModule(LoadsWithModel, _ResumableRandomState, L.LightningModule):
    """Fit a Pyro guide to a Bayesian model with SVI, as a LightningModule.

    Minimises the negative ELBO ``-E_q[log p(y | x, w)] + KL(q(w) || p(w))`` (Pyro's ``Trace_ELBO``, or
    :class:`~bdl.infer.guides.MeanFieldELBO`: ``TraceMeanField_ELBO`` with closed-form KL terms, also for
    ``AutoNormal``'s weights, where Pyro's estimates them by Monte Carlo) with a torch optimizer, following
    Pyro's ``ELBOModule`` pattern: ``self.elbo = loss(model, guide)`` is an ``nn.Module`` whose
    ``parameters()`` are the guide's variational parameters plus the model's point parameters. The
    guide's parameters are created in ``__init__`` (so ``configure_optimizers`` sees them and
    checkpoints restore them) and live in this module's ``state_dict``; Pyro's global parameter store
    is never used across calls (see :func:`private_param_store`), and the guides bdl builds keep their
    parameters on the module when called through Pyro too (``Predictive(model, guide=module.guide)``).
    The network stays in training mode inside the ELBO (dropout on, BatchNorm on batch statistics, as a
    training step of the plain network); predictions and MCMC run it in eval mode.

    Logged per step/epoch: ``{stage}/elbo`` (the ELBO estimate), ``{stage}/nll`` (expected negative
    log-likelihood of the whole training set, i.e. the minibatch NLL scaled by ``num_data / batch``) and
    ``{stage}/kl`` (``loss - nll``: the KL estimate, analytic with the mean-field ELBO), where ``stage`` is
    ``train`` or ``val``.

    ``model`` is a :class:`PyroModel` (its ``num_data`` must be the global training-set size: under DDP
    each process gets a shard, the scale must not) or a Pyro model function, whose arguments are the
    batch (``model(*batch)``); a function model whose latent sites depend on the data needs
    ``example_args`` to set the guide up. Checkpoints hold the guide (and the network's point parameters)
    and the names of the options; restore with ``SVIModule.load_from_checkpoint(path, model=...)`` given a
    model of the same architecture (a checkpoint of the ``bdl`` command holds the model's config too:
    ``load_from_checkpoint(path)``), or resume with ``Trainer.fit(module, ..., ckpt_path=path)``.

    Args:
        model: a :class:`PyroModel` or a Pyro model function.
        guide: ``"normal"``, ``"lowrank_normal"``, ``"multivariate_normal"``, ``"delta"``, or an AutoGuide.
        elbo: ``"auto"``, ``"trace"`` or ``"mean_field"``.
        num_particles: Monte Carlo samples per ELBO estimate.
        optimizer: ``"adam"``, ``"adamw"``, ``"sgd"``, or a callable ``params -> torch.optim.Optimizer``.
        lr: learning rate.
        lr_decay: ratio of the final to the initial learning rate, decayed exponentially per step over
            the Trainer's run (1 = constant).
        init_scale: initial standard deviation of Gaussian guides.
        rank: rank of the ``"lowrank_normal"`` guide.
        num_samples: posterior samples used by :meth:`predict`.
        example_args: model arguments to set the guide up with (default: none for a PyroModel).
        validate: when Pyro checks distribution arguments and the support of values
            (``pyro.validation_enabled``): ``"first"`` on this module's first loss only, which catches a
            malformed model or batch at once (default); ``"always"``, on every step (the checks scan every
            weight: 176 against 156 ms for a 784-1200-1200-10 MLP's step on 2 CPU threads); ``"never"``.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))
        >>> module = SVIModule(PyroModel(net, "categorical", num_data=64), guide="normal", lr=1e-2)
        >>> x, y = torch.randn(64, 2), torch.randint(0, 2, (64,))
        >>> data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
        >>> L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...           enable_model_summary=False).fit(module, data)
        >>> module.predict(x).probs.shape
        torch.Size([64, 2])
    """

    _hparams_not_saved: tuple[str, ...] = ()  # arguments a subclass sets from its own (kept there)

    def __init__(
        self,
        model: Union[PyroModel, Callable],
        guide: Union[str, AutoGuide] = "normal",
        *,
        elbo: str = "auto",
        num_particles: int = 1,
        optimizer: Union[str, Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]] = "adam",
        lr: float = 1e-3,
        lr_decay: float = 1.0,
        init_scale: float = 0.01,
        rank: Optional[int] = None,
        num_samples: int = 100,
        example_args: Sequence = (),
        validate: str = "first",
    ) -> None:
        super().__init__()
        if not callable(model):
            raise TypeError(f"model must be a bdl.infer.PyroModel or a Pyro model function, got {type(model).__name__}")
        if isinstance(optimizer, str) and optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {sorted(OPTIMIZERS)} or pass a callable")
        if not (isinstance(lr, numbers.Real) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {lr!r}")
        if not (isinstance(lr_decay, numbers.Real) and 0 < lr_decay <= 1):
            raise ValueError(f"lr_decay must be in (0, 1], got {lr_decay!r}")
        num_samples = check_positive_int(num_samples, "num_samples")
        if validate not in VALIDATE:
            raise ValueError(f"validate must be one of {list(VALIDATE)}, got {validate!r}")
        # Names go into the checkpoint's hyperparameters; objects (model, guide instances, callables) do not.
        ignore = ["model", "example_args", *self._hparams_not_saved]
        ignore += [name for name, value in (("guide", guide), ("optimizer", optimizer)) if not isinstance(value, str)]
        self.save_hyperparameters(ignore=ignored_hparams(ignore))
        guide_module = make_guide(guide, model, init_scale=init_scale, rank=rank)
        self.elbo = make_elbo(elbo, guide_module, num_particles=num_particles)(_RecordingModel(model), guide_module)
        self._optimizer_spec = optimizer
        self.lr = float(lr)
        self.lr_decay = float(lr_decay)
        self.num_samples = num_samples
        self.validate = validate
        self._validated = False
        self._params_checked = False
        with private_param_store():
            # Creates the guide's parameters now: before configure_optimizers, and before a checkpoint's
            # state_dict is loaded into them.
            try:
                self.guide(*tuple(example_args))
            except TypeError as error:
                if example_args or isinstance(model, PyroModel) or "argument" not in str(error):
                    raise
                raise TypeError(
                    f"SVIModule: the model function needs arguments to set the guide up ({error}); pass "
                    "example_args=(x, y), e.g. a batch of the training data"
                ) from error
        self.elbo.model.traces.clear()

    @property
    def model(self) -> Union[PyroModel, Callable]:
        """The Pyro model (a :class:`PyroModel` or a function)."""
        return self.elbo.model.model

    @property
    def guide(self) -> AutoGuide:
        """The variational distribution (a Pyro autoguide)."""
        return self.elbo.guide

    def configure_optimizers(self) -> Any:
        params = [p for p in self.elbo.parameters() if p.requires_grad]
        if not params:  # torch's "optimizer got an empty parameter list", before the first loss's check
            raise ValueError(
                "SVIModule: nothing to train: the guide and the model hold no parameter the optimizer can train (a "
                "model without latent sites, or a guide function's pyro.param, which each step's fresh parameter "
                "store leaves at its initial value: make the parameters a PyroModule's PyroParam or nn.Parameter)"
            )
        spec = self._optimizer_spec
        optimizer = spec(params) if callable(spec) else OPTIMIZERS[spec](params, lr=self.lr)
        if self.lr_decay == 1.0 or self._trainer is None:
            return optimizer
        scheduler = exponential_decay(optimizer, self.lr_decay, lambda: stepping_batches(self.trainer))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # the random state too: a resumed fit draws as an uninterrupted one
        if isinstance(self.model, PyroModel):
            checkpoint["bdl_num_data"] = self.model.num_data  # for a resumed fit of a PyroModel made without it

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        # a resumed fit (a Trainer loads it) continues on its data; load_from_checkpoint leaves it to the caller (a
        # fine-tuning fit on other data with the checkpoint's size weighted the KL wrongly, silently)
        if isinstance(self.model, PyroModel) and self.model.num_data is None and self._trainer is not None:
            self.model.num_data = checkpoint.get("bdl_num_data")

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._check_num_data()

    def _check_num_data(self) -> None:
        if isinstance(self.model, PyroModel) and self.model.num_data is None:
            raise ValueError(
                "SVIModule: the PyroModel's num_data is None; set it to the size of the whole training set "
                "(all processes together) so each minibatch's likelihood is scaled by num_data / batch_size"
            )

    def loss(self, *args) -> tuple[Tensor, Tensor, Tensor]:
        """``(loss, nll, kl)`` for one batch of model arguments: ``loss = -ELBO`` (differentiable)."""
        if isinstance(self.model, PyroModel) and (len(args) < 2 or not isinstance(args[1], Tensor)):
            # Pyro failed with a bare KeyError: 'obs' (the guide, built with targets, had no site for them)
            raise ValueError(
                f"SVIModule on a PyroModel needs (inputs, targets) batches, got {len(args)} tensor(s) without targets: "
                "a loader of (x, y) pairs, or loss(x, y)"
            )
        check = self.validate == "always" or (self.validate == "first" and not self._validated)
        with private_param_store(), pyro.validation_enabled(check):
            try:
                loss = self.elbo(*args)
            except torch.linalg.LinAlgError as error:  # a low-rank or full-covariance guide's Cholesky factor
                collapsed = collapsed_scales(self.guide)
                if not collapsed:
                    raise
                raise FloatingPointError(
                    f"SVIModule: the guide's covariance is singular ({str(error).splitlines()[0]}): its scale is 0 in {first_few(collapsed)} "
                    "(an unconstrained scale that underflowed); lower the learning rate"
                ) from error
            if not self._params_checked:
                self._check_params_train()
        if torch.is_grad_enabled():  # a training step: the sanity check's validation batch used up "first"
            self._validated = True
        nll = self.elbo.model.pop_nll().to(loss.device)
        return loss, nll, loss.detach() - nll

    def _check_params_train(self) -> None:
        """Refuse Pyro parameters of the first loss's model and guide that the optimizer would not train."""
        trained = {id(parameter) for parameter in self.elbo.parameters()}
        traces = self.elbo.model.traces
        untrained = _untrained_param_sites(traces[0] if traces else None, dict(pyro.get_param_store().named_parameters()), trained)
        if untrained:  # on every loss until it passes: a second fit of the refused module trained silently
            raise ValueError(f"SVIModule: the pyro.param sites {list(untrained)} would not be trained: {_untrained_advice(untrained)}")
        self._params_checked = True

    def _step(self, batch: Any, stage: str) -> Tensor:
        args = _as_args(batch)
        loss, nll, kl = self.loss(*args)
        if stage == "train":
            self._check_loss(loss, nll, kl)
        elif stage == "val" and getattr(self, "_val_error", None) is None and not bool(torch.isfinite(loss.detach())):
            # logged as NaN, silently (the fit went on, and a checkpoint monitor read NaN); raised at the epoch's end,
            # in every process at once (processes may hold other numbers of validation batches)
            self._val_error = FloatingPointError(
                f"non-finite validation loss at epoch {self.current_epoch} (loss={loss.item()}, nll={nll.item():.4g}): "
                "check the validation inputs and targets for NaN/inf"
            )
        batch_size = args[0].shape[0] if args and isinstance(args[0], Tensor) and args[0].dim() else 1
        on_step = stage == "train"
        # averaged over processes under DDP, training values too (their epoch means were each process's own)
        self.log(f"{stage}/elbo", -loss.detach(), on_step=on_step, on_epoch=True, prog_bar=True, batch_size=batch_size, sync_dist=True)
        self.log(f"{stage}/nll", nll, on_step=on_step, on_epoch=True, batch_size=batch_size, sync_dist=True)
        self.log(f"{stage}/kl", kl, on_step=on_step, on_epoch=True, batch_size=batch_size, sync_dist=True)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def _check_loss(self, loss: Tensor, nll: Tensor, kl: Tensor) -> None:
        """Stop at a non-finite training loss (a step on it makes every parameter NaN, and the fit went on), on every
        process of a distributed run (the others met a closed connection at their next collective, or waited)."""
        error = None
        if not bool(torch.isfinite(loss.detach())):
            # the kl is loss - nll: with a non-finite NLL it says nothing of the guide's KL (a NaN input read "KL not finite")
            told = bool(torch.isfinite(nll))
            error = FloatingPointError(
                f"non-finite training loss at epoch {self.current_epoch}, step {self.global_step} (loss={loss.item()}, "
                f"nll={nll.item():.4g}{f', kl={kl.item():.4g}' if told else ''}); "
                f"{non_finite_where(self, kl_too=told, collapsed=collapsed_scales(self.guide))}; "
                "lower the learning rate, check the inputs for NaN/inf, or check the prior and guide scales (init_scale)"
            )
        raise_on_every_process(self, error, "non-finite training loss")

    def on_train_end(self) -> None:
        check_trained_parameters(self)  # a last step whose loss was finite and whose gradient was not

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:  # a pass's first batch: not an error of an earlier pass that raised before its end
            self._val_error, self._val_error_told = None, False
        with torch.no_grad():
            self._step(batch, "val")
        if batch_idx + 1 == validation_batches(self):  # this process's last batch: here, not in a hook a subclass
            self._raise_validation_error()  # may override without calling super (its NaN went on silently)

    def on_validation_epoch_end(self) -> None:
        if not getattr(self, "_val_error_told", False):  # a loader of no length: its last batch was not known
            self._raise_validation_error()

    def _raise_validation_error(self) -> None:
        # once per pass in every process, which may hold another number of batches: a collective
        error, self._val_error, self._val_error_told = getattr(self, "_val_error", None), None, True
        raise_on_every_process(self, error, "non-finite validation loss")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> "Prediction":  # noqa: ANN401
        """``trainer.predict``: a :class:`bdl.Prediction` of each batch's inputs (its first element; targets are
        ignored), from :meth:`predict` (a PyroModel only). Merge them with ``Prediction.cat``."""
        if not isinstance(self.model, PyroModel):  # Lightning's default forward(batch) failed on x.device of a list
            raise TypeError(
                "SVIModule.predict_step needs a PyroModel; for a model function call module.predict(args, task=...)"
            )
        return self.predict(_as_args(batch)[0])

    def sample_outputs(self, x: Tensor, num_samples: int) -> Union[Tensor, tuple[Tensor, Tensor]]:
        """``num_samples`` posterior draws of the model's predictive outputs on ``x`` (PyroModel only).

        Weights are drawn from the guide and the network runs vectorised over them; the likelihood turns
        the outputs into what :func:`bdl.predict` expects: logits ``[S, N, C]`` for classification
        (two-class logits for a Bernoulli likelihood), ``(means, noise variances)`` ``[S, N, D]`` for
        regression. So ``bdl.predict(module, x, num_samples=S, task=module.model.task)`` works as for
        any bdl model. The network runs in eval mode and without gradients, whatever the module's mode (after
        a fit it is in training mode: dropout fired, and BatchNorm took the test batch's statistics).
        """
        if not isinstance(self.model, PyroModel):
            raise TypeError("SVIModule.sample_outputs needs a PyroModel; for a model function use predict(..., task=...)")
        with torch.no_grad(), _eval_mode(self.model):
            samples = self.sample_posterior(num_samples)
            samples = {name: value.to(x.device) for name, value in samples.items()}
            outputs = network_outputs(self.model, samples, x)
            return self.model.likelihood.predictive_outputs(outputs, samples)

    def forward(self, x: Tensor) -> Union[Tensor, tuple[Tensor, Tensor]]:
        """One posterior draw of the predictive outputs on ``x`` (see :meth:`sample_outputs`)."""
        outputs = self.sample_outputs(x, 1)
        return tuple(o[0] for o in outputs) if isinstance(outputs, tuple) else outputs[0]

    def sample_posterior(self, num_samples: Optional[int] = None, *args, parallel: bool = True, **kwargs) -> dict[str, Tensor]:
        """``{site: [S, *shape]}``: S draws of every latent site from the fitted guide.

        ``*args``/``**kwargs`` are the model's arguments, needed only by function models whose latent sites
        depend on the data.
        """
        with private_param_store():
            return sample_guide(self.guide, self.num_samples if num_samples is None else num_samples, *args, parallel=parallel, **kwargs)

    def predict(
        self,
        inputs: Any,
        *,
        num_samples: Optional[int] = None,
        keep_samples: bool = False,
        output_site: str = "obs",
        task: Optional[str] = None,
        parallel: Optional[bool] = None,
    ) -> "Prediction":
        """Posterior predictive on ``inputs`` as a :class:`bdl.Prediction`.

        For a :class:`PyroModel`, ``inputs`` is a tensor or an iterable of batches and the network runs
        vectorised over the posterior samples. For a model function, ``inputs`` is the tuple of the
        model's arguments (observations None) and ``output_site``/``task`` name what to read (see
        :func:`predict_function_model`).

        Args:
            inputs: the inputs.
            num_samples: posterior samples S (default ``self.num_samples``).
            keep_samples: keep per-sample predictions.
            output_site: site read for a function model.
            task: ``"classification"`` or ``"regression"`` for a function model.
            parallel: vectorise over samples (the guide's draws, and the model's runs on them), or draw one at a
                time; None: vectorise, and run a function model draw by draw where it fails under a batch of
                draws (``x @ w``).

        Returns:
            a :class:`bdl.Prediction`.
        """
        num_samples = self.num_samples if num_samples is None else num_samples  # 0 was read as "the default"
        vectorize = parallel is not False
        if isinstance(self.model, PyroModel):
            samples = self.sample_posterior(num_samples, parallel=vectorize)
            return predict_from_samples(self.model, samples, inputs, keep_samples=keep_samples, vectorize=vectorize)
        if task not in TASKS:
            raise ValueError(f"predict on a model function needs task in {TASKS}, got {task!r}")
        args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        with private_param_store():
            samples = sample_guide(self.guide, num_samples, *args, parallel=vectorize)
            return predict_function_model(
                self.model, samples, *args, output_site=output_site, task=task, parallel=parallel, keep_samples=keep_samples
            )


def svi(
    model: Union[PyroModel, Callable],
    *args,
    guide: Union[str, AutoGuide] = "normal",
    num_steps: int = 1000,
    optimizer: Union[str, Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]] = "adam",
    lr: float = 1e-2,
    lr_decay: float = 0.01,
    elbo: str = "auto",
    num_particles: int = 1,
    init_scale: float = 0.01,
    rank: Optional[int] = None,
    num_samples: int = 100,
) -> SVIModule:
    """Fit a guide by full-batch SVI in a plain loop (no Trainer), for small models and data.

    The same :class:`SVIModule` that Lightning trains, stepped ``num_steps`` times on ``model(*args)``.
    Use the Lightning Trainer for minibatches, logging and checkpoints.

    Args:
        model: a :class:`PyroModel` or a Pyro model function.
        *args: the model's arguments (the whole data set).
        guide: guide name or AutoGuide (see :func:`make_guide`).
        num_steps: optimisation steps, >= 1.
        optimizer: ``"adam"``, ``"adamw"``, ``"sgd"``, or a callable ``params -> torch.optim.Optimizer``.
        lr: initial learning rate (of a named optimizer).
        lr_decay: ratio of the final to the initial learning rate (exponential decay per step), in (0, 1].
            SVI gradients are noisy; a decaying step size lets the last iterate settle at the optimum.
        elbo: ``"auto"``, ``"trace"`` or ``"mean_field"``.
        num_particles: Monte Carlo samples per ELBO estimate.
        init_scale: initial standard deviation of Gaussian guides.
        rank: rank of the ``"lowrank_normal"`` guide.
        num_samples: default posterior samples of the returned module's ``predict``.

    Returns:
        the fitted :class:`SVIModule`; ``.losses`` holds the loss (-ELBO) of every step.

    Raises:
        ValueError: a PyroModel's data ``x`` or ``y`` hold NaN or inf (the first bad row is named).
        FloatingPointError: the loss is not finite at a step (e.g. a learning rate too large): the fit stops
            there rather than return a module with NaN parameters.

    Warns:
        UserWarning: the loss was still falling over the last two tenths of the steps (beyond their noise): the
            defaults move a parameter about 2 units in all, short of a weight of 5 (raise ``num_steps`` or ``lr``).

    Example:
        >>> def model(y):
        ...     mu = pyro.sample("mu", pyro.distributions.Normal(0.0, 10.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("obs", pyro.distributions.Normal(mu, 1.0), obs=y)
        >>> fitted = svi(model, torch.randn(50) + 3.0, num_steps=200, lr=0.1)
        >>> bool(abs(fitted.sample_posterior(500)["mu"].mean() - 3.0) < 0.5)
        True
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if isinstance(model, PyroModel):
        check_full_data("svi", model, args)
        check_finite_data("svi", args)
    module = SVIModule(
        model,
        guide,
        elbo=elbo,
        num_particles=num_particles,
        optimizer=optimizer,
        lr=lr,
        lr_decay=lr_decay,  # recorded (its hparams said a constant rate), and kept by a Trainer fit of the module
        init_scale=init_scale,
        rank=rank,
        num_samples=num_samples,
        example_args=args,
    )
    optimizer_name = optimizer
    optimizer = module.configure_optimizers()  # no Trainer attached: the optimizer alone
    scheduler = exponential_decay(optimizer, lr_decay, num_steps)
    losses = []
    for step in range(num_steps):
        optimizer.zero_grad(set_to_none=True)
        loss, _, _ = module.loss(*args)
        value = loss.item()
        if not math.isfinite(value):
            # a step on a NaN loss makes every parameter NaN, and the run went on to return that "fit"
            learning_rate = f"lr={lr:g}" if isinstance(optimizer_name, str) else "the optimizer's learning rate"
            raise FloatingPointError(
                f"svi: the loss is not finite at step {step + 1} of {num_steps} (loss={value}); "
                f"{non_finite_where(module, kl_too=True, collapsed=collapsed_scales(module.guide))}; lower {learning_rate}, "
                "check the data for NaN/inf, or check the prior and guide scales (init_scale)"
            )
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(value)
    module.losses = losses
    falling = _still_falling(losses)
    if falling:  # a fit stopped halfway (lr 1e-2 decayed over 1000 steps moves a weight about 2 units: 2.1 of 4.9)
        warnings.warn(
            f"svi: the loss was still falling at the end ({falling}): the guide has likely not converged; raise "
            "num_steps or lr, or lr_decay towards 1 (a constant rate)",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
    return module


def _still_falling(losses: Sequence[float]) -> Optional[str]:
    """Where the mean loss of the last tenth of the steps is below the tenth before by more than three standard
    errors (the steps' noise) and more than 0.2% of the fall since the first tenth, and that tenth below the one
    before it by as much again (a constant rate's slow drift of a converged loss tripped the one comparison: an
    eight-schools fit of 8000 steps at lr 0.02): the numbers, else None. Under a decayed rate a fit far from its optimum can move too
    little at the end to be seen (not warned)."""
    window = len(losses) // 10
    if window < 5:
        return None
    first, earlier, before, last = (np.asarray(losses[start : start + window]) for start in (0, len(losses) - 3 * window, len(losses) - 2 * window, len(losses) - window))
    fall, fell = before.mean() - last.mean(), earlier.mean() - before.mean()
    noise = math.sqrt((before.var(ddof=1) + last.var(ddof=1)) / window)
    if fall > 3 * noise and fell > 3 * noise and fall > 0.002 * (first.mean() - last.mean()):
        return f"mean {last.mean():.6g} over the last {window} steps, {before.mean():.6g} over the {window} before"
    return None
