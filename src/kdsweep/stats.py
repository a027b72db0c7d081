"""Statistics over seeds (DESIGN.md §6), with the coverage a sweep of 3–5 seeds can honestly give.

- Means and differences: Student t-intervals (scipy.stats: `ttest_1samp`; `ttest_rel` over
  seed pairs, or Welch's `ttest_ind` when the seeds do not pair). A percentile bootstrap of 3
  values is just [min, max] (~75% coverage); the t-interval is exact for normal seed noise.
- "Matches": two one-sided t-tests (TOST) against an equivalence margin, never "the interval
  contains 0" (which a noisy enough control always does).
- Share of a gain, (control − base)/(ref − base): Fieller's interval on the seed-paired
  differences (the inversion of the paired t-test), bounded exactly when the reference's gain
  is itself significant at the same level.
- Data-efficiency multiplier: the baseline curve's isotonic (PAV) fit, interpolated in log α;
  its interval a percentile bootstrap over seeds (scipy.stats.bootstrap), the only statistic
  here with no closed form.

Degenerate inputs follow the formulas' limits: one value gives no interval (NaN), values with
no spread give a point interval (and an exact equivalence decision).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import optimize, stats

NAN = (math.nan, math.nan)


def group_rng(seed: int, *key: Any) -> np.random.Generator:
    """A generator for one group: depends on the seed and the group's key only, so one group's
    interval does not change when other groups are added."""
    return np.random.default_rng([seed, zlib.crc32(repr(key).encode())])


def _arrays(a: Sequence[float], b: Sequence[float], paired: bool) -> tuple[np.ndarray, ...]:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if paired and a.size != b.size:
        raise ValueError(f"paired samples need equal sizes, got {a.size} and {b.size}")
    return a, b


def _constant(x: np.ndarray) -> bool:
    """No spread beyond rounding (a t-statistic of rounding noise means nothing)."""
    return bool(np.ptp(x) <= 1e-12 * max(1.0, float(np.abs(x).max())))


def _no_spread(a: np.ndarray, b: np.ndarray, paired: bool) -> bool:
    return _constant(a - b) if paired else _constant(a) and _constant(b)


def _too_few(a: np.ndarray, b: np.ndarray, paired: bool) -> bool:
    return a.size < 2 if paired else min(a.size, b.size) < 2


def _t_test(
    a: np.ndarray, b: np.ndarray, paired: bool, shift: float = 0.0, alternative: str = "two-sided"
) -> Any:
    """scipy's test of mean(a) + shift against mean(b): paired t, or Welch's t."""
    if paired:
        return stats.ttest_rel(a + shift, b, alternative=alternative)
    return stats.ttest_ind(a + shift, b, equal_var=False, alternative=alternative)


def mean_interval(values: Sequence[float], ci: float) -> tuple[float, float, float]:
    """(mean, low, high): the Student t-interval of the mean."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        raise ValueError("mean_interval needs at least one value")
    m = float(v.mean())
    if v.size < 2:
        return (m, *NAN)
    if _constant(v):
        return m, m, m
    lo, hi = stats.ttest_1samp(v, 0.0).confidence_interval(ci)
    return m, float(lo), float(hi)


def difference(
    a: Sequence[float], b: Sequence[float], paired: bool, ci: float
) -> tuple[float, float, float]:
    """(mean a − mean b, low, high): paired t-interval over seed pairs, else Welch's."""
    a, b = _arrays(a, b, paired)
    d = float(a.mean() - b.mean())
    if _too_few(a, b, paired):
        return (d, *NAN)
    if _no_spread(a, b, paired):
        return d, d, d
    lo, hi = _t_test(a, b, paired).confidence_interval(ci)
    return d, float(lo), float(hi)


def equivalence_p(a: Sequence[float], b: Sequence[float], margin: float, paired: bool) -> float:
    """TOST p-value for |mean a − mean b| < margin: the larger of the two one-sided t-tests'
    p-values (H0: difference ≤ −margin; H0: difference ≥ +margin). Below the test level, the
    two are equivalent within the margin. NaN with fewer than two values per group."""
    a, b = _arrays(a, b, paired)
    if _too_few(a, b, paired):
        return math.nan
    if _no_spread(a, b, paired):
        return 0.0 if abs(a.mean() - b.mean()) < margin else 1.0
    above = _t_test(a, b, paired, shift=margin, alternative="greater").pvalue
    below = _t_test(a, b, paired, shift=-margin, alternative="less").pvalue
    return float(max(above, below))


def relative_gain(
    ref: Sequence[float], base: Sequence[float], higher_is_better: bool, paired: bool, ci: float
) -> tuple[float, float, float]:
    """(gain, low, high) of the reference over the baseline, positive when it helps:
    (ref − base)/base for accuracy, (base − ref)/base for perplexity, on the seed means. The
    interval is the difference's t-interval over the baseline mean (its own uncertainty is a
    small fraction of the difference's)."""
    d, lo, hi = difference(ref, base, paired, ci)
    scale = (1.0 if higher_is_better else -1.0) / float(np.mean(base))
    return d * scale, *sorted((lo * scale, hi * scale))


