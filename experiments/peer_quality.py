"""What training gives: the same Bayesian MLP trained with bayesian-torch and with bdl, evaluated by bdl.

A 64-128-8 MLP on scikit-learn's digits (digits 8 and 9 held out of training as out-of-distribution
inputs, ``bdl.data.load_digits(ood_classes=[8, 9])``, one fixed split), trained with each library's
mean-field Gaussian linear layer under the same settings: epochs, Adam and its learning rate, batch
size, prior N(0, 1), initial posterior std (``softplus(-3) = 0.0486``, bayesian-torch's default), and
the same seeds (model initialisation and batch order). The loss is ``cross-entropy + KL / N``
(N = training-set size), the KL from each library's own function:

- ``bdl``: ``bdl.BayesLinear(..., posterior_std_init=0.0486)``, ``bdl.elbo_loss`` with
  ``bdl.kl_divergence(model)`` (summed over weights: the ELBO).
- ``bdl (mean KL)``: the same layers with bayesian-torch's objective: each weight and bias tensor's KL
  averaged over its elements (:func:`mean_kl`), to compare the libraries on that objective too.
- ``bayesian-torch (own KL)``: ``LinearReparameterization(..., posterior_rho_init=-3)``, the KL the
  layers return, which bayesian-torch 0.5 averages over each layer's weights (``kl.mean()``) instead of
  summing them: the KL term is smaller by a factor of about the layer's size.
- ``bayesian-torch (summed KL)``: the same layers with their KL summed over weights (bayesian-torch's
  own ``kl_div`` formula times the number of weights), i.e. the ELBO bdl minimises; tells the
  objective apart from the implementation.

- ``bdl (softplus)``: ``bdl`` with ``std_transform="softplus"``, bayesian-torch's parametrisation of the
  same posterior family (bdl's default is ``exp``), so that only the library differs from the row below.

With bayesian-torch installed the script also prints the seed-paired differences of the bdl rows from the
bayesian-torch rows on the same objective (mean and 95% t interval over the seeds), and checks that one
ELBO step from the same parameters and noise gives the same loss and gradients in both libraries
(:func:`same_step_check`).

Both are evaluated through ``bdl.evaluate`` with ``--num-samples`` Monte Carlo samples (a bayesian-torch
model's forward returns ``(logits, kl)``; :class:`LogitsOnly` wraps it to return the logits). The table
gives accuracy, NLL, ECE (15 equal-width bins) and OOD AUROC by predictive entropy, mean ± std over the
seeds.

    python experiments/peer_quality.py [--epochs 40] [--seeds 0 1 2] [--num-samples 32] [--out results.md]

An experiment, run on demand, not a test. bayesian-torch is optional (``pip install -e ".[peers]"``);
without it its rows say "not installed".
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

import bdl
from bdl.data import load_digits
from benchmark_layers import check_counts
from benchmark_peers import KLSequential, reason

POSTERIOR_RHO_INIT = -3.0  # bayesian-torch's default
POSTERIOR_STD_INIT = math.log1p(math.exp(POSTERIOR_RHO_INIT))  # softplus(rho) = 0.0486
PRIOR_STD = 1.0
HIDDEN = 128

COLUMNS = {
    "accuracy": "accuracy",
    "nll": "NLL",
    "ece": "ECE",
    "ood/predictive_entropy/auroc": "OOD AUROC (entropy)",
}


class LogitsOnly(nn.Module):
    """A bayesian-torch model whose ``forward`` returns ``(logits, kl)``, seen as one that returns the logits.

    ``bdl.predict`` and ``bdl.evaluate`` call it once per Monte Carlo sample; the layers draw fresh
    weights on every forward (in eval mode too) and no KL is computed.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x, return_kl=False)


