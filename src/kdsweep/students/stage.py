"""One student stage (`student@<store>` or `labels`), end to end: plan its students, reuse the
rows its previous output already holds (kdsweep.students.reuse), train the rest on the
configured executor (kdsweep.students.executor), and write `runs.json` atomically."""

from __future__ import annotations

import uuid
from dataclasses import astuple
from pathlib import Path

from kdsweep.config import Params, ParamsError
from kdsweep.io import atomic_write_json
from kdsweep.students.executor import run_stacks
from kdsweep.students.reuse import previous_rows
from kdsweep.students.train import (
    Stack,
    StageInputs,
    plan_stacks,
    stage_data,
    stage_jobs,
    student_keys,
)


def run_student_stage(p: Params, inputs: StageInputs, out_dir: Path) -> Path:
    """Train (or reuse) every student that reads `inputs.store` (None: students of labels
    only); write `out_dir/runs.json` with one row per student, in plan order."""
    store = inputs.store
    if store is not None and store not in p.cache.stores:
        raise ParamsError(
            f"store {store!r} is not one of cache.stores ({', '.join(p.cache.stores)})"
        )
    if (store is None) != (inputs.logits is None):
        raise ParamsError("a student stage reads a store exactly when it is given one")
    out = Path(out_dir) / "runs.json"
    # workers of an existing cluster start elsewhere: they get absolute paths
    inputs = StageInputs(
        *(Path(v).resolve() if isinstance(v, Path) else v for v in astuple(inputs))
    )
    run = uuid.uuid4().hex  # this run's inputs are read afresh, by this process and by workers
    jobs = stage_jobs(p, store)
    sd = stage_data(p, inputs, run)
    stacks = plan_stacks(p, sd, jobs)
    keys = student_keys(p, store, sd, jobs, stacks)
    have = previous_rows(out)
    todo = [Stack(tuple(i for i in s.members if keys[i] not in have), s.path) for s in stacks]
    todo = [s for s in todo if s.members]
    trained = {r["student_key"]: r for r in run_stacks(p, inputs, run, todo, dict(enumerate(keys)))}
    n_new = sum(len(s.members) for s in todo)
    print(
        f"{out_dir}: trained {n_new} students, reused {len(jobs) - n_new} "
        f"(executor: {p.student.executor})",
        flush=True,
    )
    atomic_write_json(out, [trained.get(k) or have[k] for k in keys])
    return out
