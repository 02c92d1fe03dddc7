"""Whole-model tools: convert a model to Bayesian layers, sum its KL, and switch how layers sample."""

from __future__ import annotations

import contextlib
import copy
import fnmatch
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from .functional import check_estimator
from .layers import BayesConv1d, BayesConv2d, BayesConv3d, BayesianModule, BayesLinear, _BayesLayer
from .priors import GaussianPrior, Prior, as_prior

_CONVERSIONS: dict[type[nn.Module], type[_BayesLayer]] = {
    nn.Linear: BayesLinear,
    nn.Conv1d: BayesConv1d,
    nn.Conv2d: BayesConv2d,
    nn.Conv3d: BayesConv3d,
}


def kl_divergence(model: nn.Module) -> Tensor:
    """Sum of ``kl_divergence()`` over every :class:`BayesianModule` in ``model`` (0 if there is none).

    Example:
        >>> model = nn.Sequential(BayesLinear(4, 8), nn.ReLU(), BayesLinear(8, 2))
        >>> kl = bdl.kl_divergence(model)
        >>> torch.allclose(kl, model[0].kl_divergence() + model[2].kl_divergence())
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    terms = [m.kl_divergence() for m in model.modules() if isinstance(m, BayesianModule)]
    if not terms:
        reference = next(model.parameters(), None)
        return torch.zeros((), device=None if reference is None else reference.device)
    return torch.stack(terms).sum() if len(terms) > 1 else terms[0]


def _bayes_layers(model: nn.Module) -> Iterator[_BayesLayer]:
    return (m for m in model.modules() if isinstance(m, _BayesLayer))


@contextlib.contextmanager
def deterministic(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, every Bayesian layer of ``model`` uses its posterior means instead of sampling.

    A model converted with :func:`bayesianize` then reproduces the original model's outputs exactly.
    Copies made inside the block (``copy.deepcopy``, ``torch.save(model)``) sample as the layers do outside.
    With activation checkpointing, call ``backward()`` inside the block too: the recomputed forward would
    otherwise sample.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> bnn = bdl.bayesianize(net)
        >>> x = torch.randn(5, 4)
        >>> with bdl.deterministic(bnn):
        ...     torch.equal(bnn(x), net(x))
        True
    """
    with _temporarily(list(_bayes_layers(model)), "deterministic", True):
        yield model


@contextlib.contextmanager
def use_estimator(model: nn.Module, estimator: str) -> Iterator[nn.Module]:
    """Inside the block, every Bayesian layer of ``model`` samples with ``estimator``.

    ``"local"`` gives every example (row of the batch) its own independent noise, which lets a batch of
    ``S`` copies of the inputs stand for ``S`` Monte Carlo samples of a linear network.

    Example:
        >>> model = nn.Sequential(BayesLinear(4, 2))
        >>> with bdl.use_estimator(model, "local"):
        ...     model[0].estimator
        'local'
        >>> model[0].estimator
        'reparam'
    """
    check_estimator(estimator)
    with _temporarily(list(_bayes_layers(model)), "estimator", estimator):
        yield model


@contextlib.contextmanager
def _temporarily(layers: list[_BayesLayer], attribute: str, value: object) -> Iterator[None]:
    """Set ``attribute`` of every layer to ``value`` inside the block.

    The layers' own values are also noted in ``_context_overrides``, which copies and pickles made inside the
    block go back to (``_BayesLayer.__getstate__``): a ``copy.deepcopy``, ``torch.save(model)`` or
    ``AveragedModel`` taken inside ``deterministic`` never sampled again.
    """
    previous, owned = [], []
    for layer in layers:
        overrides = layer.__dict__.setdefault("_context_overrides", {})
        previous.append(getattr(layer, attribute))
        owned.append(attribute not in overrides)  # an outer block already noted the layer's own value
        overrides.setdefault(attribute, previous[-1])
        setattr(layer, attribute, value)
    try:
        yield
    finally:
        for layer, old, own in zip(layers, previous, owned):
            setattr(layer, attribute, old)
            if own:
                layer._context_overrides.pop(attribute, None)


def _selected(name: str, module: nn.Module, include: Optional[Sequence[str | type]]) -> bool:
    if include is None:
        return True
    for pattern in include:
        if isinstance(pattern, type):
            if isinstance(module, pattern):
                return True
        elif fnmatch.fnmatchcase(name, pattern):
            return True
    return False


def _patterns(name: str, value: Optional[Sequence[str | type]]) -> Optional[list[str | type]]:
    """``include``/``exclude`` as a list; a bare string or type is one pattern (not one per character)."""
    if value is None:
        return None
    if isinstance(value, (str, type)):
        return [value]
    if not isinstance(value, Sequence) or not all(isinstance(p, (str, type)) for p in value):
        raise TypeError(f"{name} must be a glob pattern, a module type, or a list of them, got {value!r}")
    return list(value)


