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


def training_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, fused: bool) -> Callable[[], None]:
    """One forward + backward + Adam step of ``model`` (the ELBO for Bayesian models, else cross-entropy)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
    num_data = 60_000
    bayesian = any(isinstance(m, bdl.BayesianModule) for m in model.modules())

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nll = F.cross_entropy(model(x), y)
        loss = bdl.elbo_loss(nll, bdl.kl_divergence(model), num_data).loss if bayesian else nll
        loss.backward()
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
    return {name: 1e3 * sorted(t)[len(t) // 2] for name, t in times.items()}


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

    steps = {}
    for name, layer in variants.items():
        for fused in (False, True):
            torch.manual_seed(0)
            steps[name, fused] = training_step(mlp(layer, sizes).to(device), x, y, fused)
    ms = median_ms(steps, args.steps, device.type == "cuda")
    print(f"MLP {'-'.join(map(str, sizes))}, batch {args.batch_size}, {device}, {args.threads} threads, "
          f"median of {args.steps} steps, interleaved (one step of each variant in turn)")
    print("ms per forward + backward + Adam step; ratio to nn.Linear with the same optimizer")
    print(f"| {'layer':<30} | {'Adam (default)':>14} | {'ratio':>5} | {'Adam (fused)':>12} | {'ratio':>5} |")
    print(f"|{'-' * 32}|{'-' * 16}|{'-' * 7}|{'-' * 14}|{'-' * 7}|")
    for name in variants:
        row = f"| {name:<30} |"
        for fused, width in ((False, 14), (True, 12)):
            row += f" {ms[name, fused]:>{width}.1f} | {ms[name, fused] / ms['nn.Linear', fused]:>5.2f} |"
        print(row)


if __name__ == "__main__":
    main()
