"""The evidence lower bound, scaled for minibatches."""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from .._messages import first_few
from .._tensors import in_trace
from .._warn import user_stacklevel
from ..metrics.functional._checks import as_class_labels, probabilities_verdict, probability_sum_tolerance
from .functional import _two_class
from .layers import BayesianModule


class ELBO(NamedTuple):
    """Negative ELBO per training example, and its two parts (for logging them separately).

    It stands in for the loss tensor where a training loop uses a criterion's output: ``elbo.backward()``,
    ``elbo.item()``, ``float(elbo)`` and arithmetic (``elbo / accumulation_steps``, ``elbo + penalty``,
    ``sum(elbos)``) act on ``elbo.loss`` and give tensors; as a tuple's, ``+`` and ``*`` concatenated and
    repeated it.

    Example:
        >>> out = bdl.elbo_loss(torch.tensor(0.5), torch.tensor(20.0), num_data=100)
        >>> out.loss, out.nll, out.kl  # loss = nll + kl / num_data
        (tensor(0.7000), tensor(0.5000), tensor(20.))
        >>> out / 2, round(out.item(), 4)
        (tensor(0.3500), 0.7)
    """

    loss: Tensor
    nll: Tensor
    kl: Tensor

    __array_ufunc__ = None  # numpy's scalars read it as a sequence of three (np.float64(0.5) * elbo scaled each part)

    def backward(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
        """``self.loss.backward(...)``: ``criterion(output, target).backward()`` works as with a torch criterion (an
        AttributeError of the tuple before)."""
        self.loss.backward(*args, **kwargs)

    def item(self) -> float:
        """``self.loss.item()``."""
        return self.loss.item()

    def __float__(self) -> float:
        return float(self.loss)

    def __format__(self, spec: str) -> str:
        """``f"{elbo:.4f}"`` formats the loss, as a 0-d tensor's; ``f"{elbo}"`` the tuple."""
        return format(self.loss, spec) if spec else str(self)

    def __add__(self, other: Any) -> Tensor:  # noqa: ANN401
        return _on_loss(self, other, lambda a, b: a + b)

    def __radd__(self, other: Any) -> Tensor:  # noqa: ANN401 - sum(elbos) starts at 0
        return _on_loss(self, other, lambda a, b: b + a)

    def __sub__(self, other: Any) -> Tensor:  # noqa: ANN401
        return _on_loss(self, other, lambda a, b: a - b)

    def __rsub__(self, other: Any) -> Tensor:  # noqa: ANN401
        return _on_loss(self, other, lambda a, b: b - a)

    def __mul__(self, other: Any) -> Tensor:  # noqa: ANN401
        return _on_loss(self, other, lambda a, b: a * b)

    def __rmul__(self, other: Any) -> Tensor:  # noqa: ANN401
        return _on_loss(self, other, lambda a, b: b * a)

    def __truediv__(self, other: Any) -> Tensor:  # noqa: ANN401
        return _on_loss(self, other, lambda a, b: a / b)

    def __neg__(self) -> Tensor:
        return -self.loss


def _on_loss(elbo: ELBO, other: Any, operation: Callable[[Tensor, Any], Tensor]) -> Any:  # noqa: ANN401
    """``operation(elbo.loss, other's loss or other)``; NotImplemented beside a plain tuple or list, which then
    concatenates with it as before (``(1,) + elbo``) or says the types do not go together."""
    if isinstance(other, (tuple, list)) and not isinstance(other, ELBO):
        return NotImplemented
    return operation(elbo.loss, other.loss if isinstance(other, ELBO) else other)


def elbo_loss(nll: Tensor, kl: Tensor, num_data: int, kl_weight: float = 1.0) -> ELBO:
    """Minibatch estimate of the negative ELBO divided by the training-set size.

    The ELBO over a training set of ``N = num_data`` examples is
    ``sum_i E_q[log p(y_i | x_i, w)] - KL(q(w) || p(w))``. Dividing by ``N`` and estimating the sum
    with a minibatch ``B`` gives the loss minimised here:

    ``loss = mean_{i in B} NLL_i + kl_weight * KL / N``

    so the KL is counted once per epoch whatever the batch size, and the loss is on the scale of an
    ordinary per-example cross-entropy (learning rates carry over from deterministic training).
    ``kl_weight`` < 1 gives KL annealing / a tempered posterior; ``N`` must be the size of the whole
    training set (over all processes in multi-process training), not of the batch or shard.

    Args:
        nll: per-example negative log-likelihoods ``[B]`` (averaged here) or their batch mean (scalar).
        kl: ``KL(q || p)`` of the whole model, a scalar, e.g. :func:`bdl.kl_divergence`.
        num_data: number of examples in the training set, > 0.
        kl_weight: weight of the KL term, >= 0.

    Returns:
        ``ELBO(loss, nll, kl)``: the loss to minimise, the mean NLL and the unscaled KL.

    Example:
        >>> model = nn.Sequential(BayesLinear(4, 3))
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> nll = nn.functional.cross_entropy(model(x), y)
        >>> out = bdl.elbo_loss(nll, bdl.kl_divergence(model), num_data=1000)
        >>> out.loss.backward()
    """
    if isinstance(num_data, bool) or not isinstance(num_data, numbers.Integral) or num_data <= 0:
        raise ValueError(f"num_data must be a positive int (the training-set size), got {num_data!r}")
    if isinstance(kl_weight, Tensor):
        valid = kl_weight.dim() == 0 and bool(torch.isfinite(kl_weight)) and bool(kl_weight >= 0)
    else:
        valid = isinstance(kl_weight, numbers.Real) and not isinstance(kl_weight, bool) and math.isfinite(kl_weight) and kl_weight >= 0
    if not valid:  # NaN passed the "< 0" test and turned every loss into NaN
        raise ValueError(f"kl_weight must be a finite number >= 0, got {kl_weight!r}")
    for name, value in (("nll", nll), ("kl", kl)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a tensor (the {'data term' if name == 'nll' else 'model'}'s, with its graph), got {type(value).__name__}")
    if nll.dim() > 1 or nll.numel() == 0:  # an empty batch's mean NLL is NaN
        raise ValueError(f"nll must be a scalar or per-example vector [B] with B >= 1, got shape {tuple(nll.shape)}")
    if kl.dim() != 0:
        raise ValueError(f"kl must be a scalar tensor, got shape {tuple(kl.shape)}")
    nll = nll.mean()
    return ELBO(nll + kl_weight * kl / int(num_data), nll, kl)


def non_finite_parameters(module: nn.Module, names: Optional[set[str]] = None) -> list[str]:
    """``"name (count of numel)"`` for each floating-point parameter of ``module`` (of ``names``, if given) holding a
    NaN or, if it is trained, an infinity: a frozen infinity is a bound or a mask (a frozen NaN is never one), and a
    lazy layer never built holds no values."""
    found = []
    for name, value in module.named_parameters():
        if (names is not None and name not in names) or isinstance(value, nn.parameter.UninitializedParameter) or not value.is_floating_point():
            continue
        bad = ~torch.isfinite(value) if value.requires_grad else torch.isnan(value)
        if bool(bad.any()):
            found.append(f"{name} ({int(bad.sum())} of {value.numel()})")
    return found


def check_trained_parameters(module: nn.Module) -> None:
    """A ``FloatingPointError`` where a fit ended with non-finite parameters: its last step's loss was finite but its
    gradient was not (an earlier step's would have stopped the next step's loss), and the fit ended silently."""
    params = non_finite_parameters(module, {name for name, p in module.named_parameters() if p.requires_grad})  # the trained ones
    if params:
        raise FloatingPointError(
            f"training ended with non-finite parameters: {first_few(params)}; the last step's loss was finite but its "
            "gradient was not (an overflow in the backward): lower the learning rate, or check the prior and posterior "
            "scales (a predicted variance or posterior std that can reach 0)"
        )


def non_finite_posteriors(module: nn.Module) -> list[str]:
    """``"name (type)"`` for each Bayesian layer of ``module`` whose KL is not finite (a posterior std that
    overflowed); a layer without a KL (prediction only) is left out."""
    layers = []
    with torch.no_grad():
        for name, layer in module.named_modules():
            if isinstance(layer, BayesianModule):
                try:
                    finite = bool(torch.isfinite(layer.kl_divergence()).all())
                except NotImplementedError:
                    continue
                if not finite:
                    layers.append(f"{name} ({type(layer).__name__})")
    return layers


def non_finite_where(module: nn.Module, *, kl_too: bool, collapsed: Sequence[str] = ()) -> str:
    """Where a non-finite loss came from, for its error: the parameters that are not finite (a step before
    diverged), else the scales ``collapsed`` to 0 (a Pyro guide's, see :func:`bdl.infer.guides.collapsed_scales`),
    else the Bayesian layers whose KL is not finite (a posterior std that overflowed), else the inputs."""
    params = non_finite_parameters(module)
    if params:
        return f"non-finite parameters: {first_few(params)} (an earlier step diverged)"
    if collapsed:
        return (
            f"every parameter is finite, but the guide's scale is 0 in {first_few(collapsed)} (an unconstrained "
            "scale that underflowed: its log-density is infinite)"
        )
    if kl_too:
        layers = non_finite_posteriors(module)
        if layers:
            return f"every parameter is finite, but the KL of {first_few(layers)} is not"
    return "every parameter is finite (a NaN/inf in this batch's inputs or targets, or an overflow in the forward)"


_REGRESSION_HINT = "for regression pass criterion=bdl.GaussianNLLLoss() with a bdl.GaussianHead (or e.g. nn.MSELoss())"


def _check_logits_and_labels(output: object, target: Tensor) -> None:
    """What the default criterion (cross-entropy on logits) takes: logits, and class labels or rows of class
    probabilities (soft labels) of the logits' shape; a regression's outputs and targets got a loss (float targets
    read as soft labels, negative ones too) or torch's error of shapes."""
    if not isinstance(output, Tensor):
        raise TypeError(
            f"ELBOLoss's default criterion is the cross-entropy of logits, got a {type(output).__name__} output: "
            f"{_REGRESSION_HINT}"
        )
    if isinstance(target, Tensor) and output.dim() == 3 and target.dim() == 1 and output.shape[1] == target.shape[0]:
        # torch's "Expected input batch_size (5) to match target batch_size (32)" (labels [B] never fit [B, C, T] logits)
        raise ValueError(
            f"ELBOLoss takes one network's logits [B, C], got {tuple(output.shape)} for {target.shape[0]} labels: for "
            "stacked outputs [M, B, C] such as a DeepEnsemble's, sum the members' losses (the sum of their ELBOs) with "
            "criterion=lambda outputs, target: ensemble.member_losses(outputs, target, loss_of_one_member).sum(), e.g. "
            "torch.nn.functional.cross_entropy for C >= 2 classes and labels [B]"
        )
    if not isinstance(target, Tensor) or not target.is_floating_point() or not target.numel():
        return
    if output.dim() == 2 and output.shape[1] > 1 and target.shape in ((output.shape[0],), (output.shape[0], 1)):
        if not bool((target == target.round()).all()):  # torch's "expected target dtype to be Long or Byte, but got Float"
            raise ValueError(
                f"ELBOLoss's default criterion takes class labels [B] (or class probabilities [B, C]) for logits {tuple(output.shape)}, "
                f"got float targets of shape {tuple(target.shape)} such as {target[target != target.round()][0].item():.4g}: "
                f"{_REGRESSION_HINT}"
            )
    elif output.dim() == 2 and output.shape[1] == 1:  # a binary classifier's log-odds: labels 0/1, as floats too
        if bool(((target != 0) & (target != 1)).any()):
            raise ValueError(
                "ELBOLoss's default criterion reads one logit per input as a binary classifier's log-odds, whose "
                f"targets are labels 0 or 1, got float targets such as {target[(target != 0) & (target != 1)][0].item():.4g}: "
                f"{_REGRESSION_HINT}; for soft labels of a binary classifier pass criterion=nn.BCEWithLogitsLoss()"
            )
    elif target.shape == output.shape:  # class probabilities along dim 1 ([C] alone: an unbatched row), summed in float32
        sums = target.sum(1 if output.dim() > 1 else 0, dtype=torch.float32)
        if not bool((target >= 0).all()) or bool(((sums - 1).abs() > probability_sum_tolerance(target.dtype)).any()):
            raise ValueError(
                "ELBOLoss's default criterion reads float targets of the logits' shape as class probabilities (soft "
                f"labels), got ones that are not (negative, or not summing to 1 over the classes): {_REGRESSION_HINT}"
            )


class ELBOLoss(nn.Module):
    """Module form of :func:`elbo_loss` that also computes the data term and the model's KL.

    Args:
        model: the Bayesian model whose KL enters the loss.
        num_data: training-set size.
        criterion: per-example data term ``criterion(output, target)`` returning a mean NLL; default
            ``nn.CrossEntropyLoss()`` (classification with logits; logits ``[B, 1]`` are a binary classifier's
            log-odds of class 1, with labels 0/1 as ``BCEWithLogitsLoss`` takes them, as :func:`bdl.predict` reads
            them). Use :class:`bdl.GaussianNLLLoss` (with a :class:`bdl.GaussianHead`) for regression.
        kl_weight: weight of the KL term.
        check_finite: raise a ``FloatingPointError`` naming the term (NLL, KL) and the non-finite parameters
            or layers when the loss is not finite, instead of returning NaN (one host sync per call on a GPU;
            skipped under ``torch.compile`` and ``torch.func.vmap``, which cannot branch on a value).

    Example:
        >>> model = nn.Sequential(BayesLinear(4, 3))
        >>> criterion = bdl.ELBOLoss(model, num_data=1000)
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> loss, nll, kl = criterion(model(x), y)
    """

    def __init__(
        self,
        model: nn.Module,
        num_data: int,
        criterion: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
        kl_weight: float = 1.0,
        *,
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        self.check_finite = bool(check_finite)
        elbo_loss(torch.zeros(()), torch.zeros(()), num_data, kl_weight)  # validates the arguments
        self.model = [model]  # a list, so the model is not registered as a submodule of the loss
        self.num_data = num_data
        if criterion is not None and not callable(criterion):  # a name such as "ce" failed at the first call
            raise TypeError(f"criterion must be a callable criterion(output, target), e.g. nn.CrossEntropyLoss(), got {criterion!r}")
        if getattr(criterion, "reduction", None) == "sum":  # the KL, per example, was then B times too weak
            raise ValueError(
                f"criterion {type(criterion).__name__}(reduction='sum') sums over the batch; the ELBO here is per example "
                "(NLL + KL / num_data): use reduction='mean' (or 'none', averaged)"
            )
        self.criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        self._one_logit_binary = criterion is None
        self._checked_layers = False
        self.kl_weight = kl_weight

    def forward(self, output: Tensor, target: Tensor) -> ELBO:
        from .convert import kl_divergence

        # not while compiling (a data-dependent branch: a graph break, an error under fullgraph) nor under
        # torch.func.vmap (of per-example gradients: it cannot read a value); under torch.func.grad alone, checked
        traced = in_trace(output, target)
        if not traced and not getattr(self, "_checked_layers", True):  # once: the network bayesianize returned?
            self._checked_layers = True
            if not any(isinstance(module, BayesianModule) for module in self.model[0].modules()):
                warnings.warn(
                    f"ELBOLoss: the model ({type(self.model[0]).__name__}) has no Bayesian layer, so its KL is 0 and the loss "
                    "is the NLL alone: pass the network bdl.bayesianize returned (it converts a copy)",
                    stacklevel=user_stacklevel(),
                )
        default = getattr(self, "_one_logit_binary", False)  # the default criterion (a loss pickled by an earlier bdl has no flag)
        if default and not traced:
            _check_logits_and_labels(output, target)
            if not getattr(self, "_checked_outputs", False) and isinstance(output, Tensor):  # once told: a sync per step
                # the classes along dim 1, as the cross-entropy reads them ([B, C, T] sequences, [B, C, H, W] images)
                verdict = probabilities_verdict(output.movedim(1, -1) if output.dim() > 2 else output)
                if verdict:  # softmaxed again by the cross-entropy: trained quietly, on flattened probabilities
                    raise ValueError(
                        "ELBOLoss's default criterion takes logits, and the model's outputs look like probabilities (every "
                        "row non-negative, summing to 1 over the classes): drop the final nn.Softmax, or end with nn.LogSoftmax"
                    )
                self._checked_outputs = verdict is not None  # rows all alike (a zero-initialised head) told nothing
        one_logit = isinstance(output, Tensor) and output.dim() == 2 and output.shape[1] == 1
        if one_logit and default:
            # a cross-entropy over one class: 0 whatever the model with labels 0, an IndexError with a label 1
            output, target = _two_class(output), as_class_labels(target.long() if target.dtype == torch.bool else target)
        elif default and not traced and isinstance(target, Tensor) and isinstance(output, Tensor) and output.dim() == 2:
            if target.shape in ((output.shape[0],), (output.shape[0], 1)):  # labels as a binary model takes them: [B] floats, [B, 1]
                target = as_class_labels(target.long() if target.dtype == torch.bool else target)
        if default and isinstance(target, Tensor) and not target.is_floating_point() and target.dtype != torch.long:
            target = target.long()  # int32 labels (numpy's on Windows): torch's "expected target dtype to be Long or Byte"
        result = elbo_loss(self.criterion(output, target), kl_divergence(self.model[0]), self.num_data, self.kl_weight)
        if self.check_finite and not traced and not in_trace(result.loss) and not bool(torch.isfinite(result.loss)):
            bad = [name for name in ("nll", "kl") if not bool(torch.isfinite(getattr(result, name)))]
            if bad == ["nll"] and isinstance(target, Tensor) and target.numel() == 0:  # not an overflow: "NaN/inf in the inputs"
                raise ValueError(
                    f"ELBOLoss: the batch is empty (targets of shape {tuple(target.shape)}), whose mean NLL is NaN: skip "
                    "empty batches"
                )
            raise FloatingPointError(
                f"ELBOLoss: {' and '.join(name.upper() for name in bad) or 'the loss'} {'are' if len(bad) > 1 else 'is'} "
                f"not finite (nll={result.nll.item():.4g}, kl={result.kl.item():.4g}); "
                f"{non_finite_where(self.model[0], kl_too='kl' in bad)}; lower the learning rate, check the inputs for "
                "NaN/inf, or check the prior and posterior scales"
            )
        return result
