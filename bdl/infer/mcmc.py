"""Markov chain Monte Carlo (NUTS / HMC) on a Bayesian model, with convergence diagnostics."""

from __future__ import annotations

import math
import multiprocessing
import numbers
import os
import sys
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import pyro
import torch
import torch.multiprocessing
from pyro import poutine
from pyro.infer import HMC, MCMC, NUTS
from pyro.ops import stats
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, SequentialSampler, TensorDataset

from .._messages import first_few, index_list
from .diagnostics import ess_bulk, ess_mean, ess_tail, rank_r_hat
from .model import PyroModel, check_finite_data, check_full_data
from .predictive import TASKS, _eval_mode, predict_from_samples, predict_function_model, private_param_store

if TYPE_CHECKING:  # pragma: no cover
    from ..predict import Prediction

#: Kernel names -> Pyro MCMC kernels.
KERNELS: dict[str, type] = {"nuts": NUTS, "hmc": HMC}
CHAIN_METHODS = ("sequential", "parallel")


def _constant_elements(chains: Tensor) -> Tensor:
    """``[*shape]`` bool: the elements of ``[num_chains, num_samples, *shape]`` draws equal in every draw, to a
    finite value (an element infinite in every draw is not a 0 / 0 to leave out: its statistics are unknown)."""
    return ((chains == chains[:1, :1]) & chains.isfinite()).flatten(0, 1).all(0)


_SAMPLE_SIZES = ("n_eff", "ess_bulk", "ess_tail")
_DIAGNOSTICS = ("n_eff", "r_hat", "ess_bulk", "ess_tail", "rank_r_hat")


