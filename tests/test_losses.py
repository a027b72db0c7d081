"""Student losses (DESIGN.md §5): the distillation term of every cache kind, every registered loss
and control, alone and stacked under vmap (the controls' targets: test_controls.py). Every random
draw is seeded."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import stats
from torch.func import vmap

from kdsweep.cache.kinds import CacheKind, from_stored, soft_kl, to_stored
from kdsweep.losses import logit_mse, student_loss
from kdsweep.registry import CACHE_KINDS, LOSSES
from kdsweep.students.stack import stacked_student_loss
from kdsweep.targets import NO_TARGETS, TeacherTargets

F64 = torch.float64
PROPERTY = settings(max_examples=60, deadline=None, derandomize=True)
MODES = ["tail", "spread", "renorm"]  # every topk_mode (config.MethodParams.topk_mode)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=gen(seed), dtype=F64)


def full(t: torch.Tensor) -> TeacherTargets:
    return TeacherTargets("full", {"logits": t})


def stored(
    kind: str,
    logits: torch.Tensor,
    k: int | None,
    dtype: str = "float32",
    seed: int = 0,
    tau: float = 1.0,
) -> TeacherTargets:
    """`logits` through the kind's encode and decode in a store of `dtype` (float32 tensors, as
    a student reads them); `tau` is a sampled store's τ."""
    cls: type[CacheKind] = CACHE_KINDS.load(kind)
    arrays_ = cls.encode(logits.float(), k, dtype, gen(seed), tau=tau)
    return TeacherTargets(kind, {name: cls.decode(name, a, dtype) for name, a in arrays_.items()})


def cached(
    kind: str, logits: torch.Tensor, k: int | None, seed: int = 0, tau: float = 1.0
) -> TeacherTargets:
    """`logits` through the kind's encode and decode at float32, as a store would hold them;
    floating tensors as float64 so that comparisons measure the loss, not float32 rounding."""
    t = stored(kind, logits, k, "float32", seed, tau).tensors
    return TeacherTargets(
        kind, {n: v.double() if v.is_floating_point() else v for n, v in t.items()}
    )


