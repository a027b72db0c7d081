"""The teacher-logit cache: one Zarr v3 store per teacher and kind, with a group per split.

Layout of `data/logits/<name>.zarr` (DESIGN.md §4):
  zarr.json              root attributes: format_version, kind, k, dtype, num_classes,
                         teacher_fingerprint, dataset_fingerprint, codec, kdsweep_version,
                         splits, complete (written last)
  train/, test/          one group per split, attributes {split, num_rows}, arrays:
    full     logits[N, C]                       float16 | bfloat16 (stored as uint16 bits) | float32
    topk     values[N, k] (descending logits), indices[N, k] (smallest uint holding C),
             logsumexp[N] float32 (over all C logits at τ=1, so top-k probabilities are exact)
    sampled  indices[N, k] drawn with replacement from softmax(logits / tau), duplicates merged,
             weights[N, k] = draw counts / k (0 in unused slots): Σ_j w_j·f(c_j) is an unbiased
             estimate of E_{c~p_T}[f(c)], so the student's CE on them estimates CE(p_T, p_S).
Chunks hold whole rows (`chunk_rows`), compressed by zarr's own codecs, and end in a
Crc32cCodec, so an altered chunk raises on read instead of decoding to garbage.

Writes go to `<name>.zarr.partial`, chunk by chunk, each finished chunk recorded in
`progress.json`; a killed writer resumes from the last finished chunk, and the store is renamed
into place only after `complete` is set. Readers refuse anything else.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
import zarr.codecs as zc
from filelock import FileLock, Timeout
from tqdm import tqdm

from kdsweep import __version__
from kdsweep.config import Codec
from kdsweep.errors import KdsweepError
from kdsweep.io import atomic_write_json

FORMAT_VERSION = 2  # 2: row_shape per split (positions or views per row), aug
REQUIRED_ATTRS = {
    "format_version",
    "kind",
    "k",
    "dtype",
    "num_classes",
    "row_shape",
    "views",
    "teacher_fingerprint",
    "dataset_fingerprint",
    "codec",
    "chunk_rows",
    "splits",
    "kdsweep_version",
    "complete",
}
ARRAYS = {
    "full": ("logits",),
    "topk": ("values", "indices", "logsumexp"),
    "sampled": ("indices", "weights"),
}


class CacheError(KdsweepError):
    """A cache store that is incomplete, corrupt, or made for another teacher or dataset."""


@dataclass(frozen=True)
class StoreSpec:
    kind: str = "full"
    dtype: str = "float16"
    k: int | None = None
    chunk_rows: int = 8192
    codec: Codec = Codec()
    sample_seed: int = 0
    sample_tau: float = 1.0


def index_dtype(num_classes: int) -> np.dtype:
    for dt in (np.uint8, np.uint16, np.uint32):
        if num_classes - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise CacheError(f"{num_classes} classes do not fit a uint32 index")


def _compressors(codec: Codec) -> list[Any]:
    chain: list[Any] = []
    if codec.name == "blosc":
        chain.append(zc.BloscCodec(cname=codec.cname, clevel=codec.clevel, shuffle=codec.shuffle))
    elif codec.name == "zstd":
        chain.append(zc.ZstdCodec(level=codec.clevel))
    return [*chain, zc.Crc32cCodec()]


def _float_np(dtype: str) -> np.dtype:
    return np.dtype({"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}[dtype])


def _to_store(x: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return x.to(getattr(torch, dtype)).numpy()


def _from_store(a: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(np.ascontiguousarray(a)).float()


def encode_rows(logits: torch.Tensor, spec: StoreSpec, seed: int) -> dict[str, np.ndarray]:
    """Teacher logits [B, ..., C] (float32) -> the arrays this kind stores for those rows.

    Every op works on the last (class) axis, so a row may hold several positions (a language
    model's sequence: [B, L, V]).
    """
    c = logits.shape[-1]
    if spec.kind == "full":
        return {"logits": _to_store(logits, spec.dtype)}
    assert spec.k is not None
    if spec.k > c:
        raise CacheError(f"k={spec.k} is larger than the number of classes ({c}): choose k <= {c}")
    idt = index_dtype(c)
    if spec.kind == "topk":
        values, idx = logits.topk(spec.k, dim=-1)
        return {
            "values": _to_store(values, spec.dtype),
            "indices": idx.numpy().astype(idt),
            "logsumexp": logits.logsumexp(-1).numpy().astype(np.float32),
        }
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(logits.double().reshape(-1, c) / spec.sample_tau, dim=-1)
    draws = torch.multinomial(probs, spec.k, replacement=True, generator=gen)
    counts = torch.zeros_like(probs).scatter_add_(
        1, draws, torch.ones_like(draws, dtype=probs.dtype)
    )
    # keep the distinct draws first (by count, ties by class id), zero weight in the unused slots
    w, idx = counts.topk(spec.k, dim=1, sorted=True)
    shape = (*logits.shape[:-1], spec.k)
    return {
        "indices": idx.reshape(shape).numpy().astype(idt),
        "weights": (w / spec.k).reshape(shape).numpy().astype(np.float32),
    }


def _array_layout(
    spec: StoreSpec, n: int, c: int, row: tuple[int, ...]
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shapes and dtypes of each array: n rows, each of `row` positions (() for one label)."""
    k = spec.k or 0
    f = _float_np(spec.dtype)
    return {
        "full": {"logits": ((n, *row, c), f)},
        "topk": {
            "values": ((n, *row, k), f),
            "indices": ((n, *row, k), index_dtype(c)),
            "logsumexp": ((n, *row), np.dtype(np.float32)),
        },
        "sampled": {
            "indices": ((n, *row, k), index_dtype(c)),
            "weights": ((n, *row, k), np.dtype(np.float32)),
        },
    }[spec.kind]


def _root_attrs(
    spec: StoreSpec,
    num_classes: int,
    row_shapes: dict[str, list[int]],
    teacher_fp: str,
    dataset_fp: str,
    splits: dict[str, int],
) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "kind": spec.kind,
        "k": spec.k,
        "dtype": spec.dtype,
        "num_classes": num_classes,
        "row_shape": row_shapes,
        "views": 1,
        "teacher_fingerprint": teacher_fp,
        "dataset_fingerprint": dataset_fp,
        "codec": spec.codec.model_dump(),
        "chunk_rows": spec.chunk_rows,
        "sample_seed": spec.sample_seed if spec.kind == "sampled" else None,
        "sample_tau": spec.sample_tau if spec.kind == "sampled" else None,
        "splits": splits,
        "kdsweep_version": __version__,
        "complete": False,
    }


