"""Image datasets from torchvision's on-disk formats (registered in DATASETS).

Datasets are read from their arrays (CIFAR's pickles, MNIST's idx files, SVHN's .mat) without
per-sample PIL transforms, so preparing 50k images takes seconds. Nothing is downloaded unless
`data.download: true`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from kdsweep.config import DataParams
from kdsweep.data.splits import DataError, Splits

IMAGE_SIZE = 32  # imagefolder images are resized to this square size


def _torchvision_split(
    name: str, root: str, train: bool, download: bool
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """One split as uint8 [N, C, H, W], int64 labels and the class names, read from the arrays
    torchvision already holds (no per-sample PIL round trip)."""
    d = torchvision.datasets
    if name in ("cifar10", "cifar100"):
        ds = (d.CIFAR10 if name == "cifar10" else d.CIFAR100)(root, train=train, download=download)
        return (
            torch.from_numpy(ds.data).permute(0, 3, 1, 2),
            torch.tensor(ds.targets),
            list(ds.classes),
        )
    if name in ("mnist", "fashionmnist"):
        ds = (d.MNIST if name == "mnist" else d.FashionMNIST)(root, train=train, download=download)
        return ds.data.unsqueeze(1), ds.targets.long(), list(ds.classes)
    if name == "svhn":
        ds = d.SVHN(root, split="train" if train else "test", download=download)
        return torch.from_numpy(ds.data), torch.from_numpy(ds.labels), [str(i) for i in range(10)]
    raise ValueError(f"no torchvision loader for data.name={name!r}")


def _load_image(path: str) -> np.ndarray:
    """One image, resized; a file that is no image or a decompression bomb is a DataError."""
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except (Image.DecompressionBombError, OSError, ValueError) as err:
        raise DataError(
            f"image {path} cannot be read safely ({type(err).__name__}: {str(err)[:200]}): "
            "remove or replace it (re-download the dataset)"
        ) from None


def _imagefolder_split(root: str, train: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """`root/{train,test}/<class>/*.png` (or any extension torchvision's ImageFolder takes)."""
    ds = torchvision.datasets.ImageFolder(str(Path(root) / ("train" if train else "test")))
    x = np.stack([_load_image(path) for path, _ in ds.samples])
    return torch.from_numpy(x).permute(0, 3, 1, 2), torch.tensor(ds.targets), ds.classes


def _load(p: DataParams, root: str, train: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Turn torchvision's bare RuntimeError/OSError into a DataError that says what to do."""
    split = "train" if train else "test"
    try:
        if p.name == "imagefolder":
            return _imagefolder_split(root, train)
        return _torchvision_split(p.name, root, train, p.download)
    except (RuntimeError, OSError) as err:
        if p.name == "imagefolder":
            hint = f"place images in {root}/{split}/<class>/"
        elif p.download:
            hint = "the download failed; check the network or place the files there"
        else:
            hint = "set data.download: true or place the files there"
        raise DataError(
            f"{p.name} {split} split could not be read under data.root={root} ({err}): {hint}"
        ) from None


def _subsample(
    x: torch.Tensor, y: torch.Tensor, n: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random subset of n rows, kept in file order (so n >= N is the identity)."""
    if len(y) <= n:
        return x, y
    idx = torch.from_numpy(np.sort(rng.choice(len(y), n, replace=False)))
    return x[idx], y[idx]


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-channel mean/std of uint8 images in [0, 1] units, from 256-bin histograms
    (float32 sums over 50M pixels would drift)."""
    v = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for c in range(x.shape[1]):
        counts = torch.bincount(x[:, c].reshape(-1), minlength=256).double()
        mean = (counts * v).sum() / counts.sum()
        means.append(mean)
        stds.append(((counts * (v - mean) ** 2).sum() / counts.sum()).sqrt())
    return torch.stack(means).float(), torch.stack(stds).float().clamp_min(1e-6)


def torchvision_splits(p: DataParams) -> Splits:
    """Train/test splits as float32 [N, C, H, W], normalised per channel by the training split.

    The statistics come from the (subsampled) training split only, so nothing about the test split
    leaks into the inputs the teacher and students see.
    """
    assert p.root is not None, "config validation requires data.root for this dataset"
    x_tr, y_tr, classes = _load(p, p.root, train=True)
    x_te, y_te, test_classes = _load(p, p.root, train=False)
    if test_classes != classes:
        raise DataError(
            f"{p.name} under {p.root}: test classes {test_classes} differ from train classes "
            f"{classes}"
        )
    rng = np.random.default_rng(p.seed)
    x_tr, y_tr = _subsample(x_tr, y_tr, p.n_train, rng)
    x_te, y_te = _subsample(x_te, y_te, p.n_test, rng)
    mean, std = _channel_stats(x_tr)

    def normalise(x: torch.Tensor) -> torch.Tensor:
        out = x.to(torch.float32, memory_format=torch.contiguous_format).div_(255)
        return out.sub_(mean[None, :, None, None]).div_(std[None, :, None, None])

    return Splits(normalise(x_tr), y_tr.long(), normalise(x_te), y_te.long(), len(classes), p.name)
