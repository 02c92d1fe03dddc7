"""Markov chain Monte Carlo (NUTS / HMC) on a Bayesian model, with convergence diagnostics."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

import pyro
import torch
from pyro.infer import HMC, MCMC, NUTS
from pyro.infer.mcmc.util import summary as pyro_summary
from pyro.ops import stats
from torch import Tensor, nn

from .diagnostics import ess_bulk, ess_tail, rank_r_hat
from .model import PyroModel, check_full_data
from .predictive import TASKS, _eval_mode, predict_from_samples, predict_function_model, private_param_store

if TYPE_CHECKING:  # pragma: no cover
    from ..predict import Prediction

#: Kernel names -> Pyro MCMC kernels.
KERNELS: dict[str, type] = {"nuts": NUTS, "hmc": HMC}
CHAIN_METHODS = ("sequential", "parallel")


def _constant_elements(chains: Tensor) -> Tensor:
    """``[*shape]`` bool: the elements of ``[num_chains, num_samples, *shape]`` draws equal in every draw."""
    return (chains == chains[:1, :1]).flatten(0, 1).all(0)


_SAMPLE_SIZES = ("n_eff", "ess_bulk", "ess_tail")
_DIAGNOSTICS = ("n_eff", "r_hat", "ess_bulk", "ess_tail", "rank_r_hat")


class PosteriorSummary:
    """Per-parameter posterior summary of MCMC samples: mean, std, quantiles, ESS and split R-hat.

    Built from Pyro's diagnostics: ``pyro.infer.mcmc.util.summary`` (mean, std, ``n_eff`` =
    :func:`pyro.ops.stats.effective_sample_size`, ``r_hat`` = :func:`pyro.ops.stats.split_gelman_rubin`,
    Gelman et al., BDA3 ch. 11) and :func:`pyro.ops.stats.quantile` for the quantile columns; and the
    rank-normalised diagnostics of Vehtari et al. (2021), as Stan and ArviZ report them
    (:mod:`bdl.infer.diagnostics`): ``ess_bulk``, ``ess_tail`` and ``rank_r_hat``, which also catch chains
    that differ in spread only and hold for heavy tails. Vehtari et al. call chains converged when
    ``rank_r_hat`` is below 1.01 and both ESS are above 100 per chain (400 for four chains).

    ``summary[site]`` is a dict ``{statistic: tensor shaped like the site}``; ``str(summary)`` is a table
    with one row per scalar element (``"weight[0,2]"``). An element equal in every draw has NaN ESS and
    R-hat (0 / 0), the site's other elements their own values.

    Args:
        chain_samples: ``{site: [num_chains, num_samples, *shape]}``.
        quantiles: the quantile levels to report, in (0, 1).

    Example:
        >>> samples = {"mu": torch.randn(2, 200)}
        >>> summary = PosteriorSummary(samples)
        >>> sorted(summary["mu"])
        ['25.0%', '5.0%', '50.0%', '75.0%', '95.0%', 'ess_bulk', 'ess_tail', 'mean', 'n_eff', 'r_hat', 'rank_r_hat', 'std']
        >>> bool(summary.max_r_hat < 1.05), bool(summary.max_rank_r_hat < 1.05)
        (True, True)
    """

    def __init__(self, chain_samples: dict[str, Tensor], quantiles: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95)) -> None:
        if not all(0 < q < 1 for q in quantiles):
            raise ValueError(f"quantiles must lie in (0, 1), got {tuple(quantiles)}")
        for name, value in chain_samples.items():
            if value.dim() < 2 or value.shape[1] < 4:
                raise ValueError(f"chain_samples[{name!r}] must be [num_chains, num_samples >= 4, ...], got shape {tuple(value.shape)}")
        self.quantiles = tuple(float(q) for q in quantiles)
        base = pyro_summary({k: v.double() for k, v in chain_samples.items()}, group_by_chain=True)
        self.table: dict[str, dict[str, Tensor]] = {}
        for name, value in chain_samples.items():
            flat = value.double().reshape((-1,) + value.shape[2:])
            q = stats.quantile(flat, list(self.quantiles), dim=0)
            row = {"mean": base[name]["mean"], "std": base[name]["std"]}
            row.update({self._label(level): q[i] for i, level in enumerate(self.quantiles)})
            row.update({"n_eff": base[name]["n_eff"], "r_hat": base[name]["r_hat"]})
            row.update({"ess_bulk": ess_bulk(value), "ess_tail": ess_tail(value), "rank_r_hat": rank_r_hat(value)})
            constant = _constant_elements(value)
            if constant.any() and not constant.all():
                # Pyro's ESS of a tensor turns every element NaN when one element never changes; only that
                # element's ESS (and R-hat) is 0 / 0, so the others are computed without it
                varying = value[:, :, ~constant].double()
                row["n_eff"] = torch.full_like(row["n_eff"], math.nan)
                row["n_eff"][~constant] = stats.effective_sample_size(varying, chain_dim=0, sample_dim=1)
            self.table[name] = row

    @staticmethod
    def _label(level: float) -> str:
        return f"{100 * level:.1f}%"

    def __getitem__(self, site: str) -> dict[str, Tensor]:
        return self.table[site]

    def __iter__(self):
        return iter(self.table)

    def __len__(self) -> int:
        return len(self.table)

    @property
    def columns(self) -> list[str]:
        return ["mean", "std", *map(self._label, self.quantiles), *_DIAGNOSTICS]

    @property
    def max_r_hat(self) -> float:
        """Largest split R-hat over all parameters (converged chains: close to 1, e.g. < 1.01).

        Elements equal in every draw of every chain (R-hat 0 / 0, NaN in the table) are left out, so one
        of them cannot hide the others' values; NaN only when every element is one.
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
        values = values[~values.isnan()]
        if not len(values):
            return math.nan
        return float(values.max() if largest else values.min())

    def rows(self) -> list[tuple[str, dict[str, float]]]:
        """One ``(label, {column: value})`` per scalar element of every site."""
        out = []
        for name, row in self.table.items():
            shape = row["mean"].shape
            for index in (torch.cartesian_prod(*[torch.arange(n) for n in shape]).reshape(-1, len(shape)).tolist() if shape else [[]]):
                label = name + (f"[{','.join(map(str, index))}]" if index else "")
                out.append((label, {col: float(row[col][tuple(index)]) for col in self.columns}))
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
        diagnostics: per-chain ``"divergences"`` (number of divergent transitions) and
            ``"acceptance_rate"``.
        prediction: the posterior predictive on the prediction inputs, or None.
        model: the model that was sampled.
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
        options = {"output_site": output_site, "task": task, "keep_samples": keep_samples}
        with private_param_store():
            if parallel is not None:
                return predict_function_model(self.model, self.samples, *args, parallel=parallel, **options)
            try:
                return predict_function_model(self.model, self.samples, *args, parallel=True, **options)
            except (RuntimeError, ValueError):  # e.g. `x @ w` with a batch of draws w: one draw at a time
                return predict_function_model(self.model, self.samples, *args, parallel=False, **options)

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
    must be picklable: a :class:`PyroModel`, or a model function defined at module level.

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
        seed: if given, ``pyro.set_rng_seed(seed)`` first.
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
    for name, value, low in (("num_samples", num_samples, 4), ("num_chains", num_chains, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if warmup_steps is not None and (isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0):
        raise ValueError(f"warmup_steps must be an int >= 0 or None, got {warmup_steps!r}")
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {TASKS} or None, got {task!r}")
    if predict_inputs is not None and task is None and not isinstance(model, PyroModel):  # no prediction, silently
        raise ValueError(f"predict_inputs of a model function need task (one of {TASKS}): what output_site {output_site!r} holds")
    if not callable(model):
        raise TypeError(f"model must be a bdl.infer.PyroModel or a Pyro model function, got {type(model).__name__}")
    if isinstance(model, PyroModel):
        check_full_data("mcmc", model, args)
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
            sampler.run(*args)
            chains.append(sampler.get_samples(group_by_chain=True))
            diag = sampler.diagnostics()
            for chain in range(chains_in_run):
                key = f"chain {chain}"
                diagnostics["divergences"].append(float(len(diag["divergences"][key])))
                diagnostics["acceptance_rate"].append(float(diag["acceptance rate"][key]))
    chain_samples = {name: torch.cat([c[name] for c in chains], dim=0) for name in chains[0]}
    samples = {name: value.reshape((-1,) + value.shape[2:]) for name, value in chain_samples.items()}
    summary = PosteriorSummary(chain_samples, quantiles)
    result = MCMCResult(samples, chain_samples, summary, diagnostics, None, model)
    if isinstance(model, PyroModel):
        result.prediction = result.predict(args[0] if predict_inputs is None else predict_inputs)
    elif predict_inputs is not None and task is not None:
        result.prediction = result.predict(predict_inputs, output_site=output_site, task=task)
    return result
