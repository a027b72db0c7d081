"""kdsweep.stats: the coverage of its intervals at the default seed count (simulated, seeded),
the equivalence test on constructed cases, the share of a gain, and the multiplier."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdsweep.stats import (
    data_efficiency_multiplier,
    difference,
    difference_p,
    equivalence_p,
    holm,
    mean_interval,
    median_multiplier,
    multiplier_interval,
    relative_gain,
    seeds_for_equivalence,
    share,
    share_difference,
)

SEEDS = 5  # the default seed count (DESIGN.md §6: ≥ 5)
PROPERTY = settings(max_examples=60, deadline=None, derandomize=True)


def seed_pairs(rng: np.random.Generator, n: int, means: tuple[float, ...]) -> list[np.ndarray]:
    """Scores of several methods over n seeds: a shared subset effect per seed (what pairing
    cancels) plus each student's own noise."""
    subset = rng.normal(0, 0.02, n)
    return [m + subset + rng.normal(0, 0.005, n) for m in means]


# --- coverage ---------------------------------------------------------------------------------


@pytest.mark.parametrize("paired", [True, False])
def test_difference_interval_covers_at_the_nominal_level_with_five_seeds(paired: bool) -> None:
    rng = np.random.default_rng(0)
    reps, hits = 2000, 0
    for _ in range(reps):
        # unpaired: the two methods' students come from different subsets
        a, b = (
            seed_pairs(rng, SEEDS, (0.80, 0.78))
            if paired
            else [seed_pairs(rng, SEEDS, (m,))[0] for m in (0.80, 0.78)]
        )
        _, lo, hi = difference(a, b, paired, 0.95)
        hits += lo <= 0.02 <= hi
    coverage = hits / reps
    assert 0.93 <= coverage <= 0.97, coverage


def test_mean_interval_covers_at_the_nominal_level_with_five_seeds() -> None:
    rng = np.random.default_rng(1)
    hits = sum(
        lo <= 0.8 <= hi
        for _, lo, hi in (mean_interval(rng.normal(0.8, 0.02, SEEDS), 0.95) for _ in range(2000))
    )
    assert 0.93 <= hits / 2000 <= 0.97


def test_share_interval_covers_at_the_nominal_level_with_five_seeds() -> None:
    """Fieller's interval of (control − ce)/(kd − ce), where KD's gain is clearly significant."""
    rng = np.random.default_rng(2)
    reps, hits = 2000, 0
    for _ in range(reps):
        ce, kd, control = seed_pairs(rng, SEEDS, (0.60, 0.70, 0.64))
        _, lo, hi = share(control, kd, ce, 0.95)
        hits += lo <= 0.4 <= hi
    assert 0.93 <= hits / reps <= 0.97


def test_relative_gain_interval_covers_where_the_baseline_is_noisy() -> None:
    """The default's α = 0.02: CE 0.367, KD 0.681 (+86%), CE noisy (own SD 0.04, subset 0.03).
    Fieller's ratio interval covers 0.95; the old difference-over-the-mean interval ~0.85."""
    rng = np.random.default_rng(6)
    reps, hits, old_hits = 1500, 0, 0
    truth = 0.681 / 0.367 - 1
    for _ in range(reps):
        subset = rng.normal(0, 0.03, SEEDS)
        ce = 0.367 + subset + rng.normal(0, 0.04, SEEDS)
        kd = 0.681 + subset + rng.normal(0, 0.03, SEEDS)
        _, lo, hi = relative_gain(kd, ce, True, True, 0.95)
        hits += lo <= truth <= hi
        _, dlo, dhi = difference(kd, ce, True, 0.95)
        old_hits += dlo / ce.mean() <= truth <= dhi / ce.mean()
    assert 0.93 <= hits / reps <= 0.97, hits / reps
    assert old_hits / reps < 0.9, old_hits / reps  # what the issue measured


