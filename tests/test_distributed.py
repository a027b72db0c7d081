"""torchrun on CPU (gloo): a 2-process cache equals the 1-process one; DDP teacher training works.

The stage scripts run with the command lines dvc.yaml gives them (paths as options)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from kdsweep.config import parse_params
from kdsweep.data.prepared import load_prepared
from kdsweep.io import load_checkpoint, weights_fingerprint
from kdsweep.teacher import teacher_model
from tests.conftest import student_stage, tiny_raw

STAGES = Path(__file__).resolve().parents[1] / "stages"

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def torchrun(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        *args,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def test_two_process_cache_equals_single_process_bit_for_bit(workspace):
    raw = tiny_raw()
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    store = "sampled4"
    single = Path(f"data/logits/{store}.zarr")  # built single-process by the fixture
    os.rename(single, "data/logits/single.zarr")
    teacher = parse_params(raw).cache.stores[store].teacher
    torchrun(
        str(STAGES / "cache.py"),
        store,
        "--prepared",
        "data/prepared",
        "--checkpoint",
        f"data/teachers/{teacher}.safetensors",
        "--out",
        str(single),
        "--summary",
        f"data/summaries/{store}.json",
    )
    a, b = zarr.open_group("data/logits/single.zarr", mode="r"), zarr.open_group(single, mode="r")
    assert a.attrs.asdict() == b.attrs.asdict() and b.attrs["complete"] is True
    for split in ("train", "test"):
        for name in ("indices", "weights"):
            assert np.array_equal(a[split][name][:], b[split][name][:])
            chunks = sorted((single / split / name / "c").rglob("*"))
            assert chunks, "no chunk files written"
            for f in chunks:
                if f.is_file():
                    twin = Path("data/logits/single.zarr") / f.relative_to(single)
                    assert f.read_bytes() == twin.read_bytes(), f


def test_two_process_ddp_teacher_trains_and_its_checkpoint_loads(workspace):
    raw = tiny_raw()
    Path("params.yaml").write_text(yaml.safe_dump(raw))
    before = weights_fingerprint(Path("data/teachers/main.safetensors"))
    out = "data/teachers/main.safetensors"
    torchrun(str(STAGES / "teacher.py"), "main", "--prepared", "data/prepared", "--out", out)
    assert weights_fingerprint(Path("data/teachers/main.safetensors")) != before
    p, prep = parse_params(raw), load_prepared(Path("data/prepared"))
    model = teacher_model(p.teachers["main"], prep)
    load_checkpoint(model, Path("data/teachers/main.safetensors"))
    assert model.head.out_features == prep.splits.num_classes
    # the stores of the old teacher are now refused: their fingerprint is not the new one
    from kdsweep.cache.format import CacheError

    with pytest.raises(CacheError, match="another teacher"):
        student_stage(p, workspace, "full")
