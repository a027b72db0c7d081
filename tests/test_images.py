"""Image datasets in torchvision's real on-disk formats (tiny files written here), read by
kdsweep.data.images: CIFAR-10/100 pickles, MNIST idx files, SVHN .mat files, an ImageFolder."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from kdsweep.config import DataParams, ParamsError, parse_params
from kdsweep.data.images import torchvision_splits
from kdsweep.data.prepare import build_splits
from kdsweep.data.splits import DataError
from kdsweep.registry import DATASETS
from tests.conftest import tiny_raw


@pytest.fixture
def no_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """CIFAR and SVHN verify every file against the md5 of the real release, which no tiny fake can
    match. Only that check is relaxed (to "the file exists"); torchvision's own loading code, the
    missing-file path and the meta-file read all still run."""

    def exists(fpath: str, md5: str | None = None) -> bool:
        return os.path.isfile(fpath)

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", exists)
    monkeypatch.setattr(torchvision.datasets.svhn, "check_integrity", exists)


def _pickle(path: Path, obj: dict) -> None:
    # The real files are Python 2 pickles with str keys, which torchvision reads with
    # encoding="latin1" as str keys ('data', 'labels'); Python 3 str keys load the same way.
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _images(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8)


def write_cifar10(root: Path, per_batch: int = 4, n_test: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """cifar-10-batches-py/ with data_batch_1..5, test_batch and batches.meta; returns the raw
    training rows [N, 3072] (channel-major: 1024 R, 1024 G, 1024 B) and labels."""
    rng = np.random.default_rng(0)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rows, labels = [], []
    for b in range(1, 6):
        data = _images(rng, per_batch, (3072,))
        y = rng.integers(0, 10, per_batch).tolist()
        _pickle(d / f"data_batch_{b}", {"batch_label": f"batch {b}", "data": data, "labels": y})
        rows.append(data)
        labels += y
    test = {"data": _images(rng, n_test, (3072,)), "labels": rng.integers(0, 10, n_test).tolist()}
    _pickle(d / "test_batch", test)
    _pickle(d / "batches.meta", {"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072})
    return np.concatenate(rows), np.array(labels)


def write_cifar100(root: Path, n_train: int = 30, n_test: int = 10) -> None:
    rng = np.random.default_rng(1)
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = rng.integers(0, 100, n).tolist()
        _pickle(
            d / name,
            {
                "data": _images(rng, n, (3072,)),
                "fine_labels": fine,
                "coarse_labels": [f // 5 for f in fine],
            },
        )
    _pickle(
        d / "meta",
        {
            "fine_label_names": [f"f{i}" for i in range(100)],
            "coarse_label_names": [f"k{i}" for i in range(20)],
        },
    )


def _idx(path: Path, arr: np.ndarray) -> None:
    """LeCun's idx format: magic 0x0000 08 <ndim> (uint8), big-endian int32 dims, raw bytes."""
    path.write_bytes(
        struct.pack(">I", 0x0800 + arr.ndim)
        + struct.pack(f">{arr.ndim}I", *arr.shape)
        + arr.astype(np.uint8).tobytes()
    )


def write_mnist(root: Path, folder: str, n_train: int = 20, n_test: int = 8) -> None:
    """<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte, uncompressed, as torchvision 0.29
    reads them (it checks only that they exist; the md5s belong to the .gz downloads)."""
    rng = np.random.default_rng(2)
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _idx(raw / f"{prefix}-images-idx3-ubyte", _images(rng, n, (28, 28)))
        _idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n))


def write_svhn(root: Path, n_train: int = 12, n_test: int = 6) -> None:
    """{train,test}_32x32.mat with X [32, 32, 3, N] and y [N, 1] in 1..10 (10 is the digit 0)."""
    from scipy.io import savemat

    rng = np.random.default_rng(3)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        y = np.arange(n, dtype=np.uint8)[:, None] % 10 + 1
        savemat(
            root / f"{split}_32x32.mat",
            {"X": _images(rng, n, (32, 32, 3)).transpose(1, 2, 3, 0), "y": y},
        )


