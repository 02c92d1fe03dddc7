"""Speed and memory of bdl's Bayesian linear layer against the peer libraries', in one process, on one MLP.

For an MLP (default 784-1200-1200-10; ``--sizes 64-128-128-10`` for the small one) built from each
library's Bayesian linear layer, with prior N(0, 1) everywhere, measures:

- ms per training step, batch 128: forward + ELBO loss (cross-entropy + KL / N, N = 60,000, the KL
  computed by each library's own function) + backward + Adam step (PyTorch's default Adam, lr 1e-3);
  median of ``--steps`` steps after ``--warmup`` steps. The rows take their steps in turn (one step of
  each model, then again), so that load from other processes on a shared machine hits them alike;
- ms per S=32-sample prediction at batch 1024: the mean predictive probabilities of S stochastic
  forwards under ``torch.no_grad()`` in eval mode, through the same loop for every row (S forwards of the
  model averaging the softmax, as the peers' docs predict): the same work, so the layers are compared;
  median of ``--predict-repeats`` runs (in turn, as above) after one warm-up;
- for bdl's rows also ``bdl.predict(model, x, S)``, what a bdl user calls: it picks the sampling path
  (for ``BayesLinear`` at this batch, a loop of weight draws with the reparameterisation estimator
  whatever the layer's training estimator) and, beyond the mean probabilities, keeps the per-input
  moments behind its uncertainty measures (entropies, mutual information, variance of the predicted
  class), which the peers' loop does not compute;
- the ratio of each to the same MLP with ``nn.Linear`` (for prediction: S forwards of it);
- peak memory above the level at the start of each measurement: the training window holds building the
  model and the optimizer and the warm-up steps, the prediction window the warm-up prediction. CUDA: ``torch.cuda.max_memory_allocated``. CPU: the process's resident
  set high-water mark (``VmHWM``, the same number as ``resource.getrusage(...).ru_maxrss``), reset before
  each measurement through ``/proc/self/clear_refs`` after freeing the previous one (``malloc_trim``),
  minus the resident set at the start. RSS counts pages, not tensors: a delta is approximate, within a
  few MiB, and memory the allocator reuses from an earlier row is not counted again.

Rows (a peer that does not import is listed as "not installed: <reason>"):

- ``bdl.BayesLinear`` with ``estimator="reparam"`` (default), ``"local"`` and ``"flipout"``;
  KL ``bdl.kl_divergence(model)`` (closed form, summed over weights).
- bayesian-torch ``LinearReparameterization`` and ``LinearFlipout``: each layer returns
  ``(out, kl)``; the model sums the layers' KLs (closed form, but each layer's is the *mean* over its
  weights, not the sum).
- blitz ``BayesianLinear`` (prior ``prior_dist=Normal(0, 1)``); KL ``kl_divergence_from_nn(model)``, a
  one-sample Monte Carlo estimate ``log q(w) - log p(w)`` summed over layers.
- torchbnn ``BayesLinear(prior_mu=0, prior_sigma=1, ...)``; KL ``BKLLoss(reduction="sum")`` (closed form).
- torch-uncertainty ``layers.bayesian.BayesLinear`` (``prior_sigma_1=1, prior_pi=1``); loss
  ``torch_uncertainty.losses.ELBOLoss(model, CrossEntropyLoss(), kl_weight=1/N, num_samples=1)``, whose KL
  is a one-sample Monte Carlo estimate averaged over layers.

The KL reductions differ, so the losses are not the same number; the work per step is what is compared
(``experiments/peer_quality.py`` compares what training gives).

    python experiments/benchmark_peers.py [--threads 2] [--steps 20] [--sizes 784-1200-1200-10 64-128-128-10]
                                          [--device cpu|cuda] [--quick]

A benchmark, run on demand, not a test. The peers are optional: ``pip install -e ".[peers]"``.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import importlib.metadata
import math
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bdl
from benchmark_layers import check_counts, check_device, mlp, parse_sizes  # experiments/ is the script's folder, so on sys.path

SIZES = "784-1200-1200-10"
NUM_DATA = 60_000  # the N of the ELBO (an MNIST-sized training set)
PRIOR_STD = 1.0


# ============================================================================ models


class KLSequential(nn.Module):
    """An MLP of bayesian-torch layers, which return ``(out, kl)``: ReLU between layers, the KLs summed.

    ``forward(x)`` returns ``(logits, kl)``; ``forward(x, return_kl=False)`` the logits alone (no KL
    computed), as bayesian-torch's own models do.
    """

    def __init__(self, sizes: tuple[int, ...], layer: Callable[[int, int], nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layer(fan_in, fan_out) for fan_in, fan_out in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: Tensor, return_kl: bool = True) -> Union[Tensor, tuple[Tensor, Tensor]]:
        kl: Union[Tensor, float] = 0.0
        for i, layer in enumerate(self.layers):
            if return_kl:
                x, layer_kl = layer(x)
                kl = kl + layer_kl
            else:
                x = layer(x, return_kl=False)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return (x, kl) if return_kl else x  # type: ignore[return-value]


# ============================================================================ variants
Loss = Callable[[nn.Module, Tensor, Tensor], Tensor]  # (model, x, y) -> scalar loss, forward included
Predict = Callable[[nn.Module, Tensor, int], Tensor]  # (model, x, S) -> mean probabilities [B, C]


@dataclass
class Variant:
    """One row: how to build the MLP, its training loss and its S-sample prediction."""

    name: str
    build: Callable[[tuple[int, ...]], nn.Module]
    loss: Loss
    predict: Predict
    api_predict: Optional[Predict] = None  # bdl's rows: bdl.predict, timed next to the common loop


@dataclass
class Missing:
    """A row with no numbers: its library did not import ("not installed: ...") or its model failed."""

    name: str
    reason: str


def loop_predict(forward: Callable[[nn.Module, Tensor], Tensor]) -> Predict:
    """Mean softmax of S forwards, in eval mode under no_grad: how the peers' docs predict."""

    def run(model: nn.Module, x: Tensor, num_samples: int) -> Tensor:
        model.eval()
        with torch.no_grad():
            probs = F.softmax(forward(model, x), dim=-1)
            for _ in range(num_samples - 1):
                probs += F.softmax(forward(model, x), dim=-1)
        model.train()
        return probs / num_samples

    return run


