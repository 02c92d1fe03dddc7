import numpy as np
import pytest
import torch

from bdl.lightning.tabular import SklearnRegressionDataModule, TabularDataModule


def _write_csv(path, header, rows):
    path.write_text(",".join(header) + "\n" + "".join(",".join(str(v) for v in row) + "\n" for row in rows))
    return path


@pytest.fixture
def table():
    """40 rows: an id (0..39), two features on different scales, a 3-class label and a real target."""
    rng = np.random.default_rng(0)
    ids = np.arange(40)
    a, b = rng.normal(5.0, 2.0, 40), rng.normal(-100.0, 30.0, 40)
    label = rng.choice([2, 5, 9], 40)
    value = 3 * a + rng.normal(0, 1, 40) + 50
    return {"id": ids, "a": a, "b": b, "label": label, "value": value}


def _csv(tmp_path, table):
    names = list(table)
    return _write_csv(tmp_path / "table.csv", names, zip(*(table[name].tolist() for name in names)))


def _all_rows(data):
    """Concatenate train, val and test, with the row ids recovered from the standardised id feature."""
    splits = data._built()
    ids = []
    for part in (splits.train, splits.val, splits.test):
        x = part.tensors[0].double() * data.feature_std.double() + data.feature_mean.double()
        ids.append(x[:, 0].round().long())
    return ids


def test_csv_classification_maps_sorted_values_to_labels(tmp_path, table):
    data = TabularDataModule(str(_csv(tmp_path, table)), "label", features=["id", "a", "b"], seed=1)
    data.setup()
    assert data.task == "classification" and data.num_classes == 3 and data.classes == [2, 5, 9]
    assert data.feature_names == ["id", "a", "b"] and data.num_features == 3 and data.ood_name is None
    train_ids, val_ids, test_ids = _all_rows(data)
    assert (len(train_ids), len(val_ids), len(test_ids)) == (26, 6, 8)
    assert sorted(torch.cat([train_ids, val_ids, test_ids]).tolist()) == list(range(40))
    x, y = data.splits.train.tensors
    assert x.dtype == torch.float32 and y.dtype == torch.long and y.shape == (26,)
    expected = torch.as_tensor(np.searchsorted([2, 5, 9], table["label"][train_ids.numpy()]))
    assert torch.equal(y, expected)
    assert not isinstance(data.test_dataloader(), list)


