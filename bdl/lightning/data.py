"""Lightning DataModules with train/val/test splits and an optional out-of-distribution (OOD) set.

Every data module here derives from :class:`UncertaintyDataModule`: a subclass builds
:class:`bdl.data.Splits` once (``build``), and the base turns them into loaders. ``test_dataloader``
returns ``[test, ood]`` when there is an OOD set, so a test run scores OOD detection too (the
LightningModules in :mod:`bdl.lightning.modules` read ``dataloader_idx`` 1 as OOD inputs).

Offline modules (no download): :class:`DigitsDataModule`, :class:`MNIST1DDataModule`,
:class:`TwoMoonsDataModule`, :class:`RegressionGapDataModule`.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, Iterator, Literal, Optional, Sequence, Sized, Union

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Subset, TensorDataset

from ..data.offline import (
    Splits,
    _check_interval,
    check_fractions,
    check_noise,
    check_bool,
    check_ood_classes,
    check_seed,
    load_digits,
    load_mnist1d,
    regression_with_gap,
    two_moons,
)
from ..metrics.functional._checks import check_positive_int

TASKS = ("classification", "regression")


class _ResumablePass:
    """A sampler whose next pass over its current epoch can start partway (:meth:`resume_at`)."""

    epoch: int
    start: Optional[tuple[int, int]] = None  # (epoch, position) of a resumed pass
    workers_generator: Optional[torch.Generator] = None

    def _seed_workers(self, seed: int, rank: int = 0) -> None:
        """Reseed ``workers_generator`` (the loader's ``generator``, from which its worker processes, started anew
        each epoch, take their random state, e.g. for data augmentation) from ``seed``, the epoch and the DDP rank,
        so a resumed fit's workers draw what the uninterrupted fit's would have. The rank moves the low 32 bits,
        the only ones torch's CPU generator keeps (an odd multiplier: every rank its own seed)."""
        if self.workers_generator is not None:
            self.workers_generator.manual_seed((((seed * 1_000_003 + self.epoch) ^ 0x5EED) + rank * 0x9E3779B9) % 2**64)

    def resume_at(self, position: int) -> None:
        """Start the next pass over this epoch at ``position`` of its order (a fit resumed from a checkpoint saved
        partway through the epoch: the examples before it were trained on); later passes, and a pass over
        another epoch, start at 0."""
        self.start = (self.epoch, max(0, int(position)))

    def _resumed(self, order: list[int]) -> list[int]:
        start = self.start[1] if self.start is not None and self.start[0] == self.epoch else 0
        self.start = None
        return order[start:]


class EpochRandomSampler(_ResumablePass, RandomSampler):
    """Shuffles anew each epoch, in an order that depends only on ``seed`` and the epoch.

    Lightning calls :meth:`set_epoch` before every epoch. Unlike a plain shuffling loader, drawing the
    order does not touch the global random number generator, so the data order of a resumed run is the
    order the uninterrupted run would have used (and Monte Carlo draws do not shift the data order).
    ``workers_generator``, the loader's ``generator``, is reseeded from ``seed`` and the epoch too: the
    loader's worker processes (started anew each epoch) take their random state, e.g. for data
    augmentation, from it. Under DDP bdl's data modules use :class:`_ResumableDistributedSampler` instead.
    """

    def __init__(self, data_source: Sized, seed: int = 0, workers_generator: Optional[torch.Generator] = None) -> None:
        super().__init__(data_source)
        self.seed, self.workers_generator = int(seed), workers_generator
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._seed_workers(self.seed)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        yield from self._resumed(torch.randperm(len(self.data_source), generator=generator).tolist())


class _ResumableDistributedSampler(_ResumablePass, DistributedSampler):
    """The ``DistributedSampler`` Lightning puts under a DDP training loader (the same seed, so the same order),
    able to start a resumed epoch partway, and reseeding its loader's workers each epoch (from ``workers_seed``,
    the epoch and the rank), as :class:`EpochRandomSampler` does on one process."""

    def __init__(
        self, dataset: Dataset, *, workers_seed: int = 0, workers_generator: Optional[torch.Generator] = None, **kwargs: Any
    ) -> None:
        super().__init__(dataset, **kwargs)
        self.workers_seed, self.workers_generator = int(workers_seed), workers_generator
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self._seed_workers(self.workers_seed, self.rank)

    def __iter__(self) -> Iterator[int]:
        return iter(self._resumed(list(super().__iter__())))


