"""The maths of mean-field Gaussian layers, as small functions the layer classes call.

Every estimator takes the layer's deterministic operation ``op(x, weight, bias)`` (``F.linear`` or a
convolution with its stride/padding bound) and the weight's and bias' posteriors as :class:`GaussianWeights`
(which, in a training forward, also compute the KL in the same autograd node), and returns the
pre-activations of one Monte Carlo draw.

- ``reparameterized``: one weight sample ``w = mu + std * eps`` per call, shared by the whole batch
  (Kingma & Welling 2014; Blundell et al. 2015).
- ``local_reparameterized``: samples the pre-activations from their Gaussian,
  ``mean = op(x, mu)``, ``var = op(x^2, std^2)``, ``out = mean + sqrt(var) * eps``; every example gets
  independent noise (Kingma, Salimans & Welling 2015). Exact for linear layers; for convolutions it
  treats output positions as independent, which matches the marginal of every output element.
- ``flipout``: one weight perturbation per call, decorrelated across examples by random signs,
  ``out = op(x, mu) + op(x * r, std * eps) * s`` (Wen et al. 2018).

All three give each output element the same mean and variance; they differ in the correlations
between examples and in the variance of the gradients.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

Op = Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]

_HALF_LOG_TWO_PI = 0.5 * math.log(2 * math.pi)

STD_TRANSFORMS = ("exp", "softplus")


def _check_transform(transform: str) -> None:
    if transform not in STD_TRANSFORMS:  # anything else was taken for softplus
        raise ValueError(f"std_transform must be one of {list(STD_TRANSFORMS)}, got {transform!r}")


def std_from_rho(rho: Tensor, transform: str = "exp") -> tuple[Tensor, Tensor]:
    """Posterior standard deviation and its log from the unconstrained parameter ``rho``.

    ``"exp"``: ``std = exp(rho)``, so ``log std = rho`` comes for free.
    ``"softplus"``: ``std = log(1 + exp(rho))`` (Blundell et al. 2015).
    Both describe the same family of Gaussians; for small scales (``rho << 0``) they coincide,
    ``softplus(rho) ~ exp(rho)``, and ``exp`` costs a fraction of ``softplus`` and its backward.

    Returns:
        ``(std, log_std)``, both shaped like ``rho``.
    """
    if transform == "exp":
        return rho.exp(), rho
    _check_transform(transform)  # Prior.posterior_kl(mu, rho, "Exp") took softplus's stds
    std = F.softplus(rho)
    return std, std.log()


def rho_from_std(std: float | Tensor, transform: str = "exp") -> Tensor:
    """Inverse of :func:`std_from_rho`: the ``rho`` that gives standard deviation ``std``."""
    std = torch.as_tensor(std)
    if transform == "exp":
        return std.log()
    _check_transform(transform)
    return std + (-std).expm1().neg().log()  # softplus^{-1}(s) = log(exp(s) - 1) = s + log(1 - exp(-s))


def rho_value(std: float, transform: str = "exp") -> float:
    """:func:`rho_from_std` of one number, as a Python float (computed in double precision, on no device)."""
    if transform == "exp":
        return math.log(std)
    _check_transform(transform)
    return std + math.log(-math.expm1(-std))


def kl_normal_normal(
    loc: Tensor,
    std: Tensor,
    prior_loc: float | Tensor,
    prior_std: float | Tensor,
    log_std: Optional[Tensor] = None,
) -> Tensor:
    """``KL(N(loc, std^2) || N(prior_loc, prior_std^2))`` summed over all elements.

    ``KL = log(s0 / s) + (s^2 + (m - m0)^2) / (2 s0^2) - 1/2`` per element.
    The sums of squares are ``square().sum()``, not ``torch.dot``: CPU BLAS's float32 dot adds in sequence, 5e-4 off
    for a million equal stds, which the KL's cancelling terms made 5% of a layer's KL.

    Args:
        loc, std: posterior means and standard deviations, any shape.
        prior_loc, prior_std: prior mean and standard deviation, floats or tensors broadcastable to ``loc``.
        log_std: ``log(std)`` if already known (saves a pass).

    Returns:
        A scalar tensor.
    """
    if log_std is None:
        log_std = std.log()
    if isinstance(prior_loc, Tensor) or isinstance(prior_std, Tensor):
        prior_std = torch.as_tensor(prior_std, dtype=loc.dtype, device=loc.device)
        kl = (
            prior_std.log()
            - log_std
            + (std.square() + (loc - prior_loc).square()) / (2 * prior_std.square())
            - 0.5
        )
        return kl.sum()
    centred = loc if prior_loc == 0 else loc - prior_loc
    quadratic = std.square().sum() + centred.square().sum()
    return quadratic / (2 * prior_std**2) - log_std.sum() + loc.numel() * (math.log(prior_std) - 0.5)


class _KLNormalExp(torch.autograd.Function):
    """Summed ``KL(N(mu, exp(rho)^2) || N(m0, s0^2))`` for scalar ``m0, s0``, with a hand-written backward.

    ``KL = sum(exp(2 rho) + (mu - m0)^2) / (2 s0^2) - sum(rho) + n (log s0 - 1/2)``;
    ``dKL/dmu = (mu - m0) / s0^2`` and ``dKL/drho = exp(2 rho) / s0^2 - 1``: one pass each.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(mu: Tensor, rho: Tensor, prior_loc: float, prior_scale: float) -> Tensor:
        var = (2 * rho).exp()
        centred = mu if prior_loc == 0 else mu - prior_loc
        quadratic = var.sum() + centred.square().sum()  # not torch.dot: see kl_normal_normal
        kl = quadratic / (2 * prior_scale**2) - rho.sum() + mu.numel() * (math.log(prior_scale) - 0.5)
        return kl, var

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[no-untyped-def]
        mu, rho, ctx.prior_loc, ctx.prior_scale = inputs
        ctx.save_for_backward(mu, output[1], rho)
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad: Tensor, _):  # type: ignore[no-untyped-def]
        mu, var, rho = ctx.saved_tensors
        # create_graph=True, or an eager forward-over-reverse (a dual level): var, computed without a graph or a
        # tangent, again from rho (its curvature in rho was left out of an eager Hessian-vector product)
        if torch.is_grad_enabled() or forward_ad_active():
            var = (2 * rho).exp()
        scale = grad / ctx.prior_scale**2
        centred = mu if ctx.prior_loc == 0 else mu - ctx.prior_loc
        return centred * scale, torch.addcmul(-grad, var, scale), None, None


