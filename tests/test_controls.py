"""Hypothesis controls (DESIGN.md §5): each control built at the training τ has, AT τ, the target
mass and entropy it claims (property tests over temperatures, confident teachers with logit
margins 20–30, half-precision inputs, and batches of a single class)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kdsweep.cache.kinds import soft_kl
from kdsweep.registry import LOSSES

PROPERTY = settings(max_examples=60, deadline=None, derandomize=True)
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@st.composite
def teachers(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(logits [N, C] in a drawn dtype, labels, τ): a confident teacher whose target logit beats
    the others by a drawn margin (20–30 or ordinary), sometimes one class for the whole batch."""
    n, c = draw(st.integers(1, 16)), draw(st.integers(2, 12))
    seed = draw(st.integers(0, 2**16))
    margin = draw(st.one_of(st.floats(20, 30), st.floats(0, 5)))
    dtype = draw(st.sampled_from(DTYPES))
    tau = draw(st.sampled_from([1.0, 2.0, 4.0, 16.0, 100.0]))
    if draw(st.booleans()):
        y = torch.full((n,), draw(st.integers(0, c - 1)))
    else:
        y = torch.randint(0, c, (n,), generator=gen(seed))
    z = torch.randn(n, c, generator=gen(seed + 1), dtype=torch.float64)
    z = z + margin * F.one_hot(y, c)
    return z.to(dtype), y, tau


