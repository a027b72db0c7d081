"""What a student stage reads, and each student's share of it: the stage's paths
(`StageInputs`), its data loaded once per process (`StageData`: the prepared splits, the train
rows of its store or an online store's teacher, the reference store's test outputs), and one
student's training inputs, labels and teacher rows (`student_data`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kdsweep.cache.format import CacheError
from kdsweep.cache.reader import LogitCache
from kdsweep.config import Params, ParamsError
from kdsweep.data.prepared import Prepared, load_prepared
from kdsweep.io import (
    checkpoint_meta,
    load_checkpoint,
    tensors_fingerprint,
    weights_fingerprint,
)
from kdsweep.models import build_model
from kdsweep.registry import CACHE_KINDS, LOSSES
from kdsweep.students.plan import StudentJob
from kdsweep.targets import NO_TARGETS, TeacherTargets


def open_store(
    p: Params, name: str, path: Path, prep: Prepared, checkpoint: Path | None = None
) -> LogitCache:
    """A cache store, checked against the prepared dataset and, given its teacher's
    `checkpoint`, against that teacher's weights fingerprint. (The reference store, read for its
    test outputs only, is checked against the dataset: DVC cannot name its teacher's checkpoint
    as a dependency of another store's stage, and its own stages checked it.)"""
    fingerprint = weights_fingerprint(checkpoint) if checkpoint is not None else None
    cache = LogitCache(path, fingerprint, prep.fingerprint)
    spec = p.cache.stores[name]
    if cache.kind == "sampled" and (cache.attrs["sample_tau"], cache.attrs["draws"]) != (
        spec.tau,
        spec.draws,
    ):
        raise CacheError(
            f"{path} holds {cache.attrs['draws']} draw sets at tau={cache.attrs['sample_tau']}, "
            f"but cache.stores.{name} asks for {spec.draws} at tau={spec.tau}: re-run its cache "
            f"stage (`dvc repro cache@{name}`)"
        )
    return cache


def online_teacher(p: Params, name: str, checkpoint: Path, prep: Prepared) -> nn.Module:
    """The teacher of online store `name`, from its checkpoint (which `open_store` checked
    against the store's teacher fingerprint)."""
    t, s = p.teachers[p.cache.stores[name].teacher], prep.splits
    model = build_model(t.arch, tuple(s.x_train.shape[1:]), s.num_classes, t.width)
    load_checkpoint(model, checkpoint)  # its weights loaded: no teacher training code here
    return model.eval()


def student_data(
    job: StudentJob, prep: Prepared, targets: TeacherTargets, val_fraction: float
) -> tuple[torch.Tensor, torch.Tensor, TeacherTargets]:
    """The student's training inputs, labels and teacher rows (its subset less the validation
    rows): a control transforms the teacher rows here, a teacher-label student takes their
    argmax as its labels."""
    idx, _ = prep.split(job.alpha, job.subset_seed, val_fraction)
    s = prep.splits
    x, y, t = s.x_train[idx], s.y_train[idx], targets.rows(idx)
    loss = LOSSES[job.m.loss]
    if loss.is_control or loss.labels == "teacher":
        if t.kind != "full":
            raise ParamsError(
                f"method {job.method} ({job.m.loss}) needs a full cache, got {t.kind}"
            )
        logits = t.tensors["logits"]
        flat = logits.flatten(0, -2)  # one row per position or view
        per_row = (
            y.flatten() if y.numel() == len(flat) else y.repeat_interleave(len(flat) // len(y))
        )
        transform = LOSSES.load(job.m.loss)
        t = TeacherTargets(
            "full",
            {
                **t.tensors,
                "logits": transform(flat, per_row, job.m.epsilon, job.seed, job.tau).reshape(
                    logits.shape
                ),
            },
        )
    if loss.labels == "teacher":
        y = CACHE_KINDS.load(t.kind).top1(t)
    if loss.distill is None:
        t = TeacherTargets(None, {k: v for k, v in t.tensors.items() if k == "aug"})
    return x, y, t


@dataclass(frozen=True)
class StageInputs:
    """What a student stage reads, as the paths dvc.yaml names: a Dask worker opens them itself
    (shared storage) instead of receiving the data from the client."""

    prepared: Path
    reference: Path  # the cache.reference store: test agreement and KL
    store: str | None = None  # the store the students read; None: students of labels only
    logits: Path | None = None  # that store's Zarr path
    checkpoint: Path | None = None  # its teacher's weights (run on every batch by an online store)


@dataclass
class StageData:
    """A stage's inputs in memory, loaded once per process: the prepared data, the train rows of
    its store (or, with augmented views, the views for students of labels), the reference
    store's test outputs (top-1, logits from a full cache), and the fingerprints of all three;
    `fresh`: its students see a fresh augmented view every step; `teacher`: the network an
    online store runs on every batch (None for a cache)."""

    prep: Prepared
    train: TeacherTargets
    ref_test: tuple[torch.Tensor, torch.Tensor | None]
    fingerprints: dict[str, str | None]
    fresh: bool = False
    teacher: nn.Module | None = None
    teacher_params: int | None = None  # parameters of its store's teacher (capacity figure)


_LOADED: dict[tuple[str, StageInputs, str], StageData] = {}


def stage_data(p: Params, inputs: StageInputs, run: str) -> StageData:
    """The stage's inputs, read once per stage run `run` (a token the stage draws): a Dask worker
    keeps them across that run's stacks, and never serves a later run stale files."""
    key = (p.model_dump_json(), inputs, run)
    if key not in _LOADED:
        _LOADED.clear()  # one stage's data at a time
        _LOADED[key] = _load(p, inputs)
    return _LOADED[key]


def _load(p: Params, inputs: StageInputs) -> StageData:
    prep = load_prepared(inputs.prepared)
    ref = open_store(p, p.cache.reference, inputs.reference, prep)
    t = ref.read("test")
    ref_test = (CACHE_KINDS.load(t.kind).top1(t), t.tensors.get("logits"))
    train, fresh, teacher, teacher_size, weights = NO_TARGETS, False, None, None, None
    if inputs.store is None and p.methods_reading(None):
        # students of labels see the inputs of the reference store's students: its cached
        # views (each with its true label), fresh views, or the clean rows
        fresh = p.cache.stores[p.cache.reference].views == "fresh"
        if ref.attrs["views"] > 1:
            train = TeacherTargets(None, {"aug": ref.read("train").tensors["aug"]})
    if inputs.store is not None and p.methods_reading(inputs.store):
        if inputs.checkpoint is None:
            raise ParamsError(f"store {inputs.store!r}: give its teacher's checkpoint")
        store = open_store(p, inputs.store, inputs.logits, prep, inputs.checkpoint)
        size = checkpoint_meta(inputs.checkpoint).get("n_params")
        teacher_size = int(size) if size is not None else None
        if store.kind == "online":
            teacher = online_teacher(p, inputs.store, inputs.checkpoint, prep)
            weights = store.attrs["teacher_fingerprint"]  # open_store checked the checkpoint
            fresh = p.cache.stores[inputs.store].views == "fresh"
            train = TeacherTargets("online", {})
        else:
            train = store.read("train")
    ref_tensors = {
        "top1": ref_test[0],
        **({"logits": ref_test[1]} if ref_test[1] is not None else {}),
    }
    fingerprints = {
        "data": prep.fingerprint,
        "train": tensors_fingerprint(train.tensors) if train.tensors else None,
        "teacher": weights,
        "reference": tensors_fingerprint(ref_tensors),
    }
    return StageData(prep, train, ref_test, fingerprints, fresh, teacher, teacher_size)
