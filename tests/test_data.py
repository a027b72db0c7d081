"""Splits, their fingerprint, the offline sources and the prepared nested α-subsets
(kdsweep.data.splits, .sources, .prepare, .prepared)."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdsweep.config import DataParams
from kdsweep.data.prepare import build_splits, prepare
from kdsweep.data.prepared import (
    carve_validation,
    load_prepared,
    nested_order,
    subset_indices,
    subset_size,
    write_prepared,
)
from kdsweep.data.sources import digits, mnist1d
from kdsweep.data.splits import DataError, Splits


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
        assert len(idx) == subset_size(alpha, 1000)
        cur = set(idx.tolist())
        assert prev <= cur  # nesting
        prev = cur
        counts = torch.bincount(y[idx], minlength=3).float()
        expected = torch.tensor([0.5, 0.3, 0.2]) * len(idx)
        assert (counts - expected).abs().max() <= 1.0, (alpha, counts, expected)


def test_different_seeds_give_different_subsets():
    y = torch.arange(100) % 10
    assert not torch.equal(nested_order(y, 0)[:20], nested_order(y, 1)[:20])
    assert torch.equal(nested_order(y, 0), nested_order(y, 0))


def test_subset_smaller_than_classes_is_refused():
    with pytest.raises(DataError, match="fewer than the 10 classes"):
        subset_indices(torch.arange(100), 0.05, 10)


def test_mnist1d_and_digits_are_generated_offline(tmp_path):
    s = build_splits(DataParams(name="mnist1d", n_train=300, n_test=100))
    assert s.x_train.shape == (300, 1, 40) and s.x_test.shape == (100, 1, 40)
    assert set(s.y_train.tolist()) <= set(range(10)) and s.name == "mnist1d"
    assert s.fingerprint == mnist1d(DataParams(name="mnist1d", n_train=300, n_test=100)).fingerprint
    d = build_splits(DataParams(name="digits", n_train=1000, n_test=300))
    assert d.x_train.shape[1:] == (1, 8, 8) and len(d.y_test) == 300
    write_prepared(tmp_path, d, [0])
    prep = load_prepared(tmp_path)
    assert prep.fingerprint == d.fingerprint
    assert torch.equal(prep.splits.x_train, d.x_train)
    assert json.loads((tmp_path / "meta.json").read_text())["input_shape"] == [1, 8, 8]


def test_digits_caps_its_splits_at_the_1797_images():
    d = digits(DataParams(name="digits", n_train=40000, n_test=10000))
    assert len(d.y_test) == 1797 // 4 and len(d.y_train) == 1797 - 1797 // 4
    train = {tuple(r.flatten().tolist()) for r in d.x_train}
    assert not any(tuple(r.flatten().tolist()) in train for r in d.x_test[:50])  # disjoint rows


def _splits(**change) -> Splits:
    g = torch.Generator().manual_seed(0)
    base = {
        "x_train": torch.randn(20, 1, 4, generator=g),
        "y_train": torch.arange(20) % 3,
        "x_test": torch.randn(6, 1, 4, generator=g),
        "y_test": torch.arange(6) % 3,
        "num_classes": 3,
        "name": "toy",
    }
    return Splits(**{**base, **change})


def test_fingerprint_covers_every_split_name_dtype_and_shape():
    ref = _splits().fingerprint
    assert ref == _splits().fingerprint and len(ref) == 64
    other = _splits()
    changed = [
        _splits(name="other"),
        _splits(y_train=other.y_train.roll(1)),
        _splits(x_test=other.x_test + 1e-6),
        _splits(y_test=other.y_test.int()),  # same values, another dtype
        _splits(x_train=other.x_train.reshape(20, 4, 1)),  # same bytes, another shape
    ]
    fps = [s.fingerprint for s in changed]
    assert ref not in fps and len(set(fps)) == len(fps)


def test_prepared_meta_that_disagrees_with_the_data_is_refused(tmp_path):
    write_prepared(tmp_path, _splits(), [0, 1])
    meta = json.loads((tmp_path / "meta.json").read_text())
    meta["fingerprint"] = _splits(name="other").fingerprint
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="does not match its meta.json"):
        load_prepared(tmp_path)


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


def test_prepare_writes_one_nested_order_per_subset_seed(tmp_path):
    p = DataParams(name="digits", n_train=600, n_test=100, seed=1)
    seeds = [0, 3]
    prepare(p, seeds, tmp_path)
    prep = load_prepared(tmp_path)
    assert sorted(prep.orders) == seeds
    assert prep.fingerprint == build_splits(p).fingerprint  # same params, same data
    alphas = [0.02, 0.1, 0.5, 1.0]
    for s in seeds:
        subsets = [prep.subset(a, s) for a in alphas]
        for a, idx in zip(alphas, subsets, strict=True):
            assert len(idx) == subset_size(a, p.n_train)
        for small, big in zip(subsets, subsets[1:], strict=False):
            assert torch.equal(big[: len(small)], small)  # a prefix of the same order
    assert not torch.equal(prep.subset(0.1, 0), prep.subset(0.1, 3))
    with pytest.raises(DataError, match="subset seed 7 was not prepared"):
        prep.subset(0.1, 7)
    with pytest.raises(DataError, match="fewer than the 10 classes"):
        prep.subset(0.01, 0)  # 6 of 600 samples


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    n=st.integers(30, 2000),
    classes=st.integers(2, 10),
    fraction=st.sampled_from([0.1, 0.2, 0.25, 0.5]),
)
def test_validation_carve_is_an_exact_class_balanced_partition(n, classes, fraction):
    y = torch.arange(n) % classes
    sizes = set()
    for seed in (0, 1, 2):
        order = nested_order(y, seed)
        for m in sorted({30, n // 2, n}):
            sub = order[:m]
            train, val = carve_validation(sub, y[sub], fraction)
            assert sorted([*train.tolist(), *val.tolist()]) == sorted(sub.tolist())
            assert len(val) == round(fraction * m)
            per_class = torch.bincount(y[val], minlength=classes).float()
            in_subset = torch.bincount(y[sub], minlength=classes).float()
            # every class validates in proportion: no aliasing with the order's class cycle
            assert (per_class - fraction * in_subset).abs().max() <= 2
            sizes.add((m, len(train)))
    # one training size per subset size, whatever the seed: students of one α stack
    assert len(sizes) == len({m for m, _ in sizes})


def test_validation_of_token_sequences_is_one_contiguous_block_at_the_subset_s_end():
    train, val = carve_validation(torch.arange(100, 150), None, 0.1)
    assert val.tolist() == list(range(145, 150)) and train.tolist() == list(range(100, 145))


def test_validation_carve_refuses_a_subset_too_small_to_validate():
    with pytest.raises(DataError, match="cannot be split .* at student.val_fraction=0.1"):
        carve_validation(torch.arange(4), torch.zeros(4), 0.1)  # round(0.4) = 0 rows
