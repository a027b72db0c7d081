"""The teacher stage: train the teacher once on the full training split (α=1) and save it with
its random-head control. `teacher_model` builds the same network for the cache stage.

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
from kdsweep.config import Params
from kdsweep.data.prepared import Prepared
from kdsweep.io import (
    atomic_write_json,
    report_work,
    save_checkpoint,
    weights_fingerprint,
)
from kdsweep.metrics import evaluate
from kdsweep.models import build_model, reinit_head
from kdsweep.registry import TEACHERS
from kdsweep.train import BatchFn, fit, num_steps, pick_device, predict


def teacher_model(p: Params, prep: Prepared) -> torch.nn.Module:
    s = prep.splits
    torch.manual_seed(p.teacher.seed)
    return build_model(p.teacher.arch, tuple(s.x_train.shape[1:]), s.num_classes, p.teacher.width)


def train_teacher(
    p: Params, prep: Prepared, out_dir: Path, rank: int = 0, world: int = 1
) -> dict[str, Any]:
    """Train the teacher on the full training split (α=1); save `<out_dir>/<id>.safetensors` for
    every id of TEACHERS (the teacher and its random-head control) and `metrics.json`.

    Under torchrun (`world > 1`) the model is wrapped in DistributedDataParallel and each rank
    trains on its own equal shard of the training split; rank 0 saves.
    """
    s, t = prep.splits, p.teacher
    device = rank_device(t.device, rank)
    model = teacher_model(p, prep).to(device)
    shard = len(s.y_train) // world
    x = s.x_train[rank * shard : (rank + 1) * shard].to(device)
    y = s.y_train[rank * shard : (rank + 1) * shard].to(device)
    steps = num_steps("epochs", t.epochs, len(y), t.batch_size)
    net = model if world == 1 else torch.nn.parallel.DistributedDataParallel(model)
    seconds = fit(
        net,
        x,
        lambda z, i: torch.nn.functional.cross_entropy(
            z.flatten(0, -2), y[i].flatten(), reduction="none"
        ),
        steps,
        t.batch_size,
        t.lr,
        t.weight_decay,
        t.seed + rank,
        desc="teacher",
        batch=fresh_batches(x, t.seed + rank) if t.augment else None,
    )
    model = model.cpu()
    if rank != 0:
        return {}
    report_work("train", seconds)
    metrics: dict[str, Any] = {"train_seconds": seconds, "steps": steps}
    for tid in TEACHERS:
        if tid == "random_head":
            reinit_head(model, t.seed + 1)
        path = Path(out_dir) / f"{tid}.safetensors"
        save_checkpoint(model, path, {"arch": t.arch, "dataset_fingerprint": prep.fingerprint})
        score = evaluate(predict(model, s.x_test), s.y_test)
        metrics[tid] = {"test_acc": score["test_acc"], "fingerprint": weights_fingerprint(path)}
        if s.tokenizer_json is not None:  # a language model: students must beat its perplexity
            metrics[tid]["test_ppl"] = score["test_ppl"]
    atomic_write_json(Path(out_dir) / "metrics.json", metrics)
    return metrics


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
