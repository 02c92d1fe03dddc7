"""Training-step cost of Bayesian layers against nn.Linear.

Times forward + backward + Adam step of a 784-1200-1200-10 MLP (batch 128) for ``nn.Linear`` and for
``bdl.BayesLinear`` with each estimator and std transform, and prints ms per step and the ratio to
``nn.Linear``. The loss of the Bayesian models is the full ELBO (cross-entropy + KL / N). Adam is timed in
both of PyTorch's CPU implementations: the default (a loop over parameters on CPU) and ``fused=True``,
which is several times faster on CPU and matters more for Bayesian layers (twice the parameters).

Two protocols. ``isolated`` (default): each layer and optimizer trains in a fresh process of its own, as a
user's one model does, and the processes take turns for ``--rounds`` rounds (the median over rounds of
each process's median step is reported), so that a change in machine load hits every variant alike.
``interleaved``: every model lives in one process and they take one step each in turn; the models then
share the allocator and the caches, which on a machine where fresh pages are expensive (this development
VM takes ~3 us per page fault) changes each variant's time differently: in session 5, interleaved gave
``nn.Linear`` 22.5 ms and Flipout 3.14x, isolated 31.1 ms and 2.92x.

    python experiments/benchmark_layers.py [--threads 2] [--steps 30] [--device cpu|cuda] [--sizes 784-1200-1200-10]
                                           [--protocol isolated|interleaved] [--rounds 3] [--compile]

A benchmark, run on demand (``make bench``), not a test.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import bdl

SIZES = (784, 1200, 1200, 10)


def check_counts(
    parser: argparse.ArgumentParser, args: argparse.Namespace, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()
) -> None:
    """``parser.error`` for an argument (an attribute of ``args``, or each item of a list) below 1 (``positive``) or 0."""
    for names, least in ((positive, 1), (non_negative, 0)):
        for name in names:
            values = getattr(args, name)
            for value in values if isinstance(values, (list, tuple)) else [values]:
                if value < least:
                    parser.error(f"--{name.replace('_', '-')} must be >= {least}, got {value}")


def check_device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``parser.error`` for ``--device cuda`` where no CUDA device is (a traceback from the first tensor moved, or
    every row failed and the run exited 0)."""
    try:
        device = torch.device(args.device)
    except RuntimeError:  # torch's "Expected one of cpu, cuda, ipu, ... device type at start of device string: gpu"
        parser.error(f"--device must be a torch device such as cpu, cuda or cuda:1, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available here")


def parse_sizes(text: str) -> tuple[int, ...]:
    """``"784-1200-1200-10"`` as ``(784, 1200, 1200, 10)``: an argparse ``type`` for MLP layer widths."""
    try:
        sizes = tuple(int(n) for n in text.split("-"))
    except ValueError:
        sizes = ()
    if len(sizes) < 2 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive layer widths joined by '-', e.g. 784-1200-1200-10, got {text!r}")
    return sizes


def network_sizes(parser: argparse.ArgumentParser, tokens: list[str]) -> tuple[int, ...]:
    """One MLP's widths from ``--sizes``, written as the other benchmarks take it (``784-1200-1200-10``) or as
    separate numbers (``784 1200 1200 10``); ``parser.error`` otherwise."""
    if len(tokens) > 1 and not all(token.isdigit() for token in tokens):  # several networks (benchmark_peers' form)
        parser.error(f"--sizes: one network here, as 784-1200-1200-10 or 784 1200 1200 10, got {' '.join(tokens)}")
    text = tokens[0] if len(tokens) == 1 else "-".join(tokens)
    try:
        return parse_sizes(text)
    except argparse.ArgumentTypeError as error:
        parser.error(f"--sizes: {error} (one network here)")


def mlp(layer: Callable[[int, int], nn.Module], sizes: tuple[int, ...] = SIZES, dropout: float = 0.0) -> nn.Sequential:
    """``layer(in, out)`` for each pair of ``sizes`` with ReLU (and ``nn.Dropout(dropout)`` if > 0) between them."""
    modules: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        modules.append(layer(fan_in, fan_out))
        if i < len(sizes) - 2:
            modules.append(nn.ReLU())
            if dropout:
                modules.append(nn.Dropout(dropout))
    return nn.Sequential(*modules)


