import numpy as np
import pytest
import torch

from bdl.data import load_digits, load_mnist1d, regression_with_gap, two_moons
from bdl.data.offline import _read_cache
from bdl.lightning import CIFAR10DataModule, DigitsDataModule, MNIST1DDataModule, MNISTDataModule, TwoMoonsDataModule


def test_digits_splits_are_disjoint_seeded_and_standardised_on_train():
    splits = load_digits(seed=1)
    sizes = len(splits.train), len(splits.val), len(splits.test)
    assert sum(sizes) == 1797 and splits.num_classes == 10
    x = splits.train.tensors[0]
    torch.testing.assert_close(x.mean(0), torch.zeros(64), atol=1e-5, rtol=0)
    again = load_digits(seed=1)
    assert torch.equal(again.test.tensors[0], splits.test.tensors[0])
    assert not torch.equal(load_digits(seed=2).test.tensors[0], splits.test.tensors[0])
    # a pixel constant in training is scaled by 1 (StandardScaler's rule): a floor of 1e-3 on its std turned
    # seed 0's test pixel 56 of 0.0625 (raw) into 62.5
    from sklearn.preprocessing import StandardScaler

    seed0, raw = load_digits(seed=0, ood_classes=[8, 9]), load_digits(seed=0, ood_classes=[8, 9], standardize=False)
    scaler = StandardScaler().fit(raw.train.tensors[0].numpy())
    for split in ("test", "ood"):
        expected = torch.as_tensor(scaler.transform(getattr(raw, split).tensors[0].numpy()), dtype=torch.float32)
        # torch's std divides by N - 1, scikit-learn's by N (938 rows: 0.05%)
        torch.testing.assert_close(getattr(seed0, split).tensors[0], expected, rtol=2e-3, atol=2e-3)


def test_digits_ood_classes_are_held_out_and_labels_remapped():
    splits = load_digits(ood_classes=[3, 9])
    labels = torch.cat([splits.train.tensors[1], splits.val.tensors[1], splits.test.tensors[1]])
    assert splits.num_classes == 8 and set(labels.tolist()) == set(range(8))
    assert len(splits.ood) == 183 + 180  # images of 3s and 9s in sklearn's digits
    with pytest.raises(ValueError, match="ood_classes"):
        load_digits(ood_classes=[10])


def test_mnist1d_has_the_papers_split_and_caches(tmp_path):
    import random

    np.random.seed(7)
    random.seed(7)
    expected = (np.random.rand(), random.random())
    np.random.seed(7)
    random.seed(7)
    splits = load_mnist1d(cache_dir=str(tmp_path))
    # mnist1d's generator seeds numpy's and Python's global generators with 42: the caller's draws came out alike
    assert (np.random.rand(), random.random()) == expected
    assert len(splits.train) + len(splits.val) == 4000 and len(splits.test) == 1000
    assert splits.train.tensors[0].shape[1] == 40 and (tmp_path / "mnist1d.npz").exists()
    cached = load_mnist1d(cache_dir=str(tmp_path), ood_classes=[0])
    assert cached.num_classes == 9 and len(cached.ood) > 0
    assert (cached.train.tensors[1] < 9).all()
    # an unreadable or incomplete cache is made again, with a warning naming it (it was a BadZipFile/KeyError)
    (tmp_path / "mnist1d.npz").write_bytes(b"not an archive")
    with pytest.warns(UserWarning, match="mnist1d.npz: cannot use the cached data"):
        again = load_mnist1d(cache_dir=str(tmp_path))
    assert torch.equal(again.train.tensors[0], splits.train.tensors[0])
    np.savez(tmp_path / "incomplete.npz", x=np.zeros((2, 40)))
    with pytest.warns(UserWarning, match=r"incomplete.npz: cannot use the cached data \(it has no \['y', 'x_test', 'y_test'\]"):
        assert _read_cache(str(tmp_path / "incomplete.npz"), ("x", "y", "x_test", "y_test")) is None
    with pytest.raises(ValueError, match="gives 4000 validation and 0 training rows"):
        load_mnist1d(val_fraction=0.9999, cache_dir=str(tmp_path))


def test_regression_toy_leaves_the_gap_empty():
    splits = regression_with_gap(300, gap=(-1.0, 1.0))
    for part in (splits.train, splits.val, splits.test):
        x = part.tensors[0]
        assert ((x <= -1) | (x >= 1)).all()
    assert ((splits.ood.tensors[0] >= -1) & (splits.ood.tensors[0] <= 1)).all()
    with pytest.raises(ValueError, match="gap"):
        regression_with_gap(gap=(-5.0, 0.0))
    for wrong in (-5, 2.5, True):  # torch's "negative dimension -5" / a TypeError from torch.rand, unnamed
        with pytest.raises(ValueError, match=f"num_samples must be a positive int, got {wrong!r}"):
            regression_with_gap(wrong)
    assert len(regression_with_gap(np.int64(100)).ood) > 0


def test_num_features_counts_the_elements_of_one_input(tmp_path):
    assert regression_with_gap(100).num_features == 1 and load_digits().num_features == 64
    from bdl.lightning import MNIST1DDataModule
    from bdl.lightning.vision import NormalizedImages

    assert MNIST1DDataModule(cache_dir=str(tmp_path), channels=True).build().num_features == 40  # [1, 40]: it said 1

    images = load_digits()
    images.train = NormalizedImages(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), (0.5,) * 3, (0.2,) * 3)
    assert images.num_features == 3 * 8 * 8  # CIFAR's datasets have no .tensors: AttributeError


def test_two_moons_is_binary():
    splits = two_moons(200)
    assert set(splits.train.tensors[1].tolist()) == {0, 1}


