"""Image classifiers for inputs shaped (channels, height, width): CIFAR ResNets, ResNet-18 and
a small ViT (registered in ARCHS)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from kdsweep.layers import Block


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


def resnet20(input_shape: tuple[int, ...], num_classes: int, width: int) -> CifarResNet:
    """`width` is the first stage's channels (16 standard)."""
    return CifarResNet(input_shape[0], num_classes, width, 3)


def resnet56(input_shape: tuple[int, ...], num_classes: int, width: int) -> CifarResNet:
    return CifarResNet(input_shape[0], num_classes, width, 9)


def resnet18(input_shape: tuple[int, ...], num_classes: int, width: int) -> ResNet18:
    if width != 64:
        raise ValueError(f"resnet18 has torchvision's fixed width 64; set width: 64 (got {width})")
    return ResNet18(input_shape[0], num_classes)


def vit(input_shape: tuple[int, ...], num_classes: int, width: int) -> ViT:
    """`width` is the token dimension."""
    c, h, w = input_shape
    return ViT((c, h, w), num_classes, width)