def training_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, fused: bool, compile_loss: bool = False
) -> Callable[[], None]:
    """One forward + backward + Adam step of ``model`` (the ELBO for Bayesian models, else cross-entropy);
    ``compile_loss``: the loss (forward, KL, and through AOTAutograd the backward) under ``torch.compile``."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
    num_data = 60_000
    bayesian = any(isinstance(m, bdl.BayesianModule) for m in model.modules())

    def objective() -> torch.Tensor:
        nll = F.cross_entropy(model(x), y)
        return bdl.elbo_loss(nll, bdl.kl_divergence(model), num_data).loss if bayesian else nll

    loss_of = torch.compile(objective, fullgraph=True) if compile_loss else objective

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_of().backward()
        optimizer.step()

    return step


def median_ms(steps_by_name: dict[str, Callable[[], None]], steps: int, cuda: bool, warmup: int = 3) -> dict[str, float]:
    """Median ms per step of each training step, measured interleaved (one step of each in turn), so a
    change in machine load affects all of them alike."""
    for step in steps_by_name.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps_by_name}
    for _ in range(steps):
        for name, step in steps_by_name.items():
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}  # the mean of the middle two for an even count


def variants() -> dict[str, Callable[[int, int], nn.Module]]:
    found: dict[str, Callable[[int, int], nn.Module]] = {"nn.Linear": lambda i, o: nn.Linear(i, o)}
    for estimator in ("reparam", "local", "flipout"):
        found[f"BayesLinear {estimator}"] = lambda i, o, e=estimator: bdl.BayesLinear(i, o, estimator=e)
    found["BayesLinear reparam softplus"] = lambda i, o: bdl.BayesLinear(i, o, std_transform="softplus")
    return found


def isolated_ms(args: argparse.Namespace, keys: list[tuple[str, bool]]) -> dict[tuple[str, bool], float]:
    """Median over ``args.rounds`` rounds of the median step of each variant, each run in a process of its own."""
    runs: dict[tuple[str, bool], list[float]] = {key: [] for key in keys}
    for _ in range(args.rounds):
        for name, fused in keys:
            command = [sys.executable, __file__, "--child", name, "--threads", str(args.threads), "--steps",
                       str(args.steps), "--batch-size", str(args.batch_size), "--device", args.device,
                       "--sizes", "-".join(map(str, args.sizes))]
            command += (["--fused"] if fused else []) + (["--compile"] if args.compile else [])
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            runs[name, fused].append(float(result.stdout.split("ms=")[-1]))
    for (name, fused), values in runs.items():
        print(f"rounds, {name}, Adam ({'fused' if fused else 'default'}): " + ", ".join(f"{v:.1f}" for v in values) + " ms")
    return {key: statistics.median(values) for key, values in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", nargs="+", default=["-".join(map(str, SIZES))], help="MLP widths, e.g. 784-1200-1200-10")
    parser.add_argument("--protocol", choices=("isolated", "interleaved"), default="isolated")
    parser.add_argument("--rounds", type=int, default=3, help="isolated protocol: turns of every variant's process")
    parser.add_argument("--variants", nargs="+", default=None, help="only these rows (nn.Linear is always timed)")
    parser.add_argument("--optimizer", choices=("default", "fused", "both"), default="both", help="which Adam to time")
    parser.add_argument("--compile", action="store_true", help="time each loss under torch.compile (first steps compile)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # isolated protocol: time this variant
    parser.add_argument("--fused", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    check_counts(parser, args, positive=("threads", "steps", "batch_size", "rounds"))
    check_device(parser, args)
    args.sizes = network_sizes(parser, args.sizes)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    sizes = tuple(args.sizes)
    x = torch.randn(args.batch_size, sizes[0], device=device)
    y = torch.randint(0, sizes[-1], (args.batch_size,), device=device)
    layers = variants()
    if args.variants:
        unknown = sorted(set(args.variants) - set(layers))
        if unknown:
            parser.error(f"unknown --variants {unknown}; choose from {sorted(layers)}")
        layers = {name: layer for name, layer in layers.items() if name == "nn.Linear" or name in args.variants}
    if args.child is not None:
        step = training_step(mlp(variants()[args.child], sizes).to(device), x, y, args.fused, args.compile)
        print(f"ms={median_ms({args.child: step}, args.steps, device.type == 'cuda')[args.child]}")
        return

    optimizers = {"default": (False,), "fused": (True,), "both": (False, True)}[args.optimizer]
    keys = [(name, fused) for name in layers for fused in optimizers]
    if args.protocol == "isolated":
        ms = isolated_ms(args, keys)
        how = f"each variant in a process of its own, median of {args.steps} steps, median of {args.rounds} rounds"
    else:
        steps = {}
        for name, fused in keys:
            torch.manual_seed(0)
            steps[name, fused] = training_step(mlp(layers[name], sizes).to(device), x, y, fused, args.compile)
        ms = median_ms(steps, args.steps, device.type == "cuda")
        how = f"median of {args.steps} steps, interleaved (one step of each variant in turn, one process)"
    compiled = ", loss under torch.compile" if args.compile else ""
    print(f"MLP {'-'.join(map(str, sizes))}, batch {args.batch_size}, {device}, {args.threads} threads{compiled}, {how}")
    print("ms per forward + backward + Adam step; ratio to nn.Linear with the same optimizer")
    columns = [(fused, width, title) for fused, width, title in ((False, 14, "Adam (default)"), (True, 12, "Adam (fused)"))
               if fused in optimizers]
    print(f"| {'layer':<30} |" + "".join(f" {title:>{width}} | {'ratio':>5} |" for _, width, title in columns))
    print(f"|{'-' * 32}|" + "".join(f"{'-' * (width + 2)}|{'-' * 7}|" for _, width, _ in columns))
    for name in layers:
        row = f"| {name:<30} |"
        for fused, width, _ in columns:
            row += f" {ms[name, fused]:>{width}.1f} | {ms[name, fused] / ms['nn.Linear', fused]:>5.2f} |"
        print(row)


if __name__ == "__main__":
    main()
