"""Training-step cost of a Bayesian ResNet-18 against the same network with ``nn.Conv2d`` layers.

Times one step (forward + cross-entropy + KL / num_data + backward + Adam) of torchvision's ResNet-18 with
the CIFAR stem (``bdl.lightning.models.ResNet``, 32x32 inputs), the network of ``configs/cifar10_resnet18_*.yaml``:
every convolution and the final linear layer converted by ``bdl.bayesianize`` with each estimator, under bf16
autocast on CUDA (float32 on CPU; the configs' ``precision: 16-mixed`` is float16 autocast with a gradient
scaler on CUDA, and Lightning's bf16 autocast on a CPU). Prints ms per step, the ratio to ``nn.Conv2d`` and the seconds a pass over CIFAR-10's 50,000 training
images would take at that rate (the configs train on 45,000 of them, holding out ``val_fraction`` 0.1). Steps of the variants are interleaved
(one step of each in turn), so a change in machine load affects all of them alike.

    python experiments/benchmark_resnet.py [--device cuda] [--batch-size 128] [--steps 40]

A benchmark for a GPU, run on demand, not a test (on 2 CPU threads even batch 2 took 0.18-0.63 s a step).
"""

from __future__ import annotations

import argparse
import contextlib
import math
from typing import Callable

import torch
import torch.nn.functional as F

import bdl
from bdl.lightning.models import ResNet
from benchmark_layers import check_counts, check_device, median_ms

ESTIMATORS = ("reparam", "local", "flipout")
CIFAR10_TRAIN_SIZE = 50_000


def training_step(estimator: str | None, x: torch.Tensor, y: torch.Tensor, depth: int) -> Callable[[], None]:
    torch.manual_seed(0)
    net = ResNet(depth=depth, num_classes=10, small_inputs=True)
    if estimator is not None:
        net = bdl.bayesianize(net, estimator=estimator, prior=0.1)
    net = net.to(x.device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if x.is_cuda else contextlib.nullcontext()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(net(x), y)
        if estimator is not None:
            loss = loss + bdl.kl_divergence(net) / CIFAR10_TRAIN_SIZE
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40, help="timed steps of each variant (the median is reported)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--depth", type=int, default=18, choices=(18, 34, 50))
    args = parser.parse_args()
    check_counts(parser, args, positive=("threads", "batch_size", "steps"), non_negative=("warmup",))
    check_device(parser, args)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32, generator=generator).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=generator).to(device)
    steps = {"nn.Conv2d": training_step(None, x, y, args.depth)}
    steps.update({estimator: training_step(estimator, x, y, args.depth) for estimator in ESTIMATORS})
    ms = median_ms(steps, args.steps, cuda, warmup=args.warmup)
    name = torch.cuda.get_device_name(device) if cuda else f"cpu, {args.threads} threads"
    precision = "bf16 autocast" if cuda else "float32"
    print(f"ResNet-{args.depth} (32x32 inputs), batch {args.batch_size}, {precision}, Adam, {name}, "
          f"median of {args.steps} interleaved steps")
    epoch_steps = math.ceil(CIFAR10_TRAIN_SIZE / args.batch_size)
    print(f"| layers    | ms/step | ratio | s per CIFAR-10 epoch ({epoch_steps} steps) |")
    print("|-----------|---------|-------|----------------------------------|")
    base = ms["nn.Conv2d"]
    for layers, t in ms.items():
        print(f"| {layers:<9} | {t:7.2f} | {t / base:5.2f} | {t * epoch_steps / 1e3:5.1f} |")


if __name__ == "__main__":
    main()
