"""Data modules for tables of numbers: a CSV or NPZ file, or a regression data set bundled with scikit-learn.

:class:`TabularDataModule` reads the columns named by ``features`` and ``target``, splits the rows
(seeded) into train/validation/test, and standardises the features with the mean and standard deviation
of the training rows only (regression targets too, with the statistics kept so predictions can be mapped
back). Classification targets become labels ``0 .. C-1`` (the sorted distinct values, kept in ``classes``).
It has no OOD set.

:class:`SklearnRegressionDataModule` does the same for scikit-learn's bundled diabetes data (no file,
no download), and holds out the rows with the most extreme values of one feature as an OOD set.
"""

from __future__ import annotations

import csv
import math
import numbers
import os
import warnings
from typing import Literal, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from ..data.offline import Splits, _split_indices, check_fractions
from .data import TASKS, UncertaintyDataModule


def _not_a_number(path: str, column: str, row: int, value: object) -> ValueError:
    return ValueError(
        f"{path}: column {column!r}, row {row} (counting data rows from 0) holds {value!r}, not a finite number; "
        "every feature and target value must be numeric"
    )


def _read_csv(path: str, columns: Optional[Sequence[str]], target: str, labels: bool) -> tuple[dict[str, np.ndarray], list[str]]:
    """The numeric columns of a CSV with a header row: ``({name: float64 [N]}, all column names)``; ``labels``: the
    target holds class codes (refused past 2^53, where float64 rounds neighbours together)."""
    try:
        return _read_csv_text(path, columns, target, labels)
    except UnicodeDecodeError as error:  # Excel's default cp1252, or its UTF-16 "Unicode Text": a bare decode error
        raise ValueError(
            f"{path} is not UTF-8 text ({error.reason}): save it as UTF-8 (Excel: \"CSV UTF-8\")"
        ) from None


def _read_csv_text(path: str, columns: Optional[Sequence[str]], target: str, labels: bool) -> tuple[dict[str, np.ndarray], list[str]]:
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: the byte-order mark Excel writes
        rows = csv.reader(f)
        header = [name.strip() for name in next((fields for fields in rows if fields), [])]  # blank lines before it too
        if not header:
            raise ValueError(f"{path} is empty: a CSV needs a header row naming its columns")
        unnamed = [position + 1 for position, name in enumerate(header) if not name]
        if columns is None and unnamed:  # pandas' to_csv writes its row index so: the row number was a feature
            raise ValueError(
                f"{path}: column{'s' * (len(unnamed) > 1)} {', '.join(map(str, unnamed))} of the header "
                f"{'have' if len(unnamed) > 1 else 'has'} no name (pandas' to_csv writes its row index so; a comma at "
                "each line's end too): save the file with to_csv(index=False), or pass features= naming the columns to "
                f"use{_headerless([name for name in header if name])}"
            )
        wanted = [name for name in header if name != target] if columns is None else list(columns)
        used = header if columns is None else [*wanted, target]
        repeated = sorted({name for name in used if header.count(name) > 1})
        if repeated:  # a name could only ever select the first of them
            raise ValueError(f"{path}: the header names {repeated} more than once; give every column its own name{_headerless(header)}")
        _check_names(path, [*wanted, target], header, "columns")
        positions = {name: header.index(name) for name in [*wanted, target]}
        values: dict[str, list[float]] = {name: [] for name in positions}
        # blank lines (one at the end, say) are no data rows: counted, they put other messages' row numbers off by one
        for row, fields in enumerate(fields for fields in rows if fields):
            if len(fields) != len(header):
                raise ValueError(f"{path}: row {row} (counting data rows from 0) has {len(fields)} fields, the header {len(header)}")
            for name, position in positions.items():
                try:
                    if "_" in fields[position]:  # Python's float reads "3_0" as 30: a code, not a number
                        raise ValueError
                    value = float(fields[position])
                except ValueError:
                    raise _not_a_number(path, name, row, fields[position]) from None
                if not math.isfinite(value):
                    raise _not_a_number(path, name, row, fields[position])
                if labels and name == target and abs(value) >= 2**53:  # as an .npz file's: float64 holds every
                    text = fields[position].strip()  # integer up to 2^53 only
                    if text.lstrip("+-").isdigit() and abs(int(text)) > 2**53:
                        raise ValueError(
                            f"{path}: column {name!r}, row {row} (counting data rows from 0) holds an integer beyond "
                            f"2^53 ({text}), which float64 rounds together with its neighbours: map the target to "
                            "smaller codes"
                        )
                values[name].append(value)
    return {name: np.asarray(column, dtype=np.float64) for name, column in values.items()}, header


