"""Model zoo. Every classifier exposes its last layer as `.head` (the `random_head` control
re-initialises it). No layer keeps running statistics, so students stack under `torch.func.vmap`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CNN1D(nn.Module):
    """The MNIST-1D convolutional baseline: three strided convs, then a linear head."""

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


class SelfAttention(nn.Module):
    """Multi-head self-attention through the fused SDPA kernel (flash/efficient on CUDA)."""

    def __init__(self, width: int, heads: int, causal: bool):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(out.transpose(1, 2).reshape(b, t, w))


class Block(nn.Module):
    """Pre-LayerNorm transformer block (the ViT's and the GPT's): attention, then a 4x GELU MLP,
    each on a residual path."""

    def __init__(self, width: int, heads: int, causal: bool):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, causal)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def build_model(arch: str, input_shape: tuple[int, ...], num_classes: int, width: int) -> nn.Module:
    """One constructor for teachers and students, so both sides of a comparison are built alike."""
    if arch == "cnn1d":
        if len(input_shape) != 2:
            raise ValueError(
                f"arch cnn1d needs inputs shaped (channels, length), got {input_shape}"
            )
        return CNN1D(input_shape[0], input_shape[1], num_classes, width)
    if arch == "mlp":
        return MLP(math.prod(input_shape), num_classes, width)
    if arch.startswith("gpt"):  # input_shape = (seq_len,), num_classes = vocabulary size
        from kdsweep.lm import build_lm

        return build_lm(arch, num_classes, input_shape[0], width)
    from kdsweep.vision import build_vision_model

    return build_vision_model(arch, input_shape, num_classes, width)


def reinit_head(model: nn.Module, seed: int) -> nn.Module:
    """The `random_head` control: same features, a freshly initialised last layer."""
    torch.manual_seed(seed)
    model.head.reset_parameters()
    return model
