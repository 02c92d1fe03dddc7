"""Whole-model tools: convert a model to Bayesian layers, sum its KL, and switch how layers sample."""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import functools
import os
import threading
import warnings
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from .functional import check_estimator
from .layers import BayesConv1d, BayesConv2d, BayesConv3d, BayesianModule, BayesLinear, _BayesLayer, _sample_once_block
from .priors import GaussianPrior, Prior, as_prior

_CONVERSIONS: dict[type[nn.Module], type[_BayesLayer]] = {
    nn.Linear: BayesLinear,
    nn.Conv1d: BayesConv1d,
    nn.Conv2d: BayesConv2d,
    nn.Conv3d: BayesConv3d,
}


def kl_divergence(model: nn.Module) -> Tensor:
    """Sum of ``kl_divergence()`` over every :class:`BayesianModule` in ``model`` (0 if there is none).

    After a training forward each layer's KL shares an autograd node with its weight draw: backpropagate it with the
    data term in one loss, or pass ``retain_graph=True`` to a backward of the KL alone.

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
    if not isinstance(model, nn.Module):  # "'str' object has no attribute 'modules'"
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
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
def sample_once(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, every Bayesian layer of ``model`` draws its weights once, at its first call, and every
    later call in the block uses that draw.

    Outside it a layer draws fresh weights at every call, so one called several times in a forward (a recurrent
    cell unrolled over time, a Siamese encoder, weights tied between an encoder and a decoder) sees several
    independent draws where the posterior has one weight: ``||f(x) - f(x)||`` is not 0, and ``w * (w * x)``
    has the mean of ``w1 * w2 * x``. Open the block in the forward, around the calls that must share a draw; a
    forward is then one sample of the weights, in training (the layer's KL, from its posterior, enters the loss once) and in
    :func:`bdl.predict`, which takes its loop for such a model. Inside the block layers draw as the
    ``"reparam"`` estimator does, whatever theirs (a draw per row, ``"local"``, or a sign flip per row,
    ``"flipout"``, cannot be shared by calls); not inside ``torch.compile``, where they draw at every call. A
    block inside another that holds the same layers (an encoder's own, in a model's) uses the outer block's
    draw; a call without gradients (a stop-gradient branch) uses the same draw as calls with them. With
    activation checkpointing the recomputed forward runs outside the block and draws anew: not supported.

    Example:
        >>> class Siamese(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.encoder = BayesLinear(4, 8)
        ...
        ...     def forward(self, a, b):
        ...         with bdl.sample_once(self):
        ...             return (self.encoder(a) - self.encoder(b)).square().sum(-1)
        >>> x = torch.randn(3, 4)
        >>> Siamese()(x, x)
        tensor([0., 0., 0.], grad_fn=<SumBackward1>)
    """
    with _sample_once_block(list(_bayes_layers(model))):
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


_blocks_lock = threading.Lock()  # blocks opened and closed by several threads (a server's requests)


def _fresh_blocks_lock() -> None:
    global _blocks_lock
    _blocks_lock = threading.Lock()  # a forked child: its parent's thread may have held it at the fork


os.register_at_fork(after_in_child=_fresh_blocks_lock)


@contextlib.contextmanager
def _temporarily(layers: list[_BayesLayer], attribute: str, value: object) -> Iterator[None]:
    """Set ``attribute`` of every layer to ``value`` inside the block.

    The layers' own values are also noted in ``_bdl_context_overrides``, which copies and pickles made inside the
    block go back to (``_BayesLayer.__getstate__``): a ``copy.deepcopy``, ``torch.save(model)`` or
    ``AveragedModel`` taken inside ``deterministic`` never sampled again. The open blocks are kept per layer
    (``_bdl_context_blocks``), so blocks that close out of order (two threads' overlapping :func:`bdl.predict`
    calls) leave the newest open block's value, and the layer's own once none is open: each block restoring
    what it found left a block's value for good (a model that never sampled again).
    """
    token = object()
    # (not inside torch.compile, which cannot enter a lock and traces the bookkeeping as it is)
    lock = contextlib.nullcontext() if torch.compiler.is_compiling() else _blocks_lock
    with lock:
        for layer in layers:
            blocks = layer.__dict__.setdefault("_bdl_context_blocks", {}).setdefault(attribute, [])
            if not blocks:
                layer.__dict__.setdefault("_bdl_context_overrides", {})[attribute] = getattr(layer, attribute)
            blocks.append((token, value))
            setattr(layer, attribute, value)
    try:
        yield
    finally:
        with lock:
            for layer in layers:
                blocks = layer._bdl_context_blocks[attribute]
                blocks[:] = [block for block in blocks if block[0] is not token]
                setattr(layer, attribute, blocks[-1][1] if blocks else layer._bdl_context_overrides.pop(attribute))


