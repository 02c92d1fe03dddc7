"""Small reference networks for config-driven runs: an MLP, LeNet-5, a 1-D CNN and a CIFAR ResNet.

Plain ``torch.nn`` networks (no Bayesian layers): the method (variational, MC dropout, ensemble, SVI)
decides how they become Bayesian, e.g. :class:`~bdl.lightning.VariationalModule` converts them with
:func:`bdl.bayesianize`. Any other ``nn.Module`` can be named in a config by its class path.
"""

from __future__ import annotations

import numbers
from typing import Literal, Sequence

from torch import Tensor, nn

from ..nn.heads import GaussianHead

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU, "elu": nn.ELU}


def _activation(name: str) -> type[nn.Module]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _check_sizes(owner: str, **sizes: int) -> None:
    """Raise ``ValueError`` naming the first argument that is not a positive int (layer widths, channels, classes)."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:  # numpy's ints too, as nn.Linear's
            raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


def _check_dropout(dropout: float, owner: str) -> float:
    # named with its network: the CLI blamed the enclosing module ("VariationalModule: dropout must be ...")
    if not (isinstance(dropout, numbers.Real) and not isinstance(dropout, bool) and 0 <= dropout < 1):
        raise ValueError(f"{owner}: dropout must be a rate in [0, 1), got {dropout!r}")
    return float(dropout)


class MLP(nn.Sequential):
    """A multilayer perceptron ``in_features -> hidden... -> out_features``, flattening its input.

    Args:
        in_features: input size (inputs of any shape ``[N, ...]`` are flattened).
        out_features: output size (classes, or regression outputs).
        hidden: sizes of the hidden layers.
        activation: ``"relu"``, ``"tanh"``, ``"gelu"``, ``"silu"`` or ``"elu"``.
        dropout: dropout rate after each hidden activation (0 = none; MC dropout needs > 0).
        head: ``"linear"`` (logits or means), or ``"gaussian"``: a :class:`bdl.GaussianHead` returning
            ``(mean, variance)`` for heteroscedastic regression.

    Example:
        >>> net = MLP(64, 10, hidden=[128, 128], dropout=0.1)
        >>> net(torch.randn(5, 64)).shape
        torch.Size([5, 10])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: Sequence[int] = (128,),
        activation: str = "relu",
        dropout: float = 0.0,
        head: Literal["linear", "gaussian"] = "linear",
    ) -> None:
        act, dropout = _activation(activation), _check_dropout(dropout, "MLP")
        _check_sizes("MLP", in_features=in_features, out_features=out_features)
        if isinstance(hidden, (int, str)) or not isinstance(hidden, Sequence):
            raise TypeError(f"MLP: hidden must be a list of layer sizes (e.g. [128, 128]), got {hidden!r}")
        _check_sizes("MLP", **{f"hidden[{i}]": size for i, size in enumerate(hidden)})
        if head not in ("linear", "gaussian"):
            raise ValueError(f"MLP: head must be 'linear' or 'gaussian', got {head!r}")
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), act()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, out_features) if head == "linear" else GaussianHead(width, out_features))
        super().__init__(*layers)


