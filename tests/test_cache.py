"""The logit cache (DESIGN.md §4): every registered kind round-trips through encode/decode and
through a Zarr store; the store is verified on open and on read; an interrupted write resumes."""

import json
import shutil

import numpy as np
import pytest
import torch
import zarr

from kdsweep.cache.format import FORMAT_VERSION, CacheError, StoreSpec, partial_path
from kdsweep.cache.kinds import CacheKind
from kdsweep.cache.reader import LogitCache
from kdsweep.cache.writer import write_cache
from kdsweep.errors import KdsweepError
from kdsweep.registry import CACHE_KINDS
from kdsweep.targets import TeacherTargets

C = 10
K = 4  # k of the kinds that need one


def teacher(x: torch.Tensor) -> torch.Tensor:
    """A fixed 'teacher': a deterministic function of the inputs."""
    return x[:, :C] * 3.0


def inputs(n_train=300, n_test=70):
    g = torch.Generator().manual_seed(0)
    return {
        "train": torch.randn(n_train, 16, generator=g),
        "test": torch.randn(n_test, 16, generator=g),
    }


def build(path, spec, **kw):
    write_cache(path, teacher, inputs(), spec, C, "teacher-fp", "data-fp", batch_size=40, **kw)
    return LogitCache(path, "teacher-fp", "data-fp")


def k_of(name: str, c: int = C) -> int | None:
    return min(K, c) if CACHE_KINDS[name].needs_k else None


def encode(name: str, logits: torch.Tensor, k: int | None, seed: int = 0) -> dict:
    kind: type[CacheKind] = CACHE_KINDS.load(name)
    return kind.encode(logits, k, "float32", torch.Generator().manual_seed(seed))


def decode(name: str, arrays: dict) -> TeacherTargets:
    kind: type[CacheKind] = CACHE_KINDS.load(name)
    return TeacherTargets(name, {a: kind.decode(a, v, "float32") for a, v in arrays.items()})


# --- every registered kind -------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CACHE_KINDS))
def test_kind_encodes_its_layout_and_decodes_exactly_at_float32(name):
    kind: type[CacheKind] = CACHE_KINDS.load(name)
    logits = 3 * torch.randn(7, C, generator=torch.Generator().manual_seed(1))
    k = k_of(name)
    arrays = encode(name, logits, k)
    layout = kind.layout(7, C, (), k, "float32")
    assert list(arrays) == list(kind.arrays) == list(layout)
    for a, v in arrays.items():
        assert (v.shape, v.dtype) == layout[a], a
    t = decode(name, arrays)
    for a, v in t.tensors.items():
        assert v.dtype in (torch.float32, torch.int64), a
        assert np.array_equal(v.numpy(), arrays[a].astype(v.numpy().dtype)), a  # lossless
    if name == "full":
        assert torch.equal(t.tensors["logits"], logits)


@pytest.mark.parametrize("name", list(CACHE_KINDS))
def test_kind_top1_is_the_teacher_argmax_on_confident_rows(name):
    """On rows where one class holds all the mass to float precision every kind agrees on it
    (for `sampled`, every draw lands there)."""
    y = torch.randint(0, C, (20,), generator=torch.Generator().manual_seed(2))
    logits = 60.0 * torch.nn.functional.one_hot(y, C).float()
    t = decode(name, encode(name, logits, k_of(name)))
    assert torch.equal(CACHE_KINDS.load(name).top1(t), y)


@pytest.mark.parametrize("name", list(CACHE_KINDS))
def test_kind_round_trips_through_a_store(name, tmp_path):
    """What a store reads back is what the kind encoded: every chunk, both splits, float32."""
    spec = StoreSpec(kind=name, dtype="float32", k=k_of(name), chunk_rows=64)
    cache = build(tmp_path / "c.zarr", spec)
    assert cache.kind == name and cache.attrs["k"] == spec.k
    kind: type[CacheKind] = CACHE_KINDS.load(name)
    deterministic = _deterministic(name)
    for split, x in inputs().items():
        got = cache.read(split)
        assert got.kind == name and set(got.tensors) == set(kind.arrays)
        if deterministic:  # the same rows encoded in memory
            want = decode(name, encode(name, teacher(x), spec.k))
            for a, v in want.tensors.items():
                assert torch.equal(got.tensors[a], v), (split, a)
    if not deterministic:  # the draws are fixed by sample_seed, whichever run writes them
        again = build(tmp_path / "again.zarr", spec).read("train").tensors
        other = StoreSpec(kind=name, dtype="float32", k=spec.k, chunk_rows=64, sample_seed=1)
        differ = build(tmp_path / "other.zarr", other).read("train").tensors
        first = cache.read("train").tensors
        assert all(torch.equal(first[a], again[a]) for a in first)
        assert any(not torch.equal(first[a], differ[a]) for a in first)


