"""Training the students of a stage: every student of the methods that read one cache store
(or none), from the cached teacher targets only — the teacher network is never built here.

Students that share a `plan.stack_key` form a `Stack`, trained either together (stacked under
vmap, in memory-sized groups) or one after another, whichever `plan.choose_path` says is faster
for this student and device (`student.stacked: on|off` forces either). `train_stack` is the unit
an executor runs (kdsweep.students.executor); kdsweep.students.stage runs a whole stage.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdsweep.cache.format import CacheError
from kdsweep.cache.reader import LogitCache
from kdsweep.config import Params, ParamsError, StudentParams, params_hash
from kdsweep.data.prepared import Prepared, load_prepared
from kdsweep.errors import KdsweepError
from kdsweep.io import load_checkpoint, report_work, tensors_fingerprint, weights_fingerprint
from kdsweep.losses import student_loss
from kdsweep.metrics import evaluate
from kdsweep.models import build_model
from kdsweep.registry import ARCHS, CACHE_KINDS, LOSSES
from kdsweep.runs import RunRecord
from kdsweep.students.plan import StudentJob, choose_path, memory_groups, stack_key, student_jobs
from kdsweep.students.reuse import student_key
from kdsweep.students.stack import fit_stacked, stack_subsets, stacked_student_loss
from kdsweep.targets import NO_TARGETS, TeacherTargets, ViewBatches
from kdsweep.train import BestVal, fit, num_steps, pick_device, predict

# (model on the CPU, seconds, negative-KL fraction, chosen step under best_val else None,
# validation curve: steps and mean validation cross-entropy)
Trained = tuple[torch.nn.Module, float, float, int | None, tuple[list[int], list[float]]]
Rows = tuple[torch.Tensor, torch.Tensor]  # (inputs, labels) of a student's validation rows


def git_rev() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def open_store(p: Params, name: str, path: Path, teachers: Path, prep: Prepared) -> LogitCache:
    """A cache store, checked against its teacher's weights fingerprint (from the teacher stage's
    metrics file) and the prepared dataset."""
    tid = p.cache.stores[name].teacher
    try:
        fingerprint = json.loads(Path(teachers).read_text())[tid]["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CacheError(
            f"{teachers} holds no fingerprint of teacher {tid!r} ({err!r}): run "
            "`dvc repro teacher` or `dvc pull teacher`"
        ) from None
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


def online_teacher(p: Params, store: LogitCache, checkpoint: Path, prep: Prepared) -> nn.Module:
    """The teacher of an online store, from its checkpoint — refused unless its weights are the
    ones the store (and so the teacher stage's metrics) names."""
    have = weights_fingerprint(checkpoint)
    if have != store.attrs["teacher_fingerprint"]:
        raise CacheError(
            f"{checkpoint} (weights {have[:12]}…) is not the teacher of {store.path} "
            f"({store.attrs['teacher_fingerprint'][:12]}…): re-run `dvc repro teacher` or pull both"
        )
    s = prep.splits  # the teacher stage's network, its weights loaded (no training code here)
    model = build_model(p.teacher.arch, tuple(s.x_train.shape[1:]), s.num_classes, p.teacher.width)
    load_checkpoint(model, checkpoint)
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
    teachers: Path  # the teacher stage's metrics.json: weight fingerprints
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


@dataclass(frozen=True)
class Stack:
    """The unit of work of a student stage: students (indices into `stage_jobs`) that share a
    `plan.stack_key` and train on one path, "stacked" or "sequential"."""

    members: tuple[int, ...]
    path: str


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
    ref = open_store(p, p.cache.reference, inputs.reference, inputs.teachers, prep)
    t = ref.read("test")
    ref_test = (CACHE_KINDS.load(t.kind).top1(t), t.tensors.get("logits"))
    train, fresh, teacher = NO_TARGETS, False, None
    if inputs.store is None and p.methods_reading(None):
        # students of labels see the inputs of the reference store's students: its cached
        # views (each with its true label), fresh views, or the clean rows
        fresh = p.cache.stores[p.cache.reference].views == "fresh"
        if ref.attrs["views"] > 1:
            train = TeacherTargets(None, {"aug": ref.read("train").tensors["aug"]})
    if inputs.store is not None and p.methods_reading(inputs.store):
        store = open_store(p, inputs.store, inputs.logits, inputs.teachers, prep)
        if store.kind == "online":
            if inputs.checkpoint is None:
                raise ParamsError(f"store {inputs.store!r} is online: give its teacher checkpoint")
            teacher = online_teacher(p, store, inputs.checkpoint, prep)
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
        "teacher": weights_fingerprint(inputs.checkpoint) if teacher is not None else None,
        "reference": tensors_fingerprint(ref_tensors),
    }
    return StageData(prep, train, ref_test, fingerprints, fresh, teacher)


