"""Reading a cache store: opening checks completeness, format version, provenance (teacher and
dataset fingerprints) and shapes; reads decode whole chunks into `TeacherTargets`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr

from kdsweep.cache.format import (
    FORMAT_VERSION,
    REQUIRED_ATTRS,
    CacheError,
    StoreSpec,
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
                f"{FORMAT_VERSION} (4: sampled stores with draw sets, online stores): "
                f"rebuild it by re-running its cache stage, `dvc repro -f {stage}`"
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
        if a["kind"] not in CACHE_KINDS:
            raise CacheError(f"{self.path} has kind {a['kind']!r}, unknown to this kdsweep")
        spec = StoreSpec(kind=a["kind"], dtype=a["dtype"], k=a["k"], draws=a["draws"] or 1)
        for split, n in a["splits"].items():
            if split not in self.root:
                raise CacheError(f"{self.path}: split group {split!r} is missing")
            g = self.root[split]
            layout = spec.layout(n, a["num_classes"], tuple(a["row_shape"][split]))
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
        for name in self._arrays(split):
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