def test_share_interval_covers_on_default_shaped_data() -> None:
    """ls_matched recovering 45% of a default-sized gain at α = 0.02, paired SD ~0.05."""
    rng = np.random.default_rng(7)
    reps, hits = 2000, 0
    for _ in range(reps):
        subset = rng.normal(0, 0.03, SEEDS)
        ce, kd, control = (
            m + subset + rng.normal(0, 0.03, SEEDS) for m in (0.367, 0.681, 0.367 + 0.45 * 0.314)
        )
        _, lo, hi = share(control, kd, ce, 0.95)
        hits += lo <= 0.45 <= hi
    assert 0.93 <= hits / reps <= 0.97, hits / reps


def test_share_difference_between_alphas_covers() -> None:
    """The same share (50%) of a large gain at α = 0.02 and a small one at 0.2, nested subsets
    (one subset effect per seed at both α)."""
    rng = np.random.default_rng(8)
    reps, hits = 2000, 0
    for _ in range(reps):
        subset = rng.normal(0, 0.02, SEEDS)
        groups = []
        for ce, gain in ((0.367, 0.314), (0.80, 0.06)):
            c, r, x = (ce + d + subset + rng.normal(0, 0.01, SEEDS) for d in (0, gain, gain / 2))
            groups.append((x, r, c))
        _, lo, hi = share_difference(groups[0], groups[1], 0.95)
        hits += lo <= 0 <= hi
    assert 0.93 <= hits / reps <= 0.97, hits / reps


DEFAULT_A, DEFAULT_CE = [0.02, 0.05, 0.2, 1.0], [0.367, 0.567, 0.852, 0.910]


def nested_world(
    rng: np.random.Generator, kd: float
) -> tuple[dict[float, dict[int, float]], dict[int, float]]:
    """CE at the default's four α and KD at α=0.05, 5 seeds whose nested subsets shift every α
    and both methods alike (SD 0.02), plus each student's own noise (SD 0.02)."""
    subset = rng.normal(0, 0.02, SEEDS)
    base = {
        a: {s: m + subset[s] + rng.normal(0, 0.02) for s in range(SEEDS)}
        for a, m in zip(DEFAULT_A, DEFAULT_CE, strict=True)
    }
    return base, {s: kd + subset[s] + rng.normal(0, 0.02) for s in range(SEEDS)}


@pytest.mark.parametrize("interp", ["linear", "pchip"])
def test_multiplier_interval_covers_at_five_seeds(interp: str) -> None:
    """KD 0.813 at α = 0.05 (the default's 3.3x linear, 2.9x monotone cubic): the jackknife
    t-interval over seeds covers the multiplier of its own interpolation at 0.93–0.97."""
    rng = np.random.default_rng(9)
    truth, _ = data_efficiency_multiplier(DEFAULT_A, DEFAULT_CE, 0.813, 0.05, True, None, interp)
    assert truth == pytest.approx(3.31 if interp == "linear" else 2.89, abs=0.01)
    reps, hits = 600, 0
    for _ in range(reps):
        base, ref = nested_world(rng, 0.813)
        lo, hi, censored = multiplier_interval(base, ref, 0.05, True, 0.95, interp)
        hits += lo <= truth <= hi and not censored
    assert 0.93 <= hits / reps <= 0.97, hits / reps


# --- intervals on known numbers ---------------------------------------------------------------


def test_mean_interval_is_the_student_t_interval() -> None:
    v = [0.1, 0.4, 0.5, 0.9, 0.2]
    m, lo, hi = mean_interval(v, 0.95)
    half = 2.7764451051977987 * np.std(v, ddof=1) / math.sqrt(5)  # t_{0.975, 4}
    assert (m, lo, hi) == pytest.approx((0.42, 0.42 - half, 0.42 + half))
    assert mean_interval([0.7], 0.95)[1:] == (pytest.approx(math.nan, nan_ok=True),) * 2
    assert mean_interval([0.3, 0.3, 0.3], 0.95) == (0.3, 0.3, 0.3)