def plain_forward(model: nn.Module, x: Tensor) -> Tensor:
    return model(x)


def cross_entropy_plus(kl_of: Callable[[nn.Module], Tensor]) -> Loss:
    """``cross_entropy(model(x), y) + kl_of(model) / N`` for layers that return a tensor."""

    def loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(model(x), y) + kl_of(model) / NUM_DATA

    return loss


def bdl_variants() -> list[Variant]:
    def loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return bdl.elbo_loss(F.cross_entropy(model(x), y), bdl.kl_divergence(model), NUM_DATA).loss

    def predict(model: nn.Module, x: Tensor, num_samples: int) -> Tensor:
        return bdl.predict(model, x, num_samples).probs

    return [
        Variant(
            f"bdl BayesLinear {estimator}",
            lambda sizes, e=estimator: mlp(lambda i, o: bdl.BayesLinear(i, o, prior=PRIOR_STD, estimator=e), sizes),
            loss,
            loop_predict(plain_forward),
            predict,
        )
        for estimator in ("reparam", "local", "flipout")
    ]


def bayesian_torch_variants() -> list[Union[Variant, Missing]]:
    names = ("bayesian-torch LinearReparameterization", "bayesian-torch LinearFlipout")
    try:
        from bayesian_torch.layers import LinearFlipout, LinearReparameterization
    except Exception as error:  # noqa: BLE001 - any import failure is reported, not hidden
        return [Missing(name, f"not installed: {reason(error)}") for name in names]

    def loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        logits, kl = model(x)
        return F.cross_entropy(logits, y) + kl / NUM_DATA

    predict = loop_predict(lambda model, x: model(x, return_kl=False))
    return [
        Variant(name, lambda sizes, c=cls: KLSequential(sizes, lambda i, o: c(i, o, prior_mean=0.0, prior_variance=PRIOR_STD**2)), loss, predict)
        for name, cls in zip(names, (LinearReparameterization, LinearFlipout))
    ]


