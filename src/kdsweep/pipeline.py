"""What each DVC stage does, as functions of validated params (stages/*.py and the CLI call these).

Paths (all under data/, owned by DVC):
  prepared/                         splits, nested subset orders, meta.json      (prepare)
  teachers/<id>.safetensors         teacher weights; `random_head` is the control  (teacher)
  teachers/metrics.json             teacher test accuracy and fingerprints
  logits/<store>.zarr, <store>.json cache store and its size summary              (cache@<store>)
  students/<group>-<alpha>/runs.json  one row per student             (student@<α>, ablation@<α>)
"""

from __future__ import annotations

import itertools
import json
import subprocess
import time
import uuid
from collections.abc import Callable
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
from kdsweep.stack import (
    choose_path,
    fit_stacked,
    memory_groups,
    stack_subsets,
    stacked_student_loss,
)
from kdsweep.train import evaluate, fit, num_steps, pick_device, predict

DATA = Path("data")
PREPARED = DATA / "prepared"
TEACHERS = DATA / "teachers"
LOGITS = DATA / "logits"
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


def report_work(what: str, seconds: float) -> None:
    """Print one `kdsweep work:` line for a stage's real work (generating data, training, running
    the teacher into a cache), so that bench/bench_pipeline.py can tell it from the overhead."""
    print(f"kdsweep work: {what} {seconds:.3f} s", flush=True)


def prepare(p: Params) -> None:
    t0 = time.perf_counter()
    splits = build_splits(p.data)
    report_work("generate", time.perf_counter() - t0)
    write_prepared(PREPARED, splits, p.subset_seeds)


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
    report_work("train", seconds)
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


def load_teacher(p: Params, teacher_id: str, prep: Prepared) -> tuple[torch.nn.Module, str]:
    """The teacher network and its weights fingerprint. Only the `cache` stage calls this."""
    model = _teacher_model(p, prep)
    load_checkpoint(model, teacher_path(teacher_id))
    return model.eval(), weights_fingerprint(teacher_path(teacher_id))


def build_cache(p: Params, name: str, rank: int = 0, world: int = 1) -> None:
    """Run one teacher over the train and test splits into the store `name` (the only teacher forward)."""
    store = p.cache.stores[name]
    prep = load_prepared(PREPARED)
    model, teacher_fp = load_teacher(p, store.teacher, prep)
    spec = StoreSpec(
        store.kind, store.dtype, store.k, p.cache.chunk_rows, p.cache.codec, store.sample_seed
    )
    inputs = {"train": prep.splits.x_train, "test": prep.splits.x_test}
    t0 = time.perf_counter()
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
        report_work("cache", time.perf_counter() - t0)
        write_cache_summary(p, name)


def write_cache_summary(p: Params, name: str) -> None:
    """`data/logits/<store>.json`: the size figures and teacher accuracy the report's table shows."""
    info = LogitCache(store_path(name)).info()
    a = info["attributes"]
    teachers = TEACHERS / "metrics.json"  # absent when a store is built outside the pipeline
    acc = None
    if teachers.exists():
        acc = json.loads(teachers.read_text())[p.cache.stores[name].teacher]["test_acc"]
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


def open_store(p: Params, name: str, prep: Prepared) -> LogitCache:
    """A cache store, checked against its teacher's weights and the prepared dataset."""
    tid = p.cache.stores[name].teacher
    return LogitCache(store_path(name), weights_fingerprint(teacher_path(tid)), prep.fingerprint)


def stack_key(job: StudentJob, t: CacheSplit) -> tuple:
    """Students with equal keys compute the same loss function on targets of the same per-row
    shapes and differ only in λ, τ, seed and data, so they can share one stack (`t`: the teacher
    rows the job reads, any number of them). The KD-family controls are plain KD on transformed
    targets of the same shape (`subset_targets`), and `top1_teacher` is CE on other labels."""
    loss = job.m.loss
    family = "kd" if loss in KD_LOSSES else "ce" if loss == "top1_teacher" else loss
    shapes = tuple((n, tuple(v.shape[1:]), v.dtype) for n, v in sorted(t.tensors.items()))
    return (
        family,
        t.kind if t.tensors else None,
        job.m.epsilon if loss == "ls" else None,
        job.m.topk_mode if t.kind == "topk" else None,
        shapes,
    )