class _KLNormalExpWithJvp(_KLNormalExp):
    """:class:`_KLNormalExp` with a forward-mode rule (``torch.func.jvp``, ``jacfwd``, ``hessian``), which raised
    NotImplementedError; a class of its own, as torch.compile cannot trace a Function that defines ``jvp``."""

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[no-untyped-def]
        _KLNormalExp.setup_context(ctx, inputs, output)
        # the backward's tensors, all of them: other ones broke the vmap rule of its backward ("flat_bdims")
        ctx.save_for_forward(inputs[0], output[1], inputs[1])

    @staticmethod
    def jvp(ctx, mu_tangent: Optional[Tensor], rho_tangent: Optional[Tensor], *_):  # type: ignore[no-untyped-def]
        """The backward's gradients dotted with the tangents."""
        mu, var, _ = ctx.saved_tensors
        tangent = torch.zeros((), dtype=mu.dtype, device=mu.device)
        if mu_tangent is not None:
            tangent = tangent + ((mu if ctx.prior_loc == 0 else mu - ctx.prior_loc) * mu_tangent).sum() / ctx.prior_scale**2
        if rho_tangent is not None:
            tangent = tangent + ((var / ctx.prior_scale**2 - 1) * rho_tangent).sum()
        return tangent, None


def forward_ad_active() -> bool:
    """Whether an eager ``torch.autograd.forward_ad.dual_level`` is open (tensors may carry tangents)."""
    return getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0


def _forward_ad_possible(t: Tensor) -> bool:
    """Whether a forward-mode derivative may pass through ``t``: inside a torch.func transform or an eager
    ``forward_ad.dual_level`` (not while torch.compile traces)."""
    return not torch.compiler.is_compiling() and (_in_functorch(t) or forward_ad_active())


def kl_normal_normal_exp(mu: Tensor, rho: Tensor, prior_loc: float, prior_scale: float) -> Tensor:
    """:func:`kl_normal_normal` for a posterior ``N(mu, exp(rho)^2)`` and a scalar prior, fused."""
    function = _KLNormalExpWithJvp if _forward_ad_possible(mu) else _KLNormalExp
    return function.apply(mu, rho, float(prior_loc), float(prior_scale))[0]


def normal_log_prob(value: Tensor, loc: float | Tensor, std: float | Tensor) -> Tensor:
    """Elementwise log density of ``N(loc, std^2)`` at ``value``."""
    std = torch.as_tensor(std, dtype=value.dtype, device=value.device)
    return -0.5 * ((value - loc) / std).square() - std.log() - _HALF_LOG_TWO_PI


# CPU normal_ is sequential (one Mersenne-Twister stream, ~7 ns a number here) and dominates the cost of
# sampling large weight matrices; chunks filled from independent generators on other threads divide it, but
# only on cores that torch's intra-op threads leave free: after every parallel op torch's OpenMP workers spin
# on their cores for a while, waiting for the next one, and a fill thread there shares a core with a spinner.
# On the 2-core development VM, torch on 2 threads, alternating in one process (two processes): a 32-sample
# prediction of the 784-1200-1200-10 MLP at batch 1024 took 2288 / 2458 ms with a fill thread against
# 1929 / 2326 ms with torch's normal_ alone, MC dropout of 64-128-128-10 91.5 / 110 against 76.4 / 99.5 ms,
# and a training step was no faster (75 / 84 against 78 / 81 ms). With torch on 1 thread, a prototype's fill
# thread on the spare core gained (the same prediction 3295 against 3524 ms; batch 64: 260 against 280 ms),
# but the chunks stay one per torch thread (with one, torch's generator alone), so that a draw does not
# depend on the machine's core count.
_PARALLEL_NOISE_MIN_NUMEL = 1 << 17  # below, handing chunks to threads costs more than it saves
_MAX_FILL_THREADS = 8  # the calling thread and up to 7 helpers
_pools: dict[int, ThreadPoolExecutor] = {}  # by number of helper threads, for the process in _pools_pid
_pools_pid = -1
_cores: tuple[int, int] = (-1, 0)


