"""The teacher stages: train each teacher of `teachers:` once on the full training split (α=1)
and save its checkpoint and metrics. `teacher_model` builds the same network for the cache
stage and for online students. A teacher with `head: random` is trained the same way and then
has its last layer re-initialised (the `random_head` control).

With `teacher.augment` the teacher trains on fresh random views (kdsweep.augment: crop/flip for
images, shift/scale/noise for MNIST-1D), the family the cache's views are drawn from: a teacher
trained on clean inputs only can be right on its test inputs yet wrong on many of its own cached
views, and KD students learn that.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kdsweep.augment import family_for, fresh_views
from kdsweep.config import Params, TeacherParams
from kdsweep.data.prepared import Prepared
from kdsweep.io import (
    atomic_write_json,
    report_work,
    save_checkpoint,
    weights_fingerprint,
)
from kdsweep.metrics import evaluate
from kdsweep.models import build_model, n_params, reinit_head
from kdsweep.softmax import cross_entropy
from kdsweep.train import BatchFn, fit, num_steps, pick_device, predict


def teacher_model(t: TeacherParams, prep: Prepared) -> torch.nn.Module:
    """Teacher `t`'s network for the prepared data, initialised from its seed."""
    s = prep.splits
    torch.manual_seed(t.seed)
    return build_model(t.arch, tuple(s.x_train.shape[1:]), s.num_classes, t.width)


def train_teacher(
    p: Params, name: str, prep: Prepared, out: Path, rank: int = 0, world: int = 1
) -> dict[str, Any]:
    """Train teacher `name` of `teachers:` on the full training split (α=1); save its weights to
    `out` (safetensors) and its metrics beside them (`out` with suffix .json: test accuracy,
    parameter count, weights fingerprint).

    Under torchrun (`world > 1`) the model is wrapped in DistributedDataParallel and each rank
    trains on its own equal shard of the training split; rank 0 saves.
    """
    s, t = prep.splits, p.teachers[name]
    device = rank_device(t.device, rank)
    model = teacher_model(t, prep).to(device)
    shard = len(s.y_train) // world
    x = s.x_train[rank * shard : (rank + 1) * shard].to(device)
    y = s.y_train[rank * shard : (rank + 1) * shard].to(device)
    steps = num_steps("epochs", t.epochs, len(y), t.batch_size)
    net = model if world == 1 else torch.nn.parallel.DistributedDataParallel(model)
    seconds = fit(
        net,
        x,
        lambda z, i: cross_entropy(z.flatten(0, -2), y[i].flatten()),
        steps,
        t.batch_size,
        t.lr,
        t.weight_decay,
        t.seed + rank,
        desc=f"teacher {name}",
        batch=fresh_batches(x, t.seed + rank) if t.augment else None,
    )
    model = model.cpu()
    if rank != 0:
        return {}
    report_work("train", seconds)
    if t.head == "random":
        reinit_head(model, t.seed + 1)
    out = Path(out)
    meta = {"arch": t.arch, "dataset_fingerprint": prep.fingerprint, "n_params": n_params(model)}
    save_checkpoint(model, out, {k: str(v) for k, v in meta.items()})
    score = evaluate(predict(model, s.x_test), s.y_test)
    metrics: dict[str, Any] = {
        "train_seconds": seconds,
        "steps": steps,
        "test_acc": score["test_acc"],
        "n_params": n_params(model),
        "fingerprint": weights_fingerprint(out),
    }
    if s.tokenizer_json is not None:  # a language model: students must beat its perplexity
        metrics["test_ppl"] = score["test_ppl"]
    atomic_write_json(teacher_metrics(out), metrics)
    return metrics


def teacher_metrics(checkpoint: Path) -> Path:
    """Where the teacher stage writes the metrics of the teacher saved at `checkpoint`."""
    return Path(checkpoint).with_suffix(".json")


def fresh_batches(x: torch.Tensor, seed: int) -> BatchFn:
    """Each step's inputs as one fresh random view per row (the data's augmentation family, the
    one caches and online students draw from); the loss context stays the row ids."""
    family_for(x)  # refuses data without a family before any training
    gen = torch.Generator().manual_seed(seed)

    def batch(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return fresh_views(x[idx], gen), idx

    return batch


def rank_device(name: str, rank: int) -> torch.device:
    """The device of process `rank` (0 alone): under torchrun each rank takes its own GPU."""
    device = pick_device(name)
    return (
        torch.device("cuda", rank % torch.cuda.device_count()) if device.type == "cuda" else device
    )
