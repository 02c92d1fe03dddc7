import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fake_datasets import write_cifar10, write_cifar100, write_mnist, write_svhn

from bdl.lightning.vision import CIFAR10DataModule, MNISTDataModule, NormalizedImages

CIFAR_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
CIFAR_STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)


def _pixels(x, mean, std):
    """Undo the normalisation: back to the uint8 pixel values."""
    return (x * std + mean).mul(255).round().to(torch.uint8)


def _by_image(images, labels):
    return {image.tobytes(): int(label) for image, label in zip(images, labels)}


@pytest.fixture
def mnist_root(tmp_path):
    return tmp_path, write_mnist(tmp_path, "MNIST", seed=0), write_mnist(tmp_path, "FashionMNIST", num_test=15, seed=1)


@pytest.fixture
def cifar_root(tmp_path):
    arrays = {"cifar10": write_cifar10(tmp_path), "cifar100": write_cifar100(tmp_path), "svhn": write_svhn(tmp_path / "SVHN")}
    return tmp_path, arrays


def test_mnist_reads_idx_files_normalised_with_mnist_statistics(mnist_root):
    root, mnist, fashion = mnist_root
    data = MNISTDataModule(data_dir=str(root), val_fraction=0.2, seed=3)
    data.prepare_data()
    data.setup("fit")
    splits = data.splits
    assert (len(splits.train), len(splits.val), len(splits.test), len(splits.ood)) == (40, 10, 20, 15)
    assert data.num_classes == 10 and data.num_train == 40 and data.ood_name == "FashionMNIST"
    x, y = splits.train.tensors
    assert x.shape == (40, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.long
    # train + val are exactly the training file's images, each with its own label
    expected = _by_image(mnist["train_images"], mnist["train_labels"])
    pixels = _pixels(torch.cat([x, splits.val.tensors[0]]), 0.1307, 0.3081).squeeze(1).numpy()
    labels = torch.cat([y, splits.val.tensors[1]]).tolist()
    assert _by_image(pixels, labels) == expected
    # test and OOD keep file order; OOD uses MNIST's statistics and label -1
    assert np.array_equal(_pixels(splits.test.tensors[0], 0.1307, 0.3081).squeeze(1).numpy(), mnist["test_images"])
    assert np.array_equal(_pixels(splits.ood.tensors[0], 0.1307, 0.3081).squeeze(1).numpy(), fashion["test_images"])
    assert (splits.ood.tensors[1] == -1).all()
    assert splits.test.tensors[0][0, 0, 0, 0].item() == pytest.approx((mnist["test_images"][0, 0, 0] / 255 - 0.1307) / 0.3081, abs=1e-6)


def test_mnist_split_depends_only_on_the_seed(mnist_root):
    root = str(mnist_root[0])

    def val_images(seed):
        data = MNISTDataModule(data_dir=root, seed=seed, val_fraction=0.2)
        return data._built().val.tensors[0]

    assert torch.equal(val_images(1), val_images(1))
    assert not torch.equal(val_images(1), val_images(2))


def test_mnist_flatten_loaders_and_test_returns_test_then_ood(mnist_root):
    data = MNISTDataModule(data_dir=str(mnist_root[0]), flatten=True, batch_size=16, eval_batch_size=32)
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (16, 784) and y.dtype == torch.long
    test, ood = data.test_dataloader()
    assert len(test.dataset) == 20 and next(iter(ood))[0].shape == (15, 784)
    no_ood = MNISTDataModule(data_dir=str(mnist_root[0]), ood=None)
    assert no_ood.ood_name is None and no_ood.ood_dataloader() is None
    assert len(no_ood.test_dataloader().dataset) == 20


def test_mnist_missing_files_say_which_data_set_where_and_how(tmp_path):
    data = MNISTDataModule(data_dir=str(tmp_path))
    for step in (data.prepare_data, data.setup):  # both data sets at once (the OOD set's turned up on the next run)
        pattern = r"^MNIST not found in .*MNIST/raw.*; FashionMNIST not found in .*FashionMNIST/raw.*download: true.*MNIST: .*; FashionMNIST: "
        with pytest.raises(FileNotFoundError, match=pattern):
            step()
    write_mnist(tmp_path, "MNIST")
    with pytest.raises(FileNotFoundError, match=r"FashionMNIST not found in .*FashionMNIST/raw.*t10k-images-idx3-ubyte"):
        data.setup()
    MNISTDataModule(data_dir=str(tmp_path), ood=None).setup()  # no OOD set: MNIST alone suffices
    with pytest.raises(ValueError, match="fashion_mnist"):
        MNISTDataModule(ood="svhn")


def test_a_home_relative_data_dir_is_read_where_torchvision_reads_it(mnist_root, monkeypatch):
    root, _, _ = mnist_root
    monkeypatch.setenv("HOME", str(root.parent))  # '~/<root>' is root: it was looked up as a literal '~' folder
    data = MNISTDataModule(data_dir=f"~/{root.name}", download=True)
    data.prepare_data()  # the files are there: no download
    assert data.num_train > 0 and data.data_dir == str(root)


def test_data_read_before_prepare_data_with_download_true_says_to_call_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"MNIST not found .*fetched by prepare_data\(\).*call data.prepare_data\(\)"):
        MNISTDataModule(data_dir=str(tmp_path), download=True).num_train  # it said to set download: true, already set


