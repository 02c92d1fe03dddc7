"""An ordinary ``nn.Module`` as a Pyro model: Gaussian priors on (some of) its parameters plus a likelihood.

The network is not edited or converted: for every Bayesian parameter the model draws
``w ~ N(loc, prior_scale^2)`` with ``pyro.sample`` and runs the network with those values through
``torch.func.functional_call``. Parameters without a prior stay ordinary ``nn.Parameter`` s (point
estimates, trained by the same optimizer in SVI, held fixed by MCMC).
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Iterable, Optional, Union

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..nn.layers import BayesianModule
from .likelihoods import DATA_PLATE, OBSERVATION_SITE, Likelihood, make_likelihood

ParameterSelection = Union[None, str, Iterable[str], type, tuple, Callable[[str, nn.Parameter], bool]]
PRIOR_LOCS = ("zero", "pretrained")


def _last_layer_prefix(net: nn.Module) -> str:
    """Name of the last module (in registration order) that holds parameters directly."""
    last = None
    for name, module in net.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            last = name
    if last is None:
        raise ValueError("bayesian_parameters='last_layer': the network has no parameters")
    return last


def select_parameters(net: nn.Module, selection: ParameterSelection) -> list[str]:
    """Names of the parameters of ``net`` that ``selection`` picks, in ``named_parameters`` order.

    Args:
        net: the network.
        selection: ``None`` (all parameters); ``"last_layer"`` (the parameters of the last module that
            has any); a parameter name or module-name prefix, or a list of them (``"fc"`` picks
            ``fc.weight`` and ``fc.bias``); a module type or tuple of types (all parameters of such
            modules); or a predicate ``(name, parameter) -> bool``.

    Returns:
        the selected parameter names (non-empty).

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> select_parameters(net, "last_layer")
        ['2.weight', '2.bias']
    """
    named = dict(net.named_parameters())
    if selection is None:
        names = list(named)
    elif isinstance(selection, type) or (isinstance(selection, tuple) and selection and all(isinstance(t, type) for t in selection)):
        names = [
            f"{module_name}.{param_name}" if module_name else param_name
            for module_name, module in net.named_modules()
            if isinstance(module, selection)
            for param_name, _ in module.named_parameters(recurse=False)
        ]
        names = [name for name in named if name in set(names)]
    elif callable(selection) and not isinstance(selection, str):
        names = [name for name, parameter in named.items() if selection(name, parameter)]
    else:
        patterns = [selection] if isinstance(selection, str) else list(selection)
        if not all(isinstance(p, str) for p in patterns):
            raise TypeError(f"bayesian_parameters: expected names, module types or a predicate, got {selection!r}")
        if patterns == ["last_layer"] and "last_layer" not in named:
            patterns = [_last_layer_prefix(net)]
        for pattern in patterns:
            if not any(name == pattern or name.startswith(pattern + ".") for name in named):
                raise ValueError(f"bayesian_parameters: {pattern!r} matches no parameter; the network has {list(named)}")
        names = [name for name in named if any(name == p or name.startswith(p + ".") for p in patterns)]
    if not names:
        raise ValueError(f"bayesian_parameters={selection!r} selects no parameter of the network")
    return names


class PyroModel(nn.Module):
    """A network with Gaussian priors on its parameters, as a Pyro model ``model(x, y=None)``.

    The generative model is

    ``w_j ~ N(m_j, prior_scale^2)`` for every selected parameter ``j``,
    ``y_i ~ likelihood(f(x_i; w))`` for ``i`` in ``pyro.plate("data", size=num_data, subsample=batch)``,

    where ``m_j = 0`` (``prior_loc="zero"``) or the network's weights at construction
    (``prior_loc="pretrained"``, a prior centred on pretrained weights as in MOPED, Krishnan et al., 2020).
    The sample sites are named after the parameters (``"0.weight"``), plus the likelihood's global sites
    (``"noise_std"`` for a learned noise). Inside the plate every log-likelihood term is multiplied by
    ``num_data / batch``, so each minibatch gives an unbiased estimate of the full-data ELBO. ``num_data``
    is the global training-set size (with DDP each process gets a shard, but the scale must use the whole
    set); ``None`` means every call sees the whole data set (MCMC).

    Called with ``x=None`` the model only samples the latent variables (what guides need to set up).

    Args:
        net: any ``nn.Module`` mapping a batch ``x`` to outputs (logits ``[B, C]``, means ``[B, D]``, ...). Its
            parameters that get priors are frozen (``requires_grad=False``; the model uses sampled values, and DDP
            wants a gradient for every trainable parameter): to train ``net`` itself afterwards, call
            ``net.requires_grad_(True)``, or give the model a copy (``copy.deepcopy(net)``).
        likelihood: a likelihood name (``"categorical"``, ``"bernoulli"``, ``"gaussian"``,
            ``"gaussian_homoscedastic"``, ``"gaussian_heteroscedastic"``) or a :class:`Likelihood`.
        num_data: size of the whole training set, or None (each call sees all data).
        prior_scale: standard deviation of the Gaussian priors, > 0.
        prior_loc: ``"zero"`` or ``"pretrained"`` (centre each prior on the current weight).
        bayesian_parameters: which parameters get priors; see :func:`select_parameters` (default all).
        likelihood_options: constructor arguments of a named likelihood (e.g. ``{"noise_std": 0.1}``).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> model = PyroModel(net, "categorical", num_data=1000, prior_scale=1.0)
        >>> trace = pyro.poutine.trace(model).get_trace(torch.randn(10, 4), torch.randint(0, 3, (10,)))
        >>> sorted(model.sample_sites)
        ['0.bias', '0.weight', '2.bias', '2.weight']
    """

    def __init__(
        self,
        net: nn.Module,
        likelihood: Union[str, Likelihood] = "categorical",
        *,
        num_data: Optional[int] = None,
        prior_scale: float = 1.0,
        prior_loc: str = "zero",
        bayesian_parameters: ParameterSelection = None,
        likelihood_options: Optional[dict] = None,
    ) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be an nn.Module, got {type(net).__name__}")
        layers = [name or type(net).__name__ for name, module in net.named_modules() if isinstance(module, BayesianModule)]
        if layers:  # the priors went on their posterior means and stds, which then drew random weights
            raise ValueError(
                f"net has bdl Bayesian layers ({', '.join(map(repr, layers[:3]))}{', ...' if len(layers) > 3 else ''}), which "
                "sample their own weights: PyroModel puts its prior on a plain network's weights (pass the network "
                "before bdl.bayesianize), while a network of Bayesian layers trains on the ELBO (bdl.elbo_loss, "
                "VariationalModule)"
            )
        if not (isinstance(prior_scale, numbers.Real) and math.isfinite(prior_scale) and prior_scale > 0):
            raise ValueError(f"prior_scale must be a positive number, got {prior_scale!r}")
        if prior_loc not in PRIOR_LOCS:
            raise ValueError(f"prior_loc must be one of {PRIOR_LOCS}, got {prior_loc!r}")
        self.net = net
        self.likelihood = make_likelihood(likelihood, **(likelihood_options or {}))
        self.num_data = num_data
        self.prior_scale = float(prior_scale)
        self.prior_loc = prior_loc
        self.bayesian_names = select_parameters(net, bayesian_parameters)
        # the observation site and the data plate too: "Multiple sample sites named 'obs'" at the first trace
        clash = set(self.bayesian_names) & {*self.likelihood.global_sites, OBSERVATION_SITE, DATA_PLATE}
        if clash:
            raise ValueError(
                f"parameter names {sorted(clash)} clash with the likelihood's sites ({OBSERVATION_SITE!r}, the plate "
                f"{DATA_PLATE!r} and its latent sites {list(self.likelihood.global_sites)}): rename the network's parameters"
            )
        named = dict(net.named_parameters())
        for name in self.bayesian_names:
            # The network's own values of these parameters are never used in the model (the sampled ones
            # are), so they would get no gradient: freeze them (DDP requires a gradient for every trainable
            # parameter). They remain the guides' initial values and, with prior_loc="pretrained", the priors' centres.
            named[name].requires_grad_(False)
        # Prior locations are buffers (not in state_dict: they are rebuilt from the net, or zero).
        self._prior_locs = {}
        for index, name in enumerate(self.bayesian_names):
            loc = named[name].detach().clone() if prior_loc == "pretrained" else torch.zeros_like(named[name])
            self.register_buffer(f"_prior_loc_{index}", loc, persistent=prior_loc == "pretrained")
            self._prior_locs[name] = f"_prior_loc_{index}"

    @property
    def num_data(self) -> Optional[int]:
        """Size of the whole (global) training set: each minibatch's log-likelihood is multiplied by
        ``num_data / batch``. None: every call sees the whole data set (scale 1). Settable, to a positive int
        or None (anything else raises ``ValueError``)."""
        return self._num_data

    @num_data.setter
    def num_data(self, value: Optional[int]) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0):
            raise ValueError(f"num_data must be a positive int (the global training-set size) or None, got {value!r}")
        self._num_data = None if value is None else int(value)  # a numpy integer as an int

    @property
    def task(self) -> str:
        """``"classification"`` or ``"regression"``, from the likelihood."""
        return self.likelihood.task

    @property
    def sample_sites(self) -> list[str]:
        """Names of all latent sample sites: the Bayesian parameters, then the likelihood's globals."""
        return list(self.bayesian_names) + list(self.likelihood.global_sites)

    def extra_repr(self) -> str:
        return (
            f"num_data={self.num_data}, prior_scale={self.prior_scale:g}, prior_loc={self.prior_loc!r}, "
            f"bayesian_parameters={len(self.bayesian_names)} of {len(list(self.net.parameters()))}"
        )

    def prior(self, name: str) -> dist.Distribution:
        """The prior of parameter ``name``: ``N(loc, prior_scale^2)`` with all dims as event dims."""
        loc = getattr(self, self._prior_locs[name])
        return dist.Normal(loc, self.prior_scale).to_event(loc.dim())

    def current_values(self) -> dict[str, Tensor]:
        """Copies of the network's current values of the Bayesian parameters (used to initialise guides).

        Copies: AutoNormal and AutoDelta keep an initial value's memory as their location parameter, and the
        optimiser would then train the user's network in place.
        """
        named = dict(self.net.named_parameters())
        return {name: named[name].detach().clone() for name in self.bayesian_names}

    def run_net(self, weights: dict[str, Tensor], x: Tensor) -> Tensor:
        """``f(x; w)``: the network with ``weights`` substituted for its Bayesian parameters."""
        output = functional_call(self.net, weights, (x,), strict=False)
        if not isinstance(output, Tensor):  # e.g. a bdl.GaussianHead's (mean, variance)
            raise TypeError(
                f"the network must return one tensor, which the likelihood reads, got {type(output).__name__}; "
                "for a mean and a noise scale per input, end the network with nn.Linear(features, 2 * D) and use "
                "likelihood='gaussian_heteroscedastic' (it splits the output into mean and softplus(std))"
            )
        return output

    def forward(self, x: Optional[Tensor] = None, y: Optional[Tensor] = None) -> Optional[Tensor]:
        weights = {name: pyro.sample(name, self.prior(name)) for name in self.bayesian_names}
        if x is None:
            self.likelihood.sample_globals()
            return None
        output = self.run_net(weights, x)
        return self.likelihood(output, y, num_data=self.num_data)


