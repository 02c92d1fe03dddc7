"""Monte Carlo dropout: dropout left on at prediction time as approximate Bayesian inference.

A network trained with dropout approximates a deep Gaussian process; averaging ``S`` forward passes
with fresh dropout masks estimates its predictive distribution (Gal & Ghahramani, 2016).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import fnmatch
import math
import numbers
import sys
import uuid
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd

from ..nn.functional import dropout

# True while bdl.predict probes a network with its noise off: MC dropout blocks inside it then leave their dropout
# as eval mode does. A context variable, so a probe in one thread does not switch off a block that another thread
# shares (threads started elsewhere, such as DataParallel's, see it unset: the probe's seeding covers those)
DROPOUT_OFF: contextvars.ContextVar[bool] = contextvars.ContextVar("bdl_mc_dropout_off", default=False)

DROPOUT_TYPES = (_DropoutNd,)
"""Module types kept stochastic: ``_DropoutNd`` covers ``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``
and ``FeatureAlphaDropout``. Two modules with a ``dropout`` argument are kept stochastic too, by switching
them to training mode, which changes nothing else in them: ``nn.MultiheadAttention`` with ``dropout > 0``
(its attention dropout, also inside ``nn.Transformer*`` layers) and ``nn.RNN``/``nn.LSTM``/``nn.GRU`` with
``dropout > 0`` (between their layers)."""


def _is_dropout(module: nn.Module) -> bool:
    """Whether ``module`` is a dropout layer, or an attention or RNN with a dropout rate."""
    if isinstance(module, DROPOUT_TYPES):
        return True
    return isinstance(module, (nn.MultiheadAttention, nn.RNNBase)) and module.dropout > 0


def _can_fire(module: nn.Module) -> bool:
    """Whether the dropout ``module`` drops anything in training mode: not at rate 0 (torchvision's ViT has such
    layers) nor between the layers of a one-layer RNN. (Others stay switched on: a rate may be set later.)"""
    if isinstance(module, DROPOUT_TYPES):
        return module.p > 0
    if isinstance(module, nn.RNNBase):
        return module.num_layers > 1
    return True


class _DropoutBefore:
    """Forward pre-hook (``with_kwargs=True``) applying ``dropout`` to a module's first input, positional or the
    first tensor passed by keyword (``fc(input=x)``); picklable and deep-copyable."""

    def __init__(self, dropout: nn.Module) -> None:
        self.dropout = dropout

    def alike(self, other: "_DropoutBefore") -> bool:
        """Whether ``other`` drops as this does: a vmapped DeepEnsemble runs member 0's for every member."""
        return type(self.dropout) is type(other.dropout) and self.dropout.p == other.dropout.p

    def in_copy(self, names: dict[int, str], copy: nn.Module) -> "_DropoutBefore":
        """This hook for ``copy`` of a module whose submodules are named in ``names`` (a vmapped DeepEnsemble's copy
        of member 0): the copy's own dropout where the member holds it (an MCDropout member, whose copy switches its
        own on), else this one (an MCDropout around the ensemble switches it on)."""
        name = names.get(id(self.dropout))
        return self if name is None else _DropoutBefore(copy.get_submodule(name))

    def _drop(self, module: nn.Module, x: Tensor) -> Tensor:
        dropout = self.dropout
        if module.training:  # as a dropout layer of the model trains (activation checkpointing's recompute replays it)
            return torch.nn.functional.dropout(x, dropout.p, training=True)
        if dropout.training or any(hook is _always_on_dropout for hook in dropout._forward_hooks.values()):
            return dropout(x)  # switched on by an MCDropout's call (this one's, or one around it)
        # else as a dropout layer of the model: off while the module it was inserted before does not train (the
        # wrapper's own mode reached it alone: mc.train() then mc.model.eval() still dropped, in evaluation of the bare
        # network)
        return x

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: Optional[dict[str, Any]] = None) -> Any:  # noqa: ANN401
        if kwargs is None:  # registered without kwargs (an MCDropout pickled by an earlier bdl)
            return (self._drop(module, args[0]), *args[1:])
        if args:
            return (self._drop(module, args[0]), *args[1:]), kwargs
        name = next((key for key, value in kwargs.items() if isinstance(value, Tensor)), None)
        if name is None:
            raise ValueError(f"MC dropout inserted before {type(module).__name__} found no input tensor to drop")
        return args, {**kwargs, name: self._drop(module, kwargs[name])}


def _remove_dropout_before(module: nn.Module, dropout: nn.Module) -> None:
    """Remove ``module``'s forward pre-hooks that apply ``dropout`` (:class:`_DropoutBefore`), or a deep copy of it (a
    module deep-copied carries a copy of the hook: it dropped twice, and in the bare model)."""
    tag = getattr(dropout, "_bdl_inserted", None)  # kept by deepcopy and pickle; None in an MCDropout of an earlier bdl

    _remove_inserted_dropout(module, lambda other: other is dropout or (tag is not None and getattr(other, "_bdl_inserted", None) == tag))


