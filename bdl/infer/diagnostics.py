"""Rank-normalised convergence diagnostics of MCMC draws (Vehtari, Gelman, Simpson, Carpenter & Bürkner, 2021).

Pyro's :func:`pyro.ops.stats.split_gelman_rubin` and :func:`~pyro.ops.stats.effective_sample_size` are the
classic split R-hat and ESS of the draws themselves: they miss chains that differ in scale but not in
location, and they are unreliable for heavy tails (a Cauchy posterior has no variance to compare). Vehtari
et al. replace the draws by their normal scores (ranks over all chains mapped through the normal quantile
function), which exist for any distribution:

- :func:`rank_r_hat`: the larger of the split R-hat of the normal scores ("bulk") and of the normal scores
  of ``|x - median|`` ("tail", sensitive to chains of different spread). Well-mixed chains: below 1.01.
- :func:`ess_bulk`: the effective sample size of the normal scores (split chains): how well the centre of
  the posterior is estimated.
- :func:`ess_tail`: the smaller ESS of the indicators ``x <= q_5%`` and ``x <= q_95%``: how well the 5% and
  95% quantiles (a 90% interval) are estimated.

- :func:`ess_mean`: the effective sample size of the draws themselves (split chains): how well the posterior
  mean is estimated (what :class:`~bdl.infer.PosteriorSummary` reports as ``n_eff``).

The ESS is Stan's (Geyer's initial monotone sequence with Stan's refinements), as ArviZ computes it; every
function here gives ArviZ 0.23's ``rhat(method="rank")``, ``ess(method="bulk")``, ``ess(method="tail")`` and
``ess(method="mean")`` to rounding (tested). Stan's ESS is at most ``S log10(S)`` for ``S`` draws in all
(antithetic chains can exceed ``S``, not by more). Draws are ``[num_chains, num_draws, *shape]``; each function
returns ``[*shape]`` in float64. An element equal in every draw gives NaN (0 / 0), as Pyro's diagnostics do, and
so does an element with a NaN among its draws (as in ArviZ and Pyro); the other elements keep their own values.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["ess_bulk", "ess_mean", "ess_tail", "rank_normalize", "rank_r_hat"]


def _as_chains(name: str, chains: Tensor) -> Tensor:
    if not isinstance(chains, Tensor):
        raise TypeError(f"{name} must be a Tensor [num_chains, num_draws, ...], got {type(chains).__name__}")
    if chains.dim() < 2 or chains.shape[1] < 4:
        raise ValueError(f"{name} must be [num_chains, num_draws >= 4, ...], got shape {tuple(chains.shape)}")
    if chains.shape[0] < 1:
        raise ValueError(f"{name} must hold at least one chain, got shape {tuple(chains.shape)}")
    return chains.detach().to(torch.float64).reshape(chains.shape[0], chains.shape[1], math.prod(chains.shape[2:]))


def _split(chains: Tensor) -> Tensor:
    """``[C, N, E]`` as ``[2C, N // 2, E]``: each chain's first and last halves (the middle draw of an odd ``N``
    left out), so that a trend within a chain shows as a difference between chains."""
    half = chains.shape[1] // 2
    return torch.cat([chains[:, :half], chains[:, chains.shape[1] - half :]])


def _normal_scores(chains: Tensor) -> Tensor:
    """``[C, N, E]``: each element's draws replaced by ``Phi^-1((r - 3/8) / (S + 1/4))``, ``r`` their rank among
    all ``S = C N`` draws (ties get their average rank; Blom's offsets)."""
    c, n, e = chains.shape
    flat = chains.reshape(c * n, e).t().contiguous()  # [E, S]
    ordered = flat.sort(dim=1).values
    below = torch.searchsorted(ordered, flat, right=False)
    at_most = torch.searchsorted(ordered, flat, right=True)
    ranks = (below + 1 + at_most).to(torch.float64) / 2
    scores = torch.special.ndtri((ranks - 0.375) / (c * n + 0.25))
    return scores.t().reshape(c, n, e)


def _r_hat(chains: Tensor) -> Tensor:
    """The (non-split) Gelman-Rubin R-hat of ``[C, N, E]`` (Pyro's and ArviZ's formula)."""
    n = chains.shape[1]
    within = chains.var(dim=1).mean(0)
    between = n * chains.mean(1).var(0) if chains.shape[0] > 1 else torch.zeros_like(within)
    return ((between / within + n - 1) / n).sqrt()


def _autocovariance(chains: Tensor) -> Tensor:
    """``[C, N, E]`` biased autocovariance of each chain at lags ``0 .. N - 1``, by FFT."""
    n = chains.shape[1]
    centred = chains - chains.mean(1, keepdim=True)
    size = 1 << (2 * n - 1).bit_length()
    spectrum = torch.fft.rfft(centred, n=size, dim=1)
    return torch.fft.irfft(spectrum * spectrum.conj(), n=size, dim=1)[:, :n] / n


def _ess(chains: Tensor) -> Tensor:
    """Stan's effective sample size of ``[C, N, E]`` (as ArviZ's ``_ess``), one per element.

    With ``rho_t`` the autocorrelation at lag ``t`` combined over chains, the pair sums
    ``P_k = rho_2k + rho_2k+1`` are summed while positive (Geyer's initial positive sequence, at most up to
    lag ``N - 3``), made non-increasing (initial monotone sequence), and ``tau = -1 + 2 sum P_k`` plus the
    next even lag where positive (Stan's refinement) gives ``ESS = C N / max(tau, 1 / log10(C N))``.
    """
    c, n, e = chains.shape
    total = c * n
    # equal up to rounding, relative to the values (ArviZ's absolute 1e-15 read the draws of a parameter in units
    # of 1e-17 as constant: every draw "effective")
    high, low = chains.amax((0, 1)), chains.amin((0, 1))
    size = torch.maximum(high.abs(), low.abs())
    constant = (high - low) <= torch.finfo(torch.float64).resolution * size
    # in units of the largest draw (the ESS does not depend on them): squares of draws near 1e-165 underflowed, 0 / 0
    chains = chains / torch.where((size > 0) & size.isfinite(), size, torch.ones_like(size))
    autocovariance = _autocovariance(chains)
    mean_var = autocovariance[:, 0].mean(0) * n / (n - 1)
    var_plus = mean_var * (n - 1) / n
    if c > 1:
        var_plus = var_plus + chains.mean(1).var(0)
    rho = 1 - (mean_var - autocovariance.mean(0)) / var_plus  # [N, E]
    rho[0] = 1
    # iteration k = 1, 2, ... (ArviZ's t = 2k - 1 < N - 3) reads the pair of lags (2k, 2k + 1); it runs while
    # every earlier pair sum, P_0 = 1 + rho_1 included, was positive
    iterations = max(0, math.ceil((n - 2) / 2) - 1)
    lags = 2 * iterations + 2
    padded = torch.cat([rho, rho.new_zeros(max(0, lags - n), e)])[:lags]
    pairs = padded.reshape(iterations + 1, 2, e).sum(1)  # P_0 .. P_iterations
    ran = torch.cumprod((pairs[:iterations] > 0).to(torch.int64), 0).sum(0)  # iterations that ran, [E]
    # lags 0 .. 2 ran - 1 hold the pairs P_0 .. P_{ran-1}, all positive: their running minimum
    monotone = torch.cummin(pairs[:iterations].clamp_min(0), 0).values if iterations else pairs[:0]
    kept = torch.arange(iterations, device=chains.device).unsqueeze(1) < ran
    paired = (monotone * kept).sum(0)
    # then the even lag of the last pair read (lag 2 ran; lag 0, i.e. 1, if none ran), where positive or
    # where that last pair was kept (its sum not negative)
    last_even = padded[2 * ran, torch.arange(e, device=chains.device)]
    last_pair = pairs[ran, torch.arange(e, device=chains.device)]
    extra = torch.where((last_even > 0) | ((ran > 0) & (last_pair >= 0)), last_even, torch.zeros_like(last_even))
    tau = (-1 + 2 * paired + extra).clamp_min(1 / math.log10(total))
    ess = total / tau
    return torch.where(constant, torch.full_like(ess, float(total)), ess)


def _empty(chains: Tensor, flat: Tensor) -> Optional[Tensor]:
    """The diagnostics of a site of no elements (``[C, N, 0]``): an empty ``[*shape]``; None for other sites."""
    return flat.new_empty(chains.shape[2:]) if flat.shape[2] == 0 else None


def _undefined(chains: Tensor, values: Tensor) -> Tensor:
    """``values`` with NaN for the elements equal in every draw (their diagnostics are 0 / 0) and for those with a
    NaN draw: ranks put NaN last, and the diagnostics of the rest looked converged (an all-NaN chain: every draw
    effective)."""
    undefined = (chains == chains[:1, :1]).flatten(0, 1).all(0) | chains.isnan().flatten(0, 1).any(0)
    return values.masked_fill(undefined, math.nan)


def rank_normalize(chains: Tensor) -> Tensor:
    """The normal scores of ``[num_chains, num_draws, *shape]`` draws, per element: ``Phi^-1((r - 3/8) / (S + 1/4))``
    with ``r`` a draw's rank among all ``S`` draws (average ranks for ties). float64, the input's shape.

    Args:
        chains: draws ``[num_chains, num_draws, *shape]``, at least one chain of at least 4 draws (read in
            float64).

    Returns:
        the normal scores, float64, shaped like ``chains``.

    Example:
        >>> z = rank_normalize(torch.tensor([[1.0, 10.0, 100.0, 1000.0]]))
        >>> [round(v, 3) for v in z.flatten().tolist()]
        [-1.049, -0.299, 0.299, 1.049]
    """
    flat = _as_chains("chains", chains)
    return _normal_scores(flat).reshape(chains.shape)


def rank_r_hat(chains: Tensor) -> Tensor:
    """Rank-normalised split R-hat (Vehtari et al. 2021) of ``[num_chains, num_draws, *shape]``: ``[*shape]``.

    ``max(bulk, tail)``: the split R-hat of the draws' normal scores and of the normal scores of their
    distances to the median. Below 1.01 for well-mixed chains. Works with one chain (its two halves).

    Args:
        chains: draws ``[num_chains, num_draws, *shape]``, at least one chain of at least 4 draws (read in
            float64).

    Returns:
        R-hat per element, float64 ``[*shape]`` (NaN for an element equal in every draw or with a NaN draw).

    Example:
        >>> chains = torch.randn(4, 500, generator=torch.Generator().manual_seed(0))
        >>> bool(rank_r_hat(chains) < 1.01)
        True
        >>> bool(rank_r_hat(chains * torch.tensor([[1.0], [1.0], [1.0], [3.0]])) > 1.05)  # one chain 3x wider
        True
    """
    flat = _as_chains("chains", chains)
    if (empty := _empty(chains, flat)) is not None:  # quantile() of nothing raised
        return empty
    split = _split(flat)
    bulk = _r_hat(_normal_scores(split))
    folded = (split - _median(split.flatten(0, 1))).abs()
    tail = _r_hat(_normal_scores(folded))
    # fmax: chains stuck at different values tie every distance to the median (tail R-hat 0 / 0), and the bulk
    # R-hat (infinite) must not be lost to that NaN
    return _undefined(flat, torch.fmax(bulk, tail)).reshape(chains.shape[2:])


def _median(values: Tensor) -> Tensor:
    """numpy's (and ArviZ's) median over dim 0: the mean of the two central values, ``(a + b) / 2``; quantile's
    ``a + (b - a) / 2`` can round to another number, which left the two central draws at distances one rounding
    step apart instead of tied (a rank R-hat 1.1736 where ArviZ 0.23.4's is 1.1539, on 2 chains of 11 draws)."""
    ordered = values.sort(dim=0).values
    middle = ordered.shape[0] // 2
    return ordered[middle] if ordered.shape[0] % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def ess_bulk(chains: Tensor) -> Tensor:
    """Bulk effective sample size (Vehtari et al. 2021) of ``[num_chains, num_draws, *shape]``: ``[*shape]``.

    Stan's ESS of the normal scores of the split chains: how many independent draws would estimate the
    centre of the posterior as well.

    Args:
        chains: draws ``[num_chains, num_draws, *shape]``, at least one chain of at least 4 draws (read in
            float64).

    Returns:
        the bulk ESS per element, float64 ``[*shape]`` (NaN for an element equal in every draw or with a NaN
        draw).

    Example:
        >>> chains = torch.randn(4, 500, generator=torch.Generator().manual_seed(0))
        >>> 1500 < float(ess_bulk(chains)) < 2500
        True
    """
    flat = _as_chains("chains", chains)
    if (empty := _empty(chains, flat)) is not None:  # an FFT of nothing raised
        return empty
    split = _split(flat)
    return _undefined(flat, _ess(_normal_scores(split))).reshape(chains.shape[2:])


def ess_tail(chains: Tensor, probs: Sequence[float] = (0.05, 0.95)) -> Tensor:
    """Tail effective sample size (Vehtari et al. 2021) of ``[num_chains, num_draws, *shape]``: ``[*shape]``.

    The smaller of Stan's ESS of the indicators ``x <= q`` (split chains) at the quantiles ``probs`` of all
    draws (default 5% and 95%): how well the ends of a 90% interval are estimated.

    Args:
        chains: draws ``[num_chains, num_draws, *shape]``, at least one chain of at least 4 draws (read in
            float64).
        probs: the quantile levels, in (0, 1), at least one.

    Returns:
        the tail ESS per element, float64 ``[*shape]`` (NaN for an element equal in every draw or with a NaN
        draw).

    Example:
        >>> chains = torch.randn(4, 500, generator=torch.Generator().manual_seed(0))
        >>> 1000 < float(ess_tail(chains)) < 3000
        True
    """
    flat = _as_chains("chains", chains)
    if isinstance(probs, numbers.Real) or (isinstance(probs, Tensor) and probs.dim() == 0):
        probs = (probs,)  # one level, as PosteriorSummary's quantiles take it ("'float' object is not iterable")
    probs = tuple(float(p) for p in probs)
    if not probs or not all(0 < p < 1 for p in probs):
        raise ValueError(f"probs must be levels in (0, 1), got {probs}")
    if (empty := _empty(chains, flat)) is not None:
        return empty
    levels = flat.flatten(0, 1).quantile(torch.tensor(probs, dtype=torch.float64, device=flat.device), dim=0)  # [P, E]
    ess = torch.stack([_ess(_split((flat <= level).to(torch.float64))) for level in levels]).amin(0)
    return _undefined(flat, ess).reshape(chains.shape[2:])


def ess_mean(chains: Tensor) -> Tensor:
    """Effective sample size of the mean (ArviZ's ``ess(method="mean")``) of ``[num_chains, num_draws, *shape]``:
    ``[*shape]``.

    Stan's ESS of the draws themselves (split chains, Geyer's initial monotone sequence): how many independent
    draws would estimate the posterior mean as well. Unlike :func:`pyro.ops.stats.effective_sample_size`, it is
    at most ``S log10(S)`` for ``S`` draws in all (Pyro's gave 569 for 40 independent draws). An element with a
    NaN or infinite draw gives NaN (it has no mean to estimate).

    Args:
        chains: draws ``[num_chains, num_draws, *shape]``, at least one chain of at least 4 draws (read in
            float64).

    Returns:
        the ESS of the mean per element, float64 ``[*shape]`` (NaN for an element equal in every draw or with
        a NaN or infinite draw).

    Example:
        >>> chains = torch.randn(4, 500, generator=torch.Generator().manual_seed(0))
        >>> 1500 < float(ess_mean(chains)) < 2500
        True
    """
    flat = _as_chains("chains", chains)
    if (empty := _empty(chains, flat)) is not None:
        return empty
    ess = _ess(_split(flat))
    return _undefined(flat, ess.masked_fill(~flat.isfinite().flatten(0, 1).all(0), math.nan)).reshape(chains.shape[2:])