class PosteriorSummary:
    """Per-parameter posterior summary of MCMC samples: mean, std, quantiles, ESS and split R-hat.

    The classic diagnostics: mean, std, ``r_hat`` = :func:`pyro.ops.stats.split_gelman_rubin` (Gelman et al.,
    BDA3 ch. 11, as ``pyro.infer.mcmc.util.summary`` reports it), ``n_eff`` = Stan's effective sample size of
    the mean (:func:`bdl.infer.diagnostics.ess_mean`, ArviZ's ``ess(method="mean")``: at most ``S log10(S)``
    for ``S`` draws, where Pyro's ``effective_sample_size`` gave 569 for 4 chains of 10 independent draws)
    and :func:`pyro.ops.stats.quantile` for the quantile columns (labelled ``"5.0%"``, or with the digits a
    level needs: ``"0.05%"``); and the rank-normalised diagnostics of Vehtari et al. (2021), as Stan and
    ArviZ report them (:mod:`bdl.infer.diagnostics`): ``ess_bulk``, ``ess_tail`` and ``rank_r_hat``, which
    also catch chains that differ in spread only and hold for heavy tails. Vehtari et al. call chains
    converged when ``rank_r_hat`` is below 1.01 and both ESS are above 100 per chain (400 for four chains).

    ``summary[site]`` is a dict ``{statistic: tensor shaped like the site}``; ``str(summary)`` is a table
    with one row per scalar element (``"weight[0,2]"``). An element equal in every draw has NaN ESS and
    R-hat (0 / 0), the site's other elements their own values. An element with a NaN (or infinite) draw has
    NaN statistics too (rank diagnostics of infinite draws excepted: ranks exist), and a warning names it.

    Args:
        chain_samples: ``{site: [num_chains, num_samples, *shape]}``.
        quantiles: the quantile levels to report, distinct, in (0, 1).

    Example:
        >>> samples = {"mu": torch.randn(2, 200)}
        >>> summary = PosteriorSummary(samples)
        >>> sorted(summary["mu"])
        ['25.0%', '5.0%', '50.0%', '75.0%', '95.0%', 'ess_bulk', 'ess_tail', 'mean', 'n_eff', 'r_hat', 'rank_r_hat', 'std']
        >>> bool(summary.max_r_hat < 1.05), bool(summary.max_rank_r_hat < 1.05)
        (True, True)
    """

    @classmethod
    def check_quantiles(cls, quantiles: Sequence[float]) -> tuple[float, ...]:
        """``quantiles`` as floats, or a ValueError unless they are distinct levels in (0, 1) (mcmc checks them
        before sampling)."""
        scalar = not isinstance(quantiles, Iterable) or getattr(quantiles, "ndim", None) == 0  # 0.5, tensor(0.5)
        given = (quantiles,) if scalar else tuple(quantiles)  # a generator: read once
        try:  # numbers, or 0-dim tensors / numpy scalars
            levels = [float(q) for q in given if not isinstance(q, (bool, str))]
        except (TypeError, ValueError):
            levels = []
        if len(levels) != len(given) or not all(0 < q < 1 for q in levels):
            raise ValueError(f"quantiles must be numbers in (0, 1), got {given}")
        quantiles = levels
        labels = [cls._label(q) for q in quantiles]
        if len(set(labels)) < len(labels):
            # one column per label: the first of two levels showed the second's values
            raise ValueError(f"quantiles must be distinct levels, got {tuple(quantiles)} (columns {labels})")
        return tuple(quantiles)

    def __init__(self, chain_samples: dict[str, Tensor], quantiles: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95)) -> None:
        quantiles = self.check_quantiles(quantiles)
        for name, value in chain_samples.items():
            if value.dim() < 2 or value.shape[1] < 4:
                raise ValueError(f"chain_samples[{name!r}] must be [num_chains, num_samples >= 4, ...], got shape {tuple(value.shape)}")
        self.quantiles = tuple(float(q) for q in quantiles)
        self.table: dict[str, dict[str, Tensor]] = {}
        # elements whose diagnostics are 0 / 0 (equal in every draw): left out of max_r_hat, min_ess...
        self._constant: dict[str, Tensor] = {}
        not_finite = []
        for name, value in chain_samples.items():
            value = value.detach().double()
            if value[0, 0].numel() == 0:  # a site of no elements: empty statistics (Pyro's R-hat failed a reshape)
                names = ["mean", "std", *map(self._label, self.quantiles), "n_eff", "r_hat", "ess_bulk", "ess_tail", "rank_r_hat"]
                self.table[name] = {column: value.new_empty(value.shape[2:]) for column in names}
                self._constant[name] = torch.zeros(value.shape[2:], dtype=torch.bool, device=value.device)
                continue
            flat = value.flatten(0, 1)
            finite = flat.isfinite().all(0)
            q = stats.quantile(flat, list(self.quantiles), dim=0)
            row = {"mean": flat.mean(0), "std": flat.std(0)}
            # sorting puts NaN last: the lower quantiles of draws with NaN looked like numbers
            row.update({self._label(level): q[i].masked_fill(flat.isnan().any(0), math.nan) for i, level in enumerate(self.quantiles)})
            row.update({"n_eff": ess_mean(value), "r_hat": stats.split_gelman_rubin(value, chain_dim=0, sample_dim=1)})
            row.update({"ess_bulk": ess_bulk(value), "ess_tail": ess_tail(value), "rank_r_hat": rank_r_hat(value)})
            self.table[name] = row
            self._constant[name] = _constant_elements(value)
            not_finite += [self._element_label(name, index) for index in (~finite).nonzero().tolist()]
        if not_finite:
            shown = first_few(not_finite, 5)
            warnings.warn(
                f"PosteriorSummary: the draws of {shown} hold NaN or infinite values: their classic statistics (mean, "
                "std, n_eff, r_hat) are not finite, and so are max_r_hat and min_ess (with NaN draws the rank-normalised "
                "ones and their headline numbers too; infinite draws still have ranks); the chain diverged, or the "
                "model's outputs overflowed",
                RuntimeWarning,
                stacklevel=2,
            )

    @staticmethod
    def _label(level: float) -> str:
        """``"5.0%"``; with the digits the level needs where one decimal would round it (``"0.05%"``)."""
        percent = 100 * level
        short = f"{percent:.1f}"
        # (to float32's precision: a level given as a float32 tensor, 0.05000000075, is "5.0%")
        return f"{short}%" if math.isclose(float(short), percent, rel_tol=1e-7) else f"{percent:.10g}%"

    @staticmethod
    def _element_label(name: str, index: Sequence[int]) -> str:
        return name + (f"[{','.join(map(str, index))}]" if index else "")

    def __getitem__(self, site: str) -> dict[str, Tensor]:
        return self.table[site]

    def __iter__(self):
        return iter(self.table)

    def __len__(self) -> int:
        return len(self.table)

    @property
    def columns(self) -> list[str]:
        """The statistics in table order: ``mean``, ``std``, the quantile labels, then ``n_eff``, ``r_hat``,
        ``ess_bulk``, ``ess_tail`` and ``rank_r_hat``."""
        return ["mean", "std", *map(self._label, self.quantiles), *_DIAGNOSTICS]

    @property
    def max_r_hat(self) -> float:
        """Largest split R-hat over all parameters (converged chains: close to 1, e.g. < 1.01).

        Elements equal in every draw of every chain (R-hat 0 / 0, NaN in the table) are left out, so one
        of them cannot hide the others' values; NaN when every element is one, or when an element's draws
        hold NaN (its R-hat is unknown, so is the largest).
        """
        return self._over_elements("r_hat", largest=True)

    @property
    def max_rank_r_hat(self) -> float:
        """Largest rank-normalised R-hat over all parameters (Vehtari et al. 2021: converged below 1.01); elements
        equal in every draw left out, as for :attr:`max_r_hat`."""
        return self._over_elements("rank_r_hat", largest=True)

    @property
    def min_ess_bulk(self) -> float:
        """Smallest bulk effective sample size over all parameters (elements equal in every draw left out)."""
        return self._over_elements("ess_bulk", largest=False)

    @property
    def min_ess_tail(self) -> float:
        """Smallest tail effective sample size (5% and 95% quantiles) over all parameters (elements equal in every
        draw left out)."""
        return self._over_elements("ess_tail", largest=False)

    @property
    def min_ess(self) -> float:
        """Smallest effective sample size over all parameters (elements equal in every draw left out, as
        for :attr:`max_r_hat`)."""
        return self._over_elements("n_eff", largest=False)

    def _over_elements(self, column: str, *, largest: bool) -> float:
        values = torch.cat([row[column].reshape(-1) for row in self.table.values()])
        constant = torch.cat([self._constant[name].reshape(-1) for name in self.table])
        # only the 0 / 0 of an element that never moved is left out (predictive_summary gives those a value);
        # any other NaN (draws with NaN) makes the answer NaN, as it is unknown
        values = values[~(constant & values.isnan())]
        if not len(values) or bool(values.isnan().any()):
            return math.nan
        return float(values.max() if largest else values.min())

    def rows(self) -> list[tuple[str, dict[str, float]]]:
        """One ``(label, {column: value})`` per scalar element of every site."""
        out = []
        for name, row in self.table.items():
            shape = row["mean"].shape
            for index in (torch.cartesian_prod(*[torch.arange(n) for n in shape]).reshape(-1, len(shape)).tolist() if shape else [[]]):
                out.append((self._element_label(name, index), {col: float(row[col][tuple(index)]) for col in self.columns}))
        return out

    def to_string(self, max_rows: int = 50) -> str:
        """The table as text, at most ``max_rows`` rows (the remainder is counted)."""
        rows = self.rows()
        width = max([len(label) for label, _ in rows[:max_rows]] + [9])
        lines = [f"{'parameter':<{width}} " + " ".join(f"{c:>9}" for c in self.columns)]
        for label, values in rows[:max_rows]:
            lines.append(f"{label:<{width}} " + " ".join(f"{values[c]:>9.3f}" if c not in _SAMPLE_SIZES else f"{values[c]:>9.1f}" for c in self.columns))
        if len(rows) > max_rows:
            lines.append(f"... {len(rows) - max_rows} more rows")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_string()

    def __repr__(self) -> str:
        return f"PosteriorSummary(sites={list(self.table)}, max_r_hat={self.max_r_hat:.3f}, min_ess={self.min_ess:.1f})"