def summed_kl(model: nn.Module) -> Tensor:
    """KL(q || p) summed over every weight of bayesian-torch layers, with bayesian-torch's own ``kl_div``.

    ``kl_div`` returns the mean over the tensor it is given; times the number of elements, the sum.
    """
    total = torch.zeros(())
    for layer in model.modules():
        if not hasattr(layer, "mu_weight"):
            continue
        parts = [(layer.mu_weight, layer.rho_weight, layer.prior_weight_mu, layer.prior_weight_sigma)]
        if layer.mu_bias is not None:
            parts.append((layer.mu_bias, layer.rho_bias, layer.prior_bias_mu, layer.prior_bias_sigma))
        for mu, rho, prior_mu, prior_sigma in parts:
            total = total + layer.kl_div(mu, F.softplus(rho), prior_mu, prior_sigma) * mu.numel()
    return total


def mean_kl(model: nn.Module) -> Tensor:
    """bayesian-torch 0.5's KL for bdl layers: per weight and bias tensor, the KL averaged over its elements."""
    total = torch.zeros(())
    for layer in model.modules():
        if isinstance(layer, bdl.BayesLinear):
            for mu, std in ((layer.weight_mu, layer.weight_std), (layer.bias_mu, layer.bias_std)):
                if mu is not None:
                    total = total + bdl.nn.functional.kl_normal_normal(mu, std, 0.0, PRIOR_STD) / mu.numel()
    return total


Setup = tuple[nn.Module, Callable[[nn.Module, Tensor, Tensor, int], Tensor], nn.Module]
# (model to train, loss(model, x, y, num_data), model to evaluate)


def bdl_setup(kl: Callable[[nn.Module], Tensor], std_transform: str = "exp") -> Callable[[int, int], Setup]:
    def setup(num_features: int, num_classes: int) -> Setup:
        def layer(fan_in: int, fan_out: int) -> nn.Module:
            return bdl.BayesLinear(
                fan_in, fan_out, prior=PRIOR_STD, posterior_std_init=POSTERIOR_STD_INIT, std_transform=std_transform
            )

        model = nn.Sequential(layer(num_features, HIDDEN), nn.ReLU(), layer(HIDDEN, num_classes))

        def loss(model: nn.Module, x: Tensor, y: Tensor, num_data: int) -> Tensor:
            return bdl.elbo_loss(F.cross_entropy(model(x), y), kl(model), num_data).loss

        return model, loss, model

    return setup


def bayesian_torch_setup(summed: bool) -> Callable[[int, int], Setup]:
    from bayesian_torch.layers import LinearReparameterization

    def setup(num_features: int, num_classes: int) -> Setup:
        def layer(fan_in: int, fan_out: int) -> nn.Module:
            return LinearReparameterization(
                fan_in, fan_out, prior_mean=0.0, prior_variance=PRIOR_STD**2, posterior_rho_init=POSTERIOR_RHO_INIT
            )

        model = KLSequential((num_features, HIDDEN, num_classes), layer)

        def loss(model: nn.Module, x: Tensor, y: Tensor, num_data: int) -> Tensor:
            if summed:
                return F.cross_entropy(model(x, return_kl=False), y) + summed_kl(model) / num_data
            logits, kl = model(x)
            return F.cross_entropy(logits, y) + kl / num_data

        return model, loss, LogitsOnly(model)

    return setup


