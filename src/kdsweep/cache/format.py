"""The on-disk format of a logit cache store (Zarr v3), shared by the writer and the reader.

Layout of `<name>.zarr` (DESIGN.md §4):
  zarr.json              root attributes: format_version, kind, k, dtype, num_classes, row_shape,
                         views, teacher_fingerprint, dataset_fingerprint, codec, chunk_rows,
                         sample_seed, sample_tau, draws, splits, kdsweep_version, complete
                         (written last) (sample_seed, sample_tau and draws: the seed, the
                         temperature τ and the number R of draw sets of a `sampled` store, None
                         for other kinds; its students train at that τ)
  train/, test/          one group per split, attributes {split, num_rows}; the arrays of the
                         store's kind (kdsweep.cache.kinds), shaped [N, *row_shape, …], plus
                         aug[N, V, 3] (int16) for a split cached over V augmented views:
                           full     logits
                           topk     values, indices, tail_logsumexp (float32, the log-sum-exp
                                    of the logits NOT in the top-k; −inf when k = C)
                           sampled  indices, weights [N, …, R, k] (R draw sets from
                                    softmax(logits / sample_tau))
                           online   test/logits only (float32): no training rows
Chunks hold whole rows (`chunk_rows`), compressed by zarr's own codecs, and end in a
Crc32cCodec, so an altered chunk raises on read instead of decoding to garbage. A CRC does not
bind a chunk to its place, so the root attribute `manifest` does: {split: {array: [digest of
chunk 0's stored bytes, chunk 1's, …]}} over every array of each split group (whatever the
kind's layout holds, `aug` included); the reader compares the digests of the chunks it reads,
and refuses symlinks, Zarr v2 metadata and codecs outside SAFE_CODECS inside a store.

Writes go to `<name>.zarr.partial`, chunk by chunk, each finished chunk recorded in
`progress.<rank>.json`; a killed writer resumes from the last finished chunk, and the store is
renamed into place only after `complete` is set. Readers refuse anything else.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zarr
import zarr.codecs as zc

from kdsweep import __version__
from kdsweep.cache.kinds import CacheKind, Layout
from kdsweep.config import Codec
from kdsweep.errors import KdsweepError
from kdsweep.registry import CACHE_KINDS

# 2: row_shape per split (positions or views per row), aug
# 3: topk stores the tail's own log-sum-exp (tail_logsumexp) instead of the log-sum-exp over all
#    classes; sampled stores draw at their own τ (sample_tau).
# 4: the chunk manifest (swapped, duplicated or foreign chunks and arrays are refused); sampled
#    stores hold R draw sets per row (draws); kind online. Readers refuse 3 and older: rebuild.
FORMAT_VERSION = 4
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
    "draws",
    "splits",
    "kdsweep_version",
    "complete",
    "manifest",
}
# the codecs a kdsweep writer uses (`compressors`); anything else (numcodecs.pickle, …) is refused
SAFE_CODECS = {"bytes", "blosc", "zstd", "crc32c"}


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
    sample_tau: float = 1.0  # the temperature a sampled store draws at
    draws: int = 1  # the draw sets per row of a sampled store

    @property
    def kind_class(self) -> type[CacheKind]:
        return CACHE_KINDS.load(self.kind)

    def layout(self, n: int, c: int, row: tuple[int, ...]) -> Layout:
        """Shapes and dtypes of each array: n rows, each of `row` positions (() for one label)."""
        return self.kind_class.layout(n, c, row, self.k, self.dtype, self.draws)


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def compressors(codec: Codec) -> list[Any]:
    chain: list[Any] = []
    if codec.name == "blosc":
        chain.append(zc.BloscCodec(cname=codec.cname, clevel=codec.clevel, shuffle=codec.shuffle))
    elif codec.name == "zstd":
        chain.append(zc.ZstdCodec(level=codec.clevel))
    return [*chain, zc.Crc32cCodec()]


def root_attrs(
    spec: StoreSpec,
    num_classes: int,
    row_shapes: dict[str, list[int]],
    views: int,
    teacher_fp: str,
    dataset_fp: str,
    splits: dict[str, int],
) -> dict:
    sampled = spec.kind == "sampled"
    return {
        "format_version": FORMAT_VERSION,
        "kind": spec.kind,
        "k": spec.k,
        "dtype": spec.dtype,
        "num_classes": num_classes,
        "row_shape": row_shapes,
        "views": views,
        "teacher_fingerprint": teacher_fp,
        "dataset_fingerprint": dataset_fp,
        "codec": spec.codec.model_dump(),
        "chunk_rows": spec.chunk_rows,
        "sample_seed": spec.sample_seed if sampled else None,
        "sample_tau": float(spec.sample_tau) if sampled else None,
        "draws": spec.draws if sampled else None,
        "splits": splits,
        "kdsweep_version": __version__,
        "complete": False,
    }


Manifest = dict[str, dict[str, list[str]]]


def chunk_digest(data: bytes) -> str:
    """The digest of one chunk's stored (encoded) bytes: cheap, no decoding."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def chunk_file(store: Path, split: str, name: str, array: zarr.Array, i: int) -> Path:
    """The file of chunk `i` (whole rows, so chunk 0 along every other axis) of an array."""
    key = array.metadata.encode_chunk_key((i, *[0] * (array.ndim - 1)))
    return Path(store) / split / name / key


def build_manifest(store: Path) -> Manifest:
    """Every chunk digest of every array of every split of a written store, by chunk index."""
    root = zarr.open_group(store, mode="r")
    manifest: Manifest = {}
    for split in root.attrs["splits"]:
        group = root[split]
        manifest[split] = {
            name: [
                chunk_digest(chunk_file(store, split, name, arr, i).read_bytes())
                for i in range(arr.nchunks)
            ]
            for name, arr in sorted(group.arrays())
        }
    return manifest
