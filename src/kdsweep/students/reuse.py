"""Student-level result reuse: every student has a content key, and a stage trains only the
students whose key its previous output (`runs.json`, a persisted DVC output) does not hold.

The key covers everything that decides a student's row: its recipe (loss, λ, τ, ε, top-k mode),
α and seeds, the student params that shape training, the exact rows it reads (the data
fingerprint and its subset's row ids, a content hash of the cache rows and of the reference
store's test outputs, an online store's teacher weights, the views it sees: cached, fresh or
none), how it trains (device type, CPU threads, stacked or sequential, compiled or eager —
each rounds differently; which other students share its stack does not change a bit of it,
see students.stack), the torch version, and the source of the code on its path: the student
stage's imports plus the registry modules *this* student uses (its architecture, its loss or
control, its cache kind). So a reused row is the row a from-scratch run would write (on a CPU:
tests/test_reuse.py), a fresh clone recomputes it, and the previous output — the workspace's, a
queued experiment's checked-out baseline, or a teammate's `dvc pull` — only saves the time.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from kdsweep.config import Params
from kdsweep.deps import ROOT, closure, module_path
from kdsweep.registry import ARCHS, CACHE_KINDS, LOSSES
from kdsweep.students.inputs import StageData
from kdsweep.students.plan import Stack, StudentJob, machine

STUDENT_SCRIPT = ROOT / "stages" / "student.py"


@functools.cache
def code_version(arch: str, loss: str, kind: str | None) -> str:
    """sha256 over the source of the code a student of (arch, loss, cache kind) runs."""
    files = closure(STUDENT_SCRIPT, registry_loads=False)
    used = [ARCHS[arch], LOSSES[loss], *([CACHE_KINDS[kind]] if kind else [])]
    files |= {module_path(e.module).relative_to(ROOT) for e in used}
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f"{f}\n".encode() + (ROOT / f).read_bytes())
    return h.hexdigest()


def student_key(
    p: Params,
    job: StudentJob,
    store: str | None,
    rows: torch.Tensor,
    fingerprints: dict[str, str | None],
    placement: dict[str, Any],
) -> str:
    """The content key of one student. `rows`: the dataset rows it trains and validates on;
    `fingerprints`: data, the cache rows it reads and the reference test outputs; `placement`:
    how it trains (device type, threads, path)."""
    m = job.m
    hyper = LOSSES[m.loss].hyper
    spec = p.cache.stores[store] if store else None
    blob = {
        "method": job.method,
        "recipe": {
            "loss": m.loss,
            "lambda": m.lam if "lambda" in hyper else None,
            "tau": job.tau if "tau" in hyper else None,
            "epsilon": m.epsilon if "epsilon" in hyper else None,
            "topk_mode": m.topk_mode if spec and spec.kind == "topk" else None,
        },
        "alpha": job.alpha,
        "subset_seed": job.subset_seed,
        "train_seed": job.train_seed,
        # its configuration, and that configuration's name (the row's `student` column)
        "student": {"name": job.student, **job.st.recipe()},
        # the teacher as configured (its weights and outputs: the fingerprints); none for labels
        "teacher": p.teachers[spec.teacher].model_dump(mode="json") if spec else None,
        "store": {"name": store, **spec.model_dump(mode="json")} if spec else None,
        # the inputs it sees: its store's views, or (labels) the reference store's: fresh views
        # leave no fingerprint in the rows
        "views": p.cache.stores[store or p.cache.reference].views,
        "rows": hashlib.sha256(rows.numpy().tobytes()).hexdigest(),
        "fingerprints": fingerprints,
        "placement": placement,
        "torch": torch.__version__,
        "code": code_version(job.st.arch, m.loss, spec.kind if spec else None),
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:24]


STACK_ROWS = "stack-*.json"  # one finished stack's rows, written before the stage ends


def previous_rows(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Rows a stage's output directory already holds, by student key: its runs.json and the
    per-stack files a killed run left. A missing or unreadable file holds none (reuse only saves
    time: a bad file just means training its students again)."""
    rows: dict[str, dict[str, Any]] = {}
    for f in [Path(out_dir) / "runs.json", *sorted(Path(out_dir).glob(STACK_ROWS))]:
        try:
            rows.update(
                (r["student_key"], r) for r in json.loads(f.read_text()) if r.get("student_key")
            )
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            continue
    return rows


def student_keys(
    p: Params, store: str | None, sd: StageData, jobs: list[StudentJob], stacks: list[Stack]
) -> list[str]:
    """Each student's content key (`reuse.student_key`), in `jobs` order."""
    path = {i: s.path for s in stacks for i in s.members}
    compiled = {i: s.compiled for s in stacks for i in s.members}
    here = machine(p)
    keys = []
    for i, job in enumerate(jobs):
        rows = torch.cat(sd.prep.split(job.alpha, job.subset_seed, p.student.val_fraction))
        placement = {**here, "path": path[i], "compiled": compiled[i]}
        keys.append(student_key(p, job, store, rows, sd.fingerprints, placement))
    return keys