def same_step_check(num_features: int, num_classes: int, batch: int = 64) -> str:
    """One ELBO step of both libraries from the same parameters and noise: the differences in loss and gradients.

    A bayesian-torch MLP's initial values are copied into bdl layers with ``std_transform="softplus"`` (its
    parametrisation), both draw their weight noise from the global generator in the same order, so with
    the same seed the losses and gradients must agree to float rounding.
    """
    torch.manual_seed(0)
    peer, peer_loss, _ = bayesian_torch_setup(summed=True)(num_features, num_classes)
    ours, our_loss, _ = bdl_setup(bdl.kl_divergence, "softplus")(num_features, num_classes)
    pairs = []
    with torch.no_grad():
        for mine, theirs in zip([m for m in ours if isinstance(m, bdl.BayesLinear)], peer.layers):
            for a, b in ((mine.weight_mu, theirs.mu_weight), (mine.weight_rho, theirs.rho_weight),
                         (mine.bias_mu, theirs.mu_bias), (mine.bias_rho, theirs.rho_bias)):
                a.copy_(b)
                pairs.append((a, b))
    x, y = torch.randn(batch, num_features), torch.randint(0, num_classes, (batch,))
    losses = []
    for model, loss in ((ours, our_loss), (peer, peer_loss)):
        torch.manual_seed(1)
        value = loss(model, x, y, 1000)
        value.backward()
        losses.append(value.item())
    grad = max((a.grad - b.grad).abs().max().item() for a, b in pairs)
    scale = max(b.grad.abs().max().item() for _, b in pairs)
    return f"|loss difference| {abs(losses[0] - losses[1]):.1e} (loss {losses[1]:.3f}), max |gradient difference| {grad:.1e} (max |gradient| {scale:.2f})"


def paired_differences(runs: list[dict[str, float]], baseline: list[dict[str, float]]) -> list[str]:
    """Per metric, the mean over seeds of ``run - baseline`` (same seed) with its 95% t interval."""
    from scipy.stats import t as student_t

    cells = []
    for key in COLUMNS:
        diffs = [run[key] - base[key] for run, base in zip(runs, baseline)]
        mean = statistics.fmean(diffs)
        half = student_t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
        cells.append(f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]")
    return cells


PAIRS = (("bdl", "bayesian-torch (summed KL)"), ("bdl (softplus)", "bayesian-torch (summed KL)"),
         ("bdl (mean KL)", "bayesian-torch (own KL)"))


def paired_table(rows: list[tuple[str, Union[list[dict[str, float]], str]]]) -> str:
    found = dict(rows)
    lines = [f"| {'difference (same seeds)':<52} | " + " | ".join(f"{t:>25}" for t in COLUMNS.values()) + " |",
             f"|{'-' * 54}|" + "|".join("-" * 27 for _ in COLUMNS) + "|"]
    for ours, theirs in PAIRS:
        a, b = found.get(ours), found.get(theirs)
        if isinstance(a, list) and isinstance(b, list):
            cells = paired_differences(a, b)
            lines.append(f"| {ours + ' - ' + theirs:<52} | " + " | ".join(f"{c:>25}" for c in cells) + " |")
    return "\n".join(lines)


