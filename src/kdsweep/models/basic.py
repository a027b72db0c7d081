"""The small models of the embedded default: the MNIST-1D conv net and an MLP."""

from __future__ import annotations

import math

import torch
from torch import nn


class CNN1D(nn.Module):
    """The MNIST-1D convolutional baseline: three strided convs, then a linear head."""

    SEQUENTIAL = ("features", "head")  # forward: these in order (models.stacked)

    def __init__(self, in_channels: int, length: int, num_classes: int, width: int = 64):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(in_channels, width, 5, stride=2, padding=2),
            nn.ReLU(),
            nn.Conv1d(width, width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(width, width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        out_len = length
        for _ in range(3):
            out_len = math.ceil(out_len / 2)
        self.head = nn.Linear(width * out_len, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MLP(nn.Module):
    """Two hidden layers: the tiny student for which stacking pays off even on a CPU."""

    SEQUENTIAL = ("features", "head")  # forward: these in order (models.stacked)

    def __init__(self, in_features: int, num_classes: int, width: int = 64):
        super().__init__()
        self.features = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
        )
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def cnn1d(input_shape: tuple[int, ...], num_classes: int, width: int) -> CNN1D:
    return CNN1D(input_shape[0], input_shape[1], num_classes, width)


def mlp(input_shape: tuple[int, ...], num_classes: int, width: int) -> MLP:
    return MLP(math.prod(input_shape), num_classes, width)