def _keep_off_fast_paths(model: nn.Module) -> None:
    """Stop torch's Transformer inference fast paths from reading Bayesian layers' weights directly.

    In eval mode ``nn.TransformerEncoderLayer`` (and ``nn.TransformerEncoder`` with a padding mask) call a
    fused kernel with ``linear1.weight`` etc. instead of calling the layers: a Bayesian layer has no
    ``weight`` (and must draw one). The encoder layer skips its fast path when a forward hook is attached
    (a no-op pre-hook here), the encoder when ``use_nested_tensor`` is off.
    """
    for module in model.modules():
        if not any(isinstance(m, BayesianModule) for m in module.modules()):
            continue
        if isinstance(module, nn.TransformerEncoderLayer):
            if _no_fast_path not in module._forward_pre_hooks.values():
                module.register_forward_pre_hook(_no_fast_path)
        elif isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False


def _no_fast_path(module: nn.Module, args: Any) -> None:  # noqa: ANN401
    """A forward pre-hook that does nothing: its presence turns torch's Transformer fast path off."""
    return None


def bayesianize(
    model: nn.Module,
    *,
    include: Optional[Sequence[str | type]] = None,
    exclude: Optional[Sequence[str | type]] = None,
    prior: Prior | float | None = None,
    center_prior_on_weights: bool = False,
    posterior_std_init: float = 1e-3,
    estimator: str = "reparam",
    std_transform: str = "exp",
) -> nn.Module:
    """A converted copy of ``model`` in which ``nn.Linear``/``nn.Conv{1,2,3}d`` become Bayesian layers.

    The input model is not changed. Posterior means start at the existing weights, so the converted
    model under :func:`deterministic` gives exactly the original outputs; posterior standard deviations
    start at ``posterior_std_init``. Kernel sizes, strides, padding (and its mode), dilation, groups and
    ``bias=False`` are kept. Only those exact types are converted: subclasses (a layer with a
    parametrization or ``weight_norm``, ``nn.MultiheadAttention``'s ``out_proj``, whose weight the
    attention reads directly) stay as they are.

    Args:
        model: any ``nn.Module``.
        include: convert only modules whose qualified name matches one of these glob patterns
            (``"fc"``, ``"layer4.*"``) or that are instances of one of these types (a single pattern or
            type on its own is one pattern). None: all. A module used under several names (tied) is
            converted once, into one Bayesian layer under all of them, when one of its names is
            selected and none excluded.
        exclude: like ``include``, for modules to leave deterministic (applied after ``include``).
        prior: prior of every converted layer (see :class:`BayesLinear`); its scale is kept when
            ``center_prior_on_weights`` is set.
        center_prior_on_weights: centre each weight's Gaussian prior on its pretrained value
            (MOPED, Krishnan et al. 2020): ``N(w_pretrained, scale^2)``.
        posterior_std_init, estimator, std_transform: as :class:`BayesLinear`.

    Returns:
        The converted copy.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> bnn = bdl.bayesianize(net, include=["2"])  # last layer only
        >>> [type(m).__name__ for m in bnn]
        ['Linear', 'ReLU', 'BayesLinear']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    prior = as_prior(prior)
    if center_prior_on_weights and not isinstance(prior, GaussianPrior):
        raise ValueError(
            f"center_prior_on_weights needs a GaussianPrior (or a float scale), got {type(prior).__name__}"
        )
    options: dict[str, Any] = {
        "posterior_std_init": posterior_std_init,
        "estimator": estimator,
        "std_transform": std_transform,
    }
    include, exclude = _patterns("include", include), _patterns("exclude", exclude)
    converted = copy.deepcopy(model)
    names: dict[int, list[str]] = {}  # every name of each convertible module: a tied one has several
    modules: dict[int, nn.Module] = {}
    for name, module in converted.named_modules(remove_duplicate=False):
        if type(module) in _CONVERSIONS:
            names.setdefault(id(module), []).append(name)
            modules[id(module)] = module
    targets = [
        (modules[key], module_names)
        for key, module_names in names.items()
        if any(_selected(name, modules[key], include) for name in module_names)
        and not (exclude and any(_selected(name, modules[key], exclude) for name in module_names))
    ]
    if include is not None and not targets:
        subclasses = [
            f"{name!r} is a {type(module).__name__}"
            for name, module in converted.named_modules()
            if isinstance(module, tuple(_CONVERSIONS)) and type(module) not in _CONVERSIONS and _selected(name, module, include)
        ]
        hint = (
            f" ({', '.join(subclasses)}: subclasses of nn.Linear/nn.Conv, such as layers with a parametrization or "
            "weight_norm, are not converted)" if subclasses else ""
        )
        raise ValueError(f"include={include!r} selects no nn.Linear/nn.Conv layer of the model{hint}")
    for module, module_names in targets:
        layer = _CONVERSIONS[type(module)].from_module(module, prior=copy.deepcopy(prior), **options)
        if center_prior_on_weights:
            layer.weight_prior = GaussianPrior(module.weight.detach(), prior.scale)
            if module.bias is not None:
                layer.bias_prior = GaussianPrior(module.bias.detach(), prior.scale)
        layer.train(module.training)
        for name in module_names:
            if name == "":  # the model is itself a single layer
                return layer
            parent_name, _, child = name.rpartition(".")
            setattr(converted.get_submodule(parent_name), child, layer)
    _keep_off_fast_paths(converted)
    return converted