def write_imagefolder(root: Path, classes: tuple[str, ...] = ("cat", "dog", "owl")) -> None:
    rng = np.random.default_rng(4)
    for split, per_class in (("train", 3), ("test", 2)):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(_images(rng, 1, (20, 24, 3))[0]).save(d / f"{i}.png")


# every dataset of the registry read from files under data.root: how to write a tiny copy, and
# the shapes (train, test, one image) that copy loads as
WRITERS = {
    "cifar10": (write_cifar10, 20, 6, (3, 32, 32)),
    "cifar100": (write_cifar100, 30, 10, (3, 32, 32)),
    "mnist": (lambda root: write_mnist(root, "MNIST"), 20, 8, (1, 28, 28)),
    "fashionmnist": (lambda root: write_mnist(root, "FashionMNIST"), 20, 8, (1, 28, 28)),
    "svhn": (write_svhn, 12, 6, (3, 32, 32)),
    "imagefolder": (write_imagefolder, 9, 6, (3, 32, 32)),
}
FROM_FILES = [d.name for d in DATASETS.entries() if d.needs_root]
DOWNLOADABLE = [d.name for d in DATASETS.entries() if d.needs_root and d.downloads]


def _assert_normalised(x: torch.Tensor) -> None:
    std, mean = torch.std_mean(x, dim=(0, 2, 3), correction=0)
    assert torch.allclose(mean, torch.zeros_like(mean), atol=1e-5)
    assert torch.allclose(std, torch.ones_like(std), atol=1e-4)


def test_cifar10_loads_real_layout_and_normalises_by_train_split(tmp_path: Path, no_md5: None):
    rows, labels = write_cifar10(tmp_path)
    s = build_splits(DataParams(name="cifar10", root=str(tmp_path)))  # through DATASETS
    assert s.x_train.shape == (20, 3, 32, 32) and s.x_test.shape == (6, 3, 32, 32)
    assert s.x_train.dtype == torch.float32 and s.y_train.dtype == torch.int64
    assert s.x_train.is_contiguous() and s.x_test.is_contiguous()
    assert s.num_classes == 10 and s.name == "cifar10"
    assert torch.equal(s.y_train, torch.from_numpy(labels))
    _assert_normalised(s.x_train)
    raw = torch.from_numpy(rows).reshape(-1, 3, 32, 32).double() / 255
    std, mean = torch.std_mean(raw, dim=(0, 2, 3), correction=0)
    expected = (raw - mean[None, :, None, None]) / std[None, :, None, None]
    assert torch.allclose(s.x_train.double(), expected, atol=1e-5)  # channel order and HW layout


def test_cifar100_uses_fine_labels_and_subsamples_with_seed(tmp_path: Path, no_md5: None):
    write_cifar100(tmp_path)
    p = DataParams(name="cifar100", root=str(tmp_path), n_train=16, n_test=10, seed=0)
    a, b = torchvision_splits(p), torchvision_splits(p)
    c = torchvision_splits(p.model_copy(update={"seed": 1}))
    assert a.x_train.shape == (16, 3, 32, 32) and a.x_test.shape == (10, 3, 32, 32)
    assert a.num_classes == 100 and 0 <= a.y_train.min() and a.y_train.max() < 100
    assert torch.equal(a.x_train, b.x_train) and not torch.equal(a.y_train, c.y_train)
    _assert_normalised(a.x_train)


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fashionmnist", "FashionMNIST")])
def test_mnist_idx_files(tmp_path: Path, name: str, folder: str):
    write_mnist(tmp_path, folder)
    s = torchvision_splits(DataParams(name=name, root=str(tmp_path)))
    assert s.x_train.shape == (20, 1, 28, 28) and s.x_test.shape == (8, 1, 28, 28)
    assert s.num_classes == 10 and s.y_train.max() < 10
    _assert_normalised(s.x_train)