def blitz_variants() -> list[Union[Variant, Missing]]:
    name = "blitz BayesianLinear"
    try:
        from blitz.losses import kl_divergence_from_nn
        from blitz.modules import BayesianLinear
    except Exception as error:  # noqa: BLE001
        return [Missing(name, f"not installed: {reason(error)}")]

    def layer(fan_in: int, fan_out: int) -> nn.Module:
        return BayesianLinear(fan_in, fan_out, prior_dist=torch.distributions.Normal(0.0, PRIOR_STD))

    return [Variant(name, lambda sizes: mlp(layer, sizes), cross_entropy_plus(kl_divergence_from_nn), loop_predict(plain_forward))]


def torchbnn_variants() -> list[Union[Variant, Missing]]:
    name = "torchbnn BayesLinear"
    try:
        import torchbnn
    except Exception as error:  # noqa: BLE001
        return [Missing(name, f"not installed: {reason(error)}")]
    kl_loss = torchbnn.BKLLoss(reduction="sum")

    def layer(fan_in: int, fan_out: int) -> nn.Module:
        return torchbnn.BayesLinear(prior_mu=0.0, prior_sigma=PRIOR_STD, in_features=fan_in, out_features=fan_out)

    return [Variant(name, lambda sizes: mlp(layer, sizes), cross_entropy_plus(kl_loss), loop_predict(plain_forward))]


def torch_uncertainty_variants() -> list[Union[Variant, Missing]]:
    name = "torch-uncertainty BayesLinear"
    try:
        from torch_uncertainty.layers.bayesian import BayesLinear
        from torch_uncertainty.losses import ELBOLoss
    except Exception as error:  # noqa: BLE001
        return [Missing(name, f"not installed: {reason(error)}")]
    elbo = ELBOLoss(None, nn.CrossEntropyLoss(), kl_weight=1 / NUM_DATA, num_samples=1)

    def layer(fan_in: int, fan_out: int) -> nn.Module:
        return BayesLinear(fan_in, fan_out, prior_sigma_1=PRIOR_STD, prior_pi=1.0)

    def loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        if getattr(elbo, "model", None) is not model:
            elbo.set_model(model)
        return elbo(x, y).squeeze()

    return [Variant(name, lambda sizes: mlp(layer, sizes), loss, loop_predict(plain_forward))]


def reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0]


PEERS: list[tuple[str, Callable[[], list[Union[Variant, Missing]]]]] = [  # (PyPI distribution, its rows)
    ("bayesian-torch", bayesian_torch_variants),
    ("blitz-bayesian-pytorch", blitz_variants),
    ("torchbnn", torchbnn_variants),
    ("torch-uncertainty", torch_uncertainty_variants),
]


