"""Student-level reuse (kdsweep.students.reuse) and the Dask executor (kdsweep.students.executor):
a stage trains only the students whose content key its previous output lacks, and what it writes
equals a from-scratch run; a Dask LocalCluster writes what the local executor writes, also when
a worker dies mid-stack."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from dataclasses import astuple
from pathlib import Path

import pytest

from kdsweep.cache.build import build_cache
from kdsweep.config import Params, parse_params
from kdsweep.data.prepared import load_prepared
from kdsweep.errors import KdsweepError
from kdsweep.students import reuse
from kdsweep.students.fit import train_stack
from kdsweep.students.inputs import StageInputs
from kdsweep.students.plan import Stack
from kdsweep.students.stage import run_student_stage

from .conftest import TINY, tiny_raw

PROVENANCE = ("train_seconds",)  # when it trained; everything else must be equal


def params(**changes) -> Params:
    raw = tiny_raw()
    raw["student"]["threads"] = 1  # fixed, so that Dask workers (1 thread) round the same
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        node = raw
        for k in path:
            node = node[k]
        node[last] = value
    return parse_params(raw)


def inputs(ws: Path, store: str | None) -> StageInputs:
    data = ws / "data"
    return StageInputs(
        data / "prepared",
        data / "logits/full.zarr",
        store,
        data / "logits" / f"{store}.zarr" if store else None,
        data / "teachers" / f"{p_teacher(store)}.safetensors" if store else None,
    )


def p_teacher(store: str) -> str:
    return TINY["cache"]["stores"][store]["teacher"]


def stage(p: Params, ws: Path, store: str | None, out: str) -> list[dict]:
    return json.loads(run_student_stage(p, inputs(ws, store), ws / out).read_text())


def strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in PROVENANCE} for r in rows]


def trained_reused(capsys) -> tuple[int, int]:
    line = [x for x in capsys.readouterr().out.splitlines() if "students, reused" in x][-1]
    words = line.split()
    return int(words[words.index("trained") + 1]), int(words[words.index("reused") + 1])


def test_changing_kd_tau_trains_only_kd_students_and_equals_a_fresh_run(workspace, capsys):
    old = params()
    before = stage(old, workspace, "full", "out")
    assert trained_reused(capsys) == (len(before), 0)
    new = params(methods__kd__tau=[1, 8])  # was [1, 4]
    after = stage(new, workspace, "full", "out")
    n_kd8 = sum(r["method"] == "kd" and r["tau"] == 4 for r in before)
    assert n_kd8 > 0 and trained_reused(capsys) == (n_kd8, len(after) - n_kd8)
    unchanged = [r for r in before if not (r["method"] == "kd" and r["tau"] == 4)]
    assert all(r in after for r in unchanged)  # byte-identical rows, provenance included
    assert strip(after) == strip(stage(new, workspace, "full", "fresh"))
    assert trained_reused(capsys) == (len(after), 0)
    # a stacked path is among them: reuse must not change a stack member's rounding
    assert {r["train_path"] for r in after} == {"stacked"}


def test_a_renamed_student_configuration_is_trained_anew_under_its_name(workspace, capsys):
    """The name is in the row (`student`): a row of another track's configuration with the same
    recipe under another name is not this one's."""
    before = stage(params(), workspace, None, "out")
    assert {r["student"] for r in before} == {"small"}
    raw = tiny_raw()
    raw["students"] = {"cnn8": {}}
    after = stage(parse_params(raw), workspace, None, "out")
    assert trained_reused(capsys)[1] == 0 and {r["student"] for r in after} == {"cnn8"}
    assert [r["test_acc"] for r in after] == [r["test_acc"] for r in before]  # same recipe


def test_changing_a_loss_s_code_retrains_exactly_its_students(workspace, capsys, monkeypatch):
    p = params()
    before = stage(p, workspace, "full", "out")
    capsys.readouterr()
    real = reuse.code_version.__wrapped__

    def edited(arch: str, loss: str, kind: str | None) -> str:
        return real(arch, loss, kind) + ("-edited" if loss == "kd" else "")

    monkeypatch.setattr(reuse, "code_version", edited)
    after = stage(p, workspace, "full", "out")
    kd = [r for r in after if r["loss"] == "kd"]
    assert kd and trained_reused(capsys) == (len(kd), len(after) - len(kd))
    assert {r["student_key"] for r in kd}.isdisjoint({r["student_key"] for r in before})


def test_code_version_reads_the_modules_a_student_runs_and_no_other():
    files = {str(f) for f in reuse.closure(reuse.STUDENT_SCRIPT, registry_loads=False)}
    assert "src/kdsweep/losses.py" in files and "src/kdsweep/students/fit.py" in files
    # the vision models are on a ResNet student's path only: editing them retrains no 1D CNN
    assert "src/kdsweep/models/vision.py" not in files
    assert reuse.code_version("cnn1d", "kd", "full") != reuse.code_version("resnet20", "kd", "full")
    assert reuse.code_version("cnn1d", "kd", "full") == reuse.code_version("mlp", "kd", "full")