def stage_jobs(p: Params, store: str | None) -> list[StudentJob]:
    """Every student of the stage of `store` (None: labels), in a fixed order."""
    return [job for method in p.methods_reading(store) for job in student_jobs(p, method)]


def train_threads(st: StudentParams) -> int:
    """CPU threads a student trains with: the thread count changes a CPU run's rounding, so it is
    fixed before training and part of the student's key. Default: this process's for the local
    executor, one per Dask worker process (Dask's own default)."""
    return st.threads or (torch.get_num_threads() if st.executor == "local" else 1)


def plan_stacks(p: Params, sd: StageData, jobs: list[StudentJob]) -> list[Stack]:
    """Group the stage's students into stacks and choose each stack's path on the *whole* stack,
    so that a student's path (and so its row) does not depend on which others are reused."""
    device = pick_device(p.student.device)
    probe = _student_model(p, sd.prep.splits.num_classes, sd.prep.splits.x_train, seed=0)
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(stack_key(job, sd.train), []).append(i)
    vmappable = ARCHS[p.student.arch].vmappable
    return [
        Stack(
            tuple(members), choose_path(device, probe, vmappable, len(members), p.student.stacked)
        )
        for members in groups.values()
    ]


def machine(p: Params) -> dict[str, Any]:
    """What about this process changes a student's rounding: its device type and, on a CPU,
    its thread count."""
    device = pick_device(p.student.device)
    return {
        "device": device.type,
        "threads": train_threads(p.student) if device.type == "cpu" else None,
    }


def student_keys(
    p: Params, store: str | None, sd: StageData, jobs: list[StudentJob], stacks: list[Stack]
) -> list[str]:
    """Each student's content key (`reuse.student_key`), in `jobs` order."""
    path = {i: s.path for s in stacks for i in s.members}
    here = machine(p)
    keys = []
    for i, job in enumerate(jobs):
        rows = torch.cat(sd.prep.split(job.alpha, job.subset_seed, p.student.val_fraction))
        placement = {**here, "path": path[i]}
        keys.append(student_key(p, job, store, rows, sd.fingerprints, placement))
    return keys


def train_stack(
    p: Params,
    inputs: StageInputs,
    run: str,
    stack: Stack,
    keys: dict[int, str],
    planned: dict[str, Any],
) -> list[dict[str, Any]]:
    """Train the students of one stack and return their rows (`RunRecord.row`), each carrying
    its key: what an executor runs, here or on a Dask worker. Nothing is written: a stack whose
    process dies leaves no partial row. `planned`: the stage's `machine(p)`, which its keys
    record — a worker unlike it (a GPU worker of a CPU stage) would write rows under keys that
    do not describe them, so it refuses."""
    torch.set_num_threads(train_threads(p.student))
    if machine(p) != planned:
        raise KdsweepError(
            f"this worker trains on {machine(p)}, but the student stage planned {planned} (and "
            "keys its rows by it): run the stage on a machine like its Dask workers, or set "
            "student.device and student.threads explicitly"
        )
    sd = stage_data(p, inputs, run)
    jobs = stage_jobs(p, inputs.store)
    device = pick_device(p.student.device)
    num_classes = sd.prep.splits.num_classes
    teacher = sd.teacher.to(device) if sd.teacher is not None else None

    def part(job: StudentJob) -> tuple[torch.Tensor, torch.Tensor, TeacherTargets]:
        # built when its student trains: one stage's many subsets never sit in memory at once
        return student_data(job, sd.prep, sd.train, p.student.val_fraction)

    def val(job: StudentJob) -> Rows:
        _, idx = sd.prep.split(job.alpha, job.subset_seed, p.student.val_fraction)
        return sd.prep.splits.x_train[idx], sd.prep.splits.y_train[idx]

    members = [jobs[i] for i in stack.members]
    if stack.path == "stacked":
        # vmap over a single student rounds differently from vmap over several (whose members
        # do not depend on each other): a stack of one trains beside a copy of itself
        padded = members * 2 if len(members) == 1 else members
        probe = _student_model(p, num_classes, sd.prep.splits.x_train, seed=0)
        key = stack_key(members[0], sd.train)
        trained = _fit_stack(
            p, key, padded, part, val, probe, num_classes, device, teacher, sd.fresh
        )
        trained = trained[: len(members)]
    else:
        trained = [
            train_one(p, job, part(job), val(job), num_classes, device, sd.fresh, teacher)
            for job in members
        ]
    report_work("train", sum(t[1] for t in trained))
    rev = git_rev()
    return [
        run_record(p, job, *res, stack.path, sd.prep, sd.ref_test, rev, keys[i]).row()
        for i, job, res in zip(stack.members, members, trained, strict=True)
    ]