def _available_cores() -> int:
    """CPU cores this process may run on (its affinity mask), looked up once per process."""
    global _cores
    if _cores[0] != os.getpid():
        count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        _cores = (os.getpid(), count)
    return _cores[1]


def _fill_helpers() -> int:
    """Threads besides the caller that may fill noise: the cores torch's intra-op threads leave spare.

    None where ``OMP_NUM_THREADS`` is set: then the process's thread budget was chosen for it, e.g. by
    Lightning's DDP and torchrun, which split a machine's cores between the processes they start.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return 0
    return max(0, min(_available_cores() - torch.get_num_threads(), _MAX_FILL_THREADS - 1))


def _noise_pool(helpers: int) -> ThreadPoolExecutor:
    global _pools, _pools_pid
    if _pools_pid != os.getpid():  # a forked child (DataLoader worker) needs its own threads
        _pools, _pools_pid = {}, os.getpid()
    pool = _pools.get(helpers)
    if pool is None:  # kept, not shut down: another thread may be filling with it
        pool = _pools.setdefault(helpers, ThreadPoolExecutor(max_workers=helpers, thread_name_prefix="bdl-noise"))
    return pool


def _in_functorch(t: Tensor) -> bool:
    """Whether ``t`` is a torch.func tensor or the code runs inside a torch.func transform (a DeepEnsemble's
    vmap): there, fresh tensors are not batched, and in-place random fills of them are refused (vmap's
    ``randomness="different"``), as are ``out=`` arguments."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t) or torch._C._functorch.peek_interpreter_stack() is not None


def _threaded_fill(t: Tensor, fill: Callable[[Tensor, torch.Generator], object], out: Optional[Tensor] = None) -> Optional[Tensor]:
    """A tensor like ``t`` (or ``out``, a contiguous tensor of its shape) filled chunk by chunk by
    ``fill(chunk, generator)``, one chunk per intra-op thread of torch, or None.

    Each chunk gets its own generator seeded from the global one, so the result is reproducible under
    ``torch.manual_seed`` for a given ``torch.get_num_threads()``, however many threads fill the chunks:
    the caller and one helper per core that torch's threads leave spare (see :func:`_fill_helpers`), or the
    caller alone. None (draw with torch's generator) where chunks cannot be used: accelerators, one intra-op
    thread, small tensors, and inside ``torch.compile``, ``torch.func`` transforms or ``torch.jit.trace``.
    """
    # the size first (the cheapest test, and most tensors fail it), then torch.compile before get_num_threads
    # (an int from a torch.* call would break its graph)
    # (nor where torch.jit.trace records it: the chunks' seeds, drawn as Python ints, became constants of the trace)
    if t.numel() < _PARALLEL_NOISE_MIN_NUMEL or torch.compiler.is_compiling() or t.device.type != "cpu" or torch.jit.is_tracing():
        return None
    threads = torch.get_num_threads()
    if threads < 2 or _in_functorch(t):
        return None
    if out is None:
        out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    chunks = out.view(-1).chunk(threads)
    seeds = torch.randint(0, 2**62, (len(chunks),)).tolist()
    inference = torch.is_inference_mode_enabled()  # thread-local: the workers must match the caller

    def run(chunk: Tensor, seed: int) -> None:
        with torch.inference_mode(inference):
            fill(chunk, torch.Generator().manual_seed(seed))

    helpers = min(_fill_helpers(), len(chunks) - 1)
    if not helpers:  # every chunk on the calling thread: the numbers helpers would draw
        for chunk, seed in zip(chunks, seeds):
            run(chunk, seed)
        return out
    # the calling thread fills the first chunk itself: one thread fewer competing for the cores
    pool = _noise_pool(helpers)
    pending = [pool.submit(run, chunk, seed) for chunk, seed in zip(chunks[1:], seeds[1:])]
    run(chunks[0], seeds[0])
    for future in pending:
        future.result()
    return out


def randn_like(t: Tensor) -> Tensor:
    """``torch.randn_like(t)``, for large CPU tensors in chunks that several threads fill where cores are spare.

    Each chunk comes from its own generator seeded from the global generator, so results are
    reproducible under ``torch.manual_seed`` (for a given number of torch threads) and the draws are
    independent standard normals. Falls back to ``torch.randn_like`` on accelerators, small tensors, one
    intra-op thread, and inside ``torch.compile`` or ``torch.func`` transforms.
    """
    out = _threaded_fill(t, lambda chunk, generator: chunk.normal_(generator=generator))
    return torch.randn_like(t) if out is None else out


