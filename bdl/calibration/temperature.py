"""Temperature scaling (Guo et al. 2017): one scalar ``T > 0`` that divides the logits, fitted on held-out data.

``softmax(f(x) / T)`` keeps the predicted class (so accuracy is unchanged) and makes the probabilities
softer (``T > 1``, the usual fix for an overconfident network) or sharper (``T < 1``). ``T`` minimises
the negative log-likelihood of validation labels; it is optimised as ``log T`` with L-BFGS, so it stays
positive without constraints.

For a Bayesian model with Monte Carlo samples, pass the per-sample logits [S, N, C]: every sample is
divided by the same ``T`` and the NLL is that of the averaged probabilities ``1/S sum_s softmax(f_s / T)``,
which is what :func:`bdl.predict` computes for the wrapped model. Log-probabilities work as well as logits
(``log softmax(f)`` differs from ``f`` by a per-example constant, which ``softmax(. / T)`` ignores).
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .._tensors import version_or_none
from .._warn import user_stacklevel
from ..metrics.functional._checks import as_class_labels, as_tensor, check_float, check_labels, look_like_probabilities
from ..nn.functional import _two_class

__all__ = ["TemperatureScaledModel", "TemperatureScaler", "fit_temperature"]


def _check_logits(logits, target) -> tuple[Tensor, Tensor]:  # noqa: ANN001
    logits = check_float(logits, "logits")
    if logits.dim() not in (2, 3) or 0 in logits.shape:
        raise ValueError(
            f"`logits` must have shape [N, C] or [S, N, C] with S, N, C >= 1 (C = 1: binary log-odds), got shape {tuple(logits.shape)}"
        )
    if logits.shape[-1] == 1 and logits.numel() > 1 and bool(logits.amin() >= 0) and bool(logits.amax() <= 1):
        # every log-odds in [0, 1] is a model that never leans to class 0 nor beyond p = 0.73: a weak model, or
        # sigmoid outputs passed by mistake (fitted as log-odds they gave T = 0.76 and a worse test NLL)
        warnings.warn(
            "`logits` of a binary model (C = 1) are all in [0, 1]: if they are sigmoid probabilities, pass the "
            "log-odds (torch.logit(p, eps=1e-6)); log-odds of a weak model can lie there too",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
    logits = _two_class(logits)  # (-l/2, l/2) / T: the scaled log-odds, as bdl.predict reads them
    # labels as evaluate takes them: a binary model's 0./1. floats, [N, 1]
    target = check_labels(as_class_labels(as_tensor(target, "target")), logits.shape[-1], logits.shape[-2])
    if look_like_probabilities(logits):  # they fit a meaningless temperature (softmax of values in [0, 1])
        raise ValueError(
            "`logits` look like probabilities (non-negative, every row summing to 1): pass the network's logits, "
            "or log-probabilities (probs.clamp_min(torch.finfo(probs.dtype).tiny).log(): a probability of exactly 0 "
            "has log -inf)"
        )
    return logits, target.to(logits.device)


_CHUNK_ELEMENTS = 1 << 22  # logits per piece of the NLL (32 MiB in float64; its autograd graph holds a few times that)


def _scaled_nll(log_temperature: Tensor, logits: Tensor, target: Tensor) -> Tensor:
    """NLL of ``1/S sum_s softmax(logits_s / T)`` with ``T = exp(log_temperature)``; logits are [S, N, C]."""
    log_probs = torch.log_softmax(logits / log_temperature.exp(), dim=-1)
    mean_log_probs = torch.logsumexp(log_probs, dim=0) - math.log(logits.shape[0])
    return torch.nn.functional.nll_loss(mean_log_probs, target)


def fit_temperature(logits: Tensor, target: Tensor, *, max_iter: int = 100) -> Tensor:
    """The temperature that minimises the validation NLL of ``softmax(logits / T)`` (Guo et al. 2017).

    ``T* = argmin_T -1/N sum_n log [1/S sum_s softmax(f_s(x_n) / T)]_{y_n}``, found with L-BFGS (strong Wolfe
    line search) on ``log T`` from ``T = 1``, in float64, over pieces of rows (each evaluation holds one piece
    in float64 and its gradient, not a float64 copy of all the logits: 60,000 x 1,000 logits took +3.1 GB and
    56 s in one piece, +0.8 GB and 17 s in pieces, on one CPU thread).

    Args:
        logits: validation logits, shape [N, C], or per-sample logits [S, N, C] of a Bayesian model (C = 1:
            a binary classifier's log-odds of class 1, labels 0 and 1).
        target: integer labels, shape [N].
        max_iter: the most L-BFGS iterations.

    Returns:
        A positive scalar tensor ``T`` (dtype of ``logits``; float32 for half-precision ones).

    Example:
        >>> true_logits = torch.randn(2000, 5)
        >>> target = torch.distributions.Categorical(logits=true_logits).sample()
        >>> temperature = fit_temperature(3 * true_logits, target)  # an overconfident model
        >>> bool(abs(temperature - 3) < 0.3)
        True
    """
    logits, target = _check_logits(logits, target)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"`max_iter` must be a positive integer, got {max_iter!r}")
    with torch.inference_mode(False):  # fitted in a torch.inference_mode block too, as under torch.no_grad
        return _fit_temperature(logits, target, max_iter)


def _fit_temperature(logits: Tensor, target: Tensor, max_iter: int) -> Tensor:
    # inference tensors (made under torch.inference_mode: bdl.predict's targets there) cannot be saved for backward
    logits, target = (t.clone() if t.is_inference() else t for t in (logits, target))
    samples = logits.detach()
    if samples.dim() == 2:
        samples = samples.unsqueeze(0)
    num_samples, num_rows, num_classes = samples.shape
    rows = max(1, _CHUNK_ELEMENTS // (num_samples * num_classes))
    log_temperature = torch.zeros((), dtype=torch.float64, device=logits.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_temperature], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        # the mean NLL in pieces of rows, each in float64 and backpropagated at once: memory stays at a piece's
        # (a float64 copy of all the logits and its autograd graph took 5x their size: 4 GB for 200,000 x 1,000)
        optimizer.zero_grad()
        total = torch.zeros((), dtype=torch.float64, device=logits.device)
        for start in range(0, num_rows, rows):
            piece = samples[:, start : start + rows].double()
            loss = _scaled_nll(log_temperature, piece, target[start : start + rows]) * (piece.shape[1] / num_rows)
            loss.backward()
            total += loss.detach()
        return total

    with torch.enable_grad():
        optimizer.step(closure)
    temperature = log_temperature.detach().exp()
    if bool((samples.argmax(-1) == target).all()):
        # each label's probability grows as T falls: the NLL tends to 0 as T -> 0 and has no minimum, and T is
        # where L-BFGS stopped (with large margins already inside the usual range, e.g. 0.03)
        warnings.warn(
            f"every validation example is classified right (by every Monte Carlo sample), so the NLL falls towards 0 "
            f"as T -> 0 and has no minimum: the fitted temperature {float(temperature):.3g} is only where the "
            "optimiser stopped; fit it on a larger or harder validation set",
            stacklevel=user_stacklevel(),
        )
    elif not _TYPICAL_TEMPERATURES[0] <= float(temperature) <= _TYPICAL_TEMPERATURES[1]:
        # the NLL's minimum is that far out when the validation set is (nearly) separable, T -> 0, or every
        # prediction on it is wrong, T -> inf: a temperature fitted to those few examples, not to the model
        warnings.warn(
            f"fitted temperature {float(temperature):.3g} is far outside the usual range: the validation set may be "
            "too small or too easy (nearly every example right, or right in some Monte Carlo sample: T -> 0) or "
            "every prediction wrong (T -> inf); check it on held-out data before use",
            stacklevel=user_stacklevel(),
        )
    # float32 for half-precision logits: float16 rounded a fitted 8e5 to inf (then log T inf), bfloat16 to 8 bits
    return temperature.to(torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype)


_TYPICAL_TEMPERATURES = (1e-2, 1e2)


class TemperatureScaler(nn.Module):
    """Post-hoc temperature scaling: ``forward(logits) = logits / T``, with ``T`` fitted by :meth:`fit`.

    The temperature is stored as the parameter ``log_temperature`` (so it is saved in ``state_dict``).

    Args:
        temperature: initial temperature (> 0); :meth:`fit` starts from 1 regardless.

    Example:
        >>> true_logits = torch.randn(2000, 5)
        >>> target = torch.distributions.Categorical(logits=true_logits).sample()
        >>> scaler = TemperatureScaler().fit(3 * true_logits, target)
        >>> bool(abs(scaler.temperature - 3) < 0.3)
        True
        >>> calibrated_logits = scaler(3 * true_logits)  # close to true_logits
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if isinstance(temperature, Tensor) and temperature.numel() == 1 and temperature.is_floating_point():
            temperature = temperature.item()  # another scaler's ``temperature``, as VarianceScaler takes its scale
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
            raise TypeError(f"`temperature` must be a number (or a one-element float tensor), got {type(temperature).__name__}")
        if not 0 < temperature < math.inf:
            raise ValueError(f"`temperature` must be a positive finite number, got {temperature!r}")
        log_temperature = torch.tensor(math.log(temperature))
        if not 0 < float(log_temperature.exp()) < math.inf:  # 1e39 is inf in float32
            raise ValueError(f"`temperature` must be a positive finite number in float32, got {temperature!r}")
        self.log_temperature = nn.Parameter(log_temperature, requires_grad=False)

    @property
    def temperature(self) -> Tensor:
        """The temperature ``T = exp(log_temperature)``, a scalar tensor."""
        return self.log_temperature.exp()

    def fit(self, logits: Tensor, target: Tensor, *, max_iter: int = 100) -> "TemperatureScaler":
        """Fit ``T`` on validation ``logits`` [N, C] (or [S, N, C]) and labels ``target`` [N]; returns ``self``.

        See :func:`fit_temperature`.
        """
        temperature = fit_temperature(logits, target, max_iter=max_iter)
        if not torch.is_inference_mode_enabled() and version_or_none(self.log_temperature) is None:
            # made in a torch.inference_mode block (and perhaps cast since, which leaves it without a version counter
            # still): written in place only in such a block, so replaced (as a fresh fit would)
            value = temperature.log().to(self.log_temperature.device, self.log_temperature.dtype)
            self.log_temperature = nn.Parameter(value, requires_grad=False)
            return self
        with torch.no_grad():
            self.log_temperature.copy_(temperature.log())
        return self

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
        # checked as the constructor checks a temperature: a NaN one gave NaN logits, an infinite one 0 or inf
        incoming = state_dict.get(prefix + "log_temperature")
        if isinstance(incoming, Tensor) and incoming.numel() == 1 and incoming.device.type != "meta":
            # in the parameter's dtype: exp(100) is inf in float32 (uniform probabilities), exp(-104) is 0 (NaN)
            temperature = float(incoming.to(self.log_temperature.dtype).exp())
            if not 0 < temperature < math.inf:
                raise ValueError(
                    f"state dict entry {prefix}log_temperature must give a positive finite temperature in "
                    f"{self.log_temperature.dtype}, got log-temperature {incoming.item()} (temperature {temperature})"
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, logits: Tensor) -> Tensor:
        """``logits / T``, any shape with classes last."""
        if not isinstance(logits, Tensor):  # e.g. a wrapped GaussianHead model's (mean, variance)
            raise TypeError(f"temperature scaling divides classification logits, a tensor; got {type(logits).__name__}")
        if not logits.is_floating_point():  # integer logits divided by T cast to their dtype: T 1.5 read as 1, 0.5 as 0
            logits = logits.to(torch.get_default_dtype())
        return logits / self.temperature.to(logits.dtype)

    def wrap(self, model: nn.Module) -> "TemperatureScaledModel":
        """A module whose forward is ``model(...) / T``: use it in place of ``model`` (e.g. in :func:`bdl.predict`).

        Example:
            >>> model = nn.Linear(3, 2)
            >>> scaled = TemperatureScaler(2.0).wrap(model)
            >>> x = torch.randn(4, 3)
            >>> torch.allclose(scaled(x), model(x) / 2)
            True
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        return TemperatureScaledModel(model, self)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature.item():.4g}"


class TemperatureScaledModel(nn.Module):
    """``model`` followed by a :class:`TemperatureScaler`: ``forward(*args) = model(*args) / T``.

    Bayesian layers inside ``model`` keep drawing fresh weights on every call, so Monte Carlo prediction
    works unchanged. Built by :meth:`TemperatureScaler.wrap`.

    Args:
        model: the network giving logits.
        scaler: the fitted :class:`TemperatureScaler`.

    Example:
        >>> model = nn.Sequential(BayesLinear(3, 2))
        >>> scaled = TemperatureScaledModel(model, TemperatureScaler(1.5))
        >>> bdl.predict(scaled, torch.randn(5, 3), num_samples=4).probs.shape
        torch.Size([5, 2])
    """

    def __init__(self, model: nn.Module, scaler: TemperatureScaler) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(scaler, TemperatureScaler):  # a float failed at the first forward: "'float' object is not callable"
            hint = f" (wrap it: TemperatureScaler({scaler!r}))" if isinstance(scaler, numbers.Real) else ""
            raise TypeError(f"scaler must be a bdl.TemperatureScaler, got {type(scaler).__name__}{hint}")
        self.model = model
        self.scaler = scaler

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.scaler(self.model(*args, **kwargs))

    # A model that draws its own samples (a DeepEnsemble: one per member) keeps doing so, scaled: without these
    # bdl.predict would take the wrapper for one network whose output is the members' stacked logits
    @property
    def sample_outputs(self) -> Callable[[Tensor, int], Tensor]:
        """The wrapped model's ``sample_outputs(x, num_samples)``, each sample's logits divided by ``T``."""
        inner = getattr(self.model, "sample_outputs", None)
        if not callable(inner):
            raise AttributeError(f"{type(self.model).__name__} draws no samples of its own (no sample_outputs)")
        return lambda x, num_samples: self.scaler(inner(x, num_samples))

    @property
    def num_members(self) -> int:
        """The wrapped ensemble's number of members."""
        members = getattr(self.model, "num_members", None)
        if members is None:
            raise AttributeError(f"{type(self.model).__name__} has no members")
        return members
