"""The teacher's side of augmentation and its targets: fresh crop/flip views while it trains
(kdsweep.teacher.fresh_batches), the diagnostics the cache stage measures
(kdsweep.cache.build.teacher_diagnostics) and the report's reading of them
(kdsweep.report.diagnostics)."""

from __future__ import annotations

import math

import pytest
import torch

from kdsweep.augment import apply_aug, draw_aug
from kdsweep.cache import build
from kdsweep.cache.build import TAU_GRID, teacher_diagnostics
from kdsweep.cache.summary import CacheSummary
from kdsweep.errors import KdsweepError
from kdsweep.report.diagnostics import diagnose, soft_targets_at
from kdsweep.teacher import fresh_batches


def _all_views(x: torch.Tensor) -> torch.Tensor:
    """Every crop/flip view of each image (pad 4): [N, 9·9·2, C, H, W]."""
    params = torch.tensor([[dy, dx, f] for dy in range(9) for dx in range(9) for f in (0, 1)])
    return torch.stack([apply_aug(x, params[i].expand(len(x), 3)) for i in range(len(params))], 1)


def test_teacher_batches_are_fresh_crop_flip_views_of_the_rows():
    x = torch.randn(6, 3, 8, 8)
    batch = fresh_batches(x, seed=0)
    idx = torch.tensor([4, 1, 3])
    first, ctx = batch(idx)
    second, _ = batch(idx)
    assert torch.equal(ctx, idx)  # the loss still reads the labels by row id
    views = _all_views(x[idx])
    for inputs in (first, second):
        for i in range(len(idx)):
            assert any(torch.equal(inputs[i], v) for v in views[i])
    assert not torch.equal(first, second)  # a new view every step, not a fixed one
    again, _ = fresh_batches(x, seed=0)(idx)
    assert torch.equal(again, first)  # reproducible from the seed


def test_teacher_augment_needs_a_family():
    with pytest.raises(KdsweepError, match="teacher.augment"):
        fresh_batches(torch.randn(6, 40), seed=0)  # tokens: no augmentation family


class FixedLogits(torch.nn.Module):
    """The same logits for every input (every position of a sequence [B, L]): the diagnostics
    then have closed forms."""

    def __init__(self, z: torch.Tensor):
        super().__init__()
        self.z = z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.z.expand(*(x.shape if x.dim() == 2 else x.shape[:1]), -1)


def test_diagnostics_of_known_logits_on_rows_and_views():
    z = torch.tensor([3.0, 1.0, 0.0, -1.0])
    x = torch.randn(10, 1, 8, 8)
    y = torch.tensor([0, 0, 0, 1, 2, 3, 0, 0, 1, 0])
    d = teacher_diagnostics(FixedLogits(z), x, y, draw_aug(10, 3, seed=0), batch_size=4)
    assert d["diagnostic_rows"] == 10 and d["num_classes"] == 4
    assert d["teacher_train_acc"] == pytest.approx(0.6)  # argmax 0, six rows of class 0
    assert d["teacher_view_acc"] == pytest.approx(0.6)
    grid = {round(t, 6): (p, r) for t, p, r in d["soft_targets"]}
    assert len(grid) == len(TAU_GRID)
    for tau in (1.0, 4.0):
        p = torch.softmax(z / tau, 0)
        p_y, ratio = grid[tau]
        assert p_y == pytest.approx(float(p[y].mean()), rel=1e-5)
        assert ratio == pytest.approx(float(-(p * p.log()).sum()) / math.log(4), rel=1e-5)
    assert d["soft_targets"][-1][2] > 0.99  # τ = 128: nearly uniform


def test_diagnostics_read_at_most_their_budget_of_rows(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(build, "DIAGNOSTIC_OUTPUTS", 12)
    y = torch.zeros(10, 3, dtype=torch.long)  # sequences: three outputs per row
    d = teacher_diagnostics(
        FixedLogits(torch.zeros(2)), torch.zeros(10, 3, dtype=torch.long), y, None, 4
    )
    assert d["diagnostic_rows"] == 4 and "teacher_view_acc" not in d


def _summary(name: str, curve: list[list[float]], view_acc: float | None) -> CacheSummary:
    return CacheSummary(
        name=name,
        kind="full",
        k=None,
        dtype="float16",
        teacher="main",
        bytes_on_disk=100,
        bytes_per_row=1.0,
        compression_ratio=1.0,
        teacher_test_acc=0.98,
        num_rows=100,
        views=2,
        diagnostic_rows=100,
        teacher_train_acc=0.99,
        teacher_view_acc=view_acc,
        num_classes=10,
        soft_targets=curve,
    )


def _run(store: str | None, tau: float | None) -> dict:
    return {"cache_name": store, "tau": tau}


def test_report_diagnostics_interpolate_and_warn():
    sharp = [[1.0, 0.9, 0.2], [2.0, 0.7, 0.5], [4.0, 0.3, 0.9]]
    flat = [[1.0, 0.2, 0.97], [4.0, 0.1, 1.0]]
    caches = [
        _summary("full", sharp, view_acc=0.97),
        _summary("weak", flat, view_acc=0.5),
        CacheSummary(**{**_summary("old", sharp, None).__dict__, "soft_targets": []}),
    ]
    runs = [
        _run("full", 2.0),
        _run("full", 2.0 * math.sqrt(2)),
        _run("weak", 4.0),
        _run(None, None),
    ]
    d = diagnose(caches, runs)
    assert [c.name for c in d["stores"]] == ["full", "weak"]  # no diagnostics in an old summary
    assert d["augmented"] is True  # a store of 2 views
    rows = {(t["store"], t["tau"]): t for t in d["targets"]}
    assert set(rows) == {("full", 1.0), ("full", 2.0), ("full", 2.0 * math.sqrt(2)),
                         ("weak", 1.0), ("weak", 4.0)}  # fmt: skip
    mid = rows[("full", 2.0 * math.sqrt(2))]  # halfway between τ = 2 and 4 in log τ
    assert mid["p_target"] == pytest.approx(0.5) and mid["entropy_ratio"] == pytest.approx(0.7)
    assert mid["entropy"] == pytest.approx(0.7 * math.log(10))
    assert soft_targets_at(caches[0], 64.0) == (0.3, 0.9)  # held at the grid's end
    # store `full` is fine; `weak` is wrong on its views and near uniform at its τ = 4 (its
    # τ = 1 row is near uniform too, but no student trained there)
    assert len(d["warnings"]) == 2 and all("`weak`" in w for w in d["warnings"])
    assert any("50.0%" in w and "teacher.augment" in w for w in d["warnings"])
    assert any("τ = 4" in w and "uniform" in w for w in d["warnings"])
    assert diagnose([], runs) == {"stores": [], "targets": [], "warnings": [], "augmented": False}
