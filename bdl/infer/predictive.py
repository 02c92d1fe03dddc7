"""Posterior predictive distributions from guide or MCMC samples, as a :class:`bdl.Prediction`."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional, Union

import pyro
import torch
from pyro.distributions import Independent, MaskedDistribution
from pyro.infer import Predictive
from pyro.params.param_store import ParamStoreDict
from torch import Tensor, nn

from ..metrics.functional._checks import are_probabilities, check_positive_int
from .._messages import index_list
from ..predict import _eval_mode  # each module's own mode restored (a frozen submodule stays in eval)
from .model import PyroModel

if TYPE_CHECKING:  # pragma: no cover
    from ..predict import Prediction

TASKS = ("classification", "regression")


@contextmanager
def private_param_store() -> Iterator[None]:
    """Run Pyro code against an empty, throw-away global parameter store.

    bdl keeps every parameter in modules (``elbo.parameters()`` feed a torch optimizer), so Pyro's global
    store only mirrors them. Inside this context the mirror starts empty and is discarded afterwards,
    so two guides with the same site names (two models, two tests) never see each other's parameters,
    and the user's own store is untouched.

    Example:
        >>> with private_param_store():
        ...     _ = pyro.param("a", torch.zeros(1))
        >>> "a" in pyro.get_param_store()
        False
    """
    with pyro.get_param_store().scope(), keep_requires_grad():
        yield


_ORIGINAL_SETITEM = ParamStoreDict.__setitem__
_keeping = [0]  # depth of keep_requires_grad contexts


def _setitem_keeping_requires_grad(self: ParamStoreDict, name: str, value: Tensor) -> None:
    requires_grad = value.requires_grad if isinstance(value, nn.Parameter) else None
    _ORIGINAL_SETITEM(self, name, value)
    if requires_grad is not None:
        value.requires_grad_(requires_grad)


@contextmanager
def keep_requires_grad() -> Iterator[None]:
    """Pyro's parameter store leaves the ``requires_grad`` of an ``nn.Parameter`` stored in it as it was.

    With global parameters a PyroModule puts its ``nn.Parameter`` s in the store, whose ``__setitem__`` sets
    ``requires_grad`` True: a frozen layer (pretrained features under a Bayesian head) was unfrozen, and trained by
    the optimizer, after ``svi`` or ``mcmc`` alike. Patched on the class while inside, which also reaches the
    ``pyro.param`` calls that ``poutine.block`` hides from handlers (an autoguide's set-up trace).
    """
    _keeping[0] += 1
    ParamStoreDict.__setitem__ = _setitem_keeping_requires_grad  # type: ignore[method-assign]
    try:
        yield
    finally:
        _keeping[0] -= 1
        if _keeping[0] == 0:
            ParamStoreDict.__setitem__ = _ORIGINAL_SETITEM  # type: ignore[method-assign]


def _check_num_samples(num_samples: int) -> int:
    return check_positive_int(num_samples, "num_samples")  # a numpy integer as an int


def sample_guide(guide: Callable, num_samples: int, *args, parallel: bool = True, **kwargs) -> dict[str, Tensor]:
    """Draw ``num_samples`` joint samples of all latent sites from a fitted guide.

    Args:
        guide: a fitted autoguide (or any guide function).
        num_samples: number of samples S.
        *args, **kwargs: the model's arguments (unused by autoguides of a :class:`PyroModel`).
        parallel: draw all samples in one vectorised pass (``Predictive(..., parallel=True)``); False runs
            the guide S times.

    Returns:
        ``{site: [S, *site_shape]}``.

    Example:
        >>> from pyro.infer.autoguide import AutoNormal
        >>> model = PyroModel(nn.Linear(3, 1), "gaussian")
        >>> with private_param_store():
        ...     samples = sample_guide(AutoNormal(model), 10)
        >>> samples["weight"].shape
        torch.Size([10, 1, 3])
    """
    num_samples = _check_num_samples(num_samples)
    with torch.no_grad():
        drawn = Predictive(guide, num_samples=num_samples, parallel=parallel)(*args, **kwargs)
        trace = pyro.poutine.trace(guide).get_trace(*args, **kwargs)
    # the model's latent sites: AutoNormal's auxiliary ``w_unconstrained`` draws are the guide's own (they doubled the
    # dict, and a user's loop over the sites met each weight twice)
    shapes = {
        name: site["value"].shape
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["infer"].get("is_auxiliary", False)
    }
    # Predictive pads vectorised samples with singleton plate dims; drop them.
    # detached copies: a delta guide's "draws" are views of its parameters, which kept their gradient and changed
    # with every later optimiser step
    return {name: value.detach().reshape((num_samples,) + shapes[name]).clone() for name, value in drawn.items() if name in shapes}


def network_outputs(model: PyroModel, samples: dict[str, Tensor], x: Tensor, *, vectorize: bool = True) -> Tensor:
    """``f(x; w_s)`` for every sample ``w_s``: ``[S, N, ...]``.

    With ``vectorize`` the S forward passes run as one ``torch.func.vmap`` call; a network that vmap cannot
    batch (data-dependent control flow, in-place buffer updates) falls back to a loop.

    Args:
        model: the :class:`PyroModel`.
        samples: ``{parameter name: [S, *shape]}`` for all its Bayesian parameters.
        x: inputs ``[N, ...]``.
        vectorize: try vmap first.

    Returns:
        the stacked outputs ``[S, N, ...]``.

    Example:
        >>> model = PyroModel(nn.Linear(3, 2), "categorical")
        >>> samples = {"weight": torch.randn(5, 2, 3), "bias": torch.randn(5, 2)}
        >>> network_outputs(model, samples, torch.randn(7, 3)).shape
        torch.Size([5, 7, 2])
    """
    weights = {name: samples[name] for name in model.bayesian_names}
    num_samples = next(iter(weights.values())).shape[0]
    outputs = None
    with torch.no_grad():
        if vectorize:
            try:
                outputs = torch.func.vmap(lambda w: model.run_net(w, x), randomness="different")(weights)
            except (RuntimeError, ValueError, NotImplementedError):
                pass
        if outputs is None:
            outputs = torch.stack([model.run_net({k: v[s] for k, v in weights.items()}, x) for s in range(num_samples)])
    if x.dim() == 0 or outputs.dim() < 2 or outputs.shape[1] != x.shape[0]:
        # one unbatched input [D] gave [S, C], which the likelihood refused as "[S, N, C] of logits, got (5, 2)"
        raise ValueError(
            f"the network returned outputs of shape {tuple(outputs.shape[1:])} for inputs of shape {tuple(x.shape)}: "
            "inputs must be a batch [N, ...] (one input x as x[None]) and the network must keep it in its first dimension"
        )
    return outputs



def predict_from_samples(
    model: PyroModel,
    samples: dict[str, Tensor],
    inputs: Union[Tensor, Iterable],
    *,
    keep_samples: bool = False,
    vectorize: bool = True,
    batch_size: int = 256,
) -> "Prediction":
    """Posterior predictive of a :class:`PyroModel` from posterior samples (guide draws or MCMC).

    ``p(y | x, D) ~= 1/S sum_s p(y | f(x; w_s))``: every input batch is run with the same S weight samples,
    and the likelihood turns the outputs into a :class:`bdl.Prediction` (logits -> probabilities,
    means and noise variances -> aleatoric / epistemic variances).

    Args:
        model: the :class:`PyroModel`.
        samples: ``{site: [S, *shape]}``, all Bayesian parameters (and likelihood globals) included.
        inputs: a tensor ``[N, ...]`` or an iterable of batches (``x`` or ``(x, y, ...)``, e.g. a DataLoader).
        keep_samples: keep the per-sample predictions in the returned Prediction.
        vectorize: batch the S forward passes with vmap where the network allows it.
        batch_size: inputs per forward pass when ``inputs`` is a tensor (the vectorised pass holds
            ``S x batch_size`` activations).

    Returns:
        a :class:`bdl.Prediction` over all N inputs.

    Example:
        >>> model = PyroModel(nn.Linear(3, 2), "categorical")
        >>> samples = {"weight": torch.randn(5, 2, 3), "bias": torch.randn(5, 2)}
        >>> predict_from_samples(model, samples, torch.randn(7, 3)).probs.shape
        torch.Size([7, 2])
    """
    if not isinstance(model, PyroModel):
        raise TypeError(f"model must be a bdl.infer.PyroModel, got {type(model).__name__}")
    batch_size = check_positive_int(batch_size, "batch_size")
    missing = [name for name in model.sample_sites if name not in samples]
    if missing:
        raise ValueError(f"samples lack the latent sites {missing}; got {sorted(samples)}")
    # every weight site [S, *parameter shape] with one S: torch's "expanded size" or an IndexError named none
    parameters = dict(model.net.named_parameters())
    counts = set()
    for name in model.bayesian_names:
        value, shape = samples[name], tuple(parameters[name].shape)
        if not isinstance(value, Tensor) or tuple(value.shape[1:]) != shape:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"samples[{name!r}] must have shape [S, *{shape}] (S posterior draws of the parameter), got {got}")
        counts.add(value.shape[0])
    for name in model.likelihood.global_sites:  # the learned noise: [S], one number per draw, paired with the weights'
        value = samples[name]
        if not isinstance(value, Tensor) or value.dim() == 0 or value[0].numel() != 1:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"samples[{name!r}] must have shape [S] (S posterior draws of the likelihood's {name}), got {got}")
        counts.add(value.shape[0])
    if len(counts) > 1:
        raise ValueError(f"samples must hold the same number S of draws for every site, got {sorted(counts)}")
    from ..predict import Prediction, _batches, _non_finite_message, _non_finite_rows, _NonFiniteOutput, _read_in_order

    used = {*model.bayesian_names, *model.likelihood.global_sites}
    for name, value in samples.items():  # else the outputs' error blamed the inputs or the network's own weights
        if name in used and value.dim() and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            draws = (~torch.isfinite(value.reshape(len(value), -1))).any(1).nonzero().flatten().tolist()
            raise ValueError(
                f"samples[{name!r}] holds NaN or Inf in draws {index_list(draws)} "
                f"({len(draws)} of {len(value)}): the posterior samples are not finite (a diverged chain or guide)"
            )
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    samples = {name: value.to(device) for name, value in samples.items()}
    parts, targets, offset = [], [], 0
    with _eval_mode(model):
        for x, y in _batches(inputs, batch_size):
            outputs = network_outputs(model, samples, x.to(device), vectorize=vectorize)
            # named by input row, as bdl.predict does (the likelihood's check named "sample_means", a count)
            bad = [_non_finite_rows(t) for t in (outputs if isinstance(outputs, tuple) else (outputs,)) if isinstance(t, Tensor)]
            if bad and bool(torch.stack(bad).any()):
                error = _NonFiniteOutput("the network returned non-finite outputs (NaN or Inf)", torch.stack(bad).any(0))
                raise ValueError(_non_finite_message(error, model, x, offset, _read_in_order(inputs)))
            offset += len(x)
            parts.append(model.likelihood.prediction(outputs, samples, keep_samples=keep_samples))
            if y is not None:
                targets.append(y.to(device))
    if not parts:
        raise ValueError("inputs are empty: nothing to predict")
    prediction = Prediction.cat(parts)
    if targets:
        if len(targets) != len(parts):
            raise ValueError("inputs: some batches had targets and others did not")
        prediction.targets = torch.cat(targets)
    return prediction


def _logits_reader(fn: Any, value: Tensor, labels: bool) -> tuple[Callable[[Any, Tensor], Optional[Tensor]], tuple[int, ...]]:  # noqa: ANN401
    """How to read an observation site's logits from its distribution, for :func:`predict_function_model`'s
    ``per_draw``: ``(read, extra dims)``. A ``Categorical``'s labels have logits with a class dimension more; a
    ``Bernoulli``'s log-odds become one column; a ``OneHotCategorical``'s one-hot values ``[N, C]`` have logits of
    their shape. ``.mask()`` and ``.to_event()`` wrappers are looked through; a read that finds no logits gives None."""

    def base(fn: Any) -> Any:  # noqa: ANN401
        while isinstance(fn, (MaskedDistribution, Independent)):
            fn = fn.base_dist
        return fn

    try:
        logits = base(fn).logits
    except (AttributeError, NotImplementedError):
        return (lambda fn, value: None), ()
    if labels and logits.dim() == value.dim() + 1:  # Categorical
        return (lambda fn, value: base(fn).logits), (logits.shape[-1],)
    if labels and logits.dim() == value.dim():  # Bernoulli
        return (lambda fn, value: base(fn).logits.unsqueeze(-1)), (1,)
    if not labels and logits.dim() == value.dim():  # OneHotCategorical
        return (lambda fn, value: base(fn).logits), ()
    return (lambda fn, value: None), ()


def predict_function_model(
    model: Callable,
    samples: dict[str, Tensor],
    *args,
    output_site: str,
    task: str,
    parallel: Optional[bool] = True,
    keep_samples: bool = False,
    **kwargs,
) -> "Prediction":
    """Posterior predictive of a plain Pyro model function at one of its sites.

    Runs the model under each posterior draw (``pyro.infer.Predictive``'s vectorised trace, or one trace per
    draw) and reads ``output_site``:

    - an observation site (``pyro.sample("obs", dist, obs=y)`` with ``y=None``): its distribution under each
      draw. Regression reads the distribution's mean and variance (a ``Normal``'s ``loc`` and ``scale**2``),
      so the Prediction splits the spread into aleatoric (the noise) and epistemic (the draws' means);
      classification reads its logits (``Categorical``, ``OneHotCategorical``, also under ``.mask()``; a
      ``Bernoulli``'s log-odds as two classes). A latent site given in ``samples`` is read as its draws. A
      distribution without a finite mean and variance (a ``StudentT`` with ``df <= 2``) is read as its
      sampled values, which then hold the noise (all of it reported as epistemic).
    - a ``pyro.deterministic`` site: its values, logits ``[N, C]`` for classification, predicted means
      ``[N]`` / ``[N, D]`` (aleatoric variance 0) for regression.

    Args:
        model: the Pyro model function.
        samples: ``{site: [S, *shape]}`` posterior samples of its latent sites.
        *args, **kwargs: the model's arguments for the new inputs (with observations set to None).
        output_site: the site to read.
        task: ``"classification"`` or ``"regression"``.
        parallel: vectorise over samples (the model must then broadcast over a leading sample dim; where
            its first and last draws differ from the model run on each alone, it is run draw by draw); None:
            vectorise, and run draw by draw where the model fails under a batch of draws (``x @ w``).
        keep_samples: keep the per-sample predictions.

    Returns:
        a :class:`bdl.Prediction`.

    Example:
        >>> def model(x, y=None):
        ...     slope = pyro.sample("slope", pyro.distributions.Normal(0.0, 1.0))
        ...     with pyro.plate("data", x.shape[0]):
        ...         return pyro.sample("obs", pyro.distributions.Normal(slope * x, 0.1), obs=y)
        >>> samples = {"slope": torch.randn(20)}
        >>> predict_function_model(model, samples, torch.randn(6), output_site="obs", task="regression").mean.shape
        torch.Size([6, 1])
    """
    from ..predict import Prediction

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if not samples:
        raise ValueError("samples is empty: pass posterior samples of the model's latent sites")
    num_samples = next(iter(samples.values())).shape[0]

    def run(i: int) -> pyro.poutine.Trace:
        """The model's trace under draw ``i`` alone."""
        return pyro.poutine.trace(pyro.poutine.condition(model, {k: v[i] for k, v in samples.items()})).get_trace(*args, **kwargs)

    def alone(i: int) -> dict[str, Any]:
        """The output site of the model run under draw ``i`` alone (draw 0's: the run that checked the site)."""
        return run(i).nodes[output_site] if i else single.nodes[output_site]

    def vectorised_node(draws: dict[str, Tensor]) -> dict[str, Any]:
        """The output site of one run of the model vectorised over ``draws`` (``{site: [s, ...]}``)."""
        count = next(iter(draws.values())).shape[0]
        predictive = Predictive(model, posterior_samples=draws, num_samples=count, return_sites=[output_site], parallel=True)
        return predictive.get_vectorized_trace(*args, **kwargs).nodes[output_site]

    # a model that is a module (a PyroModule) predicts in eval mode, as it was sampled: a BatchNorm's running
    # statistics moved to the new inputs' in training mode
    with torch.no_grad(), _eval_mode(model):
        single = run(0)
        if output_site not in single.nodes or single.nodes[output_site]["type"] != "sample":
            raise ValueError(f"output_site {output_site!r} is not a site of the model")
        shape = single.nodes[output_site]["value"].shape
        _check_not_subsampled(single, output_site)
        # an unobserved sample site of the model (y=None): a latent in the samples is its posterior draws instead
        observation = output_site not in samples and not single.nodes[output_site]["infer"].get("_deterministic", False)
        site = (task, observation, output_site)
        read = None if parallel is False else _vectorised_read(samples, single, alone, vectorised_node, site, strict=parallel is True)
        if read is None:  # one run per draw
            read, _ = _read_site([alone(i) for i in range(num_samples)], num_samples, shape, *site)
    if task == "classification":
        if are_probabilities(read[0]):  # Prediction.from_logits' refusal named no site, and a method the user never called
            raise ValueError(
                f"output_site {output_site!r} holds probabilities (every row non-negative, summing to 1), where logits "
                "are read: record the logits there (pyro.deterministic), or name a Categorical observation site"
            )
        return Prediction.from_logits(read[0], keep_samples=keep_samples)
    means, variances = read

    def floating(values: Tensor) -> Tensor:  # integer draws (a count site) as the default dtype; float64 stays float64
        return values if values.is_floating_point() else values.to(torch.get_default_dtype())

    return Prediction.from_regression(floating(means), None if variances is None else floating(variances), keep_samples=keep_samples)


def _check_not_subsampled(trace: pyro.poutine.Trace, output_site: str) -> None:
    """Refuse an output site in a plate that subsamples anew at each run (``pyro.plate(..., subsample_size=k)``):
    every run of the model, and every draw of a vectorised one, picks other inputs, so a row of the prediction
    mixed different inputs. Fixed indices (``subsample=idx``, as bdl's own likelihoods pass them) are kept: the
    plate's own site then has no ``subsample_size`` (two runs that happened to pick the same indices told
    nothing)."""
    for frame in trace.nodes[output_site]["cond_indep_stack"]:
        if not frame.vectorized or getattr(frame, "full_size", None) in (None, frame.size):
            continue
        plate = trace.nodes.get(frame.name, {}).get("fn")
        if getattr(plate, "subsample_size", None) is None:
            continue
        raise ValueError(
            f"output_site {output_site!r} is in plate {frame.name!r}, subsampled ({frame.size} of its "
            f"{frame.full_size} elements) anew at each run: each run of the model picks other inputs; predict with "
            "the full plate (no subsample_size, e.g. a model argument that sets it only for training)"
        )


_LAYOUT_ERRORS = (RuntimeError, ValueError, IndexError)
"""What a model raises under a batch of draws laid out in a way its code does not broadcast (``x @ w``, ``x[:, w > 0]``)."""


def _vectorised_read(
    samples: dict[str, Tensor],
    single: pyro.poutine.Trace,
    alone: Callable[[int], dict[str, Any]],
    vectorised_node: Callable[[dict[str, Tensor]], dict[str, Any]],
    site: tuple[str, bool, str],
    *,
    strict: bool,
) -> Optional[tuple[Optional[Tensor], ...]]:
    """What :func:`predict_function_model` reads at its output site (``site``: task, observation, name) from one
    run of the model vectorised over all draws, or None where no run gives the draws' own values (the model is
    then run draw by draw).

    The draws are tried as given (``[S, *value shape]``, as Pyro's ``Predictive`` pads them: a model written for
    those, e.g. ``x @ W``), then padded to the model's plate nesting (:func:`_plate_layout`: ``x[:, None] * w``
    for a vector latent ``w``), each on the first and last draws alone before all of them (a layout that
    broadcasts into ``[S, S, N]`` costs ``S^2``). A model that indexes a vector latent (``b[0] + b[1] * x``) runs
    under a batch of draws without an error, and where the inputs' length equals the vector's it broadcasts into
    other numbers: a run is kept only where its first and last draws equal the model run on them alone (sampled
    values, a Cauchy's, which each run draws anew: by their density under both runs' distributions). Where every
    layout fails, ``strict`` runs the draws as given once more and raises its error (not that of two draws)."""
    num_samples = next(iter(samples.values())).shape[0]
    shape = single.nodes[site[2]]["value"].shape
    ends = [0, num_samples - 1] if num_samples > 1 else [0]
    alone_nodes = [alone(i) for i in ends]
    alone_read = None  # read once, where a run reads values it can compare

    def vectorised(draws: dict[str, Tensor], picked: list[int]) -> Optional[tuple[Optional[Tensor], ...]]:
        """The read of one vectorised run on ``draws`` (the draws ``picked``), or None where its ends disagree."""
        nonlocal alone_read
        node = vectorised_node(draws)
        read, sampled = _read_site([node], len(picked), shape, *site)
        where = [picked.index(i) for i in ends]
        if sampled:
            return read if _same_density(node, alone_nodes, where, len(picked)) else None
        if alone_read is None:
            alone_read = _read_site(alone_nodes, len(ends), shape, *site)[0]
        return read if all(_agree(None if whole is None else whole[where], part) for whole, part in zip(read, alone_read)) else None

    padded = _plate_layout(samples, single)
    layouts = [samples] + ([padded] if any(padded[name].shape != value.shape for name, value in samples.items()) else [])
    failed = 0
    # strict: the errors of shapes that do not broadcast; else any (a TypeError of torch.full_like(x, latent), an
    # assert on a shape), which a run per draw then raises again if the model itself is at fault
    errors = _LAYOUT_ERRORS if strict else Exception
    for draws in layouts:
        try:
            if num_samples > 2 and vectorised({name: value[ends] for name, value in draws.items()}, ends) is None:
                continue
            read = vectorised(draws, list(range(num_samples)))
        except errors:
            failed += 1
            continue
        if read is not None:
            return read
    if strict and failed == len(layouts):
        return vectorised(samples, list(range(num_samples)))
    return None


def _plate_layout(samples: dict[str, Tensor], trace: pyro.poutine.Trace) -> dict[str, Tensor]:
    """Draws ``[S, *value shape]`` in the layout of Pyro's vectorised runs: a site's batch dimensions left-padded
    with singleton dimensions to the model's plate nesting, e.g. ``[S, 1, D]`` for a vector latent outside the
    model's one plate (``Normal(zeros(D), 1).to_event(1)``). ``Predictive`` pads by the value's dimensions and
    so read its ``D`` as a plate dimension: ``x[:, None] * w`` failed, or broadcast into other numbers."""
    dims = [frame.dim for node in trace.nodes.values() if node["type"] == "sample" for frame in node["cond_indep_stack"] if frame.vectorized]
    nesting = -min(dims) if dims else 0
    padded = {}
    for name, value in samples.items():
        node = trace.nodes.get(name)
        if node is not None and node["type"] == "sample" and value.shape[1:] == node["value"].shape:
            pad = max(nesting - len(node["fn"].batch_shape), 0)
            value = value.reshape(value.shape[:1] + (1,) * pad + value.shape[1:])
        padded[name] = value
    return padded


def _same_density(vectorised: dict[str, Any], alone: list[dict[str, Any]], ends: list[int], num_samples: int) -> bool:
    """Whether the vectorised run's values of draws ``ends`` have the log-density under that run's distribution
    that the distributions of those draws run alone (``alone``) give them."""
    try:
        value = vectorised["value"]
        whole = vectorised["fn"].log_prob(value).reshape(num_samples, -1).sum(-1)
        parts = [node["fn"].log_prob(value[i].reshape(node["value"].shape)).sum() for i, node in zip(ends, alone)]
    except _LAYOUT_ERRORS:  # shapes that do not line up: not the draws run alone
        return False
    return all(bool(torch.isclose(whole[i], part, rtol=1e-4, atol=1e-5)) for i, part in zip(ends, parts))


def _agree(whole: Optional[Tensor], part: Optional[Tensor]) -> bool:
    if whole is None or part is None:
        return whole is None and part is None
    return whole.shape == part.shape and torch.allclose(whole, part, rtol=1e-4, atol=1e-6, equal_nan=True)


def _read_site(
    nodes: list[dict[str, Any]], num_samples: int, shape: torch.Size, task: str, observation: bool, output_site: str
) -> tuple[tuple[Optional[Tensor], ...], bool]:
    """What :func:`predict_function_model` reads at ``output_site`` from its trace ``nodes`` (one vectorised over
    the draws, or one per draw): ``(logits [S, N, C],)`` for classification, ``(means [S, N, D], variances or
    None)`` for regression; and whether those are sampled values (of an observation site without finite moments,
    or without logits), which another run of the model draws anew."""

    def per_draw(read: Callable[[Any, Tensor], Optional[Tensor]], extra: tuple[int, ...] = ()) -> Optional[Tensor]:
        """``read(distribution, value)`` of every draw as ``[S, *site shape, *extra]``, or None where it has none."""
        parts = []
        for node in nodes:
            try:
                part = read(node["fn"], node["value"])
            except (AttributeError, NotImplementedError):
                return None
            if part is None:
                return None
            # a vectorised trace pads the site with singleton plate dims, and broadcasts what no draw changes
            full = node["value"].shape + extra
            parts.append(torch.broadcast_to(part, full) if part.numel() < math.prod(full) else part)
        stacked = torch.stack(parts) if len(parts) > 1 else parts[0]
        return stacked.reshape((num_samples,) + shape + extra)

    values = per_draw(lambda fn, value: value)
    if task == "classification":
        logits = None
        if observation and values.dim() in (2, 3):
            logits = per_draw(*_logits_reader(nodes[0]["fn"], nodes[0]["value"], labels=values.dim() == 2))
        values = values if logits is None else logits
        if values.dim() != 3:
            raise ValueError(
                f"output_site {output_site!r}: expected samples [S, N, C] of logits, or an observation site of a Categorical, "
                f"Bernoulli or OneHotCategorical, got shape {tuple(values.shape)}"
            )
        return (values,), observation and logits is None
    if values.dim() not in (2, 3):
        raise ValueError(f"output_site {output_site!r}: expected samples [S, N] / [S, N, D] (regression), got shape {tuple(values.shape)}")
    means = variances = None
    if observation:
        means, variances = per_draw(lambda fn, value: fn.mean), per_draw(lambda fn, value: fn.variance)
        if means is None or variances is None or not (torch.isfinite(means).all() and torch.isfinite(variances).all()):
            means = variances = None  # no finite moments (a StudentT with df <= 2): the sampled values
    if means is None:
        means = values
    sampled = observation and means is values
    if means.dim() == 2:
        means, variances = means.unsqueeze(-1), None if variances is None else variances.unsqueeze(-1)
    return (means, variances), sampled
