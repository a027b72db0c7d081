"""One trained student as one run record: its test and validation scores and everything that
identifies it (kdsweep.runs.RunRecord, a row of runs.json and runs.parquet)."""

from __future__ import annotations

import subprocess

import torch

from kdsweep.config import Params, params_hash
from kdsweep.data.prepared import Prepared
from kdsweep.metrics import evaluate
from kdsweep.models import n_params
from kdsweep.registry import LOSSES
from kdsweep.runs import RunRecord
from kdsweep.students.plan import StudentJob, student_steps
from kdsweep.train import predict


def git_rev() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


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
    teacher_params: int | None,
) -> RunRecord:
    """Evaluate a trained student on the test split and describe it as one RunRecord
    (`teacher_params`: the parameter count of its store's teacher, None for labels)."""
    st, m = job.st, job.m
    loss = LOSSES[m.loss]
    s = prep.splits
    metrics = evaluate(predict(model, s.x_test), s.y_test, *ref_test)
    train_idx, val_idx = prep.split(job.alpha, job.subset_seed, st.val_fraction)
    val = evaluate(predict(model, s.x_train[val_idx]), s.y_train[val_idx])
    n_train = len(train_idx)
    steps = student_steps(st, n_train)
    name = job.store
    store = p.cache.stores[name] if name else None
    teacher = p.teachers[store.teacher] if store else None
    return RunRecord(
        run_id=key[:12],
        dataset=p.data.name,
        task=p.data.task,
        teacher_id=store.teacher if store else None,
        teacher_arch=teacher.arch if teacher else None,
        teacher_width=teacher.width if teacher else None,
        teacher_params=teacher_params,
        student=job.student,
        student_arch=st.arch,
        student_width=st.width,
        student_params=n_params(model),
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
