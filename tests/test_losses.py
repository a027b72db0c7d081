import math

import pytest
import torch
import torch.nn.functional as F

from kdsweep.cache import CacheSplit, StoreSpec, encode_rows
from kdsweep.losses import control_targets, logit_mse, sampled_ce, soft_kl, student_loss, topk_kl


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
    torch.manual_seed(0)
    z, t, y = torch.randn(5, 4), torch.randn(5, 4), torch.randint(0, 4, (5,))
    tgt = CacheSplit("full", {"logits": t})
    l0, _ = student_loss("kd", z, y, tgt, lam=0.0, tau=3.0, epsilon=0.0)
    assert torch.allclose(l0, F.cross_entropy(z, y, reduction="none"))
    l1, _ = student_loss("kd", z, y, tgt, lam=1.0, tau=3.0, epsilon=0.0)
    assert torch.allclose(
        l1,
        9.0
        * (
            torch.softmax(t / 3, -1) * (torch.log_softmax(t / 3, -1) - torch.log_softmax(z / 3, -1))
        ).sum(-1),
    )
    lh, _ = student_loss("kd", z, y, tgt, lam=0.25, tau=3.0, epsilon=0.0)
    assert torch.allclose(lh, 0.25 * l1 + 0.75 * l0)


def test_label_smoothing_matches_torch():
    z, y = torch.randn(6, 5), torch.randint(0, 5, (6,))
    ls, _ = student_loss("ls", z, y, None, 1.0, 1.0, epsilon=0.2)
    onehot = F.one_hot(y, 5).float() * 0.8 + 0.2 / 5
    assert torch.allclose(ls, -(onehot * torch.log_softmax(z, -1)).sum(-1), atol=1e-6)


def test_logit_mse_is_the_high_temperature_limit():
    torch.manual_seed(1)
    z, t = torch.randn(8, 10), torch.randn(8, 10)
    assert torch.allclose(
        soft_kl(t.double(), z.double(), 1e4), logit_mse(t.double(), z.double()), rtol=1e-3
    )


@pytest.mark.parametrize("mode", ["renorm", "tail"])
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_topk_with_k_equal_to_classes_equals_full(mode, tau):
    torch.manual_seed(2)
    z, t = torch.randn(16, 6, dtype=torch.float64), torch.randn(16, 6, dtype=torch.float64) * 3
    rows = encode_rows(t.float(), StoreSpec(kind="topk", k=6, dtype="float32"), 0)
    v = torch.from_numpy(rows["values"]).double()
    i = torch.from_numpy(rows["indices"].astype("int64"))
    lse = torch.from_numpy(rows["logsumexp"]).double()
    got = topk_kl(v, i, lse, z, tau, mode)
    assert torch.allclose(got, soft_kl(t, z, tau), atol=1e-5)


def test_topk_tail_is_exact_at_tau_one_and_renorm_is_not():
    """With k < C the tail bucket keeps the exact tail mass at τ=1; renorm drops it."""
    torch.manual_seed(3)
    t = torch.randn(4, 8, dtype=torch.float64)
    z = t.clone()  # a student equal to the teacher
    rows = encode_rows(t.float(), StoreSpec(kind="topk", k=3, dtype="float32"), 0)
    v, i, lse = (torch.from_numpy(rows[k]).double() for k in ("values", "indices", "logsumexp"))
    i = i.long()
    tail = topk_kl(v, i, lse, z, 1.0, "tail")
    renorm = topk_kl(v, i, lse, z, 1.0, "renorm")
    assert tail.abs().max() < 1e-5  # a perfect student has zero loss
    assert (renorm > 1e-3).all()  # renorm still pulls a perfect student: its bias


def test_sampled_estimator_is_unbiased():
    torch.manual_seed(4)
    t, z = torch.randn(3, 7) * 2, torch.randn(3, 7)
    exact = -(torch.softmax(t.double(), -1) * torch.log_softmax(z.double(), -1)).sum(-1)
    spec = StoreSpec(kind="sampled", k=4)
    draws = []
    for seed in range(3000):
        r = encode_rows(t, spec, seed)
        draws.append(
            sampled_ce(
                torch.from_numpy(r["indices"].astype("int64")),
                torch.from_numpy(r["weights"]).double(),
                z.double(),
                1.0,
            )
        )
    est = torch.stack(draws)
    se = est.std(0) / math.sqrt(len(draws))
    assert ((est.mean(0) - exact).abs() < 4 * se).all(), (est.mean(0), exact, se)
    assert torch.allclose(
        torch.from_numpy(encode_rows(t, spec, 0)["weights"]).sum(-1), torch.ones(3)
    )


def test_shuffled_dk_keeps_target_mass_and_entropy_but_changes_order():
    torch.manual_seed(5)
    t, y = torch.randn(200, 10) * 3, torch.randint(0, 10, (200,))
    s = control_targets("shuffled_dk", t, y, 0.0, seed=0)
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    assert torch.equal(s.gather(-1, y[:, None]), t.gather(-1, y[:, None]))
    ent = lambda d: -(d * d.log()).sum(-1)  # noqa: E731
    assert torch.allclose(ent(p), ent(q), atol=1e-5)
    assert torch.equal(s.sort(-1).values, t.sort(-1).values)  # same values, permuted
    assert (s != t).any(-1).float().mean() > 0.9  # order changed for nearly every row
    assert torch.equal(control_targets("shuffled_dk", t, y, 0.0, seed=0), s)  # fixed per seed


def test_ls_matched_has_the_teacher_target_mass_and_flat_rest():
    t, y = torch.randn(50, 10), torch.randint(0, 10, (50,))
    q = torch.softmax(control_targets("ls_matched", t, y, 0.0, 0), -1)
    assert torch.allclose(
        q.gather(-1, y[:, None]), torch.softmax(t, -1).gather(-1, y[:, None]), atol=1e-6
    )
    rest = q.masked_fill(F.one_hot(y, 10).bool(), float("nan"))
    assert torch.allclose(rest.nanmean(-1), rest.nan_to_num(0).amax(-1), atol=1e-6)


def test_ls_teacher_is_uniform_smoothing():
    t, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    q = torch.softmax(control_targets("ls_teacher", t, y, 0.2, 0), -1)
    assert torch.allclose(q, F.one_hot(y, 4) * 0.8 + 0.05)