def test_svhn_maps_label_10_to_0(tmp_path: Path, no_md5: None):
    write_svhn(tmp_path)
    s = torchvision_splits(DataParams(name="svhn", root=str(tmp_path)))
    assert s.x_train.shape == (12, 3, 32, 32) and s.num_classes == 10
    assert s.y_train.tolist() == [(i + 1) % 10 for i in range(12)]
    _assert_normalised(s.x_train)


def test_imagefolder_resizes_to_32(tmp_path: Path):
    write_imagefolder(tmp_path)
    s = torchvision_splits(DataParams(name="imagefolder", root=str(tmp_path)))
    assert s.x_train.shape == (9, 3, 32, 32) and s.x_test.shape == (6, 3, 32, 32)
    assert s.num_classes == 3 and sorted(set(s.y_test.tolist())) == [0, 1, 2]
    _assert_normalised(s.x_train)


def test_imagefolder_with_mismatched_classes_is_refused(tmp_path: Path):
    write_imagefolder(tmp_path)
    (tmp_path / "test" / "owl").rename(tmp_path / "test" / "emu")
    with pytest.raises(DataError, match="differ from train classes"):
        torchvision_splits(DataParams(name="imagefolder", root=str(tmp_path)))


@pytest.mark.parametrize("name", DOWNLOADABLE)
def test_missing_files_give_a_clear_error(tmp_path: Path, name: str):
    root = tmp_path / "nowhere"
    with pytest.raises(DataError, match="set data.download: true or place the files there") as e:
        torchvision_splits(DataParams(name=name, root=str(root)))
    assert str(root) in str(e.value)


def params_with_data(**data: object) -> dict:
    return {**tiny_raw(), "data": data}


def test_missing_imagefolder_and_missing_root(tmp_path: Path):
    with pytest.raises(DataError, match="place images in"):
        torchvision_splits(DataParams(name="imagefolder", root=str(tmp_path)))
    for name in FROM_FILES:  # refused when params load, before any work
        with pytest.raises(ParamsError, match=f"data.name='{name}' reads files from disk"):
            parse_params(params_with_data(name=name))


def test_only_downloadable_datasets_accept_download(tmp_path: Path):
    for name in (d.name for d in DATASETS.entries() if not d.downloads):
        data = {"name": name, "root": str(tmp_path), "download": True}
        with pytest.raises(ParamsError, match="cannot be downloaded"):
            parse_params(params_with_data(**data))


@pytest.mark.usefixtures("no_md5")
@pytest.mark.parametrize("name", FROM_FILES)
def test_every_file_dataset_of_the_registry_loads_through_build_splits(tmp_path: Path, name: str):
    """Each DATASETS entry that reads data.root has a tiny on-disk copy here and loads from it:
    shapes of the registry's input rank, labels in range, the test split normalised with the
    training split's statistics (not its own)."""
    write, n_train, n_test, shape = WRITERS[name]
    write(tmp_path)
    s = build_splits(DataParams(name=name, root=str(tmp_path)))
    assert s.name == name and s.x_train.dim() - 1 == DATASETS[name].input_rank
    assert s.x_train.shape == (n_train, *shape) and s.x_test.shape == (n_test, *shape)
    assert 0 <= int(s.y_train.min()) and int(s.y_train.max()) < s.num_classes
    _assert_normalised(s.x_train)
    std, mean = torch.std_mean(s.x_test, dim=(0, 2, 3), correction=0)
    assert not torch.allclose(mean, torch.zeros_like(mean), atol=1e-3)  # train stats, not test's
    fewer = build_splits(DataParams(name=name, root=str(tmp_path), n_train=5, n_test=3, seed=1))
    assert fewer.x_train.shape == (5, *shape) and fewer.x_test.shape == (3, *shape)
