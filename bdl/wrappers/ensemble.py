"""Deep ensembles: independently initialised networks whose disagreement is the epistemic uncertainty.

``M`` members trained from different random initialisations give ``M`` samples of the predictive
(Lakshminarayanan et al., 2017); :func:`bdl.predict` treats each member as one Monte Carlo sample.
Members that share an architecture can run in one vectorised call (``torch.func.stack_module_state`` +
``functional_call`` under ``torch.vmap``) or in a loop; both give the same outputs.
"""

from __future__ import annotations

import copy
import enum
import math
import numbers
import os
import re
import warnings
import weakref
from collections import OrderedDict
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules import module as _module_internals
from torch.utils.module_tracker import ModuleTracker

from .._outputs import draw_stacked, output_parts
from .._warn import user_stacklevel
from .._tensors import version_or_none
from ..nn.convert import _kept_tensors
from ..nn.layers import _optimizer_steps, _untraceable
from .mc_dropout import _holds_compiled_module

ENSEMBLE_METHODS = ("auto", "vmap", "loop")
"""How a :class:`DeepEnsemble` runs its members: ``"vmap"`` (one vectorised call, members must share an
architecture), ``"loop"`` (one call per member), ``"auto"`` (``"loop"``: it was measured faster on CPU and on
H200 and H100 GPUs, see :meth:`DeepEnsemble.resolve_method`)."""


_Layout = list[tuple[str, nn.Module]]  # a member's named_modules(), walked once per resolve_method


def _parametrized(module: nn.Module) -> bool:
    """``nn.utils.parametrize.is_parametrized(module)`` without its ``getattr`` (``nn.Module.__getattr__`` raising
    for nearly every module took a third of :meth:`DeepEnsemble.resolve_method`'s time)."""
    parametrizations = module._modules.get("parametrizations")
    return isinstance(parametrizations, nn.ModuleDict) and len(parametrizations) > 0


def _module_class(module: nn.Module) -> type:
    """``module``'s class, or for a module with a parametrization (``weight_norm``, ``spectral_norm``, ...) the class
    it had: torch gives each such module a class of its own, so members from one factory seemed to differ."""
    if _parametrized(module):
        return type(module).__mro__[1]
    return type(module)


def _named_tensors(layout: _Layout, kind: str) -> tuple[tuple[str, torch.Size, torch.dtype, torch.device], ...]:
    """``named_parameters()`` (``kind="_parameters"``) or ``named_buffers()`` (``"_buffers"``) of a walked member,
    each tensor once, as ``(name, shape, dtype, device)``."""
    seen: set[int] = set()
    found = []
    for name, module in layout:
        for key, tensor in getattr(module, kind).items():
            if tensor is not None and id(tensor) not in seen:
                seen.add(id(tensor))
                found.append((f"{name}.{key}" if name else key, tensor.shape, tensor.dtype, tensor.device))
    return tuple(found)


def _structure(layout: _Layout) -> tuple[Any, ...]:
    """What must agree between members for ``functional_call`` on one of them to run any of them (with
    :func:`_attributes`)."""
    return (
        tuple((name, _module_class(m), _parametrized(m), m.extra_repr()) for name, m in layout),
        _named_tensors(layout, "_parameters"),
        _named_tensors(layout, "_buffers"),
    )


def _described(entry: tuple[Any, ...]) -> str:
    """One entry of :func:`_structure`, for an error: ``Dropout(p=0.5, inplace=False)``, ``float64 [3, 4] on cpu``."""
    if isinstance(entry[1], type):  # a module: (name, class, parametrized, extra_repr)
        return f"{entry[1].__name__}({entry[3]}){' (parametrized)' if entry[2] else ''}"
    _, shape, dtype, device = entry
    return f"{str(dtype).removeprefix('torch.')} {list(shape)} on {device}"


def _shown(value: Any) -> str:  # noqa: ANN401 - any attribute value
    """An attribute's value for an error, in a line: a tensor or array of more than 8 elements by its dtype and shape
    (a [4, 250] table printed 25,000 characters), anything else by its repr cut at 80 characters."""
    array = not isinstance(value, type) and hasattr(value, "shape") and hasattr(value, "dtype")
    if array and math.prod(value.shape) > 8:
        kind = "tensor" if isinstance(value, Tensor) else "array"
        return f"a {str(value.dtype).removeprefix('torch.')} {kind} {list(value.shape)}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _attributes(layout: _Layout) -> list[tuple[str, dict[str, Any]]]:
    """Each submodule's plain attributes (a scale factor, the training flag, a dropout rate): vmap runs the
    first member's module with the others' tensors, so these must be the members' own too."""
    found = []
    for name, m in layout:
        attributes = vars(m)  # a set difference first, as in _private_values
        found.append((name, {k: attributes[k] for k in attributes.keys() - _MODULE_INTERNALS if k[0] != "_"} | {"training": m.training}))
    return found


_MODULE_INTERNALS = frozenset(vars(nn.Module()))  # the hook dicts, _parameters, ...: each module's own
_IMMUTABLE = (type(None), bool, numbers.Number, str, bytes, enum.Enum, torch.dtype, torch.device)


def _immutable(value: Any) -> bool:  # noqa: ANN401 - any attribute value
    if isinstance(value, (tuple, frozenset)):
        return all(map(_immutable, value))
    return isinstance(value, _IMMUTABLE)