def as_stored(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """Float32 logits rounded to what a store of `dtype` holds (a teacher a student can equal)."""
    return from_stored(to_stored(t.float(), dtype), dtype)


def deterministic(kind: str) -> bool:
    """Whether a kind's encoding ignores its generator (two seeds give the same arrays)."""
    t = randn(8, 6, seed=99)
    k = 3 if CACHE_KINDS[kind].needs_k else None
    a, b = cached(kind, t, k, seed=0), cached(kind, t, k, seed=1)
    return all(torch.equal(a.tensors[n], b.tensors[n]) for n in a.tensors)


# --- the full-cache KL and its limits ---------------------------------------------------------


def test_soft_kl_hand_computed_and_tau_squared_factor():
    t = torch.tensor([[0.0, 0.0]])
    s = torch.tensor([[0.0, math.log(3.0)]])  # q = [0.25, 0.75]
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert soft_kl(t, s, 1.0).item() == pytest.approx(expected, rel=1e-6)
    # at τ=2 the distributions are softmax(z/2); the τ² factor multiplies the KL by 4
    q2 = torch.softmax(s / 2, -1)[0]
    kl2 = sum(0.5 * math.log(0.5 / q) for q in q2.tolist())
    assert soft_kl(t, s, 2.0).item() == pytest.approx(4 * kl2, rel=1e-5)


def test_lambda_limits():
    z, t = randn(5, 4, seed=0), randn(5, 4, seed=1)
    y = torch.randint(0, 4, (5,), generator=gen(2))
    tgt = full(t)
    l0, _ = student_loss("kd", z, y, tgt, lam=0.0, tau=3.0, epsilon=0.0)
    assert torch.allclose(l0, F.cross_entropy(z, y, reduction="none"))
    l1, d1 = student_loss("kd", z, y, tgt, lam=1.0, tau=3.0, epsilon=0.0)
    p = torch.softmax(t / 3, -1)
    kl = 9.0 * (p * (torch.log_softmax(t / 3, -1) - torch.log_softmax(z / 3, -1))).sum(-1)
    assert torch.allclose(l1, kl) and torch.equal(d1, l1)
    lh, dh = student_loss("kd", z, y, tgt, lam=0.25, tau=3.0, epsilon=0.0)
    assert torch.allclose(lh, 0.25 * l1 + 0.75 * l0) and torch.allclose(dh, kl)


def test_label_smoothing_matches_torch():
    z, y = randn(6, 5, seed=3), torch.randint(0, 5, (6,), generator=gen(4))
    ls, distill = student_loss("ls", z, y, NO_TARGETS, 1.0, 1.0, epsilon=0.2)
    onehot = F.one_hot(y, 5).double() * 0.8 + 0.2 / 5
    assert torch.allclose(ls, -(onehot * torch.log_softmax(z, -1)).sum(-1), atol=1e-12)
    assert torch.equal(distill, torch.zeros(6, dtype=F64))
    ce, _ = student_loss("ce", z, y, NO_TARGETS, 1.0, 1.0, epsilon=0.2)  # ce ignores ε
    assert torch.allclose(ce, F.cross_entropy(z, y, reduction="none"))


def test_logit_mse_is_the_high_temperature_limit():
    z, t = randn(8, 10, seed=5), randn(8, 10, seed=6)
    assert torch.allclose(soft_kl(t, z, 1e4), logit_mse(t, z), rtol=1e-3)
    got, _ = student_loss("logit_mse", z, None, full(t), 1.0, 1.0, 0.0)
    assert torch.allclose(got, logit_mse(t, z))


def test_sequence_rows_are_flattened_to_positions():
    """A language model's [B, L, V] logits give one loss per position, as if flattened."""
    z, t = randn(2, 3, 12, seed=7), randn(2, 3, 12, seed=8, scale=3)
    y = torch.randint(0, 12, (2, 3), generator=gen(9))
    rows = cached("topk", t, 4)
    got, d = student_loss("kd", z, y, rows, 0.5, 2.0, 0.0, "tail")
    flat, dflat = student_loss(
        "kd", z.flatten(0, 1), y.flatten(), rows.flat_positions(), 0.5, 2.0, 0.0
    )
    assert got.shape == (6,) and torch.equal(got, flat) and torch.equal(d, dflat)


# --- every cache kind: its distillation term is the full-cache KL at k = C ---------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(CACHE_KINDS))
def test_kind_distill_at_k_equal_classes_is_the_full_kl(name, mode):
    """With every class kept, each kind's term is τ²·KL(p_T ‖ p_S) at τ=1, up to a constant
    without gradient, so measured from a perfect student (`sampled`: in expectation over the
    draws, within 5 standard errors; its draws are made at τ=1)."""
    c = 6
    t, z = randn(4, c, seed=10, scale=2), randn(4, c, seed=11)
    t = t.float().double()  # what a float32 store holds
    k = c if CACHE_KINDS[name].needs_k else None
    kind: type[CacheKind] = CACHE_KINDS.load(name)
    want = soft_kl(t, z, 1.0)
    if deterministic(name):
        rows = cached(name, t, k)
        got = kind.distill(rows, z, 1.0, mode) - kind.distill(rows, t, 1.0, mode)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        return
    reps = 4000
    rows = cached(name, t.repeat(reps, 1), k, seed=12)
    est = kind.distill(rows, z.repeat(reps, 1), 1.0, mode) - kind.distill(
        rows, t.repeat(reps, 1), 1.0, mode
    )
    est = est.reshape(reps, len(t))
    se = est.std(0) / math.sqrt(reps)
    assert ((est.mean(0) - want).abs() < 5 * se + 1e-9).all(), (est.mean(0), want, se)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_topk_with_k_equal_to_classes_equals_full_at_any_tau(mode, tau):
    z, t = randn(16, 6, seed=13), randn(16, 6, seed=14, scale=3).float().double()
    topk = CACHE_KINDS.load("topk")
    got = topk.distill(cached("topk", t, 6), z, tau, mode)
    torch.testing.assert_close(got, soft_kl(t, z, tau), rtol=1e-9, atol=1e-9)


def test_topk_tail_is_exact_at_tau_one_and_renorm_is_not():
    """With k < C the tail bucket keeps the exact tail mass at τ=1; renorm drops it."""
    t = randn(4, 8, seed=15).float().double()
    rows = cached("topk", t, 3)
    topk = CACHE_KINDS.load("topk")
    tail = topk.distill(rows, t, 1.0, "tail")  # a student equal to the teacher
    renorm = topk.distill(rows, t, 1.0, "renorm")
    assert tail.abs().max() < 1e-6  # a perfect student has zero loss
    assert (renorm > 1e-3).all()  # renorm still pulls a perfect student: its bias


def test_topk_tail_gradient_is_finite_when_the_student_tail_is_empty():
    """log(1 − Σ q_top) at Σ q_top = 1: the safe-where keeps the gradient finite."""
    t = randn(4, 8, seed=16).float().double()
    z = (60.0 * F.one_hot(t.argmax(-1), 8).double()).requires_grad_()
    loss = CACHE_KINDS.load("topk").distill(cached("topk", t, 3), z, 1.0, "tail")
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(z.grad).all()


def test_sampled_estimator_is_unbiased_for_the_cross_entropy():
    reps = 3000
    t, z = randn(3, 7, seed=17, scale=2), randn(3, 7, seed=18)
    exact = -(torch.softmax(t, -1) * torch.log_softmax(z, -1)).sum(-1)
    rows = cached("sampled", t.repeat(reps, 1), 4, seed=19)
    assert torch.allclose(rows.tensors["weights"].sum(-1), torch.ones(3 * reps, dtype=F64))
    est = CACHE_KINDS.load("sampled").distill(rows, z.repeat(reps, 1), 1.0, "tail")
    est = est.reshape(reps, 3)
    se = est.std(0) / math.sqrt(reps)
    assert ((est.mean(0) - exact).abs() < 4 * se).all(), (est.mean(0), exact, se)


# --- exact top-k (issue 14): the tail's own log-sum-exp, masked student tail -----------------


def confident_logits(rows: int, c: int, margin: float, seed: int) -> torch.Tensor:
    """Float32 teacher logits whose 1–3 leading classes stand `margin` above the rest (a
    well-trained teacher on its own training rows: tail mass down to e^-margin·C)."""
    g = gen(seed)
    lead = torch.randint(1, 4, (rows,), generator=g)
    bump = margin * (torch.arange(c) < lead[:, None]).float()
    t = torch.randn(rows, c, generator=g) + bump
    return t.gather(-1, torch.argsort(torch.rand(rows, c, generator=g), -1))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("margin", [0.0, 8.0, 20.0, 30.0])
def test_topk_kd_of_a_student_equal_to_its_teacher_is_zero(dtype, margin):
    """τ=1, mode tail, every k from 1 to C, in float32 as a student computes it: ≤ 1e-5 nats on
    every row, whatever the tail mass (down to ~1e-13 at margin 30). The teacher's logits are
    those the store holds (rounded to its dtype), so the student can equal them exactly."""
    c = 12
    t = as_stored(confident_logits(48, c, margin, seed=80), dtype)
    topk = CACHE_KINDS.load("topk")
    for k in range(1, c + 1):
        rows = stored("topk", t, k, dtype)
        loss = topk.distill(rows, t, 1.0, "tail")
        assert loss.dtype == torch.float32 and loss.abs().max() <= 1e-5, (k, loss.abs().max())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("margin", [8.0, 20.0, 30.0])
def test_topk_kd_of_the_unrounded_teacher_is_bounded_by_the_value_rounding(dtype, margin):
    """Against the float32 teacher itself, the only error left is the rounding δ of the stored
    top values (the tail log-sum-exp is exact): by Hoeffding's lemma the (k+1)-bucket KL is at
    most (max δ − min δ)²/8 ≤ max|δ|²/2 per row. (Format 2 recovered the tail as 1 − Σ p_top and
    lost it to that rounding: up to ~0.15 nats on such rows.)"""
    c = 12
    t = confident_logits(48, c, margin, seed=91)
    topk = CACHE_KINDS.load("topk")
    for k in range(1, c + 1):
        rows = stored("topk", t, k, dtype)
        delta = (rows.tensors["values"] - t.gather(-1, rows.tensors["indices"])).abs().amax(-1)
        loss = topk.distill(rows, t, 1.0, "tail")
        assert (loss.abs() <= delta**2 / 2 + 1e-5).all(), (k, loss, delta)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tau", [1.0, 4.0, 16.0])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_topk_gradients_are_finite_for_an_almost_empty_student_tail(mode, tau, k):
    """A student putting (almost) all its mass on the teacher's top-k: its tail log-mass is
    −100 or −10⁴ (exp underflows to 0 in float32), and k = C (no tail at all)."""
    c = 8
    t = confident_logits(6, c, 20.0, seed=81)
    rows = stored("topk", t, k, "float16")
    in_top = torch.zeros(6, c, dtype=torch.bool).scatter(-1, rows.tensors["indices"], True)
    for height in (100.0, 1e4):
        z = (height * in_top.float() + torch.randn(6, c, generator=gen(82))).requires_grad_()
        loss = CACHE_KINDS.load("topk").distill(rows, z, tau, mode)
        (grad,) = torch.autograd.grad(loss.sum(), z)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), (height, loss, grad)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tau", [1.0, 4.0, 16.0])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_topk_with_k_equal_classes_has_finite_gradients_and_no_tail(mode, tau, dtype):
    c = 7
    t = confident_logits(5, c, 30.0, seed=83)
    rows = stored("topk", t, c, dtype)
    assert torch.isneginf(rows.tensors["tail_logsumexp"]).all()  # an empty tail, exactly
    for z in (randn(5, c, seed=84).float(), 1e4 * F.one_hot(t.argmax(-1), c).float()):
        z.requires_grad_()
        loss = CACHE_KINDS.load("topk").distill(rows, z, tau, mode)
        (grad,) = torch.autograd.grad(loss.sum(), z)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        want = soft_kl(as_stored(t, dtype), z.detach(), tau)
        torch.testing.assert_close(loss.detach(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0, 16.0])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_spread_equals_full_kd_when_the_teacher_tail_is_uniform(tau, k):
    """`spread` models the tail as the missing mass spread evenly over the C−k absent classes
    before tempering: exact at every τ when the teacher's tail is uniform; `tail` is not."""
    c, rows = 9, 16
    top = 6.0 + 3 * torch.rand(rows, k, generator=gen(85), dtype=F64)
    t = torch.full((rows, c), 2.0, dtype=F64)
    cols = torch.argsort(torch.rand(rows, c, generator=gen(86)), -1)[:, :k]
    t = t.scatter(-1, cols, top).float().double()
    z = randn(rows, c, seed=87, scale=2)
    topk = CACHE_KINDS.load("topk")
    spread = topk.distill(cached("topk", t, k), z, tau, "spread")
    torch.testing.assert_close(spread, soft_kl(t, z, tau), rtol=1e-5, atol=1e-6)
    if tau != 1.0:  # the (k+1)-bucket tail tempers the tail's sum: a different target
        tail = topk.distill(cached("topk", t, k), z, tau, "tail")
        assert (tail - soft_kl(t, z, tau)).abs().max() > 1e-3