def test_features_are_standardised_with_training_rows_only(tmp_path, table):
    data = TabularDataModule(str(_csv(tmp_path, table)), "label", features=["id", "a", "b"], seed=2)
    train_ids = _all_rows(data)[0].numpy()
    raw = np.stack([table["id"], table["a"], table["b"]], axis=1)
    mean, std = raw[train_ids].mean(0), raw[train_ids].std(0)
    torch.testing.assert_close(data.feature_mean, torch.tensor(mean, dtype=torch.float32))
    torch.testing.assert_close(data.feature_std, torch.tensor(std, dtype=torch.float32))
    assert abs(mean[1] - table["a"].mean()) > 1e-3  # the whole table's mean would differ
    x = data.splits.train.tensors[0]
    torch.testing.assert_close(x, torch.tensor((raw[train_ids] - mean) / std, dtype=torch.float32))
    torch.testing.assert_close(x.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    assert data.splits.test.tensors[0].mean(0).abs().max() > 1e-3


def test_a_column_constant_in_the_training_rows_gets_scale_one(tmp_path):
    # a column of 0.1s has a std of rounding noise (2e-16), not 0: other values in the test rows were scaled by 1e15
    n = 120
    first = TabularDataModule(_npz(tmp_path / "a.npz", n, np.full(n, 0.1)), "y", task="regression", standardize=False)
    test_ids = first._built().test.tensors[0][:, 0].long().numpy()
    dose = np.full(n, 0.1)
    dose[test_ids[:3]] = 0.2  # every training row keeps 0.1
    target = np.full(n, 0.7)
    target[test_ids[:3]] = 1.7
    data = TabularDataModule(_npz(tmp_path / "b.npz", n, dose, target), "y", task="regression")
    assert data.feature_std[1].item() == 1.0 and data.target_std == 1.0
    x, y = data._built().test.tensors
    assert x[:, 1].abs().max().item() == pytest.approx(0.1) and y.abs().max().item() == pytest.approx(1.0)
    # constant up to rounding (0.3 - 0.2 among the 0.1s), and distinct values whose variance underflows to 0
    dose[::2] = 0.3 - 0.2
    tiny = np.where(np.arange(n) % 2 == 0, 0.0, 1e-170)
    np.savez(tmp_path / "c.npz", id=np.arange(n, dtype=float), dose=dose, tiny=tiny, y=np.arange(n, dtype=float))
    data = TabularDataModule(str(tmp_path / "c.npz"), "y", task="regression")
    assert data.feature_std[1:].tolist() == [1.0, 1.0] and data._built().test.tensors[0].abs().max() < 10


def _npz(path, n, dose, target=None):
    np.savez(path, id=np.arange(n, dtype=float), dose=dose, y=np.arange(n, dtype=float) if target is None else target)
    return str(path)


def test_regression_target_is_standardised_on_train_and_can_be_undone(tmp_path, table):
    data = TabularDataModule(str(_csv(tmp_path, table)), "value", task="regression", features=["id", "a"])
    train_ids, _, test_ids = _all_rows(data)
    assert data.num_classes is None and data.classes is None
    assert data.target_mean == pytest.approx(table["value"][train_ids.numpy()].mean())
    assert data.target_std == pytest.approx(table["value"][train_ids.numpy()].std())
    y_test = data.splits.test.tensors[1]
    assert y_test.shape == (8, 1) and y_test.dtype == torch.float32
    original = data.unstandardize_target(y_test).squeeze(1).double()
    torch.testing.assert_close(original, torch.as_tensor(table["value"][test_ids.numpy()]), rtol=1e-6, atol=1e-4)
    raw = TabularDataModule(str(_csv(tmp_path, table)), "value", task="regression", features=["a"], standardize=False)
    assert raw.target_mean is None and raw.feature_mean is None
    assert set(raw.splits.train.tensors[1].squeeze(1).tolist()) <= set(torch.tensor(table["value"], dtype=torch.float32).tolist())
    with pytest.raises(ValueError, match="regression"):
        TabularDataModule(str(_csv(tmp_path, table)), "label").unstandardize_target(y_test)


def test_default_features_are_all_other_columns_and_loaders_batch(tmp_path, table):
    data = TabularDataModule(str(_csv(tmp_path, table)), "label", batch_size=8)
    assert data.feature_names == ["id", "a", "b", "value"]
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (8, 4) and y.shape == (8,)


def test_a_csv_with_a_byte_order_mark_reads_its_first_column(tmp_path, table):
    # Excel's UTF-8 CSVs begin with a byte-order mark: the first column was named '\ufefflabel'
    path = _csv(tmp_path, table)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    first = path.read_text(encoding="utf-8-sig").split(",")[0]
    data = TabularDataModule(str(path), first)
    data.setup()
    assert data.num_train > 0


def test_same_seed_same_split(tmp_path, table):
    path = str(_csv(tmp_path, table))

    def test_ids(seed):
        return _all_rows(TabularDataModule(path, "label", features=["id"], seed=seed))[2]

    assert torch.equal(test_ids(4), test_ids(4)) and not torch.equal(test_ids(4), test_ids(5))


def test_npz_x_and_y_arrays_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 3)), rng.integers(0, 4, 30)
    x[:, 0] = np.arange(30)  # row ids, to find the rows again
    np.savez(tmp_path / "data.npz", x=x, y=y)
    data = TabularDataModule(str(tmp_path / "data.npz"), "y", standardize=False, val_fraction=0.2, test_fraction=0.2)
    assert data.feature_names == ["x[0]", "x[1]", "x[2]"] and data.classes == [0, 1, 2, 3]
    for part in (data.splits.train, data.splits.val, data.splits.test):
        inputs, labels = part.tensors
        rows = inputs[:, 0].long().numpy()
        torch.testing.assert_close(inputs, torch.tensor(x[rows], dtype=torch.float32))
        assert torch.equal(labels, torch.as_tensor(y[rows]))  # labels 0..C-1 stay as they are
    assert [len(data.splits.train), len(data.splits.val), len(data.splits.test)] == [18, 6, 6]


