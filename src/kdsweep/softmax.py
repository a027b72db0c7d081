"""Softmax, log-softmax and cross-entropy over the last (class) dimension, fast for few classes.

On a CPU, torch's kernels along a last dimension of fewer than 16 elements (the default's 10
classes, a top-k cache's k + 1 buckets) are 5-14x slower than the same kernels along a leading
dimension, which vectorise across rows (bench: [28160, 10] float32, one thread: log-softmax
forward + backward 6.8 ms along the last dimension, 1.1 ms moved to the front; KL of 22 stacked
students' batches 1.6 → 0.5 ms). These functions move a narrow class dimension to the front,
compute there and move it back — the same values up to float rounding — and call torch's own
kernel everywhere else. Every loss, distillation term and validation curve of training uses
them (losses, cache kinds, students.stack, train.BestVal, the teacher's loop).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NARROW = (
    16  # fewer classes than one AVX-512 vector of float32: the last-dimension kernel's slow case
)


def _narrow(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dim() > 1 and x.shape[-1] < NARROW


def softmax(x: torch.Tensor) -> torch.Tensor:
    """torch.softmax(x, -1)."""
    if not _narrow(x):
        return torch.softmax(x, -1)
    return torch.softmax(x.movedim(-1, 0).contiguous(), 0).movedim(0, -1)


def log_softmax(x: torch.Tensor) -> torch.Tensor:
    """torch.log_softmax(x, -1)."""
    if not _narrow(x):
        return torch.log_softmax(x, -1)
    return torch.log_softmax(x.movedim(-1, 0).contiguous(), 0).movedim(0, -1)


def cross_entropy(z: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """F.cross_entropy(z, y, reduction="none", label_smoothing=ε) per row, for logits z [N, C]
    and class ids y [N]: (1 − ε)·(−log q_y) + ε·mean_c(−log q_c)."""
    if not _narrow(z):
        return F.cross_entropy(z, y, reduction="none", label_smoothing=label_smoothing)
    log_q = log_softmax(z)
    nll = -log_q.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    if label_smoothing == 0.0:
        return nll
    return (1 - label_smoothing) * nll - label_smoothing * log_q.mean(-1)