def train_students(p: Params, alpha: float, methods: list[str]) -> list[dict[str, Any]]:
    """Train every student of one α for `methods` in one process: each method's subset seeds ×
    train seeds × τ variants, one runs.parquet row each.

    Students that share a `stack_key` train either together (stacked under vmap, in memory-sized
    groups) or one after another, whichever `stack.choose_path` says is faster for this student
    and device; `student.stacked: on|off` forces either. Each store is read once.
    """
    unknown = [m for m in methods if m not in p.methods]
    if unknown:
        raise ParamsError(
            f"methods {unknown} are not in params.yaml methods ({', '.join(p.methods)})"
        )
    if alpha not in all_alphas(p):
        raise ParamsError(
            f"alpha {alpha} is in neither alphas nor sweep.ablation_alphas {all_alphas(p)}"
        )
    prep = load_prepared(PREPARED)
    ref_test = open_store(p, p.cache.reference, prep).read("test")
    needed = {p.store_of(m) for m in methods if p.methods[m].uses_teacher}
    train = {name: open_store(p, name, prep).read("train") for name in sorted(needed)}
    none = CacheSplit("none", {})

    def teacher_rows(job: StudentJob) -> CacheSplit:
        return train[p.store_of(job.method)] if job.m.uses_teacher else none

    def part(job: StudentJob) -> tuple[torch.Tensor, torch.Tensor, CacheSplit]:
        # built when its student trains: one α's many subsets never sit in memory all at once
        return subset_targets(job, prep, teacher_rows(job))

    jobs = [job for method in methods for job in student_jobs(p, alpha, method)]
    device = pick_device(p.student.device)
    num_classes = prep.splits.num_classes
    probe = _student_model(p, num_classes, prep.splits.x_train, seed=0)
    stacks: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        stacks.setdefault(stack_key(job, teacher_rows(job)), []).append(i)
    trained: dict[int, tuple[torch.nn.Module, float, float, str]] = {}
    for key, members in stacks.items():
        views = "aug" in teacher_rows(jobs[members[0]]).tensors
        path = (
            "sequential" if views else choose_path(device, probe, len(members), p.student.stacked)
        )
        if path == "stacked":
            group = _fit_stack(p, key, [jobs[i] for i in members], part, probe, num_classes, device)
        else:
            group = [train_one(p, jobs[i], part(jobs[i]), num_classes, device) for i in members]
        trained |= {i: (*res, path) for i, res in zip(members, group, strict=True)}
    report_work("train", sum(seconds for _, seconds, _, _ in trained.values()))
    rev = git_rev()
    rows = []
    for i, job in enumerate(jobs):
        model, seconds, neg, path = trained[i]
        store = p.cache.stores[p.store_of(job.method)]
        rows.append(
            result_row(p, job, model, seconds, neg, prep, ref_test)
            | {"params_hash": params_hash(p.data, p.student, job.m, store)}
            | {"git_rev": rev, "train_path": path}
        )
    return rows


def _student_model(p: Params, num_classes: int, x: torch.Tensor, seed: int) -> torch.nn.Module:
    """A fresh student for inputs like `x`; the seed fixes its initialisation."""
    torch.manual_seed(seed)
    return build_model(p.student.arch, tuple(x.shape[1:]), num_classes, p.student.width)


