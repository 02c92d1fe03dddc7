"""Tiny stand-ins for torchvision's data sets, written in the real on-disk formats (for tests).

Each writer puts random images where torchvision looks for them under ``root`` and returns the arrays it
wrote, so a test can compare what a data module reads with what is on disk:

- :func:`write_mnist`: ``<root>/MNIST/raw`` (or ``FashionMNIST/raw``), big-endian idx files.
- :func:`write_cifar10`: ``<root>/cifar-10-batches-py``, python pickles ``data_batch_1..5``, ``test_batch``,
  ``batches.meta``.
- :func:`write_cifar100`: ``<root>/cifar-100-python``, pickles ``train``, ``test``, ``meta``.
- :func:`write_svhn`: ``<folder>/test_32x32.mat`` (MATLAB file, ``X`` ``[32, 32, 3, N]``, ``y`` ``[N, 1]`` in 1..10).
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import scipy.io


def _write_idx(path: Path, array: np.ndarray) -> None:
    """IDX format: magic (0, 0, type 0x08 = uint8, number of dims), then each dim as big-endian int32, then data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_mnist(root: Path, name: str = "MNIST", num_train: int = 50, num_test: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """MNIST-format idx files under ``root/name/raw``; returns ``train_images`` [N, 28, 28] uint8, ``train_labels``, ..."""
    rng = np.random.default_rng(seed)
    raw = Path(root) / name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, prefix, count in (("train", "train", num_train), ("test", "t10k", num_test)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, count, dtype=np.uint8)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    return arrays


def _cifar_images(rng: np.random.Generator, count: int) -> np.ndarray:
    return rng.integers(0, 256, (count, 3, 32, 32), dtype=np.uint8)


def _pickle(path: Path, entry: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(entry, f)


def write_cifar10(root: Path, per_batch: int = 8, num_test: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    """CIFAR-10 python batches under ``root/cifar-10-batches-py``.

    Returns ``train_images`` ``[5 * per_batch, 3, 32, 32]`` uint8 (CHW, in batch order), ``train_labels``,
    ``test_images``, ``test_labels``.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = [], []
    for batch in range(1, 6):
        images, labels = _cifar_images(rng, per_batch), rng.integers(0, 10, per_batch)
        _pickle(folder / f"data_batch_{batch}", {"data": images.reshape(per_batch, -1), "labels": labels.tolist()})
        train_images.append(images)
        train_labels.append(labels)
    test_images, test_labels = _cifar_images(rng, num_test), rng.integers(0, 10, num_test)
    _pickle(folder / "test_batch", {"data": test_images.reshape(num_test, -1), "labels": test_labels.tolist()})
    _pickle(folder / "batches.meta", {"label_names": [f"class {i}" for i in range(10)], "num_cases_per_batch": per_batch})
    return {
        "train_images": np.concatenate(train_images),
        "train_labels": np.concatenate(train_labels),
        "test_images": test_images,
        "test_labels": test_labels,
    }


def write_cifar100(root: Path, num_train: int = 10, num_test: int = 12, seed: int = 1) -> dict[str, np.ndarray]:
    """CIFAR-100 python pickles under ``root/cifar-100-python``; returns ``train_images``, ``test_images`` (CHW), labels."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, count in (("train", num_train), ("test", num_test)):
        images, labels = _cifar_images(rng, count), rng.integers(0, 100, count)
        entry = {"data": images.reshape(count, -1), "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist()}
        _pickle(folder / split, entry)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    _pickle(folder / "meta", {"fine_label_names": [f"fine {i}" for i in range(100)], "coarse_label_names": [f"coarse {i}" for i in range(20)]})
    return arrays


def write_svhn(folder: Path, num_test: int = 9, seed: int = 2) -> dict[str, np.ndarray]:
    """SVHN's ``test_32x32.mat`` in ``folder``; returns ``test_images`` ``[N, 3, 32, 32]`` and ``test_labels`` (10 = digit 0)."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = _cifar_images(rng, num_test), rng.integers(1, 11, num_test)
    scipy.io.savemat(folder / "test_32x32.mat", {"X": images.transpose(2, 3, 1, 0), "y": labels.reshape(-1, 1).astype(np.uint8)})
    return {"test_images": images, "test_labels": labels}