def test_sampled_gradient_at_tau_4_is_unbiased():
    """Many independently drawn caches (each row encoded R times from softmax(t/τ), τ = 4): the
    mean of the estimated gradient of τ²·Σ_j w_j·(−log p_S^τ(c_j)) matches the full-cache
    gradient of τ²·KL(p_T^τ ‖ p_S^τ). Per-coordinate two-sided z-test, Bonferroni over the B·C
    coordinates: overall false-alarm rate 1e-3 (the draws are seeded, so the run is fixed)."""
    tau, reps, b, c, k = 4.0, 4000, 3, 7, 4
    t, z = randn(b, c, seed=88, scale=3).float().double(), randn(b, c, seed=89)
    zf = z.clone().requires_grad_()
    (g_full,) = torch.autograd.grad(soft_kl(t, zf, tau).sum(), zf)
    rows = cached("sampled", t.repeat(reps, 1), k, seed=90, tau=tau)
    zr = z.repeat(reps, 1).requires_grad_()
    est = CACHE_KINDS.load("sampled").distill(rows, zr, tau, "tail")
    (g,) = torch.autograd.grad(est.sum(), zr)
    g = g.reshape(reps, b, c)
    se = g.std(0) / math.sqrt(reps)
    assert (se > 0).all()  # every class drawn in some cache: every coordinate is tested
    p_values = 2 * stats.norm.sf(((g.mean(0) - g_full) / se).abs().numpy())
    assert p_values.min() > 1e-3 / p_values.size, (g.mean(0), g_full, se)
    # and at τ = 1 draws the mean differs detectably: the store's τ matters
    rows1 = cached("sampled", t.repeat(reps, 1), k, seed=90, tau=1.0)
    est1 = CACHE_KINDS.load("sampled").distill(rows1, zr, tau, "tail")
    (g1,) = torch.autograd.grad(est1.sum(), zr)
    z1 = (g1.reshape(reps, b, c).mean(0) - g_full) / se
    assert z1.abs().max() > 10