def test_a_continuous_target_read_as_classes_gets_a_hint_of_task_regression(tmp_path):
    # 40 rows of a continuous target became 40 classes under the default task, without a word
    import warnings

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.normal(size=(40, 3)), y=rng.normal(size=40))
    with pytest.warns(UserWarning, match="the target takes 40 distinct values, some fractional, in 40 rows.*task='regression'"):
        assert TabularDataModule(str(tmp_path / "data.npz"), "y").num_classes == 40
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TabularDataModule(str(tmp_path / "data.npz"), "y", task="regression").setup()  # (.splits is None until then)
        np.savez(tmp_path / "labels.npz", x=rng.normal(size=(40, 3)), y=rng.integers(0, 10, 40).astype(float))
        assert TabularDataModule(str(tmp_path / "labels.npz"), "y").num_classes == 10  # whole numbers: class codes
        codes = np.concatenate([np.arange(20), rng.integers(0, 20, 70)])  # 20 classes in 90 rows, codes 0 .. 19
        np.savez(tmp_path / "codes.npz", x=rng.normal(size=(90, 3)), y=codes)
        assert TabularDataModule(str(tmp_path / "codes.npz"), "y").num_classes == 20
    ages = np.concatenate([np.arange(18, 81), rng.integers(18, 81, 187)])  # whole numbers without gaps, not codes
    np.savez(tmp_path / "ages.npz", x=rng.normal(size=(250, 3)), y=ages)
    with pytest.warns(UserWarning, match=r"the target takes 63 distinct values in 250 rows"):
        TabularDataModule(str(tmp_path / "ages.npz"), "y").setup()
    # whole-number scores (diabetes's disease progress: 214 classes in 442 rows) were read as classes without a word
    np.savez(tmp_path / "scores.npz", x=rng.normal(size=(100, 3)), y=rng.integers(25, 347, 100))
    with pytest.warns(UserWarning, match=r"the target takes \d+ distinct values in 100 rows, each its own class.*task='regression'"):
        TabularDataModule(str(tmp_path / "scores.npz"), "y").setup()


def test_npz_named_one_dimensional_arrays(tmp_path, table):
    np.savez(tmp_path / "t.npz", **table)
    data = TabularDataModule(str(tmp_path / "t.npz"), "value", task="regression", features=["a", "b"], standardize=False)
    assert data.feature_names == ["a", "b"]
    x, y = data.splits.train.tensors
    row = int(np.flatnonzero(np.isclose(table["a"], x[0, 0].item()))[0])
    assert x[0, 1].item() == pytest.approx(table["b"][row], rel=1e-6)
    assert y[0, 0].item() == pytest.approx(table["value"][row], rel=1e-6)


def test_missing_file_names_the_path(tmp_path):
    data = TabularDataModule(str(tmp_path / "nope.csv"), "y")
    for step in (data.prepare_data, data.setup):
        with pytest.raises(FileNotFoundError, match="nope.csv"):
            step()


def test_unknown_columns_list_the_available_ones(tmp_path, table):
    path = str(_csv(tmp_path, table))
    with pytest.raises(ValueError, match=r"no columns \['labels'\]; available columns: \['id', 'a', 'b', 'label', 'value'\]"):
        TabularDataModule(path, "labels").setup()
    with pytest.raises(ValueError, match=r"no columns \['c'\].*available"):
        TabularDataModule(path, "label", features=["a", "c"]).setup()
    np.savez(tmp_path / "d.npz", x=np.zeros((5, 2)), y=np.zeros(5))
    with pytest.raises(ValueError, match=r"no arrays \['target'\]; available arrays: \['x', 'y'\]"):
        TabularDataModule(str(tmp_path / "d.npz"), "target").setup()