def student_steps(st: StudentParams, n: int) -> int:
    """Optimizer steps of a student with n training rows (the budget of `student.budget`)."""
    b = st.budget
    return num_steps(b.mode, b.value, n, st.batch_size, b.min_epochs)


def _student_model(p: Params, num_classes: int, x: torch.Tensor, seed: int) -> torch.nn.Module:
    """A fresh student for inputs like `x`; the seed fixes its initialisation."""
    torch.manual_seed(seed)
    return build_model(p.student.arch, tuple(x.shape[1:]), num_classes, p.student.width)


def _fit_stack(
    p: Params,
    key: tuple,
    jobs: list[StudentJob],
    part: Callable[[StudentJob], tuple[torch.Tensor, torch.Tensor, TeacherTargets]],
    val: Callable[[StudentJob], Rows],
    probe: torch.nn.Module,
    num_classes: int,
    device: torch.device,
    teacher: nn.Module | None = None,
    fresh: bool = False,
) -> list[Trained]:
    """Stacked training of students sharing `key`, in groups that fit memory (half the free GPU
    memory, 4 GiB on a CPU); `part(job)` builds a student's inputs, labels and teacher rows,
    `val(job)` its validation rows; `teacher`: an online store's, run on every step's inputs;
    `fresh`: a fresh augmented view per sample and step (cached views come with the rows).

    A student's footprint is estimated as parameters + gradients + AdamW state (16 bytes a
    parameter) plus its subset, targets and a generous allowance for activations.
    """
    st = p.student
    _, _, kind, epsilon, topk_mode, _ = key
    x0, y0, t0 = part(jobs[0])
    data_bytes = x0.nbytes + y0.nbytes + sum(v.nbytes for v in t0.tensors.values())
    n_params = sum(q.numel() for q in probe.parameters())
    act = 4 * min(st.batch_size, len(y0)) * x0[0].numel() * 64
    budget = torch.cuda.mem_get_info(device)[0] // 2 if device.type == "cuda" else 4 << 30
    steps = student_steps(st, len(y0))
    sample = x0[:1].clone()  # the model factory needs only the input shape: free the subset
    del x0, y0, t0
    loss_fn = stacked_student_loss(jobs[0].m.loss, kind, epsilon or 0.0, topk_mode or "tail")
    out: list[Trained] = []
    for group in memory_groups(len(jobs), 16 * n_params + data_bytes + act, budget):
        xs, targets = stack_subsets([part(jobs[i]) for i in group])
        aug = targets.pop("aug", None)
        hyper = {
            "lam": torch.tensor([jobs[i].m.lam for i in group], dtype=torch.float64),
            "tau": torch.tensor([jobs[i].tau for i in group], dtype=torch.float64),
        }
        select = _validation(st, [val(jobs[i]) for i in group], device)
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
            desc=f"{jobs[0].m.loss} α={jobs[0].alpha:g} ×{len(group)}",
            select=select,
            teacher=teacher,
            drawn=_drawn(kind),
            aug=aug.to(device) if aug is not None else None,
            fresh=fresh,
        )
        share = res.seconds / len(group)
        out += [
            (mod.cpu(), share, neg, _best_step(select, i), select.curve_of(i))
            for i, (mod, neg) in enumerate(zip(res.models, res.neg_frac, strict=True))
        ]
    return out


def _drawn(kind: str | None) -> tuple[str, ...]:
    """The arrays of a cache kind with a draw axis (one set picked per row and step)."""
    return CACHE_KINDS.load(kind).drawn if kind else ()


def _validation(st: StudentParams, rows: list[Rows], device: torch.device) -> BestVal:
    """The validation rows of K students as `train.BestVal`: their curves always, their best
    checkpoints under `select: best_val`."""
    xs, ys = (torch.stack(t).to(device) for t in zip(*rows, strict=True))
    return BestVal(xs, ys, st.budget.eval_every, keep_best=st.budget.select == "best_val")


