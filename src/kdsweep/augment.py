"""Augmentation-consistent views: random crop (with zero padding) and horizontal flip, drawn
from a seed and stored as parameters, so that a view can be replayed exactly.

A cache of V views stores `aug[N, V, 3]` beside the teacher's outputs; a student replays
`apply_aug(x, aug[:, v])`, exactly the view the teacher labelled. The teacher trains on fresh
views of the same family (`teacher.augment`), so its outputs on the cached views are as good as
on clean images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def draw_aug(n: int, views: int, seed: int | torch.Generator, pad: int = 4) -> torch.Tensor:
    """aug[n, v] = (dy, dx, flip), int64 on the CPU, from a generator seeded by `seed` alone, so a
    cache can store (or redraw) the parameters without the images. Given a generator instead,
    draws continue its stream (the teacher's fresh views, one per step)."""
    g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    crop = torch.randint(0, 2 * pad + 1, (n, views, 2), generator=g)
    flip = torch.randint(0, 2, (n, views, 1), generator=g)
    return torch.cat([crop, flip], dim=2)