def test_malformed_files_are_named_with_what_is_wrong(tmp_path, table):
    duplicated = _write_csv(tmp_path / "dup.csv", ["a", "a", "y"], [[i, 9 - i, i % 2] for i in range(20)])
    with pytest.raises(ValueError, match=r"dup.csv: the header names \['a'\] more than once"):
        TabularDataModule(str(duplicated), "y").setup()  # the second "a" was dropped silently
    with pytest.raises(ValueError, match=r"asked for more than once"):
        TabularDataModule(str(_csv(tmp_path, table)), "label", features=["a", "a"]).setup()
    only_target = _write_csv(tmp_path / "target.csv", ["y"], [[i % 2] for i in range(20)])
    with pytest.raises(ValueError, match="no feature column besides the target"):
        TabularDataModule(str(only_target), "y").setup()
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(ValueError, match=r"text.npz cannot be read as an .npz archive"):
        TabularDataModule(str(tmp_path / "text.npz"), "y").setup()
    np.save(tmp_path / "single.npy", np.zeros(3))
    (tmp_path / "single.npy").rename(tmp_path / "single.npz")
    with pytest.raises(ValueError, match="single array"):
        TabularDataModule(str(tmp_path / "single.npz"), "y").setup()


def test_a_table_too_small_for_its_fractions_says_so(tmp_path, table):
    two_rows = _write_csv(tmp_path / "two.csv", ["a", "label"], [[1.0, 0], [2.0, 1]])
    # the test split rounded to 0 rows: the fit ran and the test run reported nothing, without a word
    with pytest.raises(ValueError, match=r"two.csv: 2 rows .* 0 test rows: every split needs at least one"):
        TabularDataModule(str(two_rows), "label").setup()


def test_non_numeric_values_name_column_and_row(tmp_path):
    rows = [[1, 2.5, 0], [2, 3.5, 1], [3, "abc", 0], [4, 1.0, 1]]
    path = _write_csv(tmp_path / "bad.csv", ["id", "b", "label"], rows)
    with pytest.raises(ValueError, match=r"column 'b', row 2 .*'abc'"):
        TabularDataModule(str(path), "label").setup()
    # a text column that is not used is fine
    TabularDataModule(str(path), "label", features=["id"]).setup()
    path = _write_csv(tmp_path / "gap.csv", ["a", "label"], [[1, 0], [2, ""], [3, 1]])
    with pytest.raises(ValueError, match=r"column 'label', row 1 .*''"):
        TabularDataModule(str(path), "label").setup()
    (tmp_path / "blank.csv").write_text("a,label\n1,0\n\n2,1\nnan,0\n")  # a blank line is no data row: row 2
    with pytest.raises(ValueError, match=r"column 'a', row 2 \(counting data rows from 0\) holds 'nan'"):
        TabularDataModule(str(tmp_path / "blank.csv"), "label").setup()
    np.savez(tmp_path / "s.npz", x=np.array([[1.0, 2.0], [3.0, np.nan]]), y=np.array([0, 1]))
    with pytest.raises(ValueError, match=r"column 'x\[1\]', row 1 .*nan"):
        TabularDataModule(str(tmp_path / "s.npz"), "y").setup()
    np.savez(tmp_path / "u.npz", a=np.array(["1", "two", "3"]), y=np.array([0, 1, 0]))
    with pytest.raises(ValueError, match=r"column 'a', row 1 .*'two'"):
        TabularDataModule(str(tmp_path / "u.npz"), "y").setup()