def run_seed(setup: Callable[[int, int], Setup], splits: bdl.data.Splits, seed: int, args: argparse.Namespace) -> dict[str, float]:
    """Train one model from ``seed`` and return its bdl.evaluate metrics plus ``train_s``."""
    torch.manual_seed(seed)
    model, loss, evaluated = setup(splits.num_features, splits.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loader = DataLoader(splits.train, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    num_data = len(splits.train)
    start = time.perf_counter()
    model.train()
    for _ in range(args.epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss(model, x, y, num_data).backward()
            optimizer.step()
    seconds = time.perf_counter() - start
    torch.manual_seed(seed)
    report = bdl.evaluate(evaluated, splits.test.tensors, splits.ood.tensors[0], num_samples=args.num_samples)
    return {**{key: report.metrics[key] for key in COLUMNS}, "train_s": seconds}


def mean_std(values: list[float], digits: int = 3) -> str:
    """``mean ± sample std``; the mean alone for one value (whose std is undefined, not 0)."""
    mean = f"{statistics.fmean(values):.{digits}f}"
    return mean if len(values) == 1 else f"{mean} ± {statistics.stdev(values):.{digits}f}"


def table(rows: list[tuple[str, Union[list[dict[str, float]], str]]]) -> str:
    titles = [*COLUMNS.values(), "train s"]
    lines = [f"| {'library':<26} | " + " | ".join(f"{t:>19}" for t in titles) + " |",
             f"|{'-' * 28}|" + "|".join("-" * 21 for _ in titles) + "|"]
    for name, runs in rows:
        if isinstance(runs, str):
            lines.append(f"| {name:<26} | {runs} |" + " |" * (len(titles) - 1))
            continue
        cells = [mean_std([run[key] for run in runs]) for key in COLUMNS]
        cells.append(mean_std([run["train_s"] for run in runs], 1))
        lines.append(f"| {name:<26} | " + " | ".join(f"{c:>19}" for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-samples", type=int, default=32, help="Monte Carlo samples at evaluation")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this .md file")
    args = parser.parse_args()
    check_counts(parser, args, positive=("epochs", "batch_size", "num_samples", "threads"))
    if len(set(args.seeds)) < len(args.seeds):  # a std over a repeated seed measures nothing
        parser.error(f"--seeds must be different, got {args.seeds}")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    if args.out is not None and args.out.suffix != ".md":
        parser.error(f"--out must name a .md file, got {str(args.out)!r}")
    torch.set_num_threads(args.threads)

    splits = load_digits(seed=0, ood_classes=[8, 9])
    setups: list[tuple[str, Union[Callable[[int, int], Setup], str]]] = [
        ("bdl", bdl_setup(bdl.kl_divergence)), ("bdl (softplus)", bdl_setup(bdl.kl_divergence, "softplus")),
        ("bdl (mean KL)", bdl_setup(mean_kl))]
    check = None
    try:
        setups += [("bayesian-torch (own KL)", bayesian_torch_setup(summed=False)),
                   ("bayesian-torch (summed KL)", bayesian_torch_setup(summed=True))]
    except Exception as error:  # noqa: BLE001 - any import failure is reported, not hidden
        setups += [(name, f"not installed: {reason(error)}") for name in ("bayesian-torch (own KL)", "bayesian-torch (summed KL)")]

    if not isinstance(setups[-1][1], str):  # bayesian-torch imported: check that both libraries take the same step
        check = same_step_check(splits.num_features, splits.num_classes)
    rows: list[tuple[str, Union[list[dict[str, float]], str]]] = []
    for name, setup in setups:
        runs: Union[list[dict[str, float]], str] = setup if isinstance(setup, str) else [run_seed(setup, splits, seed, args) for seed in args.seeds]
        rows.append((name, runs))
        print(f"{name}: {runs if isinstance(runs, str) else 'done'}", flush=True)

    header = (
        f"MLP {splits.num_features}-{HIDDEN}-{splits.num_classes} on digits 0-7 ({len(splits.train)} train / "
        f"{len(splits.test)} test images; {len(splits.ood)} images of 8 and 9 as OOD inputs); {args.epochs} epochs, "
        f"Adam lr {args.lr}, batch {args.batch_size}, prior N(0, 1), initial posterior std {POSTERIOR_STD_INIT:.4f}, "
        f"loss cross-entropy + KL / N; evaluated by bdl.evaluate with S={args.num_samples}; mean ± sample std (n - 1) over "
        f"seeds {', '.join(map(str, args.seeds))}; {args.threads} CPU threads.\n"
        "ECE: 15 equal-width bins. OOD AUROC: predictive entropy separating digits 8-9 from the test set. "
        "bayesian-torch's own KL is the mean over each layer's weights, not the sum; 'bdl (mean KL)' trains bdl's "
        "layers on that objective, 'bayesian-torch (summed KL)' trains bayesian-torch's on the ELBO. "
        "'bdl (softplus)' is bdl with bayesian-torch's parametrisation std = softplus(rho) (bdl's default is "
        "std = exp(rho): the same posterior family, optimised along another path)."
    )
    text = f"{header}\n\n{table(rows)}\n"
    if check is not None:
        pairs = paired_table(rows)
        text += (f"\nPaired differences (bdl row minus bayesian-torch row, seed by seed; mean and 95% t interval; "
                 f"lower NLL and ECE, higher accuracy and AUROC are better):\n\n{pairs}\n"
                 f"\nOne ELBO step from the same parameters and noise, bdl (softplus) against bayesian-torch: {check}.\n")
    print(f"\n{text}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"written to {args.out}")


if __name__ == "__main__":
    main()
