"""What each DVC stage does, as functions of validated params (stages/*.py and the CLI call these).

Paths (all under data/, owned by DVC):
  prepared/                         splits, nested subset orders, meta.json      (prepare)
  teachers/<id>.safetensors         teacher weights; `random_head` is the control  (teacher)
  teachers/metrics.json             teacher test accuracy and fingerprints
  logits/<store>.zarr, <store>.json cache store and its size summary              (cache@<store>)
  students/<alpha>-<method>/runs.json  one row per student                        (student@…)
"""

from __future__ import annotations

import itertools
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdsweep.cache import CacheSplit, LogitCache, StoreSpec, write_cache
from kdsweep.config import MethodParams, Params, ParamsError, all_alphas, params_hash
from kdsweep.data import Prepared, build_splits, load_prepared, write_prepared
from kdsweep.distributed import barrier
from kdsweep.io import atomic_write_json, load_checkpoint, save_checkpoint, weights_fingerprint
from kdsweep.losses import KD_LOSSES, control_targets, student_loss
from kdsweep.models import build_model, reinit_head
from kdsweep.train import evaluate, fit, num_steps, pick_device, predict

DATA = Path("data")
PREPARED = DATA / "prepared"
TEACHERS = DATA / "teachers"
LOGITS = DATA / "logits"
STUDENTS = DATA / "students"
TEACHER_IDS = ("main", "random_head")


def teacher_path(teacher_id: str) -> Path:
    return TEACHERS / f"{teacher_id}.safetensors"


def store_path(name: str) -> Path:
    return LOGITS / f"{name}.zarr"


def git_rev() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def prepare(p: Params) -> None:
    write_prepared(PREPARED, build_splits(p.data), p.subset_seeds)


def _teacher_model(p: Params, prep: Prepared) -> torch.nn.Module:
    s = prep.splits
    torch.manual_seed(p.teacher.seed)
    return build_model(p.teacher.arch, tuple(s.x_train.shape[1:]), s.num_classes, p.teacher.width)