def _matches(name: str, module: nn.Module, pattern: str | type) -> bool:
    return isinstance(module, pattern) if isinstance(pattern, type) else fnmatch.fnmatchcase(name, pattern)


def _selected(name: str, module: nn.Module, include: Optional[Sequence[str | type]], root: Optional[nn.Module] = None) -> bool:
    """Whether the module, or (given ``root``) one of the blocks holding it, matches a pattern: ``"layer4"`` and
    ``nn.Sequential`` select every layer inside, as ``"layer4.*"`` does."""
    if include is None:
        return True
    lineage = [(name, module)]
    if root is not None and name:
        parts = name.split(".")
        lineage += [(".".join(parts[:i]), root.get_submodule(".".join(parts[:i]))) for i in range(len(parts))]
    return any(_matches(owner, block, pattern) for pattern in include for owner, block in lineage)


def _recomputed_by_legacy_hook(module: nn.Module) -> bool:
    """A layer whose ``weight`` or ``bias`` is no parameter of its own but recomputed before each call by a legacy
    ``torch.nn.utils.weight_norm``/``spectral_norm`` or ``prune`` hook (from ``weight_g``/``weight_v``,
    ``bias_orig``...): that attribute is the last call's, stale after ``load_state_dict``. (``bias=False`` leaves
    ``bias`` registered as None.)"""
    return "weight" not in module._parameters or "bias" not in module._parameters


_NOT_CONVERTED = (
    nn.Embedding, nn.EmbeddingBag, nn.RNNBase, nn.RNNCellBase, nn.MultiheadAttention, nn.Bilinear,
    nn.modules.conv._ConvTransposeNd,
)  # fmt: skip
"""Layers with weights of their own that bayesianize leaves deterministic (besides subclasses of the converted
types), named in a warning: a user converting "the model" may take them for Bayesian."""


def _unconverted_subclass(module: nn.Module) -> bool:
    """A subclass of a converted type (a parametrized layer, attention's out_proj), which stays as it is."""
    return isinstance(module, tuple(_CONVERSIONS)) and type(module) not in _CONVERSIONS


def _left_deterministic(model: nn.Module, chosen: Any) -> list[tuple[str, nn.Module]]:  # noqa: ANN401 - chosen(module, names)
    """The selected layers of :data:`_NOT_CONVERTED` types, and subclasses of nn.Linear/nn.Conv, that hold
    parameters; outermost only (a MultiheadAttention, not its ``out_proj`` too)."""
    left: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{outer}.") or not outer for outer, _ in left):
            continue
        if (_unconverted_subclass(module) or isinstance(module, _NOT_CONVERTED)) and next(module.parameters(), None) is not None and chosen(module, [name]):
            left.append((name, module))
    return left