def version(distribution: str) -> str:
    if distribution == "bdl":  # the imported one (a checkout on the path has no installed metadata)
        return bdl.__version__
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# ============================================================================ measurement
class PeakMemory:
    """Peak memory in MiB above the level at ``__enter__`` (see the module docstring for the CPU caveats)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib = math.nan
        libc_name = ctypes.util.find_library("c")
        self._libc = ctypes.CDLL(libc_name) if libc_name and sys.platform.startswith("linux") else None
        self.can_reset = device.type == "cuda" or self._reset_high_water_mark()

    def describe(self) -> str:
        if self.device.type == "cuda":
            return "peak MiB: torch.cuda.max_memory_allocated above the allocation at the start"
        if self.can_reset:
            return ("peak MiB: process RSS high-water mark (VmHWM = getrusage ru_maxrss), reset per measurement "
                    "via /proc/self/clear_refs, minus RSS at the start; approximate (pages, allocator reuse)")
        return ("peak MiB: getrusage ru_maxrss delta, which could not be reset here: a measurement that stays "
                "below an earlier peak reads 0")

    def _reset_high_water_mark(self) -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _max_rss_bytes() -> int:
        max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max_rss if sys.platform == "darwin" else 1024 * max_rss

    @staticmethod
    def _rss_bytes() -> Optional[int]:
        try:
            with open("/proc/self/statm") as statm:
                return int(statm.read().split()[1]) * resource.getpagesize()
        except OSError:
            return None

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        if self._libc is not None:
            self._libc.malloc_trim(0)  # hand freed pages back, so that this measurement counts its own
        if self.can_reset:
            self._reset_high_water_mark()
        rss = self._rss_bytes() if self.can_reset else None
        self._start = rss if rss is not None else self._max_rss_bytes()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = self._max_rss_bytes()
        self.mib = max(0, peak - self._start) / 2**20


def timed_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock ms of one call of ``fn`` (synchronising CUDA before and after)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 1e3 * (time.perf_counter() - start)


@dataclass
class Row:
    """A built model and what was measured on it."""

    variant: Variant
    train_step: Callable[[], None]
    predict: Callable[[], object]
    api_predict: Optional[Callable[[], object]] = None
    model: Optional[nn.Module] = None
    train_mib: float = math.nan
    predict_mib: float = math.nan
    api_predict_mib: float = math.nan
    train_ms: list[float] = field(default_factory=list)
    predict_ms: list[float] = field(default_factory=list)
    api_predict_ms: list[float] = field(default_factory=list)
    error: Optional[str] = None  # set when a step or a prediction raised: the row is reported as failed

    def run(self, fn: Callable[[], object], device: torch.device) -> float:
        """``timed_ms(fn)``, or NaN with ``error`` set if ``fn`` raises (a peer that breaks is a row, not a crash)."""
        try:
            return timed_ms(fn, device)
        except Exception as error:  # noqa: BLE001
            self.error = f"failed: {reason(error)}"
            return math.nan


def build_row(variant: Variant, sizes: tuple[int, ...], args: argparse.Namespace, device: torch.device) -> Row:
    """Build the model and its optimizer and run the warm-up steps, measuring the peak memory of all that."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, sizes[0], generator=generator).to(device)
    y = torch.randint(0, sizes[-1], (args.batch_size,), generator=generator).to(device)
    x_predict = torch.randn(args.predict_batch_size, sizes[0], generator=generator).to(device)
    torch.manual_seed(0)
    memory = PeakMemory(device)
    with memory:
        model = variant.build(sizes).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def train_step() -> None:
            optimizer.zero_grad(set_to_none=True)
            variant.loss(model, x, y).backward()
            optimizer.step()

        for _ in range(args.warmup):
            train_step()
    api_predict = variant.api_predict
    return Row(
        variant,
        train_step,
        lambda: variant.predict(model, x_predict, args.num_samples),
        None if api_predict is None else lambda: api_predict(model, x_predict, args.num_samples),
        model=model,
        train_mib=memory.mib,
    )


def forget_prediction_buffers(model: Optional[nn.Module]) -> None:
    """Drop what bdl's layers keep between predictions (sample buffers, stds), so that each prediction's memory
    window pays for its own: the reparam row's loop left buffers that its bdl.predict reused, where the local and
    flipout rows' bdl.predict allocated them (9 MiB apart for the same work)."""
    for module in [] if model is None else model.modules():
        cache = getattr(module, "_std_cache", None)
        if isinstance(cache, dict):
            cache.clear()


def measure(variants: list[Variant], sizes: tuple[int, ...], args: argparse.Namespace, device: torch.device) -> list[Union[Row, Missing]]:
    """Memory per variant, then times round-robin: one training step of each variant in turn, ``--steps`` times
    (then the predictions likewise), so that load from other processes hits every row alike."""
    rows: list[Union[Row, Missing]] = []
    for variant in variants:
        try:
            rows.append(build_row(variant, sizes, args, device))
        except Exception as error:  # noqa: BLE001 - a peer that breaks is a row, not a crash
            rows.append(Missing(variant.name, f"failed: {reason(error)}"))
    built = [row for row in rows if isinstance(row, Row)]
    for _ in range(args.steps):
        for row in built:
            if row.error is None:
                row.train_ms.append(row.run(row.train_step, device))
    for row in built:
        for kind in ("predict", "api_predict"):
            predict = getattr(row, kind)
            if predict is None:
                continue
            forget_prediction_buffers(row.model)
            memory = PeakMemory(device)
            with memory:
                if row.error is None:
                    row.run(predict, device)  # the warm-up
            setattr(row, f"{kind}_mib", memory.mib)
    for _ in range(args.predict_repeats):
        for row in built:
            for predict, times in ((row.predict, row.predict_ms), (row.api_predict, row.api_predict_ms)):
                if predict is not None and row.error is None:
                    times.append(row.run(predict, device))
    return [Missing(row.variant.name, row.error) if isinstance(row, Row) and row.error else row for row in rows]


