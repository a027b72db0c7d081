"""Writing a cache store: the teacher's outputs over every split, chunk by chunk, resumable,
atomic (renamed into place when complete), optionally by several torchrun ranks at once."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import zarr
from filelock import FileLock, Timeout
from tqdm import tqdm

from kdsweep.cache.format import (
    CacheError,
    StoreSpec,
    build_manifest,
    compressors,
    partial_path,
    root_attrs,
)
from kdsweep.io import atomic_write_json, remove_stale_temps


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
    device: torch.device | str = "cpu",
) -> None:
    """Run `teacher` (inputs on `device` -> float32 logits) over every split and store its
    outputs.

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
    partial = partial_path(path)
    splits = {name: len(x) for name, x in inputs.items()}
    views = views or {}

    def outputs(split: str, lo: int, hi: int) -> torch.Tensor:
        x = inputs[split][lo:hi].to(device)
        if split not in views:
            return teacher(x).float().cpu()
        assert augment is not None, "views need an augment function"
        aug = views[split][lo:hi].to(device)
        z = [teacher(augment(x, aug[:, v])).float() for v in range(aug.shape[1])]
        return torch.stack(z, 1).cpu()

    with torch.no_grad():  # positions per row: () for a classifier, (L,) a sequence, (V,) views
        row_shapes = {s: list(outputs(s, 0, 1).shape[1:-1]) for s in inputs}
    n_views = max([1, *(int(v.shape[1]) for v in views.values())])
    attrs = root_attrs(
        spec, num_classes, row_shapes, n_views, teacher_fingerprint, dataset_fingerprint, splits
    )
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
        kind = spec.kind_class
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
                gen = torch.Generator().manual_seed(seed)
                for name, arr in kind.encode(
                    logits, spec.k, spec.dtype, gen, tau=spec.sample_tau, draws=spec.draws
                ).items():
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
            _remove_dead_writers_temps(partial)
            return
        shutil.rmtree(partial)  # a leftover from other params or another teacher: restart
    root = zarr.open_group(partial, mode="w")
    for split, n in attrs["splits"].items():
        g = root.create_group(split)
        g.attrs.update({"split": split, "num_rows": n})
        layout = spec.layout(n, num_classes, tuple(attrs["row_shape"][split]))
        if split in aug_shapes:
            layout["aug"] = (aug_shapes[split], np.dtype(np.int16))
        for name, (shape, dt) in layout.items():
            chunks = (spec.chunk_rows, *shape[1:])
            g.create_array(
                name,
                shape=shape,
                chunks=chunks,
                dtype=dt,
                compressors=compressors(spec.codec),
                fill_value=0,
            )
    root.attrs.update(attrs)


# zarr's LocalStore writes each file through `<file minus suffix>.<uuid4 hex>.partial`
_ZARR_TEMP = re.compile(r".+\.[0-9a-f]{32}\.partial")


def _remove_dead_writers_temps(partial: Path) -> None:
    """Before resuming, remove what a killed writer left in the partial store: the temporaries of
    its progress records (`.progress.<rank>.json.tmp<pid>`, pid no longer alive) and zarr's own
    half-written chunk files. Called by rank 0 under the writer lock, before any rank of this
    run writes, so zarr temporaries are all stale; left in place they would end up in the
    finished store and make it differ, file for file, from an uninterrupted one."""
    remove_stale_temps(partial)
    for f in partial.rglob("*.partial"):
        if _ZARR_TEMP.fullmatch(f.name) and f.is_file():
            f.unlink(missing_ok=True)


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
    partial = partial_path(path)
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
    for f in partial.glob(".progress.*.json.tmp*"):  # every rank is done: any temporary is stale
        f.unlink(missing_ok=True)
    root.attrs["manifest"] = build_manifest(partial)
    root.attrs["complete"] = True
    if path.exists():
        shutil.rmtree(path)
    os.replace(partial, path)
