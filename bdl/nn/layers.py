"""Drop-in Bayesian versions of ``nn.Linear`` and ``nn.Conv{1,2,3}d``.

Each weight and bias has a mean-field Gaussian posterior ``N(mu, std^2)`` with ``std = exp(rho)``
(default) or ``std = softplus(rho)``. ``forward`` draws fresh weights on every call, in train and eval
mode, and returns a tensor, so the layers compose with ``nn.Sequential``. ``kl_divergence()`` gives the
KL from the posterior to the prior; ``bdl.kl_divergence(model)`` sums it over a model.
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
import threading
import warnings
import weakref
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .._tensors import version_or_none
from .._warn import user_stacklevel
from .functional import (
    ESTIMATORS,
    STD_TRANSFORMS,
    GaussianWeights,
    _in_functorch,
    _normal_,
    check_estimator,
    forward_ad_active,
    local_reparameterized,
    posterior_variance,
    randn_like,
    rho_from_std,
    rho_value,
    std_from_rho,
)
from .priors import GaussianPrior, Prior, as_prior


def _check_size(name: str, value: Any, owner: str, minimum: int = 0) -> int:  # noqa: ANN401
    # numbers.Integral: numpy's integers too (np.prod of a shape), which torch.nn's layers take
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be an int >= {minimum}, got {value}")
    return int(value)


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (e.g. meta)
        return False


class BayesianModule(nn.Module):
    """Marker base class of every module with a posterior over its own parameters.

    Subclasses implement :meth:`kl_divergence` for their own parameters (not their children's);
    :func:`bdl.kl_divergence` sums it over all modules of a model.

    Example:
        >>> class BayesScale(BayesianModule):  # y = a * x with a ~ N(mu, 0.1^2), prior N(0, 1)
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.mu = nn.Parameter(torch.zeros(()))
        ...     def forward(self, x):
        ...         return (self.mu + 0.1 * torch.randn(())) * x
        ...     def kl_divergence(self):
        ...         return torch.distributions.kl_divergence(
        ...             torch.distributions.Normal(self.mu, 0.1), torch.distributions.Normal(0.0, 1.0))
        >>> bdl.kl_divergence(nn.Sequential(BayesScale(), BayesLinear(2, 1))).item() > 0
        True
    """

    def kl_divergence(self) -> Tensor:  # pragma: no cover - abstract
        """``KL(q || p)`` of this module's own parameters, a scalar tensor."""
        raise NotImplementedError


# weights from this size (128 KiB of float32, glibc's default mmap threshold) are sampled into a kept buffer
# when predicting on the CPU; smaller ones come from the allocator's free lists at no cost
_SAMPLE_BUFFER_MIN_NUMEL = 1 << 15


class _SampleOnceBlocks(threading.local):
    def __init__(self) -> None:
        self.open: list[tuple[frozenset[int], dict[int, tuple]]] = []  # (layers, their draws) of each open block


_sample_once = _SampleOnceBlocks()
_sample_once_blocks = [0]  # blocks open in any thread: a forward's cheap first test (the others read no thread-local)


def _sample_once_draws(layer: nn.Module) -> Optional[dict[int, tuple]]:
    """The draws of the outermost :func:`bdl.sample_once` block of this thread that holds ``layer``, or None: a
    block opened inside another (an encoder's own, called twice in a model's) shares the outer one's draw."""
    for layers, draws in _sample_once.open:
        if id(layer) in layers:
            return draws
    return None


@contextlib.contextmanager
def _sample_once_block(layers: list[nn.Module]) -> Iterator[None]:
    block: tuple[frozenset[int], dict[int, tuple]] = (frozenset(map(id, layers)), {})
    _sample_once.open.append(block)
    _sample_once_blocks[0] += 1
    try:
        yield
    finally:
        _sample_once_blocks[0] -= 1
        for index in range(len(_sample_once.open) - 1, -1, -1):
            if _sample_once.open[index] is block:
                del _sample_once.open[index]
                break


class _TransientCache(dict):
    """What a layer keeps from its last forwards (KLs in an autograd graph; stds and sample buffers for
    prediction); copies and pickles of the layer start empty."""

    def __deepcopy__(self, memo: dict) -> "_TransientCache":
        return _TransientCache()

    def __reduce__(self) -> tuple:
        return (_TransientCache, ())


_optimizer_steps = [0]  # optimizer steps taken in this process (a list: mutated in place by the hook)


def _count_optimizer_step(optimizer: Any, args: Any, kwargs: Any) -> None:  # noqa: ANN401
    _optimizer_steps[0] += 1


# What layers keep between calls (a forward's KL, the stds S prediction forwards share) is judged current by the
# parameters' version counters; torch's fused optimizers (Adam(fused=True) and the like) write the parameters
# without moving them, so every optimizer step counts as a change too
register_optimizer_step_post_hook(_count_optimizer_step)


def _untraceable(tensor: Tensor) -> bool:
    """Whether ``tensor`` has no storage to key a cache by: inside ``torch.compile``, or wrapped by ``torch.func``."""
    return torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(tensor)


class _CachedKL:
    """The KL a forward computed for one parameter pair, with what it was computed from."""

    __slots__ = ("kl", "mu", "rho", "state", "prior", "graph", "kl_version")

    def __init__(self, posterior: GaussianWeights) -> None:
        self.kl, self.mu, self.rho, self.prior = posterior.kl, posterior.mu, posterior.rho, posterior.prior
        self.state = self._state(posterior.mu, posterior.rho)
        # the KL itself, which kl_divergence hands out (a bias-free layer's as it is): `kl /= N` edited the next one
        self.kl_version = posterior.kl._version
        self.graph = posterior.graph  # its "spent" flag is set when a backward goes through the node

    @staticmethod
    def _state(mu: Tensor, rho: Tensor) -> tuple:
        return (mu._version, rho._version, mu.data_ptr(), rho.data_ptr(), mu.dtype, mu.device, _optimizer_steps[0])

    def valid(self, mu: Tensor, rho: Tensor, prior: Optional[tuple[float, float]]) -> bool:
        return (
            not self.graph.spent
            and mu is self.mu
            and rho is self.rho
            and prior == self.prior
            and self._state(mu, rho) == self.state
            and self.kl._version == self.kl_version
        )


class _BayesLayer(BayesianModule):
    """Shared machinery: posterior parameters, priors, estimators, KL. Subclasses define ``_op``."""

    _flipout_per_channel = False

    def _init_bayes(
        self,
        weight_shape: tuple[int, ...],
        bias: bool,
        factory_kwargs: dict[str, Any],
        prior: Prior | float | None,
        posterior_std_init: float,
        estimator: str,
        std_transform: str,
    ) -> None:
        if isinstance(posterior_std_init, bool) or not (isinstance(posterior_std_init, numbers.Real) and math.isfinite(posterior_std_init) and posterior_std_init > 0):
            raise ValueError(f"posterior_std_init must be a positive finite number, got {posterior_std_init!r}")
        if std_transform not in STD_TRANSFORMS:
            raise ValueError(f"std_transform must be one of {list(STD_TRANSFORMS)}, got {std_transform!r}")
        self.estimator = check_estimator(estimator)
        self.std_transform = std_transform
        self.posterior_std_init = float(posterior_std_init)
        self.deterministic = False
        self._kl_cache = _TransientCache()
        self._std_cache = _TransientCache()
        self.weight_mu = nn.Parameter(torch.empty(weight_shape, **factory_kwargs))
        self.weight_rho = nn.Parameter(torch.empty(weight_shape, **factory_kwargs))
        if bias:
            self.bias_mu = nn.Parameter(torch.empty(weight_shape[0], **factory_kwargs))
            self.bias_rho = nn.Parameter(torch.empty(weight_shape[0], **factory_kwargs))
        else:
            self.register_parameter("bias_mu", None)
            self.register_parameter("bias_rho", None)
        prior = as_prior(prior)
        self.weight_prior = prior
        bias_prior = copy.deepcopy(prior) if bias else None
        if bias_prior is not None:
            try:
                bias_prior.check_shape(self.bias_mu.shape)
            except ValueError as error:
                raise ValueError(
                    f"prior: {error}; a prior with tensor parameters shaped for the weight {tuple(weight_shape)} "
                    f"does not fit the bias {tuple(self.bias_mu.shape)}: construct the layer with a scalar prior and "
                    "assign layer.weight_prior and layer.bias_prior, or use bias=False"
                ) from None
        self.bias_prior = bias_prior
        self.reset_parameters()

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        # the layer's own settings, not those of a bdl.deterministic / bdl.use_estimator block the copy is made in
        state.update(state.pop("_bdl_context_overrides", None) or {})
        state.pop("_bdl_context_blocks", None)
        return state

    def __setstate__(self, state: dict) -> None:
        state.setdefault("_kl_cache", _TransientCache())  # layers pickled before these caches existed
        state.setdefault("_std_cache", _TransientCache())
        super().__setstate__(state)

    # The posterior stds are transform(rho): a state dict records the transform its rho were saved under (in its
    # per-module metadata, where torch keeps format versions, so the keys stay tensors), and loading it into a
    # layer of the other transform converts them to the same stds. Without the record (a state dict rebuilt as a
    # plain dict, or saved by an older bdl) the rho are read as this layer's.
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        metadata = getattr(destination, "_metadata", None)
        if metadata is not None:
            metadata.setdefault(prefix[:-1], {})["std_transform"] = self.std_transform

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, *args: Any) -> None:  # noqa: ANN401
        # the kept stds and KL describe the old values, and hold references to the parameters, which
        # torch's swap_tensors loading (torch.__future__.set_swap_module_params_on_conversion) refuses
        self._std_cache.clear()
        self._kl_cache.clear()
        saved = local_metadata.get("std_transform", self.std_transform)
        if saved != self.std_transform and saved in STD_TRANSFORMS:
            converted = False
            for name in ("weight_rho", "bias_rho"):
                rho = state_dict.get(prefix + name)
                if isinstance(rho, Tensor):  # load_state_dict works on a copy of the caller's dict
                    std = std_from_rho(rho.detach().double(), saved)[0]
                    state_dict[prefix + name] = rho_from_std(std, self.std_transform).to(rho.dtype)
                    converted = True
            if converted:  # one message for all layers (Python shows a warning once per text and place)
                warnings.warn(
                    f"a state dict saved with std_transform={saved!r} was loaded into Bayesian layers with "
                    f"std_transform={self.std_transform!r}: their rho were converted, so the posterior stds are the saved ones",
                    stacklevel=user_stacklevel(),  # the caller's load, not torch's
                )
        if prefix + "weight" in state_dict and prefix + "weight_mu" not in state_dict:
            # torch lists the missing weight_mu, ... and the unexpected weight (strict=False: nothing, and the layer
            # keeps its initialisation): say what they are (a warning: torch tells this hook strict=True either way)
            warnings.warn(  # one message for all layers (once per text and place): torch's error names the keys
                f"a deterministic layer's weights (nn.Linear, nn.Conv: 'weight' entries) were loaded into "
                f"{type(self).__name__} layers, which keep their own: load them into the plain network, then make it "
                f"Bayesian with bdl.bayesianize (its posterior means start at the weights), or make each layer with "
                f"{type(self).__name__}.from_module(layer)",
                stacklevel=user_stacklevel(),
            )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401
        parameters = self.__dict__.get("_parameters")
        if parameters is not None and name in parameters:  # first, as nn.Module's: every forward reads them
            return parameters[name]
        if name != "weight" and name != "bias":
            return super().__getattr__(name)
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        # code that reads a layer's weight itself (torch's fused Transformer fast path, F.linear(x, m.weight) in
        # torchvision's Swin) failed with Python's bare "object has no attribute 'weight'"
        raise AttributeError(
            f"{type(self).__name__} has no '{name}': its posterior is {name}_mu and {name}_rho, sampled in each forward; "
            f"code that reads a layer's .{name} itself cannot use a Bayesian layer: keep that layer deterministic "
            "(bdl.bayesianize(..., exclude=[...])), or for an nn.TransformerEncoderLayer build it with bdl.bayesianize, "
            "which turns torch's fused fast path off"
        )

    # priors are assigned through these so tensor-valued ones are checked against the parameter shape
    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("weight_prior", "bias_prior"):
            param = self._parameters.get("weight_mu" if name == "weight_prior" else "bias_mu")
            # None means N(0, 1), as the constructor's prior=None (it was kept, and kl_divergence() then raised an
            # AttributeError); only a layer without bias keeps no bias prior
            if value is not None or param is not None:
                value = as_prior(value, name)
                if param is not None:
                    value.check_shape(param.shape)
        super().__setattr__(name, value)

    def reset_parameters(self) -> None:
        """Means as ``torch.nn`` initialises its weights (Kaiming-uniform); stds at ``posterior_std_init``."""
        nn.init.kaiming_uniform_(self.weight_mu, a=math.sqrt(5))
        rho = rho_value(self.posterior_std_init, self.std_transform)  # a float: no tensor on the default device
        with torch.no_grad():
            self.weight_rho.fill_(rho)
        if self.bias_mu is not None:
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(self.weight_mu)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias_mu, -bound, bound)
            with torch.no_grad():
                self.bias_rho.fill_(rho)

    @property
    def weight_std(self) -> Tensor:
        """Posterior standard deviation of the weights."""
        return std_from_rho(self.weight_rho, self.std_transform)[0]

    @property
    def bias_std(self) -> Optional[Tensor]:
        """Posterior standard deviation of the bias (None without bias)."""
        return None if self.bias_rho is None else std_from_rho(self.bias_rho, self.std_transform)[0]

    def _op(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_input(self, input: Tensor) -> None:
        """Reject an input the layer cannot use, naming what it expected (the layer is where inputs enter)."""
        weight = self.weight_mu
        if not isinstance(input, Tensor):
            raise TypeError(f"{type(self).__name__}: input must be a Tensor, got {type(input).__name__}")
        # under autocast, activations are in a lower precision than the float32 weights: that is expected
        if input.dtype != weight.dtype and not (input.is_floating_point() and _autocast_enabled(input.device.type)):
            hint = "" if input.is_floating_point() else f" (convert it with x.to({weight.dtype}))"
            raise TypeError(
                f"{type(self).__name__}: input must be a floating-point tensor of the layer's dtype {weight.dtype}, "
                f"got {input.dtype}{hint}"
            )
        if input.device != weight.device:
            raise ValueError(
                f"{type(self).__name__}: input is on device {input.device} but the layer's parameters are on "
                f"{weight.device}; move the input or the model with .to(device)"
            )

    def _fusable_prior(self, prior: Optional[Prior], mu: Optional[Tensor]) -> Optional[tuple[float, float]]:
        """``(loc, scale)`` where this forward can compute the parameter's KL in its sampling node."""
        if (
            mu is None
            or mu.dtype in (torch.float16, torch.bfloat16)  # its variance and KL are computed in float32 (see _parameter_kl)
            or type(prior) is not GaussianPrior
            or isinstance(prior.loc, Tensor)
            or isinstance(prior.scale, Tensor)
            or self.std_transform != "exp"
        ):
            return None
        return (prior.loc, prior.scale)

    def _prediction_scale(self, name: str, rho: Tensor, variance: bool = False) -> Tensor:
        """The posterior std (or variance) of ``rho``, the layer's ``{name}_rho``, for sampling without
        gradients: kept while ``rho`` is unchanged, so that S forwards compute it once (not inside
        ``torch.compile`` or ``torch.func`` transforms, whose tensors have no storage to key it by)."""
        # inference tensors (a model built or loaded under torch.inference_mode) have no version counter to key by
        if _untraceable(rho) or version_or_none(rho) is None:
            return posterior_variance(rho, self.std_transform) if variance else std_from_rho(rho, self.std_transform)[0]
        key = (rho._version, rho.data_ptr(), rho.dtype, rho.device, self.std_transform, _optimizer_steps[0])
        cached = self._std_cache.get((name, variance))
        # the tensor itself too (weakly): a new tensor at a freed one's address with the same version (0), as
        # torch.func.functional_call's fresh parameters can be, got the freed one's std
        if cached is None or cached[0] != key or cached[1]() is not rho:
            value = posterior_variance(rho, self.std_transform) if variance else std_from_rho(rho, self.std_transform)[0]
            cached = self._std_cache[name, variance] = (key, weakref.ref(rho), value)
        return cached[2]

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> "_BayesLayer":  # noqa: ANN401
        # .to() / .double() / .cpu(): the kept stds, KLs and sample buffers are of the old dtype or device, and
        # held their memory (a model moved off a GPU kept GPU memory until its next forward)
        self._std_cache.clear()
        self._kl_cache.clear()
        return super()._apply(fn, recurse)

    def _drop_value_caches(self) -> None:
        """Forget the kept stds (:func:`bdl.predict` calls this first: an edit through ``.data`` moves no version
        counter), and the sample buffers of threads that have ended (a live thread's are kept)."""
        alive = None
        for key in list(self._std_cache):  # a snapshot, and pop: another thread's predict drops and adds keys too
            if key[0] == "sample":
                alive = {thread.ident for thread in threading.enumerate()} if alive is None else alive
                if key[2] in alive:
                    continue  # (16 worker threads that predicted and ended held 16 weight-sized buffers for good)
            self._std_cache.pop(key, None)

    def _prediction_sample(self, name: str, mu: Optional[Tensor], rho: Optional[Tensor]) -> Optional[Tensor]:
        """A draw of ``{name}`` for a forward without gradients (the values the training path draws)."""
        if mu is None:
            return None
        scale = self._prediction_scale(name, rho)
        if mu.device.type != "cpu" or mu.numel() < _SAMPLE_BUFFER_MIN_NUMEL or not mu.is_contiguous():
            noise = randn_like(mu)
            return torch.addcmul(mu, noise, scale, out=noise)
        # A large CPU sample is written into a buffer the layer keeps, one per thread (forwards on several
        # threads must not share it; on the CPU the op has used the sample when forward returns). A fresh
        # weight-sized tensor per forward takes page faults whenever the allocator has handed the last one
        # back to the system: 10,000-19,000 per 32-sample prediction of a 784-1200-1200-10 MLP at batch 1024
        # (4-11% of its time in alternating runs, experiments/results/benchmark_history.md, session 8).
        key = ("sample", name, threading.get_ident())
        buffer = self._std_cache.get(key)
        if buffer is None or buffer.shape != mu.shape or buffer.dtype != mu.dtype or buffer.is_inference() != torch.is_inference_mode_enabled():
            buffer = self._std_cache[key] = torch.empty_like(mu)
        return torch.addcmul(mu, _normal_(buffer), scale, out=buffer)

    def _prediction_weights(self, name: str) -> Optional[GaussianWeights]:
        """``{name}``'s posterior for a forward without gradients, its variance computed once for S forwards."""
        mu, rho = getattr(self, f"{name}_mu"), getattr(self, f"{name}_rho")
        if mu is None:
            return None
        return GaussianWeights(mu, rho, self.std_transform, variance=self._prediction_scale(name, rho, variance=True))

    def forward(self, input: Tensor) -> Tensor:
        if self.deterministic:
            return self._op(input, self.weight_mu, self.bias_mu)
        if _sample_once_blocks[0] and not torch.compiler.is_compiling():
            draws = _sample_once_draws(self)
            if draws is not None:  # inside bdl.sample_once: the block's one draw, made at the first call
                graph = torch.is_grad_enabled() and any(
                    p is not None and p.requires_grad for p in (self.weight_mu, self.weight_rho, self.bias_mu, self.bias_rho)
                )
                drawn = draws.get(id(self))
                if drawn is None or (graph and not drawn[2]):
                    # the same noise again where a call without gradients drew first (a stop-gradient branch)
                    drawn = draws[id(self)] = self._draw_once(None if drawn is None else drawn[1], graph)
                return self._op(input, *drawn[0])
        name = self._estimator_for(input)
        # (not where torch.jit.trace records the forward: the out= of the prediction path is refused by a replay
        # with gradients)
        if not torch.is_grad_enabled() and not torch.jit.is_tracing():
            if (
                name == "reparam"
                and not torch.compiler.is_compiling()
                and not _in_functorch(self.weight_mu)
                and not forward_ad_active()  # its out= draw has no forward-mode rule
            ):
                # prediction: S forwards share one std per parameter (no exp per draw); same draws as with a graph
                weight = self._prediction_sample("weight", self.weight_mu, self.weight_rho)
                return self._op(input, weight, self._prediction_sample("bias", self.bias_mu, self.bias_rho))
            if name == "local":  # predict's batched path: likewise one variance per parameter
                return local_reparameterized(self._op, input, self._prediction_weights("weight"), self._prediction_weights("bias"))
        elif self._std_cache:
            self._std_cache.clear()  # training: the stds kept for prediction are stale after the next step
        # a training forward also computes the KL, in the same autograd nodes as the weight draws, and
        # keeps it for kl_divergence() (see _GaussianWithKL); not inside compile or torch.func transforms
        fuse = (
            torch.is_grad_enabled()
            and self.weight_mu.requires_grad
            and not torch.compiler.is_compiling()
            and not _in_functorch(self.weight_mu)
            and not forward_ad_active()  # the fused node has no forward-mode rule
            # kept by the parameters' version counters, which one made in inference mode and cast since lacks
            and all(version_or_none(p) is not None for p in (self.weight_mu, self.weight_rho))
        )
        weight = GaussianWeights(
            self.weight_mu, self.weight_rho, self.std_transform, self._fusable_prior(self.weight_prior, self.weight_mu) if fuse else None
        )
        bias = None
        if self.bias_mu is not None:
            bias = GaussianWeights(
                self.bias_mu, self.bias_rho, self.std_transform, self._fusable_prior(self.bias_prior, self.bias_mu) if fuse else None
            )
        estimator = ESTIMATORS[name]
        kwargs = {"per_channel": True} if name == "flipout" and self._flipout_per_channel else {}
        output = estimator(self._op, input, weight, bias, **kwargs)
        if fuse:
            self._kl_cache.clear()
            for name, posterior in (("weight", weight), ("bias", bias)):
                if posterior is not None and posterior.kl is not None:
                    self._kl_cache[name] = _CachedKL(posterior)
        return output

    def _estimator_for(self, input: Tensor) -> str:
        """The estimator this forward of ``input`` uses: the layer's (see :class:`BayesLinear` for its exception)."""
        return self.estimator

    def _draw_once(self, noise: Optional[tuple[Tensor, Optional[Tensor]]], graph: bool) -> tuple:
        """``((weight, bias), noise, graph)``: the draw ``mu + std * noise`` for every call in a :func:`bdl.sample_once`
        block (reparameterised, whatever the estimator: a draw per row or a sign flip per row cannot be shared by
        several calls), from fresh noise or the given; ``graph``: built with gradients to ``mu`` and ``rho``."""
        if noise is None:
            noise = (randn_like(self.weight_mu), None if self.bias_mu is None else randn_like(self.bias_mu))
        elif not torch.is_inference_mode_enabled():  # noise drawn under inference_mode cannot join a graph
            noise = tuple(eps.clone() if eps is not None and eps.is_inference() else eps for eps in noise)
        drawn = []
        for name, eps in zip(("weight", "bias"), noise):
            mu, rho = getattr(self, f"{name}_mu"), getattr(self, f"{name}_rho")
            drawn.append(None if mu is None else mu + std_from_rho(rho, self.std_transform)[0] * eps)
        return tuple(drawn), noise, graph

    def _parameter_kl(self, name: str) -> Tensor:
        mu, rho = getattr(self, f"{name}_mu"), getattr(self, f"{name}_rho")
        prior = getattr(self, f"{name}_prior")
        # not inside torch.compile, which cannot trace the check's data_ptr (an eager forward's KL, left here without
        # a backward, broke a fullgraph compiled step), nor for torch.func's wrapped tensors
        cached = self._kl_cache.get(name)
        if cached is not None and not _untraceable(mu) and cached.valid(mu, rho, self._fusable_prior(prior, mu)):
            return cached.kl if torch.is_grad_enabled() else cached.kl.detach()
        # a KL over more than ~10,000 weights overflows float16 (65,504), and bfloat16's 8 bits lose its large
        # cancelling terms (50% off for posterior stds of 1)
        if mu.dtype in (torch.float16, torch.bfloat16):
            mu, rho = mu.float(), rho.float()
        return prior.posterior_kl(mu, rho, self.std_transform)

    def kl_divergence(self) -> Tensor:
        """``KL(q || p)`` of this layer's weights and bias (closed form for Gaussian priors, else one MC sample).

        After a training forward (gradients enabled) this is the KL computed alongside that forward's
        weight draws, which makes the step's backward one pass per parameter; it is recomputed once
        the parameters change or a backward has gone through it. Draw and KL being one autograd node, a backward
        of the KL alone (its gradient taken apart from the data term's) frees the forward's graph: pass it
        ``retain_graph=True``.
        """
        kl = self._parameter_kl("weight")
        if self.bias_mu is not None:
            kl = kl + self._parameter_kl("bias")
        return kl

    def _bayes_repr(self) -> str:
        return f"estimator={self.estimator!r}, posterior_std_init={self.posterior_std_init:g}, std_transform={self.std_transform!r}"


class BayesLinear(_BayesLayer):
    """Bayesian ``nn.Linear``: ``y = x W^T + b`` with ``W, b`` drawn from a mean-field Gaussian posterior.

    Positional arguments are those of ``nn.Linear``; the Bayesian options are keyword-only.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        prior: a :class:`~bdl.nn.Prior`, a float ``s`` meaning ``N(0, s^2)``, or None for ``N(0, 1)``.
        posterior_std_init: initial posterior standard deviation of every weight, > 0.
        estimator: ``"reparam"`` (one weight sample per forward), ``"local"`` (local reparameterisation:
            pre-activations sampled per example) or ``"flipout"`` (a sign flip per example). Inputs with more
            than two dimensions (``[B, T, in]``, a sequence's tokens, or ``[T, B, in]``) are sampled with
            ``"reparam"`` whatever the estimator: the positions of an example must share one weight sample,
            which a draw per pre-activation or per row would not give (each position would see its own weights).
            The layer cannot see positions flattened into rows (``x.reshape(-1, in)``): there ``"local"`` and
            ``"flipout"`` give every token its own weights, so keep the positions in their own dimension.
        std_transform: ``"exp"`` (``std = exp(rho)``, default, cheaper) or ``"softplus"``.

    Forwards without gradients (prediction) keep what S draws share: the posterior std (or variance) while
    ``rho`` is unchanged and, on the CPU, a buffer per thread for weight samples of 2^15 elements or more;
    a training forward drops them, :func:`bdl.predict` forgets the stds at the start of every call, and copies
    and pickles of the layer start without them. Between your own forwards "unchanged" is judged by the
    parameter's version counter, as autograd judges it, and by the process's count of optimizer steps (torch's
    fused optimizers write parameters without moving their counters): an in-place edit through ``.data``
    (``layer.weight_rho.data.fill_(...)``) is not seen there, nor one through another tensor sharing the
    parameter's memory (a flat buffer that ``torch.nn.utils.vector_to_parameters`` made the parameters views of,
    edited and written back), so edit under ``torch.no_grad()`` instead (``layer.weight_rho.fill_(...)``, or
    ``vector_to_parameters`` of a new tensor); the same holds for the KL a training forward keeps.

    Example:
        >>> layer = BayesLinear(4, 2, estimator="local")
        >>> x = torch.randn(8, 4)
        >>> bool((layer(x) != layer(x)).any())  # a fresh draw every call
        True
        >>> layer.kl_divergence() > 0
        tensor(True)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
        *,
        prior: Prior | float | None = None,
        posterior_std_init: float = 1e-3,
        estimator: str = "reparam",
        std_transform: str = "exp",
    ) -> None:
        super().__init__()
        self.in_features = _check_size("in_features", in_features, "BayesLinear")
        self.out_features = _check_size("out_features", out_features, "BayesLinear")
        self._init_bayes(
            (out_features, in_features),
            bias,
            {"device": device, "dtype": dtype},
            prior,
            posterior_std_init,
            estimator,
            std_transform,
        )

    def _op(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        return F.linear(x, weight, bias)

    def _check_input(self, input: Tensor) -> None:
        super()._check_input(input)
        if input.shape[-1:] != (self.in_features,):
            raise ValueError(
                f"BayesLinear: input must have {self.in_features} features in its last dimension, "
                f"got shape {tuple(input.shape)}"
            )

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        return super().forward(input)

    def _estimator_for(self, input: Tensor) -> str:
        # inputs with positions ([B, T, in]: a sequence's tokens) in any layout: one weight sample must serve all
        # the positions of an example, which local reparameterisation (a draw per output element) and per-row
        # sign flips (positions would be rows) cannot give; one sample per call can, whatever the batch dimension
        return "reparam" if input.dim() > 2 else self.estimator

    @classmethod
    def from_module(cls, module: nn.Linear, **bayes_options: Any) -> "BayesLinear":
        """A ``BayesLinear`` with the shape of ``module`` and posterior means set to its weights."""
        layer = cls(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            device=module.weight.device,
            dtype=module.weight.dtype,
            **bayes_options,
        )
        _copy_means(layer, module)
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias_mu is not None}, {self._bayes_repr()}"


class _BayesConvNd(_BayesLayer):
    _flipout_per_channel = True
    _torch_cls: type[nn.modules.conv._ConvNd]
    _conv: Any

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
        *,
        prior: Prior | float | None = None,
        posterior_std_init: float = 1e-3,
        estimator: str = "reparam",
        std_transform: str = "exp",
    ) -> None:
        super().__init__()
        name = type(self).__name__
        in_channels = _check_size("in_channels", in_channels, name, minimum=1)
        out_channels = _check_size("out_channels", out_channels, name, minimum=1)
        # a weightless twin on the meta device validates the other arguments exactly as torch.nn does
        reference = self._torch_cls(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device="meta"
        )
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
            setattr(self, name, getattr(reference, name))
        self._reversed_padding_repeated_twice = reference._reversed_padding_repeated_twice
        self._init_bayes(
            tuple(reference.weight.shape),
            bias,
            {"device": device, "dtype": dtype},
            prior,
            posterior_std_init,
            estimator,
            std_transform,
        )

    def _op(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return self._conv(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        return self._conv(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _check_input(self, input: Tensor) -> None:
        super()._check_input(input)
        spatial = len(self.kernel_size)
        if input.dim() not in (spatial + 1, spatial + 2) or input.shape[-spatial - 1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__}: input must be (N, {self.in_channels}, *{spatial} spatial dims) or unbatched "
                f"({self.in_channels}, *{spatial} spatial dims), got shape {tuple(input.shape)}"
            )

    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        spatial = len(self.kernel_size)
        if input.dim() == spatial + 1:  # unbatched, as torch.nn accepts
            return super().forward(input.unsqueeze(0)).squeeze(0)
        return super().forward(input)

    @classmethod
    def from_module(cls, module: nn.modules.conv._ConvNd, **bayes_options: Any) -> "_BayesConvNd":
        """A Bayesian convolution with the configuration of ``module`` and posterior means set to its weights."""
        layer = cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
            module.bias is not None,
            module.padding_mode,
            device=module.weight.device,
            dtype=module.weight.dtype,
            **bayes_options,
        )
        _copy_means(layer, module)
        return layer

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0,) * len(self.kernel_size):
            s += f", padding={self.padding}"
        if self.dilation != (1,) * len(self.kernel_size):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias_mu is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return f"{s}, {self._bayes_repr()}"


_CONV_DOC = """Bayesian ``nn.{torch_name}``: a convolution whose kernel and bias are drawn from a mean-field Gaussian posterior.

    Positional arguments are those of ``nn.{torch_name}`` (``in_channels, out_channels, kernel_size, stride,
    padding, dilation, groups, bias, padding_mode, device, dtype``); the Bayesian options
    (``prior``, ``posterior_std_init``, ``estimator``, ``std_transform``) are keyword-only, as in
    :class:`BayesLinear`. With ``estimator="local"`` output positions get independent noise (the
    marginal of every output element is exact); ``"flipout"`` uses one sign per example and channel.

    Example:
        >>> conv = {name}(2, 4, {kernel}, padding=1, estimator="flipout")
        >>> conv(torch.randn({shape})).shape
        torch.Size([{out_shape}])
"""


class BayesConv1d(_BayesConvNd):
    __doc__ = _CONV_DOC.format(name="BayesConv1d", torch_name="Conv1d", kernel=3, shape="5, 2, 16", out_shape="5, 4, 16")
    _torch_cls = nn.Conv1d
    _conv = staticmethod(F.conv1d)


class BayesConv2d(_BayesConvNd):
    __doc__ = _CONV_DOC.format(name="BayesConv2d", torch_name="Conv2d", kernel=3, shape="5, 2, 8, 8", out_shape="5, 4, 8, 8")
    _torch_cls = nn.Conv2d
    _conv = staticmethod(F.conv2d)


class BayesConv3d(_BayesConvNd):
    __doc__ = _CONV_DOC.format(name="BayesConv3d", torch_name="Conv3d", kernel=3, shape="5, 2, 4, 4, 4", out_shape="5, 4, 4, 4, 4")
    _torch_cls = nn.Conv3d
    _conv = staticmethod(F.conv3d)


def _copy_means(layer: _BayesLayer, module: nn.Module) -> None:
    weight = module.weight
    for memory_format in (torch.channels_last, torch.channels_last_3d):
        rank = 4 if memory_format is torch.channels_last else 5
        if weight.dim() == rank and not weight.is_contiguous() and weight.is_contiguous(memory_format=memory_format):
            # the original's layout, so that the converted convolution runs the same kernel (bit-identical under
            # bdl.deterministic) and trains as fast
            for name in ("weight_mu", "weight_rho"):
                getattr(layer, name).data = getattr(layer, name).data.contiguous(memory_format=memory_format)
    with torch.no_grad():
        layer.weight_mu.copy_(weight)
        if module.bias is not None:
            layer.bias_mu.copy_(module.bias)
