"""Replayable crop/flip views (kdsweep.augment) and the batches that replay cached views
(kdsweep.targets.ViewBatches)."""

from __future__ import annotations

import pytest
import torch

from kdsweep.augment import apply_aug, draw_aug
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