def test_a_changed_cache_retrains_its_readers(workspace, capsys):
    p = params()
    stage(p, workspace, "top3", "out")
    capsys.readouterr()
    raw = tiny_raw()
    raw["cache"]["stores"]["top3"]["dtype"] = "float32"  # other rows, same store name
    data = workspace / "data"
    shutil.rmtree(data / "logits/top3.zarr")  # as DVC removes a stage's outputs before it runs
    build_cache(
        parse_params(raw),
        "top3",
        load_prepared(data / "prepared"),
        data / "teachers/main.safetensors",
        data / "logits/top3.zarr",
        data / "summaries/top3.json",
    )
    rows = stage(p, workspace, "top3", "out")
    assert trained_reused(capsys) == (len(rows), 0)


def test_an_unreadable_previous_output_means_training_from_scratch(workspace, capsys):
    p = params()
    (workspace / "out").mkdir()
    (workspace / "out/runs.json").write_text("[{truncated")
    rows = stage(p, workspace, None, "out")
    assert trained_reused(capsys) == (len(rows), 0)


@pytest.mark.e2e
def test_dask_local_cluster_writes_what_the_local_executor_writes(workspace, capsys):
    local = stage(params(), workspace, "full", "local")
    dask = stage(
        params(student__executor="dask", student__dask={"workers": 2}), workspace, "full", "dask"
    )
    assert "executor: dask" in capsys.readouterr().out
    assert strip(dask) == strip(local)


def test_local_workers_side_by_side_write_what_one_worker_writes(workspace, capsys):
    """Two stacks at once in threads of the stage (`student.workers`: the default on a 2-core
    CPU) write the rows one worker writes: the stacks are split to give both a share, and a
    student's row depends neither on its stack's other members nor on the thread it ran in."""
    one = stage(params(student__workers=1), workspace, "full", "one")
    capsys.readouterr()
    two = stage(params(student__workers=2), workspace, "full", "two")
    assert capsys.readouterr().out.count("students done") >= 2  # it did run several stacks
    assert strip(two) == strip(one)


def test_a_failed_local_stack_stops_the_others_and_keeps_the_finished(monkeypatch):
    """A stack that raises cancels the stacks not yet started; the one training beside it
    finishes and its rows are handed over before the error is raised."""
    from kdsweep.students import executor

    started, handed, second = [], [], threading.Event()

    def fake(p, inputs, run, stack, keys, planned):
        started.append(stack.members[0])
        if stack.members[0] == 0:
            second.wait(10)  # fail while stack 1 trains
            raise KdsweepError("stack 0 failed")
        second.set()
        time.sleep(0.3)
        return [{"student": stack.members[0]}]

    monkeypatch.setattr(executor, "train_stack", fake)
    stacks = [Stack((i,), "sequential") for i in range(6)]
    with pytest.raises(KdsweepError, match="stack 0 failed"):
        executor.run_stacks(params(student__workers=2), None, "run", stacks, {}, handed.extend)
    assert handed == [{"student": 1}]  # finished beside the failure: kept
    assert sorted(started) == [0, 1]  # stacks 2-5 never started


@pytest.mark.e2e
def test_a_killed_worker_s_stack_is_retried_and_no_partial_row_is_written(workspace):
    from distributed import Client, LocalCluster

    steps = {"mode": "steps", "value": 400, "min_epochs": 0}  # stacks long enough to kill one
    local = stage(params(student__budget=steps), workspace, None, "local")
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster:
        p = params(
            student__budget=steps,
            student__executor="dask",
            student__dask={"address": cluster.scheduler_address},
        )
        result: dict = {}
        run = threading.Thread(target=lambda: result.update(rows=stage(p, workspace, None, "d")))
        run.start()
        with Client(cluster) as client:
            killed = None
            deadline = time.time() + 120
            while killed is None and time.time() < deadline:
                busy = [w for w, tasks in client.processing().items() if tasks]
                if busy:
                    pid = client.run(os.getpid, workers=[busy[0]])[busy[0]]
                    os.kill(pid, signal.SIGKILL)
                    killed = busy[0]
                time.sleep(0.2)
            assert killed is not None, "no stack was ever seen running"
        run.join(timeout=300)
    assert not run.is_alive()
    assert strip(result["rows"]) == strip(local)
    assert len({r["student_key"] for r in result["rows"]}) == len(local)


def test_a_worker_unlike_the_planning_stage_refuses_to_train(workspace):
    """Keys record the stage's device and threads; a worker on other hardware would write rows
    under keys that do not describe them."""
    p = params()
    gpu = {"device": "cuda", "threads": None}
    with pytest.raises(KdsweepError, match="planned {'device': 'cuda'"):
        train_stack(p, inputs(workspace, None), "run", Stack((0,), "sequential"), {0: "k"}, gpu)


def test_relative_input_paths_reach_workers_absolute(workspace, monkeypatch):
    from kdsweep.students import stage as stage_module

    seen, real = [], stage_module.run_stacks
    monkeypatch.setattr(
        stage_module, "run_stacks", lambda p, inp, *a: seen.append(inp) or real(p, inp, *a)
    )
    rel = StageInputs(Path("data/prepared"), Path("data/logits/full.zarr"))
    run_student_stage(params(), rel, workspace / "out")
    assert seen and all(Path(v).is_absolute() for v in astuple(seen[0]) if v is not None)
