"""Training-step cost of Bayesian layers against nn.Linear.

Times forward + backward + Adam step of a 784-1200-1200-10 MLP (batch 128) for ``nn.Linear`` and for
``bdl.BayesLinear`` with each estimator and std transform, and prints ms per step and the ratio to
``nn.Linear``. The loss of the Bayesian models is the full ELBO (cross-entropy + KL / N). Adam is timed in
both of PyTorch's CPU implementations: the default (a loop over parameters on CPU) and ``fused=True``,
which is several times faster on CPU and matters more for Bayesian layers (twice the parameters).

    python experiments/benchmark_layers.py [--threads 2] [--steps 30] [--device cpu|cuda]

A benchmark, run on demand (``make bench``), not a test.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import bdl

SIZES = (784, 1200, 1200, 10)


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


def time_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, fused: bool, warmup: int = 5) -> float:
    """Median ms per forward + backward + Adam step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
    num_data = 60_000
    bayesian = any(isinstance(m, bdl.BayesianModule) for m in model.modules())

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nll = F.cross_entropy(model(x), y)
        loss = bdl.elbo_loss(nll, bdl.kl_divergence(model), num_data).loss if bayesian else nll
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times.sort()
    return 1e3 * times[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    sizes = tuple(args.sizes)
    x = torch.randn(args.batch_size, sizes[0], device=device)
    y = torch.randint(0, sizes[-1], (args.batch_size,), device=device)

    variants: dict[str, Callable[[int, int], nn.Module]] = {"nn.Linear": lambda i, o: nn.Linear(i, o)}
    for estimator in ("reparam", "local", "flipout"):
        variants[f"BayesLinear {estimator}"] = lambda i, o, e=estimator: bdl.BayesLinear(i, o, estimator=e)
    variants["BayesLinear reparam softplus"] = lambda i, o: bdl.BayesLinear(i, o, std_transform="softplus")

    print(f"MLP {'-'.join(map(str, sizes))}, batch {args.batch_size}, {device}, {args.threads} threads, median of {args.steps} steps")
    print("ms per forward + backward + Adam step; ratio to nn.Linear with the same optimizer")
    print(f"| {'layer':<30} | {'Adam (default)':>14} | {'ratio':>5} | {'Adam (fused)':>12} | {'ratio':>5} |")
    print(f"|{'-' * 32}|{'-' * 16}|{'-' * 7}|{'-' * 14}|{'-' * 7}|")
    baseline: dict[bool, float] = {}
    for name, layer in variants.items():
        row = f"| {name:<30} |"
        for fused, width in ((False, 14), (True, 12)):
            torch.manual_seed(0)
            model = mlp(layer, sizes).to(device)
            ms = time_steps(model, x, y, args.steps, fused)
            baseline.setdefault(fused, ms)
            row += f" {ms:>{width}.1f} | {ms / baseline[fused]:>5.2f} |"
        print(row)

if __name__ == "__main__":
    main()
