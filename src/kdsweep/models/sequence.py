"""Sequence models: a small GPT-style decoder (registered in ARCHS)."""

from __future__ import annotations

import math

import torch
from torch import nn

from kdsweep.layers import Block


class GPT(nn.Module):
    """A small decoder-only transformer. The output layer is `.head` (untied from the token
    embedding) so the `random_head` control can re-initialise it alone; no layer keeps running
    statistics, so students stack under `torch.func.vmap`."""

    def __init__(self, vocab_size: int, seq_len: int, width: int, depth: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.seq_len = seq_len
        self.tok_emb = nn.Embedding(vocab_size, width)
        self.pos_emb = nn.Embedding(seq_len, width)
        self.blocks = nn.Sequential(*(Block(width, heads, causal=True) for _ in range(depth)))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * depth))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """GPT-2's small normal init: PyTorch's defaults train a transformer noticeably worse."""
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[-1]
        if length > self.seq_len:
            raise ValueError(f"input length {length} exceeds the model's seq_len {self.seq_len}")
        h = self.tok_emb(x) + self.pos_emb(torch.arange(length, device=x.device))
        return self.head(self.ln_f(self.blocks(h)))


def gpt(input_shape: tuple[int, ...], num_classes: int, width: int) -> GPT:
    """input_shape = (seq_len,), num_classes = the vocabulary size; depth 2, 4 heads."""
    return GPT(num_classes, input_shape[0], width, depth=2, heads=4)


def gpt_small(input_shape: tuple[int, ...], num_classes: int, width: int) -> GPT:
    return GPT(num_classes, input_shape[0], width, depth=4, heads=4)