def _read_npz(path: str, arrays: Optional[Sequence[str]], target: str, labels: bool) -> tuple[dict[str, np.ndarray], list[str]]:
    """The named arrays of an NPZ file as float64, each ``[N]`` or ``[N, k]``."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:  # numpy's message for a file that is no archive speaks of pickles
        raise ValueError(f"{path} cannot be read as an .npz archive of arrays (np.savez writes one): {error}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} holds a single array, not an .npz archive of named arrays (np.savez writes one)")
    with archive as data:
        available = list(data.files)
        wanted = [name for name in available if name != target] if arrays is None else list(arrays)
        _check_names(path, [*wanted, target], available, "arrays")
        raw = {}
        for name in [*wanted, target]:
            try:
                raw[name] = data[name]
            except ValueError as error:  # object arrays need pickle, which is not allowed
                raise ValueError(f"{path}: array {name!r} cannot be read as numbers ({error})") from None
    values = {}
    for name, array in raw.items():
        if array.ndim not in (1, 2) or (name == target and array.ndim == 2 and array.shape[1] != 1):
            shape = "[N] or [N, 1]" if name == target else "[N] or [N, k]"
            raise ValueError(f"{path}: array {name!r} must be {shape}, got shape {list(array.shape)}")
        if labels and name == target and array.dtype.kind in "iu" and array.size and int(np.abs(array).max()) > 2**53:
            # float64 holds every integer up to 2^53 only: codes 2^60 and 2^60 + 1 became one class
            big = int(array.reshape(-1)[np.argmax(np.abs(array.reshape(-1)))])
            raise ValueError(f"{path}: array {name!r} holds integers beyond 2^53 ({big}), which float64 rounds together: map them to smaller codes")
        values[name] = _numeric(path, name, array if name != target else array.reshape(-1))
    lengths = {name: len(array) for name, array in values.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{path}: the arrays must have the same number of rows, got {lengths}")
    return values, available


def _numeric(path: str, name: str, array: np.ndarray) -> np.ndarray:
    try:
        floats = array.astype(np.float64)
    except (TypeError, ValueError):
        floats = None
    if floats is not None and array.dtype.kind in "biuf":
        bad = ~np.isfinite(floats)
    else:  # strings or objects: find the first entry that is not a number
        bad = np.zeros(array.shape, dtype=bool)
        for index, value in np.ndenumerate(array):
            try:
                bad[index] = not math.isfinite(float(value))
            except (TypeError, ValueError):
                bad[index] = True
            if bad[index]:
                break
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        column = name if array.ndim == 1 else f"{name}[{index[1]}]"
        raise _not_a_number(path, column, index[0], array[index].item())
    return floats


def _check_names(path: str, names: Sequence[str], available: Sequence[str], kind: str) -> None:
    repeated = sorted({name for name in names if list(names).count(name) > 1})
    if repeated:
        raise ValueError(f"{path}: {kind} {repeated} asked for more than once (as a feature twice, or as feature and target)")
    unknown = [name for name in names if name not in available]
    if unknown:
        hint = _headerless(available) if kind == "columns" else ""
        raise ValueError(f"{path} has no {kind} {unknown}; available {kind}: {list(available)}{hint}")


def _headerless(header: Sequence[str]) -> str:
    """A hint where a CSV's first row holds numbers only: a file without a header row, read as one."""
    try:
        [float(name) for name in header]
    except ValueError:
        return ""
    return " (its first row holds numbers only: a CSV needs a header row naming its columns)"