def _deterministic(name: str) -> bool:
    """Whether a kind's encoding ignores its random generator (two seeds, the same arrays)."""
    logits = torch.randn(16, C, generator=torch.Generator().manual_seed(3))
    a, b = encode(name, logits, k_of(name), seed=0), encode(name, logits, k_of(name), seed=1)
    return all(np.array_equal(a[n], b[n]) for n in a)


# --- kinds in detail -------------------------------------------------------------------------


def test_full_float32_round_trip_is_exact(tmp_path):
    cache = build(tmp_path / "c.zarr", StoreSpec(kind="full", dtype="float32", chunk_rows=64))
    x = inputs()
    assert torch.equal(cache.read("train").tensors["logits"], teacher(x["train"]))
    assert torch.equal(cache.read("test").tensors["logits"], teacher(x["test"]))
    a = cache.attrs
    assert (
        a["complete"] is True and a["kind"] == "full" and a["splits"] == {"train": 300, "test": 70}
    )
    for key in (
        "format_version",
        "teacher_fingerprint",
        "dataset_fingerprint",
        "codec",
        "kdsweep_version",
        "views",
    ):
        assert key in a


@pytest.mark.parametrize("dtype,tol", [("float16", 1e-3), ("bfloat16", 8e-3)])
def test_low_precision_round_trip_within_tolerance(tmp_path, dtype, tol):
    cache = build(tmp_path / "c.zarr", StoreSpec(kind="full", dtype=dtype, chunk_rows=64))
    want = teacher(inputs()["train"])
    got = cache.read("train").tensors["logits"]
    assert got.dtype == torch.float32
    assert ((got - want).abs() <= tol * want.abs().clamp(min=1)).all()


def test_topk_round_trip(tmp_path):
    cache = build(tmp_path / "c.zarr", StoreSpec(kind="topk", k=3, dtype="float32", chunk_rows=64))
    t = cache.read("train").tensors
    want = teacher(inputs()["train"])
    v, i = want.topk(3, dim=1)
    assert torch.equal(t["values"], v) and torch.equal(t["indices"], i)
    # the tail's own log-sum-exp: the logits NOT in the top-k, float32
    assert torch.allclose(t["tail_logsumexp"], want.scatter(1, i, -torch.inf).logsumexp(1))
    assert cache.root["train"]["tail_logsumexp"].dtype == np.float32
    assert cache.root["train"]["indices"].dtype == np.uint8  # smallest dtype holding C


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_topk_tail_is_exact_for_a_confident_teacher(dtype):
    """The tail mass read back from a store is the true tail mass to float32 relative precision
    (up to the top values' own rounding) even at 1e-12 and below — never ≤ 0, never noise."""
    g = torch.Generator().manual_seed(4)
    c, k = 100, 5
    for margin in (8.0, 14.0, 20.0, 30.0):
        logits = torch.randn(64, c, generator=g)
        logits[:, 0] += margin
        t = decode_as(dtype, encode_as(dtype, logits, k))
        v, tail = t.tensors["values"], t.tensors["tail_logsumexp"]
        log_tail = tail - torch.logaddexp(v.logsumexp(-1), tail)
        true = logits.double().scatter(1, logits.topk(k, 1).indices, -torch.inf).logsumexp(1)
        true = true - logits.double().logsumexp(1)
        assert torch.isfinite(log_tail).all()
        rounding = (v - logits.topk(k, 1).values).abs().max().item()  # 0 at float32
        assert (log_tail.double() - true).abs().max() <= 2 * rounding + 1e-5, margin


def test_topk_tail_at_k_equal_classes_is_minus_infinity():
    logits = torch.randn(5, C, generator=torch.Generator().manual_seed(5))
    t = decode("topk", encode("topk", logits, C))
    assert torch.isneginf(t.tensors["tail_logsumexp"]).all()