def test_values_past_float32_or_a_float64_variance_are_named_not_made_infinite(tmp_path):
    # checked finite in float64, then cast to float32: 1e39 became inf; a column of 1e160s overflowed its variance,
    # passed as constant (std 1), and its values came out as inf
    n, generator = 40, np.random.default_rng(0)
    dose = generator.normal(size=n)
    dose[7] = 1e39
    with pytest.raises(ValueError, match=r"column 'dose', row 7 \(counting data rows from 0\) holds 1e\+39, which comes out beyond float32's range .*: rescale it"):
        TabularDataModule(_npz(tmp_path / "a.npz", n, dose), "y", task="regression", standardize=False).setup()
    with pytest.raises(ValueError, match=r"column 'dose' holds values too large to standardise"):
        TabularDataModule(_npz(tmp_path / "b.npz", n, generator.normal(size=n) * 1e160), "y", task="regression").setup()
    from bdl.data.offline import _split_indices

    test_row = int(_split_indices(n, 0.15, 0.2, torch.Generator().manual_seed(0))[2][0])
    tiny = generator.normal(size=n) * 1e-30  # a column that barely varies in the training rows, then 1e10 in a test row
    tiny[test_row] = 1e10
    with pytest.raises(ValueError, match=rf"column 'dose', row {test_row} \(counting data rows from 0\) holds 1e\+10, which comes out beyond float32's range .*: the column has a std of 9.\d+e-31 in the training rows"):
        TabularDataModule(_npz(tmp_path / "d.npz", n, tiny), "y", task="regression", val_fraction=0.15, test_fraction=0.2, seed=0).setup()
    beyond = generator.normal(size=n)
    beyond[test_row] = 1e39  # beyond float32 before it is standardised: the message spoke of its training std
    with pytest.raises(ValueError, match=rf"column 'dose', row {test_row} \(counting data rows from 0\) holds 1e\+39, which comes out beyond float32's range .*: rescale it$"):
        TabularDataModule(_npz(tmp_path / "e.npz", n, beyond), "y", task="regression", val_fraction=0.15, test_fraction=0.2, seed=0).setup()
    with pytest.raises(ValueError, match=r"column 'y', row 3 \(counting data rows from 0\) holds 1e\+39"):
        target = np.arange(n, dtype=float)
        target[3] = 1e39
        TabularDataModule(_npz(tmp_path / "c.npz", n, dose.clip(-5, 5), target), "y", task="regression", standardize=False).setup()


def test_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"\.csv or \.npz"):
        TabularDataModule(str(tmp_path / "t.json"), "y")
    with pytest.raises(ValueError, match="task"):
        TabularDataModule("t.csv", "y", task="ranking")
    with pytest.raises(ValueError, match="cannot also be one of the features"):
        TabularDataModule("t.csv", "y", features=["x", "y"])
    with pytest.raises(ValueError, match="val_fraction"):
        TabularDataModule("t.csv", "y", val_fraction=0.5, test_fraction=0.5)
    path = _write_csv(tmp_path / "ragged.csv", ["a", "y"], [[1, 0], [2]])
    with pytest.raises(ValueError, match="row 1 .*1 fields"):
        TabularDataModule(str(path), "y").setup()
    with pytest.raises(TypeError, match=r"path must name a .csv or .npz file \(a str or os.PathLike\), got None"):
        TabularDataModule(None, "y")  # os.fspath's "expected str, bytes or os.PathLike object, not NoneType"