def test_pairing_cancels_the_subset_variance() -> None:
    base = np.array([0.5, 0.6, 0.7])
    ref = base + np.array([0.1, 0.11, 0.09])
    _, lo, hi = difference(ref, base, True, 0.95)
    _, lo_i, hi_i = difference(ref, base, False, 0.95)
    assert lo > 0 and hi - lo < 0.1 < hi_i - lo_i and lo_i < 0
    with pytest.raises(ValueError, match="equal sizes"):
        difference([1.0, 2.0], [1.0], True, 0.95)


def test_relative_gain_sign_for_accuracy_and_perplexity() -> None:
    assert relative_gain([0.6, 0.6], [0.5, 0.5], True, True, 0.95) == pytest.approx((0.2,) * 3)
    assert relative_gain([0.4, 0.4], [0.5, 0.5], True, True, 0.95)[0] == pytest.approx(-0.2)
    assert relative_gain([8.0, 8.0], [10.0, 10.0], False, True, 0.95)[0] == pytest.approx(0.2)
    g, lo, hi = relative_gain([12.0, 12.5, 11.5], [10.0, 10.2, 9.9], False, True, 0.95)
    assert lo < g < hi < 0


# --- equivalence (TOST) ----------------------------------------------------------------------


def test_equivalence_on_constructed_cases() -> None:
    rng = np.random.default_rng(3)
    subset = rng.normal(0, 0.02, SEEDS)
    kd = 0.8 + subset + rng.normal(0, 0.002, SEEDS)
    equal = kd + rng.normal(0, 0.002, SEEDS)
    different = kd - 0.05 + rng.normal(0, 0.002, SEEDS)
    noisy = kd + rng.normal(0, 0.05, SEEDS)
    assert equivalence_p(kd, equal, 0.01, True) < 0.05  # equivalent within ±0.01
    assert equivalence_p(kd, different, 0.01, True) > 0.5  # 0.05 apart: not equivalent ...
    assert difference(kd, different, True, 0.95)[1] > 0  # ... and significantly different
    # too noisy to tell: neither equivalent nor significantly different. The old reading
    # ("the interval contains 0, so it matches") would have called this a match.
    assert equivalence_p(kd, noisy, 0.01, True) > 0.05
    _, lo, hi = difference(kd, noisy, True, 0.95)
    assert lo < 0 < hi
    # pairing is what makes the equal case decidable
    assert equivalence_p(kd, equal, 0.01, False) > 0.05
    assert math.isnan(equivalence_p([0.8], [0.8], 0.01, True))
    assert equivalence_p([0.8, 0.7], [0.805, 0.705], 0.01, True) == 0.0  # no spread: exact
    assert equivalence_p([0.5, 0.25], [0.75, 0.5], 0.01, True) == 1.0


@PROPERTY
@given(
    st.lists(st.floats(-0.05, 0.05), min_size=2, max_size=8),
    st.floats(0.001, 0.05),
    st.floats(-0.03, 0.03),
)
def test_tost_is_equivalence_of_the_1_minus_2alpha_interval(noise, margin, shift) -> None:
    """TOST at level 0.05 decides exactly as 'the 90% t-interval lies within ±margin'."""
    b = np.linspace(0.5, 0.9, len(noise))
    a = b + shift + np.asarray(noise)
    p = equivalence_p(a, b, margin, True)
    _, lo, hi = difference(a, b, True, 0.90)
    inside = -margin < lo and hi < margin
    if not math.isclose(abs(lo), margin, rel_tol=1e-6) and not math.isclose(
        abs(hi), margin, rel_tol=1e-6
    ):
        assert (p < 0.05) == inside


# --- share of a gain --------------------------------------------------------------------------


