"""End to end through DVC itself, in a temporary copy of the repository with tiny params.

One pipeline is built per module and reused: `dvc repro`, a no-op second repro, a one-method
change, `dvc exp run -S`, and a teammate's clone that pulls teachers and caches from a local
remote and trains students without running the teacher or cache stages.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import tiny_raw

REPO = Path(__file__).resolve().parents[1]


def e2e_params() -> dict:
    raw = tiny_raw()
    raw["cache"]["stores"] = {k: raw["cache"]["stores"][k] for k in ("full", "top3")}
    raw["methods"] = {k: raw["methods"][k] for k in ("ce", "kd", "ls_matched", "kd_top3")}
    raw["methods"]["kd"]["tau"] = 4
    raw["sweep"] = {
        "methods": ["ce", "kd", "ls_matched"],
        "ablation_alphas": [0.05],
        "ablation_methods": ["kd_top3"],
    }
    raw["analysis"] = {"controls": ["ls_matched"], "n_boot": 100}
    return raw


def run(cwd: Path, *cmd: str) -> str:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
    }
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    )
    return res.stdout + res.stderr


def stages_run(log: str) -> list[str]:
    return sorted(
        line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage")
    )


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    repo = root / "repo"
    repo.mkdir()
    for item in ("dvc.yaml", "stages", "src", ".dvcignore", ".gitignore"):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / item)
    shutil.copytree(REPO / ".dvc", repo / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    (repo / "params.yaml").write_text(yaml.safe_dump(e2e_params()))
    run(repo, "git", "init", "-q")
    run(repo, "git", "config", "user.email", "ci@example.com")
    run(repo, "git", "config", "user.name", "ci")
    run(repo, "dvc", "remote", "add", "-f", "-d", "local", str(root / "remote"))
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "init")
    log = run(repo, "dvc", "repro")
    assert "prepare" in stages_run(log) and "aggregate" in stages_run(log)
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "repro")
    return repo


def test_repro_produces_results_report_and_figures(repo):
    runs = pq.read_table(repo / "data/results/runs.parquet")
    assert runs.num_rows == (2 * 3 + 1) * 2  # (alphas × methods + ablation) × subset seeds
    assert set(runs.column("method").to_pylist()) == {"ce", "kd", "ls_matched", "kd_top3"}
    metrics = json.loads((repo / "metrics.json").read_text())
    assert metrics
    report = (repo / "reports/report.md").read_text()
    assert "kd" in report and "ls_matched" in report
    pngs = list((repo / "reports/figures").glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)


def test_second_repro_is_a_no_op(repo):
    assert stages_run(run(repo, "dvc", "repro")) == []


def _rows(repo: Path) -> dict[tuple, dict]:
    rows = pq.read_table(repo / "data/results/runs.parquet").to_pylist()
    drop = ("train_seconds", "git_rev")
    return {
        (r["method"], r["alpha"], r["subset_seed"]): {k: v for k, v in r.items() if k not in drop}
        for r in rows
    }


def test_changing_one_method_reruns_students_but_no_teacher_or_cache(repo):
    """Each student stage trains all methods of one α in one process, so a method's change re-runs
    the student stages; every other method's rows come out identical (deterministic on CPU)."""
    before = _rows(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["methods"]["kd"]["tau"] = 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    ran = stages_run(run(repo, "dvc", "repro"))
    assert ran == ["ablation@0.05", "aggregate", "report", "student@0.05", "student@1.0"]
    after = _rows(repo)
    assert after.keys() == before.keys()
    for key, row in after.items():
        if key[0] == "kd":
            assert row["tau"] == 2 and before[key]["tau"] == 4
        else:
            assert row == before[key], key
    run(repo, "git", "checkout", "params.yaml", "dvc.lock")
    run(repo, "dvc", "checkout", "-q")


def test_dvc_exp_run_with_a_param_and_exp_show(repo):
    run(repo, "dvc", "exp", "run", "-S", "methods.kd.tau=1")
    shown = run(repo, "dvc", "exp", "show", "--json")
    exps = json.loads(shown[shown.index("[") :])
    text = json.dumps(exps)
    assert "metrics.json" in text and '"tau": 1' in text


def test_teammate_pulls_teachers_and_caches_and_never_runs_them(repo, tmp_path):
    run(repo, "dvc", "push", "-q")
    clone = tmp_path / "clone"
    run(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    run(clone, "dvc", "pull", "-q", "prepare", "teacher", "cache@full", "cache@top3")
    assert (clone / "data/logits/full.zarr").is_dir()
    shown = run(clone, "dvc", "status", "--json")
    status = json.loads(shown[shown.index("{") :])
    students = {k: v for k, v in status.items() if k.startswith(("student@", "ablation@"))}
    assert len(students) == 3  # their outputs were not pulled...
    for stage, changes in students.items():  # ...but every input they read was
        deps = [c["changed deps"] for c in changes if isinstance(c, dict) and "changed deps" in c]
        assert not deps, (stage, deps)  # e.g. the writer's lock files beside the stores
    ran = stages_run(run(clone, "dvc", "repro"))
    assert ran and not any(s.startswith(("prepare", "teacher", "cache")) for s in ran), ran
    assert "aggregate" in ran and pq.read_table(clone / "data/results/runs.parquet").num_rows == 14


def test_queued_experiments_run_in_parallel_workers(repo):
    """`dvc exp run --queue` + `dvc queue start -j 2`: two τ values, two workers, both finish."""
    import time

    for tau in (3, 5):
        run(repo, "dvc", "exp", "run", "--queue", "-S", f"methods.kd.tau={tau}")
    run(repo, "dvc", "queue", "start", "-j", "2")
    deadline = time.time() + 400
    while time.time() < deadline:
        status = run(repo, "dvc", "queue", "status")
        if not any(w in status for w in ("Queued", "Running")):
            break
        time.sleep(3)
    assert "Failed" not in status, status
    assert status.count("Success") >= 2, status
    shown = run(repo, "dvc", "exp", "show", "--json")
    text = json.dumps(json.loads(shown[shown.index("[") :]))
    assert '"tau": 3' in text and '"tau": 5' in text