def test_a_row_index_column_headerless_files_and_huge_integer_labels_are_named(tmp_path):
    # pandas' to_csv writes its row index under an empty name: the row number was read as a feature
    rows = "".join(f"{i},{i % 7},{i % 2}\n" for i in range(40))
    (tmp_path / "indexed.csv").write_text(",a,y\n" + rows)
    with pytest.raises(ValueError, match=r"column 1 of the header has no name \(pandas' to_csv writes its row index so.*index=False"):
        TabularDataModule(str(tmp_path / "indexed.csv"), "y").setup()
    data = TabularDataModule(str(tmp_path / "indexed.csv"), "y", features=["a"])  # columns named: the index is left out
    assert data.feature_names == ["a"] and data.num_classes == 2
    (tmp_path / "trailing.csv").write_text(",a,y,\n" + "".join(f"{i},{i % 7},{i % 2},\n" for i in range(40)))
    with pytest.raises(ValueError, match=r"columns 1, 4 of the header have no name"):  # not "names [''] more than once"
        TabularDataModule(str(tmp_path / "trailing.csv"), "y").setup()
    assert TabularDataModule(str(tmp_path / "trailing.csv"), "y", features=["a"]).num_classes == 2
    (tmp_path / "upper.CSV").write_text("a,y\n" + "".join(f"{i % 7},{i % 2}\n" for i in range(40)))
    assert TabularDataModule(str(tmp_path / "upper.CSV"), "y").num_classes == 2  # refused for its extension's case
    with pytest.raises(ValueError, match=r"has no columns \[''\]; available columns"):  # a name the user gave: '' is not in list
        TabularDataModule(str(tmp_path / "upper.CSV"), "y", features=["a", ""]).setup()
    (tmp_path / "headerless.csv").write_text(rows)  # a first row of 0,0,0: named more than once
    with pytest.raises(ValueError, match=r"names \['0'\] more than once.*first row holds numbers only: a CSV needs a header row"):
        TabularDataModule(str(tmp_path / "headerless.csv"), "y").setup()
    (tmp_path / "headerless.csv").write_text(rows.split("\n", 8)[-1])  # 8,1,0 then
    with pytest.raises(ValueError, match=r"has no columns \['y'\].*first row holds numbers only: a CSV needs a header row"):
        TabularDataModule(str(tmp_path / "headerless.csv"), "y").setup()
    # float64 holds every integer up to 2^53: codes 2^53 and 2^53 + 1 became one class (an .npz file's were refused)
    (tmp_path / "big.csv").write_text("a,y\n" + "".join(f"{i},{2**53 + i % 2}\n" for i in range(30)))
    with pytest.raises(ValueError, match=r"column 'y', row 1 .* holds an integer beyond 2\^53 \(9007199254740993\)"):
        TabularDataModule(str(tmp_path / "big.csv"), "y").setup()
    assert TabularDataModule(str(tmp_path / "big.csv"), "y", task="regression").num_train > 0  # values, not codes: read


def test_files_that_were_misread_or_refused_unclearly(tmp_path):
    rows = "".join(f"{i},{i % 2}\n" for i in range(40))
    # Excel's cp1252 and UTF-16: a bare UnicodeDecodeError naming no file
    (tmp_path / "cp1252.csv").write_bytes("café,label\n".encode("cp1252") + rows.encode())
    with pytest.raises(ValueError, match=r"cp1252.csv is not UTF-8 text \(invalid continuation byte\): save it as UTF-8"):
        TabularDataModule(str(tmp_path / "cp1252.csv"), "label").setup()
    # blank lines before the header: "is empty"
    (tmp_path / "blank_first.csv").write_text("\n\na,label\n" + rows)
    assert TabularDataModule(str(tmp_path / "blank_first.csv"), "label").num_train == 26
    # Python's float reads "3_0" as 30: a code column became numbers
    (tmp_path / "codes.csv").write_text("code,label\n" + "".join(f"{i}_{i % 3},{i % 2}\n" for i in range(40)))
    with pytest.raises(ValueError, match=r"column 'code', row 0 .* holds '0_0', not a finite number"):
        TabularDataModule(str(tmp_path / "codes.csv"), "label").setup()
    # an [N, 0] feature array: a data module without inputs
    np.savez(tmp_path / "nofeat.npz", x=np.zeros((40, 0)), y=np.arange(40) % 2)
    with pytest.raises(ValueError, match="no feature column besides the target 'y'"):
        TabularDataModule(str(tmp_path / "nofeat.npz"), "y").setup()
    # class codes past 2^53 rounded together in float64: two classes became one
    np.savez(tmp_path / "ids.npz", x=np.arange(40.0), y=np.array([2**60, 2**60 + 1] * 20, dtype=np.int64))
    with pytest.raises(ValueError, match=r"array 'y' holds integers beyond 2\^53 \(1152921504606846977\)"):
        TabularDataModule(str(tmp_path / "ids.npz"), "y").setup()
    # one class: a classifier of nothing
    (tmp_path / "one.csv").write_text("a,label\n" + "".join(f"{i},7\n" for i in range(40)))
    with pytest.raises(ValueError, match=r"the target takes a single value \(7\) in every row: classification needs at least 2 classes"):
        TabularDataModule(str(tmp_path / "one.csv"), "label").setup()


