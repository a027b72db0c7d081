"""End to end through DVC itself, in a temporary copy of the repository with tiny params.

One pipeline is built per module (with KDSWEEP_TRACE set, so every stage process records the
params keys it read and the kdsweep modules it imported) and reused: the results, a no-op second
repro, the traced reads against dvc.yaml, code and params edits that mark exactly the stages that
run them, a one-method change, `dvc exp run -S`, a queue, and a teammate's clone that pulls
teachers and caches from a local remote and trains students without running the teacher.
Every test that edits the repository restores it, whatever happens.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from bench.common import temp_repo
from kdsweep.config import parse_params
from tests.conftest import tiny_raw

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[1]


def e2e_params() -> dict:
    raw = tiny_raw()
    raw["track"] = "default"
    keep = ("full", "top3", "random_head")
    raw["cache"]["stores"] = {k: raw["cache"]["stores"][k] for k in keep}
    methods = ("ce", "kd", "ls_matched", "kd_top3", "random_head")
    raw["methods"] = {k: raw["methods"][k] for k in methods}
    raw["methods"]["kd"]["tau"] = 4
    raw["student"]["executor"] = "local"  # present, as in params.yaml, for `-S` to override
    raw["sweep"] = {
        "methods": ["ce", "kd", "ls_matched"],
        "ablation_alphas": [0.05],
        "ablation_methods": ["kd_top3", "random_head"],
    }
    raw["analysis"] = {
        "baseline": "ce",
        "reference": "kd",
        "controls": ["ls_matched"],
        "ci": 0.95,
    }
    return raw


def one_alpha() -> dict:
    """A second track (conf/track/one_alpha.yaml): the e2e pipeline at α = 1 only."""
    raw = e2e_params()
    raw["track"], raw["alphas"], raw["sweep"]["methods"] = "one_alpha", [1.0], ["ce", "kd"]
    return raw


def run(cwd: Path, *cmd: str, env: dict | None = None) -> str:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
        **(env or {}),
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


def trained_reused(log: str) -> dict[str, tuple[int, int]]:
    """What each student stage printed: {output dir: (students trained, students reused)}."""
    found = {}
    for line in log.splitlines():
        if "students, reused" in line:
            out, rest = line.split(": trained ")
            words = rest.split()
            found[Path(out).name] = (int(words[0]), int(words[3]))
    return found


def changed_stages(repo: Path) -> list[str]:
    """The stages `dvc status` reports as changed (their own deps, params or outputs)."""
    shown = run(repo, "dvc", "status", "--json")
    return sorted(json.loads(shown[shown.index("{") :]))


@contextmanager
def edited(repo: Path, rel: str, change) -> Iterator[None]:
    """`change(text) -> text` applied to repo/rel for the block; restored afterwards, always."""
    path = repo / rel
    old = path.read_text()
    path.write_text(change(old))
    try:
        yield
    finally:
        path.write_text(old)


@pytest.fixture(scope="module")
def repo() -> Path:
    repo = temp_repo(
        yaml.safe_dump(e2e_params()), tracks={"one_alpha": yaml.safe_dump(one_alpha())}
    )
    run(repo, "git", "config", "user.email", "ci@example.com")
    run(repo, "git", "config", "user.name", "ci")
    run(repo, "dvc", "remote", "add", "-f", "-d", "local", str(repo.parent / "remote"))
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "init")
    log = run(repo, "dvc", "repro", env={"KDSWEEP_TRACE": str(repo.parent / "trace")})
    assert "prepare" in stages_run(log) and "aggregate" in stages_run(log)
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "repro")
    return repo


def expected_rows(raw: dict) -> int:
    """One row per student: each swept method × its α × subset seeds × train seeds × τ."""
    p = parse_params(raw)
    swept = [*p.sweep.methods, *p.sweep.ablation_methods]
    per_alpha = len(p.subset_seeds) * len(p.student.train_seeds)
    return sum(len(p.alphas_of(m)) * per_alpha * len(p.methods[m].taus) for m in swept)


def test_repro_produces_results_report_and_figures(repo: Path) -> None:
    runs = pq.read_table(repo / "data/results/runs.parquet")
    assert runs.num_rows == expected_rows(e2e_params())
    assert set(runs.column("method").to_pylist()) == set(e2e_params()["methods"])
    metrics = json.loads((repo / "metrics.json").read_text())
    assert metrics["n_runs"] == runs.num_rows
    report = (repo / "reports/report.md").read_text()
    assert "kd" in report and "ls_matched" in report and "top3" in report
    pngs = list((repo / "reports/figures").glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)


def test_second_repro_is_a_no_op(repo: Path) -> None:
    assert stages_run(run(repo, "dvc", "repro")) == []


def _declared(repo: Path) -> dict[str, dict]:
    """Each stage's command, file deps and params keys, as DVC resolves them."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(repo)) as r:
        return {
            st.name: {
                "cmd": st.cmd,
                "deps": {d.def_path for d in st.deps if not isinstance(d, ParamsDependency)},
                "params": [k for d in st.deps if isinstance(d, ParamsDependency) for k in d.params],
            }
            for st in r.index.stages
        }