def train_teacher(p: Params, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """Train the teacher on the full training split (α=1); save it and its random-head control.

    Under torchrun (`world > 1`) the model is wrapped in DistributedDataParallel and each rank
    trains on its own equal shard of the training split; rank 0 saves.
    """
    prep = load_prepared(PREPARED)
    s, t = prep.splits, p.teacher
    device = pick_device(t.device) if world == 1 else _rank_device(t.device, rank)
    model = _teacher_model(p, prep).to(device)
    shard = len(s.y_train) // world
    x = s.x_train[rank * shard : (rank + 1) * shard].to(device)
    y = s.y_train[rank * shard : (rank + 1) * shard].to(device)
    steps = num_steps("epochs", t.epochs, len(y), t.batch_size)
    net = model if world == 1 else torch.nn.parallel.DistributedDataParallel(model)
    seconds = fit(
        net,
        x,
        lambda z, i: student_loss("ce", z, y[i], None, 0.0, 1.0, 0.0)[0],
        steps,
        t.batch_size,
        t.lr,
        t.weight_decay,
        t.seed + rank,
        desc="teacher",
    )
    model = model.cpu()
    if rank != 0:
        return {}
    metrics: dict[str, Any] = {"train_seconds": seconds, "steps": steps}
    for tid in TEACHER_IDS:
        if tid == "random_head":
            reinit_head(model, t.seed + 1)
        save_checkpoint(
            model, teacher_path(tid), {"arch": t.arch, "dataset_fingerprint": prep.fingerprint}
        )
        acc = evaluate(predict(model, s.x_test), s.y_test, None)["test_acc"]
        metrics[tid] = {"test_acc": acc, "fingerprint": weights_fingerprint(teacher_path(tid))}
    atomic_write_json(TEACHERS / "metrics.json", metrics)
    return metrics


def _rank_device(name: str, rank: int) -> torch.device:
    device = pick_device(name)
    return (
        torch.device("cuda", rank % torch.cuda.device_count()) if device.type == "cuda" else device
    )


def load_teacher(p: Params, teacher_id: str) -> tuple[torch.nn.Module, str]:
    """The teacher network and its weights fingerprint. Only the `cache` stage calls this."""
    prep_meta = load_prepared(PREPARED)
    model = _teacher_model(p, prep_meta)
    load_checkpoint(model, teacher_path(teacher_id))
    return model.eval(), weights_fingerprint(teacher_path(teacher_id))


def build_cache(p: Params, name: str, rank: int = 0, world: int = 1) -> None:
    """Run one teacher over the train and test splits into the store `name` (the only teacher forward)."""
    store = p.cache.stores[name]
    prep = load_prepared(PREPARED)
    model, teacher_fp = load_teacher(p, store.teacher)
    spec = StoreSpec(
        store.kind, store.dtype, store.k, p.cache.chunk_rows, p.cache.codec, store.sample_seed
    )
    inputs = {"train": prep.splits.x_train, "test": prep.splits.x_test}
    views, augment = {}, None
    if p.cache.views > 1:
        from kdsweep.vision import apply_aug, draw_aug

        if prep.splits.x_train.dim() != 4:
            raise ParamsError("cache.views > 1 needs image data (crop and flip views)")
        views = {"train": draw_aug(len(prep.splits.x_train), p.cache.views, p.cache.aug_seed)}
        augment = apply_aug
    write_cache(
        store_path(name),
        model,
        inputs,
        spec,
        prep.splits.num_classes,
        teacher_fp,
        prep.fingerprint,
        p.cache.batch_size,
        rank,
        world,
        barrier,
        views,
        augment,
    )
    if rank == 0:
        write_cache_summary(p, name)


def write_cache_summary(p: Params, name: str) -> None:
    info = LogitCache(store_path(name)).info()
    a = info["attributes"]
    teacher_acc = TEACHERS / "metrics.json"
    acc = None
    if teacher_acc.exists():
        import json

        acc = json.loads(teacher_acc.read_text())[p.cache.stores[name].teacher]["test_acc"]
    atomic_write_json(
        LOGITS / f"{name}.json",
        {
            "name": name,
            "kind": a["kind"],
            "k": a["k"],
            "dtype": a["dtype"],
            "teacher": p.cache.stores[name].teacher,
            "bytes_on_disk": info["bytes_on_disk"],
            "bytes_per_row": info["bytes_per_row"],
            "compression_ratio": info["compression_ratio"],
            "teacher_test_acc": acc,
            "num_rows": sum(a["splits"].values()),
        },
    )


@dataclass(frozen=True)
class StudentJob:
    """One student: the recipe, the subset and the seed."""

    method: str
    m: MethodParams
    tau: float
    alpha: float
    subset_seed: int
    train_seed: int

    @property
    def seed(self) -> int:
        """Initialisation and data-order seed: distinct for every (subset seed, train seed)."""
        return 1000 * self.subset_seed + self.train_seed


def student_jobs(p: Params, alpha: float, method: str) -> list[StudentJob]:
    m = p.methods[method]
    return [
        StudentJob(method, m, tau, alpha, s, r)
        for s, r, tau in itertools.product(p.subset_seeds, p.student.train_seeds, m.taus)
    ]


def open_caches(p: Params, method: str, prep: Prepared) -> tuple[LogitCache, LogitCache]:
    """The method's cache and the reference cache, both checked against teacher and dataset."""

    def open_store(name: str) -> LogitCache:
        tid = p.cache.stores[name].teacher
        return LogitCache(
            store_path(name), weights_fingerprint(teacher_path(tid)), prep.fingerprint
        )

    return open_store(p.store_of(method)), open_store(p.cache.reference)


def train_students(p: Params, alpha: float, method: str) -> list[dict[str, Any]]:
    """Train every student of one (α, method): all subset seeds × train seeds × τ variants."""
    prep = load_prepared(PREPARED)
    m = p.methods[method]
    cache, ref = open_caches(p, method, prep)
    train_targets = cache.read("train") if m.uses_teacher else CacheSplit("none", {})
    ref_test = ref.read("test")
    device = pick_device(p.student.device)
    phash = params_hash(p.data, p.student, m, p.cache.stores[p.store_of(method)])
    rev = git_rev()
    rows = []
    for job in student_jobs(p, alpha, method):
        rows.append(
            train_one(p, job, prep, train_targets, ref_test, device)
            | {"params_hash": phash, "git_rev": rev}
        )
    return rows


def subset_targets(
    job: StudentJob, prep: Prepared, targets: CacheSplit
) -> tuple[torch.Tensor, torch.Tensor, CacheSplit]:
    """The student's inputs, labels and teacher rows: controls transform the teacher rows here."""
    idx = prep.subset(job.alpha, job.subset_seed)
    s = prep.splits
    x, y, t = s.x_train[idx], s.y_train[idx], targets.rows(idx)
    loss = job.m.loss
    if loss in KD_LOSSES and loss != "kd" or loss == "top1_teacher":
        if t.kind != "full":
            raise ParamsError(f"method {job.method} ({loss}) needs a full cache, got {t.kind}")
    if loss in KD_LOSSES and loss != "kd":
        seed = 1000 * job.subset_seed + job.train_seed
        logits = t.tensors["logits"]
        flat = logits.flatten(0, -2)  # one row per position or view
        per_row = (
            y.flatten() if y.numel() == len(flat) else y.repeat_interleave(len(flat) // len(y))
        )
        controlled = control_targets(loss, flat, per_row, job.m.epsilon, seed).reshape(logits.shape)
        t = CacheSplit("full", {**t.tensors, "logits": controlled})
    if loss == "top1_teacher":
        y = t.tensors["logits"].argmax(-1)
    return x, y, t


class Batches:
    """Each step's inputs, labels and teacher rows for the sampled row ids.

    With a cache of augmented views (an `aug` array), every sample of a step gets one of its
    cached views at random: the input is that view replayed from its stored parameters and the
    target is the teacher's output for exactly that view — never a fresh augmentation, never a
    transformed target.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, t: CacheSplit, seed: int):
        self.x, self.y = x, y
        self.aug = t.tensors.get("aug")
        self.t = CacheSplit(t.kind, {k: v for k, v in t.tensors.items() if k != "aug"})
        self.gen = torch.Generator().manual_seed(seed)
        self.view = torch.zeros(0, dtype=torch.long)

    def inputs(self, idx: torch.Tensor) -> torch.Tensor:
        if self.aug is None:
            return self.x[idx]
        from kdsweep.vision import apply_aug

        self.view = torch.randint(0, self.aug.shape[1], (len(idx),), generator=self.gen).to(
            idx.device
        )
        return apply_aug(self.x[idx], self.aug[idx, self.view])

    def _pick(self, rows: torch.Tensor) -> torch.Tensor:
        return (
            rows
            if self.aug is None
            else rows[torch.arange(len(rows), device=rows.device), self.view]
        )

    def labels(self, idx: torch.Tensor) -> torch.Tensor:
        y = self.y[idx]
        return self._pick(y) if self.aug is not None and y.dim() == 2 else y

    def targets(self, idx: torch.Tensor) -> CacheSplit:
        rows = self.t.rows(idx)
        return CacheSplit(rows.kind, {k: self._pick(v) for k, v in rows.tensors.items()})


def train_one(
    p: Params,
    job: StudentJob,
    prep: Prepared,
    targets: CacheSplit,
    ref_test: CacheSplit,
    device: torch.device,
) -> dict[str, Any]:
    x, y, t = subset_targets(job, prep, targets)
    x, y, t = x.to(device), y.to(device), t.to(device)
    st = p.student
    torch.manual_seed(job.seed)
    model = build_model(st.arch, tuple(x.shape[1:]), prep.splits.num_classes, st.width).to(device)
    steps = num_steps(st.budget.mode, st.budget.value, len(y), st.batch_size)
    m = job.m
    neg = torch.zeros((), device=device)
    terms = 0
    batches = Batches(x, y, t, job.seed)

    def loss_fn(z: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        nonlocal neg, terms
        total, d = student_loss(
            m.loss, z, batches.labels(i), batches.targets(i), m.lam, job.tau, m.epsilon, m.topk_mode
        )
        neg += (d < 0).sum()
        terms += d.numel()
        return total

    seconds = fit(
        model,
        x,
        loss_fn,
        steps,
        st.batch_size,
        st.lr,
        st.weight_decay,
        job.seed,
        desc=f"{job.method} α={job.alpha:g} s={job.subset_seed}",
        inputs=batches.inputs,
    )
    model = model.cpu()
    metrics = evaluate(predict(model, prep.splits.x_test), prep.splits.y_test, ref_test)
    n_seen = steps * min(st.batch_size, len(y))
    store = p.cache.stores[p.store_of(job.method)]
    uses_teacher = m.uses_teacher
    return {
        "run_id": uuid.uuid5(uuid.NAMESPACE_URL, f"{job}").hex[:12],
        "dataset": p.data.name,
        "task": p.data.task,
        "teacher_id": store.teacher if uses_teacher else None,
        "teacher_arch": p.teacher.arch,
        "student_arch": st.arch,
        "method": job.method,
        "loss": m.loss,
        "lam": m.lam if m.loss in (*KD_LOSSES, "logit_mse") else None,
        "tau": job.tau if m.loss in KD_LOSSES else None,
        "epsilon": m.epsilon if m.loss in ("ls", "ls_teacher") else None,
        "cache_name": p.store_of(job.method) if uses_teacher else None,
        "cache_kind": store.kind if uses_teacher else None,
        "k": store.k if uses_teacher else None,
        "topk_mode": m.topk_mode if uses_teacher and store.kind == "topk" else None,
        "alpha": job.alpha,
        "n_train": len(y),
        "subset_seed": job.subset_seed,
        "train_seed": job.train_seed,
        "budget_mode": st.budget.mode,
        "epochs": n_seen / len(y),
        "steps": steps,
        "test_acc": metrics["test_acc"],
        "test_error": metrics["test_error"],
        "test_ppl": metrics["test_ppl"] if p.data.task == "lm" else None,
        "agreement": metrics["agreement"],
        "test_kl": metrics["test_kl"],
        "ece": metrics["ece"],
        "neg_kl_frac": float(neg) / terms if uses_teacher else None,
        "train_seconds": seconds,
    }


def run_student_stage(p: Params, alpha: float, method: str, out_dir: Path) -> Path:
    """Train all students of one (α, method) and write `out_dir/runs.json` atomically."""
    if method not in p.methods:
        raise ParamsError(
            f"method {method!r} is not in params.yaml methods ({', '.join(p.methods)})"
        )
    if alpha not in all_alphas(p):
        raise ParamsError(
            f"alpha {alpha} is in neither alphas nor sweep.ablation_alphas {all_alphas(p)}"
        )
    out = Path(out_dir) / "runs.json"
    atomic_write_json(out, train_students(p, alpha, method))
    return out