def _best_step(select: BestVal, k: int) -> int | None:
    return int(select.step[k]) if select.keep_best else None


def train_one(
    p: Params,
    job: StudentJob,
    part: tuple[torch.Tensor, torch.Tensor, TeacherTargets],
    val: Rows,
    num_classes: int,
    device: torch.device,
    fresh: bool = False,
    teacher: nn.Module | None = None,
) -> Trained:
    """One student on its own: (trained model on the CPU, seconds, fraction of negative KL terms,
    chosen step); `fresh` and `teacher` as `ViewBatches` takes them."""
    x, y, t = part[0].to(device), part[1].to(device), part[2].to(device)
    st, m = p.student, job.m
    model = _student_model(p, num_classes, x, job.seed).to(device)
    steps = student_steps(st, len(y))
    neg = torch.zeros((), device=device)
    terms = 0
    select = _validation(st, [val], device)

    def loss_fn(z: torch.Tensor, ctx: tuple[torch.Tensor, TeacherTargets]) -> torch.Tensor:
        nonlocal neg, terms
        labels, targets = ctx
        total, d = student_loss(m.loss, z, labels, targets, m.lam, job.tau, m.epsilon, m.topk_mode)
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
        batch=ViewBatches(x, y, t, job.seed, fresh, teacher, _drawn(t.kind)),
        select=select,
    )
    return (
        model.cpu(),
        seconds,
        float(neg) / max(terms, 1),
        _best_step(select, 0),
        select.curve_of(0),
    )


def run_record(
    p: Params,
    job: StudentJob,
    model: torch.nn.Module,
    seconds: float,
    neg_frac: float,
    best_step: int | None,
    curve: tuple[list[int], list[float]],
    path: str,
    prep: Prepared,
    ref_test: tuple[torch.Tensor, torch.Tensor | None],
    rev: str,
    key: str,
) -> RunRecord:
    """Evaluate a trained student on the test split and describe it as one RunRecord."""
    st, m = p.student, job.m
    loss = LOSSES[m.loss]
    s = prep.splits
    metrics = evaluate(predict(model, s.x_test), s.y_test, *ref_test)
    train_idx, val_idx = prep.split(job.alpha, job.subset_seed, st.val_fraction)
    val = evaluate(predict(model, s.x_train[val_idx]), s.y_train[val_idx])
    n_train = len(train_idx)
    steps = student_steps(st, n_train)
    name = p.store_or_none(job.method)
    store = p.cache.stores[name] if name else None
    return RunRecord(
        run_id=key[:12],
        dataset=p.data.name,
        task=p.data.task,
        teacher_id=store.teacher if store else None,
        teacher_arch=p.teacher.arch,
        student_arch=st.arch,
        method=job.method,
        loss=m.loss,
        lam=m.lam if "lambda" in loss.hyper else None,
        tau=job.tau if "tau" in loss.hyper else None,
        epsilon=m.epsilon if "epsilon" in loss.hyper else None,
        cache_name=name,
        cache_kind=store.kind if store else None,
        k=store.k if store else None,
        topk_mode=m.topk_mode if store and store.kind == "topk" else None,
        alpha=job.alpha,
        n_train=n_train,
        subset_seed=job.subset_seed,
        train_seed=job.train_seed,
        budget_mode=st.budget.mode,
        epochs=steps * min(st.batch_size, n_train) / n_train,
        steps=steps,
        best_step=best_step,
        val_curve_steps=curve[0],
        val_curve=curve[1],
        n_val=len(val_idx),
        val_acc=val["test_acc"],
        val_ppl=val["test_ppl"] if p.data.task == "lm" else None,
        test_acc=metrics["test_acc"],
        test_error=metrics["test_error"],
        test_ppl=metrics["test_ppl"] if p.data.task == "lm" else None,
        agreement=metrics["agreement"],
        test_kl=metrics["test_kl"],
        ece=metrics["ece"],
        neg_kl_frac=neg_frac if loss.distill else None,
        train_seconds=seconds,
        train_path=path,
        # this student's own τ: the method's other τ values are other students
        params_hash=params_hash(
            p.data,
            st.recipe(),
            m.model_copy(update={"tau": job.tau}),
            *([store] if store else []),
        ),
        git_rev=rev,
        student_key=key,
    )