def test_each_stage_declares_every_key_it_read_and_module_it_imported(repo: Path) -> None:
    """The trace of the repro in the fixture: what each stage process really read and ran."""
    declared = _declared(repo)
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    by_cmd = {tuple(shlex.split(s["cmd"])): name for name, s in declared.items()}
    seen = set()
    for trace in sorted((repo.parent / "trace").glob("*.json")):
        t = json.loads(trace.read_text())
        name = by_cmd[("PYTHONPATH=src", "python", *t["argv"])]
        seen.add(name)
        stage = declared[name]
        for key in t["keys"]:
            cover = [d for d in stage["params"] if key == d or key.startswith(d + ".")]
            assert cover, f"{name} read params key {key!r}, which dvc.yaml does not declare for it"
            node = raw
            for part in cover[0].split("."):
                node = node[part]  # a KeyError: DVC tracks a key absent from params.yaml
        for module in t["modules"]:
            rel = Path(*module.split("."))
            files = {f"src/{rel}/__init__.py", f"src/{rel}.py"}
            assert files & stage["deps"], f"{name} imported {module}, not among its deps"
    assert seen == set(declared), f"no trace of {set(declared) - seen}"


@pytest.mark.parametrize(
    ("rel", "expected"),
    [
        ("src/kdsweep/report/__init__.py", ["report"]),
        (
            "src/kdsweep/teacher.py",
            [
                "cache@full",
                "cache@random_head",
                "cache@top3",
                "teacher@main",
                "teacher@random_head",
            ],
        ),
        (
            "src/kdsweep/losses.py",
            ["labels", "student@full", "student@random_head", "student@top3"],
        ),
        ("src/kdsweep/stats.py", ["aggregate", "report"]),
        ("src/kdsweep/data/sources.py", ["prepare"]),
    ],
)
def test_code_edit_marks_exactly_the_stages_that_run_it(repo: Path, rel: str, expected) -> None:
    with edited(repo, rel, lambda text: text + "\n# edited\n"):
        assert changed_stages(repo) == expected
    assert changed_stages(repo) == []


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        # aggregate and report read which stores exist (a removed store's results are stale);
        # every change of a store re-runs them through its students' results anyway
        (
            ("cache", "stores", "top3", "k"),
            2,
            ["aggregate", "cache@top3", "check", "report", "student@top3"],
        ),
        (("cache", "aug_seed"), 1, ["cache@full", "cache@random_head", "cache@top3", "check"]),
        # aggregate and report read it too: a method without `cache` reads it first (its
        # primary store, analysis.Primary)
        (
            ("cache", "reference"),
            "top3",
            [
                "aggregate",
                "check",
                "labels",
                "report",
                "student@full",
                "student@random_head",
                "student@top3",
            ],
        ),
        (("analysis", "ci"), 0.9, ["aggregate", "check", "report"]),
        # `check` reads the whole file: a key no stage reads still runs it (and fails there)
        (("studnet",), {"width": 8}, ["check"]),
    ],
)
def test_params_edit_marks_exactly_the_stages_that_read_it(repo, key, value, expected) -> None:
    def change(text: str) -> str:
        raw = yaml.safe_load(text)
        node = raw
        for part in key[:-1]:
            node = node[part]
        node[key[-1]] = value
        return yaml.safe_dump(raw)

    with edited(repo, "params.yaml", change):
        assert changed_stages(repo) == expected
    assert changed_stages(repo) == []


