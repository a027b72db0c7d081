"""Training the students of a stage: every student of the methods that read one cache store
(or none), from the cached teacher targets — or, for an online store, its teacher run on every
batch.

Students that share a `plan.stack_key` (one configuration, batch size and step count: any α,
method, τ, λ, ε and seed) form a `Stack`, trained either together (stacked under vmap, in groups
that fit memory and `plan.max_stack`) or one after another, whichever `plan.choose_path` says is
faster for this student and device (`student.stacked: on|off` forces either). `train_stack` is
the unit an executor runs (kdsweep.students.executor); kdsweep.students.stage runs a whole stage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kdsweep.config import Params, StudentParams
from kdsweep.errors import KdsweepError
from kdsweep.losses import student_loss
from kdsweep.models import n_params
from kdsweep.registry import CACHE_KINDS
from kdsweep.students.inputs import StageInputs, stage_data, student_data
from kdsweep.students.plan import (
    Stack,
    StudentJob,
    machine,
    max_stack,
    memory_groups,
    stage_jobs,
    student_model,
    student_steps,
    train_threads,
)
from kdsweep.students.records import git_rev, run_record
from kdsweep.students.stack import fit_stacked, mixed_loss, recipe, recipe_hyper, stack_subsets
from kdsweep.targets import TeacherTargets, ViewBatches
from kdsweep.train import BestVal, fit, pick_device

# (model on the CPU, seconds, negative-KL fraction, chosen step under best_val else None,
# validation curve: steps and mean validation cross-entropy)
Trained = tuple[torch.nn.Module, float, float, int | None, tuple[list[int], list[float]]]


Rows = tuple[torch.Tensor, torch.Tensor]  # (inputs, labels) of a student's validation rows


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
        probe = student_model(members[0].st, num_classes, sd.prep.splits.x_train, seed=0)
        sizes = [
            len(sd.prep.split(j.alpha, j.subset_seed, p.student.val_fraction)[0]) for j in padded
        ]
        trained = _fit_stack(
            padded,
            sizes,
            part,
            val,
            probe,
            num_classes,
            device,
            sd.train.kind,
            teacher,
            sd.fresh,
            stack.compiled,
        )
        trained = trained[: len(members)]
    else:
        trained = [
            train_one(p, job, part(job), val(job), num_classes, device, sd.fresh, teacher)
            for job in members
        ]
    rev = git_rev()
    return [
        run_record(
            p, job, *res, stack.path, sd.prep, sd.ref_test, rev, keys[i], sd.teacher_params
        ).row()
        for i, job, res in zip(stack.members, members, trained, strict=True)
    ]


def _fit_stack(
    jobs: list[StudentJob],
    sizes: list[int],
    part: Callable[[StudentJob], tuple[torch.Tensor, torch.Tensor, TeacherTargets]],
    val: Callable[[StudentJob], Rows],
    probe: torch.nn.Module,
    num_classes: int,
    device: torch.device,
    kind: str | None,
    teacher: nn.Module | None = None,
    fresh: bool = False,
    compiled: bool = False,
) -> list[Trained]:
    """Stacked training of students sharing a `plan.stack_key` (`kind`: the cache kind of their
    store, None for labels), in groups that fit memory (half the free GPU memory, 4 GiB on a
    CPU) and `plan.max_stack`; `sizes`: each student's training rows; `part(job)` builds a
    student's inputs, labels and teacher rows, `val(job)` its validation rows; `teacher`: an
    online store's, run on every step's inputs; `fresh`: a fresh augmented view per sample and
    step (cached views come with the rows); `compiled`: the step through torch.compile.

    A student's footprint is estimated as parameters + gradients + AdamW state (16 bytes a
    parameter) plus the largest subset's rows and targets and a generous allowance for
    activations.
    """
    st = jobs[0].st
    x0, y0, t0 = part(jobs[0])
    row_bytes = (x0.nbytes + y0.nbytes + sum(v.nbytes for v in t0.tensors.values())) / len(y0)
    data_bytes = int(row_bytes * max(sizes))
    size = n_params(probe)
    act = 4 * min(st.batch_size, len(y0)) * x0[0].numel() * 64
    budget = torch.cuda.mem_get_info(device)[0] // 2 if device.type == "cuda" else 4 << 30
    steps = student_steps(st, sizes[0])  # one for all: plan.stack_key
    sample = x0[:1].clone()  # the model factory needs only the input shape: free the subset
    del x0, y0, t0
    out: list[Trained] = []
    per_student = 16 * size + data_bytes + act
    most = max_stack(device, probe, sample, min(st.batch_size, sizes[0]))
    for group in memory_groups(len(jobs), per_student, budget, most):
        mine = [jobs[i] for i in group]
        xs, targets = stack_subsets([part(job) for job in mine])
        aug = targets.pop("aug", None)
        hyper = recipe_hyper(
            [recipe(j.m.loss, kind, j.m.lam, j.tau, j.m.epsilon, j.m.topk_mode) for j in mine]
        )
        select = _validation(st, [val(job) for job in mine], device)
        alphas = sorted({j.alpha for j in mine})
        res = fit_stacked(
            lambda seed: student_model(st, num_classes, sample, seed),
            [j.seed for j in mine],
            [x.to(device) for x in xs],
            {k: [v.to(device) for v in vs] for k, vs in targets.items()},
            mixed_loss(kind, hyper),
            hyper,
            steps,
            st.batch_size,
            st.lr,
            st.weight_decay,
            desc=f"{len({j.method for j in mine})} methods α={','.join(map(str, alphas))} "
            f"×{len(group)}",
            select=select,
            teacher=teacher,
            drawn=_drawn(kind),
            aug=[a.to(device) for a in aug] if aug is not None else None,
            fresh=fresh,
            compiled=compiled,
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
    xs, ys = ([v.to(device) for v in t] for t in zip(*rows, strict=True))
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
    st, m = job.st, job.m
    model = student_model(st, num_classes, x, job.seed).to(device)
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