@dataclass
class MCMCResult:
    """What :func:`mcmc` returns.

    Attributes:
        samples: ``{site: [num_chains * num_samples, *shape]}`` (chains concatenated).
        chain_samples: ``{site: [num_chains, num_samples, *shape]}``.
        summary: the :class:`PosteriorSummary` (mean, std, quantiles, n_eff, r_hat per parameter).
        diagnostics: per chain, ``"divergences"`` (the number of divergent transitions after warm-up) and
            ``"acceptance_rate"`` (Pyro's: the fraction of draws after warm-up that moved to a new state, not the
            mean acceptance probability its progress bar shows and ``target_accept_prob`` adapts the step to).
        prediction: the posterior predictive on the prediction inputs, or None.
        model: the model that was sampled.

    Example:
        >>> def location(y):  # ten observations of N(mu, 1), mu ~ N(0, 10^2)
        ...     mu = pyro.sample("mu", pyro.distributions.Normal(0.0, 10.0))
        ...     pyro.sample("obs", pyro.distributions.Normal(mu, 1.0).expand([10]).to_event(1), obs=y)
        >>> result = mcmc(location, torch.full((10,), 2.0), num_samples=50, warmup_steps=50, seed=0)
        >>> result.chain_samples["mu"].shape, result.samples["mu"].shape, result.prediction is None
        (torch.Size([2, 50]), torch.Size([100]), True)
    """

    samples: dict[str, Tensor]
    chain_samples: dict[str, Tensor]
    summary: PosteriorSummary
    diagnostics: dict[str, list[float]]
    prediction: Optional["Prediction"]
    model: Any = field(repr=False)

    def predict(
        self,
        inputs: Any,  # noqa: ANN401
        *,
        keep_samples: bool = False,
        output_site: str = "obs",
        task: Optional[str] = None,
        parallel: Optional[bool] = None,
    ) -> "Prediction":
        """Posterior predictive on new inputs (a tensor / batches for a PyroModel, model arguments otherwise).

        ``parallel`` (model functions only): run the model once for all draws (it must broadcast over a
        leading sample dimension) or once per draw; None tries the first and falls back to the second
        when the model does not broadcast.
        """
        if isinstance(self.model, PyroModel):
            return predict_from_samples(self.model, self.samples, inputs, keep_samples=keep_samples)
        if task not in TASKS:
            raise ValueError(f"predict on a model function needs task in {TASKS}, got {task!r}")
        args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        with private_param_store():
            return predict_function_model(
                self.model, self.samples, *args, output_site=output_site, task=task, parallel=parallel, keep_samples=keep_samples
            )

    def predictive_summary(self, inputs: Any, *, output_site: str = "obs", task: Optional[str] = None) -> PosteriorSummary:
        """Convergence in function space: ESS and split R-hat of the predictions on ``inputs``, per input and output.

        A network's posterior holds symmetric copies of every mode (hidden units permuted, or sign-flipped
        around an odd activation, compute the same function), so two chains in different copies give a
        weight-space R-hat far above 1 while agreeing on every prediction. What the posterior predictive
        averages are the per-draw predictions: class probabilities (site ``"probs"``, ``[N, C]``) for
        classification; predicted means (``"mean"``, ``[N, D]``) and, where the model predicts them, noise
        variances (``"variance"``) for regression. Their R-hat near 1 (e.g. < 1.01, Vehtari et al. 2021) and
        ESS are the check that matters for predictions (Izmailov et al. 2021, "What Are Bayesian Neural
        Network Posteriors Really Like?", compare chains in function space for the same reason). An output
        that is the same in every draw (a saturated probability, a known noise variance) gets R-hat 1 and ESS
        ``inf`` rather than the NaN of 0 / 0, unless no parameter ever moved (stuck chains stay NaN).

        Args:
            inputs: as for :meth:`predict`.
            output_site, task: as for :meth:`predict` (model functions only).

        Returns:
            a :class:`PosteriorSummary` whose "parameters" are the prediction sites above.

        Example:
            >>> def model(x, y=None):
            ...     slope = pyro.sample("slope", pyro.distributions.Normal(0.0, 1.0))
            ...     with pyro.plate("data", x.shape[0]):
            ...         return pyro.sample("obs", pyro.distributions.Normal(slope * x, 0.1), obs=y)
            >>> x = torch.linspace(-1, 1, 20)
            >>> result = mcmc(model, x, 0.5 * x, num_samples=50, warmup_steps=50, seed=0)
            >>> summary = result.predictive_summary(x[:3], task="regression")
            >>> summary["mean"]["r_hat"].shape, bool(summary.max_r_hat < 1.1)
            (torch.Size([3, 1]), True)
        """
        num_chains, num_draws = next(iter(self.chain_samples.values())).shape[:2]
        prediction = self.predict(inputs, keep_samples=True, output_site=output_site, task=task)
        if prediction.task == "classification":
            sites = {"probs": prediction.sample_probs}
        else:
            sites = {"mean": prediction.sample_means, "variance": prediction.sample_variances}
        # ``samples`` concatenates the chains in order, and so do the predictions drawn from it
        draws = {name: value.reshape(num_chains, num_draws, *value.shape[1:]) for name, value in sites.items() if value is not None}
        summary = PosteriorSummary(draws)
        # Chains that never left their (common) start leave every output constant too: that stays NaN
        if any(bool((value != value[:1, :1]).any()) for value in self.chain_samples.values()):
            for name, value in draws.items():
                # An output equal in every draw (a probability saturated at 0 or 1, a known noise variance) has
                # nothing to mix: R-hat and ESS are 0 / 0 there, reported as converged and exact
                constant = _constant_elements(value)
                for column in _DIAGNOSTICS:
                    summary[name][column][constant] = math.inf if column in _SAMPLE_SIZES else 1.0
        return summary


