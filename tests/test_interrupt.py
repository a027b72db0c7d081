"""Kill a stage process at several points (SIGKILL, no cleanup), re-run it: the result equals an
uninterrupted run and nothing half-written is ever left in place."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from kdsweep.io import weights_fingerprint
from tests.conftest import tiny_raw

STAGES = Path(__file__).resolve().parents[1] / "stages"


def start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def finish(*args: str) -> None:
    proc = start(*args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-3000:]


def kill_after(delay: float, *args: str) -> None:
    proc = start(*args)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def store_arrays(path: Path) -> dict:
    g = zarr.open_group(path, mode="r")
    return {f"{s}/{n}": g[s][n][:] for s in ("train", "test") for n in g[s].array_keys()} | {
        "attrs": g.attrs.asdict()
    }


@pytest.mark.parametrize("delay", [1.5, 3.0, 4.5])
def test_killed_cache_stage_resumes_to_the_uninterrupted_store(workspace, delay):
    raw = tiny_raw()
    raw["cache"]["chunk_rows"] = 8  # many chunks, so kills land mid-write
    raw["cache"]["batch_size"] = 4
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    finish(str(STAGES / "cache.py"), "top3")
    reference = store_arrays(Path("data/logits/top3.zarr"))
    os.rename("data/logits/top3.zarr", "data/logits/reference.zarr")
    kill_after(delay, str(STAGES / "cache.py"), "top3")
    if Path("data/logits/top3.zarr").exists():  # the kill came after the final rename
        assert zarr.open_group("data/logits/top3.zarr", mode="r").attrs["complete"] is True
    finish(str(STAGES / "cache.py"), "top3")
    got = store_arrays(Path("data/logits/top3.zarr"))
    assert got.keys() == reference.keys()
    for k, v in reference.items():
        assert (v == got[k]) if k == "attrs" else np.array_equal(v, got[k]), k
    assert not Path("data/logits/top3.zarr.partial").exists()


@pytest.mark.parametrize("delay", [2.0, 4.0])
def test_killed_teacher_stage_reruns_to_the_identical_checkpoint(workspace, delay):
    raw = tiny_raw()
    raw["teacher"]["epochs"] = 6
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    finish(str(STAGES / "teacher.py"))
    reference = weights_fingerprint(Path("data/teachers/main.safetensors"))
    Path("data/teachers/main.safetensors").unlink()
    kill_after(delay, str(STAGES / "teacher.py"))
    leftovers = [p.name for p in Path("data/teachers").iterdir() if p.name.startswith(".")]
    finish(str(STAGES / "teacher.py"))
    assert weights_fingerprint(Path("data/teachers/main.safetensors")) == reference
    assert all(not Path("data/teachers", n).exists() or n.startswith(".") for n in leftovers)


def test_killed_student_stage_leaves_no_partial_results(workspace):
    raw = tiny_raw()
    raw["student"]["budget"]["value"] = 400
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    out = Path("data/students/student-1.0")
    kill_after(3.0, str(STAGES / "student.py"), "1.0", "main", str(out))
    assert not (out / "runs.json").exists()
    finish(str(STAGES / "student.py"), "1.0", "main", str(out))
    assert (out / "runs.json").exists()
