"""SVI step time of a Pyro-BNN against the BayesLinear ELBO step on the same MLP and data.

Times one training step (forward + backward + Adam) of a 784-1200-1200-10 MLP (batch 128):

- ``bdl.BayesLinear`` (reparameterisation, closed-form KL): ``bdl.elbo_loss`` on the ELBO;
- the same architecture as ``nn.Linear`` layers with Gaussian priors via ``bdl.infer.PyroModel`` and an
  ``AutoNormal`` guide, trained by ``bdl.SVIModule``'s loss (``bdl.infer.guides.MeanFieldELBO``, closed-form KL),

and prints ms per step and the ratio Pyro / BayesLinear (target: within 2x). Both use the same mean-field
Gaussian family, so the ratio is Pyro's bookkeeping overhead (traces, site handling) on top of the same
arithmetic.

    python experiments/benchmark_svi.py [--threads 2] [--steps 20] [--device cpu|cuda] [--sizes 784-1200-1200-10]

A benchmark, run on demand, not a test.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import bdl
from bdl.infer import PyroModel, SVIModule
from benchmark_layers import SIZES, check_counts, check_device, median_ms, mlp, network_sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-data", type=int, default=60_000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", nargs="+", default=["-".join(map(str, SIZES))], help="MLP widths, e.g. 784-1200-1200-10")
    args = parser.parse_args()
    check_counts(parser, args, positive=("threads", "steps", "batch_size", "num_data"))
    check_device(parser, args)
    args.sizes = network_sizes(parser, args.sizes)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sizes = tuple(args.sizes)
    x = torch.randn(args.batch_size, sizes[0], device=device)
    y = torch.randint(0, sizes[-1], (args.batch_size,), device=device)

    bayes = mlp(lambda i, o: bdl.BayesLinear(i, o), sizes).to(device)
    bayes_optimizer = torch.optim.Adam(bayes.parameters(), lr=1e-3)

    def bayes_step() -> None:
        bayes_optimizer.zero_grad(set_to_none=True)
        nll = F.cross_entropy(bayes(x), y)
        bdl.elbo_loss(nll, bdl.kl_divergence(bayes), args.num_data).loss.backward()
        bayes_optimizer.step()

    model = PyroModel(mlp(nn.Linear, sizes), "categorical", num_data=args.num_data).to(device)
    svi = SVIModule(model, "normal", lr=1e-3).to(device)
    svi_optimizer = svi.configure_optimizers()

    def svi_step() -> None:
        svi_optimizer.zero_grad(set_to_none=True)
        loss, _, _ = svi.loss(x, y)
        loss.backward()
        svi_optimizer.step()

    names = {"bayes": "BayesLinear ELBO (bdl.elbo_loss)", "svi": "Pyro SVI (PyroModel + AutoNormal)"}
    ms = median_ms({"bayes": bayes_step, "svi": svi_step}, args.steps, cuda)
    print(f"MLP {'-'.join(map(str, sizes))}, batch {args.batch_size}, {device}, {args.threads} threads, median of {args.steps} interleaved steps")
    print(f"| {'training step (forward + backward + Adam)':<42} | {'ms/step':>8} |")
    print(f"|{'-' * 44}|{'-' * 10}|")
    for key, label in names.items():
        print(f"| {label:<42} | {ms[key]:>8.1f} |")
    print(f"ratio Pyro SVI / BayesLinear: {ms['svi'] / ms['bayes']:.2f}")


if __name__ == "__main__":
    main()