class _Private(NamedTuple):
    """A module's private attributes (not ``nn.Module``'s own nor bdl's ``_bdl_`` bookkeeping: tags, one per instance,
    and the open ``bdl.deterministic`` blocks of a layer): their names, and the values of those that are immutable
    (a user's ``self._scale = 2.0``, a cache's key such as a rotary embedding's ``_seq_len_cached``)."""

    names: frozenset[str]
    values: dict[str, Any]


def _private_values(modules: Iterable[nn.Module]) -> list[_Private]:
    """Each submodule's :class:`_Private`: vmap's copy of member 0 is made again when they change (copied alone, a
    cache's key left it a table for another key), and members whose settings differ run by the loop
    (:func:`_first_difference`). Compared with ``==`` (a NaN set once is the same object)."""
    found = []
    for m in modules:
        attributes = vars(m)
        # a set difference first: most of a module's attributes are nn.Module's own, and this runs at every vmap call
        names = frozenset(k for k in attributes.keys() - _MODULE_INTERNALS if k[0] == "_" and not k.startswith("_bdl_"))
        found.append(_Private(names, {k: attributes[k] for k in names if _immutable(attributes[k])}))
    return found


def _first_difference(names: list[str], reference: list[_Private], other: list[_Private]) -> Optional[str]:
    """The qualified name of the first private setting that differs between two members, or None: an attribute one
    member has and the other has not, or immutable values that differ (as dicts compare theirs: a NaN that is one
    object equals itself). An attribute immutable in one member only (a Lightning module's ``_trainer``, None until
    fit; a cache None until built) is state, not a setting: left out."""
    for name, mine, theirs in zip(names, reference, other):
        for key in sorted(mine.names ^ theirs.names):
            return f"{name}.{key}" if name else key
        for key in sorted(mine.values.keys() & theirs.values.keys()):
            if mine.values[key] is not theirs.values[key] and mine.values[key] != theirs.values[key]:
                return f"{name}.{key}" if name else key
    return None


def _uncopyable(modules: Iterable[nn.Module]) -> Optional[str]:
    """The first tensor attribute (in lists and dicts too) of a member's ``modules`` that needs gradients, as
    ``"Linear._decoder"``, or None: one computed from the weights (a view of a weight, a loss kept from a training
    forward), which ``deepcopy`` refuses and which would be member 0's for every member in vmap's copy."""
    for submodule in modules:
        for key, value in vars(submodule).items():
            if key not in _MODULE_INTERNALS and any(tensor.requires_grad for tensor in _kept_tensors([value])):
                return f"{type(submodule).__name__}.{key}"
    return None


def _same(a: Any, b: Any) -> bool:  # noqa: ANN401 - any attribute values
    """Whether two members' values of one setting agree: tensors by shape and values, containers item by item,
    numpy arrays by shape, dtype and values, anything else by ``==`` (values without a truth value: not at all)."""
    if a is b:  # most settings (a flag, a small int, a name)
        return True
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b.to(a.device))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values without a truth value of ==: only identical ones agree, or equal arrays
        if type(a) is type(b) and type(a).__module__ == "numpy" and hasattr(a, "shape"):
            try:  # (an object array's items may have no truth value of == either)
                return a.shape == b.shape and a.dtype == b.dtype and bool((a == b).all())
            except Exception:  # noqa: BLE001
                return False
        return False


_PLAIN = frozenset((bool, int, float, str, type(None)))


def _agree(a: Any, b: Any) -> bool:  # noqa: ANN401 - any attribute values
    """:func:`_same`, without its walk for the same object or two plain values of one type (most settings: the walk
    took most of :meth:`DeepEnsemble.resolve_method`'s time)."""
    if a is b:
        return True
    if type(a) is type(b) and type(a) in _PLAIN:
        return a == b
    return _same(a, b)


def _settings_agree(mine: list[tuple[str, dict[str, Any]]], theirs: list[tuple[str, dict[str, Any]]]) -> bool:
    """Whether two members' :func:`_attributes` agree, setting by setting (:func:`_agree`)."""
    if len(mine) != len(theirs):
        return False
    for (name, ours), (other_name, other) in zip(mine, theirs):
        if name != other_name or ours.keys() != other.keys() or not all(_agree(value, other[key]) for key, value in ours.items()):
            return False
    return True


_HOOKS = (("_forward_pre_hooks", ("_forward_pre_hooks_with_kwargs",)),
          ("_forward_hooks", ("_forward_hooks_with_kwargs", "_forward_hooks_always_called")))  # fmt: skip


def _hooks_alike(modules: Sequence[nn.Module]) -> bool:
    """Whether ``modules`` (one per member, at one place) have the same forward (pre-)hooks: the same functions,
    or alike by their ``alike`` method (MCDropout's inserted dropout, one hook object per member)."""
    for hooks, _ in _HOOKS:
        if not any(getattr(module, hooks) for module in modules):  # (most modules)
            continue
        mine = list(getattr(modules[0], hooks).values())
        for other in modules[1:]:
            theirs = list(getattr(other, hooks).values())
            if len(theirs) != len(mine) or not all(_alike(hook, their) for hook, their in zip(mine, theirs)):
                return False
    return True


def _runs_on_copy(hook: Any) -> bool:  # noqa: ANN401
    """Whether ``hook`` is one of bdl's (MC dropout's, bayesianize's, predict's probes) or torch's ``ModuleTracker``'s
    (which ``FlopCounterMode`` and Lightning's model summary set: it tracks which module runs, and vmap's copy then
    counts the members' FLOPs under its own module names), which run on vmap's copy. Not every hook of torch's:
    quantization observers kept the copy's ranges, not the members', and ``ModTracker`` calls user hooks."""
    if isinstance(getattr(hook, "__self__", None), ModuleTracker):
        return True
    module = getattr(hook, "__module__", None) or ""
    return module == "bdl" or module.startswith("bdl.")