def at_tau(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """log p^τ in float64."""
    return torch.log_softmax(logits.double() / tau, -1)


def target_and_rest(log_p: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log mass on y, log mass on the other classes), per row."""
    onehot = F.one_hot(y, log_p.shape[-1]).bool()
    return log_p[onehot], torch.logsumexp(log_p.masked_fill(onehot, -math.inf), -1)


def entropy(log_p: torch.Tensor) -> torch.Tensor:
    return -torch.special.xlogy(log_p.exp(), log_p.exp()).sum(-1)


def control(name: str, t: torch.Tensor, y: torch.Tensor, tau: float, seed: int = 0):
    out = LOSSES.load(name)(t, y, 0.1, seed, tau)
    assert out.shape == t.shape and out.dtype in (t.dtype, torch.float32)
    assert torch.isfinite(out).all() or name == "ls_teacher"  # a one-hot ls_teacher has −∞
    return out


@PROPERTY
@given(teachers())
def test_ls_matched_has_the_teachers_target_mass_at_tau_and_a_flat_rest(case) -> None:
    t, y, tau = case
    log_q = at_tau(control("ls_matched", t, y, tau), tau)
    log_p = at_tau(t, tau)
    (q_y, q_rest), (p_y, p_rest) = target_and_rest(log_q, y), target_and_rest(log_p, y)
    torch.testing.assert_close(q_y, p_y, rtol=0, atol=1e-5)
    torch.testing.assert_close(q_rest, p_rest, rtol=0, atol=1e-4)  # in log space: e^-30 too
    off = log_q.masked_fill(F.one_hot(y, t.shape[-1]).bool(), math.nan)
    assert torch.allclose(off.nanmean(-1), off.nan_to_num(-math.inf).amax(-1), atol=1e-5)
    # the most entropy that target mass allows: at least the teacher's
    c = t.shape[-1]
    want = entropy(torch.stack([q_y, q_rest], -1)) + q_rest.exp() * math.log(c - 1)
    torch.testing.assert_close(entropy(log_q), want, rtol=1e-6, atol=1e-6)
    assert (entropy(log_q) >= entropy(log_p) - 1e-6).all()


@PROPERTY
@given(teachers())
def test_ls_teacher_is_input_independent_with_the_teachers_mean_mass_at_tau(case) -> None:
    t, y, tau = case
    log_q = at_tau(control("ls_teacher", t, y, tau), tau)
    p_y, _ = target_and_rest(at_tau(t, tau), y)
    q_y, _ = target_and_rest(log_q, y)
    eps = 1 - p_y.exp().mean()
    torch.testing.assert_close(q_y.exp(), torch.full_like(q_y, 1 - eps), rtol=0, atol=1e-6)
    # every row is the same smoothed one-hot, whatever its input: permuting q to put y first
    # gives identical rows
    c = t.shape[-1]
    onehot = F.one_hot(y, c).bool()
    first = torch.cat([log_q[onehot][:, None], log_q[~onehot].view(-1, c - 1)], -1)
    torch.testing.assert_close(first, first[:1].expand_as(first), rtol=0, atol=1e-5)
    if eps > 0:
        off = log_q[~onehot].exp()
        torch.testing.assert_close(off, torch.full_like(off, eps / (c - 1)), rtol=1e-4, atol=0)
    h = entropy(torch.stack([torch.log1p(-eps), torch.log(eps)]).unsqueeze(0))
    torch.testing.assert_close(entropy(log_q), h + eps * math.log(c - 1) * torch.ones_like(q_y))


@PROPERTY
@given(teachers(), st.integers(0, 3))
def test_shuffled_dk_keeps_target_mass_and_entropy_at_every_tau(case, seed) -> None:
    t, y, tau = case
    out = control("shuffled_dk", t, y, tau, seed)
    assert torch.equal(
        out.sort(-1).values, t.sort(-1).values
    )  # the same values, permuted  # permuted values
    for any_tau in (1.0, tau, 50.0):
        log_q, log_p = at_tau(out, any_tau), at_tau(t, any_tau)
        torch.testing.assert_close(target_and_rest(log_q, y)[0], target_and_rest(log_p, y)[0])
        torch.testing.assert_close(entropy(log_q), entropy(log_p))


def test_shuffled_dk_changes_the_order_per_sample_and_per_seed() -> None:
    shuffled_dk = LOSSES.load("shuffled_dk")
    t = 3 * torch.randn(200, 10, generator=gen(70), dtype=torch.float64)
    y = torch.randint(0, 10, (200,), generator=gen(71))
    a, b = shuffled_dk(t, y, 0.0, 0, 4.0), shuffled_dk(t, y, 0.0, 1, 4.0)
    assert (a != t).any(-1).float().mean() > 0.9  # order changed for nearly every row
    assert (a != b).any(-1).float().mean() > 0.9  # and differently per seed
    assert torch.equal(shuffled_dk(t, y, 0.0, 0, 4.0), a)  # fixed per seed


def test_controls_built_at_tau_differ_from_those_built_at_1() -> None:
    """What the old τ=1 construction got wrong: tempered at τ=4, ls_matched built at τ=1 puts
    less than the teacher's mass on y; built at τ=4 it puts exactly the teacher's."""
    t = torch.tensor([[6.0, 2.0, 0.0, -1.0]], dtype=torch.float64)
    y = torch.tensor([0])
    p_y = at_tau(t, 4.0)[0, 0].exp()
    built_at_1 = LOSSES.load("ls_matched")(t, y, 0.0, 0, 1.0)
    built_at_4 = LOSSES.load("ls_matched")(t, y, 0.0, 0, 4.0)
    assert at_tau(built_at_1, 4.0)[0, 0].exp() < p_y - 0.03
    torch.testing.assert_close(at_tau(built_at_4, 4.0)[0, 0].exp(), p_y)


def test_a_control_target_is_a_finite_kd_loss() -> None:
    """The KD term on every control's targets stays finite with a 30-logit margin."""
    y = torch.tensor([0, 1, 1])
    t = (30 * F.one_hot(y, 5)).float()
    z = torch.randn(3, 5, generator=gen(3))
    for name in ("ls_teacher", "ls_matched", "shuffled_dk"):
        for tau in (1.0, 4.0):
            assert torch.isfinite(soft_kl(control(name, t, y, tau), z, tau)).all(), (name, tau)
