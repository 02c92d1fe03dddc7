"""Image data modules on torchvision's data sets: MNIST (OOD: FashionMNIST) and CIFAR-10 (OOD: SVHN or CIFAR-100).

The files live under ``data_dir`` in torchvision's layout:

- MNIST: ``<data_dir>/MNIST/raw/`` with the uncompressed ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``;
  FashionMNIST the same under ``<data_dir>/FashionMNIST/raw/``.
- CIFAR-10: ``<data_dir>/cifar-10-batches-py/`` (``data_batch_1`` .. ``data_batch_5``, ``test_batch``,
  ``batches.meta``); CIFAR-100: ``<data_dir>/cifar-100-python/`` (``train``, ``test``, ``meta``).
- SVHN: ``<data_dir>/SVHN/test_32x32.mat``.

``download=True`` fetches missing files in ``prepare_data`` with torchvision's own downloaders, which
check the md5 sums of what they download. Files already on disk are read as they are, without an md5
check, so a copy made elsewhere (or a small stand-in written by a test) is accepted. With
``download=False``, missing files raise a ``FileNotFoundError`` that names the data set, the folder and
how to get it.

The OOD sets are labelled ``-1`` (their classes are not the model's), like the OOD sets of
:mod:`bdl.lightning.data`.
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset
from torchvision import datasets, transforms

from ..data.offline import Splits, check_bool
from .data import UncertaintyDataModule

MNIST_OOD = ("fashion_mnist",)
CIFAR10_OOD = ("svhn", "cifar100")


class _CIFAR10(datasets.CIFAR10):
    """torchvision's CIFAR-10 that accepts existing files without checking their md5 sums (downloads still do)."""

    def _check_integrity(self) -> bool:
        folder = os.path.join(self.root, self.base_folder)
        return all(os.path.isfile(os.path.join(folder, name)) for name, _ in self.train_list + self.test_list)

    def _load_meta(self) -> None:
        self.meta = {**self.meta, "md5": None}  # check_integrity(path, None) only checks that the file exists
        super()._load_meta()


class _CIFAR100(_CIFAR10, datasets.CIFAR100):
    """torchvision's CIFAR-100 (its files, urls and md5 sums come first in the MRO) with ``_CIFAR10``'s checks."""


class _SVHN(datasets.SVHN):
    """torchvision's SVHN that accepts an existing file without checking its md5 sum (downloads still do)."""

    def _check_integrity(self) -> bool:
        return os.path.isfile(os.path.join(self.root, self.filename))

    def download(self) -> None:
        if not self._check_integrity():  # torchvision's would fetch again when the md5 differs
            super().download()


@dataclass(frozen=True)
class _Files:
    """Files one data set needs in one folder, and how a user gets them."""

    name: str
    folder: str
    files: tuple[str, ...]
    source: str

    def missing(self) -> list[str]:
        """The files not in the folder."""
        return [name for name in self.files if not os.path.isfile(os.path.join(self.folder, name))]


def _check_files(required: Sequence[_Files], download_error: Optional[BaseException] = None, download: bool = False) -> None:
    """Raise ``FileNotFoundError`` naming the missing files of every data set in ``required`` (the first alone was
    named: the OOD set's turned up on the next run): after ``download_error``, or before a download that
    ``download`` says ``prepare_data`` would make."""
    lacking = [(files, missing) for files in required if (missing := files.missing())]
    if not lacking:
        return
    found = "; ".join(f"{files.name} not found in {files.folder!r} (missing: {', '.join(missing)})" for files, missing in lacking)
    sources = "; ".join(f"{files.name}: {files.source}" if len(lacking) > 1 else files.source for files, _ in lacking)
    if download_error is not None:  # offline: torchvision's URLError, 40 lines deep
        detail = " ".join(str(download_error).split())  # torchvision's MNIST lists its mirrors' errors a line each
        raise FileNotFoundError(
            f"{found}, and the download failed ({type(download_error).__name__}: {detail}). Without a network, "
            f"put the files there yourself: {sources}"
        ) from download_error
    if download:  # read before prepare_data (data.num_train to size a model): it downloads
        raise FileNotFoundError(
            f"{found}. With download=True the files are fetched by prepare_data(), which trainer.fit calls: call "
            "data.prepare_data() before reading the data outside a Trainer"
        )
    raise FileNotFoundError(
        f"{found}. Set download: true (download=True) to fetch {'them' if len(lacking) > 1 else 'it'} with torchvision, "
        f"or put the files there yourself: {sources}"
    )


def _mnist_files(cls: type[datasets.MNIST], name: str, data_dir: str) -> _Files:
    files = tuple(os.path.splitext(archive)[0] for archive, _ in cls.resources)
    source = f"the uncompressed idx files ({', '.join(files)}) from {cls.mirrors[0]}"
    return _Files(name, os.path.join(data_dir, cls.__name__, "raw"), files, source)