_HOOK_DICTS = (
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks",
)  # fmt: skip


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
    ``bias=False`` are kept, and so are the layers' hooks, memory format (``channels_last``) and frozen
    weights (``requires_grad=False`` on a weight freezes its posterior mean and std). Only those
    exact types are converted: subclasses (a layer with a parametrization or ``weight_norm``,
    ``nn.MultiheadAttention``'s ``out_proj``, whose weight the attention reads directly), transposed
    convolutions, embeddings, recurrent layers and cells, attention and ``nn.Bilinear`` stay as they are, with a warning that names
    them and their share of the parameters (``exclude`` them to silence it); so, with a warning, do
    layers whose weight or bias a legacy ``torch.nn.utils.weight_norm``, ``spectral_norm`` or ``prune``
    hook recomputes. A layer whose weight is tied to another module's (a language model's output layer
    and its embedding) gets a posterior of its own, with a warning. Lazy layers must be built (one
    forward pass) first. Code that reads a converted layer's ``.weight`` itself (as
    torchvision's Swin attention does) fails with an error that says so: exclude that layer. Torch's
    fused Transformer fast paths, which do the same, are turned off in the copy; in eval mode without
    gradients an ``nn.TransformerEncoder`` given a ``src_key_padding_mask`` then returns its computed
    values at padded positions where the fast path returned zeros (the other positions agree to float
    rounding): pool with the mask.

    Args:
        model: any ``nn.Module``.
        include: convert only modules whose qualified name matches one of these glob patterns
            (``"fc"``, ``"layer4.*"``) or that are instances of one of these types (a single pattern or
            type on its own is one pattern), or that sit inside a block that does (``"layer4"``,
            ``nn.Sequential``). None: all. A module used under several names (tied) is converted
            once, into one Bayesian layer under all of them, when one of its names is selected and
            none excluded.
        exclude: like ``include``, for modules to leave deterministic (applied after ``include``); a
            pattern that matches no module of the model is an error (a typo would exclude nothing).
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
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters()):
        lazy = [name for name, module in model.named_modules() if isinstance(module, nn.modules.lazy.LazyModuleMixin)]
        raise ValueError(
            f"model has lazy layers not built yet ({', '.join(map(repr, lazy))}): run one forward pass on a batch first, "
            "so that they become nn.Linear/nn.Conv layers bayesianize can convert (else they stay deterministic)"
        )
    all_modules = list(model.named_modules(remove_duplicate=False))
    for pattern in exclude or ():
        if not any(_matches(name, module, pattern) for name, module in all_modules):
            raise ValueError(f"exclude pattern {pattern!r} matches no module of the model (a typo leaves everything converted)")
    # a legacy weight_norm/spectral_norm/pruning layer (of any type: a vocoder's ConvTranspose1d, a pruned Embedding)
    # holds its last computed weight, and a model may keep its last activations (an attribute, a list or a dict of
    # them): non-leaf tensors, which deepcopy refuses. The copy gets them detached (a hook recomputes such a weight
    # at every call anyway). Read by vars(): torch.compile's wrapper reads its layer's attributes through __getattr__
    memo: dict[int, Any] = {
        id(value): value.detach().clone()
        for _, module in all_modules
        for value in _kept_tensors(vars(module).values())
        if value.grad_fn is not None
    }
    converted = copy.deepcopy(model, memo)
    names: dict[int, list[str]] = {}  # every name of each convertible module: a tied one has several
    modules: dict[int, nn.Module] = {}
    recomputed: list[str] = []
    for name, module in converted.named_modules(remove_duplicate=False):
        if type(module) in _CONVERSIONS:
            if _recomputed_by_legacy_hook(module):
                recomputed.append(name)
                continue
            names.setdefault(id(module), []).append(name)
            modules[id(module)] = module

    def chosen(module: nn.Module, module_names: list[str]) -> bool:
        return any(_selected(name, module, include, converted) for name in module_names) and not (
            exclude and any(_selected(name, module, exclude, converted) for name in module_names)
        )

    targets = [(modules[key], module_names) for key, module_names in names.items() if chosen(modules[key], module_names)]
    skipped = [name for name in recomputed if chosen(converted.get_submodule(name), [name])]
    if skipped:
        warnings.warn(
            f"bayesianize leaves {', '.join(map(repr, skipped))} deterministic: their weight or bias is recomputed by a "
            "legacy weight_norm/spectral_norm/pruning hook, so the layer's attribute is stale; remove the hook first "
            "(torch.nn.utils.remove_weight_norm, remove_spectral_norm, prune.remove) to convert them",
            stacklevel=2,
        )
    if include is not None and not targets:
        included = [module_names[0] for key, module_names in names.items()
                    if any(_selected(name, modules[key], include, converted) for name in module_names)]  # fmt: skip
        if included:  # exclude took them all: "selects no layer" was false
            raise ValueError(
                f"include={include!r} selects {len(included)} nn.Linear/nn.Conv layer(s) ({', '.join(map(repr, included[:5]))}"
                f"{', ...' if len(included) > 5 else ''}) and exclude={exclude!r} leaves out every one: nothing to convert"
            )
        subclasses = [
            f"{name!r} is a {type(module).__name__}"
            for name, module in converted.named_modules()
            if _unconverted_subclass(module) and _selected(name, module, include, converted)
        ]
        hint = (
            f" ({', '.join(subclasses)}: subclasses of nn.Linear/nn.Conv, such as layers with a parametrization or "
            "weight_norm, are not converted)" if subclasses else ""
        )
        if skipped:
            hint += f" ({', '.join(map(repr, skipped))}: recomputed by a legacy hook, see the warning)"
        raise ValueError(f"include={include!r} selects no nn.Linear/nn.Conv layer of the model{hint}")
    if include is None and exclude is not None and names and not targets:  # a deterministic copy, said nowhere
        every = [module_names[0] for module_names in names.values()]
        raise ValueError(
            f"exclude={exclude!r} leaves out every nn.Linear/nn.Conv layer of the model ({', '.join(map(repr, every[:5]))}"
            f"{', ...' if len(every) > 5 else ''}): nothing to convert"
        )
    left = _left_deterministic(converted, chosen)
    if left:
        held = {id(p): p for _, module in left for p in module.parameters()}
        total = sum(p.numel() for p in converted.parameters())
        count = sum(p.numel() for p in held.values())
        listing = ", ".join(f"{name!r} ({type(module).__name__})" for name, module in left[:5])
        warnings.warn(
            f"bayesianize leaves {len(left)} layer(s) deterministic, with {count:,} of the model's {total:,} parameters"
            f" ({count / total:.0%}): {listing}{', ...' if len(left) > 5 else ''}"
            f"{'' if targets else '; nothing is converted, the copy is deterministic'}. It converts nn.Linear and "
            "nn.Conv1d/2d/3d themselves, not their subclasses (a layer with a parametrization, attention's out_proj, "
            "which the attention reads directly), embeddings, recurrent layers or cells, attention, nn.Bilinear or "
            "transposed convolutions; pass these in `exclude` to silence this warning",
            stacklevel=2,
        )
    if include is None and not names and not recomputed and not left:
        bayesian = [name or type(model).__name__ for name, module in converted.named_modules() if isinstance(module, BayesianModule)]
        if bayesian:  # it said "the copy is deterministic" of a copy that samples
            warnings.warn(
                f"bayesianize: {type(model).__name__} has no nn.Linear/nn.Conv layer to convert; its Bayesian layers "
                f"({', '.join(map(repr, bayesian[:3]))}{', ...' if len(bayesian) > 3 else ''}) are copied as they are, "
                "without this call's prior, posterior_std_init, estimator or std_transform",
                stacklevel=2,
            )
        else:
            warnings.warn(f"bayesianize: {type(model).__name__} has no nn.Linear/nn.Conv layer to convert; the copy is deterministic", stacklevel=2)
    owners: dict[int, list[str]] = {}  # parameter -> the modules holding it (tied weights have several)
    for name, module in converted.named_modules():
        for parameter in module._parameters.values():
            if parameter is not None:
                owners.setdefault(id(parameter), []).append(name)
    replaced: dict[int, nn.Module] = {}  # id of a converted layer -> its Bayesian layer
    for module, module_names in targets:
        shared = sorted({owner for p in (module.weight, module.bias) if p is not None for owner in owners[id(p)]} - set(module_names))
        if shared:
            warnings.warn(
                f"bayesianize: {module_names[0]!r} shares parameters with {', '.join(map(repr, shared))} (tied weights); its "
                "Bayesian layer gets a posterior of its own, so the tie is broken",
                stacklevel=2,
            )
        try:
            layer = _CONVERSIONS[type(module)].from_module(module, prior=copy.deepcopy(prior), **options)
        except ValueError:  # the layer's advice ("construct the layer with a scalar prior") fit no bayesianize call
            shaped = {name: tuple(value.shape) for name, value in prior.named_buffers() if value.numel() > 1}
            if not shaped:
                raise
            shapes = f"weight {tuple(module.weight.shape)}" + ("" if module.bias is None else f", bias {tuple(module.bias.shape)}")
            raise ValueError(
                f"prior: its tensor parameters {shaped} do not fit {module_names[0]!r} ({shapes}): bayesianize gives every "
                "converted layer this prior; pass a scalar prior and assign the layers' weight_prior / bias_prior after "
                "converting (or center_prior_on_weights=True for priors centred on the network's weights)"
            ) from None
        for hooks in _HOOK_DICTS:  # the user's hooks on the layer keep running (a feature or output hook)
            getattr(layer, hooks).update(getattr(module, hooks, {}))
        # torch runs _backward_hooks as full backward hooks only where this flag says so
        layer._is_full_backward_hook = getattr(module, "_is_full_backward_hook", None)
        # what the user set on the layer (a flag or a function the model's forward reads); not torch's private state,
        # such as the _compiled_call_impl of module.compile(), nor what replaces a method of the class (a patched
        # instance forward), which call the replaced layer
        for key in module.__dict__.keys() - _standard_attributes(type(module)) - layer.__dict__.keys():
            if not key.startswith("_") and not hasattr(type(module), key):
                layer.__dict__[key] = module.__dict__[key]
        for name in ("weight", "bias"):  # a frozen weight (a frozen backbone) stays frozen: its mean and its std
            original = getattr(module, name)
            if original is not None and not original.requires_grad:
                for suffix in ("_mu", "_rho"):
                    getattr(layer, name + suffix).requires_grad_(False)
        if center_prior_on_weights:
            layer.weight_prior = GaussianPrior(module.weight.detach(), prior.scale)
            if module.bias is not None:
                layer.bias_prior = GaussianPrior(module.bias.detach(), prior.scale)
        layer.train(module.training)
        replaced[id(module)] = layer
        for name in module_names:
            if name == "":  # the model is itself a single layer
                return layer
            parent_name, _, child = name.rpartition(".")
            parent = converted.get_submodule(parent_name)
            setattr(parent, child, layer)
            if type(parent).__name__ == "OptimizedModule" and callable(getattr(parent, "_initialize", None)):
                parent._initialize()  # torch.compile's wrapper bound its forward to the replaced layer's __call__
    _rebind_references(converted, replaced)
    _keep_off_fast_paths(converted)
    return converted