def test_corrupt_files_are_named(mnist_root, cifar_root):
    root = mnist_root[0]
    images = next((root / "MNIST" / "raw").glob("train-images*"))
    images.write_bytes(images.read_bytes()[:1000])  # truncated: a reshape error deep in torchvision
    with pytest.raises(ValueError, match=r"MNISTDataModule: could not read the data files: MNIST in .*train-images"):
        MNISTDataModule(data_dir=str(root)).setup()
    batch = next((cifar_root[0] / "cifar-10-batches-py").glob("data_batch_*"))
    batch.write_bytes(b"garbage")  # an unpickling error
    with pytest.raises(ValueError, match=r"could not read the data files: CIFAR-10 in .*cifar-10-batches-py"):
        CIFAR10DataModule(data_dir=str(cifar_root[0])).setup()


def test_files_that_read_but_hold_other_images_or_labels_are_refused(tmp_path):
    # 32x32 test images beside 28x28 training ones, and label 200 of 10 classes, were read without a word: they failed
    # later, in a batch's forward or a CUDA assertion
    from fake_datasets import _write_idx  # noqa: PLC0415

    write_mnist(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    _write_idx(raw / "t10k-images-idx3-ubyte", np.zeros((20, 32, 32), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"delete that one .*the MNIST test set holds images of shape \[32, 32\], expected \[28, 28\]"):
        MNISTDataModule(data_dir=str(tmp_path), ood=None).setup()
    write_mnist(tmp_path)
    _write_idx(raw / "train-labels-idx1-ubyte", np.full(50, 200, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"the MNIST training set holds labels in \[200, 200\], expected 0..9"):
        MNISTDataModule(data_dir=str(tmp_path), ood=None).setup()
    write_cifar10(tmp_path)
    write_svhn(tmp_path / "SVHN")
    import pickle  # noqa: PLC0415

    folder = tmp_path / "cifar-10-batches-py"
    entry = {"data": np.zeros((10, 3 * 32 * 32), dtype=np.uint8), "labels": [12] * 10}
    (folder / "test_batch").write_bytes(pickle.dumps(entry))
    with pytest.raises(ValueError, match=r"the CIFAR-10 test set holds labels in \[12, 12\], expected 0..9"):
        CIFAR10DataModule(data_dir=str(tmp_path)).setup()


def test_cifar10_reads_pickles_in_chw_order_with_cifar_normalisation(cifar_root):
    root, arrays = cifar_root
    data = CIFAR10DataModule(data_dir=str(root), val_fraction=0.25, augment=False, seed=0)
    data.prepare_data()
    splits = data._built()
    assert (len(splits.train), len(splits.val), len(splits.test), len(splits.ood)) == (30, 10, 10, 9)
    assert data.num_classes == 10 and data.ood_name == "SVHN"
    x, y = splits.test[3]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    raw = torch.from_numpy(arrays["cifar10"]["test_images"][3])
    torch.testing.assert_close(x, (raw.float() / 255 - CIFAR_MEAN) / CIFAR_STD)
    assert int(y) == arrays["cifar10"]["test_labels"][3]
    train_items = [splits.train[i] for i in range(30)] + [splits.val[i] for i in range(10)]
    read = _by_image(np.stack([_pixels(x, CIFAR_MEAN, CIFAR_STD).numpy() for x, _ in train_items]), [y for _, y in train_items])
    assert read == _by_image(arrays["cifar10"]["train_images"], arrays["cifar10"]["train_labels"])
    ood = torch.stack([splits.ood[i][0] for i in range(9)])
    assert np.array_equal(_pixels(ood, CIFAR_MEAN, CIFAR_STD).numpy(), arrays["svhn"]["test_images"])
    assert all(int(splits.ood[i][1]) == -1 for i in range(9))


def test_cifar10_with_cifar100_ood_and_seeded_split(cifar_root):
    root, arrays = cifar_root
    data = CIFAR10DataModule(data_dir=str(root), ood="cifar100", seed=5)
    assert data.ood_name == "CIFAR-100"
    splits = data._built()
    assert (len(splits.train), len(splits.val), len(splits.ood)) == (36, 4, 12)
    ood = torch.stack([splits.ood[i][0] for i in range(12)])
    assert np.array_equal(_pixels(ood, CIFAR_MEAN, CIFAR_STD).numpy(), arrays["cifar100"]["test_images"])
    again = CIFAR10DataModule(data_dir=str(root), ood=None, seed=5)._built().val
    other = CIFAR10DataModule(data_dir=str(root), ood=None, seed=6)._built().val
    assert torch.equal(splits.val.images, again.images) and not torch.equal(splits.val.images, other.images)
    loaders = data.test_dataloader()
    assert [len(loader.dataset) for loader in loaders] == [10, 12]


def _is_crop_or_flipped_crop(augmented, image):
    padded = F.pad(image, (4, 4, 4, 4))
    for candidate in (padded, padded.flip(-1)):
        windows = candidate.unfold(1, 32, 1).unfold(2, 32, 1)  # [C, 9, 9, 32, 32]
        if (windows == augmented.view(3, 1, 1, 32, 32)).all(0).flatten(2).all(-1).any():
            return True
    return False


def test_cifar10_augments_the_training_part_only(cifar_root):
    data = CIFAR10DataModule(data_dir=str(cifar_root[0]), augment=True, val_fraction=0.25)
    splits = data._built()
    torch.manual_seed(0)
    image = splits.train.images[0]
    draws = [_pixels(splits.train[0][0], CIFAR_MEAN, CIFAR_STD) for _ in range(12)]
    assert any(not torch.equal(draw, image) for draw in draws)
    assert all(_is_crop_or_flipped_crop(draw, image) for draw in draws)
    for part in (splits.val, splits.test, splits.ood):
        assert part.transform is None
        assert torch.equal(_pixels(part[0][0], CIFAR_MEAN, CIFAR_STD), part.images[0])
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (30, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long


def test_cifar_missing_files_say_which_data_set_where_and_how(tmp_path):
    data = CIFAR10DataModule(data_dir=str(tmp_path))
    for step in (data.prepare_data, data.setup):
        pattern = r"CIFAR-10 not found in .*cifar-10-batches-py.*data_batch_1.*; SVHN not found .*download: true.*cifar-10-python\.tar\.gz.*test_32x32\.mat"
        with pytest.raises(FileNotFoundError, match=pattern):
            step()
    write_cifar10(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"SVHN not found in .*SVHN.*test_32x32\.mat"):
        data.setup()
    with pytest.raises(FileNotFoundError, match=r"CIFAR-100 not found in .*cifar-100-python"):
        CIFAR10DataModule(data_dir=str(tmp_path), ood="cifar100").prepare_data()
    (tmp_path / "cifar-10-batches-py" / "batches.meta").unlink()
    with pytest.raises(FileNotFoundError, match="batches.meta"):
        CIFAR10DataModule(data_dir=str(tmp_path), ood=None).setup()
    with pytest.raises(ValueError, match=r"\['svhn', 'cifar100'\]"):
        CIFAR10DataModule(ood="mnist")
    with pytest.raises(ValueError, match="val_fraction"):
        CIFAR10DataModule(val_fraction=1.0)


def test_download_true_keeps_existing_files_without_md5_check(cifar_root, mnist_root):
    # no network here: a download attempt would fail, so these pass only if existing files are accepted
    CIFAR10DataModule(data_dir=str(cifar_root[0]), download=True).prepare_data()
    CIFAR10DataModule(data_dir=str(cifar_root[0]), download=True, ood="cifar100").prepare_data()
    MNISTDataModule(data_dir=str(mnist_root[0]), download=True).prepare_data()


def test_normalized_images_checks_its_inputs():
    with pytest.raises(ValueError, match="uint8"):
        NormalizedImages(torch.zeros(2, 1, 4, 4), torch.zeros(2), [0.5], [0.5])
    with pytest.raises(ValueError, match="one label per image"):
        NormalizedImages(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3), [0.5], [0.5])


def test_a_validation_fraction_too_small_for_one_image_is_refused(mnist_root, cifar_root):
    from bdl.lightning.vision import _train_val_indices

    with pytest.raises(ValueError, match="gives 0 validation and 100 training images"):
        _train_val_indices(100, 0.001, seed=0)
    train, val = _train_val_indices(100, 0.1, seed=0)
    assert len(train) == 90 and len(val) == 10 and not set(train.tolist()) & set(val.tolist())
    # through setup, said as it is: it was called unreadable files, with the advice to delete them
    for module, root in ((MNISTDataModule, mnist_root[0]), (CIFAR10DataModule, cifar_root[0])):
        with pytest.raises(ValueError, match=r"^val_fraction=0.001 of \d+ training images gives 0 validation"):
            module(data_dir=str(root), ood=None, val_fraction=0.001).setup()


@pytest.mark.parametrize(
    "module, error",
    [
        (CIFAR10DataModule, lambda: __import__("urllib.error").error.URLError("[Errno -2] Name or service not known")),
        # torchvision's MNIST: one line per mirror tried
        (MNISTDataModule, lambda: RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried mirror-a, got:\nHTTP 404\n")),
    ],
)
def test_a_failed_download_says_which_files_are_missing_and_how_to_get_them(tmp_path, monkeypatch, module, error):
    # offline, the shipped configs (download: true) ended in 40 lines of torchvision's and urllib's traceback
    def offline(self):
        raise error()

    monkeypatch.setattr(module, "_download", offline)
    with pytest.raises(FileNotFoundError, match=r"not found in .*the download failed \((URLError|RuntimeError): .*put the files there yourself") as raised:
        module(data_dir=str(tmp_path), download=True).prepare_data()
    assert "\n" not in str(raised.value)
