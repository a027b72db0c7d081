"""Replayable crop/flip views (kdsweep.augment) and the batches that replay cached views
(kdsweep.targets.ViewBatches)."""

from __future__ import annotations

import pytest
import torch

from kdsweep.augment import (
    CROP_FLIP,
    SHIFT_SCALE_NOISE,
    apply_aug,
    draw_aug,
    family_for,
    fresh_views,
    gaussian_noise,
)
from kdsweep.errors import KdsweepError
from kdsweep.targets import NO_TARGETS, TeacherTargets, ViewBatches


def _views(x: torch.Tensor, aug: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """[N, V, C, H, W]: every drawn view of every image."""
    return torch.stack([apply_aug(x, aug[:, v], pad) for v in range(aug.shape[1])], dim=1)


def test_replayed_views_are_pixel_identical():
    x = torch.randn(5, 3, 8, 8)
    aug = draw_aug(len(x), views=4, seed=7, pad=2)
    assert aug.shape == (5, 4, 3) and aug.dtype == torch.int64 and aug.device.type == "cpu"
    views = _views(x, aug, pad=2)
    assert views.shape == (5, 4, 3, 8, 8)
    again = draw_aug(len(x), views=4, seed=7, pad=2)  # the seed alone fixes the parameters
    assert torch.equal(aug, again) and torch.equal(views, _views(x, again, pad=2))
    for v in range(4):  # one view at a time, or rows picked out of order: the same pixels
        perm = torch.randperm(5)
        assert torch.equal(apply_aug(x[perm], aug[perm, v], pad=2), views[perm, v])


def test_aug_params_in_range_and_seeded():
    a = draw_aug(64, views=8, seed=0)
    b = draw_aug(64, views=8, seed=1)
    assert not torch.equal(a, b)
    assert a[..., :2].min() == 0 and a[..., :2].max() == 8  # all of [0, 2*pad] is reachable
    assert set(a[..., 2].unique().tolist()) == {0, 1}
    assert draw_aug(64, views=8, seed=0, pad=1)[..., :2].max() == 2


def test_apply_aug_semantics():
    x = torch.arange(2 * 1 * 3 * 3, dtype=torch.float32).reshape(2, 1, 3, 3)
    centre = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = apply_aug(x, centre, pad=1)
    assert torch.equal(out[0], x[0]) and torch.equal(out[1], x[1].flip(-1))
    shifted = apply_aug(x, torch.tensor([[0, 0, 0], [2, 2, 0]]), pad=1)
    assert torch.equal(shifted[0, 0, 1:, 1:], x[0, 0, :2, :2]) and shifted[0, 0, 0].abs().sum() == 0
    assert torch.equal(shifted[1, 0, :2, :2], x[1, 0, 1:, 1:]) and shifted[1, 0, 2].abs().sum() == 0
    with pytest.raises(ValueError, match="outside"):
        apply_aug(x, torch.tensor([[3, 0, 0], [0, 0, 0]]), pad=1)
    with pytest.raises(ValueError, match="outside"):
        apply_aug(x, torch.tensor([[0, 0, 2], [0, 0, 0]]), pad=1)
    with pytest.raises(ValueError, match=r"shaped \(2, 3\)"):
        apply_aug(x, torch.zeros(3, 3, dtype=torch.int64), pad=1)


def test_view_batches_replay_the_cached_views_and_their_targets():
    """With an `aug` array, each sample of a step gets one of its cached views: the input is that
    view replayed, the target is the teacher's row for exactly that view."""
    n, v, c = 12, 3, 5
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, c, (n,), generator=g)
    aug = draw_aug(n, v, seed=1)
    logits = torch.randn(n, v, c, generator=g)
    batches = ViewBatches(x, y, TeacherTargets("full", {"logits": logits, "aug": aug}), seed=3)
    twin = ViewBatches(x, y, TeacherTargets("full", {"logits": logits, "aug": aug}), seed=3)
    views = _views(x, aug)
    picked = set()
    for _ in range(4):
        idx = torch.randperm(n, generator=g)[:8]
        inputs, (labels, t) = batches(idx)
        inputs2, (_, t2) = twin(idx)
        assert torch.equal(inputs, inputs2) and torch.equal(
            t.tensors["logits"], t2.tensors["logits"]
        )
        assert "aug" not in t.tensors and t.kind == "full"
        assert torch.equal(labels, y[idx])
        for row, i in enumerate(idx.tolist()):
            match = [
                w
                for w in range(v)
                if torch.equal(inputs[row], views[i, w])
                and torch.equal(t.tensors["logits"][row], logits[i, w])
            ]
            assert match, (row, i)  # input and target are of one and the same view
            picked.update(match)
    assert picked == set(range(v))  # views are drawn at random, not always the first