class UncertaintyDataModule(L.LightningDataModule):
    """Base of bdl's data modules: seeded splits, loaders, and an optional OOD set.

    Subclasses implement :meth:`build` (returning :class:`bdl.data.Splits`) and set ``task``
    (``"classification"`` or ``"regression"``). :meth:`prepare_data` may download; :meth:`build` runs in
    every process and must not.

    Args:
        batch_size: training batch size.
        eval_batch_size: batch size of validation/test/OOD loaders (default ``batch_size``).
        num_workers: DataLoader worker processes.
        seed: seed of the random train/val/test split.

    Example:
        >>> class Toy(UncertaintyDataModule):
        ...     def build(self):
        ...         data = TensorDataset(torch.randn(10, 3), torch.randint(0, 2, (10,)))
        ...         return Splits(data, data, data, ood=TensorDataset(torch.randn(4, 3)), num_classes=2)
        >>> data = Toy(batch_size=4)
        >>> data.num_train, data.num_classes, data.ood_name, len(data.test_dataloader())
        (10, 2, 'ood', 2)
    """

    task: str = "classification"

    def __init__(self, *, batch_size: int = 64, eval_batch_size: Optional[int] = None, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.eval_batch_size = check_positive_int(batch_size if eval_batch_size is None else eval_batch_size, "eval_batch_size")
        if isinstance(num_workers, bool) or not isinstance(num_workers, numbers.Integral) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        self.num_workers = int(num_workers)  # a numpy integer too
        self.seed = check_seed(seed)  # torch's manual_seed named no argument
        self.splits: Optional[Splits] = None

    def build(self) -> Splits:
        """The train/val/test (and OOD) datasets; called once, lazily, in every process."""
        raise NotImplementedError

    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits is None:
            self.splits = self.build()
            self._fingerprint = None  # a module rebuilt (another fold: splits = None) fingerprints its new splits
            self._split_fingerprint()  # now: a dataset's cache filled as it is read changed it by the first checkpoint
            self._check_trained_split()

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the data: a fingerprint of each split (sizes and sums of its tensors), which a
        load compares with this module's (:meth:`load_state_dict`)."""
        fingerprint = self._split_fingerprint()
        return {} if fingerprint is None else {"split_fingerprint": fingerprint}

    def _split_fingerprint(self) -> Optional[dict[str, Any]]:
        """The train/val/test splits' fingerprints (the OOD set is no training data: another one is no leak), or None
        before they are built."""
        if self.splits is None:
            return None
        if getattr(self, "_fingerprint", None) is None:
            parts = {"train": self.splits.train, "val": self.splits.val, "test": self.splits.test}
            self._fingerprint = {name: _fingerprint(part) for name, part in parts.items()}
        return self._fingerprint

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Warn where a checkpoint's model was trained on other splits than this module gives: a test set holding rows
        it trained on (another ``seed`` or fractions in ``bdl evaluate``) gave a report that overstated it."""
        self._trained_split = state_dict.get("split_fingerprint")
        self._check_trained_split()

    def _check_trained_split(self) -> None:
        trained = getattr(self, "_trained_split", None)
        if trained is None or self.splits is None:  # compared once the splits are built
            return
        self._trained_split = None
        ours = self._split_fingerprint() or {}
        differ = [name for name in ("train", "val", "test") if not _same_fingerprint(trained.get(name), ours.get(name))]
        if differ:
            rank_zero_warn(
                f"{type(self).__name__}: the checkpoint's model was trained with other data splits than this data module "
                f"gives ({', '.join(differ)} differ): rows it trained on may now be in the validation or test set, where "
                "they overstate the model (a report, or the checkpoint a resumed fit keeps); use the data options of its "
                "run (its config.yaml), unless the data is new to it"
            )

    def _built(self) -> Splits:
        self.setup()
        assert self.splits is not None
        return self.splits

    @property
    def num_train(self) -> int:
        """Size of the whole training set (all processes together): the ``num_data`` of the ELBO."""
        return len(self._built().train)

    @property
    def num_classes(self) -> Optional[int]:
        """Number of classes of the training labels (held-out OOD classes not counted), None for regression."""
        return self._built().num_classes

    @property
    def ood_name(self) -> Optional[str]:
        """What the OOD set is (shown in reports), or None without one."""
        return "ood" if self._built().ood is not None else None

    def _loader(self, dataset: Dataset, *, train: bool = False) -> DataLoader:
        # The training order and the workers' base seed come from torch's initial seed (seed_everything's),
        # not from draws on the global generator: see EpochRandomSampler. Training workers start anew each
        # epoch, seeded for it: persistent ones continued their random streams from the fit's start, so a
        # resumed fit's augmentations restarted from epoch 0's.
        seed = torch.initial_seed() % 2**31
        generator = torch.Generator().manual_seed(seed)
        sampler: Any = EpochRandomSampler(dataset, seed, generator) if train else None
        trainer = getattr(self, "trainer", None)
        replicas = _distributed_sampler_kwargs(trainer) if train and trainer is not None else None
        if replicas is not None:  # the sampler Lightning would put there (its replicas and seed), able to resume partway
            sampler = _ResumableDistributedSampler(
                dataset,
                **replicas,
                shuffle=not trainer.overfit_batches,
                seed=int(os.getenv("PL_GLOBAL_SEED", 0)),
                workers_seed=seed,
                workers_generator=generator,
            )
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0 and not train,
            generator=generator,
        )

    def train_dataloader(self) -> DataLoader:
        loader = self._loader(self._built().train, train=True)
        # a resumed fit starts its workers (which draw their first indices) before Lightning's set_epoch: the
        # sampler starts at the epoch the fit resumes at, or the first epoch replayed epoch 0's order
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            loader.sampler.set_epoch(trainer.fit_loop.epoch_progress.current.processed)
            # from a checkpoint saved partway through an epoch (val_check_interval < 1, every_n_train_steps: the epoch
            # started, not processed) Lightning runs the epoch's remaining batches, from a fresh iterator: they start
            # where the interrupted run was, after the batches whose training step ran ("completed" lags by one for
            # a checkpoint saved in on_train_batch_end: Lightning adds it later, in the epoch loop's reset)
            epochs = trainer.fit_loop.epoch_progress.current
            if epochs.started > epochs.processed:
                loader.sampler.resume_at(trainer.fit_loop.epoch_loop.batch_progress.current.processed * self.batch_size)
        return loader

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._built().val)

    def test_dataloader(self) -> Union[DataLoader, list[DataLoader]]:
        """The test loader, followed by the OOD loader when there is an OOD set."""
        splits = self._built()
        test = self._loader(splits.test)
        return test if splits.ood is None else [test, self._loader(splits.ood)]

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self._built().test)

    def ood_dataloader(self) -> Optional[DataLoader]:
        """The OOD loader (``eval_batch_size``, not shuffled), or None without an OOD set."""
        splits = self._built()
        return None if splits.ood is None else self._loader(splits.ood)


_DATA_ATTRIBUTES = ("tensors", "data", "images", "inputs", "x", "targets", "labels", "y")  # what a dataset's items are made of


def _fingerprint(dataset: Optional[Dataset]) -> Optional[list[Any]]:
    """``[type, size, sums of each tensor...]`` of a dataset (a TensorDataset's tensors, another's data tensors by
    their usual names, a Subset's indices and its dataset's); None for no dataset. A floating tensor gives
    ``["float", sum, sum of |values|]`` in float64 (by blocks: a float64 copy of a large dataset at once cost 3x its
    memory), an integer one (labels, indices) its exact ``["int", sum]`` (and ``sum of squares`` for indices);
    tensors that cannot be summed (nested, meta, complex) are left out."""
    if dataset is None:
        return None
    if isinstance(dataset, Subset):  # as_tensor: a tensor of indices listed made one 0-d tensor per index (9 s for 2M)
        indices = torch.as_tensor(dataset.indices).long()
        return ["Subset", len(dataset), ["int", int(indices.sum()), int(indices.square().sum())], _fingerprint(dataset.dataset)]
    if isinstance(dataset, TensorDataset):
        tensors = list(dataset.tensors)
    else:  # its data, not any tensor it holds (a cache filled as it is read differed between identical splits)
        tensors = [value for name in _DATA_ATTRIBUTES if isinstance(value := getattr(dataset, name, None), torch.Tensor)]
        if not tensors:  # other names (self.X, self.features): every tensor it holds
            tensors = [value for value in vars(dataset).values() if isinstance(value, torch.Tensor)]
    sums: list[Any] = []
    for t in tensors:
        if t.is_complex() or t.is_nested or t.is_meta or t.layout != torch.strided:
            continue
        if not t.is_floating_point():  # exact, whatever the order of the sum (integer arithmetic)
            sums.append(["int", int(t.sum(dtype=torch.int64))])
            continue
        total = size = 0.0
        for block in t.reshape(-1).split(1 << 22):
            total += float(block.sum(dtype=torch.float64))
            size += float(block.abs().sum(dtype=torch.float64))
        sums.append(["float", total, size])
    return [type(dataset).__name__, len(dataset) if isinstance(dataset, Sized) else None, *sums]


def _same_fingerprint(a: Any, b: Any) -> bool:  # noqa: ANN401
    """Equal fingerprints: integer sums exactly, a floating tensor's sum and sum of ``|values|`` each to ``1e-6`` of
    the latter (float32 data built by other CPU kernels differ in their last bits, and standardised columns sum to
    about 0: 1e-9 of the sum warned of identical splits); non-finite sums only as they are (NaN beside NaN alike)."""
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b) == 3 and a[0] == b[0] == "float":
        tolerance = 1e-6 * max(abs(a[2]), abs(b[2]))

        def close(x: float, y: float) -> bool:
            if not (math.isfinite(x) and math.isfinite(y)):  # inf beside -inf, or beside a number, is another
                return x == y or (math.isnan(x) and math.isnan(y))
            return abs(x - y) <= tolerance

        return close(a[1], b[1]) and close(a[2], b[2])
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_fingerprint(x, y) for x, y in zip(a, b))
    return a == b


def _distributed_sampler_kwargs(trainer: Any) -> Optional[dict[str, Any]]:  # noqa: ANN401
    """``num_replicas`` and ``rank`` of the ``DistributedSampler`` Lightning puts under the loaders, or None where it
    puts none: as Lightning decides, with a distributed strategy (any DDP, on one device too) and
    ``use_distributed_sampler`` on (the default), over the strategy's data-parallel processes (not the
    tensor-parallel ranks of a ``ModelParallelStrategy``, which share one batch)."""
    connector = getattr(trainer, "_accelerator_connector", None)
    if not getattr(connector, "use_distributed_sampler", True) or not getattr(connector, "is_distributed", trainer.world_size > 1):
        return None
    kwargs = getattr(trainer, "distributed_sampler_kwargs", None)
    if kwargs is None:
        return None
    return {"num_replicas": kwargs["num_replicas"], "rank": kwargs["rank"]}


def uniform_noise_like(inputs: torch.Tensor, num_samples: int, seed: int) -> TensorDataset:
    """``num_samples`` inputs drawn uniformly per feature over the range of ``inputs`` (labels -1)."""
    generator = torch.Generator().manual_seed(seed)
    low, high = inputs.amin(0), inputs.amax(0)
    noise = low + (high - low) * torch.rand((num_samples, *inputs.shape[1:]), generator=generator)
    return TensorDataset(noise, torch.full((num_samples,), -1, dtype=torch.long))


class DigitsDataModule(UncertaintyDataModule):
    """scikit-learn's bundled 8x8 digits (64 features, standardised on train), with an OOD split.

    Inputs are ``[64]`` feature vectors (for MLPs), or ``[1, 8, 8]`` images with ``flatten=False`` (for CNNs).

    ``ood="classes"`` holds the digits ``ood_classes`` out of training and uses their images as OOD
    inputs (the other classes are relabelled ``0 .. C-1``); ``ood="noise"`` keeps all ten classes and
    uses uniform noise over each feature's training range; ``ood=None`` has no OOD set.

    Args:
        ood: ``"classes"``, ``"noise"`` or None (no OOD set).
        ood_classes: the digits held out as the OOD set; used only with ``ood="classes"``.
        num_noise: number of uniform-noise OOD inputs; used only with ``ood="noise"``.
        val_fraction, test_fraction: fractions of the in-distribution images for validation and testing.
        flatten: give ``[64]`` vectors (True) or ``[1, 8, 8]`` images (False); the same standardised values.
        batch_size, eval_batch_size, num_workers, seed: see :class:`UncertaintyDataModule` (``seed`` also
            seeds the noise).

    Example:
        >>> data = DigitsDataModule(ood="classes", ood_classes=[8, 9])
        >>> data.num_classes, data.num_train, data.ood_name
        (8, 938, 'digits 8, 9')
        >>> x, y = next(iter(DigitsDataModule(flatten=False).train_dataloader()))
        >>> x.shape
        torch.Size([64, 1, 8, 8])
    """

    def __init__(
        self,
        *,
        ood: Optional[Literal["classes", "noise"]] = "classes",
        ood_classes: Sequence[int] = (8, 9),
        num_noise: int = 300,
        val_fraction: float = 0.15,
        test_fraction: float = 0.2,
        flatten: bool = True,
        batch_size: int = 64,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed)
        if ood not in ("classes", "noise", None):
            raise ValueError(f"ood must be 'classes', 'noise' or None, got {ood!r}")
        # checked also where unused (ood 'noise' or None): a number ("ood_classes: 8") is refused
        self.ood_classes = check_ood_classes(ood_classes, 10)
        if ood == "classes" and not self.ood_classes:
            raise ValueError("ood='classes' needs ood_classes: the digits to hold out, e.g. [8, 9]")
        check_fractions(val_fraction, test_fraction)
        self.ood = ood
        self.num_noise = check_positive_int(num_noise, "num_noise")
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.flatten = check_bool(flatten, "flatten")

    @property
    def ood_name(self) -> Optional[str]:
        if self.ood == "classes":
            return "digits " + ", ".join(map(str, self.ood_classes))
        return "uniform noise" if self.ood == "noise" else None

    def build(self) -> Splits:
        held_out = self.ood_classes if self.ood == "classes" else ()
        splits = load_digits(seed=self.seed, val_fraction=self.val_fraction, test_fraction=self.test_fraction, ood_classes=held_out)
        if self.ood == "noise":
            splits.ood = uniform_noise_like(splits.train.tensors[0], self.num_noise, self.seed)
        if not self.flatten:
            for name in ("train", "val", "test", "ood"):
                part = getattr(splits, name)
                if part is not None:
                    x, *rest = part.tensors
                    setattr(splits, name, TensorDataset(x.reshape(len(x), 1, 8, 8), *rest))
        return splits


class MNIST1DDataModule(UncertaintyDataModule):
    """MNIST-1D (Greydanus 2020): 4000 train / 1000 test signals of length 40, made by the ``mnist1d`` code.

    ``val_fraction`` of the 4000 training signals form the validation set. ``ood_classes`` (optional)
    are held out of training and testing and form the OOD set. ``cache_dir`` keeps the generated arrays.
    Inputs are ``[N, 40]``; set ``channels=True`` for ``[N, 1, 40]`` (1-D CNNs).

    Args:
        ood_classes: classes held out as the OOD set (their training and test signals); the other classes are
            relabelled ``0 .. C-1``. Empty (the default): all ten classes, no OOD set.
        channels: give ``[N, 1, 40]`` inputs instead of ``[N, 40]``.
        val_fraction: fraction of the (in-distribution) training signals used for validation.
        cache_dir: folder to keep the generated arrays in (``mnist1d.npz``), or None.
        batch_size, eval_batch_size, num_workers, seed: see :class:`UncertaintyDataModule` (``seed`` picks the
            train/validation split; the signals themselves are fixed).

    Example:
        >>> data = MNIST1DDataModule(ood_classes=[8, 9], channels=True)  # nothing generated until used
        >>> data.ood_name, data.batch_size
        ('classes 8, 9', 128)
    """

    def __init__(
        self,
        *,
        ood_classes: Sequence[int] = (),
        channels: bool = False,
        val_fraction: float = 0.1,
        cache_dir: Optional[str] = None,
        batch_size: int = 128,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed)
        self.ood_classes = check_ood_classes(ood_classes, 10)
        check_fractions(val_fraction)
        self.channels = check_bool(channels, "channels")
        self.val_fraction = val_fraction
        self.cache_dir = cache_dir

    @property
    def ood_name(self) -> Optional[str]:
        return "classes " + ", ".join(map(str, self.ood_classes)) if self.ood_classes else None

    def prepare_data(self) -> None:
        if self.cache_dir is not None:  # generate once, before DDP processes read the cache
            load_mnist1d(seed=self.seed, val_fraction=self.val_fraction, cache_dir=self.cache_dir)

    def build(self) -> Splits:
        splits = load_mnist1d(seed=self.seed, val_fraction=self.val_fraction, ood_classes=self.ood_classes, cache_dir=self.cache_dir)
        if self.channels:
            for name in ("train", "val", "test", "ood"):
                dataset = getattr(splits, name)
                if dataset is not None:
                    x, y = dataset.tensors
                    setattr(splits, name, TensorDataset(x.unsqueeze(1), y))
        return splits


class TwoMoonsDataModule(UncertaintyDataModule):
    """Two interleaved half circles (binary classification); OOD: uniform noise on a wider box (optional).

    The OOD set is ``num_samples // 4`` points drawn uniformly on ``[-3, 4] x [-3, 3]`` (the noise-free
    moons lie in ``[-1, 2] x [-0.5, 1]``), labelled ``-1``.

    Args:
        num_samples: points of the two moons, split into training, validation (15%) and test (20%) points.
        noise: standard deviation of the Gaussian noise added to the points (scikit-learn's ``make_moons``).
        ood: add the uniform-noise OOD set.
        batch_size, eval_batch_size, num_workers, seed: see :class:`UncertaintyDataModule` (``seed`` also
            seeds the points and the OOD set).

    Example:
        >>> data = TwoMoonsDataModule(num_samples=200)
        >>> data.num_classes, data.num_train
        (2, 130)
    """

    def __init__(
        self,
        *,
        num_samples: int = 1000,
        noise: float = 0.1,
        ood: bool = True,
        batch_size: int = 64,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed)
        self.num_samples = check_positive_int(num_samples, "num_samples")
        check_noise(noise)
        self.noise = noise
        self.ood = check_bool(ood, "ood")

    @property
    def ood_name(self) -> Optional[str]:
        return "uniform noise on [-3, 4] x [-3, 3]" if self.ood else None

    def build(self) -> Splits:
        splits = two_moons(self.num_samples, noise=self.noise, seed=self.seed)
        if self.ood:
            generator = torch.Generator().manual_seed(self.seed + 1)
            points = torch.rand(self.num_samples // 4, 2, generator=generator) * torch.tensor([7.0, 6.0]) - torch.tensor([3.0, 3.0])
            splits.ood = TensorDataset(points, torch.full((len(points),), -1, dtype=torch.long))
        return splits


class RegressionGapDataModule(UncertaintyDataModule):
    """1-D heteroscedastic regression with no training inputs in ``gap`` (see :func:`bdl.data.regression_with_gap`).

    The OOD set is 50 inputs evenly spaced over the gap (with noise-free targets), where epistemic
    uncertainty should rise.

    Args:
        num_samples: training, validation (15%) and test (20%) points together, all outside ``gap``.
        gap: ``(low, high)``, the interval without training inputs, inside ``domain``.
        domain: ``(low, high)``, the interval the inputs are drawn from.
        noise: ``(at 0, at the edge)``: the noise standard deviation at ``x = 0`` and at the largest ``|x|``
            of ``domain``, linear in ``|x|`` between.
        batch_size, eval_batch_size, num_workers, seed: see :class:`UncertaintyDataModule` (``seed`` also
            seeds the inputs and the noise).

    Example:
        >>> data = RegressionGapDataModule(num_samples=100)
        >>> data.task, data.num_train
        ('regression', 65)
    """

    task = "regression"

    def __init__(
        self,
        *,
        num_samples: int = 400,
        gap: tuple[float, float] = (-1.0, 1.0),
        domain: tuple[float, float] = (-4.0, 4.0),
        noise: tuple[float, float] = (0.05, 0.3),
        batch_size: int = 64,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed)
        self.num_samples = check_positive_int(num_samples, "num_samples")
        check_noise(noise, count=2)
        gap, domain = _check_interval(gap, "gap"), _check_interval(domain, "domain")  # "ab" failed at the "<" below
        if not (domain[0] < gap[0] < gap[1] < domain[1]):
            raise ValueError(f"gap must lie inside domain, got gap={tuple(gap)} and domain={tuple(domain)}")
        self.gap, self.domain, self.noise = tuple(gap), tuple(domain), tuple(noise)

    @property
    def ood_name(self) -> Optional[str]:
        return f"inputs in the gap {list(self.gap)}"

    def build(self) -> Splits:
        return regression_with_gap(self.num_samples, seed=self.seed, gap=self.gap, domain=self.domain, noise=self.noise)
