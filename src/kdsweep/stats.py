"""Statistics over seeds (DESIGN.md §6), with the coverage a sweep of 3–5 seeds can honestly give.

- Means and differences: Student t-intervals (scipy.stats: `ttest_1samp`; `ttest_rel` over
  seed pairs, or Welch's `ttest_ind` when the seeds do not pair). A percentile bootstrap of 3
  values is just [min, max] (~75% coverage); the t-interval is exact for normal seed noise.
- "Matches": two one-sided t-tests (TOST) against an equivalence margin, never "the interval
  contains 0" (which a noisy enough control always does).
- Ratios of seed means — a relative gain ref/base − 1 and a share (control − base)/(ref − base):
  Fieller's interval (the inversion of the paired t-test of u − θ·v), which carries the
  denominator's uncertainty; bounded exactly when the denominator is significantly non-zero.
- Data-efficiency multiplier: the baseline curve's isotonic (PAV) fit, interpolated in log α
  (linearly, or by a monotone cubic: PCHIP); its interval a delete-one-seed jackknife t-interval
  on log(multiplier), a seed (with its nested subsets, across every α and both methods) left
  out as one unit. A percentile bootstrap of 5 seeds, resampled independently, covers ~0.88.
- Many verdicts: Holm's step-down adjustment within a family (`holm`).

Degenerate inputs follow the formulas' limits: one value gives no interval (NaN), values with
no spread give a point interval (and an exact equivalence decision).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import interpolate, optimize, stats

NAN = (math.nan, math.nan)


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


def _fieller(
    u_mean: float, v_mean: float, cov: np.ndarray, df: float, ci: float
) -> tuple[float, float]:
    """Fieller's interval of the ratio ū/v̄: every θ for which the t-test of ū − θ·v̄ (with the
    means' covariance `cov` = [[var ū, cov], [cov, var v̄]] and `df` degrees of freedom) does not
    reject. NaN bounds where v̄ is not significantly non-zero (the set is then unbounded)."""
    t2 = stats.t.ppf((1 + ci) / 2, df) ** 2
    qa = v_mean**2 - t2 * cov[1, 1]
    qb = u_mean * v_mean - t2 * cov[0, 1]
    qc = u_mean**2 - t2 * cov[0, 0]
    if qa <= 0:
        return NAN
    root = math.sqrt(max(qb * qb - qa * qc, 0.0))
    return float((qb - root) / qa), float((qb + root) / qa)


def relative_gain(
    ref: Sequence[float], base: Sequence[float], higher_is_better: bool, paired: bool, ci: float
) -> tuple[float, float, float]:
    """(gain, low, high) of the reference over the baseline, positive when it helps:
    (ref − base)/base for accuracy, (base − ref)/base for perplexity, on the seed means. The
    interval is Fieller's for the ratio mean(ref)/mean(base), with the seed-paired covariance
    (or independent groups, min(n) − 1 degrees of freedom, when the seeds do not pair), so the
    baseline mean's own uncertainty is carried (the difference over a fixed baseline mean covers
    ~0.85 at 5 seeds where the baseline is noisy)."""
    r, b = _arrays(ref, base, paired)
    sign = 1.0 if higher_is_better else -1.0
    gain = sign * (float(r.mean() / b.mean()) - 1.0)
    if _too_few(r, b, paired):
        return (gain, *NAN)
    if _no_spread(r, b, paired) and _constant(b):
        return gain, gain, gain
    if paired:
        cov, df = np.cov(r, b) / r.size, r.size - 1
    else:
        cov = np.diag([r.var(ddof=1) / r.size, b.var(ddof=1) / b.size])
        df = min(r.size, b.size) - 1
    lo, hi = _fieller(float(r.mean()), float(b.mean()), cov, df, ci)
    return gain, *sorted((sign * (lo - 1.0), sign * (hi - 1.0)))


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
    return point, *_fieller(float(u.mean()), float(v.mean()), np.cov(u, v) / n, n - 1, ci)


def share_difference(
    a: tuple[Sequence[float], Sequence[float], Sequence[float]],
    b: tuple[Sequence[float], Sequence[float], Sequence[float]],
    ci: float,
) -> tuple[float, float, float]:
    """(share_a − share_b, low, high) for two shares (control, ref, base) measured on the same
    seeds (e.g. at two α, whose subsets are nested): a t-interval over seeds of the shares'
    linearised per-seed contributions ((u_i − s·v_i)/v̄ for each), so the seeds' correlation
    between the two is kept. NaN bounds when either gain's mean is 0 or seeds are fewer than 2."""
    parts = []
    for c, r, base in (a, b):
        c, r, base = (np.asarray(x, dtype=float) for x in (c, r, base))
        u, v = c - base, r - base
        if v.mean() == 0:
            return math.nan, *NAN
        s = u.mean() / v.mean()
        parts.append((s, (u - s * v) / v.mean()))
    (sa, ia), (sb, ib) = parts
    if ia.size != ib.size:
        raise ValueError(f"share_difference needs the same seeds, got {ia.size} and {ib.size}")
    d = sa - sb
    if ia.size < 2:
        return d, *NAN
    lo, hi = stats.ttest_1samp(ia - ib, 0.0).confidence_interval(ci)
    return float(d), float(lo + d), float(hi + d)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error ≤ the level at which they are read);
    NaN p-values stay NaN and do not count in the family."""
    p = np.asarray(pvalues, dtype=float)
    ok = np.flatnonzero(~np.isnan(p))
    out = p.copy()
    order = ok[np.argsort(p[ok], kind="stable")]
    m, running = order.size, 0.0
    for i, j in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[j]))
        out[j] = running
    return [float(x) for x in out]


def difference_p(a: Sequence[float], b: Sequence[float], paired: bool) -> float:
    """Two-sided p-value of the t-test of mean a = mean b (paired or Welch); NaN with too few
    values, 0 or 1 without spread."""
    a, b = _arrays(a, b, paired)
    if _too_few(a, b, paired):
        return math.nan
    if _no_spread(a, b, paired):
        return 0.0 if a.mean() != b.mean() else 1.0
    return float(_t_test(a, b, paired).pvalue)


def seeds_for_equivalence(sd: float, margin: float, level: float, power: float = 0.8) -> int | None:
    """The smallest seed count at which TOST (level `level`, paired, seed-difference SD `sd`)
    declares equivalence within ±margin with probability `power` when the true difference is 0
    (noncentral t); None beyond 10,000 seeds or without a spread."""
    if not (sd > 0 and margin > 0) or not math.isfinite(sd):
        return None
    for n in range(2, 10_001):
        crit = stats.t.ppf(1 - level, n - 1)
        if 2 * stats.nct.sf(crit, n - 1, margin * math.sqrt(n) / sd) - 1 >= power:
            return n
    return None


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


INTERPOLATIONS = ("linear", "pchip")
"""How the baseline's isotonic fit is interpolated in log α: piecewise linear, or the monotone
cubic of Fritsch–Carlson (scipy.interpolate.PchipInterpolator); the report gives both."""


def data_efficiency_multiplier(
    base_alphas: Sequence[float],
    base_scores: Sequence[float],
    ref_score: float,
    alpha: float,
    higher_is_better: bool,
    weights: Sequence[float] | None = None,
    interp: str = "linear",
) -> tuple[float, bool]:
    """(α*/α, censored): how much more data the baseline needs to reach `ref_score`.

    The baseline's mean scores (weighted by `weights`, e.g. seeds per α) get an isotonic fit,
    so noise never creates a second crossing, interpolated in log α (`interp`: "linear", or
    "pchip", a monotone cubic through the same points); α* is its first crossing of
    `ref_score`. Two ends cannot be measured:
    - ref_score beats every fitted baseline point: censored=True and the multiplier is
      max(base_alphas)/α, a *lower bound* (the baseline never gets there on this grid);
    - ref_score is worse than the fit at the smallest α: α* is clamped to min(base_alphas)
      (censored=False), so the multiplier is then an *upper bound*; we clamp rather than
      extrapolate because a slope below the grid is unknown.
    """
    if interp not in INTERPOLATIONS:
        raise ValueError(f"interp must be one of {INTERPOLATIONS}, got {interp!r}")
    w = np.ones(len(base_alphas)) if weights is None else weights
    a, fit = monotone_curve(base_alphas, base_scores, w, higher_is_better)
    sign = 1.0 if higher_is_better else -1.0
    curve, target = sign * fit, sign * ref_score
    if target > curve[-1]:
        return float(a[-1] / alpha), True
    i = int(np.argmax(curve >= target))
    if i == 0 or curve[i] == target:
        return float(a[i] / alpha), False
    x = np.log(a)
    if interp == "linear" or a.size < 3:
        t = (target - curve[i - 1]) / (curve[i] - curve[i - 1])
        log_star = x[i - 1] + t * (x[i] - x[i - 1])
    else:
        pchip = interpolate.PchipInterpolator(x, curve)
        log_star = optimize.brentq(lambda z: float(pchip(z)) - target, x[i - 1], x[i])
    return math.exp(log_star) / alpha, False


def multiplier_interval(
    base: Mapping[float, Mapping[Any, float]],
    ref: Mapping[Any, float],
    alpha: float,
    higher_is_better: bool,
    ci: float,
    interp: str = "linear",
) -> tuple[float, float, bool]:
    """(low, high, high_censored): the delete-one-seed jackknife t-interval of log(multiplier)
    at α. `base` maps each α to {seed: score}, `ref` is {seed: score} at α; a seed is one unit
    (its nested subsets at every α, both methods), left out everywhere at once, so the pairing
    and the nesting are kept. log m ± t_{n−1}·SE_jack, with n the seeds; NaN with fewer than 3
    seeds. The upper end is censored (a lower bound) when the estimate or any leave-one-out
    estimate is. Coverage simulated at 5 seeds in tests/test_stats.py."""
    alphas = sorted(base)
    seeds = sorted(set(ref).union(*(set(base[a]) for a in alphas)), key=repr)
    n = len(seeds)

    def estimate(keep: Sequence[Any]) -> tuple[float, bool]:
        groups = [[base[a][s] for s in keep if s in base[a]] for a in alphas]
        r = [ref[s] for s in keep if s in ref]
        if not r or any(not g for g in groups):
            return math.nan, False
        means = [float(np.mean(g)) for g in groups]
        weights = [len(g) for g in groups]
        return data_efficiency_multiplier(
            alphas, means, float(np.mean(r)), alpha, higher_is_better, weights, interp
        )

    if n < 3:
        return math.nan, math.nan, False
    point, censored = estimate(seeds)
    loo = [estimate([s for s in seeds if s != left]) for left in seeds]
    logs = np.log([m for m, _ in loo])
    if not np.all(np.isfinite(logs)):
        return math.nan, math.nan, False
    se = math.sqrt((n - 1) / n * float(np.sum((logs - logs.mean()) ** 2)))
    half = stats.t.ppf((1 + ci) / 2, n - 1) * se
    high_censored = censored or any(c for _, c in loo)
    return math.exp(math.log(point) - half), math.exp(math.log(point) + half), high_censored


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
