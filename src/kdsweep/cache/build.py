"""The cache stage: run a trained teacher once over the splits into a store (the only teacher
forward passes of the pipeline), optionally over augmented views, and summarise the store with
the teacher-target diagnostics the report shows (kdsweep.report.diagnostics)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from kdsweep.augment import family_for
from kdsweep.cache.format import StoreSpec
from kdsweep.cache.reader import LogitCache
from kdsweep.cache.summary import CacheSummary
from kdsweep.cache.writer import write_cache
from kdsweep.config import Params
from kdsweep.data.prepared import Prepared
from kdsweep.distributed import barrier
from kdsweep.io import load_checkpoint, report_work, weights_fingerprint
from kdsweep.teacher import rank_device, teacher_metrics, teacher_model
from kdsweep.train import accuracy, predict

# Diagnostics cover the first rows of the training split (class-interleaved by prepare) up to
# this many teacher outputs per view, so they cost a fraction of the cache on large datasets.
DIAGNOSTIC_OUTPUTS = 4096
# Temperatures the soft-target statistics are stored at: quarter octaves from 1/2 to 128. The
# report interpolates in log τ at the τ its students used, so the cache stage need not depend on
# the methods (changing a method never re-runs a teacher forward pass).
TAU_GRID = [2 ** (i / 4) for i in range(-4, 29)]
DIAGNOSTIC_VIEWS = 4  # fresh views per row the diagnostics of an online store's teacher label


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
    model = teacher_model(p.teachers[store.teacher], prep)
    load_checkpoint(model, checkpoint)
    device = rank_device(p.teachers[store.teacher].device, rank)
    model.to(device).eval()
    sampled, online = store.kind == "sampled", store.kind == "online"
    spec = StoreSpec(
        store.kind,
        "float32" if online else store.dtype,
        store.k,
        p.cache.chunk_rows,
        p.cache.codec,
        store.sample_seed,
        store.tau if sampled else 1.0,  # read τ and draws only where they mean something
        store.draws if sampled else 1,
    )
    s = prep.splits
    # an online store's students run the teacher themselves: it keeps the test split only
    inputs = {"test": s.x_test} if online else {"train": s.x_train, "test": s.x_test}
    t0 = time.perf_counter()
    views, augment = {}, None
    if isinstance(store.views, int) and store.views > 1:
        family = family_for(s.x_train)
        views = {"train": family.draw(len(s.x_train), store.views, p.cache.aug_seed)}
        augment = family.apply
    write_cache(
        out,
        model,
        inputs,
        spec,
        s.num_classes,
        weights_fingerprint(checkpoint),
        prep.fingerprint,
        p.cache.batch_size,
        rank,
        world,
        barrier,
        views,
        augment,
        device,
    )
    if rank == 0:
        report_work("cache", time.perf_counter() - t0)
        aug = views.get("train")
        if store.views == "fresh":  # a sample of the fresh views its students will see
            aug = family_for(s.x_train).draw(len(s.x_train), DIAGNOSTIC_VIEWS, p.cache.aug_seed)
        diagnostics = teacher_diagnostics(model, s.x_train, s.y_train, aug, p.cache.batch_size)
        metrics = teacher_metrics(checkpoint)
        write_summary(name, store.teacher, out, metrics, summary, diagnostics, store.views)


@torch.no_grad()
def teacher_diagnostics(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    aug: torch.Tensor | None,
    batch_size: int,
) -> dict[str, Any]:
    """How good and how soft the teacher's targets are, on the first training rows (up to
    DIAGNOSTIC_OUTPUTS outputs per view) and, with `aug`, on their cached views.

    Returns the teacher's accuracy on the clean rows and on the views, and at each τ of
    TAU_GRID the mean target probability p_T^τ(y) and the mean entropy of p_T^τ over log C
    (1: uniform), both over the rows the students read (the views when there are some).
    """
    n = min(len(x), max(1, DIAGNOSTIC_OUTPUTS // y[0].numel()))
    x, y = x[:n], y[:n]
    clean = predict(model, x, batch_size)
    out: dict[str, Any] = {"diagnostic_rows": n, "teacher_train_acc": accuracy(clean, y)}
    z, labels = clean, y
    if aug is not None:
        apply = family_for(x).apply
        z = torch.stack(
            [predict(model, apply(x, aug[:n, v]), batch_size) for v in range(aug.shape[1])], 1
        )
        labels = y[:, None].expand(n, aug.shape[1])
        out["teacher_view_acc"] = accuracy(z, labels)
    z, labels = z.flatten(0, -2), labels.flatten()
    log_c = math.log(z.shape[-1])
    curve = []
    for tau in TAU_GRID:
        log_p = torch.log_softmax(z / tau, dim=-1)
        p_y = float(log_p.gather(1, labels[:, None]).exp().mean())
        entropy = float(-(log_p.exp() * log_p).sum(-1).mean())
        curve.append([tau, p_y, entropy / log_c])
    return out | {"num_classes": z.shape[-1], "soft_targets": curve}


def write_summary(
    name: str,
    teacher: str,
    store: Path,
    metrics: Path,  # the teacher stage's metrics of `teacher`
    out: Path,
    diagnostics: dict[str, Any] | None = None,
    views: int | str = 1,
) -> None:
    """The size figures, teacher accuracy and teacher-target `diagnostics` (teacher_diagnostics)
    the report's cache and diagnostics tables show."""
    info = LogitCache(store).info()
    a = info["attributes"]
    scores = json.loads(metrics.read_text()) if metrics.exists() else {}
    CacheSummary(
        name=name,
        kind=a["kind"],
        k=a["k"],
        dtype=a["dtype"],
        teacher=teacher,
        bytes_on_disk=info["bytes_on_disk"],
        bytes_per_row=info["bytes_per_row"],
        compression_ratio=info["compression_ratio"],
        teacher_test_acc=scores.get("test_acc"),
        teacher_test_ppl=scores.get("test_ppl"),
        num_rows=sum(a["splits"].values()),
        views=views,
        draws=a["draws"] or 1,
        train_bytes_per_row=info["train_bytes_per_row"],
        **(diagnostics or {}),
    ).write(out)