_TRIAL_SECONDS = 300  # a spawned process that has not loaded the model by then: not a verdict, a warning


_RERUN_CALLED_MCMC = [False]  # in a spawned process: its script, run again to load the model, called mcmc


def _loaded(*payload: Any) -> None:  # noqa: ANN401
    """A trial worker's work: none. Unpickling ``payload`` (the model, kernel options and data), which the
    spawned process did before calling this, is the test; and its script must not have called ``mcmc`` while
    it ran again (a user's ``except`` may have caught that error, not hidden from the parent)."""
    if _RERUN_CALLED_MCMC[0]:
        raise SystemExit(3)


def _spawn_failure_cause() -> str:
    """Why a spawned process could not load a model of ``__main__``, and what to do, as far as ``__main__`` tells."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    spec = getattr(getattr(main, "__spec__", None), "name", None)
    if path is not None and not os.path.isfile(os.path.join(multiprocessing.process.ORIGINAL_DIR or "", path)):
        return f"the script, {path!r}, is no file a spawned process can run (read from standard input): run it from a file"
    if spec == "__main__" or (spec or "").endswith(".__main__"):
        return (
            "the script is a package's __main__ (python -m package, a folder or a zipapp), which a spawned process "
            "does not import: define the model in another module of the package"
        )
    return (
        "define the model (and its network class) at module level of an importable .py file, with the script's own "
        "code under `if __name__ == \"__main__\":` (a spawned process runs the rest of the script again)"
    )


def _check_spawnable(model: Any, args: tuple, kernel_options: Optional[dict]) -> None:  # noqa: ANN401
    """Raise a ValueError where chains in spawned worker processes could not load the model.

    A worker that cannot (a model defined inside a function, in a notebook, under ``if __name__ ==
    "__main__":``, in a script run with ``python -m`` or from standard input, or a script without that guard,
    which the worker runs again up to its ``mcmc`` call) dies before its first draw, and Pyro's parent
    process waited for its draws forever. So one process is spawned first with the same payload, as Pyro
    spawns its workers, and must load it and exit cleanly: a few seconds (it imports torch and what the
    model needs) before chains that take longer.
    """
    if multiprocessing.current_process().daemon:  # a DataLoader's or Pyro's worker: it may start no process
        raise ValueError(
            "mcmc: chain_method=\"parallel\" starts a process per chain, which a daemonic process (a DataLoader's or "
            "another sampler's worker) may not do: use chain_method=\"sequential\" there"
        )
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # this is a spawned process running the script again: its mcmc call would start processes of its own
        _RERUN_CALLED_MCMC[0] = True
        raise RuntimeError(
            "mcmc was called while a spawned process was loading the script: the script's own code must run under "
            "`if __name__ == \"__main__\":`"
        )
    sequential = "or use chain_method=\"sequential\""
    trial = torch.multiprocessing.get_context("spawn").Process(target=_loaded, args=(model, kernel_options, args), daemon=True)
    try:
        trial.start()
    except Exception as error:  # noqa: BLE001 - pickling here: a local function, a lambda, data with a graph
        graph = any(isinstance(arg, Tensor) and arg.grad_fn is not None for arg in args)
        what = "the data (a tensor with an autograd graph: pass it detached, x.detach())" if graph else "the model"
        raise ValueError(
            f"mcmc: chain_method=\"parallel\" runs each chain in a spawned process, which loads the model and data "
            f"from a pickle, and {what} cannot be sent to one ({type(error).__name__}: {error}); "
            + ("" if graph else _spawn_failure_cause() + ", ") + sequential
        ) from error
    trial.join(_TRIAL_SECONDS)
    if trial.is_alive():
        trial.kill()
        trial.join()
        warnings.warn(
            f"mcmc: a trial spawned process had not loaded the model after {_TRIAL_SECONDS} s; sampling in "
            "processes anyway (if the chains never finish, use chain_method=\"sequential\")",
            UserWarning,
            stacklevel=3,
        )
    elif trial.exitcode != 0:
        cause = (
            "the script called mcmc again when the process ran it: put the script's own code under "
            "`if __name__ == \"__main__\":`"
            if trial.exitcode == 3
            else _spawn_failure_cause()
        )
        raise ValueError(
            f"mcmc: chain_method=\"parallel\" runs each chain in a spawned process, and a trial one could not load "
            f"the model (exit code {trial.exitcode}; its error is printed above; Pyro would wait for those chains "
            f"forever): {cause}, {sequential}"
        )


def _check_deterministic_network(model: PyroModel, args: tuple) -> None:
    """A ValueError where the network's output is random in eval mode (a bdl.MCDropout inside): the potential
    energy NUTS follows was then random, every transition diverged, and the warning blamed the step size."""
    if not args or not isinstance(args[0], Tensor) or not len(args[0]):
        return
    x = args[0][:1].to(next((p.device for p in model.parameters()), torch.device("cpu")))
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), torch.no_grad(), _eval_mode(model):
        try:
            first, second = model.run_net({}, x), model.run_net({}, x)
        except Exception:  # noqa: BLE001 - the network's own error: sampling raises it, as it did
            return
    # exact on the CPU; on an accelerator, whose atomic sums differ in the last bits from run to run, to a few units
    # of the dtype's rounding (MC dropout's noise on outputs near 1000 is 3e-5 of them: a tolerance of 1e-4 let it by)
    if first.device.type == "cpu":
        same = torch.equal(first.nan_to_num(), second.nan_to_num())
    else:
        tolerance = 16 * torch.finfo(first.dtype).eps if first.is_floating_point() else 0.0
        same = torch.allclose(first, second, rtol=tolerance, atol=tolerance * float(first.abs().nan_to_num().max()), equal_nan=True)
    if not same:
        raise ValueError(
            "mcmc: the network's output is random in eval mode (e.g. a bdl.MCDropout inside it), so the posterior "
            "density NUTS/HMC follows would be random too; pass the network without it (its dropout is off in eval mode)"
        )


def _raise_if_outputs_not_finite_on_data(model: PyroModel, args: tuple, error: Exception) -> None:
    """Pyro's "Model specification seems incorrect - cannot find valid initial params", with the rows of the data
    whose network outputs are not finite (with the network's own weights), where there are any."""
    if not args or not isinstance(args[0], Tensor) or not len(args[0]):
        return
    from ..predict import _non_finite_rows

    x = args[0].to(next((p.device for p in model.parameters()), torch.device("cpu")))
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), torch.no_grad(), _eval_mode(model):
        try:
            outputs = model.run_net({}, x)
        except Exception:  # noqa: BLE001 - Pyro's own error says more than the network's here
            return
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    bad = torch.stack([_non_finite_rows(t.unsqueeze(0)) for t in outputs if isinstance(t, Tensor)]).any(0)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(
            f"mcmc: Pyro found no weights with a finite posterior density to start from: the network's outputs are not "
            f"finite for rows {index_list(rows)} of the data ({len(rows)} of {len(x)}), whose "
            "inputs are finite, with its own weights too (a NaN in the forward, e.g. the log of a negative value)"
        ) from error