def _rows(repo: Path) -> dict[tuple, dict]:
    rows = pq.read_table(repo / "data/results/runs.parquet").to_pylist()
    drop = ("train_seconds", "git_rev")
    return {
        (r["method"], r["alpha"], r["subset_seed"]): {k: v for k, v in r.items() if k not in drop}
        for r in rows
    }


def test_changing_one_method_reruns_students_but_no_teacher_or_cache(repo: Path) -> None:
    """Every student stage reads `methods` (which methods exist, which store each reads), so a
    method's change re-runs the student stages; every other method's rows come out identical."""
    before = _rows(repo)

    def change(text: str) -> str:
        raw = yaml.safe_load(text)
        raw["methods"]["kd"]["tau"] = 2
        return yaml.safe_dump(raw)

    try:
        with edited(repo, "params.yaml", change):
            log = run(repo, "dvc", "repro")
            ran = stages_run(log)
            students = ["student@full", "student@random_head", "student@top3"]
            assert ran == ["aggregate", "check", "labels", "report", *students]
            after = _rows(repo)
            # ...but each trains only the students whose content key changed: kd's
            n_kd = sum(k[0] == "kd" for k in before)
            assert trained_reused(log) == {
                "full": (n_kd, sum(r["cache_name"] == "full" for r in before.values()) - n_kd),
                "top3": (0, sum(r["cache_name"] == "top3" for r in before.values())),
                "random_head": (0, sum(r["cache_name"] == "random_head" for r in before.values())),
                "labels": (0, sum(r["cache_name"] is None for r in before.values())),
            }
    finally:  # back to the committed state; outputs DVC does not cache are made anew
        run(repo, "git", "checkout", "HEAD", "--", "dvc.lock")
        run(repo, "dvc", "checkout", "-q")
        restored = stages_run(run(repo, "dvc", "repro"))
    assert after.keys() == before.keys()
    for key, row in after.items():
        if key[0] == "kd":
            assert row["tau"] == 2 and before[key]["tau"] == 4
        else:
            assert row == before[key], key
    assert set(restored) <= {"aggregate", "report"} and changed_stages(repo) == []


@pytest.mark.parametrize("executor", ["local", "dask"])
def test_dvc_exp_run_with_a_param_and_exp_show(repo: Path, executor: str) -> None:
    """Through either executor the experiment trains kd's students only: the baseline's rows
    were trained at one thread (OMP_NUM_THREADS=1), as a Dask worker trains, so their keys hold."""
    log = run(
        repo, "dvc", "exp", "run", "-S", "methods.kd.tau=1", "-S", f"student.executor={executor}"
    )
    try:
        counts = trained_reused(log)
        n_kd = len(e2e_params()["alphas"]) * len(e2e_params()["subset_seeds"])
        assert counts["full"] == (n_kd, counts["full"][1]) and counts["full"][1] > 0
        assert counts["labels"][0] == counts["top3"][0] == 0
        assert f"(executor: {executor})" in log
        shown = run(repo, "dvc", "exp", "show", "--json")
        text = json.dumps(json.loads(shown[shown.index("[") :]))
        assert "metrics.json" in text and '"tau": 1' in text
    finally:
        run(repo, "git", "checkout", "HEAD", "--", "params.yaml", "dvc.lock")
        run(repo, "dvc", "checkout", "-q")


