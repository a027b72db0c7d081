"""Kill a writer process (SIGKILL: no cleanup, no finally) and run it again: the result equals an
uninterrupted run, a cache writer resumes instead of starting over, and nothing half-written or
temporary is left in place.

A kill is only ever triggered by something the writer did (its first progress record in the
partial store, a line it printed), never after a fixed delay, and each test checks where the kill
landed before it checks the recovery.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from kdsweep.cache.format import StoreSpec, partial_path
from kdsweep.cache.writer import write_cache
from kdsweep.io import (
    atomic_path,
    atomic_write_json,
    remove_stale_temps,
    temp_path,
    weights_fingerprint,
)
from tests.conftest import set_teachers, tiny_raw

ROOT = Path(__file__).resolve().parents[1]
STAGES = ROOT / "stages"


# --- helpers ---------------------------------------------------------------------------------


def start(*args: str, stdout: int = subprocess.DEVNULL) -> subprocess.Popen:
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT)])  # kdsweep, and tests for WRITER
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    return subprocess.Popen(
        [sys.executable, *args], env=env, stdout=stdout, stderr=subprocess.PIPE, text=True
    )


def finish(*args: str) -> None:
    proc = start(*args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]


def wait_until(cond: Callable[[], bool], proc: subprocess.Popen, what: str) -> None:
    """Poll `cond` until it holds; fail if the process exits first (pytest-timeout bounds it)."""
    while not cond():
        if proc.poll() is not None:
            pytest.fail(
                f"the writer exited ({proc.returncode}) before {what}: {proc.stderr.read()}"
            )
        time.sleep(0.001)


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    proc.stderr.close()
    if proc.stdout:
        proc.stdout.close()


def kill_after_line(prefix: str, *args: str) -> int:
    """Start a stage, SIGKILL it as soon as it prints a line starting with `prefix`; its pid."""
    proc = start(*args, stdout=subprocess.PIPE)
    for line in proc.stdout:
        if line.startswith(prefix):
            break
    else:
        pytest.fail(f"{args[0]} exited ({proc.wait()}) without printing {prefix!r}")
    kill(proc)
    return proc.pid


def progress(store: Path) -> dict[str, list[int]]:
    """The chunks each split's writer recorded as finished (rank 0)."""
    return json.loads((partial_path(store) / "progress.0.json").read_text())


def tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` by relative path: bit-for-bit comparison of two stores, which also
    sees any file one of them has and the other has not (temporaries included)."""
    return {
        str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()
    }


def chunk_stats(store: Path, chunks: dict[str, list[int]]) -> dict[str, tuple[int, int]]:
    """(inode, mtime in ns) of every file holding one of the given chunks, any array."""
    out = {}
    for split, ids in chunks.items():
        for array in (store / split).iterdir():
            for i in ids:
                node = array / "c" / str(i)
                for f in [node] if node.is_file() else node.rglob("*"):
                    if f.is_file():
                        st = f.stat()
                        out[str(f.relative_to(store))] = (st.st_ino, st.st_mtime_ns)
    return out


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- temporaries of dead writers -------------------------------------------------------------


def test_atomic_path_removes_only_dead_writers_temporaries(tmp_path):
    final = tmp_path / "runs.json"
    dead, live = dead_pid(), os.getppid()
    stale = temp_path(final, dead)
    stale.write_text("half")
    stale_dir = temp_path(tmp_path / "weights.safetensors", dead)
    stale_dir.mkdir()
    (stale_dir / "part").write_text("half")
    keep = [
        temp_path(final, live),  # a live process is writing it
        temp_path(final, os.getpid()),  # this process
        tmp_path / f".{final.name}.tmpfoo",  # not a pid
        temp_path(tmp_path / "other.json", dead),  # another file's: left to its own writer
    ]
    for k in keep:
        k.write_text("x")
    atomic_write_json(final, {"a": 1})
    assert json.loads(final.read_text()) == {"a": 1}
    assert not stale.exists()
    assert all(k.exists() for k in keep[:1] + keep[2:])
    assert not keep[1].exists()  # this process's own temporary name was reused and renamed
    # every name at once, directories too
    removed = remove_stale_temps(tmp_path)
    assert set(removed) == {stale_dir, keep[3]}
    assert not stale_dir.exists() and keep[0].exists() and keep[2].exists()


def test_atomic_path_leaves_nothing_when_the_block_fails(tmp_path):
    final = tmp_path / "x.json"
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


# --- a cache writer, killed mid-write, resumes -----------------------------------------------

C, N_TRAIN, N_TEST, CHUNK = 10, 96, 32, 8  # 12 + 4 chunks
STALL_AT = 5  # the killed writer blocks before computing its 6th train chunk

WRITER = textwrap.dedent(
    """
    import sys, threading
    from pathlib import Path
    from tests.test_interrupt import CHUNK, STALL_AT, SPEC, inputs, teacher
    from kdsweep.cache.writer import write_cache

    calls = 0

    def stalling_teacher(x):
        global calls
        calls += 1
        if calls > 2 + STALL_AT:  # 2 one-row shape probes, then one call per chunk
            threading.Event().wait()  # blocks until killed
        return teacher(x)

    write_cache(Path(sys.argv[1]), stalling_teacher, inputs(), SPEC, 10, "t", "d", CHUNK)
    """
)
SPEC = StoreSpec(kind="sampled", k=4, dtype="float32", chunk_rows=CHUNK)


def teacher(x: torch.Tensor) -> torch.Tensor:
    return x[:, :C] * 3.0


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "train": torch.randn(N_TRAIN, 16, generator=g),
        "test": torch.randn(N_TEST, 16, generator=g),
    }


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_killed_cache_writer_resumes_from_its_progress(tmp_path):
    reference = tmp_path / "reference.zarr"
    write_cache(reference, teacher, inputs(), SPEC, C, "t", "d", CHUNK)
    store = tmp_path / "c.zarr"
    proc = start("-c", WRITER, str(store))
    first = partial_path(store) / "progress.0.json"
    wait_until(first.exists, proc, "its first progress record")
    wait_until(lambda: len(progress(store)["train"]) == STALL_AT, proc, "it stalled")
    kill(proc)

    # the kill landed mid-write: a partial store, some chunks recorded, nothing in place
    total = -(-N_TRAIN // CHUNK) + -(-N_TEST // CHUNK)
    done = progress(store)
    assert done == {"train": list(range(STALL_AT))} and STALL_AT < total
    assert not store.exists()
    # what a writer killed inside its atomic progress write or a zarr chunk write leaves behind
    leftovers = [
        temp_path(partial_path(store) / "progress.0.json", proc.pid),
        partial_path(store)
        / "train"
        / "indices"
        / "c"
        / str(STALL_AT)
        / f"0.{uuid.uuid4().hex}.partial",
    ]
    for f in leftovers:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"half")

    rows = {"n": 0}

    def counting_teacher(x: torch.Tensor) -> torch.Tensor:
        rows["n"] += len(x)
        return teacher(x)

    write_cache(store, counting_teacher, inputs(), SPEC, C, "t", "d", CHUNK)
    # it resumed: only the unrecorded chunks were computed (plus the two one-row shape probes)
    assert rows["n"] == 2 + N_TRAIN + N_TEST - STALL_AT * CHUNK
    # ... into the store an uninterrupted writer makes, file for file, bit for bit
    assert tree(store) == tree(reference)
    assert not partial_path(store).exists()
    assert not any(f.exists() for f in leftovers)


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_killed_cache_stage_resumes_to_the_uninterrupted_store(workspace):
    raw = tiny_raw()
    raw["cache"]["chunk_rows"] = 2  # hundreds of chunks: seconds of writing to land a kill in
    raw["cache"]["batch_size"] = 2
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    logits = Path("data/logits")

    def stage(out: Path) -> list[str]:
        return [
            str(STAGES / "cache.py"),
            "top3",
            "--prepared=data/prepared",
            "--checkpoint=data/teachers/main.safetensors",
            f"--out={out}",
            f"--summary=data/summaries/{out.stem}.json",
        ]

    finish(*stage(logits / "reference.zarr"))
    store = logits / "top3.zarr"
    shutil.rmtree(store)
    proc = start(*stage(store))
    first = partial_path(store) / "progress.0.json"
    wait_until(first.exists, proc, "its first progress record")
    kill(proc)

    # the kill landed mid-write
    total = sum(-(-n // 2) for n in (raw["data"]["n_train"], raw["data"]["n_test"]))
    done = progress(store)
    recorded = sum(len(v) for v in done.values())
    assert partial_path(store).is_dir() and not store.exists()
    assert 0 < recorded < total, f"the kill came after {recorded} of {total} chunks"
    untouched = chunk_stats(partial_path(store), done)
    assert untouched

    finish(*stage(store))
    assert tree(store) == tree(logits / "reference.zarr")  # no leftover, no difference
    assert not partial_path(store).exists()
    # it resumed: the chunks recorded before the kill were not written again (same inode, same
    # modification time), so the resumed run wrote only the other total - recorded chunks
    assert chunk_stats(store, done) == untouched


# --- teacher and student stages: reruns after a kill ----------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_killed_teacher_stage_reruns_to_the_identical_checkpoint(workspace):
    raw = tiny_raw()
    set_teachers(raw, epochs=6)
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    teachers = Path("data/teachers")
    args = (
        str(STAGES / "teacher.py"),
        "main",
        "--prepared=data/prepared",
        f"--out={teachers / 'main.safetensors'}",
    )
    finish(*args)
    reference = weights_fingerprint(teachers / "main.safetensors")
    (teachers / "main.safetensors").unlink()
    # killed right after training, while it saves: the work report precedes the checkpoints
    pid = kill_after_line("kdsweep work: train", *args)
    stale = temp_path(teachers / "main.safetensors", pid)  # as a kill inside the save leaves it
    if not stale.exists():
        stale.write_bytes(b"half")
    finish(*args)
    assert weights_fingerprint(teachers / "main.safetensors") == reference
    assert not stale.exists()
    assert not [p.name for p in teachers.iterdir() if p.name.startswith(".")]


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_killed_student_stage_leaves_no_partial_results(workspace):
    raw = tiny_raw()
    raw["student"]["budget"]["value"] = 200
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    out = Path("data/students/full")
    args = (
        str(STAGES / "student.py"),
        "--store=full",
        "--logits=data/logits/full.zarr",
        "--reference=data/logits/full.zarr",
        "--prepared=data/prepared",
        "--checkpoint=data/teachers/main.safetensors",
        f"--out={out}",
    )
    # killed after training, while it evaluates the students and writes runs.json
    kill_after_line("kdsweep work: train", *args)
    runs = out / "runs.json"
    if runs.exists():  # the kill came after the atomic rename: then it is whole
        assert isinstance(json.loads(runs.read_text()), list)
    finish(*args)
    assert len(json.loads(runs.read_text())) > 0
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_killed_student_stage_resumes_with_only_its_unfinished_stacks(workspace):
    """SIGKILL after a random number of finished stacks: the re-run trains exactly the students
    whose stack had not finished, and its runs.json equals an uninterrupted run's."""
    raw = tiny_raw()
    raw["alphas"] = [0.05, 0.1, 0.5, 1.0]
    raw["sweep"]["methods"] = ["ce", "ls", "kd"]
    raw["student"]["threads"] = 1  # the same rounding in every run
    # an epochs budget: each α its own step count, so its own stack (ce and ls stack together)
    raw["student"]["budget"] = {"mode": "epochs", "value": 20}
    Path("params.yaml").write_text(yaml.safe_dump(raw))

    def args(out: str) -> tuple[str, ...]:
        return (
            str(STAGES / "student.py"),
            "--reference=data/logits/full.zarr",
            "--prepared=data/prepared",
            f"--out=data/students/{out}",
        )

    finish(*args("reference"))
    reference = json.loads(Path("data/students/reference/runs.json").read_text())
    n_stacks = len({r["alpha"] for r in reference})
    assert n_stacks == 4 and len(reference) == 16
    after = random.randint(1, n_stacks - 1)
    proc = start(*args("labels"), stdout=subprocess.PIPE)
    seen = 0
    for line in proc.stdout:
        seen += "students done" in line
        if seen == after:
            break
    kill(proc)
    out = Path("data/students/labels")
    assert seen == after, f"the stage ended after {seen} stacks, before the kill"
    assert not (out / "runs.json").exists()
    stacks = sorted(out.glob("stack-*.json"))
    durable = {r["student_key"] for f in stacks for r in json.loads(f.read_text())}
    assert len(stacks) >= after and len(durable) >= 4 * after  # each reported stack is on disk

    proc = start(*args("labels"), stdout=subprocess.PIPE)
    stdout, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    line = next(x for x in stdout.splitlines() if "students, reused" in x).split()
    trained, reused = int(line[line.index("trained") + 1]), int(line[line.index("reused") + 1])
    assert (trained, reused) == (len(reference) - len(durable), len(durable))
    rows = json.loads((out / "runs.json").read_text())
    strip = lambda rs: [{k: v for k, v in r.items() if k != "train_seconds"} for r in rs]  # noqa: E731
    assert strip(rows) == strip(reference)
    assert sorted(p.name for p in out.iterdir()) == ["runs.json"]  # stack files merged away


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_interrupted_student_stage_stops_at_once_and_keeps_its_finished_stacks(workspace):
    """Ctrl-C (SIGINT) while two stacks train side by side (`student.workers`): the stage exits
    at once (130) rather than waiting for the stacks in flight, the finished stacks' rows stay
    on disk, and the re-run reuses them."""
    raw = tiny_raw()
    raw["alphas"] = [0.05, 0.1, 0.5, 1.0]
    raw["sweep"]["methods"] = ["ce", "ls", "kd"]
    raw["student"].update(threads=1, workers=2)
    raw["student"]["budget"] = {"mode": "epochs", "value": 60}  # long enough to be caught
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    args = (
        str(STAGES / "student.py"),
        "--reference=data/logits/full.zarr",
        "--prepared=data/prepared",
        "--out=data/students/labels",
    )
    proc = start(*args, stdout=subprocess.PIPE)
    for line in proc.stdout:
        if "students done" in line:
            break
    else:
        pytest.fail(f"the stage exited ({proc.wait()}) before a stack finished")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted" in err
    out = Path("data/students/labels")
    durable = {
        r["student_key"] for f in out.glob("stack-*.json") for r in json.loads(f.read_text())
    }
    assert durable and not (out / "runs.json").exists()
    proc = start(*args, stdout=subprocess.PIPE)
    stdout, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    line = next(x for x in stdout.splitlines() if "students, reused" in x).split()
    assert int(line[line.index("reused") + 1]) == len(durable)
