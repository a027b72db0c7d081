"""One student stage (`student@<store>` or `labels`), end to end: plan its students, reuse the
rows its previous output already holds (kdsweep.students.reuse), train the rest on the
configured executor (kdsweep.students.executor), and write `runs.json` atomically.

Kill-safe: each stack's rows are written to `stack-<key>.json` in the output directory as soon
as that stack finishes (atomically; the directory is a `persist: true` DVC output, so they
survive a killed `dvc repro`), and a re-run reuses them like runs.json's rows. They are merged
into runs.json and removed only once every stack is done."""

from __future__ import annotations

import uuid
from dataclasses import astuple
from pathlib import Path
from typing import Any

from kdsweep.config import Params, ParamsError
from kdsweep.io import atomic_write_json, remove_stale_temps
from kdsweep.students.executor import run_stacks
from kdsweep.students.inputs import StageInputs, stage_data
from kdsweep.students.plan import Stack, plan_stacks, stage_jobs
from kdsweep.students.reuse import STACK_ROWS, previous_rows, student_keys


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
    out_dir = Path(out_dir)
    out = out_dir / "runs.json"
    # workers of an existing cluster start elsewhere: they get absolute paths
    inputs = StageInputs(
        *(Path(v).resolve() if isinstance(v, Path) else v for v in astuple(inputs))
    )
    run = uuid.uuid4().hex  # this run's inputs are read afresh, by this process and by workers
    jobs = stage_jobs(p, store)
    sd = stage_data(p, inputs, run)
    s = sd.prep.splits
    vf = p.student.val_fraction
    n_train = [len(sd.prep.split(j.alpha, j.subset_seed, vf)[0]) for j in jobs]
    stacks = plan_stacks(p, sd.train, s.x_train, s.num_classes, jobs, n_train)
    keys = student_keys(p, store, sd, jobs, stacks)
    have = previous_rows(out_dir)
    todo = [
        Stack(tuple(i for i in s.members if keys[i] not in have), s.path, s.compiled)
        for s in stacks
    ]
    todo = [s for s in todo if s.members]

    def durable(rows: list[dict[str, Any]]) -> None:
        """Make one finished stack's rows survive a kill of the rest of the stage."""
        atomic_write_json(out_dir / STACK_ROWS.replace("*", rows[0]["student_key"]), rows)
        have.update((r["student_key"], r) for r in rows)
        print(f"{out_dir}: stack of {len(rows)} students done", flush=True)

    run_stacks(p, inputs, run, todo, dict(enumerate(keys)), durable)
    n_new = sum(len(s.members) for s in todo)
    print(
        f"{out_dir}: trained {n_new} students, reused {len(jobs) - n_new} "
        f"(executor: {p.student.executor})",
        flush=True,
    )
    atomic_write_json(out, [have[k] for k in keys])
    for f in out_dir.glob(STACK_ROWS):  # merged: the DVC output is runs.json alone
        f.unlink()
    remove_stale_temps(out_dir)  # what a kill inside a stack file's write left
    return out
