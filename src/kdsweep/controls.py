"""Hypothesis-control targets (DESIGN.md §5): each control is a fixed transformation of the
cached teacher logits, registered in LOSSES as its `impl`, computed once per student, after which
the ordinary KD loss applies. Controls never need a teacher forward.

Signature of every transform: (teacher logits [N, C], labels [N], epsilon, seed) -> target logits
[N, C] (log-probabilities up to a constant).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def identity(logits: torch.Tensor, y: torch.Tensor, epsilon: float, seed: int) -> torch.Tensor:
    """The teacher's logits unchanged (every loss that is not a control)."""
    return logits


def ls_teacher(logits: torch.Tensor, y: torch.Tensor, epsilon: float, seed: int) -> torch.Tensor:
    """log((1−ε)·onehot(y) + ε/C): uniform label smoothing used as a teacher through τ."""
    c = logits.shape[-1]
    onehot = F.one_hot(y, c).bool()
    return torch.log(torch.where(onehot, 1 - epsilon + epsilon / c, epsilon / c))


def ls_matched(logits: torch.Tensor, y: torch.Tensor, epsilon: float, seed: int) -> torch.Tensor:
    """p(y) = p_T(y|x) (τ=1), the rest spread uniformly: the teacher's target mass with no
    class-similarity structure."""
    c = logits.shape[-1]
    onehot = F.one_hot(y, c).bool()
    p_y = torch.softmax(logits.double(), -1).gather(-1, y[:, None])
    return torch.log(torch.where(onehot, p_y, (1 - p_y) / (c - 1))).float()


def shuffled_dk(logits: torch.Tensor, y: torch.Tensor, epsilon: float, seed: int) -> torch.Tensor:
    """The teacher's logits with the non-target classes permuted per sample: same target mass
    and entropy at every τ, class-similarity structure destroyed."""
    n, c = logits.shape
    onehot = F.one_hot(y, c).bool()
    gen = torch.Generator().manual_seed(seed)
    # non-target columns in natural order, and the same columns in a random order per row
    natural = torch.argsort(onehot.float(), dim=-1, stable=True)[:, : c - 1]
    keys = torch.rand(n, c, generator=gen).masked_fill(onehot, 2.0)
    shuffled = torch.argsort(keys, dim=-1)[:, : c - 1]
    out = logits.clone()
    out.scatter_(-1, natural, logits.gather(-1, shuffled))
    return out
