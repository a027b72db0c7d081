"""Statistics over seeds (DESIGN.md §6): bootstrap intervals of means and of two-sample
statistics, the relative gain and the data-efficiency multiplier. numpy only.

Every bootstrap is a percentile bootstrap with a generator derived from (seed, the group's key),
so one group's interval does not change when other groups are added. With the 2–5 seeds of a
sweep a percentile bootstrap under-covers (of 3 values it is just [min, max]): these intervals
rank effects, they are not exact tests.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def group_rng(seed: int, *key: Any) -> np.random.Generator:
    """A generator for one group: depends on the seed and the group's key only."""
    return np.random.default_rng([seed, zlib.crc32(repr(key).encode())])


def _interval(boot: np.ndarray, ci: float) -> tuple[float, float]:
    lo, hi = np.quantile(boot, [(1 - ci) / 2, (1 + ci) / 2])
    return float(lo), float(hi)


def bootstrap_ci(
    values: Sequence[float], n_boot: int, ci: float, rng: np.random.Generator
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean; a single value gives (value, value)."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    idx = rng.integers(0, v.size, size=(n_boot, v.size))
    return _interval(v[idx].mean(axis=1), ci)


def two_sample(
    a: np.ndarray,
    b: np.ndarray,
    stat: Callable[[np.ndarray, np.ndarray], np.ndarray],
    paired: bool,
    n_boot: int,
    ci: float,
    rng: np.random.Generator,
) -> tuple[float, float, float]:
    """stat(mean a, mean b) and its bootstrap interval, resampling pairs jointly if `paired`."""
    if paired and a.size != b.size:
        raise ValueError(f"paired samples need equal sizes, got {a.size} and {b.size}")
    ia = rng.integers(0, a.size, size=(n_boot, a.size))
    ib = ia if paired else rng.integers(0, b.size, size=(n_boot, b.size))
    point = float(stat(np.asarray(a.mean()), np.asarray(b.mean())))
    return (point, *_interval(stat(a[ia].mean(axis=1), b[ib].mean(axis=1)), ci))


def relative_gain(
    ref_scores: Sequence[float],
    base_scores: Sequence[float],
    higher_is_better: bool,
    *,
    paired: bool,
    n_boot: int,
    ci: float,
    rng: np.random.Generator,
) -> tuple[float, float, float]:
    """(gain, ci_low, ci_high) of the reference over the baseline, positive when it helps:
    (ref − base)/base for accuracy, (base − ref)/base for perplexity, on the seed means."""
    sign = 1.0 if higher_is_better else -1.0
    return two_sample(
        np.asarray(ref_scores, dtype=float),
        np.asarray(base_scores, dtype=float),
        lambda r, b: sign * (r - b) / b,
        paired,
        n_boot,
        ci,
        rng,
    )


def data_efficiency_multiplier(
    base_alphas: Sequence[float],
    base_scores: Sequence[float],
    ref_score: float,
    alpha: float,
    higher_is_better: bool,
) -> tuple[float, bool]:
    """(α*/α, censored): how much more data the baseline needs to reach `ref_score`.

    The baseline curve is made monotone (running best as α grows, so a noisy dip never creates
    a second crossing) and interpolated linearly in log α; α* is its first crossing of
    `ref_score`. Two ends cannot be measured:
    - ref_score beats every baseline point: censored=True and the multiplier is
      max(base_alphas)/α, a *lower bound* (the baseline never gets there on this grid);
    - ref_score is worse than the baseline's smallest-α point: α* is clamped to min(base_alphas)
      (censored=False), so the multiplier is then an *upper bound*; we clamp rather than
      extrapolate because a slope below the grid is unknown.
    """
    a = np.asarray(base_alphas, dtype=float)
    order = np.argsort(a)
    a = a[order]
    sign = 1.0 if higher_is_better else -1.0
    curve = np.maximum.accumulate(sign * np.asarray(base_scores, dtype=float)[order])
    target = sign * ref_score
    if target > curve[-1]:
        return float(a[-1] / alpha), True
    i = int(np.argmax(curve >= target))
    if i == 0 or curve[i] == target:
        return float(a[i] / alpha), False
    t = (target - curve[i - 1]) / (curve[i] - curve[i - 1])
    log_star = math.log(a[i - 1]) + t * (math.log(a[i]) - math.log(a[i - 1]))
    return math.exp(log_star) / alpha, False


def median_multiplier(values: Sequence[float], censored: Sequence[bool]) -> tuple[float, bool]:
    """(median, is_lower_bound): censored values are lower bounds, and raising a value can move
    the median only if it ranks at or below the (upper) middle, so only those flag it. Clamped
    values (upper bounds, see data_efficiency_multiplier) are taken at face value."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        raise ValueError("median_multiplier needs at least one value")
    order = np.argsort(v, kind="stable")
    low_half = order[: v.size // 2 + 1]
    return float(np.median(v)), bool(np.asarray(censored, dtype=bool)[low_half].any())