def encode_as(dtype: str, logits: torch.Tensor, k: int) -> dict:
    return CACHE_KINDS.load("topk").encode(logits, k, dtype, torch.Generator().manual_seed(0))


def decode_as(dtype: str, arrays: dict) -> TeacherTargets:
    kind: type[CacheKind] = CACHE_KINDS.load("topk")
    return TeacherTargets("topk", {a: kind.decode(a, v, dtype) for a, v in arrays.items()})


def test_sampled_round_trip_draws_from_teacher(tmp_path):
    cache = build(tmp_path / "c.zarr", StoreSpec(kind="sampled", k=5, chunk_rows=64))
    t = cache.read("train").tensors
    assert t["weights"].shape == t["indices"].shape == (300, 1, 5)  # one draw set per row
    assert torch.allclose(t["weights"].sum(-1), torch.ones(300, 1))
    assert (t["weights"] >= 0).all() and t["indices"].max() < C
    # the most drawn class agrees with the teacher's argmax far more often than chance
    assert (t["indices"][:, 0, 0] == teacher(inputs()["train"]).argmax(1)).float().mean() > 0.5
    assert cache.attrs["sample_tau"] == 1.0 and cache.attrs["sample_seed"] == 0
    assert cache.attrs["draws"] == 1


def test_sampled_store_holds_independent_draw_sets(tmp_path):
    """draws: R keeps R independent draw sets per row, each an unbiased sample of p_T^τ: their
    pooled weights converge on p_T^τ (one fixed set would not), and they differ from each other."""
    spec = StoreSpec(kind="sampled", k=4, chunk_rows=64, sample_tau=4.0, draws=32)
    cache = build(tmp_path / "c.zarr", spec)
    t = cache.read("train").tensors
    assert t["indices"].shape == (300, 32, 4) and cache.attrs["draws"] == 32
    p = torch.softmax(teacher(inputs()["train"]).double() / 4.0, -1)
    pooled = torch.zeros(300, 32, C, dtype=torch.float64)
    pooled.scatter_add_(-1, t["indices"], t["weights"].double())
    assert (pooled[:, 0] != pooled[:, 1]).any(-1).float().mean() > 0.5  # not one set repeated
    one_set = (pooled[:, 0] - p).abs().sum(-1).mean()
    all_sets = (pooled.mean(1) - p).abs().sum(-1).mean()
    assert all_sets < one_set / 3  # 32 sets: ~1/sqrt(32) of one set's error
    assert (
        cache.info()["train_bytes_per_row"]
        > 8
        * build(
            tmp_path / "one.zarr", StoreSpec(kind="sampled", k=4, chunk_rows=64, sample_tau=4.0)
        ).info()["train_bytes_per_row"]
    )  # bytes grow with R


def test_sampled_store_draws_at_its_own_tau(tmp_path):
    """A sampled store records its τ and draws from softmax(logits/τ): the mean weight drawn on
    the teacher's argmax is p^τ's mean top mass (≈0.6 at τ = 1, ≈0.2 at τ = 8)."""
    caches = {
        tau: build(tmp_path / f"t{tau}.zarr", StoreSpec(kind="sampled", k=8, sample_tau=tau))
        for tau in (1.0, 8.0)
    }
    assert caches[8.0].attrs["sample_tau"] == 8.0
    logits = teacher(inputs()["train"]).double()
    for tau, cache in caches.items():
        t = {name: v[:, 0] for name, v in cache.read("train").tensors.items()}  # its one set
        p = torch.softmax(logits / tau, -1)
        w = torch.zeros_like(p).scatter_add_(1, t["indices"], t["weights"].double())
        top = logits.argmax(1, keepdim=True)
        got, want = w.gather(1, top).mean(), p.gather(1, top).mean()
        assert abs(got - want) < 0.03, (tau, got, want)  # sd ≤ 0.01 over 300 rows × 8 draws
    full = StoreSpec(kind="full", sample_tau=4.0)
    assert build(tmp_path / "f.zarr", full).attrs["sample_tau"] is None  # only sampled stores