def _normal_(t: Tensor) -> Tensor:
    """Fill the contiguous ``t`` with standard normals in place: the values ``randn_like(t)`` would draw."""
    if _threaded_fill(t, lambda chunk, generator: chunk.normal_(generator=generator), out=t) is None:
        t.normal_()
    return t


def rand_like(t: Tensor) -> Tensor:
    """``torch.rand_like(t)`` (uniform on [0, 1)), filled by several threads where :func:`randn_like` would be."""
    out = _threaded_fill(t, lambda chunk, generator: chunk.uniform_(generator=generator))
    return torch.rand_like(t) if out is None else out


def random_bits(count: int) -> Tensor:
    """``count`` int64 words of 64 independent fair random bits each, on the CPU (threads as :func:`randn_like`).

    Every bit of every word is used: ``random_(-2**63, None)`` draws the whole 64-bit range from one
    generator call, where ``torch.rand`` spends a call (~5-7 ns here) on each 24-bit float. Reproducible
    under ``torch.manual_seed`` as :func:`randn_like`.
    """
    words = torch.empty(count, dtype=torch.int64, device="cpu")
    out = _threaded_fill(words, lambda chunk, generator: chunk.random_(-(2**63), None, generator=generator))
    return words.random_(-(2**63), None) if out is None else out


_MASK_LEVELS = 1 << 16  # dropout masks compare 16 random bits per element


def _two_class(logits: Tensor) -> Tensor:
    """Logits ``[..., 1]`` (a binary classifier's log-odds of class 1, as ``BCEWithLogitsLoss`` trains them) as
    two-class logits ``(-l/2, l/2)``, whose softmax is ``(1 - sigmoid(l), sigmoid(l))`` (a softmax of the one
    column gave every input probability 1 and no uncertainty). Symmetric, so the logit-based OOD scores (energy,
    max logit) depend on ``|l|`` only: with ``(0, l)`` they measured how much an input looked like class 0, and
    swapping the labels moved their AUROC from 0.53 to 0.47. The softmax is bit for bit ``(0, l)``'s (both are
    ``(-l, 0)`` or ``(0, -l)`` after subtracting the larger). Other logits as they are."""
    if logits.shape[-1] != 1:
        return logits
    half = logits / 2
    return torch.cat([-half, half], dim=-1)


