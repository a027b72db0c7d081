"""Image datasets from torchvision's on-disk formats, CIFAR-style models, and replayable views.

Datasets are read from their arrays (CIFAR's pickles, MNIST's idx files, SVHN's .mat) without
per-sample PIL transforms, so preparing 50k images takes seconds. Nothing is downloaded unless
`data.download: true`. Every model keeps no running statistics (GroupNorm, LayerNorm), so students
stack under `torch.func.vmap`, and exposes its last layer as `.head` for the `random_head` control.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn

from kdsweep.config import DataParams
from kdsweep.data import DataError, Splits
from kdsweep.models import Block

IMAGE_SIZE = 32  # imagefolder images are resized to this square size
VISION_ARCHS = ("resnet20", "resnet56", "resnet18", "vit")

# ---------------------------------------------------------------------------------------------
# Datasets


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
    with Image.open(path) as im:
        rgb = im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
        return np.asarray(rgb, dtype=np.uint8)


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
    if p.root is None:
        raise DataError(
            f"data.name={p.name} reads image files from disk: set data.root to their directory"
        )
    if p.name == "imagefolder" and p.download:
        raise DataError(
            "imagefolder cannot be downloaded: set data.download: false and place images under "
            f"{p.root}"
        )
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


# ---------------------------------------------------------------------------------------------
# Models


def group_norm(channels: int) -> nn.GroupNorm:
    """Up to 32 groups of at least 4 channels: no running statistics, so a stack of students
    under vmap normalises exactly like each student alone."""
    return nn.GroupNorm(math.gcd(channels, max(1, min(32, channels // 4))), channels)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; a 1x1 projection where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = group_norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = group_norm(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), group_norm(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al. (2016) CIFAR ResNet-(6n+2): three stages of n blocks at width, 2x and 4x width."""

    def __init__(self, in_channels: int, num_classes: int, width: int, blocks_per_stage: int):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
            group_norm(width),
            nn.ReLU(),
        ]
        cin = width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for b in range(blocks_per_stage):
                layers.append(BasicBlock(cin, cout, 2 if stage > 0 and b == 0 else 1))
                cin = cout
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ResNet18(nn.Module):
    """torchvision's ResNet-18 for 32x32 inputs: 3x3 stride-1 stem, no max-pool, GroupNorm.

    The classifier is moved to `.head` (torchvision's `.fc` becomes an identity) rather than
    aliased, since a module registered twice would save shared tensors that safetensors refuses.
    """

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        body = torchvision.models.resnet18(num_classes=num_classes, norm_layer=group_norm)
        body.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(body.conv1.weight, mode="fan_out", nonlinearity="relu")
        body.maxpool = nn.Identity()
        self.head = body.fc
        body.fc = nn.Identity()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class ViT(nn.Module):
    """A small Vision Transformer: 4x4 patches, a class token, learned position embeddings."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        dim: int,
        depth: int = 4,
        heads: int = 4,
        patch: int = 4,
    ):
        super().__init__()
        c, h, w = input_shape
        if h % patch or w % patch:
            raise ValueError(
                f"arch vit needs height and width divisible by the patch size {patch}, got {h}x{w}"
            )
        if dim % heads:
            raise ValueError(
                f"arch vit needs width divisible by its {heads} heads, got width={dim}"
            )
        self.patch = nn.Conv2d(c, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, 1 + (h // patch) * (w // patch), dim))
        nn.init.trunc_normal_(self.cls, std=0.02)
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, causal=False) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos
        return self.head(self.norm(self.blocks(tokens)[:, 0]))


def build_vision_model(
    arch: str, input_shape: tuple[int, ...], num_classes: int, width: int
) -> nn.Module:
    """Image classifiers for inputs shaped (channels, height, width); `width` is the first stage's
    channels for the CIFAR ResNets (16 standard) and the token dimension for the ViT."""
    if arch not in VISION_ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: cnn1d, mlp, {', '.join(VISION_ARCHS)}")
    if len(input_shape) != 3:
        raise ValueError(
            f"arch {arch} needs image inputs shaped (channels, height, width), got {input_shape}"
        )
    c, h, w = input_shape
    if arch == "resnet20":
        return CifarResNet(c, num_classes, width, 3)
    if arch == "resnet56":
        return CifarResNet(c, num_classes, width, 9)
    if arch == "resnet18":
        if width != 64:
            raise ValueError(
                f"arch resnet18 has torchvision's fixed width 64; set width: 64 (got {width})"
            )
        return ResNet18(c, num_classes)
    return ViT((c, h, w), num_classes, width)


# ---------------------------------------------------------------------------------------------
# Augmentation-consistent views


def apply_aug(x: torch.Tensor, aug: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Replay crops and flips: row n is zero-padded by `pad`, cropped at (dy, dx) = aug[n, :2] to
    its original size and mirrored left-right if aug[n, 2] == 1.

    Two gathers (rows, then columns), no per-sample loop, no interpolation: replaying the stored
    parameters reproduces a view bit for bit. Zero padding happens on normalised inputs, i.e. at
    the channel mean.
    """
    n, c, h, w = x.shape
    if aug.shape != (n, 3):
        raise ValueError(f"aug must be shaped ({n}, 3) for {n} images, got {tuple(aug.shape)}")
    aug = aug.to(device=x.device, dtype=torch.int64)
    dy, dx, flip = aug.unbind(1)
    if pad < 0 or not (
        ((aug[:, :2] >= 0) & (aug[:, :2] <= 2 * pad)).all() and ((flip == 0) | (flip == 1)).all()
    ):
        raise ValueError(f"aug holds offsets outside [0, {2 * pad}] or flips outside {{0, 1}}")
    padded = F.pad(x, (pad, pad, pad, pad))
    i = torch.arange(h, device=x.device)
    j = torch.arange(w, device=x.device)
    rows = (dy[:, None] + i)[:, None, :, None].expand(n, c, h, w + 2 * pad)
    cols = dx[:, None] + torch.where(flip[:, None] == 1, w - 1 - j, j)
    return padded.gather(2, rows).gather(3, cols[:, None, None, :].expand(n, c, h, w))


def draw_aug(n: int, views: int, seed: int, pad: int = 4) -> torch.Tensor:
    """aug[n, v] = (dy, dx, flip), int64 on the CPU, from a generator seeded by `seed` alone, so a
    cache can store (or redraw) the parameters without the images."""
    g = torch.Generator().manual_seed(seed)
    crop = torch.randint(0, 2 * pad + 1, (n, views, 2), generator=g)
    flip = torch.randint(0, 2, (n, views, 1), generator=g)
    return torch.cat([crop, flip], dim=2)


def draw_views(
    x: torch.Tensor, views: int, seed: int, pad: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """`views` random crop+flip views per image: ([N, V, C, H, W], aug [N, V, 3] int64).

    The teacher labels each view once and the cache stores `aug` beside its outputs; the student
    then trains on `apply_aug(x, aug[:, v])`, exactly the view the teacher labelled. A cached target
    is never transformed (a flipped image's teacher output is not the flipped output), and no fresh
    augmentation is ever drawn for an input whose target was cached. Built on `apply_aug`, so the
    replay is pixel-identical by construction.
    """
    n, *shape = x.shape
    aug = draw_aug(n, views, seed, pad)
    flat = x.unsqueeze(1).expand(n, views, *shape).reshape(n * views, *shape)
    return apply_aug(flat, aug.reshape(n * views, 3), pad).reshape(n, views, *shape), aug