def _kept_tensors(values: Iterable[Any], depth: int = 0) -> Iterator[Tensor]:
    """The tensors among ``values``, and in the lists, tuples and dicts among them (a few levels)."""
    for value in values:
        if isinstance(value, Tensor):
            yield value
        elif depth < 3 and isinstance(value, (list, tuple, dict)):
            yield from _kept_tensors(value.values() if isinstance(value, dict) else value, depth + 1)


@functools.lru_cache(maxsize=None)
def _standard_attributes(cls: type[nn.Module]) -> frozenset[str]:
    """The instance attributes every ``cls`` (``nn.Linear``, ``nn.Conv2d``...) has: those of a shape-only one."""
    return frozenset(vars(cls(1, 1, 1, device="meta") if issubclass(cls, nn.modules.conv._ConvNd) else cls(1, 1, device="meta")))


def _rebind_references(model: nn.Module, replaced: dict[int, nn.Module]) -> None:
    """Point plain lists, tuples and dicts that modules keep (``self.layers = [self.fc1, self.fc2]``, read by
    ``forward``) at the Bayesian layers that replaced their entries: they held the deterministic copies,
    which the forward then kept using while the KL counted layers it never ran."""
    if not replaced:
        return

    def rebound(value: Any, depth: int = 0) -> Any:  # noqa: ANN401 - a list, tuple or dict, nested a few levels
        if id(value) in replaced:
            return replaced[id(value)]
        if depth > 4:
            return value
        if isinstance(value, list):
            value[:] = [rebound(item, depth + 1) for item in value]
        elif isinstance(value, dict):
            for name, item in list(value.items()):
                value[name] = rebound(item, depth + 1)
        elif isinstance(value, tuple):
            items = [rebound(item, depth + 1) for item in value]
            if any(new is not old for new, old in zip(items, value)):
                return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
        return value

    for module in model.modules():
        for key, value in list(vars(module).items()):
            if key not in ("_modules", "_parameters", "_buffers") and isinstance(value, (list, tuple, dict)):
                module.__dict__[key] = rebound(value)
