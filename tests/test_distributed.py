"""torchrun on CPU (gloo): a 2-process cache equals the 1-process one; DDP teacher training works."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
import zarr

from kdsweep import pipeline
from kdsweep.config import parse_params
from kdsweep.data import load_prepared
from kdsweep.io import weights_fingerprint
from tests.conftest import tiny_raw

STAGES = Path(__file__).resolve().parents[1] / "stages"


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
    single = Path("data/logits/sampled4.zarr")  # built single-process by the fixture
    Path("data/logits/single.zarr").parent.mkdir(exist_ok=True)
    os.rename(single, "data/logits/single.zarr")
    torchrun(str(STAGES / "cache.py"), "sampled4")
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
    torchrun(str(STAGES / "teacher.py"))
    assert weights_fingerprint(Path("data/teachers/main.safetensors")) != before
    model, fp = pipeline.load_teacher(
        parse_params(raw), "main", load_prepared(Path("data/prepared"))
    )
    assert len(fp) == 64 and model.head.out_features == 10
