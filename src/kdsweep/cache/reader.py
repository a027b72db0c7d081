"""Reading a cache store: opening checks the files (no symlinks, no Zarr v2, only safe codecs),
the attributes, completeness, format version, provenance (teacher and dataset fingerprints),
shapes and the chunk manifest's coverage; reads compare each chunk's digest with the manifest
and decode whole chunks into `TeacherTargets`."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from kdsweep.cache.format import (
    FORMAT_VERSION,
    REQUIRED_ATTRS,
    SAFE_CODECS,
    CacheError,
    StoreSpec,
    chunk_digest,
    chunk_file,
    partial_path,
)
from kdsweep.registry import CACHE_KINDS
from kdsweep.targets import TeacherTargets


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
            partial = partial_path(self.path)
            hint = (
                " (a partial store exists: the cache stage was interrupted; re-run it)"
                if partial.exists()
                else ""
            )
            raise CacheError(f"cache {self.path} not found{hint}: run `dvc repro` or `dvc pull`")
        _check_files(self.path, self._fix)
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
            stage = f"cache@{self.path.name.removesuffix('.zarr')}"
            raise CacheError(
                f"{self.path} has cache format_version {a.get('format_version')!r}, this kdsweep reads "
                f"{FORMAT_VERSION} (4: a manifest binds every chunk to its place; draw sets): "
                f"rebuild it by re-running its cache stage, `dvc repro -f {stage}`"
            )
        _check_attrs(self.path, a, self._fix)
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

    @property
    def _fix(self) -> str:
        """What to do about a damaged or foreign store."""
        stage = f"cache@{self.path.name.removesuffix('.zarr')}"
        return f"rebuild it (`dvc repro -f {stage}`) or re-pull it (`dvc pull {stage}`)"

    def _check_layout(self) -> None:
        a = self.attrs
        if a["kind"] not in CACHE_KINDS:
            raise CacheError(f"{self.path} has kind {a['kind']!r}, unknown to this kdsweep")
        spec = StoreSpec(kind=a["kind"], dtype=a["dtype"], k=a["k"], draws=a["draws"] or 1)
        manifest = a["manifest"]
        if set(manifest) != set(a["splits"]):
            raise CacheError(
                f"{self.path}: the manifest's splits differ from the store's: {self._fix}"
            )
        for split, n in a["splits"].items():
            if split not in self.root:
                raise CacheError(f"{self.path}: split group {split!r} is missing")
            g = self.root[split]
            layout = spec.layout(n, a["num_classes"], tuple(a["row_shape"][split]))
            try:
                arrays = dict(g.arrays())
            except Exception as err:
                raise CacheError(
                    f"{self.path}/{split}: unreadable array metadata ({err}): {self._fix}"
                ) from None
            if set(arrays) != set(manifest[split]) or not set(layout) <= set(arrays):
                raise CacheError(
                    f"{self.path}/{split}: arrays {sorted(arrays)}, but the manifest lists "
                    f"{sorted(manifest[split])} and the kind needs {sorted(layout)}: {self._fix}"
                )
            for name, (shape, dt) in layout.items():
                arr = arrays[name]
                if tuple(arr.shape) != shape or np.dtype(arr.dtype) != dt:
                    raise CacheError(
                        f"{self.path}/{split}/{name}: shape {arr.shape} dtype {arr.dtype} disagree with "
                        f"the attributes (expected {shape} {dt})"
                    )
            for name, arr in arrays.items():
                digests = manifest[split][name]
                want = -(-arr.shape[0] // max(arr.chunks[0], 1)) if arr.shape else 1
                if not isinstance(digests, list) or len(digests) != want:
                    raise CacheError(
                        f"{self.path}/{split}/{name}: the manifest does not list its {want} chunks: "
                        f"{self._fix}"
                    )
                missing = sum(
                    not chunk_file(self.path, split, name, arr, i).is_file() for i in range(want)
                )
                if missing:
                    raise CacheError(
                        f"{self.path}/{split}/{name}: {missing} of {want} chunks are missing on disk: "
                        f"the store is damaged, {self._fix}"
                    )

    def _check_chunks(self, split: str, name: str, chunks: range) -> None:
        """Each chunk's stored bytes against its digest in the manifest: a chunk moved from
        another index, array or store is refused before it is decoded."""
        arr = self.root[split][name]
        want = self.attrs["manifest"][split][name]
        for i in chunks:
            if chunk_digest(chunk_file(self.path, split, name, arr, i).read_bytes()) != want[i]:
                raise CacheError(
                    f"{self.path}/{split}/{name}: chunk {i} is corrupt or not the chunk the store was written "
                    f"with (its digest differs from the manifest: moved, swapped or foreign): {self._fix}"
                )

    def _arrays(self, split: str) -> tuple[str, ...]:
        kind = CACHE_KINDS.load(self.kind)
        return (*kind.arrays, *(("aug",) if "aug" in self.root[split] else ()))

    def num_rows(self, split: str) -> int:
        return self.attrs["splits"][split]

    def read(self, split: str, rows: slice | None = None) -> TeacherTargets:
        """Read whole chunks (fast sequential I/O) and decode to torch; CRC failures become
        CacheError."""
        g = self.root[split]
        rows = rows or slice(None)
        kind = CACHE_KINDS.load(self.kind)
        out = {}
        lo, hi, _ = rows.indices(self.num_rows(split))
        for name in self._arrays(split):
            step = g[name].chunks[0]
            self._check_chunks(split, name, range(lo // step, -(-hi // step)))
            try:
                a = g[name][rows]
            except Exception as err:
                raise CacheError(
                    f"{self.path}/{split}/{name}: chunk data is corrupt ({err}); re-pull or rebuild the cache"
                ) from None
            out[name] = kind.decode(name, a, self.attrs["dtype"])
        return TeacherTargets(self.kind, out)

    def info(self) -> dict[str, Any]:
        """Sizes: on disk and uncompressed, per row of all splits and per training row (what a
        student's store costs: its views and draw sets included; 0 for an online store)."""
        stored = logical = train = 0
        shapes = {}
        for split in self.attrs["splits"]:
            for name in self._arrays(split):
                arr = self.root[split][name]
                shapes[f"{split}/{name}"] = [list(arr.shape), str(arr.dtype)]
                stored += arr.nbytes_stored()
                logical += arr.nbytes
                train += arr.nbytes_stored() if split == "train" else 0
        rows = sum(self.attrs["splits"].values())
        train_rows = self.attrs["splits"].get("train", 0)
        return {
            "attributes": self.attrs,
            "arrays": shapes,
            "bytes_on_disk": int(stored),
            "bytes_uncompressed": int(logical),
            "bytes_per_row": stored / rows,
            "train_bytes_per_row": train / train_rows if train_rows else 0.0,
            "compression_ratio": logical / stored if stored else float("nan"),
        }

    def verify(self) -> dict[str, int]:
        """Check every chunk of every array against its manifest digest and decode it (each
        checked against its CRC32C); return chunk counts."""
        counts = {}
        for split in self.attrs["splits"]:
            for name in self._arrays(split):
                arr = self.root[split][name]
                step = arr.chunks[0]
                self._check_chunks(split, name, range(arr.nchunks))
                for lo in range(0, arr.shape[0], step):
                    try:
                        arr[lo : lo + step]
                    except Exception as err:
                        raise CacheError(
                            f"{self.path}/{split}/{name}: chunk {lo // step} is corrupt ({err})"
                        ) from None
                counts[f"{split}/{name}"] = arr.nchunks
        return counts


MAX_METADATA_BYTES = 256 * 2**20  # a zarr.json larger than this is not one kdsweep wrote
_V2_METADATA = {".zgroup", ".zarray", ".zattrs", ".zmetadata"}


def _check_files(store: Path, fix: str) -> None:
    """Refuse, before zarr parses anything, what a kdsweep writer never puts in a store: a
    symlink (an array linked in from another store), Zarr v2 metadata, a huge metadata file, or
    a codec outside SAFE_CODECS (numcodecs.pickle and the like are never instantiated)."""
    for dirpath, dirnames, filenames in os.walk(store):
        for name in dirnames + filenames:
            f = Path(dirpath) / name
            if f.is_symlink():
                raise CacheError(f"{f} is a symlink: a store holds its own files only; {fix}")
            if name in _V2_METADATA:
                raise CacheError(
                    f"{store} is a Zarr v2 store ({f.name}); kdsweep reads only the Zarr v3 stores "
                    f"its cache stage writes: {fix}"
                )
            if name == "zarr.json":
                _check_metadata(f, fix)


def _check_metadata(f: Path, fix: str) -> None:
    if f.stat().st_size > MAX_METADATA_BYTES:
        raise CacheError(f"{f} is larger than {MAX_METADATA_BYTES // 2**20} MiB: {fix}")
    try:
        meta = json.loads(f.read_bytes())
    except (ValueError, UnicodeDecodeError) as err:
        raise CacheError(f"{f} is not valid JSON ({err}): {fix}") from None
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3:
        raise CacheError(f"{f} is not Zarr v3 metadata: {fix}")
    if meta.get("node_type") == "array":
        codecs = meta.get("codecs")
        names = [c.get("name") if isinstance(c, dict) else c for c in codecs or []]
        unsafe = [n for n in names if n not in SAFE_CODECS]
        if not isinstance(codecs, list) or unsafe:
            raise CacheError(
                f"{f} names codec(s) {unsafe or codecs!r}, not among those kdsweep writes "
                f"({', '.join(sorted(SAFE_CODECS))}); it is never decoded: {fix}"
            )


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


_ATTR_TYPES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "kind": ("a kind name", lambda v: isinstance(v, str)),
    "dtype": ("a dtype name", lambda v: isinstance(v, str)),
    "k": ("a count or null", lambda v: v is None or _is_count(v)),
    "num_classes": ("a positive count", lambda v: _is_count(v) and v > 0),
    "views": ("a positive count", lambda v: _is_count(v) and v > 0),
    "chunk_rows": ("a positive count", lambda v: _is_count(v) and v > 0),
    "splits": (
        "a mapping of split names to row counts",
        lambda v: isinstance(v, dict) and bool(v) and all(map(_is_count, v.values())),
    ),
    "manifest": ("a mapping of splits to arrays to chunk digests", lambda v: isinstance(v, dict)),
}


def _check_attrs(store: Path, a: dict[str, Any], fix: str) -> None:
    """The root attributes have the types the reader relies on (a message, never a traceback)."""
    for key, (what, ok) in _ATTR_TYPES.items():
        if not ok(a.get(key)):
            raise CacheError(
                f"{store}: root attribute {key}={str(a.get(key))[:80]} is not {what}: {fix}"
            )
    rows = a["row_shape"]
    if not (
        isinstance(rows, dict)
        and set(rows) == set(a["splits"])
        and all(isinstance(r, list) and all(map(_is_count, r)) for r in rows.values())
    ):
        raise CacheError(
            f"{store}: root attribute row_shape={str(rows)[:80]} is not a list of sizes per split: {fix}"
        )
    manifest = a["manifest"]
    if not all(isinstance(m, dict) for m in manifest.values()):
        raise CacheError(f"{store}: the root attribute manifest is malformed: {fix}")