def test_share_is_bounded_only_where_the_gain_is_significant() -> None:
    rng = np.random.default_rng(4)
    ce, kd, control = seed_pairs(rng, SEEDS, (0.6, 0.7, 0.65))
    s, lo, hi = share(control, kd, ce, 0.95)
    assert s == pytest.approx((control - ce).mean() / (kd - ce).mean())
    assert lo < s < hi and 0.3 < s < 0.7
    assert difference(kd, ce, True, 0.95)[1] > 0
    # KD no better than CE (beyond noise): no interval
    flat_kd = ce + rng.normal(0, 0.005, SEEDS)
    assert difference(flat_kd, ce, True, 0.95)[1] < 0
    _, lo, hi = share(control, flat_kd, ce, 0.95)
    assert math.isnan(lo) and math.isnan(hi)
    # exact data: a point
    assert share([0.65, 0.75], [0.7, 0.8], [0.6, 0.7], 0.95) == pytest.approx((0.5,) * 3)


# --- data-efficiency multiplier -------------------------------------------------------------

BASE_A, BASE_ACC = [0.01, 0.1, 1.0], [0.5, 0.7, 0.9]


def test_multiplier_at_a_baseline_point_is_exact() -> None:
    m, censored = data_efficiency_multiplier(BASE_A, BASE_ACC, 0.7, 0.01, True)
    assert m == pytest.approx(10.0, rel=1e-12) and not censored


def test_multiplier_interpolates_in_log_alpha() -> None:
    # 0.6 is halfway from 0.5 to 0.7, so α* is halfway between 0.01 and 0.1 in log α: 10^-1.5
    m, censored = data_efficiency_multiplier(BASE_A, BASE_ACC, 0.6, 0.01, True)
    assert m == pytest.approx(10**-1.5 / 0.01, rel=1e-12) and not censored
    m2, _ = data_efficiency_multiplier(BASE_A[::-1], BASE_ACC[::-1], 0.6, 0.01, True)
    assert m2 == pytest.approx(m, rel=1e-12)  # input order does not matter


def test_multiplier_is_censored_beyond_the_curve_and_clamped_below_it() -> None:
    assert data_efficiency_multiplier(BASE_A, BASE_ACC, 0.95, 0.01, True) == (100.0, True)
    m, censored = data_efficiency_multiplier(BASE_A, BASE_ACC, 0.4, 0.1, True)
    assert m == pytest.approx(0.1, rel=1e-12) and not censored


def test_multiplier_fits_the_baseline_isotonically() -> None:
    # the raw curve dips at α=0.2 (0.8 → 0.7); PAV pools the two to 0.75 (a running max would
    # hold 0.8), so 0.85 is crossed 2/3 of the way (in log α) from 0.2 to 1.0
    alphas, acc = [0.01, 0.1, 0.2, 1.0], [0.5, 0.8, 0.7, 0.9]
    m, _ = data_efficiency_multiplier(alphas, acc, 0.85, 0.1, True)
    assert m == pytest.approx(math.exp(math.log(0.2) * (1 - 2 / 3)) / 0.1, rel=1e-12)
    # weights: three seeds at 0.1 against one at 0.2 pool to 0.775
    m, _ = data_efficiency_multiplier(alphas, acc, 0.775, 0.01, True, [1, 3, 1, 1])
    assert m == pytest.approx(10.0, rel=1e-12)


def test_multiplier_for_perplexity_lower_is_better() -> None:
    m, censored = data_efficiency_multiplier(BASE_A, [30.0, 20.0, 10.0], 20.0, 0.01, False)
    assert m == pytest.approx(10.0, rel=1e-12) and not censored
    assert data_efficiency_multiplier(BASE_A, [30.0, 20.0, 10.0], 5.0, 0.01, False) == (100.0, True)


def test_multiplier_interval_contains_the_estimate_and_shrinks_with_the_noise() -> None:
    rng = np.random.default_rng(5)

    def base(sd: float) -> dict[float, dict[int, float]]:
        subset = rng.normal(0, sd, SEEDS)
        return {
            a: {s: acc + subset[s] + rng.normal(0, sd) for s in range(SEEDS)}
            for a, acc in zip(BASE_A, BASE_ACC, strict=True)
        }

    def width(sd: float) -> float:
        b = base(sd)
        ref = {s: 0.6 + rng.normal(0, sd) for s in range(SEEDS)}
        means = [np.mean(list(x.values())) for x in b.values()]
        m, _ = data_efficiency_multiplier(BASE_A, means, np.mean(list(ref.values())), 0.01, True)
        lo, hi, censored = multiplier_interval(b, ref, 0.01, True, 0.95)
        assert lo <= m <= hi and not censored
        return hi - lo

    assert width(0.002) < width(0.02)
    two = {a: {0: x, 1: x + 0.01} for a, x in zip(BASE_A, BASE_ACC, strict=True)}
    lo, hi, _ = multiplier_interval(two, {0: 0.6, 1: 0.61}, 0.01, True, 0.95)
    assert math.isnan(lo) and math.isnan(hi)  # a jackknife of 2 seeds: no interval