def test_a_validation_fraction_too_small_for_one_row_is_refused(tmp_path):
    # MNIST-1D gave an empty validation set where digits refuses: training went on without a check
    with pytest.raises(ValueError, match="gives 0 validation"):
        load_mnist1d(val_fraction=0.0001, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="0 validation"):
        load_digits(val_fraction=0.0001)


def test_a_zero_test_fraction_is_refused_saying_it_must_be_above_zero():
    # "must be in [0, 1) ..., got 0.15 and 0": 0 is in [0, 1)
    with pytest.raises(ValueError, match=r"test_fraction in \(0, 1\).*got 0.15 and 0"):
        load_digits(val_fraction=0.15, test_fraction=0)


def test_bad_arguments_are_named_in_bdls_words():
    # scikit-learn's "n_samples", torch's "manual_seed expected a long", "'float' object is not subscriptable"
    for call, message in (
        (lambda: two_moons(0), "num_samples must be a positive int, got 0"),
        (lambda: load_digits(seed=1.5), r"seed must be an int in \[0, 2\^32\), got 1.5"),
        (lambda: two_moons(seed=-1), r"seed must be an int in \[0, 2\^32\), got -1"),  # scikit-learn's random_state
        (lambda: load_digits(seed=2**70), "seed must be an int"),  # "Overflow when unpacking long long"
        (lambda: regression_with_gap(gap=1.0), r"gap must be a pair \(low, high\) of numbers, got 1.0"),
        (lambda: regression_with_gap(domain=(-4, "4")), "domain must be a pair"),
    ):
        with pytest.raises(ValueError, match=message):
            call()
    assert torch.equal(two_moons(50, seed=np.int64(3)).train.tensors[0], two_moons(50, seed=3).train.tensors[0])
    for gap in (np.array([-1.0, 1.0]), torch.tensor([-1.0, 1.0])):  # an array or tensor pair, as a tuple
        assert torch.equal(regression_with_gap(50, gap=gap).train.tensors[0], regression_with_gap(50).train.tensors[0])
    data = DigitsDataModule(seed=np.int64(1), num_workers=np.int64(0))  # refused as "seed must be an int"
    assert type(data.seed) is int and type(data.num_workers) is int
    with pytest.raises(TypeError, match=r"data_dir must be a folder path \(a str or os.PathLike\), got None"):
        MNISTDataModule(data_dir=None)


@pytest.mark.parametrize("ood_classes", [8, "8", [8.0], [True]])
def test_ood_classes_must_be_a_list_of_labels(ood_classes):
    # an int raised "TypeError: 'int' object is not iterable"
    with pytest.raises(ValueError, match="ood_classes must be a list of class labels"):
        load_digits(ood_classes=ood_classes)
    # also where the data module does not use them (its ood is not "classes"): "'int' object is not iterable"
    with pytest.raises(ValueError, match="ood_classes must be a list of class labels"):
        DigitsDataModule(ood="noise", ood_classes=ood_classes)


def test_ood_classes_name_each_class_once_and_may_be_an_array_or_none():
    # [8, 8] held out digit 8 and named the OOD set "digits 8, 8" in every report
    for make in (lambda: load_digits(ood_classes=[8, 8]), lambda: MNIST1DDataModule(ood_classes=[9, 9]), lambda: DigitsDataModule(ood_classes=(8, 9, 8))):
        with pytest.raises(ValueError, match=r"ood_classes must name each class once, got \[(8, 8|9, 9|8, 9, 8)\]"):
            make()
    data = DigitsDataModule(ood_classes=np.array([8, 9]))  # "the truth value of an array ... is ambiguous"
    assert data.ood_classes == (8, 9) and data.ood_name == "digits 8, 9" and all(type(c) is int for c in data.ood_classes)
    assert DigitsDataModule(ood=None, ood_classes=None).ood_classes == ()  # 'NoneType' object is not iterable
    assert MNIST1DDataModule(ood_classes=None).ood_classes == () and load_digits(ood_classes=None).ood is None
    with pytest.raises(ValueError, match="ood='classes' needs ood_classes"):
        DigitsDataModule(ood="classes", ood_classes=None)


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: DigitsDataModule(flatten="no"), "flatten"),
        (lambda: MNIST1DDataModule(channels="no"), "channels"),
        (lambda: TwoMoonsDataModule(ood="no"), "ood"),
        (lambda: MNISTDataModule(flatten="no"), "flatten"),
        (lambda: MNISTDataModule(download="false"), "download"),
        (lambda: CIFAR10DataModule(augment="false"), "augment"),
        (lambda: load_digits(standardize="false"), "standardize"),
    ],
)
def test_true_or_false_options_refuse_other_values(make, name):
    # a string is true in Python: "false" turned the option on, silently
    with pytest.raises(TypeError, match=f"{name} must be true or false, got '(no|false)'"):
        make()
    assert MNIST1DDataModule(channels=np.bool_(True)).channels is True


def test_an_empty_mnist1d_cache_is_made_again_and_the_cache_folder_may_start_with_a_tilde(tmp_path, monkeypatch):
    # a file cut at 0 bytes (a killed process, a full disk) raised numpy's EOFError
    (tmp_path / "mnist1d.npz").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"mnist1d.npz: cannot use the cached data \(EOFError"):
        splits = load_mnist1d(cache_dir=str(tmp_path))
    assert len(splits.train) == 3600 and (tmp_path / "mnist1d.npz").stat().st_size > 0
    # "~/cache" made a folder named "~" in the working directory
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    load_mnist1d(cache_dir="~/cache")
    assert (tmp_path / "cache" / "mnist1d.npz").exists() and not (tmp_path / "~").exists()
    with pytest.raises(ValueError, match="cache_dir must be a folder path or None, got ''"):  # os.makedirs('') failed
        load_mnist1d(cache_dir="")
