"""The vision path through `dvc repro`, end to end: conf/track/cifar100.yaml shrunk to a generated
ImageFolder of easy 40×40 PNGs, with an augmented teacher and two cached views per image.

Checks what a new user would: the teacher is as accurate on its cached views as on its test
images, every method's student is far above chance, and the report carries the diagnostics.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from bench.common import dvc_env, temp_repo
from tests.conftest import set_teachers

REPO = Path(__file__).resolve().parents[1]
HUES = np.array(
    [[230, 40, 40], [40, 200, 40], [40, 80, 230], [230, 200, 30], [200, 40, 220]], np.float32
)


def write_easy_imagefolder(
    root: Path,
    per_class: tuple[int, int] = (120, 30),
    noise: float = 60.0,
    size: int = 40,
    seed: int = 0,
) -> int:
    """`root/{train,test}/<class>/<i>.png`: 10 classes, each a colour (5, jittered per image) ×
    stripe orientation (2), with a random stripe period and phase and pixel noise of std `noise`
    (out of 255) — the class survives crops and flips, so an easy task for an augmented teacher.
    Returns the number of classes."""
    rng = np.random.default_rng(seed)
    grid = np.arange(size, dtype=np.float32)
    for split, n in zip(("train", "test"), per_class, strict=True):
        for c in range(2 * len(HUES)):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(n):
                along = grid[:, None] if c % 2 else grid[None, :]  # horizontal or vertical
                period = rng.uniform(6, 10)
                stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (along / period + rng.random()))
                colour = HUES[c // 2] * rng.uniform(0.6, 1.4, 3)
                img = stripes[..., None] * colour + rng.normal(0, noise, (size, size, 3))
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{i}.png")
    return 2 * len(HUES)


def imagefolder_params(root: Path, n_train: int, n_test: int) -> dict:
    """conf/track/cifar100.yaml shrunk to the generated ImageFolder (the issue's setting)."""
    raw = yaml.safe_load((REPO / "conf/track/cifar100.yaml").read_text())
    raw["data"] = {"name": "imagefolder", "root": str(root), "n_train": n_train, "n_test": n_test}
    raw["alphas"] = [0.1, 1.0]
    raw["subset_seeds"] = [0]
    set_teachers(raw, arch="resnet20", width=8, epochs=3, batch_size=64, lr=0.003)
    raw["cache"].update(chunk_rows=512, batch_size=256)
    raw["cache"]["stores"] = {
        "full": {"teacher": "main", "kind": "full", "dtype": "float16", "views": 2}
    }
    raw["student"].update(
        arch="vit",
        width=32,
        budget={"mode": "steps", "value": 60},
        batch_size=64,
        lr=0.003,
        train_seeds=[0],
    )
    raw["methods"] = {k: raw["methods"][k] for k in ("ce", "ls", "kd", "ls_matched")}
    raw["sweep"] = {"methods": ["ce", "ls", "kd", "ls_matched"]}
    raw["analysis"] = {"baseline": "ce", "reference": "kd", "controls": ["ls_matched"]}
    return raw


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_dvc_repro_on_an_imagefolder_with_views(tmp_path: Path) -> None:
    classes = write_easy_imagefolder(tmp_path / "images", per_class=(50, 20), noise=20.0)
    raw = imagefolder_params(tmp_path / "images", 50 * classes, 20 * classes)
    raw["alphas"] = [1.0]  # CI-sized: one student per method, smaller batches
    set_teachers(raw, epochs=8, batch_size=32)  # 128 steps: a confident teacher
    raw["student"]["batch_size"] = 32
    repo = temp_repo(yaml.safe_dump(raw))
    res = subprocess.run(
        ["dvc", "repro"],
        cwd=repo,
        env={**dvc_env(), "OMP_NUM_THREADS": "1"},  # two cores shared: one thread is faster
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    summary = json.loads((repo / "data/summaries/full.json").read_text())
    assert summary["views"] == 2 and summary["diagnostic_rows"] == 50 * classes
    assert summary["teacher_test_acc"] > 0.8
    # the augmented teacher is as good on its cached views as on clean test images
    assert summary["teacher_view_acc"] > summary["teacher_test_acc"] - 0.05

    runs = pq.read_table(repo / "data/results/runs.parquet").to_pylist()
    assert {r["method"] for r in runs} == {"ce", "ls", "kd", "ls_matched"}
    for r in runs:  # chance is 0.1: every method learns the easy task from the same views
        assert r["test_acc"] > 0.5, (r["method"], r["alpha"], r["test_acc"])

    report = (repo / "reports/report.md").read_text()
    assert "## Teacher targets" in report and "V seeded augmented views" in report
    assert "| full | 4 |" in report  # the soft-target row at the KD τ
