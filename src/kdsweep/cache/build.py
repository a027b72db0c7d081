"""The cache stage: run a trained teacher once over the splits into a store (the only teacher
forward passes of the pipeline), optionally over augmented views, and summarise the store."""

from __future__ import annotations

import json
import time
from pathlib import Path

from kdsweep.augment import apply_aug, draw_aug
from kdsweep.cache.format import StoreSpec
from kdsweep.cache.reader import LogitCache
from kdsweep.cache.summary import CacheSummary
from kdsweep.cache.writer import write_cache
from kdsweep.config import Params, ParamsError
from kdsweep.data.prepared import Prepared
from kdsweep.distributed import barrier
from kdsweep.io import load_checkpoint, report_work, weights_fingerprint
from kdsweep.teacher import teacher_model


def build_cache(
    p: Params,
    name: str,
    prep: Prepared,
    checkpoint: Path,
    out: Path,
    summary: Path,
    rank: int = 0,
    world: int = 1,
) -> None:
    """Run the teacher in `checkpoint` over the train and test splits into the store `out`
    (params `cache.stores.<name>`), and write its `summary` for the report."""
    store = p.cache.stores[name]
    model = teacher_model(p, prep)
    load_checkpoint(model, checkpoint)
    model.eval()
    sampled = store.kind == "sampled"  # read τ only where it means something (DVC tracks it)
    spec = StoreSpec(
        store.kind,
        store.dtype,
        store.k,
        p.cache.chunk_rows,
        p.cache.codec,
        store.sample_seed,
        store.tau if sampled else 1.0,
    )
    inputs = {"train": prep.splits.x_train, "test": prep.splits.x_test}
    t0 = time.perf_counter()
    views, augment = {}, None
    if p.cache.views > 1:
        if prep.splits.x_train.dim() != 4:
            raise ParamsError("cache.views > 1 needs image data (crop and flip views)")
        views = {"train": draw_aug(len(prep.splits.x_train), p.cache.views, p.cache.aug_seed)}
        augment = apply_aug
    write_cache(
        out,
        model,
        inputs,
        spec,
        prep.splits.num_classes,
        weights_fingerprint(checkpoint),
        prep.fingerprint,
        p.cache.batch_size,
        rank,
        world,
        barrier,
        views,
        augment,
    )
    if rank == 0:
        report_work("cache", time.perf_counter() - t0)
        write_summary(name, store.teacher, out, checkpoint.parent / "metrics.json", summary)


def write_summary(name: str, teacher: str, store: Path, metrics: Path, out: Path) -> None:
    """The size figures and teacher accuracy the report's cache table shows."""
    info = LogitCache(store).info()
    a = info["attributes"]
    acc = json.loads(metrics.read_text())[teacher]["test_acc"] if metrics.exists() else None
    CacheSummary(
        name=name,
        kind=a["kind"],
        k=a["k"],
        dtype=a["dtype"],
        teacher=teacher,
        bytes_on_disk=info["bytes_on_disk"],
        bytes_per_row=info["bytes_per_row"],
        compression_ratio=info["compression_ratio"],
        teacher_test_acc=acc,
        num_rows=sum(a["splits"].values()),
    ).write(out)