def _check_predict_inputs(model: Any, args: tuple, predict_inputs: Any, output_site: str) -> None:  # noqa: ANN401
    """Raise a ValueError where ``predict_inputs`` do not fit the model, before sampling: a forward pass of the
    network on their first row (PyroModel), or a run of the model function on them, in eval mode (a BatchNorm's
    statistics stay as they are), with the network's own weights or a prior draw (the randomness of the caller's
    generator left as it was). Only inputs that can be read twice (tensors, tuples, a map-style Dataset or a
    loader over one) are tried, and only where the training inputs pass the same trial."""
    from ..predict import _batches, numpy_hint

    hint = numpy_hint(predict_inputs)
    if hint or isinstance(predict_inputs, (str, bytes, Mapping)):  # refused by the prediction after sampling
        kind = "a tensor, batches of tensors or a Dataset" if isinstance(model, PyroModel) else "the tuple of the model's arguments"
        raise TypeError(f"mcmc: predict_inputs must be {kind}, got {type(predict_inputs).__name__}{hint}")
    if isinstance(model, PyroModel):
        data = predict_inputs.dataset if isinstance(predict_inputs, DataLoader) else predict_inputs
        if not isinstance(data, (Tensor, tuple, list, Dataset)) or isinstance(data, IterableDataset):
            return  # a stream, whose first batch the check would use up
        x = data[0] if isinstance(data, (tuple, list)) and data and isinstance(data[0], Tensor) else data
        if isinstance(x, TensorDataset):  # (a loader over one too, where it reads every row); other data sets unread
            reads_all = not isinstance(predict_inputs, DataLoader) or type(predict_inputs.sampler) is SequentialSampler or (
                type(predict_inputs.sampler) is RandomSampler and not predict_inputs.sampler.replacement
                and predict_inputs.sampler.num_samples == len(x)
            )
            x = x.tensors[0] if reads_all else None
        if isinstance(x, Tensor) and x.is_floating_point() and x.dim() and not bool(torch.isfinite(x).all()):
            # their predictions would be NaN: the error came after every chain had run, and the samples were lost
            bad = (~torch.isfinite(x.reshape(len(x), -1))).any(1).nonzero().flatten().tolist()
            raise ValueError(
                f"mcmc: predict_inputs hold NaN or Inf in rows {index_list(bad)} "
                f"({len(bad)} of {len(x)}); checked before sampling"
            )
        if isinstance(predict_inputs, DataLoader):  # its first row as the loader makes batches (its collate_fn)
            # batch_size=None: the data set's items are batches already, which its collate_fn only converts
            size = None if predict_inputs.batch_sampler is None else 1
            data = DataLoader(data, batch_size=size, collate_fn=predict_inputs.collate_fn)
        try:
            with torch.random.fork_rng(devices=[]):  # random transforms on torch's CPU generator: the caller's stays
                first, _ = next(_batches(data, 1))
        except StopIteration:
            raise ValueError("mcmc: predict_inputs hold no batch") from None
        except (TypeError, ValueError) as error:
            raise type(error)(f"mcmc: predict_inputs: {error}") from error
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        with torch.no_grad(), _eval_mode(model):
            try:
                model.run_net({}, args[0][:1].to(device))
            except (RuntimeError, ValueError, TypeError, IndexError):
                return  # the training inputs fail too: sampling says how, as it did
            try:
                model.run_net({}, first[:1].to(device))
            except (RuntimeError, ValueError, TypeError, IndexError) as error:
                raise ValueError(
                    f"mcmc: predict_inputs do not fit the network (checked before sampling): inputs of shape "
                    f"{tuple(first.shape)} failed where the training inputs x are {tuple(args[0].shape)}: {error}"
                ) from error
        return
    if not isinstance(predict_inputs, (Tensor, tuple, list)):
        return
    inputs = tuple(predict_inputs) if isinstance(predict_inputs, (tuple, list)) else (predict_inputs,)

    def trace_of(model_args: tuple) -> Any:  # noqa: ANN401
        with torch.random.fork_rng(devices=[]), torch.no_grad(), private_param_store(), pyro.validation_enabled(False), _eval_mode(model):
            return poutine.trace(model).get_trace(*model_args)

    try:
        trace_of(args)
    except Exception:  # noqa: BLE001 - a prior that cannot be sampled (ImproperUniform): no trial is possible
        return
    try:
        trace = trace_of(inputs)
    except Exception as error:  # noqa: BLE001 (the user's code: what it raises here, predicting after sampling raised)
        raise ValueError(f"mcmc: the model function fails on predict_inputs (checked before sampling): {error}") from error
    if output_site not in trace.nodes or trace.nodes[output_site]["type"] != "sample":
        sites = [name for name, node in trace.nodes.items() if node["type"] == "sample"]
        raise ValueError(f"mcmc: output_site {output_site!r} is not a site of the model run on predict_inputs; its sample sites: {sites}")