def test_view_batches_without_views_are_plain_rows():
    x, y = torch.randn(6, 1, 40), torch.arange(6)
    t = TeacherTargets("topk", {"values": torch.randn(6, 2), "indices": torch.zeros(6, 2).long()})
    idx = torch.tensor([4, 0, 2])
    inputs, (labels, rows) = ViewBatches(x, y, t, seed=0)(idx)
    assert torch.equal(inputs, x[idx]) and torch.equal(labels, y[idx])
    assert rows.kind == "topk" and torch.equal(rows.tensors["values"], t.tensors["values"][idx])
    inputs, (labels, rows) = ViewBatches(x, y, NO_TARGETS, seed=0)(idx)
    assert torch.equal(inputs, x[idx]) and rows.tensors == {} and rows.kind is None


def test_shift_scale_noise_replays_exactly_and_stays_in_its_family():
    """MNIST-1D's family: parameters drawn from a seed replay the same views bit for bit, in any
    row order; each view is the signal rolled, scaled and noised as its parameters say."""
    family = SHIFT_SCALE_NOISE
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 40, generator=g)
    aug = family.draw(16, 4, seed=3)
    assert aug.shape == (16, 4, 3) and torch.equal(aug, family.draw(16, 4, seed=3))
    assert aug[..., 0].abs().max() <= family.max_shift and aug[..., 0].unique().numel() > 3
    views = torch.stack([family.apply(x, aug[:, v]) for v in range(4)], 1)
    perm = torch.randperm(16, generator=g)
    assert torch.equal(family.apply(x[perm], aug[perm, 1]), views[perm, 1])
    # the noise is what is left after undoing the roll and the scale: ~N(0, noise²)
    shift, scale = aug[:, 0, 0], 1 + aug[:, 0, 1].float() / 1000
    rolled = torch.stack([torch.roll(x[i], int(shift[i]), -1) for i in range(16)])
    noise = (views[:, 0] - rolled * scale[:, None, None]) / family.noise
    assert abs(noise.mean()) < 0.1 and abs(noise.std() - 1) < 0.1
    # no noise, no scale, no shift: the signal itself
    ident = torch.zeros(16, 3, dtype=torch.int64)
    assert torch.allclose(
        family.apply(x, ident), x + family.noise * gaussian_noise(ident[:, 2], (1, 40))
    )
    with pytest.raises(ValueError, match="outside"):
        family.apply(x, torch.tensor([[family.max_shift + 1, 0, 0]]).expand(16, 3))


def test_gaussian_noise_is_a_pure_function_of_its_seed():
    seeds = torch.tensor([0, 1, 0, 32767])
    z = gaussian_noise(seeds, (2, 40))
    assert torch.equal(z[0], z[2]) and not torch.equal(z[0], z[1])
    big = gaussian_noise(torch.arange(4000), (1, 40))
    assert abs(big.mean()) < 0.01 and abs(big.std() - 1) < 0.01
    corr = torch.corrcoef(torch.stack([big[:-1].flatten(), big[1:].flatten()]))[0, 1]
    assert abs(corr) < 0.02  # neighbouring seeds give unrelated noise


@pytest.mark.parametrize(
    ("shape", "family"), [((3, 8, 8), CROP_FLIP), ((1, 40), SHIFT_SCALE_NOISE)]
)
def test_family_is_chosen_by_input_rank_and_fresh_views_change_every_call(shape, family):
    x = torch.randn(5, *shape)
    assert family_for(x) is family
    gen = torch.Generator().manual_seed(0)
    a, b = fresh_views(x, gen), fresh_views(x, gen)
    assert a.shape == x.shape and not torch.equal(a, b)
    again = fresh_views(x, torch.Generator().manual_seed(0))
    assert torch.equal(again, a)
    with pytest.raises(KdsweepError, match="no augmentation family"):
        family_for(torch.zeros(5, 7, dtype=torch.long))  # token rows