@pytest.mark.parametrize("name", [n for n in CACHE_KINDS if CACHE_KINDS[n].needs_k])
def test_k_larger_than_classes_is_refused(tmp_path, name):
    with pytest.raises(KdsweepError, match="k=11 is larger than the number of classes"):
        build(tmp_path / "c.zarr", StoreSpec(kind=name, k=11))
    assert not (tmp_path / "c.zarr").exists()


def test_topk_round_trip_on_token_rows(tmp_path):
    """Language-model rows hold a sequence of positions: [N, L, V] logits -> [N, L, k] arrays."""
    g = torch.Generator().manual_seed(1)
    x = {"train": torch.randn(40, 6, 300, generator=g), "test": torch.randn(9, 6, 300, generator=g)}
    path = tmp_path / "lm.zarr"
    spec = StoreSpec(kind="topk", k=8, dtype="float32", chunk_rows=16)
    write_cache(path, lambda b: b * 2, x, spec, 300, "t", "d", batch_size=7)
    cache = LogitCache(path, "t", "d")
    assert cache.attrs["row_shape"] == {"train": [6], "test": [6]}
    t = cache.read("train").tensors
    v, i = (x["train"] * 2).topk(8, dim=-1)
    assert torch.equal(t["values"], v) and torch.equal(t["indices"], i)
    assert t["tail_logsumexp"].shape == (40, 6)
    assert cache.root["train"]["indices"].dtype == np.uint16  # 300 classes need 16 bits
    flat = cache.read("test").flat_positions().tensors
    assert flat["values"].shape == (54, 8) and flat["tail_logsumexp"].shape == (54,)


# --- verification on open and on read --------------------------------------------------------


def test_wrong_teacher_or_dataset_is_refused(tmp_path):
    build(tmp_path / "c.zarr", StoreSpec(chunk_rows=64))
    with pytest.raises(CacheError, match="another teacher"):
        LogitCache(tmp_path / "c.zarr", "other-teacher", "data-fp")
    with pytest.raises(CacheError, match="another dataset"):
        LogitCache(tmp_path / "c.zarr", "teacher-fp", "other-data")


def _set_attr(path, key, value):
    g = zarr.open_group(path, mode="r+")
    g.attrs[key] = value


def test_incomplete_store_is_refused(tmp_path):
    build(tmp_path / "c.zarr", StoreSpec(chunk_rows=64))
    _set_attr(tmp_path / "c.zarr", "complete", False)
    with pytest.raises(CacheError, match="incomplete"):
        LogitCache(tmp_path / "c.zarr")


@pytest.mark.parametrize("version", [0, 2, 3])
def test_older_format_version_is_refused(tmp_path, version):
    """Version 2 stores held a top-k log-sum-exp over all classes (a tail recovered by
    cancellation) and sampled draws at τ = 1 only, version 3 no chunk manifest and one fixed
    draw set per row: refused, with the command that rebuilds."""
    assert FORMAT_VERSION == 4
    build(tmp_path / "c.zarr", StoreSpec(chunk_rows=64))
    _set_attr(tmp_path / "c.zarr", "format_version", version)
    with pytest.raises(CacheError, match="format_version") as err:
        LogitCache(tmp_path / "c.zarr")
    assert "dvc repro" in str(err.value) and "cache" in str(err.value)


def test_missing_attribute_is_refused(tmp_path):
    build(tmp_path / "c.zarr", StoreSpec(chunk_rows=64))
    g = zarr.open_group(tmp_path / "c.zarr", mode="r+")
    g.attrs.put({k: v for k, v in g.attrs.asdict().items() if k != "dataset_fingerprint"})
    with pytest.raises(CacheError, match="lacks the attributes"):
        LogitCache(tmp_path / "c.zarr")


def test_shape_disagreeing_with_attributes_is_refused(tmp_path):
    build(tmp_path / "c.zarr", StoreSpec(chunk_rows=64))
    _set_attr(tmp_path / "c.zarr", "num_classes", 12)
    with pytest.raises(CacheError, match="disagree with the attributes"):
        LogitCache(tmp_path / "c.zarr")


