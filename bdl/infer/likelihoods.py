"""Likelihoods that turn a network's output into Pyro observation sites.

A likelihood receives the network output for a minibatch and scores the targets under
``pyro.plate("data", size=num_data, subsample_size=batch)``, so Pyro multiplies the log-likelihood of
every minibatch by ``num_data / batch`` and the ELBO estimates its full-data value. ``num_data`` must be
the size of the whole training set: under multi-process training (Lightning's DDP) each process sees a
shard, and scaling by the shard size would over-weight the prior by the number of processes.

Each likelihood also knows how to turn Monte Carlo samples of the network output into what
``bdl.predict`` expects of a model (logits, or a mean and a noise variance) and into a
:class:`bdl.Prediction` (its :meth:`Likelihood.prediction`).
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, ClassVar, Optional, Union

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..metrics.functional._checks import as_class_labels

if TYPE_CHECKING:  # pragma: no cover
    from ..predict import Prediction

OBSERVATION_SITE = "obs"
DATA_PLATE = "data"


def data_plate(batch_size: int, num_data: Optional[int], device: Optional[torch.device] = None) -> pyro.plate:
    """The plate over data points of a minibatch of ``batch_size`` out of ``num_data``.

    ``num_data=None`` means the batch is the whole data set (scale 1). Otherwise the plate is subsampled,
    and every site inside it is scaled by ``num_data / batch_size`` (Pyro's ``subsample_size``).

    Args:
        batch_size: number of data points in the batch, > 0.
        num_data: size of the whole (global) training set, >= ``batch_size`` when gradients are enabled (a
            training batch), or None.
        device: device of the batch.

    Returns:
        a ``pyro.plate`` named ``"data"``.

    Example:
        >>> with data_plate(10, num_data=1000):
        ...     pass
    """
    if num_data is None:
        return pyro.plate(DATA_PLATE, batch_size)
    if num_data < batch_size and torch.is_grad_enabled():
        # a training batch larger than the training set: num_data is wrong (per batch, or per process). Evaluation
        # (no gradients) may take larger batches of other data: a validation grid over a small training set
        raise ValueError(
            f"num_data must be the size of the whole training set (>= the batch size {batch_size}), got {num_data}"
        )
    # Indices are never used (the batch is given), so pass them instead of letting Pyro draw a randperm(N).
    return pyro.plate(DATA_PLATE, size=num_data, subsample=torch.arange(batch_size, device=device))


class Likelihood(nn.Module):
    """Base class: ``p(y | f(x))`` for a network output ``f(x)``.

    Subclasses implement :meth:`distribution` and :meth:`predictive_outputs`; likelihoods with global latent
    variables (a learned noise scale) also override :meth:`sample_globals`.

    Example:
        >>> likelihood = CategoricalLikelihood()  # a subclass; forward and prediction are the base class's
        >>> logits, labels = torch.zeros(4, 3), torch.tensor([0, 1, 2, 0])
        >>> trace = pyro.poutine.trace(likelihood).get_trace(logits, labels, num_data=100)
        >>> trace.nodes["obs"]["scale"], likelihood.prediction(torch.zeros(5, 4, 3), {}).probs.shape
        (25.0, torch.Size([4, 3]))
    """

    task: ClassVar[str]
    #: Names of the latent sites this likelihood samples outside the data plate.
    global_sites: ClassVar[tuple[str, ...]] = ()

    def sample_globals(self) -> dict[str, Tensor]:
        """Sample (with ``pyro.sample``) the likelihood's global latent variables; none by default."""
        return {}

    def distribution(self, output: Tensor, globals_: dict[str, Tensor]) -> dist.Distribution:
        """The observation distribution for a batch, batch shape ``[B]``."""
        raise NotImplementedError

    def check_target(self, target: Tensor, output: Tensor) -> Tensor:
        """Validate ``target`` against ``output`` and return it in the form :meth:`distribution` scores."""
        return target

    def forward(self, output: Tensor, target: Optional[Tensor] = None, *, num_data: Optional[int] = None) -> Tensor:
        """Score ``target`` (or sample it when None) inside the data plate; returns the observation site."""
        if output.dim() == 0 or output.shape[0] == 0:  # pyro.plate's "size cannot be zero", or a failed reshape
            raise ValueError(f"{type(self).__name__}: the batch holds no example (network output of shape {tuple(output.shape)})")
        globals_ = self.sample_globals()
        if target is not None:
            target = self.check_target(target, output)
        with data_plate(output.shape[0], num_data, output.device):
            return pyro.sample(OBSERVATION_SITE, self.distribution(output, globals_), obs=target)

    def predictive_outputs(self, sample_outputs: Tensor, sample_globals: dict[str, Tensor]) -> Union[Tensor, tuple[Tensor, Tensor]]:
        """What ``bdl.predict`` expects of a model, per sample: logits ``[S, N, C]`` (classification) or
        ``(means, noise variances)`` ``[S, N, D]`` each (regression), from network outputs ``[S, N, ...]``
        and the matching samples of the likelihood's global sites ``{name: [S, ...]}``."""
        raise NotImplementedError

    def prediction(self, sample_outputs: Tensor, sample_globals: dict[str, Tensor], *, keep_samples: bool = False) -> "Prediction":
        """Posterior predictive :class:`bdl.Prediction` from ``S`` samples of the network output ``[S, N, ...]``."""
        from ..predict import Prediction

        outputs = self.predictive_outputs(sample_outputs, sample_globals)
        if self.task == "classification":
            return Prediction.from_logits(outputs, keep_samples=keep_samples)
        means, variances = outputs
        return Prediction.from_regression(means, variances, keep_samples=keep_samples)


class CategoricalLikelihood(Likelihood):
    """Categorical likelihood on logits: ``y ~ Categorical(softmax(f(x)))``, output ``[B, C]``.

    Example:
        >>> likelihood = CategoricalLikelihood()
        >>> likelihood.distribution(torch.zeros(4, 3), {}).batch_shape
        torch.Size([4])
    """

    task = "classification"

    def distribution(self, output: Tensor, globals_: dict[str, Tensor]) -> dist.Distribution:
        return dist.Categorical(logits=output)

    def check_target(self, target: Tensor, output: Tensor) -> Tensor:
        if output.dim() != 2:
            raise ValueError(f"categorical likelihood: the network output must be logits [B, C], got shape {tuple(output.shape)}")
        target = as_class_labels(target)  # as the other modules and evaluation take labels: [B, 1], whole floats
        if target.shape != output.shape[:1] or target.is_floating_point():
            raise ValueError(
                f"categorical likelihood: targets must be integer class indices of shape {tuple(output.shape[:1])}, "
                f"got {target.dtype} of shape {tuple(target.shape)}"
            )
        target = target.long()  # numpy's unsigned labels: torch has no comparison for uint16 ("lt_cpu")
        num_classes = output.shape[1]
        if target.numel() and bool(((target < 0) | (target >= num_classes)).any()):
            raise ValueError(
                f"categorical likelihood: targets must be class indices in [0, {num_classes - 1}] for the network's "
                f"{num_classes} logits, got labels in [{target.min().item()}, {target.max().item()}]"
            )
        return target

    def predictive_outputs(self, sample_outputs: Tensor, sample_globals: dict[str, Tensor]) -> Tensor:
        return sample_outputs


class BernoulliLikelihood(Likelihood):
    """Bernoulli likelihood on a logit: ``y ~ Bernoulli(sigmoid(f(x)))``, output ``[B]`` or ``[B, 1]``.

    Targets are 0/1 (any dtype). Predictions are two-class: column 1 is ``P(y = 1)``.

    Example:
        >>> BernoulliLikelihood().distribution(torch.zeros(5), {}).batch_shape
        torch.Size([5])
    """

    task = "classification"

    @staticmethod
    def _logit(output: Tensor) -> Tensor:
        return output.squeeze(-1) if output.dim() >= 2 and output.shape[-1] == 1 else output

    def distribution(self, output: Tensor, globals_: dict[str, Tensor]) -> dist.Distribution:
        return dist.Bernoulli(logits=self._logit(output))

    def check_target(self, target: Tensor, output: Tensor) -> Tensor:
        logit = self._logit(output)
        if logit.dim() != 1:
            raise ValueError(f"Bernoulli likelihood: the network output must be one logit per example, [B] or [B, 1], got shape {tuple(output.shape)}")
        target = target.reshape(-1) if target.numel() == logit.shape[0] else target
        if target.shape != logit.shape:
            raise ValueError(f"Bernoulli likelihood: targets must be 0/1 of shape {tuple(logit.shape)}, got shape {tuple(target.shape)}")
        bad = ~((target == 0) | (target == 1))
        if bool(bad.any()):  # "values from 0.0 to 1.0" for a soft label 0.5, "from nan to nan"
            index = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"Bernoulli likelihood: targets must be 0/1, got {target[index].item()} at index {index} (soft labels are not "
                "taken; class labels of more classes need the categorical likelihood)"
            )
        return target.to(logit.dtype)

    def predictive_outputs(self, sample_outputs: Tensor, sample_globals: dict[str, Tensor]) -> Tensor:
        # Two-class logits (-l/2, l/2), as bdl.predict reads one logit: softmax gives (1 - sigmoid(l), sigmoid(l)),
        # and the logit-based OOD scores (energy, max logit) depend on |l| only
        # [S, B, 1] or [S, B]: only a third dimension is the logit column (one input's [S, 1] is S logits)
        half = (sample_outputs.squeeze(-1) if sample_outputs.dim() == 3 else sample_outputs) / 2
        return torch.stack([-half, half], dim=-1)