def test_multiplier_interval_leaves_a_seed_out_everywhere() -> None:
    """A seed that lifts CE at every α and KD alike (its subset) moves nothing once paired:
    with no other noise the interval is a point."""
    lift = {0: 0.0, 1: 0.03, 2: -0.02, 3: 0.01}
    base = {a: {s: x + d for s, d in lift.items()} for a, x in zip(BASE_A, BASE_ACC, strict=True)}
    # KD's subset effect matches CE's in log α terms only approximately; make it exact at
    # a grid point: KD equals CE at 0.1 for every seed
    ref = {s: 0.7 + d for s, d in lift.items()}
    lo, hi, censored = multiplier_interval(base, ref, 0.01, True, 0.95)
    assert lo == pytest.approx(10.0) and hi == pytest.approx(10.0) and not censored
    # a censored estimate censors the upper end
    high = {s: 0.99 + d for s, d in lift.items()}
    assert multiplier_interval(base, high, 0.01, True, 0.95)[2]


def test_monotone_cubic_interpolation_differs_between_grid_points_only() -> None:
    a, ce = DEFAULT_A, DEFAULT_CE
    lin, _ = data_efficiency_multiplier(a, ce, 0.813, 0.05, True)
    cub, _ = data_efficiency_multiplier(a, ce, 0.813, 0.05, True, interp="pchip")
    assert lin == pytest.approx(3.31, abs=0.01) and cub == pytest.approx(2.89, abs=0.01)
    for interp in ("linear", "pchip"):  # exact at a grid point
        m, _ = data_efficiency_multiplier(a, ce, 0.852, 0.05, True, interp=interp)
        assert m == pytest.approx(4.0, rel=1e-9)
    with pytest.raises(ValueError, match="interp"):
        data_efficiency_multiplier(a, ce, 0.8, 0.05, True, interp="cubic")


def test_holm_on_known_p_values() -> None:
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, math.nan]) == pytest.approx([0.5, math.nan], nan_ok=True)
    assert holm([]) == []


def test_difference_p_is_the_t_tests() -> None:
    a, b = [0.8, 0.82, 0.79, 0.85, 0.81], [0.7, 0.75, 0.72, 0.74, 0.7]
    assert difference_p(a, b, True) < 0.01 and difference_p(a, a, True) == 1.0
    assert math.isnan(difference_p([0.5], [0.4], True))


def test_seeds_for_equivalence_grows_with_the_noise() -> None:
    assert seeds_for_equivalence(0.005, 0.01, 0.05) == 4
    # the bound: at a paired SD of the margin, 5 seeds are too few for a match
    assert seeds_for_equivalence(0.0105, 0.01, 0.05, power=0.5) > 5
    n_default = seeds_for_equivalence(0.05, 0.01, 0.05)
    assert n_default is not None and n_default > 100
    assert seeds_for_equivalence(0.05, 0.03, 0.05) < n_default
    assert seeds_for_equivalence(0.0, 0.01, 0.05) is None


def test_median_multiplier_is_a_lower_bound_only_if_a_censored_value_can_move_it() -> None:
    assert median_multiplier([1.0, 2.0, 100.0], [False, False, True]) == (2.0, False)
    assert median_multiplier([1.0, 2.0, 100.0], [True, False, False]) == (2.0, True)
    assert median_multiplier([1.0, 2.0, 3.0, 100.0], [False, False, True, False]) == (2.5, True)
