"""Where a student stage's stacks train: in this process (`student.executor: local`) or on a Dask
distributed cluster (`dask`), the stage process being the Dask client — DVC stays the
orchestrator (DESIGN.md §8).

Local: `plan.local_workers` stacks at once, each in a thread of this process with
`plan.train_threads` torch threads (on a CPU by default one stack per core, one thread each;
torch's kernels release the GIL, so the threads compute in parallel), started in plan order:
costliest first.

Dask: kdsweep.students.cluster (imported only when used: Dask's import is a fixed cost of
every stage process otherwise).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from kdsweep.config import Params
from kdsweep.io import report_work
from kdsweep.students.fit import train_stack
from kdsweep.students.inputs import StageInputs
from kdsweep.students.plan import Stack, local_workers, machine

Rows = list[dict[str, Any]]


def run_stacks(
    p: Params,
    inputs: StageInputs,
    run: str,
    stacks: list[Stack],
    keys: dict[int, str],
    done: Callable[[Rows], None],
) -> None:
    """Train every stack of the stage run `run` on the configured executor, handing each
    stack's rows to `done` as soon as that stack has finished (in any order)."""
    planned = machine(p)
    t0 = time.perf_counter()
    if p.student.executor == "local":
        _local(p, inputs, run, stacks, keys, planned, done)
    else:
        from kdsweep.students.cluster import on_dask  # Dask's import: only where it is used

        on_dask(p, inputs, run, stacks, keys, planned, done)
    if stacks:
        report_work("train", time.perf_counter() - t0)


def _local(
    p: Params,
    inputs: StageInputs,
    run: str,
    stacks: list[Stack],
    keys: dict[int, str],
    planned: dict[str, Any],
    done: Callable[[Rows], None],
) -> None:
    """`local_workers` stacks at a time in threads of this process. A failed stack stops the
    stacks not yet started; those already training finish and are handed to `done` before
    the error is raised, so no finished work is lost."""
    workers = local_workers(p.student)
    if workers == 1:
        for s in stacks:
            done(train_stack(p, inputs, run, s, keys, planned))
        return
    failed = threading.Event()

    def job(s: Stack) -> Rows | None:
        if failed.is_set():  # set by a failed stack before its thread takes the next one
            return None
        try:
            return train_stack(p, inputs, run, s, keys, planned)
        except BaseException:
            failed.set()
            raise

    with ThreadPoolExecutor(workers, thread_name_prefix="stack") as pool:
        pending: set[Future] = {pool.submit(job, s) for s in stacks}
        error: BaseException | None = None
        while pending:
            try:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            except KeyboardInterrupt:
                # the stacks in flight cannot be stopped from here, and waiting for them
                # (minutes) is not what Ctrl-C asks for: what finished is already on disk
                print(
                    "interrupted: the finished stacks' rows are kept; a re-run trains the rest",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(130)
            for future in finished:
                if future.exception() is not None:
                    error = error or future.exception()
                elif future.result() is not None:
                    done(future.result())
        if error is not None:
            raise error