def check_full_data(engine: str, model: PyroModel, args: tuple) -> None:
    """For ``mcmc`` and ``svi``, which see the whole data set at every step: a :class:`PyroModel` needs ``(x, y)``
    tensors (without ``y`` an SVI guide took the observations for latent variables) and a ``num_data`` of None or
    the number of data points given (another scales the likelihood: a posterior std 6x too small for 1000 of 20)."""
    if len(args) < 2 or not all(isinstance(a, Tensor) for a in args[:2]):
        raise ValueError(f"{engine} on a PyroModel needs the data as tensors: {engine}(model, x, y, ...)")
    if model.num_data not in (None, args[0].shape[0]):
        raise ValueError(
            f"{engine} uses the full-data posterior: the PyroModel's num_data ({model.num_data}) must be None or the "
            f"number of data points given ({args[0].shape[0]}); train on minibatches with the Lightning Trainer"
        )


def check_finite_data(engine: str, args: tuple) -> None:
    """For ``svi`` and ``mcmc`` on a :class:`PyroModel`: the inputs ``x`` and floating-point targets ``y`` hold no NaN
    or infinity. One missing value made every step's likelihood NaN: SVI failed in a Categorical's argument check,
    MCMC with "cannot find valid initial parameters", neither naming the data."""
    for name, what, value in (("x", "inputs", args[0]), ("y", "targets", args[1])):
        if value.dim() and value.shape[0] == 0:  # torch's "cannot reshape tensor of 0 elements", or Pyro's 1 / 0
            raise ValueError(f"{engine}: {name} (the {what}) has no rows, got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            continue
        rows = value.reshape(value.shape[0] if value.dim() else 1, -1)
        bad_rows = (~rows.isfinite()).any(1).nonzero()[:, 0]
        if len(bad_rows):
            row = int(bad_rows[0])
            shown = rows[row].tolist() if rows.shape[1] <= 10 else f"tensor of shape {tuple(value.shape[1:])}"
            raise ValueError(
                f"{engine}: {name} (the {what}) must be finite, got NaN or inf in {len(bad_rows)} of {len(rows)} rows, the "
                f"first at row {row}: {name}[{row}] = {shown}; drop or impute the missing values first"
            )