@st.composite
def topk_case(draw) -> tuple[torch.Tensor, int, str]:
    """Random float32 teacher logits (rows ≤ 4, C ≤ 12), a k in 1..C, a store dtype."""
    rows, c = draw(st.integers(1, 4)), draw(st.integers(1, 12))
    elems = st.floats(-30, 30, width=32, allow_nan=False, allow_subnormal=False)
    t = torch.from_numpy(draw(arrays(np.float32, (rows, c), elements=elems)))
    k = draw(st.integers(1, c))
    return t, k, draw(st.sampled_from(["float16", "bfloat16", "float32"]))


@PROPERTY
@given(topk_case())
def test_topk_tail_is_exact_for_any_logits_k_and_dtype(case):
    t, k, dtype = case
    t = as_stored(t, dtype)
    loss = CACHE_KINDS.load("topk").distill(stored("topk", t, k, dtype), t, 1.0, "tail")
    assert loss.abs().max() <= 1e-5


@PROPERTY
@given(
    topk_case(),
    st.sampled_from(MODES),
    st.sampled_from([0.5, 1.0, 4.0, 16.0]),
    st.integers(0, 2**16),
)
def test_topk_is_nonnegative_finite_with_finite_gradients(case, mode, tau, seed):
    """Every mode at every τ is a divergence (≥ 0 up to float32 rounding) with finite values and
    gradients, for any student: random, equal to the teacher, or far more confident."""
    t, k, dtype = case
    rows = stored("topk", t, k, dtype)
    for z in (randn(*t.shape, seed=seed, scale=10).float(), as_stored(t, dtype), 50 * t):
        z = z.clone().requires_grad_()
        loss = CACHE_KINDS.load("topk").distill(rows, z, tau, mode)
        (grad,) = torch.autograd.grad(loss.sum(), z)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        assert (loss >= -1e-4 * max(1.0, tau**2)).all(), loss