def _alike(hook: Any, other: Any) -> bool:  # noqa: ANN401
    return hook is other or (type(hook) is type(other) and hasattr(hook, "alike") and hook.alike(other))


def _hooks_for_copy(module: nn.Module, names: Callable[[], dict[int, str]], copy: nn.Module) -> dict[str, Any]:
    """``module``'s forward (pre-)hooks, as the attributes ``nn.Module`` keeps them in (ordered dicts: hooks registered
    on the copy take weak references to them), for the same place in ``copy`` of member 0 (``names``: member 0's
    module names by id): a hook holding a module of member 0 (``in_copy``) takes the copy's."""
    state: dict[str, Any] = {}
    for hooks, flags in _HOOKS:
        state[hooks] = OrderedDict(
            (key, hook.in_copy(names(), copy) if hasattr(hook, "in_copy") else hook) for key, hook in getattr(module, hooks).items()
        )  # fmt: skip
        state.update((flag, OrderedDict(getattr(module, flag))) for flag in flags)
    return state


class _Stacked(NamedTuple):
    """The members' tensors stacked for vmap, kept between calls without gradients while ``key`` (names, storage,
    versions, optimizer steps) and the ``sources`` (weak references to the stacked tensors themselves) hold."""

    key: tuple
    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    sources: list[weakref.ref]