def _regression_target(target: Tensor, mean: Tensor, name: str) -> Tensor:
    if target.shape != mean.shape:
        if target.dim() == 1 and mean.shape[1:] == (1,) and target.shape[0] == mean.shape[0]:
            return target.unsqueeze(-1).to(mean.dtype)
        raise ValueError(f"{name} likelihood: targets must have shape {tuple(mean.shape)} (like the mean), got {tuple(target.shape)}")
    return target.to(mean.dtype)


def _as_matrix(output: Tensor, name: str) -> Tensor:
    if output.dim() == 1:
        return output.unsqueeze(-1)
    if output.dim() != 2:
        raise ValueError(f"{name} likelihood: the network output must be [B] or [B, D], got shape {tuple(output.shape)}")
    return output


class GaussianLikelihood(Likelihood):
    """Gaussian likelihood with a known noise level: ``y ~ N(f(x), noise_std^2 I)``, output ``[B, D]``.

    Args:
        noise_std: the observation noise standard deviation, > 0.

    Example:
        >>> likelihood = GaussianLikelihood(noise_std=0.5)
        >>> likelihood.distribution(torch.zeros(4, 2), {}).event_shape
        torch.Size([2])
    """

    task = "regression"

    def __init__(self, noise_std: float = 1.0) -> None:
        super().__init__()
        if not (isinstance(noise_std, numbers.Real) and math.isfinite(noise_std) and noise_std > 0):
            raise ValueError(f"noise_std must be a positive number, got {noise_std!r}")
        self.noise_std = float(noise_std)

    def extra_repr(self) -> str:
        return f"noise_std={self.noise_std:g}"

    def distribution(self, output: Tensor, globals_: dict[str, Tensor]) -> dist.Distribution:
        mean = _as_matrix(output, "Gaussian")
        return dist.Normal(mean, self.noise_std).to_event(1)

    def check_target(self, target: Tensor, output: Tensor) -> Tensor:
        return _regression_target(target, _as_matrix(output, "Gaussian"), "Gaussian")

    def predictive_outputs(self, sample_outputs: Tensor, sample_globals: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        means = sample_outputs.unsqueeze(-1) if sample_outputs.dim() == 2 else sample_outputs
        return means, torch.full_like(means, self.noise_std**2)


class HomoscedasticGaussianLikelihood(GaussianLikelihood):
    """Gaussian likelihood with one unknown noise level, inferred with the weights.

    ``sigma ~ HalfNormal(noise_prior_scale)`` (the latent site ``"noise_std"``), ``y ~ N(f(x), sigma^2 I)``.

    Args:
        noise_prior_scale: scale of the half-normal prior on the noise standard deviation, > 0.

    Example:
        >>> likelihood = HomoscedasticGaussianLikelihood(noise_prior_scale=1.0)
        >>> likelihood.global_sites
        ('noise_std',)
    """

    global_sites = ("noise_std",)

    def __init__(self, noise_prior_scale: float = 1.0) -> None:
        if not (isinstance(noise_prior_scale, numbers.Real) and math.isfinite(noise_prior_scale) and noise_prior_scale > 0):
            raise ValueError(f"noise_prior_scale must be a positive number, got {noise_prior_scale!r}")
        super().__init__()
        del self.noise_std
        self.noise_prior_scale = float(noise_prior_scale)
        self.register_buffer("_prior_scale", torch.tensor(float(noise_prior_scale)), persistent=False)

    def extra_repr(self) -> str:
        return f"noise_prior_scale={self.noise_prior_scale:g}"

    def sample_globals(self) -> dict[str, Tensor]:
        return {"noise_std": pyro.sample("noise_std", dist.HalfNormal(self._prior_scale))}

    def distribution(self, output: Tensor, globals_: dict[str, Tensor]) -> dist.Distribution:
        mean = _as_matrix(output, "Gaussian")
        return dist.Normal(mean, globals_["noise_std"]).to_event(1)

    def predictive_outputs(self, sample_outputs: Tensor, sample_globals: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        means = sample_outputs.unsqueeze(-1) if sample_outputs.dim() == 2 else sample_outputs
        noise_std = sample_globals["noise_std"].reshape(-1, 1, 1)
        return means, noise_std.square().expand_as(means)


class HeteroscedasticGaussianLikelihood(Likelihood):
    """Gaussian likelihood whose noise the network predicts: output ``[B, 2D]`` = (mean, raw scale).

    ``y ~ N(mu(x), sigma(x)^2)`` with ``sigma = softplus(raw) + min_std`` (Nix & Weigend, 1994; Kendall &
    Gal, 2017).

    Args:
        min_std: floor on the predicted standard deviation, >= 0 (keeps the likelihood bounded).

    Example:
        >>> likelihood = HeteroscedasticGaussianLikelihood()
        >>> likelihood.distribution(torch.zeros(4, 2), {}).event_shape
        torch.Size([1])
    """

    task = "regression"

    def __init__(self, min_std: float = 1e-4) -> None:
        super().__init__()
        if not (isinstance(min_std, numbers.Real) and math.isfinite(min_std) and min_std >= 0):
            raise ValueError(f"min_std must be a finite number >= 0, got {min_std!r}")
        self.min_std = float(min_std)

    def extra_repr(self) -> str:
        return f"min_std={self.min_std:g}"

    def split(self, output: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean, std)`` from an output ``[..., 2D]``."""
        if output.shape[-1] % 2:
            raise ValueError(
                f"heteroscedastic Gaussian likelihood: the network output must have an even last dimension 2D "
                f"(means then raw scales), got shape {tuple(output.shape)}"
            )
        mean, raw = output.chunk(2, dim=-1)
        return mean, F.softplus(raw) + self.min_std

    def distribution(self, output: Tensor, globals_: dict[str, Tensor]) -> dist.Distribution:
        mean, std = self.split(output)
        return dist.Normal(mean, std).to_event(1)

    def check_target(self, target: Tensor, output: Tensor) -> Tensor:
        if output.dim() != 2:
            raise ValueError(f"heteroscedastic Gaussian likelihood: the network output must be [B, 2D], got shape {tuple(output.shape)}")
        return _regression_target(target, self.split(output)[0], "heteroscedastic Gaussian")

    def predictive_outputs(self, sample_outputs: Tensor, sample_globals: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        mean, std = self.split(sample_outputs)
        return mean, std.square()


LIKELIHOODS: dict[str, type[Likelihood]] = {
    "categorical": CategoricalLikelihood,
    "bernoulli": BernoulliLikelihood,
    "gaussian": GaussianLikelihood,
    "gaussian_homoscedastic": HomoscedasticGaussianLikelihood,
    "gaussian_heteroscedastic": HeteroscedasticGaussianLikelihood,
}


def make_likelihood(likelihood: Union[str, Likelihood], **options) -> Likelihood:
    """Resolve a likelihood by name (see ``LIKELIHOODS``) or pass an instance through.

    Args:
        likelihood: one of ``"categorical"``, ``"bernoulli"``, ``"gaussian"`` (known noise),
            ``"gaussian_homoscedastic"`` (learned noise), ``"gaussian_heteroscedastic"``, or a
            :class:`Likelihood`.
        **options: constructor arguments for a named likelihood (e.g. ``noise_std=0.1``).

    Returns:
        a :class:`Likelihood`.

    Example:
        >>> make_likelihood("gaussian", noise_std=0.1)
        GaussianLikelihood(noise_std=0.1)
    """
    if isinstance(likelihood, Likelihood):
        if options:
            raise ValueError(f"likelihood options {sorted(options)} given with a Likelihood instance; set them on the instance")
        return likelihood
    if not isinstance(likelihood, str):
        raise TypeError(f"likelihood must be a name or a bdl.infer.Likelihood, got {type(likelihood).__name__}")
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {likelihood!r}; choose one of {sorted(LIKELIHOODS)}")
    return LIKELIHOODS[likelihood](**options)