def test_teammate_pulls_teachers_and_caches_and_never_runs_them(repo: Path, tmp_path: Path):
    run(repo, "dvc", "push", "-q")
    clone = tmp_path / "clone"
    run(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    run(clone, "dvc", "pull", "-q", "prepare", "teacher", "cache")  # every teacher@, cache@
    assert (clone / "data/logits/full.zarr").is_dir()
    shown = run(clone, "dvc", "status", "--json")
    status = json.loads(shown[shown.index("{") :])
    students = {k: v for k, v in status.items() if k.startswith("student@") or k == "labels"}
    assert len(students) == 4  # their outputs were not pulled...
    for stage, changes in students.items():  # ...but every input they read was
        deps = [c["changed deps"] for c in changes if isinstance(c, dict) and "changed deps" in c]
        assert not deps, (stage, deps)  # e.g. the writer's lock files beside the stores
    ran = stages_run(run(clone, "dvc", "repro"))
    assert ran and not any(s.startswith(("prepare", "teacher", "cache")) for s in ran), ran
    rows = pq.read_table(clone / "data/results/runs.parquet").num_rows
    assert "aggregate" in ran and rows == expected_rows(e2e_params())


def test_teammate_who_pulls_the_students_trains_only_what_they_change(repo, tmp_path):
    run(repo, "dvc", "push", "-q")
    clone = tmp_path / "clone"
    run(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    run(clone, "dvc", "pull", "-q")
    assert not [s for s in changed_stages(clone) if s.startswith("student@") or s == "labels"]
    log = run(clone, "dvc", "exp", "run", "-S", "methods.kd.tau=8")
    counts = trained_reused(log)
    assert counts["labels"][0] == counts["top3"][0] == 0
    assert counts["full"][0] == sum(r["method"] == "kd" for r in _rows(repo).values())


def test_queued_experiments_run_in_parallel_workers(repo: Path) -> None:
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
    names = [line.split()[0] for line in status.splitlines() if "Success" in line]
    for name in names:  # each ran in its own temp copy, from the baseline's checked-out rows
        counts = trained_reused(run(repo, "dvc", "queue", "logs", name))
        assert counts["labels"] == (0, counts["labels"][1]) and counts["labels"][1] > 0
        assert counts["full"][0] > 0 and counts["full"][1] > 0
    shown = run(repo, "dvc", "exp", "show", "--json")
    text = json.dumps(json.loads(shown[shown.index("[") :]))
    assert '"tau": 3' in text and '"tau": 5' in text


def test_one_teachers_change_reruns_only_it_its_stores_and_their_students(repo: Path) -> None:
    """Teachers are one stage each: a new value for one teacher re-runs that teacher, the stores
    that cache it and their students (and what aggregates every student) — never the other
    teacher, its stores, their students or the label-only students."""

    def change(text: str) -> str:
        raw = yaml.safe_load(text)
        raw["teachers"]["random_head"]["epochs"] += 1
        return yaml.safe_dump(raw)

    mine = ["cache@random_head", "student@random_head", "teacher@random_head"]
    run(repo, "dvc", "repro")  # the uncached outputs an earlier experiment left, made anew
    assert changed_stages(repo) == []
    try:
        with edited(repo, "params.yaml", change):
            assert changed_stages(repo) == sorted(["check", *mine])  # each reads its teacher
            ran = stages_run(run(repo, "dvc", "repro"))
            assert ran == sorted(["aggregate", "check", "report", *mine])
    finally:  # back to the committed state
        run(repo, "git", "checkout", "HEAD", "--", "dvc.lock")
        run(repo, "dvc", "checkout", "-q")
        run(repo, "dvc", "repro")
    assert changed_stages(repo) == []


def test_two_tracks_side_by_side_in_exp_show(repo: Path) -> None:
    """`dvc exp run -S track=<name>` composes params.yaml from conf/track/<name>.yaml (Hydra):
    the default track and another sit side by side in `dvc exp show`, each with its params and
    metrics, and the workspace's params file is the committed one again afterwards."""
    try:
        run(repo, "dvc", "exp", "run", "-n", "default_track", "-S", "track=default")
        log = run(repo, "dvc", "exp", "run", "-n", "one_alpha_track", "-S", "track=one_alpha")
        assert yaml.safe_load((repo / "params.yaml").read_text()) == one_alpha()
        assert "teacher@" not in " ".join(stages_run(log))  # the same teachers: reused
        shown = run(repo, "dvc", "exp", "show", "--json")
        exps = {}
        for rev in json.loads(shown[shown.index("[") :]):
            for exp in rev.get("experiments") or []:
                for e in exp["revs"]:
                    if e["name"].endswith("_track"):  # the other tests' experiments aside
                        exps[e["name"]] = e["data"]
        tracks = {n: d["params"]["params.yaml"]["data"]["track"] for n, d in exps.items()}
        assert tracks == {"default_track": "default", "one_alpha_track": "one_alpha"}
        metrics = {n: d["metrics"]["metrics.json"]["data"] for n, d in exps.items()}
        assert set(metrics["one_alpha_track"]["acc"]["ce"]) == {"1"}
        assert set(metrics["default_track"]["acc"]["ce"]) == {"0.05", "1"}
    finally:
        run(repo, "git", "checkout", "HEAD", "--", "params.yaml", "dvc.lock")
        run(repo, "dvc", "checkout", "-q")