# ============================================================================ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed training steps first")
    parser.add_argument("--predict-repeats", type=int, default=5, help="timed predictions (median reported)")
    parser.add_argument("--sizes", type=parse_sizes, nargs="+", default=[parse_sizes(SIZES)],
                        help="MLP widths, e.g. 784-1200-1200-10 64-128-128-10")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch")
    parser.add_argument("--predict-batch-size", type=int, default=1024)
    parser.add_argument("--num-samples", type=int, default=32, help="Monte Carlo samples S per prediction")
    parser.add_argument("--quick", action="store_true", help="tiny MLP, 2 steps: checks that the script runs")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.steps, args.warmup, args.predict_repeats = [(16, 32, 32, 4)], 2, 1, 1
        args.batch_size, args.predict_batch_size, args.num_samples = 8, 16, 4
    check_counts(parser, args, positive=("threads", "steps", "predict_repeats", "batch_size", "predict_batch_size", "num_samples"),
                 non_negative=("warmup",))  # fmt: skip
    check_device(parser, args)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    variants: list[Union[Variant, Missing]] = [
        Variant("nn.Linear", lambda sizes: mlp(nn.Linear, sizes), lambda m, x, y: F.cross_entropy(m(x), y), loop_predict(plain_forward))
    ]
    variants += bdl_variants()
    for _, load in PEERS:
        variants += load()

    versions = ", ".join(f"{distribution} {version(distribution)}" for distribution in ("torch", "bdl", *(d for d, _ in PEERS)))
    print(f"versions: {versions}")
    print(f"{device}, {args.threads} threads; training: batch {args.batch_size}, median of {args.steps} steps after "
          f"{args.warmup}, rows in turn; prediction: S={args.num_samples} at batch {args.predict_batch_size}, median of "
          f"{args.predict_repeats}")
    print("train: ms per forward + ELBO loss (own KL) + backward + Adam step; predict: ms per S-sample prediction, "
          "a loop of S forwards averaging the softmax for every row; bdl.predict: the same with bdl's API (sampling "
          "path of its choice, uncertainty summaries too); ratios to nn.Linear (prediction: S forwards of it)")
    print(PeakMemory(device).describe())
    # an untimed tiny pass first: the first optimizer step imports torch._dynamo (2 s, 150 MiB) and
    # libraries initialise lazily; the first row measured would be charged for it
    tiny = argparse.Namespace(**{**vars(args), "steps": 1, "warmup": 1, "predict_repeats": 1, "batch_size": 2,
                                 "predict_batch_size": 2, "num_samples": 2})
    measure([v for v in variants if isinstance(v, Variant)], (4, 8, 2), tiny, device)
    for sizes in args.sizes:
        print(f"\nMLP {'-'.join(map(str, sizes))}, prior N(0, 1)\n")
        print(f"| {'layer':<40} | {'train ms':>9} | {'ratio':>5} | {'predict ms':>10} | {'ratio':>5} | "
              f"{'bdl.predict ms':>14} | {'ratio':>5} | {'train MiB':>9} | {'predict MiB':>11} | {'bdl.predict MiB':>15} |")
        print(f"|{'-' * 42}|{'-' * 11}|{'-' * 7}|{'-' * 12}|{'-' * 7}|{'-' * 16}|{'-' * 7}|{'-' * 11}|{'-' * 13}|{'-' * 17}|")
        measured = iter(measure([v for v in variants if isinstance(v, Variant)], sizes, args, device))
        baseline: Optional[tuple[float, float]] = None
        for variant in variants:
            row = variant if isinstance(variant, Missing) else next(measured)
            if isinstance(row, Missing):
                print(f"| {row.name:<40} | {row.reason} | | | | | | | | |")
                continue
            train_ms, predict_ms = statistics.median(row.train_ms), statistics.median(row.predict_ms)
            baseline = baseline or (train_ms, predict_ms)
            api = ("-", "-", "-")
            if row.api_predict_ms:
                api_ms = statistics.median(row.api_predict_ms)
                api = (f"{api_ms:.2f}", f"{api_ms / baseline[1]:.2f}", f"{row.api_predict_mib:.1f}")
            print(f"| {row.variant.name:<40} | {train_ms:>9.2f} | {train_ms / baseline[0]:>5.2f} | "
                  f"{predict_ms:>10.2f} | {predict_ms / baseline[1]:>5.2f} | {api[0]:>14} | {api[1]:>5} | "
                  f"{row.train_mib:>9.1f} | {row.predict_mib:>11.1f} | {api[2]:>15} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
