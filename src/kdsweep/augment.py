"""Augmentation-consistent views, drawn from a seed and stored as parameters, so that a view can
be replayed exactly. One family per input rank (registered in `registry.AUGMENTS`):

  crop_flip          images [N, C, H, W]: random crop (zero padding 4) and horizontal flip;
  shift_scale_noise  signals [N, C, L] (MNIST-1D): random circular shift, amplitude scaling and
                     additive Gaussian noise — the transforms MNIST-1D's own generator applies.

A family's parameters are three integers per view (`aug[..., 3]`): a cache of V views stores
`aug[N, V, 3]` beside the teacher's outputs and a student replays `family.apply(x, aug[:, v])`,
exactly the view the teacher labelled. The teacher trains on fresh views of the same family
(`teacher.augment`), and an online teacher labels the fresh view its student sees, so the
family is the same wherever augmentation happens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdsweep.errors import KdsweepError
from kdsweep.registry import AUGMENTS, augment_for

NOISE_SEEDS = 1 << 15  # the noise seed is stored in int16 beside the other parameters


def _generator(seed: int | torch.Generator) -> torch.Generator:
    return seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)


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
    g = _generator(seed)
    crop = torch.randint(0, 2 * pad + 1, (n, views, 2), generator=g)
    flip = torch.randint(0, 2, (n, views, 1), generator=g)
    return torch.cat([crop, flip], dim=2)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (int64 arithmetic, values below 2^32, no overflow): the counter-based
    random numbers of `gaussian_noise`, the same on every device for the same counters."""
    m = 0xFFFFFFFF
    x = (((x >> 16) ^ x) * 0x45D9F3B) & m
    x = (((x >> 16) ^ x) * 0x45D9F3B) & m
    return (x >> 16) ^ x


def gaussian_noise(seeds: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal noise [n, *shape] (float32), row n a pure function of seeds[n]: Box-Muller
    over hashed (seed, position) counters, vectorised — no generator per row, replayable."""
    size = math.prod(shape)
    if size >= 1 << 15:
        raise KdsweepError(f"noise of {size} values per row exceeds the counter space (32768)")
    pos = torch.arange(size, device=seeds.device)
    counter = (seeds.to(torch.int64)[:, None] << 17) + 2 * pos  # < 2^32 for seeds < 2^15
    u1 = (_hash32(counter).double() + 0.5) / 2**32
    u2 = (_hash32(counter + 1).double() + 0.5) / 2**32
    z = torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)
    return z.float().view(len(seeds), *shape)


@dataclass(frozen=True)
class CropFlip:
    """Images: random crop with zero padding `pad`, horizontal flip."""

    pad: int = 4

    def draw(self, n: int, views: int, seed: int | torch.Generator) -> torch.Tensor:
        return draw_aug(n, views, seed, self.pad)

    def apply(self, x: torch.Tensor, aug: torch.Tensor) -> torch.Tensor:
        return apply_aug(x, aug, self.pad)


@dataclass(frozen=True)
class ShiftScaleNoise:
    """Signals [N, C, L]: circular shift by s ∈ [−max_shift, max_shift] positions, amplitude
    scale 1 + m/1000 with m ∈ [−scale_permille, scale_permille], plus `noise`·N(0, 1) per
    value from a stored seed. Parameters: (s, m, noise seed), integers replayed exactly."""

    max_shift: int = 4
    scale_permille: int = 150
    noise: float = 0.15

    def draw(self, n: int, views: int, seed: int | torch.Generator) -> torch.Tensor:
        g = _generator(seed)
        shift = torch.randint(-self.max_shift, self.max_shift + 1, (n, views, 1), generator=g)
        scale = torch.randint(
            -self.scale_permille, self.scale_permille + 1, (n, views, 1), generator=g
        )
        noise = torch.randint(0, NOISE_SEEDS, (n, views, 1), generator=g)
        return torch.cat([shift, scale, noise], dim=2)

    def apply(self, x: torch.Tensor, aug: torch.Tensor) -> torch.Tensor:
        n, _, length = x.shape
        if aug.shape != (n, 3):
            raise ValueError(f"aug must be shaped ({n}, 3) for {n} signals, got {tuple(aug.shape)}")
        aug = aug.to(device=x.device, dtype=torch.int64)
        shift, scale, seed = aug.unbind(1)
        if not (
            (shift.abs() <= self.max_shift).all()
            and (scale.abs() <= self.scale_permille).all()
            and ((seed >= 0) & (seed < NOISE_SEEDS)).all()
        ):
            raise ValueError("aug holds shifts, scales or noise seeds outside the family's range")
        j = torch.arange(length, device=x.device)
        src = (j[None, :] - shift[:, None]) % length  # out[j] = x[j − s]: a roll by s
        rolled = x.gather(2, src[:, None, :].expand_as(x))
        factor = (1 + scale.to(x.dtype) / 1000).view(n, 1, 1)
        noise = gaussian_noise(seed, tuple(x.shape[1:])).to(x.device, x.dtype)
        return rolled * factor + self.noise * noise


CROP_FLIP = CropFlip()
SHIFT_SCALE_NOISE = ShiftScaleNoise()


def family_for(x: torch.Tensor) -> CropFlip | ShiftScaleNoise:
    """The augmentation family of inputs shaped like `x` ([N, ...]), by their rank."""
    name = augment_for(x.dim() - 1)
    if name is None:
        raise KdsweepError(
            f"no augmentation family for inputs shaped {tuple(x.shape[1:])} (families: "
            + ", ".join(f"{e.name} for rank {e.input_rank}" for e in AUGMENTS.entries())
            + "): set teacher.augment: false and views: 1"
        )
    return AUGMENTS.load(name)


def fresh_views(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One fresh random view of every row of `x`, its parameters drawn from `gen`'s stream."""
    family = family_for(x)
    return family.apply(x, family.draw(len(x), 1, gen)[:, 0])