def _cifar_files(cls: type[datasets.CIFAR10], name: str, data_dir: str) -> _Files:
    files = tuple(file for file, _ in cls.train_list + cls.test_list) + (cls.meta["filename"],)
    source = f"extract {cls.url} into {data_dir!r}"
    return _Files(name, os.path.join(data_dir, cls.base_folder), files, source)


def _svhn_files(data_dir: str) -> _Files:
    url, filename, _ = datasets.SVHN.split_list["test"]
    return _Files("SVHN", os.path.join(data_dir, "SVHN"), (filename,), f"download {url} into that folder")


def _check_images(name: str, images: Tensor, shape: tuple[int, ...], labels: Optional[Tensor] = None, num_classes: int = 10) -> None:
    """Raise ``ValueError`` where a file read without error holds images of another shape, or labels not in
    ``0..num_classes-1`` or not one per image (they failed later: in a batch's forward, or a CUDA assertion)."""
    if tuple(images.shape[1:]) != shape:
        raise ValueError(f"the {name} holds images of shape {list(images.shape[1:])}, expected {list(shape)}")
    if labels is None:
        return
    if len(labels) != len(images):
        raise ValueError(f"the {name} holds {len(labels)} labels for {len(images)} images")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"the {name} holds labels in [{int(labels.min())}, {int(labels.max())}], expected 0..{num_classes - 1}")