def dropout(input: Tensor, p: float = 0.5) -> Tensor:
    """Inverted dropout that is always on: ``input * m / (1 - p)`` with ``m ~ Bernoulli(1 - p)`` per element.

    The distribution of ``F.dropout(input, p, training=True)``. On CPU each element's mask comes from 16
    random bits (four elements per 64-bit generator call, :func:`random_bits`): an element is kept when
    its 16 bits, as an integer ``v`` in ``[0, 2^16)``, are at least ``round(p * 2^16)``, so the drop rate
    is ``p`` rounded to a multiple of ``2^-16`` (torch's own CPU Bernoulli rounds to ``2^-24``), and the
    kept fraction is within ``1e-4`` (relative) of ``1 - p`` (else, as for some rates above 0.92, it is
    ``F.dropout``, which keeps the mean unbiased). The mask
    is then formed with float arithmetic only, ``clamp((v - t + 1) / (1 - p), 0, 1 / (1 - p))``. For a
    32768x128 tensor, torch on 2 threads and the random numbers from one (fastest of 25, interleaved, on the
    2-core development VM): 18 ms against 32 ms for comparing uniforms from :func:`rand_like` (1024x128: 0.52
    against 1.27 ms) and 57 ms for ``F.dropout``, whose Bernoulli mask takes one generator call per element.
    On accelerators it is ``F.dropout`` (one fused kernel there), and so it is under ``torch.compile``,
    ``torch.func`` transforms and ``torch.jit.trace``. :class:`bdl.MCDropout` uses it for its
    ``nn.Dropout`` layers. Differentiable in ``input``.

    Example:
        >>> x = torch.ones(1000)
        >>> y = bdl.nn.functional.dropout(x, 0.2)
        >>> sorted(set(y.tolist())), abs(float((y == 0).float().mean()) - 0.2) < 0.05
        ([0.0, 1.25], True)
    """
    if not 0 <= p < 1:
        if p == 1:
            return input * 0
        raise ValueError(f"p must be a dropout rate in [0, 1], got {p!r}")
    if not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got dtype {input.dtype}")
    if p == 0:
        return input
    # compiled graphs, torch.func transforms and jit traces have no op for the bit-packed mask's int16 view
    dropped = round(p * _MASK_LEVELS)
    # a keep rate 2^-16 rounds far from 1 - p (p near 1: 0.99999 kept 1/65536 of the elements, scaled by 1e5, a
    # mean of 1.53; from 1 - 2^-17 none) would bias the mean: torch's Bernoulli there
    rounded = abs((_MASK_LEVELS - dropped) / _MASK_LEVELS - (1 - p)) > 1e-4 * (1 - p)
    if input.device.type != "cpu" or rounded or torch.compiler.is_compiling() or _in_functorch(input) or torch.jit.is_tracing():
        return F.dropout(input, p, training=True)
    n = input.numel()
    lanes = random_bits((n + 3) // 4).view(torch.int16)[:n].view(input.shape)  # uniform on [-2^15, 2^15)
    threshold = dropped - _MASK_LEVELS // 2  # keep iff lane >= threshold
    scale = 1 / (1 - p)
    # float32 holds every 16-bit integer exactly (half and bfloat16 do not): the mask in it, then cast
    mask_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    mask = lanes.to(mask_dtype).sub_(threshold - 1).mul_(scale).clamp_(0, scale).to(input.dtype)
    if torch.is_grad_enabled() and input.requires_grad:
        return input * mask
    return mask.mul_(input)  # the mask's memory holds the output: one tensor fewer to allocate


class _ExpScaledNoise(torch.autograd.Function):
    """``exp(rho) * eps`` with ``eps ~ N(0, 1)``; backward ``d/d rho = grad * exp(rho) * eps``.

    Keeping only the scaled noise for the backward saves the passes autograd would spend on
    ``exp`` and ``mul`` separately (the weight-sized elementwise work dominates small-batch steps).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(rho: Tensor) -> Tensor:
        return randn_like(rho).mul_(rho.exp())

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[no-untyped-def]
        (noise,) = ctx.saved_tensors
        return grad * noise


class _ExpScaledNoiseWithJvp(_ExpScaledNoise):
    """:class:`_ExpScaledNoise` with a forward-mode rule, ``tangent * exp(rho) * eps`` (see :class:`_KLNormalExpWithJvp`)."""

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[no-untyped-def]
        _ExpScaledNoise.setup_context(ctx, inputs, output)
        ctx.save_for_forward(output)

    @staticmethod
    def jvp(ctx, rho_tangent: Tensor) -> Tensor:  # type: ignore[no-untyped-def]
        (noise,) = ctx.saved_tensors
        return rho_tangent * noise


def scaled_noise(rho: Tensor, transform: str = "exp") -> Tensor:
    """A draw of ``std * eps``, ``eps ~ N(0, I)``, with ``std = transform(rho)``; differentiable in ``rho``."""
    if transform == "exp":
        if torch.is_grad_enabled() and rho.requires_grad:
            return (_ExpScaledNoiseWithJvp if _forward_ad_possible(rho) else _ExpScaledNoise).apply(rho)
        return randn_like(rho).mul_(rho.exp())  # prediction: no graph, so no autograd.Function call
    return std_from_rho(rho, transform)[0] * randn_like(rho)


def posterior_variance(rho: Tensor, transform: str = "exp") -> Tensor:
    """``std^2`` with ``std = transform(rho)``; float32 for a float16 ``rho`` (whose stds under 2.4e-4
    have no float16 square)."""
    if rho.dtype == torch.float16:
        rho = rho.float()
    if transform == "exp":
        return (2 * rho).exp()
    return std_from_rho(rho, transform)[0].square()


class _Graph:
    """Whether a backward has gone through a :class:`_GaussianWithKL` node (its saved tensors are then freed)."""

    __slots__ = ("spent",)

    def __init__(self) -> None:
        self.spent = False


class _GaussianWithKL(torch.autograd.Function):
    """What an estimator needs from ``N(mu, exp(rho)^2)``, the summed KL of it to ``N(m0, s0^2)``, and
    ``mu`` itself, as the outputs of one node with one backward.

    ``what`` is ``"sample"`` (``mu + std * eps``), ``"noise"`` (``std * eps``) or ``"variance"``
    (``std^2``); the third output is ``mu`` (a view) for estimators that also use the means. A training
    step needs these and the KL, and all read the same weight-sized tensors: together they share
    ``std = exp(rho)`` and, above all, write each parameter's gradient in one pass, e.g. for a sample
    ``dmu = grad + g (mu - m0) / s0^2`` and ``drho = grad * std * eps + g (std^2 / s0^2 - 1)`` (``g`` the
    KL's gradient), where separate sample and KL nodes cost two passes each plus autograd's
    accumulation of the two. An output that gets no gradient costs nothing in the backward.
    """

    @staticmethod
    def forward(ctx, mu: Tensor, rho: Tensor, what: str, prior_loc: float, prior_scale: float, graph: "_Graph"):  # type: ignore[no-untyped-def]
        if what == "variance":
            var = (2 * rho).exp()
            out, saved, sum_var = var, var, var.sum()
        else:
            std = rho.exp()
            noise = randn_like(rho).mul_(std)
            out, saved, sum_var = (noise + mu if what == "sample" else noise), noise, std.square().sum()
        centred = mu if prior_loc == 0 else mu - prior_loc
        kl = (sum_var + centred.square().sum()) / (2 * prior_scale**2) - rho.sum() + mu.numel() * (math.log(prior_scale) - 0.5)
        ctx.save_for_backward(mu, rho if what == "variance" else std, saved, rho)
        ctx.what, ctx.prior_loc, ctx.prior_scale, ctx.graph = what, prior_loc, prior_scale, graph
        ctx.set_materialize_grads(False)
        return out, kl, mu.view_as(mu)

    @staticmethod
    def backward(ctx, grad: Optional[Tensor], grad_kl: Optional[Tensor], grad_mean: Optional[Tensor]):  # type: ignore[no-untyped-def]
        try:
            mu, std, saved, rho = ctx.saved_tensors
        except RuntimeError as error:  # freed by a backward through the other output (a KL's gradient taken alone)
            if "a second time" not in str(error):  # a tensor modified in place, a checkpoint's error: torch's own words
                raise
            raise RuntimeError(
                "a Bayesian layer's forward was backpropagated already: its weight draw and its KL (bdl.kl_divergence "
                "after a training forward) share one autograd node, which a backward through either frees. Call backward "
                "once on the sum of the terms (an ELBO), or pass retain_graph=True to the first backward "
                "(kl.backward(retain_graph=True), torch.autograd.grad(kl, ..., retain_graph=True))"
            ) from error
        ctx.graph.spent = True
        what = ctx.what
        grad_mu = grad if what == "sample" else None
        if grad_mean is not None:
            grad_mu = grad_mean if grad_mu is None else grad_mu + grad_mean
        if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable in mu and rho
            return _GaussianWithKL._backward_with_graph(ctx, mu, rho, std, saved, grad, grad_mu, grad_kl)
        if grad_kl is None:  # the KL was not part of the loss
            grad_rho = None if grad is None else grad * saved * (2 if what == "variance" else 1)
            return grad_mu, grad_rho, None, None, None, None
        # the KL adds g (mu - m0) / s0^2 to dmu and g (var / s0^2 - 1) to drho; with a 0-dim scale each
        # addcmul is one pass: drho = -g + grad * d(out)/d(rho) + var * g / s0^2
        scale = grad_kl / ctx.prior_scale**2
        centred = mu if ctx.prior_loc == 0 else mu - ctx.prior_loc
        # A weight's incoming gradients are fresh outputs of the op's backward (a matmul or a convolution's)
        # that nothing else reads: on the CPU the weight's gradients are written into them (see _reusable),
        # sparing a weight-sized allocation each (fewer page faults and passes over fresh memory; 2-14% of a
        # step in session 9, experiments/results/benchmark_history.md). A sample's gradient, which is also
        # mu's, is read for rho's before it becomes mu's.
        cpu = std.device.type == "cpu"
        into = grad if cpu and grad is not None and grad is not grad_mu and _reusable(grad, std) else None
        if what == "variance":  # d var / d rho = 2 var
            var = saved
            factor = scale if grad is None else torch.add(scale, grad, alpha=2, out=into)
            grad_rho = torch.addcmul(-grad_kl, var, factor, out=into)
        else:
            grad_rho = -grad_kl.expand_as(std).clone() if grad is None else torch.addcmul(-grad_kl, grad, saved, out=into)
            if cpu:  # var = std^2 without materialising it
                grad_rho.addcmul_(std, std, value=scale.item())
            else:
                grad_rho.addcmul_(std * scale, std)
        if grad_mu is None:
            grad_mu = centred * scale
        elif cpu and grad_mu is not grad_rho and _reusable(grad_mu, mu):
            grad_mu.addcmul_(centred, scale)
        else:
            grad_mu = torch.addcmul(grad_mu, centred, scale)
        return grad_mu, grad_rho, None, None, None, None

    @staticmethod
    def _backward_with_graph(ctx, mu, rho, std, saved, grad, grad_mu, grad_kl):  # type: ignore[no-untyped-def]
        """The backward as differentiable ops of ``mu``, ``rho`` and the incoming gradients (``grad_mu``: the
        data term's share of mu's), for second-order derivatives (e.g. a gradient penalty): the forward's
        ``std``, noise and variance were computed without a graph, so they are recomputed from ``rho`` here,
        with the draw ``eps`` = noise / std held fixed."""
        var = (2 * rho).exp()
        if ctx.what == "variance":
            grad_rho = None if grad is None else 2 * grad * var
        else:
            # the draw, a constant: detached, since the noise a "noise" node saved is its own output
            eps = saved.detach() / std.clamp_min(torch.finfo(std.dtype).tiny)
            grad_rho = None if grad is None else grad * eps * rho.exp()
        if grad_kl is not None:
            scale = grad_kl / ctx.prior_scale**2
            kl_mu = (mu if ctx.prior_loc == 0 else mu - ctx.prior_loc) * scale
            kl_rho = var * scale - grad_kl
            grad_mu = kl_mu if grad_mu is None else grad_mu + kl_mu
            grad_rho = kl_rho if grad_rho is None else grad_rho + kl_rho
        return grad_mu, grad_rho, None, None, None, None


def _reusable(grad: Tensor, like: Tensor) -> bool:
    """Whether an incoming gradient can hold the gradient of the parameter ``like``: only a weight's, always
    a matmul's or convolution's fresh output (a bias's comes from whatever the op does with it, and an add's
    backward, for one, hands its gradient on unchanged), of its shape and dtype, contiguous."""
    return (
        like.dim() >= 2
        and grad.shape == like.shape
        and grad.dtype == like.dtype
        and grad.is_contiguous()
        and not grad.requires_grad
    )


class GaussianWeights:
    """One parameter tensor's mean-field posterior ``N(mu, std^2)``, ``std = transform(rho)``, as the
    estimators use it.

    With ``prior=(m0, s0)`` (a scalar Gaussian prior and ``transform="exp"``) the first draw also
    computes ``KL(q || N(m0, s0^2))`` in the same autograd node (see :class:`_GaussianWithKL`); it is
    then in :attr:`kl` (None otherwise), and :meth:`mean` goes through that node too. Layers keep the
    KL for their ``kl_divergence()``.
    """

    __slots__ = ("mu", "rho", "transform", "prior", "kl", "graph", "_mean", "_variance")

    def __init__(
        self,
        mu: Tensor,
        rho: Tensor,
        transform: str = "exp",
        prior: Optional[tuple[float, float]] = None,
        variance: Optional[Tensor] = None,
    ) -> None:
        self.mu, self.rho, self.transform = mu, rho, transform
        self.prior = prior if transform == "exp" else None
        self.kl: Optional[Tensor] = None
        self.graph = _Graph()
        self._mean = mu
        self._variance = variance  # std^2 computed beforehand (a layer keeps it for S forwards without gradients)

    def _with_kl(self, what: str) -> Optional[Tensor]:
        if self.prior is None or self.kl is not None:
            return None
        out, self.kl, self._mean = _GaussianWithKL.apply(self.mu, self.rho, what, *self.prior, self.graph)
        return out

    def mean(self) -> Tensor:
        """``mu``; call it after the draw, so the KL's gradient joins the mean's in one pass."""
        return self._mean

    def sample(self) -> Tensor:
        """``mu + std * eps``."""
        out = self._with_kl("sample")
        if out is not None:
            return out
        if torch.is_grad_enabled() and (self.mu.requires_grad or self.rho.requires_grad):
            return self.mu + scaled_noise(self.rho, self.transform)
        return scaled_noise(self.rho, self.transform).add_(self.mu)  # no graph: add into the fresh noise

    def noise(self) -> Tensor:
        """``std * eps``."""
        out = self._with_kl("noise")
        return scaled_noise(self.rho, self.transform) if out is None else out

    def variance(self) -> Tensor:
        """``std^2``."""
        out = self._with_kl("variance")
        if out is not None:
            return out
        return posterior_variance(self.rho, self.transform) if self._variance is None else self._variance


def reparameterized(op: Op, x: Tensor, weight: GaussianWeights, bias: Optional[GaussianWeights]) -> Tensor:
    """One weight sample ``w = mu + std * eps`` shared by the batch, then ``op(x, w, b)``."""
    return op(x, weight.sample(), None if bias is None else bias.sample())


def local_reparameterized(op: Op, x: Tensor, weight: GaussianWeights, bias: Optional[GaussianWeights]) -> Tensor:
    """Pre-activations drawn from ``N(op(x, mu), op(x^2, std^2))``, independently per example."""
    var = pre_activation_variance(op, x, weight.variance(), None if bias is None else bias.variance())
    mean = op(x, weight.mean(), None if bias is None else bias.mean())
    return gaussian_draw(mean, var, randn_like(mean))


def _half_precision(x: Tensor, weight_var: Tensor) -> bool:
    """Whether ``op(x^2, var)`` would run in float16 (the tensors' dtype, or autocast's on their device)."""
    if x.dtype == torch.float16 or weight_var.dtype == torch.float16:
        return True
    device = x.device.type
    try:
        return torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16
    except (AttributeError, TypeError, RuntimeError):  # torch < 2.4, or a device type autocast does not know
        return False


def pre_activation_variance(op: Op, x: Tensor, weight_var: Tensor, bias_var: Optional[Tensor]) -> Tensor:
    """``op(x^2, weight_var, bias_var)``: the pre-activations' variance under a Gaussian posterior.

    In float32 where it would be float16 (a ``.half()`` model, or float16 autocast such as Lightning's
    ``16-mixed``): float16 has no numbers below 6e-8 and is coarse below 6e-5, so the variances of a
    posterior with stds under ~1e-2 (std^2 under 1e-4, e.g. a MOPED-initialised model) underflowed, and the
    draw's floor at the smallest normal number gave every such pre-activation a noise std of 7.8e-3 (and
    no gradient to ``rho``); ``x^2`` also overflows float16 above 256. bfloat16 has float32's range.
    """
    if not _half_precision(x, weight_var):
        return op(x.square(), weight_var, bias_var)
    with torch.autocast(x.device.type, enabled=False):
        return op(x.float().square(), weight_var.float(), None if bias_var is None else bias_var.float())


def gaussian_draw(mean: Tensor, var: Tensor, noise: Tensor) -> Tensor:
    """``mean + sqrt(var) * noise``, where ``var`` and ``noise`` are fresh temporaries of the caller.

    The variance is clamped at the smallest positive normal number first: a zero variance (e.g. an
    all-zero input without bias) must not give an infinite gradient. Without a graph the draw is written
    into ``var`` and ``noise``: the same values without two more activation-sized tensors. With it,
    :func:`bdl.predict`'s batched path (32 samples of 64 rows, 2 CPU threads, six processes alternating
    with the code before, median of their 25th percentiles) took 6.7 instead of 8.4 ms for a 64-128-128-10
    MLP and 121 instead of 143 ms for 784-1200-1200-10: on the development VM a fresh page costs ~3 us.
    """
    tiny = torch.finfo(var.dtype).tiny
    if var.dtype != mean.dtype:  # a float32 variance of float16 pre-activations (pre_activation_variance)
        return torch.addcmul(mean, var.clamp_min(tiny).sqrt().to(mean.dtype), noise)
    # torch.func transforms (a DeepEnsemble's vmap) have no batching rule for out= ops; torch.compile fuses
    # the draw itself (and cannot trace the torch.func test); a torch.jit.trace recorded under no_grad replays
    # with gradients, which refuse out=
    if (
        torch.compiler.is_compiling()
        or mean.requires_grad
        or var.requires_grad
        or noise.requires_grad
        or torch.jit.is_tracing()
        or _forward_ad_possible(mean)  # torch.func (vmap, jvp) and forward AD have no rules for out= ops
    ):
        return torch.addcmul(mean, var.clamp_min(tiny).sqrt(), noise)
    return torch.addcmul(mean, var.clamp_min_(tiny).sqrt_(), noise, out=noise)


def _random_signs(t: Tensor, per_channel: bool) -> Tensor:
    """Independent fair ``+-1`` shaped like ``t`` (or ``t.shape[:2] + (1, ...)`` per channel), of ``t``'s dtype."""
    shape = t.shape[:2] + (1,) * (t.dim() - 2) if per_channel else t.shape
    compiling = torch.compiler.is_compiling()  # first: dynamo cannot trace the torch.func test
    transformed = not compiling and _in_functorch(t)
    # (and in a torch.jit.trace, which has no op for the bits' view as int32)
    if t.device.type != "cpu" or compiling or transformed or torch.jit.is_tracing():
        # u < 1/2 for u uniform on [0, 1) in steps of 2^-24 is exactly a fair coin
        # float32 uniforms: bfloat16's are below 1/2 with probability 0.5009 (a float32 one's is exactly 1/2)
        like = t.new_empty(shape, dtype=torch.float32) if t.dtype in (torch.float16, torch.bfloat16) or shape != t.shape else t.detach()
        uniform = rand_like(like)
        if transformed:  # vmap has no batching rule for lt_
            return ((uniform < 0.5).to(uniform.dtype) * 2 - 1).to(t.dtype)
        return uniform.lt_(0.5).mul_(2).sub_(1).to(t.dtype)
    # on CPU every random number costs a generator call (~5-8 ns): unpack the 64 signs of each
    # :func:`random_bits` word instead (128x1200 signs, one thread: 0.3 ms against 1.3 ms with uniforms,
    # 2.8 ms with bernoulli_); the arithmetic shift of int32 keeps bit 31 as the lowest bit of -1 or 0
    n = math.prod(shape)
    words = random_bits((n + 63) // 64).view(torch.int32).view(-1, 1)
    bits = (words >> torch.arange(32, dtype=torch.int32, device=words.device)).bitwise_and_(1).mul_(2).sub_(1)
    return bits.view(-1)[:n].view(shape).to(t.dtype)


def flipout(
    op: Op, x: Tensor, weight: GaussianWeights, bias: Optional[GaussianWeights], per_channel: bool = False
) -> Tensor:
    """Flipout: ``op(x, mu, b) + op(x * r, std * eps) * s`` with random signs ``r``, ``s`` per example.

    ``per_channel=True`` (convolutions) draws one sign per example and channel, so each example sees
    a proper weight perturbation ``dW * (s r^T)`` shared over spatial positions.
    """
    noise = weight.noise()
    mean = op(x, weight.mean(), None if bias is None else bias.sample())
    perturbation = op(x * _random_signs(x, per_channel), noise, None)
    return torch.addcmul(mean, perturbation, _random_signs(perturbation, per_channel))


ESTIMATORS = {
    "reparam": reparameterized,
    "local": local_reparameterized,
    "flipout": flipout,
}


def check_estimator(name: str) -> str:
    """Return ``name`` if it is a known estimator, else raise a ``ValueError`` listing them."""
    if not isinstance(name, str) or name not in ESTIMATORS:  # a list was "unhashable type", naming nothing
        raise ValueError(f"estimator must be one of {sorted(ESTIMATORS)}, got {name!r}")
    return name