def write_cache(
    path: Path,
    teacher: Callable[[torch.Tensor], torch.Tensor],
    inputs: dict[str, torch.Tensor],
    spec: StoreSpec,
    num_classes: int,
    teacher_fingerprint: str,
    dataset_fingerprint: str,
    batch_size: int = 1024,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] = lambda: None,
    views: dict[str, torch.Tensor] | None = None,
    augment: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Run `teacher` (inputs -> float32 logits) over every split and store its outputs.

    Augmentation-consistent caching: for a split in `views` (aug parameters [N, V, P]), the
    teacher labels each of the V views `augment(x, aug[:, v])` and the store keeps the outputs
    per view ([N, V, …]) beside `aug` itself, so a student replays exactly the labelled view.

    Resumable: chunks already recorded in the partial store's progress are skipped. With
    `world > 1` (torchrun) rank r writes the chunks i with i % world == r of one shared partial
    store; `barrier` synchronises the ranks, and rank 0 (which holds the writer lock) creates
    the store first and finalises it last. Every chunk is computed from the same batches whatever
    the world size, so the finished store is the same bit for bit.
    """
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    splits = {name: len(x) for name, x in inputs.items()}
    views = views or {}

    def outputs(split: str, lo: int, hi: int) -> torch.Tensor:
        x = inputs[split][lo:hi]
        if split not in views:
            return teacher(x).float()
        assert augment is not None, "views need an augment function"
        aug = views[split][lo:hi]
        return torch.stack([teacher(augment(x, aug[:, v])).float() for v in range(aug.shape[1])], 1)

    with torch.no_grad():  # positions per row: () for a classifier, (L,) a sequence, (V,) views
        row_shapes = {s: list(outputs(s, 0, 1).shape[1:-1]) for s in inputs}
    attrs = _root_attrs(
        spec, num_classes, row_shapes, teacher_fingerprint, dataset_fingerprint, splits
    )
    attrs["views"] = max([1, *(int(v.shape[1]) for v in views.values())])
    lock = FileLock(str(path) + ".lock")
    if rank == 0:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise CacheError(
                f"another process is writing {path} (lock {lock.lock_file}); refusing to interleave"
            ) from None
    try:
        if rank == 0:
            aug_shapes = {s: tuple(v.shape) for s, v in views.items()}
            _open_partial(partial, attrs, spec, num_classes, aug_shapes)
        barrier()
        root = zarr.open_group(partial, mode="r+")
        done = _read_progress(partial)
        for split, x in inputs.items():
            n = len(x)
            n_chunks = -(-n // spec.chunk_rows)
            mine = [
                i for i in range(n_chunks) if i % world == rank and i not in done.get(split, [])
            ]
            for i in tqdm(mine, desc=f"cache {path.name}/{split}", disable=None, unit="chunk"):
                lo, hi = i * spec.chunk_rows, min(n, (i + 1) * spec.chunk_rows)
                with torch.no_grad():
                    logits = torch.cat(
                        [
                            outputs(split, j, min(hi, j + batch_size))
                            for j in range(lo, hi, batch_size)
                        ]
                    )
                seed = spec.sample_seed * 1_000_003 + i + (0 if split == "train" else 500_009)
                for name, arr in encode_rows(logits, spec, seed).items():
                    root[split][name][lo:hi] = arr
                if split in views:
                    root[split]["aug"][lo:hi] = views[split][lo:hi].numpy().astype(np.int16)
                _record_progress(partial, split, i, rank)
        barrier()
        if rank == 0:
            finalize_cache(path)
    finally:
        if rank == 0:
            lock.release()


def _open_partial(
    partial: Path, attrs: dict, spec: StoreSpec, num_classes: int, aug_shapes: dict[str, tuple]
) -> None:
    """Create the partial store, or keep an existing one written with the same attributes (resume)."""
    if partial.exists():
        try:
            same = zarr.open_group(partial, mode="r").attrs.asdict() == attrs
        except Exception:  # unreadable leftover of a killed writer
            same = False
        if same:
            return
        shutil.rmtree(partial)  # a leftover from other params or another teacher: restart
    root = zarr.open_group(partial, mode="w")
    for split, n in attrs["splits"].items():
        g = root.create_group(split)
        g.attrs.update({"split": split, "num_rows": n})
        layout = _array_layout(spec, n, num_classes, tuple(attrs["row_shape"][split]))
        if split in aug_shapes:
            layout["aug"] = (aug_shapes[split], np.dtype(np.int16))
        for name, (shape, dt) in layout.items():
            chunks = (spec.chunk_rows, *shape[1:])
            g.create_array(
                name,
                shape=shape,
                chunks=chunks,
                dtype=dt,
                compressors=_compressors(spec.codec),
                fill_value=0,
            )
    root.attrs.update(attrs)


def _progress_file(partial: Path, rank: int) -> Path:
    return partial / f"progress.{rank}.json"


def _read_progress(partial: Path) -> dict[str, list[int]]:
    done: dict[str, list[int]] = {}
    for f in sorted(partial.glob("progress.*.json")):
        for split, chunks in json.loads(f.read_text()).items():
            done.setdefault(split, []).extend(chunks)
    return done


def _record_progress(partial: Path, split: str, chunk: int, rank: int) -> None:
    f = _progress_file(partial, rank)
    done = json.loads(f.read_text()) if f.exists() else {}
    done.setdefault(split, []).append(chunk)
    atomic_write_json(f, done)


def finalize_cache(path: Path) -> None:
    """Check every chunk of the partial store is written, mark it complete, move it into place."""
    partial = path.with_name(path.name + ".partial")
    root = zarr.open_group(partial, mode="r+")
    done = _read_progress(partial)
    for split, n in root.attrs["splits"].items():
        expected = set(range(-(-n // root.attrs["chunk_rows"])))
        if set(done.get(split, [])) != expected:
            raise CacheError(
                f"{partial}: split {split} is missing chunks {sorted(expected - set(done.get(split, [])))}"
            )
    for f in partial.glob("progress.*.json"):
        f.unlink()
    root.attrs["complete"] = True
    if path.exists():
        shutil.rmtree(path)
    os.replace(partial, path)


@dataclass(frozen=True)
class CacheSplit:
    """Teacher targets for some rows of one split, as float32/int64 torch tensors."""

    kind: str
    tensors: dict[str, torch.Tensor]

    def rows(self, idx: torch.Tensor) -> CacheSplit:
        return CacheSplit(self.kind, {k: v[idx] for k, v in self.tensors.items()})

    def flat_positions(self) -> CacheSplit:
        """One row per position: [B, L, k] -> [B·L, k] and logsumexp [B, L] -> [B·L]."""
        return CacheSplit(
            self.kind,
            {
                k: v.flatten() if k == "logsumexp" else v.flatten(0, -2)
                for k, v in self.tensors.items()
            },
        )

    def to(self, device: torch.device | str) -> CacheSplit:
        return CacheSplit(self.kind, {k: v.to(device) for k, v in self.tensors.items()})


class LogitCache:
    """A verified, read-only view of a complete store. Opening checks provenance and shapes."""

    def __init__(
        self,
        path: Path,
        teacher_fingerprint: str | None = None,
        dataset_fingerprint: str | None = None,
    ):
        self.path = Path(path)
        if not self.path.exists():
            partial = self.path.with_name(self.path.name + ".partial")
            hint = (
                " (a partial store exists: the cache stage was interrupted; re-run it)"
                if partial.exists()
                else ""
            )
            raise CacheError(f"cache {self.path} not found{hint}: run `dvc repro` or `dvc pull`")
        try:
            self.root = zarr.open_group(self.path, mode="r")
            self.attrs = self.root.attrs.asdict()
        except Exception as err:
            raise CacheError(f"{self.path} is not a readable Zarr v3 store ({err})") from None
        a = self.attrs
        missing = sorted(REQUIRED_ATTRS - set(a))
        if missing and a.get("format_version") == FORMAT_VERSION:
            raise CacheError(
                f"{self.path} lacks the attributes {missing}: rebuild it with its cache stage"
            )
        if a.get("format_version") != FORMAT_VERSION:
            raise CacheError(
                f"{self.path} has cache format_version {a.get('format_version')!r}, this kdsweep reads "
                f"{FORMAT_VERSION}: rebuild it with `dvc repro -f` on its cache stage"
            )
        if a.get("complete") is not True:
            raise CacheError(
                f"{self.path} is incomplete (complete={a.get('complete')}): re-run its cache stage"
            )
        for what, want in (("teacher", teacher_fingerprint), ("dataset", dataset_fingerprint)):
            have = a.get(f"{what}_fingerprint")
            if want is not None and have != want:
                raise CacheError(
                    f"{self.path} was made for another {what} ({what}_fingerprint {str(have)[:12]}…, "
                    f"expected {want[:12]}…): re-run the cache stage or pull the matching {what}"
                )
        self._check_layout()

    @property
    def kind(self) -> str:
        return self.attrs["kind"]

    def _check_layout(self) -> None:
        a = self.attrs
        spec = StoreSpec(kind=a["kind"], dtype=a["dtype"], k=a["k"])
        for split, n in a["splits"].items():
            if split not in self.root:
                raise CacheError(f"{self.path}: split group {split!r} is missing")
            g = self.root[split]
            layout = _array_layout(spec, n, a["num_classes"], tuple(a["row_shape"][split]))
            for name, (shape, dt) in layout.items():
                if name not in g:
                    raise CacheError(f"{self.path}/{split}: array {name!r} is missing")
                arr = g[name]
                if tuple(arr.shape) != shape or np.dtype(arr.dtype) != dt:
                    raise CacheError(
                        f"{self.path}/{split}/{name}: shape {arr.shape} dtype {arr.dtype} disagree with "
                        f"the attributes (expected {shape} {dt})"
                    )
                if arr.nchunks_initialized != arr.nchunks:
                    raise CacheError(
                        f"{self.path}/{split}/{name}: {arr.nchunks - arr.nchunks_initialized} of "
                        f"{arr.nchunks} chunks are missing on disk: the store is damaged, rebuild or re-pull it"
                    )

    def _arrays(self, split: str) -> tuple[str, ...]:
        return (*ARRAYS[self.kind], *(("aug",) if "aug" in self.root[split] else ()))

    def num_rows(self, split: str) -> int:
        return self.attrs["splits"][split]

    def read(self, split: str, rows: slice | None = None) -> CacheSplit:
        """Read whole chunks (fast sequential I/O) and convert to torch; CRC failures become CacheError."""
        g = self.root[split]
        rows = rows or slice(None)
        out = {}
        for name in self._arrays(split):
            try:
                a = g[name][rows]
            except Exception as err:
                raise CacheError(
                    f"{self.path}/{split}/{name}: chunk data is corrupt ({err}); re-pull or rebuild the cache"
                ) from None
            if name in ("logits", "values"):
                out[name] = _from_store(a, self.attrs["dtype"])
            elif name in ("indices", "aug"):
                out[name] = torch.from_numpy(a.astype(np.int64))
            else:
                out[name] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        return CacheSplit(self.kind, out)

    def info(self) -> dict[str, Any]:
        stored = logical = 0
        shapes = {}
        for split in self.attrs["splits"]:
            for name in self._arrays(split):
                arr = self.root[split][name]
                shapes[f"{split}/{name}"] = [list(arr.shape), str(arr.dtype)]
                stored += arr.nbytes_stored()
                logical += arr.nbytes
        rows = sum(self.attrs["splits"].values())
        return {
            "attributes": self.attrs,
            "arrays": shapes,
            "bytes_on_disk": int(stored),
            "bytes_uncompressed": int(logical),
            "bytes_per_row": stored / rows,
            "compression_ratio": logical / stored if stored else float("nan"),
        }

    def verify(self) -> dict[str, int]:
        """Decode every chunk of every array (each checked against its CRC32C); return chunk counts."""
        counts = {}
        for split in self.attrs["splits"]:
            for name in self._arrays(split):
                arr = self.root[split][name]
                step = arr.chunks[0]
                for lo in range(0, arr.shape[0], step):
                    try:
                        arr[lo : lo + step]
                    except Exception as err:
                        raise CacheError(
                            f"{self.path}/{split}/{name}: chunk {lo // step} is corrupt ({err})"
                        ) from None
                counts[f"{split}/{name}"] = arr.nchunks
        return counts