def test_altered_chunk_raises_on_read_and_verify(tmp_path):
    cache = build(tmp_path / "c.zarr", StoreSpec(chunk_rows=64))
    assert cache.verify()["train/logits"] == 5
    chunk = tmp_path / "c.zarr" / "train" / "logits" / "c" / "1" / "0"
    b = bytearray(chunk.read_bytes())
    b[len(b) // 2] ^= 0x01
    chunk.write_bytes(bytes(b))
    cache = LogitCache(tmp_path / "c.zarr")
    with pytest.raises(CacheError, match="corrupt"):
        cache.read("train")
    with pytest.raises(CacheError, match="chunk 1 is corrupt"):
        cache.verify()


def test_truncated_chunk_raises(tmp_path):
    build(tmp_path / "c.zarr", StoreSpec(chunk_rows=64))
    chunk = tmp_path / "c.zarr" / "test" / "logits" / "c" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-9])
    with pytest.raises(CacheError, match="corrupt"):
        LogitCache(tmp_path / "c.zarr").read("test")


def test_missing_chunk_is_refused_not_filled_with_zeros(tmp_path):
    build(tmp_path / "c.zarr", StoreSpec(chunk_rows=64))
    (tmp_path / "c.zarr" / "train" / "logits" / "c" / "2" / "0").unlink()
    with pytest.raises(CacheError, match="chunks are missing"):
        LogitCache(tmp_path / "c.zarr")


def test_missing_store_names_a_partial_one(tmp_path):
    with pytest.raises(CacheError, match="not found: run"):
        LogitCache(tmp_path / "c.zarr")
    partial_path(tmp_path / "c.zarr").mkdir()
    with pytest.raises(CacheError, match="partial store exists"):
        LogitCache(tmp_path / "c.zarr")


def test_info_reports_sizes(tmp_path):
    info = build(tmp_path / "c.zarr", StoreSpec(kind="topk", k=3, chunk_rows=64)).info()
    assert info["bytes_on_disk"] > 0 and info["compression_ratio"] > 0
    assert info["bytes_per_row"] == pytest.approx(info["bytes_on_disk"] / 370)
    assert info["arrays"]["train/indices"] == [[300, 3], "uint8"]


# --- writing: resume, restart, exclusion ----------------------------------------------------


def test_interrupted_write_resumes_to_an_identical_store(tmp_path):
    """In-process interruption (an exception from the teacher); tests/test_interrupt.py kills a
    writer process outright."""
    spec = StoreSpec(kind="sampled", k=4, chunk_rows=64)
    ref = build(tmp_path / "ref.zarr", spec)
    calls = {"n": 0}

    def dying_teacher(x):
        calls["n"] += 1
        if calls["n"] == 7:  # the first two calls are the 1-row shape probes (one per split)
            raise KeyboardInterrupt("killed")
        return teacher(x)

    path = tmp_path / "c.zarr"
    with pytest.raises(KeyboardInterrupt):
        write_cache(path, dying_teacher, inputs(), spec, C, "teacher-fp", "data-fp", batch_size=40)
    assert not path.exists()  # nothing marked complete in place
    with pytest.raises(CacheError, match="partial store exists"):
        LogitCache(path)
    progress = json.loads((tmp_path / "c.zarr.partial" / "progress.0.json").read_text())
    assert progress["train"] == [0, 1]  # two whole chunks were done before the kill
    resumed = {"n": 0}

    def counting_teacher(x):
        resumed["n"] += len(x)
        return teacher(x)

    write_cache(path, counting_teacher, inputs(), spec, C, "teacher-fp", "data-fp", batch_size=40)
    assert resumed["n"] == 2 + 370 - 128  # the probe rows, then only the unfinished chunks
    got = LogitCache(path, "teacher-fp", "data-fp")
    for split in ("train", "test"):
        for k, v in ref.read(split).tensors.items():
            assert torch.equal(got.read(split).tensors[k], v)
    assert got.attrs == ref.attrs
    assert not (tmp_path / "c.zarr.partial").exists()


def test_partial_store_from_other_params_restarts(tmp_path):
    path = tmp_path / "c.zarr"
    build(path, StoreSpec(kind="full", chunk_rows=64))
    shutil.move(path, partial_path(path))  # pretend it is a leftover partial of other params
    cache = build(path, StoreSpec(kind="topk", k=2, chunk_rows=64))
    assert cache.kind == "topk"


def test_second_writer_is_refused(tmp_path):
    from filelock import FileLock

    path = tmp_path / "c.zarr"
    with FileLock(str(path) + ".lock"):
        with pytest.raises(CacheError, match="another process is writing"):
            build(path, StoreSpec(chunk_rows=64))
