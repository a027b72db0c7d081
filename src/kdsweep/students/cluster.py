"""The Dask executor of a student stage (`student.executor: dask`), the stage process being the
Dask client — DVC stays the orchestrator (DESIGN.md §8).

`student.dask.address` names an existing scheduler (e.g. a dask-jobqueue SLURMCluster's,
README); without one a `LocalCluster` starts with one worker process per GPU (each stack asks
for the worker resource "GPU": 1, so it gets a whole device) or, on a CPU machine,
`student.dask.workers` (default 2). A stack is one task: workers open the stage's inputs from
shared storage once and keep them across stacks, results come back as rows, and a worker that
dies mid-stack has its stack rescheduled elsewhere by the scheduler. Only the client writes:
each stack's rows go to `done` as that stack comes back (the stage makes them durable), so no
partial stack is ever written and a killed client loses only the stacks still out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from distributed import Client, LocalCluster, as_completed
from distributed.diagnostics.plugin import WorkerPlugin

from kdsweep.config import Params
from kdsweep.students.fit import train_stack
from kdsweep.students.inputs import StageInputs
from kdsweep.students.plan import Stack

Rows = list[dict[str, Any]]


class _OneDevicePerWorker(WorkerPlugin):
    """Worker plugin: LocalCluster worker i trains on cuda:i (mod the devices it sees); a worker
    of an HPC job (a string name) keeps the device its job was given."""

    def setup(self, worker: Any) -> None:
        if isinstance(worker.name, int) and torch.cuda.is_available():
            torch.cuda.set_device(worker.name % torch.cuda.device_count())


def on_dask(
    p: Params,
    inputs: StageInputs,
    run: str,
    stacks: list[Stack],
    keys: dict[int, str],
    planned: dict[str, Any],
    done: Callable[[Rows], None],
) -> None:
    if not stacks:
        return
    d = p.student.dask
    gpus = torch.cuda.device_count() if p.student.device in ("auto", "cuda") else 0
    # a LocalCluster of ours has one "GPU" per worker; an existing cluster's workers are the
    # user's to shape (README: one GPU each), and asking them for a resource they were not
    # started with would wait forever
    resources = {"GPU": 1} if gpus and d.address is None else None
    cluster = None
    if d.address is None:
        cluster = LocalCluster(
            n_workers=d.workers or gpus or 2,
            threads_per_worker=1,  # one stack at a time per worker process
            resources=resources,
            dashboard_address=None,
        )
    try:
        with Client(d.address or cluster) as client:
            if resources:
                client.register_plugin(_OneDevicePerWorker())
            futures = [
                client.submit(
                    train_stack,
                    p,
                    inputs,
                    run,
                    s,
                    {i: keys[i] for i in s.members},
                    planned,
                    resources=resources,
                    pure=False,
                    key=f"stack-{run}-{n}",
                )
                for n, s in enumerate(stacks)
            ]
            for future in as_completed(futures):
                done(future.result())
    finally:
        if cluster is not None:
            cluster.close()