# ---------------------------------------------------------------- SklearnRegressionDataModule (diabetes)


def _diabetes_raw():
    from sklearn.datasets import load_diabetes

    data = load_diabetes(scaled=False)
    return data.data, data.target


def _row_ids(data, part):
    """Row numbers in scikit-learn's table of a split's rows: the nearest raw row to each unstandardised one."""
    x_raw, _ = _diabetes_raw()
    x = part.tensors[0].double() * data.feature_std.double() + data.feature_mean.double()
    distances = torch.cdist(x / data.feature_std.double(), torch.as_tensor(x_raw) / data.feature_std.double())
    nearest = distances.topk(2, largest=False)
    assert (nearest.values[:, 0] < 1e-4).all() and (nearest.values[:, 1] > 1e-2).all()  # one exact match each
    return nearest.indices[:, 0].numpy()


def test_diabetes_holds_out_the_highest_bmi_rows_as_ood_and_splits_the_rest():
    data = SklearnRegressionDataModule("diabetes", ood="high", ood_feature="bmi", ood_fraction=0.1, seed=3)
    x_raw, y_raw = _diabetes_raw()
    splits = data._built()
    assert data.task == "regression" and data.num_classes is None and data.feature_names[2] == "bmi"
    ids = {name: _row_ids(data, getattr(splits, name)) for name in ("train", "val", "test", "ood")}
    expected_ood = np.flatnonzero(x_raw[:, 2] > np.quantile(x_raw[:, 2], 0.9))
    assert sorted(ids["ood"]) == sorted(expected_ood) and len(expected_ood) == 45
    assert sorted(np.concatenate(list(ids.values()))) == list(range(442))  # disjoint and complete
    assert (len(ids["train"]), len(ids["val"]), len(ids["test"])) == (258, 60, 79)
    assert x_raw[ids["ood"], 2].min() > x_raw[np.concatenate([ids["train"], ids["test"]]), 2].max()
    # standardised with the training rows only, targets too
    torch.testing.assert_close(data.feature_mean, torch.tensor(x_raw[ids["train"]].mean(0), dtype=torch.float32))
    assert data.target_mean == pytest.approx(y_raw[ids["train"]].mean())
    assert data.target_std == pytest.approx(y_raw[ids["train"]].std())
    for name in ("test", "ood"):
        y = data.unstandardize_target(getattr(splits, name).tensors[1]).squeeze(1).double()
        torch.testing.assert_close(y, torch.as_tensor(y_raw[ids[name]]), rtol=1e-6, atol=1e-3)
    assert splits.ood.tensors[1].mean() > 0.5  # high-BMI patients progress faster: a real shift
    assert isinstance(data.test_dataloader(), list) and data.ood_name == "diabetes rows with bmi above its 90% quantile"


def test_diabetes_split_follows_the_seed_and_the_ood_rows_do_not():
    def ids(seed, **options):
        data = SklearnRegressionDataModule(seed=seed, **options)
        return {name: _row_ids(data, getattr(data._built(), name)) for name in ("test", "ood")}

    first, again, other = ids(0), ids(0), ids(1)
    assert np.array_equal(first["test"], again["test"]) and not np.array_equal(first["test"], other["test"])
    assert np.array_equal(first["ood"], other["ood"])
    low = ids(0, ood="low", ood_feature="s5", ood_fraction=0.2)["ood"]
    x_raw, _ = _diabetes_raw()
    assert sorted(low) == sorted(np.flatnonzero(x_raw[:, 8] < np.quantile(x_raw[:, 8], 0.2)))


def test_diabetes_without_ood_keeps_every_row():
    data = SklearnRegressionDataModule(ood=None, val_fraction=0.1, test_fraction=0.1)
    splits = data._built()
    assert splits.ood is None and data.ood_name is None and not isinstance(data.test_dataloader(), list)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 442


