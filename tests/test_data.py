import pytest
import torch

from kdsweep.config import DataParams
from kdsweep.data import (
    DataError,
    build_splits,
    load_prepared,
    nested_order,
    subset_indices,
    write_prepared,
)


def test_subsets_are_nested_and_class_balanced():
    gen = torch.Generator().manual_seed(0)
    y = torch.cat([torch.full((n,), c) for c, n in enumerate([500, 300, 200])])[
        torch.randperm(1000, generator=gen)
    ]
    order = nested_order(y, seed=3)
    assert sorted(order.tolist()) == list(range(1000))
    prev = set()
    for alpha in (0.02, 0.05, 0.1, 0.5, 1.0):
        idx = subset_indices(order, alpha, 3)
        cur = set(idx.tolist())
        assert prev <= cur  # nesting
        prev = cur
        counts = torch.bincount(y[idx], minlength=3).float()
        expected = torch.tensor([0.5, 0.3, 0.2]) * len(idx)
        assert (counts - expected).abs().max() <= 1.0, (alpha, counts, expected)


def test_different_seeds_give_different_subsets():
    y = torch.arange(100) % 10
    assert not torch.equal(nested_order(y, 0)[:20], nested_order(y, 1)[:20])


def test_subset_smaller_than_classes_is_refused():
    with pytest.raises(DataError, match="fewer than the 10 classes"):
        subset_indices(torch.arange(100), 0.05, 10)


def test_mnist1d_and_digits_are_generated_offline(tmp_path):
    s = build_splits(DataParams(name="mnist1d", n_train=300, n_test=100))
    assert s.x_train.shape == (300, 1, 40) and s.x_test.shape == (100, 1, 40)
    assert set(s.y_train.tolist()) <= set(range(10))
    d = build_splits(DataParams(name="digits", n_train=1000, n_test=300))
    assert d.x_train.shape[1:] == (1, 8, 8) and len(d.y_test) == 300
    write_prepared(tmp_path, d, [0])
    prep = load_prepared(tmp_path)
    assert prep.fingerprint == d.fingerprint
    assert torch.equal(prep.splits.x_train, d.x_train)


def test_truncated_or_missing_prepared_files_are_refused(tmp_path):
    d = build_splits(DataParams(name="digits", n_train=500, n_test=100))
    write_prepared(tmp_path, d, [0])
    f = tmp_path / "dataset.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(DataError, match="corrupt"):
        load_prepared(tmp_path)
    f.unlink()
    with pytest.raises(DataError, match="missing"):
        load_prepared(tmp_path)