class LeNet5(nn.Module):
    """LeNet-5 for ``[N, C, 28, 28]`` (or 32x32) images: two conv+pool blocks, then 120-84-classes.

    Args:
        in_channels: channels of the input images (1 for MNIST, 3 for CIFAR-10).
        num_classes: output classes (logits ``[N, num_classes]``).
        dropout: dropout rate after the ReLU of each of the two hidden fully connected layers (120 and 84
            units), none in the convolutional blocks (0 = none; MC dropout needs > 0).

    Example:
        >>> LeNet5(num_classes=10)(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        dropout = _check_dropout(dropout, "LeNet5")
        _check_sizes("LeNet5", in_channels=in_channels, num_classes=num_classes)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.pool = nn.AdaptiveAvgPool2d(5)
        drop = [nn.Dropout(dropout)] if dropout > 0 else []
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(), *drop, nn.Linear(120, 84), nn.ReLU(), *drop, nn.Linear(84, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        # torch's own error named a kernel size larger than "(0 x 0)"; other layouts get torch's channel error
        if x.dim() == 4 and x.shape[1] == self.features[0].in_channels and min(x.shape[-2:]) < 12:
            raise ValueError(
                f"LeNet5 takes images of at least 12x12 pixels (two 5x5 convolutions, each with a 2x2 pooling), got "
                f"{x.shape[-2]}x{x.shape[-1]} (input shape {tuple(x.shape)}); for 8x8 digits use an MLP on flat inputs"
            )
        return self.classifier(self.pool(self.features(x)))


class Conv1dNet(nn.Module):
    """A small 1-D CNN for ``[N, C, L]`` signals such as MNIST-1D, after the paper's CNN: three convolutions, then linear.

    The three convolutions (kernels 5, 3, 3, stride 2, padding 1, each followed by a ReLU) are those of the
    MNIST-1D paper's ``ConvBase`` (Greydanus 2020), but the head differs: global average pooling over the
    length, then ``Linear(channels, num_classes)`` (``Linear(32, 10)`` by default), where the paper's network
    has 25 channels and a linear layer on the flattened 25 x 5 features of a length-40 signal. Inputs
    ``[N, L]`` are read as one channel.

    Args:
        in_channels: channels of the input signals (1 for MNIST-1D, and for ``[N, L]`` inputs).
        num_classes: output classes (logits ``[N, num_classes]``).
        channels: channels of each of the three convolutions (default 32; the paper's has 25).
        dropout: dropout rate before the final linear layer (0 = none; MC dropout needs > 0).

    Example:
        >>> Conv1dNet(num_classes=10)(torch.randn(2, 1, 40)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, channels: int = 32, dropout: float = 0.0) -> None:
        super().__init__()
        dropout = _check_dropout(dropout, "Conv1dNet")
        _check_sizes("Conv1dNet", in_channels=in_channels, num_classes=num_classes, channels=channels)
        self.features = nn.Sequential(
            nn.Conv1d(in_channels, channels, 5, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool1d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Sequential(*([nn.Dropout(dropout)] if dropout > 0 else []), nn.Linear(channels, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:  # [N, L] -> one channel
            x = x.unsqueeze(1)
        return self.head(self.features(x))


class ResNet(nn.Module):
    """A torchvision ResNet (18/34/50), with a 3x3 stem and no max-pool for 32x32 inputs (``small_inputs``).

    Args:
        depth: 18, 34 or 50.
        num_classes: output classes.
        small_inputs: CIFAR-style stem (``conv 3x3, stride 1``, no max-pool) instead of ImageNet's.
        dropout: dropout rate before the final linear layer (for MC dropout).

    Example:
        >>> ResNet(18, num_classes=10)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, depth: Literal[18, 34, 50] = 18, num_classes: int = 10, small_inputs: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        from torchvision import models

        builders = {18: models.resnet18, 34: models.resnet34, 50: models.resnet50}
        if depth not in builders:
            raise ValueError(f"ResNet: depth must be one of {sorted(builders)}, got {depth!r}")
        dropout = _check_dropout(dropout, "ResNet")
        _check_sizes("ResNet", num_classes=num_classes)
        self.net = builders[depth](num_classes=num_classes)
        if small_inputs:
            self.net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.net.maxpool = nn.Identity()
        if dropout > 0:
            self.net.fc = nn.Sequential(nn.Dropout(dropout), self.net.fc)
        self.reset_parameters()  # the small-input stem too

    def reset_parameters(self) -> None:
        """torchvision's initialisation: Kaiming-normal convolutions (fan-out), normalisation layers at 1 and 0,
        linear layers at PyTorch's default. An ensemble's other members are re-initialised with it (their layers'
        own defaults gave convolutions 2.5x smaller and logits 25x smaller than member 0's)."""
        for module in self.net.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                module.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


__all__ = ["MLP", "LeNet5", "Conv1dNet", "ResNet", "ACTIVATIONS"]
