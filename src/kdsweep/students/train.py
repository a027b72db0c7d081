"""Training a student stage: every student of the methods that read one cache store (or none),
from the cached teacher targets only — the teacher network is never built here.

Students that share a `plan.stack_key` train either together (stacked under vmap, in
memory-sized groups) or one after another, whichever `plan.choose_path` says is faster for this
student and device; `student.stacked: on|off` forces either.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from kdsweep.cache.format import CacheError
from kdsweep.cache.reader import LogitCache
from kdsweep.config import Params, ParamsError, params_hash
from kdsweep.data.prepared import Prepared
from kdsweep.io import atomic_write_json, report_work
from kdsweep.losses import student_loss
from kdsweep.metrics import evaluate
from kdsweep.models import build_model
from kdsweep.registry import ARCHS, CACHE_KINDS, LOSSES
from kdsweep.runs import RunRecord
from kdsweep.students.plan import StudentJob, choose_path, memory_groups, stack_key, student_jobs
from kdsweep.students.stack import fit_stacked, stack_subsets, stacked_student_loss
from kdsweep.targets import NO_TARGETS, TeacherTargets, ViewBatches
from kdsweep.train import fit, num_steps, pick_device, predict

Trained = tuple[torch.nn.Module, float, float]  # (model on the CPU, seconds, negative-KL fraction)


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
    if cache.kind == "sampled" and cache.attrs["sample_tau"] != p.cache.stores[name].tau:
        raise CacheError(
            f"{path} holds draws at tau={cache.attrs['sample_tau']}, but "
            f"cache.stores.{name}.tau={p.cache.stores[name].tau}: re-run its cache stage "
            f"(`dvc repro cache@{name}`)"
        )
    return cache


def student_data(
    job: StudentJob, prep: Prepared, targets: TeacherTargets
) -> tuple[torch.Tensor, torch.Tensor, TeacherTargets]:
    """The student's inputs, labels and teacher rows: a control transforms the teacher rows here,
    a teacher-label student takes their argmax as its labels."""
    idx = prep.subset(job.alpha, job.subset_seed)
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


def train_students(
    p: Params,
    prep: Prepared,
    methods: list[str],
    train_targets: TeacherTargets,
    ref_test: tuple[torch.Tensor | None, torch.Tensor | None],
) -> list[RunRecord]:
    """Train every student of `methods` (each: its α × subset seeds × train seeds × τ) on
    `train_targets` (the rows of the store they read, or NO_TARGETS), one RunRecord each."""

    def part(job: StudentJob) -> tuple[torch.Tensor, torch.Tensor, TeacherTargets]:
        # built when its student trains: one stage's many subsets never sit in memory at once
        return student_data(job, prep, train_targets)

    jobs = [job for method in methods for job in student_jobs(p, method)]
    device = pick_device(p.student.device)
    num_classes = prep.splits.num_classes
    probe = _student_model(p, num_classes, prep.splits.x_train, seed=0)
    stacks: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        stacks.setdefault(stack_key(job, train_targets), []).append(i)
    views = "aug" in train_targets.tensors
    vmappable = ARCHS[p.student.arch].vmappable
    trained: dict[int, tuple[Trained, str]] = {}
    for key, members in stacks.items():
        path = (
            "sequential"
            if views
            else choose_path(device, probe, vmappable, len(members), p.student.stacked)
        )
        if path == "stacked":
            group = _fit_stack(p, key, [jobs[i] for i in members], part, probe, num_classes, device)
        else:
            group = [train_one(p, jobs[i], part(jobs[i]), num_classes, device) for i in members]
        trained |= {i: (res, path) for i, res in zip(members, group, strict=True)}
    report_work("train", sum(res[1] for res, _ in trained.values()))
    rev = git_rev()
    return [
        run_record(p, job, *trained[i][0], trained[i][1], prep, ref_test, rev)
        for i, job in enumerate(jobs)
    ]


def _student_model(p: Params, num_classes: int, x: torch.Tensor, seed: int) -> torch.nn.Module:
    """A fresh student for inputs like `x`; the seed fixes its initialisation."""
    torch.manual_seed(seed)
    return build_model(p.student.arch, tuple(x.shape[1:]), num_classes, p.student.width)


def _fit_stack(
    p: Params,
    key: tuple,
    jobs: list[StudentJob],
    part: Callable[[StudentJob], tuple[torch.Tensor, torch.Tensor, TeacherTargets]],
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
    _, _, kind, epsilon, topk_mode, _ = key
    x0, y0, t0 = part(jobs[0])
    data_bytes = x0.nbytes + y0.nbytes + sum(v.nbytes for v in t0.tensors.values())
    n_params = sum(q.numel() for q in probe.parameters())
    act = 4 * min(st.batch_size, len(y0)) * x0[0].numel() * 64
    budget = torch.cuda.mem_get_info(device)[0] // 2 if device.type == "cuda" else 4 << 30
    steps = num_steps(st.budget.mode, st.budget.value, len(y0), st.batch_size)
    sample = x0[:1].clone()  # the model factory needs only the input shape: free the subset
    del x0, y0, t0
    loss_fn = stacked_student_loss(jobs[0].m.loss, kind, epsilon or 0.0, topk_mode or "tail")
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
            desc=f"{jobs[0].m.loss} α={jobs[0].alpha:g} ×{len(group)}",
        )
        share = res.seconds / len(group)
        out += [(mod.cpu(), share, neg) for mod, neg in zip(res.models, res.neg_frac, strict=True)]
    return out


def train_one(
    p: Params,
    job: StudentJob,
    part: tuple[torch.Tensor, torch.Tensor, TeacherTargets],
    num_classes: int,
    device: torch.device,
) -> Trained:
    """One student on its own: (trained model on the CPU, seconds, fraction of negative KL terms)."""
    x, y, t = part[0].to(device), part[1].to(device), part[2].to(device)
    st, m = p.student, job.m
    model = _student_model(p, num_classes, x, job.seed).to(device)
    steps = num_steps(st.budget.mode, st.budget.value, len(y), st.batch_size)
    neg = torch.zeros((), device=device)
    terms = 0

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
        batch=ViewBatches(x, y, t, job.seed),
    )
    return model.cpu(), seconds, float(neg) / max(terms, 1)


def run_record(
    p: Params,
    job: StudentJob,
    model: torch.nn.Module,
    seconds: float,
    neg_frac: float,
    path: str,
    prep: Prepared,
    ref_test: tuple[torch.Tensor | None, torch.Tensor | None],
    rev: str,
) -> RunRecord:
    """Evaluate a trained student on the test split and describe it as one RunRecord."""
    st, m = p.student, job.m
    loss = LOSSES[m.loss]
    metrics = evaluate(predict(model, prep.splits.x_test), prep.splits.y_test, *ref_test)
    n_train = len(prep.subset(job.alpha, job.subset_seed))
    steps = num_steps(st.budget.mode, st.budget.value, n_train, st.batch_size)
    name = p.store_or_none(job.method)
    store = p.cache.stores[name] if name else None
    return RunRecord(
        run_id=uuid.uuid5(uuid.NAMESPACE_URL, f"{job}").hex[:12],
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
        test_acc=metrics["test_acc"],
        test_error=metrics["test_error"],
        test_ppl=metrics["test_ppl"] if p.data.task == "lm" else None,
        agreement=metrics["agreement"],
        test_kl=metrics["test_kl"],
        ece=metrics["ece"],
        neg_kl_frac=neg_frac if loss.distill else None,
        train_seconds=seconds,
        train_path=path,
        params_hash=params_hash(p.data, p.student, m, *([store] if store else [])),
        git_rev=rev,
    )


def run_student_stage(
    p: Params,
    prep: Prepared,
    store: str | None,
    teachers: Path,
    out_dir: Path,
    logits: Path | None = None,
    reference: Path | None = None,
) -> Path:
    """Train every student that reads `store` (None: students of labels only) from the store at
    `logits`; measure agreement and KL against the `reference` store's test split; write
    `out_dir/runs.json` atomically."""
    if store is not None and store not in p.cache.stores:
        raise ParamsError(
            f"store {store!r} is not one of cache.stores ({', '.join(p.cache.stores)})"
        )
    if (store is None) != (logits is None):
        raise ParamsError("a student stage reads a store exactly when it is given one")
    methods = p.methods_reading(store)
    ref_test: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
    train = NO_TARGETS
    if reference is not None:  # the teacher's test outputs: top-1 always, logits from a full cache
        ref = open_store(p, p.cache.reference, reference, teachers, prep)
        t = ref.read("test")
        ref_test = (CACHE_KINDS.load(t.kind).top1(t), t.tensors.get("logits"))
        if store is None and methods and ref.attrs["views"] > 1:
            # students of labels replay the same cached views as those of the teacher (every
            # store holds the same views), each view with its true label
            train = TeacherTargets(None, {"aug": ref.read("train").tensors["aug"]})
    if store is not None and methods:
        train = open_store(p, store, logits, teachers, prep).read("train")
    records = train_students(p, prep, methods, train, ref_test)
    out = Path(out_dir) / "runs.json"
    atomic_write_json(out, [r.row() for r in records])
    return out
