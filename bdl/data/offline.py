"""Offline data sets that need no download, as ``TensorDataset`` splits.

- :func:`load_digits`: scikit-learn's bundled 8x8 digits (1797 images, 64 features), optionally with
  held-out classes as an out-of-distribution set.
- :func:`two_moons`: two interleaved half circles (binary classification).
- :func:`regression_with_gap`: 1-D heteroscedastic regression with no training inputs in a gap, where
  a Bayesian model should be unsure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import TensorDataset


@dataclass
class Splits:
    """Train/validation/test (and optional OOD) splits of one data set."""

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    ood: Optional[TensorDataset] = None
    num_classes: Optional[int] = None

    @property
    def num_features(self) -> int:
        return self.train.tensors[0].shape[1]


def _split_indices(n: int, val_fraction: float, test_fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    if not (0 <= val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction and test_fraction must be in [0, 1) with a sum below 1, got {val_fraction} and {test_fraction}"
        )
    order = torch.randperm(n, generator=generator)
    num_test, num_val = round(n * test_fraction), round(n * val_fraction)
    return order[num_test + num_val :], order[num_test : num_test + num_val], order[:num_test]


def load_digits(
    *,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    ood_classes: Sequence[int] = (),
    standardize: bool = True,
) -> Splits:
    """scikit-learn's digits as float features in [0, 1] (standardised on the training split).

    Args:
        seed: seed of the random split.
        val_fraction, test_fraction: fractions of the in-distribution images.
        ood_classes: digits held out from training; their images form ``Splits.ood`` and the remaining
            classes are relabelled ``0 .. C-1`` in increasing order.
        standardize: subtract the training mean and divide by the training std (per feature).

    Example:
        >>> splits = load_digits(ood_classes=[8, 9])
        >>> splits.num_classes, splits.num_features, len(splits.ood) > 0
        (8, 64, True)
    """
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    x = torch.as_tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(data.target, dtype=torch.long)
    unknown = sorted(set(ood_classes) - set(range(10)))
    if unknown:
        raise ValueError(f"ood_classes must be digits 0-9, got {unknown}")
    held_out = torch.isin(y, torch.tensor(list(ood_classes), dtype=torch.long))
    kept_classes = [c for c in range(10) if c not in set(ood_classes)]
    relabel = torch.full((10,), -1, dtype=torch.long)
    relabel[kept_classes] = torch.arange(len(kept_classes))
    x_in, y_in = x[~held_out], relabel[y[~held_out]]
    generator = torch.Generator().manual_seed(seed)
    train, val, test = _split_indices(len(x_in), val_fraction, test_fraction, generator)
    x_ood = x[held_out]
    if standardize:
        mean, std = x_in[train].mean(0), x_in[train].std(0).clamp_min(1e-3)
        x_in, x_ood = (x_in - mean) / std, (x_ood - mean) / std
    ood = TensorDataset(x_ood, y[held_out]) if len(ood_classes) else None
    return Splits(
        TensorDataset(x_in[train], y_in[train]),
        TensorDataset(x_in[val], y_in[val]),
        TensorDataset(x_in[test], y_in[test]),
        ood,
        num_classes=len(kept_classes),
    )


def two_moons(
    num_samples: int = 1000, *, noise: float = 0.1, seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.2
) -> Splits:
    """Two interleaving half circles in 2-D (scikit-learn's ``make_moons``), labels 0/1.

    Example:
        >>> splits = two_moons(200)
        >>> splits.train.tensors[0].shape[1], splits.num_classes
        (2, 2)
    """
    from sklearn.datasets import make_moons

    x, y = make_moons(num_samples, noise=noise, random_state=seed)
    x, y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long)
    train, val, test = _split_indices(num_samples, val_fraction, test_fraction, torch.Generator().manual_seed(seed))
    return Splits(TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val]), TensorDataset(x[test], y[test]), num_classes=2)


def regression_with_gap(
    num_samples: int = 400,
    *,
    seed: int = 0,
    gap: tuple[float, float] = (-1.0, 1.0),
    domain: tuple[float, float] = (-4.0, 4.0),
    noise: tuple[float, float] = (0.05, 0.3),
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
) -> Splits:
    """1-D regression ``y = sin(x) + 0.1 x + eps`` with inputs drawn outside ``gap``.

    The noise standard deviation grows linearly in ``|x|`` from ``noise[0]`` at 0 to ``noise[1]`` at the
    domain's edge, ``std(x) = noise[0] + (noise[1] - noise[0]) |x| / max|domain|`` (heteroscedastic: the
    aleatoric part of the uncertainty is known). ``Splits.ood`` holds
    inputs evenly spaced inside the gap, where only epistemic uncertainty should rise.

    Example:
        >>> splits = regression_with_gap(100)
        >>> x = splits.train.tensors[0]
        >>> bool(((x < -1) | (x > 1)).all())
        True
    """
    if not (domain[0] < gap[0] < gap[1] < domain[1]):
        raise ValueError(f"gap must lie inside domain, got gap={gap} and domain={domain}")
    generator = torch.Generator().manual_seed(seed)
    left, right = gap[0] - domain[0], domain[1] - gap[1]
    u = torch.rand(num_samples, 1, generator=generator) * (left + right)
    x = torch.where(u < left, domain[0] + u, gap[1] + (u - left))
    y = _toy_function(x) + torch.randn(x.shape, generator=generator) * _toy_noise_std(x, noise, domain)
    train, val, test = _split_indices(num_samples, val_fraction, test_fraction, generator)
    x_gap = torch.linspace(gap[0], gap[1], 50).unsqueeze(1)
    y_gap = _toy_function(x_gap)
    return Splits(
        TensorDataset(x[train], y[train]),
        TensorDataset(x[val], y[val]),
        TensorDataset(x[test], y[test]),
        TensorDataset(x_gap, y_gap),
    )


def _toy_function(x: Tensor) -> Tensor:
    return torch.sin(x) + 0.1 * x


def _toy_noise_std(x: Tensor, noise: tuple[float, float], domain: tuple[float, float]) -> Tensor:
    return noise[0] + (noise[1] - noise[0]) * x.abs() / max(abs(domain[0]), abs(domain[1]))