def mcmc(
    model: Union[PyroModel, Callable],
    *args,
    kernel: str = "nuts",
    num_samples: int = 500,
    warmup_steps: Optional[int] = None,
    num_chains: int = 2,
    chain_method: str = "sequential",
    kernel_options: Optional[dict] = None,
    predict_inputs: Any = None,
    output_site: str = "obs",
    task: Optional[str] = None,
    quantiles: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95),
    seed: Optional[int] = None,
    progress_bar: bool = False,
) -> MCMCResult:
    """Sample the posterior of a Bayesian model with NUTS (default) or HMC, full batch, several chains.

    Runs ``pyro.infer.MCMC`` on ``model(*args)``: NUTS (Hoffman & Gelman, 2014) adapts the step size and a
    diagonal mass matrix during ``warmup_steps`` and chooses trajectory lengths itself; HMC (Neal, 2011)
    uses the kernel options' ``num_steps``/``trajectory_length``. Convergence is reported per parameter
    by split R-hat (< 1.01 for well-mixed chains; needs ``num_chains >= 2``) and the effective sample size
    (see :class:`PosteriorSummary`). Meant for small models: the gold standard to compare VI against.

    ``chain_method="sequential"`` runs one chain after another in this process (reproducible with
    ``seed``); ``"parallel"`` lets Pyro run them in subprocesses (when there are more CPUs than chains),
    started with ``spawn`` (a forked worker fails once autograd has started its threads), so the model
    must be picklable: a :class:`PyroModel`, or a model function defined at module level of an importable
    file (not in a notebook, nor under ``if __name__ == "__main__":``, and a script's own code under that
    guard). One trial process is spawned first (a few seconds) and must load the model, else a ValueError
    says so before sampling: a worker that could not load it left Pyro waiting forever.

    The data (a PyroModel's ``x`` and ``y``) must be finite, and ``predict_inputs`` are tried on the network
    (or the model function) before sampling: either mistake raises a ValueError at once, not after the run.
    Divergent transitions after warm-up (``result.diagnostics["divergences"]``) raise a warning.

    Cost: NUTS doubles each trajectory until it turns back, up to ``2**max_tree_depth - 1`` gradient steps per
    draw (Pyro's default depth 10: 1023). A network's posterior, with its small step sizes, often reaches that
    depth: a 1-8-1 tanh network on 40 points took 1-3 s a draw (0.1 s at depth 5), and nothing shows without
    ``progress_bar``.
    ``kernel_options={"max_tree_depth": 5}`` bounds a draw at 31 steps (shorter trajectories: more correlated
    draws, which the effective sample size tells); ``make results`` samples its networks so.

    Args:
        model: a :class:`PyroModel` (``num_data`` None or equal to the number of data points: MCMC needs
            the full-data likelihood) or a Pyro model function.
        *args: the model's arguments, e.g. ``(x, y)``.
        kernel: ``"nuts"`` or ``"hmc"``.
        num_samples: samples kept per chain.
        warmup_steps: adaptation steps per chain (default ``num_samples``).
        num_chains: independent chains, >= 1.
        chain_method: ``"sequential"`` or ``"parallel"``.
        kernel_options: extra arguments of the Pyro kernel (``target_accept_prob``, ``max_tree_depth``,
            ``full_mass``, ``step_size``, ``trajectory_length``...; ``jit_compile`` works for model functions
            only: a PyroModel runs its network through ``torch.func.functional_call``, which JIT cannot trace).
        predict_inputs: inputs for ``result.prediction``: for a PyroModel, a tensor or batches (default
            the training inputs ``args[0]``); for a function model the tuple of its arguments with
            observations None (no prediction if not given).
        output_site: site read by predictions of a function model.
        task: ``"classification"`` or ``"regression"`` for predictions of a function model.
        quantiles: quantile levels shown in the summary.
        seed: if given (an int in ``[0, 2**32)``), ``pyro.set_rng_seed(seed)`` first.
        progress_bar: show Pyro's progress bar.

    Returns:
        an :class:`MCMCResult` with samples, summary, diagnostics and prediction.

    Example:
        >>> def model(x, y=None):
        ...     slope = pyro.sample("slope", pyro.distributions.Normal(0.0, 10.0))
        ...     with pyro.plate("data", len(x)):
        ...         pyro.sample("obs", pyro.distributions.Normal(slope * x, 0.5), obs=y)
        >>> x = torch.linspace(-1, 1, 20)
        >>> result = mcmc(model, x, 2.0 * x + 0.5 * torch.randn(20), num_samples=50, warmup_steps=50, seed=0)
        >>> result.summary["slope"]["mean"].shape, result.samples["slope"].shape
        (torch.Size([]), torch.Size([100]))
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {sorted(KERNELS)}")
    if chain_method not in CHAIN_METHODS:
        raise ValueError(f"chain_method must be one of {CHAIN_METHODS}, got {chain_method!r}")
    # numpy integers too, as bdl's other counts take; Pyro's MCMC is handed Python ints
    counts = {"num_samples": (num_samples, 4), "num_chains": (num_chains, 1), "warmup_steps": (warmup_steps, 0)}
    for name, (value, low) in counts.items():
        if name == "warmup_steps" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            alternative = " or None" if name == "warmup_steps" else ""
            raise ValueError(f"{name} must be an int >= {low}{alternative}, got {value!r}")
    num_samples, num_chains = int(num_samples), int(num_chains)
    quantiles = PosteriorSummary.check_quantiles(quantiles)  # checked after sampling, a long run was lost to a typo
    if seed is not None:  # pyro.set_rng_seed seeds numpy too: an int in [0, 2^32); its errors named no argument
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**32:
            raise ValueError(f"seed must be an int in [0, 2**32) or None, got {seed!r}")
        seed = int(seed)
    if kernel_options is not None and not isinstance(kernel_options, Mapping):
        raise TypeError(f"kernel_options must be a dict of the Pyro kernel's arguments, got {type(kernel_options).__name__}")
    if isinstance(model, PyroModel) and (kernel_options or {}).get("jit_compile"):
        raise ValueError(
            "kernel_options['jit_compile'] works for model functions only: a PyroModel runs its network through "
            "torch.func.functional_call, which JIT cannot trace"
        )
    target = (kernel_options or {}).get("target_accept_prob", 0.8)  # Pyro takes any number, and adapts towards it
    if isinstance(target, bool) or not isinstance(target, numbers.Real) or not 0 < target < 1:
        raise ValueError(f"kernel_options['target_accept_prob'] must be a number in (0, 1), got {target!r}")
    warmup_steps = None if warmup_steps is None else int(warmup_steps)
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {TASKS} or None, got {task!r}")
    if predict_inputs is not None and task is None and not isinstance(model, PyroModel):  # no prediction, silently
        raise ValueError(f"predict_inputs of a model function need task (one of {TASKS}): what output_site {output_site!r} holds")
    if not callable(model):
        raise TypeError(f"model must be a bdl.infer.PyroModel or a Pyro model function, got {type(model).__name__}")
    if isinstance(model, PyroModel):
        check_full_data("mcmc", model, args)
        check_finite_data("mcmc", args)
        _check_deterministic_network(model, args)
    if predict_inputs is not None:
        _check_predict_inputs(model, args, predict_inputs, output_site)
    # Pyro samples the chains in processes where they fit the CPUs, else one after another (warning)
    if chain_method == "parallel" and 1 < num_chains <= max(torch.multiprocessing.cpu_count() - 1, 1):
        _check_spawnable(model, args, kernel_options)
    if seed is not None:
        pyro.set_rng_seed(seed)

    def make_kernel():
        return KERNELS[kernel](model, **(kernel_options or {}))

    chains, diagnostics = [], {"divergences": [], "acceptance_rate": []}
    runs = [1] * num_chains if chain_method == "sequential" else [num_chains]
    # Pyro seeds its chain processes from torch.initial_seed(), which draws do not move: every unseeded call sampled
    # the same chains. A seed drawn from the generator, set inside fork_rng: the caller's initial seed (which bdl's
    # data modules derive their data order from) and state come back afterwards
    reseed = int(torch.randint(2**62, ())) if seed is None and max(runs) > 1 else None
    # eval mode: dropout in the network would make the potential energy random.
    with (torch.random.fork_rng(devices=[]) if reseed is not None else nullcontext()), private_param_store(), (
        _eval_mode(model) if isinstance(model, nn.Module) else nullcontext()
    ):
        if reseed is not None:
            torch.manual_seed(reseed)
        for chains_in_run in runs:
            sampler = MCMC(
                make_kernel(),
                num_samples=num_samples,
                warmup_steps=warmup_steps,
                num_chains=chains_in_run,
                disable_progbar=not progress_bar,
                # fresh worker processes: a forked one fails once autograd has started its device threads
                # (seen on a CUDA machine)
                mp_context="spawn" if chains_in_run > 1 else None,
            )
            try:
                sampler.run(*args)
            except (ValueError, RuntimeError) as error:
                if "cannot find valid initial params" in str(error) and isinstance(model, PyroModel):
                    _raise_if_outputs_not_finite_on_data(model, args, error)
                raise
            chains.append(sampler.get_samples(group_by_chain=True))
            diag = sampler.diagnostics()
            for chain in range(chains_in_run):
                key = f"chain {chain}"
                diagnostics["divergences"].append(len(diag["divergences"][key]))  # a count (a float before)
                diagnostics["acceptance_rate"].append(float(diag["acceptance rate"][key]))
    if any(diagnostics["divergences"]):
        counts = [int(count) for count in diagnostics["divergences"]]
        target = (kernel_options or {}).get("target_accept_prob", 0.8)
        warnings.warn(
            f"mcmc: {sum(counts)} divergent transitions after warm-up (per chain: {counts}): the chains may miss "
            f"regions of the posterior (biased draws); raise kernel_options['target_accept_prob'] (now {target}, e.g. "
            "to 0.95) for smaller steps, or reparameterise the model (e.g. non-centred priors)",
            UserWarning,
            stacklevel=2,
        )
    chain_samples = {name: torch.cat([c[name] for c in chains], dim=0) for name in chains[0]}
    samples = {name: value.flatten(0, 1) for name, value in chain_samples.items()}
    summary = PosteriorSummary(chain_samples, quantiles)
    result = MCMCResult(samples, chain_samples, summary, diagnostics, None, model)
    if isinstance(model, PyroModel):
        result.prediction = result.predict(args[0] if predict_inputs is None else predict_inputs)
    elif predict_inputs is not None and task is not None:
        result.prediction = result.predict(predict_inputs, output_site=output_site, task=task)
    return result
