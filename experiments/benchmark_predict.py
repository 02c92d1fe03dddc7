"""Cost of ``bdl.predict`` against its floor: S deterministic forwards of the same network.

For MLPs 784-1200-1200-10 and 64-128-128-10 at batch 64 and 1024, times ``bdl.predict(model, x,
num_samples=S)`` (S=32; a 5-member ensemble gives S=5) under every sampling path, and prints ms and the
ratio to the floor: S forwards of the deterministic network (``nn.Linear`` layers, dropout off) under
``torch.no_grad()``, the matmuls every method must do at least once per sample.

- Bayesian MLP (``bdl.BayesLinear``): ``loop`` draws one weight sample per forward (reparameterisation);
  ``batched`` repeats the batch S times with local reparameterisation, computing the first layer's
  pre-activation mean and variance once for all samples.
- MC-dropout MLP (dropout 0.2 after each hidden ReLU): ``loop`` vs ``batched`` (layers before the first
  dropout run once).
- 5-member deep ensemble of plain MLPs: ``loop`` over members vs ``vmap`` (stack_module_state +
  functional_call).

    python experiments/benchmark_predict.py [--threads 2] [--repeats 5] [--device cpu|cuda] [--quick]

A benchmark, run on demand, not a test. Timings are the best of ``--repeats`` round-robin runs after one
warm-up (see :func:`best_ms`): on a machine shared with other processes the minimum is the stable number.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Callable

import torch
from torch import nn

import bdl
from benchmark_layers import check_counts, check_device, mlp, parse_sizes
from bdl.predict import resolve_method

SIZES = ((784, 1200, 1200, 10), (64, 128, 128, 10))
BATCHES = (64, 1024)


def best_ms(candidates: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Fastest of ``repeats`` timed runs of each candidate, after one warm-up run each.

    The candidates run round-robin (floor, then each method, then again) so that load from other
    processes on a shared machine hits them alike, and the minimum is reported: interference only
    ever adds time.
    """
    for fn in candidates.values():
        fn()
    best = {name: math.inf for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best[name], 1e3 * (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--sizes", type=parse_sizes, nargs="+", default=None, help="MLP sizes such as 784-1200-1200-10")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: checks that the script runs")
    args = parser.parse_args()
    check_counts(parser, args, positive=("threads", "repeats", "num_samples", "members", "batches"))
    check_device(parser, args)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes_list: tuple[tuple[int, ...], ...] = SIZES
    batches: tuple[int, ...] = tuple(args.batches)
    if args.sizes:
        sizes_list = tuple(args.sizes)
    num_samples, repeats = args.num_samples, args.repeats
    if args.quick:
        sizes_list, batches, num_samples, repeats = ((16, 32, 32, 4),), (8,), 4, 1

    print(f"bdl.predict, S={num_samples} (ensemble: S={args.members} members), {device}, {args.threads} threads, "
          f"best of {repeats}")
    print("ratio: time / (S forwards of the deterministic network; for the ensemble, one forward per member)")
    print(f"| {'model':<34} | {'method':<9} | {'batch':>5} | {'ms':>9} | {'ratio':>5} |")
    print(f"|{'-' * 36}|{'-' * 11}|{'-' * 7}|{'-' * 11}|{'-' * 7}|")

    def row(name: str, method: str, batch: int, ms: float, floor: float) -> None:
        print(f"| {name:<34} | {method:<9} | {batch:>5} | {ms:>9.2f} | {ms / floor:>5.2f} |", flush=True)

    for sizes in sizes_list:
        label = "-".join(map(str, sizes))
        torch.manual_seed(0)
        plain = mlp(nn.Linear, sizes).to(device).eval()
        bayesian = mlp(lambda i, o: bdl.BayesLinear(i, o, posterior_std_init=0.05), sizes).to(device)
        dropout = bdl.MCDropout(mlp(nn.Linear, sizes, dropout=0.2).to(device))
        ensemble = bdl.DeepEnsemble([mlp(nn.Linear, sizes).to(device) for _ in range(args.members)])
        for batch in batches:
            x = torch.randn(batch, sizes[0], device=device)

            def forwards(count: int) -> Callable[[], None]:
                def run() -> None:
                    with torch.no_grad():
                        for _ in range(count):
                            plain(x)

                return run

            def predict_with(model: nn.Module, method: str) -> Callable[[], object]:
                return lambda: bdl.predict(model, x, num_samples, method=method)

            def ensemble_with(method: str) -> Callable[[], object]:
                def run() -> object:
                    ensemble.method = method
                    return bdl.predict(ensemble, x)

                return run

            candidates = {"floor": forwards(num_samples), "floor members": forwards(args.members)}
            for name, model in (("BayesLinear", bayesian), ("MC dropout", dropout)):
                for method in ("loop", "batched"):
                    candidates[f"{name} {method}"] = predict_with(model, method)
            for method in ("loop", "vmap"):
                candidates[f"ensemble {method}"] = ensemble_with(method)
            times = best_ms(candidates, repeats, device)
            ensemble.method = "auto"
            floor, floor_members = times["floor"], times["floor members"]
            row(f"deterministic {label}", "floor", batch, floor, floor)
            for name, model in (("BayesLinear", bayesian), ("MC dropout", dropout)):
                picked = resolve_method(model, batch)
                for method in ("loop", "batched"):
                    row(f"{name} {label}", method + (" *" if method == picked else ""), batch, times[f"{name} {method}"], floor)
            row(f"deterministic {label}", f"floor/{args.members}", batch, floor_members, floor_members)
            picked = ensemble.resolve_method()
            for method in ("loop", "vmap"):
                row(f"ensemble x{args.members} {label}", method + (" *" if method == picked else ""), batch,
                    times[f"ensemble {method}"], floor_members)
    print("* = the path method='auto' takes for this model, device and batch")


if __name__ == "__main__":
    main()