def _scale(values: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """The population std of each column of ``values`` (the training rows, columns ``names``), 1 where a column is
    constant.

    A constant column's std is rounding noise (2e-16 for a column of 0.1s), not 0: dividing by it scaled its
    other values in the validation and test rows by about 1e15 (0.2 came out as 4e14). Constant is scikit-learn's test (``StandardScaler``):
    a variance within the rounding error of computing it, which a variance that underflows to 0 also passes.
    A variance that overflows float64 (values of 1e160) is an error: it passed as constant, and the values as inf.
    """
    n, eps = len(values), np.finfo(np.float64).eps
    with np.errstate(over="ignore", invalid="ignore"):
        mean, var = values.mean(0), values.var(0)
    if not np.isfinite(var).all():
        bad = [names[i] for i in np.flatnonzero(~np.isfinite(np.atleast_1d(var)))]
        raise ValueError(
            f"column{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))} hold{'' if len(bad) > 1 else 's'} values too large "
            "to standardise (the variance overflows float64): rescale them"
        )
    constant = var <= n * eps * var + (n * mean * eps) ** 2
    return np.where(constant, 1.0, np.sqrt(var))


def _check_float32(values: np.ndarray, names: Sequence[str], raw: Optional[np.ndarray] = None, train: Optional[np.ndarray] = None) -> None:
    """A ValueError naming the column and row of a value beyond float32's range, which the cast made infinite;
    ``raw`` and ``train``: the values before standardisation (to ``values``) and the training rows' indices."""
    with np.errstate(over="ignore"):
        over = ~np.isfinite(values.astype(np.float32))
    if over.any():
        row, column = np.argwhere(over.reshape(len(values), -1))[0]
        value = float((values if raw is None else raw).reshape(len(values), -1)[row, column])
        if raw is None or abs(value) > float(np.finfo(np.float32).max):
            advice = "rescale it" + (" (or standardize=True)" if raw is None else "")
        else:  # the value standardised overflows: a column that barely varies in the training rows, or not at all
            column_values = raw.reshape(len(raw), -1)[train, column]
            spread = "is constant" if np.ptp(column_values) == 0 else f"has a std of {float(column_values.std()):.3g}"
            advice = f"the column {spread} in the training rows, so it standardises to beyond that range: drop or rescale it"
        raise ValueError(
            f"column {names[column]!r}, row {row} (counting data rows from 0) holds {value:.4g}, which comes out beyond "
            f"float32's range ({np.finfo(np.float32).max:.3g}), the data's dtype: {advice}"
        )


class _StandardizedTable(UncertaintyDataModule):
    """A table of numbers held in memory: seeded train/val/test split, standardisation with training rows only.

    Subclasses read the table (features ``[N, F]``, target ``[N]``, feature names) and call
    :meth:`_make_splits`, optionally with a mask of rows that form the OOD set instead.
    """

    def __init__(
        self,
        *,
        task: str,
        val_fraction: float,
        test_fraction: float,
        standardize: bool,
        batch_size: int,
        eval_batch_size: Optional[int],
        num_workers: int,
        seed: int,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed)
        if task not in TASKS:
            raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
        check_fractions(val_fraction, test_fraction)
        self.task = task
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.standardize = standardize
        self._feature_names: list[str] = []
        self._classes: Optional[list[float]] = None
        self._feature_mean: Optional[Tensor] = None
        self._feature_std: Optional[Tensor] = None
        self._target_mean: Optional[float] = None
        self._target_std: Optional[float] = None

    def _make_splits(self, x: np.ndarray, y: np.ndarray, names: list[str], ood_rows: Optional[np.ndarray] = None) -> Splits:
        """Split the rows not in ``ood_rows`` (a boolean mask ``[N]``) and standardise everything with the training rows.

        The OOD rows, if any, get the same transformation; their targets are kept (standardised for
        regression, ``-1`` for classification, as the other data modules' OOD sets).
        """
        self._feature_names = list(names)
        kept = np.arange(len(y)) if ood_rows is None else np.flatnonzero(~ood_rows)
        parts = _split_indices(len(kept), self.val_fraction, self.test_fraction, torch.Generator().manual_seed(self.seed))
        train_idx, val_idx, test_idx = (kept[part.numpy()] for part in parts)
        if self.standardize:
            raw = x
            mean, std = x[train_idx].mean(0), _scale(x[train_idx], names)
            x = (x - mean) / std
            self._feature_mean, self._feature_std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
            _check_float32(x, names, raw, train_idx)
        else:
            _check_float32(x, names)
        inputs = torch.as_tensor(x, dtype=torch.float32)
        if self.task == "classification":
            classes, labels = np.unique(y[kept], return_inverse=True)
            self._classes = [int(value) if value.is_integer() else float(value) for value in classes]
            if len(classes) < 2:  # a one-class classifier: every probability 1, nothing learnt or measured
                raise ValueError(
                    f"the target takes a single value ({self._classes[0]}) in every row: classification needs at least 2 "
                    "classes (for a continuous target pass task='regression')"
                )
            fractional = ", some fractional," if any(isinstance(value, float) for value in self._classes) else ""
            codes = not fractional and classes[0] in (0, 1) and classes[-1] - classes[0] + 1 == len(classes)  # 0..C-1, 1..C
            if len(classes) > len(kept) / (2 if fractional else 5) and (fractional or (len(classes) > 10 and not codes)):
                # a continuous target read as classes (whole numbers too: diabetes's progress scores gave 214 classes
                # in 442 rows, without a word): a few rows per class, which trains and means little
                warnings.warn(
                    f"{type(self).__name__}: the target takes {len(classes)} distinct values{fractional} in "
                    f"{len(kept)} rows, each its own class under task='classification'; for a continuous target pass "
                    "task='regression'",
                    UserWarning,
                    stacklevel=2,
                )
            targets = torch.full((len(y),), -1, dtype=torch.long)
            targets[torch.as_tensor(kept)] = torch.as_tensor(labels.reshape(-1), dtype=torch.long)
            num_classes: Optional[int] = len(classes)
        else:
            target = str(getattr(self, "target", "target"))  # the file's column name (scikit-learn's data sets: "target")
            if self.standardize:
                raw = y
                mean, std = float(y[train_idx].mean()), float(_scale(y[train_idx], [target]))
                y = (y - mean) / std
                self._target_mean, self._target_std = mean, std
                _check_float32(y, [target], raw, train_idx)
            else:
                _check_float32(y, [target])
            targets = torch.as_tensor(y, dtype=torch.float32).unsqueeze(1)
            num_classes = None
        train, val, test = (TensorDataset(inputs[idx], targets[idx]) for idx in (train_idx, val_idx, test_idx))
        ood = None
        if ood_rows is not None and ood_rows.any():
            ood_idx = np.flatnonzero(ood_rows)
            ood = TensorDataset(inputs[ood_idx], targets[ood_idx])
        return Splits(train, val, test, ood, num_classes=num_classes)

    @property
    def feature_names(self) -> list[str]:
        """Names of the input columns, in order (``name[i]`` for column ``i`` of a 2-D NPZ array)."""
        self._built()
        return list(self._feature_names)

    @property
    def num_features(self) -> int:
        """Number of input columns ``F``."""
        return len(self.feature_names)

    @property
    def classes(self) -> Optional[list[float]]:
        """Original target value of each label (``classes[label]``); None for regression."""
        self._built()
        return None if self._classes is None else list(self._classes)

    @property
    def feature_mean(self) -> Optional[Tensor]:
        """Per-feature training mean ``[F]`` subtracted by the standardisation (None without it)."""
        self._built()
        return self._feature_mean

    @property
    def feature_std(self) -> Optional[Tensor]:
        """Per-feature training standard deviation ``[F]`` divided by (None without standardisation)."""
        self._built()
        return self._feature_std

    @property
    def target_mean(self) -> Optional[float]:
        """Training mean of a regression target (None for classification or without standardisation)."""
        self._built()
        return self._target_mean

    @property
    def target_std(self) -> Optional[float]:
        """Training standard deviation of a regression target (None for classification or without standardisation)."""
        self._built()
        return self._target_std

    def unstandardize_target(self, y: Tensor) -> Tensor:
        """Map standardised regression targets or predicted means back to the original units: ``y * std + mean``.

        Predicted standard deviations only scale: multiply them by :attr:`target_std`.

        Args:
            y: values in standardised units, any shape.

        Returns:
            The values in the original units (unchanged without target standardisation).
        """
        if self.task != "regression":
            raise ValueError(f"unstandardize_target is for regression targets; this data module's task is {self.task!r}")
        self._built()
        if self._target_mean is None:
            return y
        return y * self._target_std + self._target_mean


class TabularDataModule(_StandardizedTable):
    """Rows of numbers from a CSV or NPZ file, split into train/validation/test (no OOD set).

    - CSV (``.csv``): a header row naming the columns, then one row of numbers per example.
      ``features`` and ``target`` are column names; other columns (e.g. an id) are ignored when
      ``features`` is given.
    - NPZ (``.npz``): ``features`` and ``target`` name arrays; a feature array is ``[N]`` (one column)
      or ``[N, k]`` (``k`` columns), so an ``x`` array ``[N, F]`` with a ``y`` array works with
      ``target="y"``.

    ``features=None`` uses every other column or array. The rows are split at random (``seed``) into
    ``val_fraction`` validation, ``test_fraction`` test, and the rest training rows. With
    ``standardize=True`` each feature becomes ``(x - mean) / std`` with ``mean`` and ``std`` (population
    std; 1 for a constant column) taken over the training rows only, kept in ``feature_mean`` and
    ``feature_std``; for regression the target is standardised the same way (``target_mean``,
    ``target_std``): map predictions back with :meth:`unstandardize_target`, and predicted standard
    deviations by multiplying with ``target_std``.

    Classification targets become labels ``0 .. C-1``: the ``i``-th smallest distinct value gets label
    ``i`` (``classes[i]`` is that value), so labels already in ``0 .. C-1`` stay as they are. Inputs are
    float32 ``[N, F]``; targets int64 ``[N]`` (classification) or float32 ``[N, 1]`` (regression).

    Args:
        path: the ``.csv`` or ``.npz`` file.
        target: the column (CSV) or array (NPZ) to predict: one (a single regression output or class label).
        task: ``"classification"`` or ``"regression"``.
        features: the input columns or arrays, or None for all but ``target``.
        val_fraction, test_fraction: fractions of the rows for validation and testing.
        standardize: standardise features (and regression targets) with training statistics.
        batch_size, eval_batch_size, num_workers, seed: see :class:`UncertaintyDataModule`.

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "toy.csv")
        >>> with open(path, "w") as f:
        ...     _ = f.write("size,weight,kind\\n" + "".join(f"{i},{i % 7},{10 * (i % 2)}\\n" for i in range(40)))
        >>> data = TabularDataModule(path, target="kind")
        >>> data.num_classes, data.classes, data.num_train, data.feature_names
        (2, [0, 10], 26, ['size', 'weight'])
    """

    def __init__(
        self,
        path: str,
        target: str,
        *,
        task: Literal["classification", "regression"] = "classification",
        features: Optional[Sequence[str]] = None,
        val_fraction: float = 0.15,
        test_fraction: float = 0.2,
        standardize: bool = True,
        batch_size: int = 64,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        if not isinstance(path, (str, os.PathLike)):  # os.fspath's "expected str, bytes or os.PathLike object"
            raise TypeError(f"path must name a .csv or .npz file (a str or os.PathLike), got {path!r}")
        path = os.fspath(path)
        if not path.lower().endswith((".csv", ".npz")):  # data.CSV too
            raise ValueError(f"path must name a .csv or .npz file, got {path!r}")
        if not isinstance(target, str) or not target:
            raise TypeError(f"target must be a column or array name (str), got {target!r}")
        if features is not None:
            if isinstance(features, str) or not all(isinstance(name, str) for name in features) or not features:
                raise TypeError(f"features must be a non-empty list of column names or None, got {features!r}")
            if target in features:
                raise ValueError(f"target {target!r} cannot also be one of the features {list(features)}")
        super().__init__(
            task=task, val_fraction=val_fraction, test_fraction=test_fraction, standardize=standardize,
            batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed,
        )  # fmt: skip
        self.path, self.target = path, target
        self.features = None if features is None else list(features)

    def _check_file(self) -> None:
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"TabularDataModule: no file at path {self.path!r} (absolute: {os.path.abspath(self.path)!r})")

    def prepare_data(self) -> None:
        self._check_file()

    def _read(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Features ``[N, F]``, target ``[N]`` (float64) and the feature names."""
        if self.path.lower().endswith(".csv"):
            columns, _ = _read_csv(self.path, self.features, self.target, labels=self.task == "classification")
        else:
            columns, _ = _read_npz(self.path, self.features, self.target, labels=self.task == "classification")
        y = columns.pop(self.target)
        if len(y) == 0:
            raise ValueError(f"TabularDataModule: {self.path} has no data rows (path must name a file with at least one row)")
        blocks = [column.reshape(len(y), -1) for column in columns.values()]
        if sum(block.shape[1] for block in blocks) == 0:  # none, or an [N, 0] array
            raise ValueError(f"TabularDataModule: {self.path} has no feature column besides the target {self.target!r}")
        names = [name if block.shape[1] == 1 and column.ndim == 1 else f"{name}[{i}]"
                 for (name, column), block in zip(columns.items(), blocks) for i in range(block.shape[1])]  # fmt: skip
        return np.concatenate(blocks, axis=1), y, names

    def build(self) -> Splits:
        self._check_file()
        x, y, names = self._read()
        try:
            return self._make_splits(x, y, names)
        except ValueError as error:
            raise ValueError(f"{self.path}: {error}") from None


def _load_diabetes() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_diabetes

    data = load_diabetes(scaled=False)  # the raw values: the data module standardises them itself
    return np.asarray(data.data, dtype=np.float64), np.asarray(data.target, dtype=np.float64), list(data.feature_names)


#: Regression data sets bundled with scikit-learn (no download): name -> loader of (features, target, names).
SKLEARN_REGRESSION_DATASETS = {"diabetes": _load_diabetes}
OOD_TAILS = ("high", "low")


class SklearnRegressionDataModule(_StandardizedTable):
    """A regression data set bundled with scikit-learn (no download), with the extreme rows of one feature as OOD.

    ``name="diabetes"`` (Efron et al. 2004): 442 patients, 10 baseline features (``age``, ``sex``,
    ``bmi``, ``bp`` and six blood serum measurements ``s1`` .. ``s6``) and a measure of disease
    progression one year later (25 .. 346) as the target. The raw (unscaled) values are read.

    Out-of-distribution set (covariate shift): with ``ood="high"`` the rows whose ``ood_feature`` lies
    above its ``1 - ood_fraction`` quantile over all rows (``ood="low"``: below its ``ood_fraction``
    quantile) are held out of training, validation and testing and form the OOD set; by default the 10%
    of patients with the highest body-mass index, inputs the model has to extrapolate to. ``ood=None``
    keeps every row. The OOD rows do not depend on ``seed``; the other rows are split at random
    (``seed``) into ``val_fraction`` validation, ``test_fraction`` test and the rest training rows.

    With ``standardize=True`` features and target are standardised with the mean and (population)
    standard deviation of the training rows only (OOD rows too, with the same statistics), so RMSE is
    in units of the training target's standard deviation (:attr:`target_std`; map predictions back with
    :meth:`unstandardize_target`), and a Gaussian NLL in original units is the standardised one plus
    ``log(target_std)``. Inputs are float32 ``[N, F]``, targets float32 ``[N, 1]``.

    Args:
        name: the data set, one of :data:`SKLEARN_REGRESSION_DATASETS` (``"diabetes"``).
        ood: ``"high"``, ``"low"`` (which tail of ``ood_feature`` is OOD) or None (no OOD set).
        ood_feature: the feature whose extreme values form the OOD set.
        ood_fraction: the fraction of rows in that tail, in (0, 0.5].
        val_fraction, test_fraction: fractions of the in-distribution rows for validation and testing.
        standardize: standardise features and target with training statistics.
        batch_size, eval_batch_size, num_workers, seed: see :class:`UncertaintyDataModule`.

    Example:
        >>> data = SklearnRegressionDataModule("diabetes", ood="high", ood_feature="bmi", ood_fraction=0.1)
        >>> data.num_features, data.num_train, len(data.splits.val), len(data.splits.test), len(data.splits.ood)
        (10, 258, 60, 79, 45)
        >>> data.ood_name
        'diabetes rows with bmi above its 90% quantile'
    """

    task = "regression"

    def __init__(
        self,
        name: str = "diabetes",
        *,
        ood: Optional[Literal["high", "low"]] = "high",
        ood_feature: str = "bmi",
        ood_fraction: float = 0.1,
        val_fraction: float = 0.15,
        test_fraction: float = 0.2,
        standardize: bool = True,
        batch_size: int = 32,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        if name not in SKLEARN_REGRESSION_DATASETS:
            raise ValueError(f"name must be one of {sorted(SKLEARN_REGRESSION_DATASETS)}, got {name!r}")
        if ood not in (*OOD_TAILS, None):
            raise ValueError(f"ood must be one of {list(OOD_TAILS)} or None, got {ood!r}")
        ok = isinstance(ood_fraction, numbers.Real) and not isinstance(ood_fraction, bool) and 0 < ood_fraction <= 0.5
        if not ok:
            raise ValueError(f"ood_fraction must be a number in (0, 0.5], got {ood_fraction!r}")
        super().__init__(
            task="regression", val_fraction=val_fraction, test_fraction=test_fraction, standardize=standardize,
            batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed,
        )  # fmt: skip
        self.name, self.ood, self.ood_feature, self.ood_fraction = name, ood, ood_feature, float(ood_fraction)
        if ood is not None:
            names = SKLEARN_REGRESSION_DATASETS[name]()[2]
            if ood_feature not in names:
                raise ValueError(f"ood_feature must be a feature of {name}: one of {names}, got {ood_feature!r}")

    @property
    def ood_name(self) -> Optional[str]:
        if self.ood is None:
            return None
        quantile = f"{100 * (1 - self.ood_fraction if self.ood == 'high' else self.ood_fraction):g}%"
        side = "above" if self.ood == "high" else "below"
        return f"{self.name} rows with {self.ood_feature} {side} its {quantile} quantile"

    def build(self) -> Splits:
        x, y, names = SKLEARN_REGRESSION_DATASETS[self.name]()
        ood_rows = None
        if self.ood is not None:
            values = x[:, names.index(self.ood_feature)]
            if self.ood == "high":
                ood_rows = values > np.quantile(values, 1 - self.ood_fraction)
            else:
                ood_rows = values < np.quantile(values, self.ood_fraction)
            if not ood_rows.any():  # a feature with few values (sex: 1 or 2): the run had no OOD metrics, silently
                raise ValueError(
                    f"ood={self.ood!r} with ood_fraction={self.ood_fraction} selects no row of {self.name}: its "
                    f"{self.ood_feature!r} takes {len(np.unique(values))} distinct values; pick another ood_feature"
                )
        return self._make_splits(x, y, names, ood_rows)