def _remove_inserted_dropout(module: nn.Module, which: Callable[[nn.Module], bool]) -> None:
    """Remove ``module``'s forward pre-hooks (:class:`_DropoutBefore`) whose dropout ``which`` picks."""
    keys = [key for key, hook in module._forward_pre_hooks.items() if isinstance(hook, _DropoutBefore) and which(hook.dropout)]
    for key in keys:
        module._forward_pre_hooks.pop(key)
        module._forward_pre_hooks_with_kwargs.pop(key, None)


def _always_on_dropout(module: nn.Dropout, args: tuple[Any, ...], output: Tensor) -> Tensor:
    """Forward hook on an eval-mode ``nn.Dropout`` (whose output is its input), ahead of the user's hooks on it:
    the output of dropout left on, which those hooks then see (and may replace)."""
    return dropout(output, module.p)


def _holds_compiled_module(model: nn.Module) -> bool:
    """Whether ``model`` or a submodule runs compiled: ``torch.compile(module)`` or ``module.compile()``."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is None:  # nothing was compiled in this process (and importing it would cost ~1.7 s)
        return False
    return any(
        isinstance(module, dynamo.eval_frame.OptimizedModule) or getattr(module, "_compiled_call_impl", None) is not None
        for module in model.modules()
    )


def _matches(name: str, module: nn.Module, patterns: Sequence[str | type]) -> bool:
    for pattern in patterns:
        if isinstance(pattern, type) and isinstance(module, pattern):
            return True
        if isinstance(pattern, str) and fnmatch.fnmatchcase(name, pattern):
            return True
    return False


class MCDropout(nn.Module):
    """Keeps every dropout layer of ``model`` stochastic at prediction time; everything else as usual.

    Inside :meth:`forward` the dropout modules (see :data:`DROPOUT_TYPES`) draw fresh masks whatever the
    mode of the rest of the model (``nn.Dropout`` through :func:`bdl.nn.functional.dropout`, the same
    distribution drawn faster; the other types switched to training mode), so in eval mode BatchNorm uses
    its running statistics while dropout is on; each call is one Monte Carlo sample. The wrapper
    shares ``model`` (no copy) and starts in eval mode; call ``.train()`` to train through it. Dropout
    applied with ``F.dropout(x, training=self.training)`` inside a custom ``forward`` cannot be seen
    and stays off in eval mode: use ``nn.Dropout`` modules. Activation checkpointing (``torch.utils.checkpoint``)
    inside the model trains through the wrapper (in training mode, dropout layers and inserted dropout drop as
    ``F.dropout`` does, whose masks the recomputation in the backward replays), but gradients in eval mode are not
    supported: the backward recomputes the forward after :meth:`forward` has returned, outside the dropout
    context, and drops nothing (wrong gradients; torch's ``CheckpointError`` with ``use_reentrant=False``).
    Dropout layers are found at every call: ones replaced or added after wrapping are kept on, and inserted
    dropout follows a module replaced under its name.

    A model without dropout layers raises ``ValueError`` unless ``insert_before`` names where to add
    ``nn.Dropout(p)`` (applied to the input of each chosen module by a forward pre-hook); the model is
    then deep-copied first so the original stays unchanged.

    Args:
        model: the network.
        p: dropout rate of inserted layers, in (0, 1); only with ``insert_before``.
        insert_before: modules to put dropout in front of: qualified-name glob patterns (``"fc2"``,
            ``"layers.*"``) and/or module types (``nn.Linear``).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3))
        >>> model = bdl.MCDropout(net)
        >>> x = torch.randn(5, 4)
        >>> bool((model(x) != model(x)).any()), net[1].training  # fresh masks; BatchNorm in eval
        (True, False)
        >>> pred = bdl.predict(model, x, num_samples=30)
    """

    def __init__(self, model: nn.Module, *, p: Optional[float] = None, insert_before: Optional[Sequence[str | type]] = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        inserted: list[nn.Module] = []
        self._targets: list[nn.Module] = []
        self._target_names: list[str] = []
        if insert_before is not None:
            if isinstance(insert_before, (str, type)):
                insert_before = [insert_before]
            if not all(isinstance(pattern, (str, type)) for pattern in insert_before):
                raise TypeError(f"insert_before must be name patterns and/or module types, got {insert_before!r}")
            if not (isinstance(p, numbers.Real) and not isinstance(p, bool) and math.isfinite(p) and 0 < p < 1):
                raise ValueError(f"p must be a dropout rate in (0, 1) when inserting dropout, got {p!r}")
            model = copy.deepcopy(model)
            # a network taken out of another MCDropout (load_from_checkpoint(model=module.model.model)) carries that
            # one's inserted dropout hooks: in training mode it dropped twice (keeping 0.25 at p = 0.5), at
            # prediction once. Those of an MCDropout inside the network are its own, and stay
            owned = {id(d) for m in model.modules() if isinstance(m, MCDropout) for d in m._inserted}
            for module in model.modules():
                _remove_inserted_dropout(module, lambda dropout: id(dropout) not in owned)
            # an attention's out_proj is an nn.Linear whose forward the attention never calls (it reads the weight)
            unused = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
            # the model itself by a type pattern only (a name glob such as "*" would match its empty name): a bare
            # nn.Linear model matched nothing, "its modules: []"
            types = [pattern for pattern in insert_before if isinstance(pattern, type)]
            for name, module in model.named_modules():
                if id(module) not in unused and _matches(name, module, insert_before if name else types):
                    dropout = nn.Dropout(float(p))
                    dropout._bdl_inserted = uuid.uuid4().hex  # its hook's copies in copied modules are told by it
                    module.register_forward_pre_hook(_DropoutBefore(dropout), with_kwargs=True)
                    inserted.append(dropout)
                    self._targets.append(module)
                    self._target_names.append(name or "(the model)")
            if not self._targets:
                names = [name for name, _ in model.named_modules() if name]
                raise ValueError(f"insert_before={list(insert_before)!r} matched no module of the model; its modules: {names}")
        elif p is not None:
            raise ValueError("p sets the rate of inserted dropout layers: pass insert_before too (existing layers keep their rate)")
        self.model = model
        if inserted:  # registered (so .train()/.to() and print reach them) only when there are any
            self.inserted_dropout = nn.ModuleList(inserted)
        self._inserted = inserted
        self._find_dropout()
        if not any(map(_can_fire, self._dropout)):
            raise ValueError(
                f"{type(model).__name__} has no dropout layer ({', '.join(t.__name__ for t in DROPOUT_TYPES)}) with a rate "
                "p > 0 (nor attention or multi-layer RNN dropout); MC dropout needs one: pass p=0.1, "
                "insert_before=[nn.Linear] (or module names) to insert dropout"
            )
        self.eval()

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a copy (deepcopy, pickle) tags its inserted dropout afresh: copies sharing a module removed each other's hooks
        super().__setstate__(state)
        for dropout in self.__dict__.get("_inserted", []):
            if hasattr(dropout, "_bdl_inserted"):
                dropout._bdl_inserted = uuid.uuid4().hex

    def _find_dropout(self) -> None:
        """The model's dropout layers and transformer encoders (one pass over its modules), then the inserted ones."""
        dropout, encoders, layers = [], [], []
        for module in self.model.modules():
            if _is_dropout(module):
                dropout.append(module)
            elif isinstance(module, nn.TransformerEncoder):
                encoders.append(module)
            elif isinstance(module, nn.TransformerEncoderLayer):
                layers.append(module)
        self._dropout = dropout + self._inserted
        self._encoders = encoders
        # an eval-mode encoder layer takes torch's fused fast path, which applies no dropout: in training mode
        # (a flag that only gates that path) it runs its dropout modules
        self._encoder_layers = [m for m in layers if any(map(_is_dropout, m.modules()))]

    def _found_dropout(self) -> list[nn.Module]:
        """The dropout layers as the model holds them now, found at every call: a head replaced after wrapping kept
        its dropout off (0 mutual information) while the detached old one was switched on. An inserted dropout
        follows a module replaced under its name (its pre-hook is put on the new one)."""
        self._find_dropout()
        for i, (name, target) in enumerate(zip(self._target_names, self._targets)):
            try:  # the model itself too: `mc.model = retrained` dropped nothing, with 0 mutual information
                current = self.model if name == "(the model)" else self.model.get_submodule(name)
            except AttributeError:  # removed: the dropout before it has nothing to drop
                continue
            if current is not target:
                if torch.compiler.is_compiling():  # a hook cannot be moved inside a traced forward (fullgraph failed)
                    raise RuntimeError(
                        f"MCDropout: the module {name!r} that dropout was inserted before was replaced after compiling; "
                        "read model.dropout_modules (or call the model) outside torch.compile once to move the dropout"
                    )
                dropout = self._inserted[i]
                # off the module it leaves, and not twice on one it comes back to (swapped back, it dropped twice)
                _remove_dropout_before(target, dropout)
                _remove_dropout_before(current, dropout)
                current.register_forward_pre_hook(_DropoutBefore(dropout), with_kwargs=True)
                self._targets[i] = current
        return self._dropout

    def train(self, mode: bool = True) -> "MCDropout":
        """As ``nn.Module.train``; inserted dropout stays in eval mode, switched on by a call of the wrapper only (or,
        as a dropout layer of the model would be, while the module it was inserted before trains)."""
        super().train(mode)
        for dropout in self._inserted:
            dropout.training = False
        return self

    @property
    def dropout_modules(self) -> list[nn.Module]:
        """Every dropout module kept stochastic (the model's own, then inserted ones)."""
        return list(self._found_dropout())

    @property
    def noise_modules(self) -> list[nn.Module]:
        """Modules whose call draws dropout noise: the dropout layers and the modules dropout was inserted before."""
        dropout = self._found_dropout()
        return dropout[: len(dropout) - len(self._inserted)] + self._targets

    @contextlib.contextmanager
    def dropout_enabled(self) -> Iterator[None]:
        """Context in which every dropout module draws fresh masks (restored afterwards).

        Other dropout types are switched to training mode (and out of ``inplace``, which would overwrite the
        caller's input); plain ``nn.Dropout`` layers draw the same
        distribution faster: they stay in eval mode (the identity) and a forward hook applies
        :func:`bdl.nn.functional.dropout` to their input. Inside ``torch.compile``, and when the wrapped
        model is (or holds) a compiled module, every dropout layer is switched to training mode instead:
        registering a hook there would break the graph, a graph compiled before the hook existed would
        ignore it (torch.compile does not guard on hooks), and the compiled ``F.dropout`` is one fused
        kernel anyway; the training flags are guarded, so a compiled model recompiles for them.
        """
        dropout_layers = self._found_dropout()
        switched = dropout_layers + self._encoder_layers  # (found again, also in an MCDropout pickled before they were kept)
        previous = [module.training for module in switched]
        for layer in switched[len(dropout_layers):]:
            layer.training = True
        hooks = []
        # an eval-mode TransformerEncoder turns a padded batch into a nested tensor when its first layer would take
        # the fused fast path, which the dropout switched on here then shuts: the layers failed on the nested tensor
        encoders = [encoder for encoder in self._encoders if encoder.use_nested_tensor]
        for encoder in encoders:
            encoder.use_nested_tensor = False
        compiled = torch.compiler.is_compiling() or _holds_compiled_module(self.model)
        # an in-place dropout is the identity in eval mode; switched on, it overwrote its input, which for a first
        # layer is the caller's tensor: predict's loop fed every sample the last one's masked input (all zeros)
        in_place = [module for module in self._dropout if getattr(module, "inplace", False) is True]
        for module in in_place:
            module.inplace = False
        for module in self._dropout:
            # an MCDropout around one (or around a model holding one) dropped twice: p = 0.5 dropped 75%, kept x4
            if any(hook is _always_on_dropout for hook in module._forward_hooks.values()):
                continue  # the outer one's hook drops (eval mode), compiled here or not
            if module.training:  # a model's own layer drops already (in MCDropoutModule's training): as F.dropout, which
                continue  # activation checkpointing's recompute in the backward replays (bdl's dropout drew other masks)
            if type(module) is nn.Dropout and not compiled:
                module.training = False
                hooks.append(module.register_forward_hook(_always_on_dropout, prepend=True))
            else:
                module.training = True
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
            for module, training in zip(switched, previous):
                module.training = training
            for module in in_place:
                module.inplace = True
            for encoder in encoders:
                encoder.use_nested_tensor = True

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401 - whatever the model returns
        if not torch.compiler.is_compiling() and DROPOUT_OFF.get():  # a probe of bdl.predict's, in this thread
            return self.model(*args, **kwargs)
        with self.dropout_enabled():
            return self.model(*args, **kwargs)

    # Around a model that draws its own samples (a DeepEnsemble: each forward gives every member's output), its
    # sample_outputs and num_members, with dropout on: bdl.predict read the stacked [M, B, C] as one output of M
    # rows. Absent (AttributeError) around other models, which predict samples call by call.
    @property
    def sample_outputs(self) -> Callable[[Tensor, int], Any]:
        inner = getattr(self.model, "sample_outputs", None)
        if not callable(inner):
            raise AttributeError(f"MCDropout around {type(self.model).__name__} has no sample_outputs: each call is one sample")

        def sample_outputs(x: Tensor, num_samples: int) -> Any:  # noqa: ANN401
            with self.dropout_enabled():
                return inner(x, num_samples)

        return sample_outputs

    @property
    def num_members(self) -> int:
        if not callable(getattr(self.model, "sample_outputs", None)) or not hasattr(self.model, "num_members"):
            raise AttributeError(f"MCDropout around {type(self.model).__name__} has no num_members")
        return self.model.num_members

    def extra_repr(self) -> str:
        text = f"dropout_layers={len(self._dropout) - len(self._inserted)}"
        if self._target_names:
            text += f", inserted_before={self._target_names}"
        return text
