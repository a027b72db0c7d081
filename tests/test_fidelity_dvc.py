"""conf/track/fidelity.yaml through `dvc repro`, shrunk to CI size: an online store (fresh views),
cached views, a bfloat16 store, top-k and sampled stores with draw sets, and the report's Cache
fidelity section measured against online KD."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from bench.common import dvc_env, temp_repo
from tests.conftest import set_teachers

REPO = Path(__file__).resolve().parents[1]
KEEP = ("online", "full16", "bf16", "v4", "top2", "s4_r8")


@pytest.mark.e2e
@pytest.mark.timeout(400)
def test_fidelity_params_run_through_dvc_with_the_fidelity_section(tmp_path: Path) -> None:
    raw = yaml.safe_load((REPO / "conf/track/fidelity.yaml").read_text())
    raw["data"].update(n_train=1000, n_test=300)
    raw["alphas"], raw["subset_seeds"] = [0.1, 1.0], [0, 1, 2]
    set_teachers(raw, width=16, epochs=4)
    raw["student"].update(width=8, budget={"mode": "steps", "value": 60, "eval_every": 30})
    raw["cache"]["stores"] = {k: raw["cache"]["stores"][k] for k in KEEP}
    methods = ["ce", *(f"kd_{k}" for k in KEEP), "kd_top2_spread"]
    raw["methods"] = {k: v for k, v in raw["methods"].items() if k in methods}
    raw["sweep"] = {"methods": methods}
    repo = temp_repo(yaml.safe_dump(raw))
    res = subprocess.run(
        ["dvc", "repro"],
        cwd=repo,
        env={**dvc_env(), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=380,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "cache@online" in res.stdout and "student@online" in res.stdout

    assert not (repo / "data/logits/online.zarr/train").exists()  # an online store: no rows
    sizes = {k: json.loads((repo / f"data/summaries/{k}.json").read_text()) for k in KEEP}
    assert sizes["online"]["train_bytes_per_row"] == 0 and sizes["online"]["views"] == "fresh"
    assert sizes["v4"]["train_bytes_per_row"] > 3 * sizes["full16"]["train_bytes_per_row"]
    assert sizes["s4_r8"]["draws"] == 8
    assert sizes["online"]["teacher_view_acc"] is not None  # measured on fresh views

    runs = pq.read_table(repo / "data/results/runs.parquet").to_pylist()
    assert {r["method"] for r in runs} == set(methods)
    assert len(runs) == len(methods) * 2 * 3
    online = [r for r in runs if r["method"] == "kd_online"]
    assert {r["cache_kind"] for r in online} == {"online"}
    assert {r["train_path"] for r in online} == {"stacked"}  # fresh views stack too

    report = (repo / "reports/report.md").read_text()
    assert "## Cache fidelity" in report and "teacher run online on every batch" in report
    for store in KEEP[1:]:
        assert f"| {store} |" in report, store
    for alpha in ("0.1", "1"):  # one verdict sentence per α
        assert f"- α = {alpha}: " in report