def test_sklearn_data_module_arguments_are_checked():
    with pytest.raises(ValueError, match=r"name must be one of \['diabetes'\], got 'boston'"):
        SklearnRegressionDataModule("boston")
    with pytest.raises(ValueError, match=r"ood_feature must be a feature of diabetes: one of \['age', 'sex', 'bmi'"):
        SklearnRegressionDataModule(ood_feature="weight")
    with pytest.raises(ValueError, match="ood must be one of"):
        SklearnRegressionDataModule(ood="extremes")
    with pytest.raises(ValueError, match=r"ood_fraction must be a number in \(0, 0.5\]"):
        SklearnRegressionDataModule(ood_fraction=0.7)
    with pytest.raises(ValueError, match="val_fraction"):
        SklearnRegressionDataModule(val_fraction=0.6, test_fraction=0.5)


def test_an_ood_split_that_selects_no_row_is_refused():
    # sex takes two values: no row lies strictly above its 90% quantile, and the run silently had no OOD set
    with pytest.raises(ValueError, match="selects no row of diabetes: its 'sex' takes 2 distinct values"):
        SklearnRegressionDataModule("diabetes", ood="high", ood_feature="sex", ood_fraction=0.1).setup("fit")


def test_a_fraction_that_is_not_a_number_is_named(tmp_path):
    table = {"a": np.arange(20.0), "y": np.arange(20.0)}
    with pytest.raises(TypeError, match="val_fraction and test_fraction must be numbers, got '0.1'"):
        TabularDataModule(str(_csv(tmp_path, table)), "y", task="regression", val_fraction="0.1")


def test_a_standardised_targets_report_and_predictions_say_how_to_get_back_to_its_units(tmp_path):
    import lightning as L

    from bdl.lightning import MLP, DeterministicModule
    from bdl.lightning.cli import PredictionWriter

    torch.manual_seed(0)
    data = SklearnRegressionDataModule("diabetes", batch_size=64)
    module = DeterministicModule(MLP(10, 1, hidden=[16], head="gaussian"), task="regression", lr=1e-2)
    trainer = L.Trainer(max_epochs=2, default_root_dir=tmp_path, accelerator="cpu", enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[PredictionWriter()])  # fmt: skip
    trainer.fit(module, data)
    trainer.test(module, data, verbose=False)
    report, std = module.report, data.target_std
    assert report.settings["target_std"] == std and report.settings["target_mean"] == data.target_mean
    assert any(f"RMSE, MAE, CRPS and interval widths are {std:.6g} times these" in note for note in report.notes)
    y = torch.cat([batch[1] for batch in data.test_dataloader()[0]])
    mean = data.unstandardize_target(report.prediction.mean)  # the note's claim, in the original units
    rmse = (mean - data.unstandardize_target(y)).square().mean().sqrt()
    assert rmse.item() == pytest.approx(report.metrics["rmse"] * std, rel=1e-5)
    assert '"target_std"' in (module.report_dir / "metrics.json").read_text()
    trainer.predict(module, data)
    saved = torch.load(next(tmp_path.rglob("predictions.pt")), weights_only=True)
    assert saved["target_std"] == std and saved["mean"].shape == (len(y), 1)
    # loaders passed to a later call: Lightning keeps the fit's data module, whose scale the report claimed
    from bdl.lightning import RegressionGapDataModule

    gap = RegressionGapDataModule(num_samples=100)
    gap.setup()
    toy = DeterministicModule(MLP(1, 1, hidden=[8], head="gaussian"), task="regression", save_report=False)
    trainer.test(toy, dataloaders=gap.test_dataloader()[0], verbose=False)
    assert "target_std" not in toy.report.settings and not any("standardised" in note for note in toy.report.notes)
    # a scale per output is no single scale: left out (it raised at the end of the test)
    data._target_mean, data._target_std = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    trainer.test(module, data, verbose=False)
    assert "target_std" not in module.report.settings