def share(
    control: Sequence[float], ref: Sequence[float], base: Sequence[float], ci: float
) -> tuple[float, float, float]:
    """(share, low, high) of the reference's gain that the control recovers,
    (control − base)/(ref − base) on seed-paired values, with Fieller's interval: every θ the
    paired t-test of (control − base) − θ·(ref − base) does not reject. Bounded exactly when the
    reference's gain over the baseline is significant at level `ci`; otherwise NaN bounds."""
    c, r, b = (np.asarray(x, dtype=float) for x in (control, ref, base))
    if not c.size == r.size == b.size:
        raise ValueError(f"share needs seed-paired samples, got {c.size}, {r.size}, {b.size}")
    u, v = c - b, r - b
    point = float(u.mean() / v.mean()) if v.mean() != 0 else math.nan
    n = u.size
    if n < 2:
        return (point, *NAN)
    t2 = stats.t.ppf((1 + ci) / 2, n - 1) ** 2
    cov = np.cov(u, v) / n  # [[var ū, cov], [cov, var v̄]]
    qa = v.mean() ** 2 - t2 * cov[1, 1]
    qb = u.mean() * v.mean() - t2 * cov[0, 1]
    qc = u.mean() ** 2 - t2 * cov[0, 0]
    if qa <= 0:  # the reference's gain is not significant: the set is unbounded
        return (point, *NAN)
    root = math.sqrt(max(qb * qb - qa * qc, 0.0))
    return point, float((qb - root) / qa), float((qb + root) / qa)


def monotone_curve(
    alphas: Sequence[float], scores: Sequence[float], weights: Sequence[float], increasing: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(sorted α, isotonic fit of the scores): the weighted PAV fit, non-decreasing in α when
    `increasing` (accuracy), non-increasing otherwise (perplexity)."""
    order = np.argsort(np.asarray(alphas, dtype=float))
    fit = optimize.isotonic_regression(
        np.asarray(scores, dtype=float)[order],
        weights=np.asarray(weights, dtype=float)[order],
        increasing=increasing,
    ).x
    return np.asarray(alphas, dtype=float)[order], fit


def data_efficiency_multiplier(
    base_alphas: Sequence[float],
    base_scores: Sequence[float],
    ref_score: float,
    alpha: float,
    higher_is_better: bool,
    weights: Sequence[float] | None = None,
) -> tuple[float, bool]:
    """(α*/α, censored): how much more data the baseline needs to reach `ref_score`.

    The baseline's mean scores (weighted by `weights`, e.g. seeds per α) get an isotonic fit,
    so noise never creates a second crossing, interpolated linearly in log α; α* is its first
    crossing of `ref_score`. Two ends cannot be measured:
    - ref_score beats every fitted baseline point: censored=True and the multiplier is
      max(base_alphas)/α, a *lower bound* (the baseline never gets there on this grid);
    - ref_score is worse than the fit at the smallest α: α* is clamped to min(base_alphas)
      (censored=False), so the multiplier is then an *upper bound*; we clamp rather than
      extrapolate because a slope below the grid is unknown.
    """
    w = np.ones(len(base_alphas)) if weights is None else weights
    a, fit = monotone_curve(base_alphas, base_scores, w, higher_is_better)
    sign = 1.0 if higher_is_better else -1.0
    curve, target = sign * fit, sign * ref_score
    if target > curve[-1]:
        return float(a[-1] / alpha), True
    i = int(np.argmax(curve >= target))
    if i == 0 or curve[i] == target:
        return float(a[i] / alpha), False
    t = (target - curve[i - 1]) / (curve[i] - curve[i - 1])
    log_star = math.log(a[i - 1]) + t * (math.log(a[i]) - math.log(a[i - 1]))
    return math.exp(log_star) / alpha, False


def multiplier_interval(
    base: Mapping[float, Sequence[float]],
    ref: Sequence[float],
    alpha: float,
    higher_is_better: bool,
    n_boot: int,
    ci: float,
    rng: np.random.Generator,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the multiplier at α: the seeds of the reference at α and
    of the baseline at every α are resampled (each group on its own), the baseline refitted.
    NaN with fewer than two seeds in some group. A bound equal to max(α)/α is censored (a lower
    bound), as the point estimate would be."""
    alphas = sorted(base)
    samples = [np.asarray(ref, dtype=float), *(np.asarray(base[a], dtype=float) for a in alphas)]
    if min(s.size for s in samples) < 2:
        return NAN
    weights = [len(base[a]) for a in alphas]

    def statistic(r: np.ndarray, *b: np.ndarray) -> float:
        means = [float(x.mean()) for x in b]
        m, _ = data_efficiency_multiplier(
            alphas, means, float(r.mean()), alpha, higher_is_better, weights
        )
        return m

    res = stats.bootstrap(
        samples,
        statistic,
        n_resamples=n_boot,
        confidence_level=ci,
        method="percentile",
        vectorized=False,
        rng=rng,
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


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