def _fit_stack(
    p: Params,
    key: tuple,
    jobs: list[StudentJob],
    part: Callable[[StudentJob], tuple[torch.Tensor, torch.Tensor, CacheSplit]],
    probe: torch.nn.Module,
    num_classes: int,
    device: torch.device,
) -> list[tuple[torch.nn.Module, float, float]]:
    """Stacked training of students sharing `key`, in groups that fit memory (half the free GPU
    memory, 4 GiB on a CPU); `part(job)` builds a student's inputs, labels and teacher rows.

    A student's footprint is estimated as parameters + gradients + AdamW state (16 bytes a
    parameter) plus its subset, targets and a generous allowance for activations.
    """
    st = p.student
    family, kind, epsilon, topk_mode, _ = key
    x0, y0, t0 = part(jobs[0])
    data_bytes = x0.nbytes + y0.nbytes + sum(v.nbytes for v in t0.tensors.values())
    n_params = sum(q.numel() for q in probe.parameters())
    act = 4 * min(st.batch_size, len(y0)) * x0[0].numel() * 64
    budget = torch.cuda.mem_get_info(device)[0] // 2 if device.type == "cuda" else 4 << 30
    steps = num_steps(st.budget.mode, st.budget.value, len(y0), st.batch_size)
    sample = x0[:1].clone()  # the model factory needs only the input shape: free the subset
    del x0, y0, t0
    loss_fn = stacked_student_loss(family, kind, epsilon or 0.0, topk_mode or "tail")
    out: list[tuple[torch.nn.Module, float, float]] = []
    for group in memory_groups(len(jobs), 16 * n_params + data_bytes + act, budget):
        xs, targets = stack_subsets([part(jobs[i]) for i in group])
        hyper = {
            "lam": torch.tensor([jobs[i].m.lam for i in group], dtype=torch.float64),
            "tau": torch.tensor([jobs[i].tau for i in group], dtype=torch.float64),
        }
        res = fit_stacked(
            lambda seed: _student_model(p, num_classes, sample, seed),
            [jobs[i].seed for i in group],
            xs.to(device),
            {k: v.to(device) for k, v in targets.items()},
            loss_fn,
            hyper,
            steps,
            st.batch_size,
            st.lr,
            st.weight_decay,
            desc=f"{family} α={jobs[0].alpha:g} ×{len(group)}",
        )
        share = res.seconds / len(group)
        out += [(mod.cpu(), share, neg) for mod, neg in zip(res.models, res.neg_frac, strict=True)]
    return out


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
        logits = t.tensors["logits"]
        flat = logits.flatten(0, -2)  # one row per position or view
        per_row = (
            y.flatten() if y.numel() == len(flat) else y.repeat_interleave(len(flat) // len(y))
        )
        controlled = control_targets(loss, flat, per_row, job.m.epsilon, job.seed).reshape(
            logits.shape
        )
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
    part: tuple[torch.Tensor, torch.Tensor, CacheSplit],
    num_classes: int,
    device: torch.device,
) -> tuple[torch.nn.Module, float, float]:
    """One student on its own: (trained model on the CPU, seconds, fraction of negative KL terms)."""
    x, y, t = (v.to(device) for v in part)
    st, m = p.student, job.m
    model = _student_model(p, num_classes, x, job.seed).to(device)
    steps = num_steps(st.budget.mode, st.budget.value, len(y), st.batch_size)
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
    return model.cpu(), seconds, float(neg) / max(terms, 1)


def result_row(
    p: Params,
    job: StudentJob,
    model: torch.nn.Module,
    seconds: float,
    neg_frac: float,
    prep: Prepared,
    ref_test: CacheSplit,
) -> dict[str, Any]:
    """Evaluate a trained student on the test split and describe it as one runs.parquet row."""
    st, m = p.student, job.m
    metrics = evaluate(predict(model, prep.splits.x_test), prep.splits.y_test, ref_test)
    n_train = len(prep.subset(job.alpha, job.subset_seed))
    steps = num_steps(st.budget.mode, st.budget.value, n_train, st.batch_size)
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
        "n_train": n_train,
        "subset_seed": job.subset_seed,
        "train_seed": job.train_seed,
        "budget_mode": st.budget.mode,
        "epochs": steps * min(st.batch_size, n_train) / n_train,
        "steps": steps,
        "test_acc": metrics["test_acc"],
        "test_error": metrics["test_error"],
        "test_ppl": metrics["test_ppl"] if p.data.task == "lm" else None,
        "agreement": metrics["agreement"],
        "test_kl": metrics["test_kl"],
        "ece": metrics["ece"],
        "neg_kl_frac": neg_frac if uses_teacher else None,
        "train_seconds": seconds,
    }


def run_student_stage(p: Params, alpha: float, methods: list[str], out_dir: Path) -> Path:
    """Train all students of one α for `methods` and write `out_dir/runs.json` atomically."""
    out = Path(out_dir) / "runs.json"
    atomic_write_json(out, train_students(p, alpha, methods))
    return out