def _check_fraction(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a fraction in [0, 1), got {value!r}")
    return float(value)


class _SplitError(ValueError):
    """A split of readable files that bdl refuses: not the files' fault (see ``build``)."""


def _train_val_indices(n: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    num_val = round(n * val_fraction)
    if num_val >= n or (val_fraction > 0 and num_val < 1):  # an empty split trained without a check
        raise _SplitError(f"val_fraction={val_fraction} of {n} training images gives {num_val} validation and {n - num_val} training images: each needs at least one")
    return order[num_val:], order[:num_val]


class NormalizedImages(Dataset):
    """uint8 images ``[N, C, H, W]`` with labels, normalised per channel when read.

    ``transform`` (e.g. a random crop and flip) acts on the uint8 image before normalisation, so padding
    is black as with PIL images. Items are ``(float32 [C, H, W], int64 label)``.

    Args:
        images: ``[N, C, H, W]`` uint8 tensor.
        targets: ``[N]`` integer labels.
        mean: per-channel mean of the pixel values scaled to [0, 1].
        std: per-channel standard deviation of the same.
        transform: callable on one uint8 ``[C, H, W]`` tensor, or None.

    Example:
        >>> images = torch.full((2, 1, 4, 4), 255, dtype=torch.uint8)
        >>> x, y = NormalizedImages(images, torch.tensor([3, 4]), mean=[0.5], std=[0.25])[1]
        >>> x.shape, x.max().item(), y.item()
        (torch.Size([1, 4, 4]), 2.0, 4)
    """

    def __init__(
        self,
        images: Tensor,
        targets: Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        transform: Optional[Callable[[Tensor], Tensor]] = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 tensor [N, C, H, W], got {images.dtype} {list(images.shape)}")
        if len(targets) != len(images):
            raise ValueError(f"targets must have one label per image ({len(images)}), got {len(targets)}")
        self.images, self.targets = images, torch.as_tensor(targets, dtype=torch.long)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return (image.float() / 255 - self.mean) / self.std, self.targets[index]


class _TorchvisionDataModule(UncertaintyDataModule):
    """Shared parts: the data folder, download-or-explain, and the seeded train/validation split."""

    def __init__(
        self, *, data_dir: str, download: bool, val_fraction: float, batch_size: int, eval_batch_size: Optional[int], num_workers: int, seed: int
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed)
        if not isinstance(data_dir, (str, os.PathLike)):  # os.fspath's "expected str, bytes or os.PathLike object"
            raise TypeError(f"data_dir must be a folder path (a str or os.PathLike), got {data_dir!r}")
        self.data_dir = os.path.expanduser(os.fspath(data_dir))  # '~/data' as torchvision reads it
        self.download = check_bool(download, "download")
        self.val_fraction = _check_fraction("val_fraction", val_fraction)

    def _required(self) -> list[_Files]:
        raise NotImplementedError

    def _download(self) -> None:
        raise NotImplementedError

    def prepare_data(self) -> None:
        """Download missing files when ``download`` is true (once per node); then check that all are there."""
        failed = None
        if self.download:
            try:
                self._download()
            except (OSError, RuntimeError) as error:  # URLError is an OSError; torchvision's MNIST raises RuntimeError
                failed = error
        _check_files(self._required(), failed)

    def build(self) -> Splits:
        required = self._required()
        _check_files(required, download=self.download)
        try:
            return self._load()
        except (_SplitError, MemoryError):  # read fine: deleting the files would not help
            raise
        except Exception as error:  # noqa: BLE001 - torchvision's readers fail with whatever the bytes give
            # a truncated or corrupt file fails deep in torchvision or numpy (a reshape, an unpickling, an
            # assertion): say which files were read, and keep the original error as the cause
            listing = "; ".join(f"{files.name} in {files.folder!r} ({', '.join(files.files)})" for files in required)
            raise ValueError(
                f"{type(self).__name__}: could not read the data files: {listing}. One may be truncated or of another "
                f"format: delete that one (the error below may name it) and set download: true to fetch it again "
                f"({type(error).__name__}: {error})"
            ) from error

    def _load(self) -> Splits:
        raise NotImplementedError


class MNISTDataModule(_TorchvisionDataModule):
    """MNIST digits (60000 train / 10000 test), with FashionMNIST's test images as the OOD set.

    The 60000 training images are split (seeded) into training and ``val_fraction`` validation images;
    the 10000 test images are the test set. Pixels are scaled to [0, 1] and normalised with MNIST's
    mean 0.1307 and std 0.3081, FashionMNIST's too (so OOD inputs go through the same preprocessing).
    Inputs are ``[1, 28, 28]``, or ``[784]`` with ``flatten=True`` (for MLPs).

    Args:
        data_dir: folder holding ``MNIST/raw`` (and ``FashionMNIST/raw``).
        download: fetch missing files with torchvision in ``prepare_data``.
        ood: ``"fashion_mnist"`` or None (no OOD set).
        val_fraction: fraction of the training images used for validation.
        flatten: give ``[784]`` vectors instead of ``[1, 28, 28]`` images.
        batch_size, eval_batch_size, num_workers, seed: see :class:`UncertaintyDataModule`.

    Example:
        >>> data = MNISTDataModule(data_dir="data", flatten=True)  # constructing it reads no file
        >>> data.ood_name, data.batch_size, data.val_fraction
        ('FashionMNIST', 128, 0.1)
    """

    MEAN = 0.1307
    STD = 0.3081

    def __init__(
        self,
        *,
        data_dir: str = "data",
        download: bool = False,
        ood: Optional[Literal["fashion_mnist"]] = "fashion_mnist",
        val_fraction: float = 0.1,
        batch_size: int = 128,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        seed: int = 0,
        flatten: bool = False,
    ) -> None:
        super().__init__(
            data_dir=data_dir, download=download, val_fraction=val_fraction, batch_size=batch_size,
            eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed,
        )  # fmt: skip
        if ood not in (*MNIST_OOD, None):
            raise ValueError(f"ood must be one of {list(MNIST_OOD)} or None, got {ood!r}")
        self.ood = ood
        self.flatten = check_bool(flatten, "flatten")

    @property
    def ood_name(self) -> Optional[str]:
        return "FashionMNIST" if self.ood == "fashion_mnist" else None

    def _required(self) -> list[_Files]:
        required = [_mnist_files(datasets.MNIST, "MNIST", self.data_dir)]
        if self.ood == "fashion_mnist":
            required.append(_mnist_files(datasets.FashionMNIST, "FashionMNIST", self.data_dir))
        return required

    def _download(self) -> None:
        datasets.MNIST(self.data_dir, train=True, download=True)
        if self.ood == "fashion_mnist":
            datasets.FashionMNIST(self.data_dir, train=False, download=True)

    def _tensors(self, dataset: datasets.MNIST, targets: Optional[Tensor] = None) -> TensorDataset:
        name = f"{type(dataset).__name__} {'training' if dataset.train else 'test'} set"
        _check_images(name, dataset.data, (28, 28), None if targets is not None else dataset.targets)
        x = (dataset.data.float() / 255 - self.MEAN) / self.STD
        x = x.reshape(len(x), -1) if self.flatten else x.unsqueeze(1)
        return TensorDataset(x, dataset.targets.long() if targets is None else targets)

    def _load(self) -> Splits:
        train = self._tensors(datasets.MNIST(self.data_dir, train=True))
        test = self._tensors(datasets.MNIST(self.data_dir, train=False))
        train_idx, val_idx = _train_val_indices(len(train), self.val_fraction, self.seed)
        x, y = train.tensors
        ood = None
        if self.ood == "fashion_mnist":
            fashion = datasets.FashionMNIST(self.data_dir, train=False)
            ood = self._tensors(fashion, torch.full((len(fashion),), -1, dtype=torch.long))
        return Splits(TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[val_idx], y[val_idx]), test, ood, num_classes=10)


class CIFAR10DataModule(_TorchvisionDataModule):
    """CIFAR-10 (50000 train / 10000 test colour images, 10 classes), OOD: SVHN's or CIFAR-100's test images.

    The 50000 training images are split (seeded) into training and ``val_fraction`` validation images.
    With ``augment=True`` the training part (only) gets the usual random crop (32, padding 4) and
    horizontal flip; the validation, test and OOD images are not augmented. All are normalised with
    CIFAR-10's per-channel mean ``(0.4914, 0.4822, 0.4465)`` and std ``(0.2470, 0.2435, 0.2616)``.
    Inputs are ``[3, 32, 32]``.

    Args:
        data_dir: folder holding ``cifar-10-batches-py`` (and ``SVHN/test_32x32.mat`` or ``cifar-100-python``).
        download: fetch missing files with torchvision in ``prepare_data``.
        ood: ``"svhn"``, ``"cifar100"`` or None (no OOD set).
        val_fraction: fraction of the training images used for validation.
        augment: random crop and horizontal flip on the training images.
        batch_size, eval_batch_size, num_workers, seed: see :class:`UncertaintyDataModule`.

    Example:
        >>> data = CIFAR10DataModule(data_dir="data", ood="cifar100", augment=False)  # constructing it reads no file
        >>> data.ood_name, data.MEAN
        ('CIFAR-100', (0.4914, 0.4822, 0.4465))
    """

    MEAN = (0.4914, 0.4822, 0.4465)
    STD = (0.2470, 0.2435, 0.2616)

    def __init__(
        self,
        *,
        data_dir: str = "data",
        download: bool = False,
        ood: Optional[Literal["svhn", "cifar100"]] = "svhn",
        val_fraction: float = 0.1,
        augment: bool = True,
        batch_size: int = 128,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(
            data_dir=data_dir, download=download, val_fraction=val_fraction, batch_size=batch_size,
            eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed,
        )  # fmt: skip
        if ood not in (*CIFAR10_OOD, None):
            raise ValueError(f"ood must be one of {list(CIFAR10_OOD)} or None, got {ood!r}")
        self.ood = ood
        self.augment = check_bool(augment, "augment")

    @property
    def ood_name(self) -> Optional[str]:
        return {"svhn": "SVHN", "cifar100": "CIFAR-100", None: None}[self.ood]

    def _required(self) -> list[_Files]:
        required = [_cifar_files(_CIFAR10, "CIFAR-10", self.data_dir)]
        if self.ood == "svhn":
            required.append(_svhn_files(self.data_dir))
        elif self.ood == "cifar100":
            required.append(_cifar_files(_CIFAR100, "CIFAR-100", self.data_dir))
        return required

    def _download(self) -> None:
        _CIFAR10(self.data_dir, train=True, download=True)
        if self.ood == "svhn":
            _SVHN(os.path.join(self.data_dir, "SVHN"), split="test", download=True)
        elif self.ood == "cifar100":
            _CIFAR100(self.data_dir, train=False, download=True)

    def _images(self, images: Tensor, targets: Tensor, transform: Optional[Callable[[Tensor], Tensor]] = None) -> NormalizedImages:
        return NormalizedImages(images, targets, self.MEAN, self.STD, transform)

    def _load(self) -> Splits:
        def hwc_to_chw(data: np.ndarray) -> Tensor:
            return torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()

        train = _CIFAR10(self.data_dir, train=True)
        test = _CIFAR10(self.data_dir, train=False)
        images, targets = hwc_to_chw(train.data), torch.tensor(train.targets, dtype=torch.long)
        test_images, test_targets = hwc_to_chw(test.data), torch.tensor(test.targets, dtype=torch.long)
        _check_images("CIFAR-10 training set", images, (3, 32, 32), targets)
        _check_images("CIFAR-10 test set", test_images, (3, 32, 32), test_targets)
        train_idx, val_idx = _train_val_indices(len(images), self.val_fraction, self.seed)
        augmentation = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()])
        ood = None
        if self.ood is not None:
            if self.ood == "svhn":  # torchvision's SVHN data are already [N, C, H, W]
                ood_images = torch.from_numpy(_SVHN(os.path.join(self.data_dir, "SVHN"), split="test").data)
            else:
                ood_images = hwc_to_chw(_CIFAR100(self.data_dir, train=False).data)
            _check_images(f"{self.ood_name} test set", ood_images, (3, 32, 32))
            ood = self._images(ood_images, torch.full((len(ood_images),), -1, dtype=torch.long))
        return Splits(
            self._images(images[train_idx], targets[train_idx], augmentation if self.augment else None),
            self._images(images[val_idx], targets[val_idx]),
            self._images(test_images, test_targets),
            ood,
            num_classes=10,
        )