def _meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers are tensors of their shapes on the meta device.

    Made by ``deepcopy`` with those tensors swapped in (nothing of the members' values is copied); also
    inside ``torch.func.functional_call``, whose plain tensors in ``_parameters`` failed ``.to("meta")``.
    """
    memo: dict[int, Any] = {}
    for submodule in module.modules():
        for value in submodule._parameters.values():
            if value is not None:
                memo[id(value)] = nn.Parameter(torch.empty_like(value, device="meta"), requires_grad=value.requires_grad)
        for value in submodule._buffers.values():
            if value is not None:
                memo[id(value)] = torch.empty_like(value, device="meta")
    return copy.deepcopy(module, memo)


def _check_factory(factory: Any) -> None:  # noqa: ANN401
    # a module is callable too: called without arguments it fails in its forward, far from the mistake
    if not callable(factory) or isinstance(factory, nn.Module):
        raise TypeError(
            "factory must be a callable that takes no arguments and returns a new nn.Module (such as "
            f"`lambda: nn.Linear(4, 2)`), got {type(factory).__name__}"
        )


def ensemble_rounds(call: Callable[[Tensor], Any], x: Tensor, num_samples: int, members: int) -> Any:  # noqa: ANN401
    """:meth:`DeepEnsemble.sample_outputs` of an ensemble of ``members`` that ``call`` runs (the ensemble, or a
    ``torch.compile`` wrapper of it): ``num_samples / members`` calls, stacked."""
    rounds, remainder = divmod(num_samples, members)
    if remainder or rounds < 1:
        raise ValueError(f"num_samples must be a multiple of the {members} members, got {num_samples}")
    if rounds == 1:
        return call(x)
    parts, rebuild = output_parts(draw_stacked(lambda _: call(x), rounds, "the ensemble", "round"))
    return rebuild([part.flatten(0, 1) for part in parts])


def _whole_ensemble_hint(state: Mapping[str, Any], own: set[str]) -> str:
    """A hint where a checkpoint holds a whole ensemble (``ensemble.state_dict()``: its members under
    ``members.<i>.``, or under a module's attribute before that), not one member: torch's missing and unexpected keys
    said nothing of it."""
    members: dict[str, set[int]] = {}
    for key in state:
        found = re.match(r"(.*?members\.)(\d+)\.", key)
        if found:
            members.setdefault(found.group(1), set()).add(int(found.group(2)))
    for stem, indices in members.items():
        first = f"{stem}{min(indices)}."
        if {key[len(first):] for key in state if key.startswith(first)} >= own:
            return (
                f" (it holds a whole ensemble of {len(indices)} members, under '{stem}<i>.': pass it once per member "
                f"with a prefix each, prefix=[f'{stem}{{i}}.' for i in range({len(indices)})])"
            )
    return ""


class DeepEnsemble(nn.Module):
    """An ensemble of ``M`` networks; ``forward`` returns every member's output stacked, ``[M, B, ...]``.

    Tuple outputs (e.g. a :class:`bdl.GaussianHead`'s ``(mean, variance)``) come back as tuples of stacked
    tensors, dicts and nested ones (an LSTM's ``(output, (h, c))``) alike. :func:`bdl.predict` uses each member
    as one sample (``num_samples`` defaults to ``M``; a multiple of ``M`` runs stochastic members, e.g.
    :class:`bdl.MCDropout` ones, several rounds).

    Joint training, one optimizer over all members with each member trained on its own loss: sum the
    per-member losses (the gradient of member ``m``'s parameters is then that of its own loss)::

        optimizer = torch.optim.Adam(ensemble.parameters(), lr=1e-3)
        loss = ensemble.member_losses(ensemble(x), y, F.cross_entropy).sum()

    Members can also be trained separately and loaded with :meth:`from_checkpoints`.

    Args:
        members: the networks (at least one). Members with different output shapes raise ``ValueError``
            on the first forward that shows it.
        method: ``"auto"``, ``"vmap"`` or ``"loop"``, see :data:`ENSEMBLE_METHODS`. Without gradients,
            ``vmap`` keeps the members' stacked weights between calls while their version counters stay put:
            edit members' parameters in place under ``torch.no_grad()`` (not through ``.data``, which moves no
            counter; :func:`bdl.predict` restacks them on every call). Members with forward hooks of your own
            (feature recorders), or backward hooks under gradients, run by ``"loop"``, with a warning; so do
            members whose private settings of plain values differ (``self._temperature = 2.0``). vmap runs a copy of
            member 0: a setting held in a tensor or list attribute of its own (a detached view of a weight too) is
            member 0's for every member; members that keep a tensor needing gradients (a view of a weight, a loss of
            a training forward) run by ``"loop"``, with a warning. Under
            ``vmap`` an ``nn.TransformerEncoder`` given a padding mask in eval mode leaves its nested-tensor fast path
            (which vmap cannot batch): its padded positions hold values where the loop's fast path gives zeros (a
            decoder attending to that memory without a ``memory_key_padding_mask`` reads them).
        chunk_size: members evaluated at once by ``vmap`` (None: all), bounding memory.

    Example:
        >>> ensemble = bdl.DeepEnsemble.from_factory(lambda: nn.Linear(4, 3), 5)
        >>> x = torch.randn(8, 4)
        >>> ensemble(x).shape
        torch.Size([5, 8, 3])
        >>> bdl.predict(ensemble, x).num_samples
        5
    """

    def __init__(self, members: Iterable[nn.Module], *, method: str = "auto", chunk_size: Optional[int] = None) -> None:
        super().__init__()
        if isinstance(members, nn.Module) and not isinstance(members, nn.ModuleList):
            # a Sequential is one network: its layers became "members" (three Linear/Tanh/Linear samples, no error)
            raise TypeError(
                f"members must be a list (or nn.ModuleList) of networks, got a single {type(members).__name__}; "
                "use DeepEnsemble.from_factory(fn, n) for n networks built by fn"
            )
        members = list(members)
        if not members:
            raise ValueError("members is empty: an ensemble needs at least one network")
        first: dict[int, int] = {}
        for i, member in enumerate(members):
            if not isinstance(member, nn.Module):
                raise TypeError(f"members[{i}] must be an nn.Module, got {type(member).__name__}")
            j = first.setdefault(id(member), i)
            if j != i:  # one network twice: its members agree exactly, and the mutual information is 0
                raise ValueError(
                    f"members[{i}] is members[{j}], the same network: each member must be a network of its own "
                    "(a factory must build a new one per call, e.g. lambda: make_net(), not lambda: net)"
                )
        if method not in ENSEMBLE_METHODS:
            raise ValueError(f"method must be one of {list(ENSEMBLE_METHODS)}, got {method!r}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1):
            raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
        self.members = nn.ModuleList(members)
        self.method = method
        self.chunk_size = None if chunk_size is None else int(chunk_size)  # a numpy integer too
        # a weightless copy of member 0 that functional_call runs; in a list so it is not registered as a submodule
        self._base: list[nn.Module] = []
        self._stacked: Optional[_Stacked] = None
        self._base_layout: Optional[list[tuple[str, weakref.ref]]] = None  # member 0's modules when _base was made
        self._warned_hooks = False

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_factory(cls, factory: Callable[[], nn.Module], num_members: int, **kwargs: Any) -> "DeepEnsemble":
        """An ensemble of ``num_members`` networks made by calling ``factory()`` once each.

        Each call should initialise its weights randomly (as ``nn.Linear`` and friends do), so the
        members start apart; seed ``torch.manual_seed`` before for reproducibility.

        Example:
            >>> ensemble = bdl.DeepEnsemble.from_factory(lambda: nn.Linear(2, 1), 3)
            >>> len(ensemble)
            3
        """
        _check_factory(factory)
        if isinstance(num_members, bool) or not isinstance(num_members, numbers.Integral) or num_members < 1:
            raise ValueError(f"num_members must be an int >= 1, got {num_members!r}")
        return cls([factory() for _ in range(int(num_members))], **kwargs)

    @classmethod
    def from_checkpoints(
        cls,
        factory: Callable[[], nn.Module],
        checkpoints: Sequence[Union[str, os.PathLike, Mapping[str, Tensor]]],
        *,
        prefix: Union[str, Sequence[str]] = "",
        map_location: Any = "cpu",
        strict: bool = True,
        **kwargs: Any,
    ) -> "DeepEnsemble":
        """An ensemble of ``factory()`` networks, each loading one checkpoint.

        A checkpoint is a path to a file saved with ``torch.save`` or an in-memory mapping, holding a
        ``state_dict`` or a dict with a ``"state_dict"`` entry (Lightning checkpoints); keys starting
        with ``prefix`` (e.g. ``"model."`` for a LightningModule's attribute) are kept with it stripped.
        Files are read with ``torch.load(weights_only=True)``. A whole ensemble's checkpoint (an
        :class:`bdl.lightning.EnsembleModule`'s: ``model.members.<i>.``) loads as one checkpoint per member with
        a prefix each: ``from_checkpoints(factory, [path] * 5, prefix=[f"model.members.{i}." for i in range(5)])``.

        Args:
            factory: builds one untrained member.
            checkpoints: one path or mapping per member.
            prefix: key prefix to select and strip: one for every checkpoint, or a sequence of one per checkpoint.
            map_location: passed to ``torch.load``.
            strict: passed to ``load_state_dict``.
            **kwargs: ``method``, ``chunk_size``.

        Example:
            >>> members = [nn.Linear(3, 2) for _ in range(2)]
            >>> ensemble = bdl.DeepEnsemble.from_checkpoints(lambda: nn.Linear(3, 2), [m.state_dict() for m in members])
            >>> torch.equal(ensemble.members[1].weight, members[1].weight)
            True
        """
        _check_factory(factory)
        if isinstance(checkpoints, (str, os.PathLike, Mapping)):
            raise TypeError("checkpoints must be a sequence with one checkpoint per member")
        checkpoints = list(checkpoints)
        if not checkpoints:
            raise ValueError("checkpoints is empty: give one per member")
        if isinstance(prefix, str) or prefix is None:  # (None: no prefix, as before prefixes per checkpoint)
            prefixes = [prefix or ""] * len(checkpoints)
        else:  # a set's order is no order
            ordered = isinstance(prefix, Iterable) and not isinstance(prefix, (set, frozenset, Mapping))
            prefixes = list(prefix) if ordered else []
            if not ordered or not all(isinstance(p, str) for p in prefixes):
                raise TypeError(f"prefix must be a str, or a sequence of one str per checkpoint, got {prefix!r}")
        if len(prefixes) != len(checkpoints):
            raise ValueError(f"prefix gives {len(prefixes)} prefixes for {len(checkpoints)} checkpoints: give one per checkpoint")
        members = []
        for i, (checkpoint, prefix) in enumerate(zip(checkpoints, prefixes)):
            if isinstance(checkpoint, (str, os.PathLike)):
                if not os.path.isfile(checkpoint):
                    raise FileNotFoundError(f"checkpoints[{i}]: no file at {os.fspath(checkpoint)!r}")
                path = os.fspath(checkpoint)
                try:
                    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
                except Exception as error:  # noqa: BLE001 - torch raises several types for broken files
                    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                    raise ValueError(
                        f"checkpoints[{i}] ({path!r}) cannot be loaded with weights_only=True, map_location="
                        f"{map_location!r}: {type(error).__name__}: {reason} (a truncated or corrupted file, not a "
                        "PyTorch checkpoint, objects other than tensors and plain values, or a device this machine lacks)"
                    ) from None
            if not isinstance(checkpoint, Mapping):
                raise TypeError(f"checkpoints[{i}] must be a path or a state_dict mapping, got {type(checkpoint).__name__}")
            state = whole = checkpoint.get("state_dict", checkpoint)
            if prefix:
                # with the state's metadata: each layer's record of how it was saved (a BayesLinear's std_transform,
                # converted on loading) goes with its keys; a plain dict of the stripped keys lost it
                metadata = getattr(state, "_metadata", None)
                state = OrderedDict((key[len(prefix):], value) for key, value in state.items() if key.startswith(prefix))
                if not state:
                    raise ValueError(f"checkpoints[{i}] has no key starting with prefix={prefix!r}")
                if metadata is not None:  # keyed by module path: "model.net" is the member itself for "model.net."
                    root = prefix.removesuffix(".")
                    state._metadata = OrderedDict(  # type: ignore[attr-defined]
                        ("" if key == root else key[len(prefix):], value)
                        for key, value in metadata.items()
                        if key == root or key.startswith(prefix)
                    )
            member = factory()
            if not isinstance(member, nn.Module):
                raise TypeError(f"factory must return an nn.Module, got {type(member).__name__}")
            own = set(member.state_dict())
            try:
                result = member.load_state_dict(state, strict=strict)
            except RuntimeError as error:  # another architecture's keys or shapes: say which checkpoint
                hint = ""
                if not prefix and own and state:  # a LightningModule's checkpoint: every key under its attribute's name
                    first = next(iter(state)).split(".", 1)[0] + "."
                    if all(key.startswith(first) for key in state) and {key[len(first):] for key in state} >= own:
                        hint = f" (every key of the checkpoint starts with {first!r}: pass prefix={first!r})"
                hint = hint or _whole_ensemble_hint(whole, own)
                raise RuntimeError(f"checkpoints[{i}] does not fit the factory's model{hint}: {error}") from None
            if own and not own & set(state):  # strict=False: a member of its initial weights, silently (missing_keys
                # is no test: a BatchNorm fills in its num_batches_tracked)
                raise ValueError(
                    f"checkpoints[{i}] has none of the factory model's keys (strict=False loaded nothing)"
                    f"{_whole_ensemble_hint(whole, own)}"
                )
            members.append(member)
        return cls(members, **kwargs)

    # ------------------------------------------------------------------ running the members
    def __len__(self) -> int:
        return len(self.members)

    @property
    def num_members(self) -> int:
        """``M``, the number of members."""
        return len(self.members)

    def shares_architecture(self) -> bool:
        """Whether every member has the structure, parameter and buffer shapes, and plain attributes (such as
        a scale factor or the training mode) of the first (vmap-able)."""
        return self._shares_architecture([list(member.named_modules()) for member in self.members])

    @staticmethod
    def _shares_architecture(layouts: list[_Layout]) -> bool:
        reference = _structure(layouts[0])
        if not all(_structure(layout) == reference for layout in layouts[1:]):
            return False
        attributes = _attributes(layouts[0])
        return all(_settings_agree(attributes, _attributes(layout)) for layout in layouts[1:])

    @staticmethod
    def _architecture_difference(layouts: list[_Layout]) -> str:
        """Where the first member unlike member 0 differs from it, for the error ("needs members of one architecture"
        did not say where: a bdl.deterministic block around one member, a dropout rate changed in one)."""
        reference, attributes = _structure(layouts[0]), _attributes(layouts[0])
        for index, layout in enumerate(layouts[1:], 1):
            for kind, mine, theirs in zip(("module", "parameter", "buffer"), reference, _structure(layout)):
                for ours, other in zip(mine, theirs):
                    if ours != other:
                        place = f"{kind} {other[0]!r}" if other[0] or kind != "module" else "network"
                        if other[0] != ours[0]:
                            why = " (one tied to another in one member only, or registered in another order)" if kind != "module" else ""
                            return f"member {index} has {kind} {other[0]!r} where member 0 has {ours[0]!r}{why}"
                        return f"member {index}'s {place} is {_described(other)}, member 0's {_described(ours)}"
                if len(mine) != len(theirs):
                    counted = " (the network itself included)" if kind == "module" else ""
                    return f"member {index} has {len(theirs)} {kind}s{counted}, member 0 {len(mine)}"
            for (name, ours), (_, other) in zip(attributes, _attributes(layout)):
                for key in sorted(ours.keys() | other.keys()):
                    mine_value, their_value = ours.get(key, "(none)"), other.get(key, "(none)")
                    if not _agree(mine_value, their_value):
                        where = f"{name}.{key}" if name else key
                        theirs_shown, mine_shown = _shown(their_value), _shown(mine_value)
                        if theirs_shown == mine_shown:
                            theirs_shown += " (other values)"
                        return f"member {index}'s attribute {where!r} is {theirs_shown}, member 0's {mine_shown}"
        return "no difference now"

    def resolve_method(self) -> str:
        """``"vmap"`` or ``"loop"``: the path :meth:`forward` takes now.

        ``"auto"`` takes ``"loop"``: ``experiments/benchmark_predict.py`` measured it as fast as or faster
        than ``"vmap"`` for 5-member MLP ensembles at batch 64 and 1024, on CPU (up to 1.3x), on an H200 (1.3-1.5x)
        and on an H100 (1.2-1.3x): stacking the members' weights costs more than the ``M - 1`` launches it saves. Ask
        for ``"vmap"`` explicitly to use it (e.g. for many small members); it needs members of one
        architecture and, in training mode, no BatchNorm-style buffers (their updates would go to the
        stacked copy, not the members).
        """
        return self._resolve()[0]

    def _resolve(self) -> tuple[str, list[_Layout]]:
        """:meth:`resolve_method`'s answer, and the members' modules it walked (once: walking them for each check took
        most of a small ensemble's vmap call)."""
        if self.method != "vmap" or len(self.members) == 1:
            return "loop", []
        layouts = [list(member.named_modules()) for member in self.members]
        found_any = False  # MC dropout members find their layers (and move inserted dropout) first, as their own
        for layout in layouts:  # forward would: vmap's copy runs none of theirs
            for _, module in layout:
                found = getattr(type(module), "_found_dropout", None)  # (the class's: nn.Module's getattr is slow)
                if callable(found):
                    found(module)
                    found_any = True
        if found_any:
            layouts = [list(member.named_modules()) for member in self.members]
        if not self._shares_architecture(layouts):
            if any(_holds_compiled_module(member) for member in self.members):  # each compile wrapper has its own state
                raise ValueError(
                    "method='vmap' runs the members' modules, not their torch.compile wrappers: compile the ensemble "
                    "instead (torch.compile(DeepEnsemble(members, method='vmap'))), or use method='loop'"
                )
            raise ValueError(
                "method='vmap' needs members of one architecture (same modules, attributes, parameter and buffer shapes): "
                f"{self._architecture_difference(layouts)}; use method='loop'"
            )
        # the members' own modes (alike: shares_architecture compares them), not the wrapper's: members switched to
        # training mode in an eval-mode ensemble updated vmap's stacked copy of their statistics, not theirs
        # (buffers that are None, as InstanceNorm's and an untracked BatchNorm's statistics, hold nothing to update)
        modules = [[module for _, module in layout] for layout in layouts]
        if any(module.training and any(b is not None for b in module._buffers.values()) for module in modules[0]):
            raise ValueError(
                "method='vmap' cannot run members in training mode that hold buffers (BatchNorm statistics): their updates "
                "would go to vmap's stacked copy, not the members; use method='loop', or eval()"
            )
        private = [_private_values(member) for member in modules]
        differing = [values for values in private[1:] if values != private[0]]
        if differing:  # vmap's copy of member 0 ran member 0's for every member (a temperature each), silently
            names = [name for name, _ in layouts[0]]
            attribute = next(filter(None, (_first_difference(names, private[0], values) for values in differing)), None)
            if attribute is not None:
                return self._loop_instead("_warned_private", f"the members' private attribute {attribute!r} differs"), layouts
        uncopyable = _uncopyable(modules[0])
        if uncopyable is not None:  # deepcopy refused it, or the copy ran member 0's tensor for every member
            return self._loop_instead(
                "_warned_uncopyable", f"member 0's {uncopyable} is a tensor of its weights or of a forward with gradients"
            ), layouts
        if not all(_hooks_alike(at_place) for at_place in zip(*modules)):
            # one vmapped copy of member 0 runs every member: a hook of member 0's alone zeroed every member
            why = "the members' forward hooks differ (a hook object of each member's own, or a hook on some members only)"
            return self._loop_instead("_warned_hooks", why), layouts
        # a hook of the user's ran once, on the copy, with vmap's batched tensors: features it kept failed when read
        if any(not _runs_on_copy(hook) for module in modules[0] for hooks, _ in _HOOKS for hook in getattr(module, hooks).values()):
            why = "members have forward hooks of your own (they would run once, on vmap's batched copy)"
            return self._loop_instead("_warned_own_hooks", why), layouts
        global_hooks = [getattr(_module_internals, f"_global{hooks}", {}) for hooks, _ in _HOOKS]  # register_module_forward_hook's
        if any(not _runs_on_copy(hook) for hooks in global_hooks for hook in hooks.values()):
            return self._loop_instead("_warned_global_hooks", "global forward hooks (register_module_forward_hook) are set"), layouts
        if torch.is_grad_enabled() and (
            _module_internals._global_backward_hooks or _module_internals._global_backward_pre_hooks  # on every module
            or any(module._backward_hooks or module._backward_pre_hooks for member in modules for module in member)
        ):  # the vmapped copy runs none of the members' modules: a backward through it ran no member's hook
            return self._loop_instead("_warned_backward_hooks", "members have backward hooks (with gradients)"), layouts
        return "vmap", layouts

    def _loop_instead(self, flag: str, why: str) -> str:
        """``"loop"``, with a warning the first time (``flag``) that ``why`` keeps vmap from running the members."""
        if not getattr(self, flag, False):  # an ensemble pickled before the flag existed has none
            warnings.warn(f"DeepEnsemble: {why}, which vmap cannot run: the members run one by one (method='loop')",
                          stacklevel=user_stacklevel())  # fmt: skip
            setattr(self, flag, True)
        return "loop"

    def _drop_value_caches(self) -> None:
        """Forget the stacked weights (:func:`bdl.predict` calls it first: ``.data`` edits move no version counter)."""
        self._stacked = None

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> "DeepEnsemble":  # noqa: ANN401
        self._stacked = None  # .to() / .double() / .cpu(): a stacked copy of the old weights held their memory
        return super()._apply(fn, recurse)

    def _state(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Member parameters and buffers stacked along a new first dimension.

        With gradients enabled they are stacked afresh (``torch.stack`` is differentiable, so training
        through the vmap path updates the members' own parameters); without, the stack is cached until a
        member's tensors change (their version counters move on every in-place update).
        """
        tensors = [dict(member.named_parameters()) | dict(member.named_buffers()) for member in self.members]
        # no cache for inference tensors (members built or loaded under torch.inference_mode: no version counter), nor
        # under torch.func (a grad of the ensemble, or an ensemble of vmapped ensembles: no storage to key by). Keyed
        # by the names too: layers registered again in another order (or one inserted) kept their tensors and versions
        uncached = any(_untraceable(t) or version_or_none(t) is None for state in tensors for t in state.values())
        key = None if uncached else tuple((name, t.data_ptr(), t._version) for state in tensors for name, t in state.items())
        if key is not None:  # a fused optimizer (Adam(fused=True)) writes the members' weights without moving a version
            key += (_optimizer_steps[0],)
        # and the tensors themselves, by weak reference: a new tensor at a freed one's address, both at version 0 (a
        # functional_call's parameters, a replaced Parameter), matched the key and got the old weights' outputs
        sources = [t for state in tensors for t in state.values()]
        if not torch.is_grad_enabled() and key is not None and self._stacked is not None and self._stacked.key == key and all(
            ref() is t for ref, t in zip(self._stacked.sources, sources)
        ):
            return self._stacked.params, self._stacked.buffers
        names = list(tensors[0])
        parameter_names = {name for name, _ in self.members[0].named_parameters()}
        stacked = {name: torch.stack([state[name] for state in tensors]) for name in names}
        params = {name: value for name, value in stacked.items() if name in parameter_names}
        buffers = {name: value for name, value in stacked.items() if name not in parameter_names}
        cache = not torch.is_grad_enabled() and key is not None
        self._stacked = _Stacked(key, params, buffers, [weakref.ref(t) for t in sources]) if cache else None
        return params, buffers

    def _current_base(self, layout: _Layout) -> nn.Module:
        """The weightless copy of member 0 that vmap runs, made at the first call (not when built: members are
        configured after, their lazy layers built, and some cannot be copied where vmap never runs), and made again
        where a module of member 0 was replaced since (in every member: the copy ran the old one, also one of the
        same type and other settings) or a private setting of member 0 changed (:func:`_private_values`). Modules are
        told by weak references, as a freed module's id is reused at once (and a strong one kept a replaced layer's
        memory, and wrote it into torch.save). A first call under ``torch.compile(fullgraph=True)`` cannot make it (a
        ``Parameter()``): call the ensemble once before, and again after changing a private setting of member 0.
        ``layout``: member 0's ``named_modules()``."""
        kept = getattr(self, "_base_layout", None)  # (an ensemble pickled by an earlier version has none)
        replaced = not self._base or kept is None or len(kept) != len(layout) or any(
            ref() is not module or m != n for (m, ref), (n, module) in zip(kept, layout)
        )
        private = _private_values(module for _, module in layout)
        if replaced or private != getattr(self, "_base_private", None):  # a private setting changed: the copy kept it
            self._base[:] = [_meta_copy(self.members[0])]
            if replaced:  # (the old layers' stacked weights)
                self._stacked = None
            self._base_layout = [(name, weakref.ref(module)) for name, module in layout]
            self._base_private = private
        return self._base[0]

    def _vmap_forward(self, layout: _Layout, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:  # noqa: ANN401
        """The members' outputs by one vmapped call of member 0's copy (``layout``: member 0's ``named_modules()``)."""
        base = self._current_base(layout)
        # the first member's plain attributes as they are now (the training flags, a bdl.deterministic or
        # bdl.use_estimator block, a changed dropout rate): the copy kept those of its first forward
        names: list[dict[int, str]] = []  # member 0's module names by id, when a hook asks

        def member_names() -> dict[int, str]:
            if not names:
                names.append({id(module): name for name, module in layout})
            return names[0]

        for base_module, (_, module) in zip(base.modules(), layout):
            base_module.__dict__.update((k, v) for k, v in vars(module).items() if not k.startswith("_"))
            # and its forward hooks, alike on every member (resolve_method): an MCDropout around the ensemble hooks
            # the members' dropout layers for the call (the copy dropped nothing, or kept dropping for good when made
            # inside one)
            base_module.__dict__.update(_hooks_for_copy(module, member_names, base))
            # vmap cannot batch the nested tensor an eval-mode encoder makes of a padded batch (as
            # convert._keep_off_fast_paths and MCDropout turn it off): padded positions then hold values, not zeros
            if isinstance(base_module, nn.TransformerEncoder):
                base_module.use_nested_tensor = False
        params, buffers = self._state()

        rebuild: Optional[Callable[[list[Tensor]], Any]] = None  # the output's structure: vmap returns tensors only

        def call(p: dict[str, Tensor], b: dict[str, Tensor], *inputs: Any) -> tuple[Tensor, ...]:  # noqa: ANN401
            nonlocal rebuild
            # keyword arguments: the same for every member
            parts, rebuild = output_parts(functional_call(base, (p, b), inputs, kwargs), "ensemble members")
            return tuple(parts)

        in_dims = (0, 0) + (None,) * len(args)
        try:
            parts = torch.vmap(call, in_dims=in_dims, randomness="different", chunk_size=self.chunk_size)(params, buffers, *args)
            assert rebuild is not None  # set by the vmapped call
            return rebuild(list(parts))
        except RuntimeError as error:  # e.g. torch 2.11's vmap of cuDNN BatchNorm under CUDA autocast
            try:  # an error of the inputs (float32 into a float64 ensemble) is the member's own, which the loop meets too
                with torch.random.fork_rng(devices=[]):  # in the caller's grad mode: a member may take input gradients
                    self.members[0](*args, **kwargs)
            except Exception as alone:
                raise alone from None
            raise RuntimeError(f"DeepEnsemble method='vmap' failed: {error}; method='loop' runs the members one by one") from error

    def _loop_forward(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        return draw_stacked(lambda m: self.members[m](*args, **kwargs), len(self.members), "ensemble members", "member")

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401 - a tensor, tuple or dict like one member's output
        """Every member's output on the same inputs (keyword arguments too, e.g. a transformer's
        ``src_key_padding_mask``), stacked along a new first dimension ``[M, ...]``."""
        method, layouts = self._resolve()
        if method == "vmap":
            return self._vmap_forward(layouts[0], args, kwargs)
        return self._loop_forward(*args, **kwargs)

    def sample_outputs(self, x: Tensor, num_samples: int) -> Any:  # noqa: ANN401
        """``num_samples`` outputs ``[S, B, ...]``: ``S / M`` rounds of all members (``S`` a multiple of ``M``)."""
        return ensemble_rounds(self, x, num_samples, len(self.members))

    def member_losses(self, outputs: Any, target: Tensor, criterion: Callable[..., Tensor]) -> Tensor:  # noqa: ANN401
        """``[M]``: ``criterion(output_m, target)`` for each member's slice of ``outputs = ensemble(x)`` (``[M, ...]``
        with the criterion's shape when it does not reduce to a scalar, e.g. ``reduction="none"``: ``[M, B]``).

        Sum it for joint training: each member's parameters then get the gradient of their own loss.

        Example:
            >>> ensemble = bdl.DeepEnsemble.from_factory(lambda: nn.Linear(4, 3), 2)
            >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
            >>> losses = ensemble.member_losses(ensemble(x), y, nn.functional.cross_entropy)
            >>> losses.shape
            torch.Size([2])
            >>> losses.sum().backward()
        """
        if not callable(criterion):
            raise TypeError(f"criterion must be callable, got {type(criterion).__name__}")
        count = len(self.members)
        try:  # any structure the members return ({"logits": ...}, (mean, variance), nested), sliced part by part
            parts, rebuild = output_parts(outputs)
        except TypeError:
            raise TypeError(
                f"outputs must be the ensemble's outputs (a tensor, or a tuple, list or dict of tensors), got {type(outputs).__name__}"
            ) from None
        for part in parts:
            if part.shape[:1] != (count,):
                raise ValueError(f"outputs must be stacked over the {count} members [M, ...], got shape {tuple(part.shape)}")
        return torch.stack([criterion(rebuild([part[m] for part in parts]), target) for m in range(count)])

    def extra_repr(self) -> str:
        return f"num_members={len(self.members)}, method={self.method!r}"

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_base"], state["_stacked"] = [], None  # caches: rebuilt on demand
        state["_base_layout"] = None  # weak references, which do not pickle
        return state