# --- properties over random logits (hypothesis, derandomised) ---------------------------------


@st.composite
def logit_pair(draw, max_classes: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    rows = draw(st.integers(1, 4))
    c = draw(st.integers(2, max_classes))
    elems = st.floats(-30, 30, allow_nan=False, allow_infinity=False, width=32)
    t = draw(arrays(np.float32, (rows, c), elements=elems))
    z = draw(arrays(np.float32, (rows, c), elements=elems))
    return torch.from_numpy(t).double(), torch.from_numpy(z).double()


TAUS = st.sampled_from([0.5, 1.0, 2.0, 4.0, 20.0])


@PROPERTY
@given(logit_pair(), TAUS, st.floats(-50, 50, allow_nan=False))
def test_full_kl_is_nonnegative_zero_at_equal_logits_and_shift_invariant(pair, tau, shift):
    t, z = pair
    kl = soft_kl(t, z, tau)
    assert (kl >= -1e-9).all()
    assert soft_kl(t, t, tau).abs().max() <= 1e-9
    torch.testing.assert_close(soft_kl(t + shift, z - shift, tau), kl, rtol=1e-7, atol=1e-7)


@PROPERTY
@given(logit_pair(), st.sampled_from(MODES))
def test_topk_at_k_equal_classes_is_the_full_kl(pair, mode):
    t, z = pair
    got = CACHE_KINDS.load("topk").distill(cached("topk", t, t.shape[-1]), z, 1.0, mode)
    torch.testing.assert_close(got, soft_kl(t, z, 1.0), rtol=1e-7, atol=1e-7)


@PROPERTY
@given(logit_pair(), st.floats(-50, 50, allow_nan=False))
def test_logit_mse_is_nonnegative_zero_at_equal_logits_and_shift_invariant(pair, shift):
    t, z = pair
    mse = logit_mse(t, z)
    assert (mse >= 0).all() and logit_mse(t, t).abs().max() == 0
    torch.testing.assert_close(logit_mse(t, z + shift), mse, rtol=1e-7, atol=1e-7)


# --- every registered loss --------------------------------------------------------------------

B, C, K_TOP = 6, 5, 3  # k < C, so the top-k tail and the sampled draws matter


def loss_cases() -> list:
    """(loss, cache kind, topk mode) for every loss of LOSSES and every kind it reads."""
    cases = []
    for entry in LOSSES.entries():
        for kind in entry.kinds if entry.distill else (None,):
            modes = MODES if kind == "topk" and "topk_mode" in entry.hyper else ["tail"]
            cases += [
                pytest.param(entry.name, kind, m, id=f"{entry.name}-{kind}-{m}") for m in modes
            ]
    return cases


def test_every_loss_has_a_case():
    assert {c.values[0] for c in loss_cases()} == set(LOSSES)


def batch_for(
    loss: str, kind: str | None, teacher: torch.Tensor, y: torch.Tensor, seed: int
) -> tuple[torch.Tensor, TeacherTargets]:
    """(labels, targets) of one student, as the student stage builds them: the loss's control
    transform of the teacher logits, cached as `kind`, teacher labels from the cached top-1."""
    entry = LOSSES[loss]
    logits = LOSSES.load(loss)(teacher, y, 0.1, seed, 2.0)  # a control built at τ=2
    rows = cached(
        kind or "full", logits, K_TOP if kind and CACHE_KINDS[kind].needs_k else None, seed
    )
    if entry.labels == "teacher":
        y = CACHE_KINDS.load(rows.kind).top1(rows)
    return y, rows if entry.distill else NO_TARGETS


@pytest.mark.parametrize("regime", ["random", "peaked"])
@pytest.mark.parametrize(("loss", "kind", "mode"), loss_cases())
def test_loss_is_finite_with_finite_gradients(loss, kind, mode, regime):
    """Random logits, and near one-hot teacher and student that disagree (empty tails, log 0)."""
    y = torch.randint(0, C, (B,), generator=gen(20))
    if regime == "random":
        teacher, z = randn(B, C, seed=21, scale=3), randn(B, C, seed=22)
    else:
        teacher = 40.0 * F.one_hot(y, C).double()
        z = 40.0 * F.one_hot((y + 1) % C, C).double()
    labels, rows = batch_for(loss, kind, teacher, y, seed=23)
    z.requires_grad_()
    for lam in (0.5, 1.0):
        per_sample, distill = student_loss(loss, z, labels, rows, lam, 2.0, 0.1, mode)
        assert per_sample.shape == distill.shape == (B,)
        assert torch.isfinite(per_sample).all() and torch.isfinite(distill).all()
        assert not distill.requires_grad
        (grad,) = torch.autograd.grad(per_sample.sum(), z)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        if LOSSES[loss].distill is None:
            assert torch.equal(distill, torch.zeros(B, dtype=F64))


@pytest.mark.parametrize(("loss", "kind", "mode"), loss_cases())
def test_stacked_loss_under_vmap_equals_the_sequential_loss(loss, kind, mode):
    """students.stack.stacked_student_loss, vmapped over three students with their own data, λ
    and τ, computes what student_loss computes for each alone (Python-float λ, τ)."""
    lams, taus = [0.9, 0.5, 1.0], [1.0, 2.0, 4.0]
    zs, ys, parts = [], [], []
    for s in range(3):
        y = torch.randint(0, C, (B,), generator=gen(30 + s))
        labels, rows = batch_for(loss, kind, randn(B, C, seed=40 + s, scale=3), y, seed=50 + s)
        zs.append(randn(B, C, seed=60 + s))
        ys.append(labels)
        parts.append(rows)
    stacked = {"y": torch.stack(ys)} | {
        name: torch.stack([r.tensors[name] for r in parts]) for name in parts[0].tensors
    }
    hyper = {"lam": torch.tensor(lams, dtype=F64), "tau": torch.tensor(taus, dtype=F64)}
    fn = stacked_student_loss(loss, parts[0].kind, 0.1, mode)
    per_sample, distill = vmap(fn)(torch.stack(zs), stacked, hyper)
    for s in range(3):
        want, want_d = student_loss(loss, zs[s], ys[s], parts[s], lams[s], taus[s], 0.1, mode)
        torch.testing.assert_close(per_sample[s], want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(distill[s], want_d, rtol=1e-12, atol=1e-12)
