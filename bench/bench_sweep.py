"""Sweeps that pay only for what changed (issue #16): student-level reuse and the Dask executor.

In one temporary copy of the repository (the workspace is untouched), side by side in one run:

  (a) `dvc repro` from scratch, then `dvc exp run -S methods.kd.tau=<new>`: the experiment's wall
      time ÷ the from-scratch student stages' wall time (the `student@*` and `labels` stages of
      the first repro). Goal ≤ 0.3 on the default params. Prints what remains: which stages ran,
      how many students each trained and reused, and the aggregate/report time. Then the same
      with `-S student.executor=dask` (another τ, `--dask-tau`): it too trains only kd's
      students, as long as the baseline's `student.threads` is what the Dask workers use.
  (b) a queue of 4 τ values (`dvc exp run --queue -S methods.kd.tau=<v>` ×4, `dvc queue start
      -j 1`, wait for all) ÷ 4 from-scratch student-stage runs of those params, *estimated* as 4×
      the first repro's student stages (each queued τ changes only kd's students, as in (a)).
  (c) the student stages run from scratch as dvc.yaml runs them (stages/student.py, a fresh
      output directory each, so nothing is reused) with the Dask executor (LocalCluster of
      `--workers` processes, `student.threads=1`) ÷ the local executor (`student.threads=0`: all
      of torch's threads in one process); then, with `--check-threads`, the local executor at
      `student.threads=1`, whose rows must equal Dask's bit for bit (same threads per student).

Stage times come from DVC's "Running stage" lines, stamped as DVC prints them (as in
bench_pipeline.py); training time from the stages' `kdsweep work: train` lines. Prints ratios
measured in this run; absolute seconds are context only. `--quick`: tiny params, a smoke run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import typer
import yaml
from common import REPO, dvc_env, git_commit, temp_repo

COUNTS = re.compile(r"^(\S+): trained (\d+) students, reused (\d+) \(executor: (\w+)\)")
# the fields of a runs.json row that are not its results: timing, revision, content key
NOT_RESULTS = {"train_seconds", "git_rev", "student_key", "run_id"}


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min) / {five:.2f} (5 min) on {os.cpu_count()} cores"


@dataclass
class Run:
    """One DVC command's wall time, per stage, and what each student stage trained and reused."""

    wall: float
    stages: dict[str, float]
    counts: dict[str, tuple[int, int, str]] = field(default_factory=dict)  # out dir: (N, M, ex)
    train: dict[str, float] = field(default_factory=dict)  # stage: seconds of training loops
    log: str = ""

    def students(self) -> float:
        return sum(s for n, s in self.stages.items() if is_student(n))


def is_student(stage: str) -> bool:
    return stage.startswith("student@") or stage == "labels"


def env() -> dict[str, str]:
    """dvc_env with a relative PYTHONPATH: every stage imports the library of the copy it runs in
    (the benchmark's repository, or a queued experiment's temporary copy), never the workspace's
    editable install, whose source others may be editing (and whose hash is in every key)."""
    return {**dvc_env(), "PYTHONPATH": "src", "PYTHONUNBUFFERED": "1"}


def dvc(work: Path, *args: str, log: Path) -> Run:
    """Run `dvc <args>` in `work`, stamping each stage as DVC starts it; its output goes to `log`."""
    t0 = time.perf_counter()
    stamps: list[tuple[float, str]] = []
    counts: dict[str, tuple[int, int, str]] = {}
    train: dict[str, float] = defaultdict(float)
    lines: list[str] = []
    proc = subprocess.Popen(
        ["dvc", *args],
        cwd=work,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("Running stage"):
            stamps.append((time.perf_counter(), line.split("'")[1]))
        elif line.startswith("kdsweep work: train") and stamps:
            train[stamps[-1][1]] += float(line.split()[3])
        elif m := COUNTS.match(line.strip()):
            counts[Path(m[1]).name] = (int(m[2]), int(m[3]), m[4])
    wall = time.perf_counter() - t0
    log.write_text("".join(lines))
    if proc.wait() != 0:
        raise SystemExit(f"dvc {' '.join(args)} failed in {work}; see {log}")
    ends = [t for t, _ in stamps[1:]] + [t0 + wall]
    stages = {name: end - start for (start, name), end in zip(stamps, ends, strict=True)}
    return Run(wall, stages, counts, dict(train), "".join(lines))


def quick_params(raw: dict) -> dict:
    """The params' pipeline at a tiny scale: every store, method and α, 2 seeds, a few steps."""
    raw["data"].update(n_train=1000, n_test=300)
    raw["subset_seeds"] = raw["subset_seeds"][:2]
    raw["alphas"] = raw["sweep"]["ablation_alphas"]  # at 1000 rows their subsets are equal-sized
    for t in raw["teachers"].values():
        t.update(epochs=1, width=16)
    raw["cache"].update(chunk_rows=256, batch_size=256)
    raw["student"]["budget"] = {"mode": "steps", "value": 20, "min_epochs": 0}
    raw["student"]["width"] = 8
    return raw


def reduced_params(raw: dict) -> dict:
    """The params' pipeline with a quarter of the student steps and a 3-epoch teacher: every
    store, method, α and seed (the same stages and students), for a run that fits a shared 2-core
    machine. Fewer steps make the fixed cost of a stage a larger share, so (a)'s ratio is higher
    than the full params' would be."""
    for t in raw["teachers"].values():
        t["epochs"] = min(t["epochs"], 3)
    raw["student"]["budget"]["value"] = max(1, raw["student"]["budget"]["value"] // 4)
    return raw


def student_stage_cmd(raw: dict, stage: str, out: str) -> list[str]:
    """`stage`'s command as dvc.yaml gives it, writing to `out`."""
    ref = raw["cache"]["reference"]
    cmd = ["python", "stages/student.py", "--reference", f"data/logits/{ref}.zarr"]
    cmd += ["--prepared", "data/prepared"]
    if stage != "labels":
        store = stage.split("@")[1]
        teacher = raw["cache"]["stores"][store]["teacher"]
        cmd += ["--store", store, "--logits", f"data/logits/{store}.zarr"]
        cmd += ["--checkpoint", f"data/teachers/{teacher}.safetensors"]
    return [*cmd, "--out", out]


def report_run(title: str, r: Run, base: float | None = None) -> None:
    print(f"\n{title}: wall {r.wall:.1f} s")
    print(f"  {'stage':22} {'seconds':>8} {'share':>7} {'training':>9}  trained / reused")
    for name, secs in r.stages.items():
        out = name.split("@")[-1]
        c = r.counts.get(out)
        tr = f"{c[0]:4d} / {c[1]:4d}" if c and is_student(name) else ""
        train = r.train.get(name)
        train_s = f"{train:8.1f}s" if train is not None else ""
        print(f"  {name:22} {secs:8.1f} {secs / r.wall:6.1%} {train_s:>9}  {tr}")
    rest = r.wall - sum(r.stages.values())
    print(f"  {'(before the 1st stage)':22} {rest:8.1f} {rest / r.wall:6.1%}")


def part_a(work: Path, logs: Path, tau: str, dask_tau: str) -> tuple[Run, Run]:
    print(f"\n## (a) one τ changed after a full repro ({load()})")
    first = dvc(work, "repro", log=logs / "a_repro.log")
    report_run("`dvc repro` from scratch", first)
    n_first = sum(c[0] for c in first.counts.values())
    print(
        f"  student stages: {first.students():.1f} s for {n_first} students "
        f"({first.students() / first.wall:.1%} of the repro)"
    )
    git_commit(work, "baseline: dvc repro")
    exp = exp_run(work, logs / "a_exp.log", f"methods.kd.tau={tau}")
    ratio = exp.wall / first.students()
    print(
        f"\n(a) exp run wall ÷ from-scratch student stages = {ratio:.3f} "
        f"(goal ≤ 0.3: {'met' if ratio <= 0.3 else 'NOT met'}); "
        f"exp run student stages alone ÷ from-scratch = {exp.students() / first.students():.3f}"
    )
    print(f"({load()})")
    (logs / "a.json").write_text(
        json.dumps(
            {"scratch_students": first.students(), "exp": exp.wall, "stages": list(first.stages)}
        )
    )
    if dask_tau:  # the same change through the Dask executor: it reuses the same rows
        dask = exp_run(
            work, logs / "a_exp_dask.log", f"methods.kd.tau={dask_tau}", "student.executor=dask"
        )
        print(
            f"\n(a, Dask) exp run wall ÷ from-scratch student stages = "
            f"{dask.wall / first.students():.3f}"
        )
    return first, exp


def exp_run(work: Path, log: Path, *changes: str) -> Run:
    """`dvc exp run -S <changes>` from the baseline commit; prints what it trained and reused,
    and leaves the workspace at the baseline again."""
    exp = dvc(work, "exp", "run", *(a for c in changes for a in ("-S", c)), log=log)
    report_run(f"`dvc exp run {' '.join('-S ' + c for c in changes)}`", exp)
    trained = sum(c[0] for c in exp.counts.values())
    reused = sum(c[1] for c in exp.counts.values())
    stu = exp.students()
    post = sum(s for n, s in exp.stages.items() if not is_student(n))
    print(f"  ran: {', '.join(exp.stages)}")
    print(f"  students trained {trained}, reused {reused}")
    print(
        f"  what remains of the {exp.wall:.1f} s: student stages {stu / exp.wall:.1%} (their "
        f"training loops {sum(exp.train.values()) / exp.wall:.1%}), aggregate + report "
        f"{post / exp.wall:.1%}, DVC before the first stage "
        f"{(exp.wall - sum(exp.stages.values())) / exp.wall:.1%}"
    )
    # back to the baseline: its params, lock and outputs
    subprocess.run(
        ["git", "checkout", "HEAD", "--", "params.yaml", "dvc.lock"], cwd=work, check=True
    )
    subprocess.run(["dvc", "checkout", "-q"], cwd=work, env=env(), check=True)
    return exp


def queue_status(work: Path) -> str:
    return subprocess.run(
        ["dvc", "queue", "status"], cwd=work, env=env(), capture_output=True, text=True
    ).stdout


def part_b(work: Path, logs: Path, taus: list[str], a: dict[str, float], jobs: int) -> None:
    print(f"\n## (b) a queue of {len(taus)} τ values, `dvc queue start -j {jobs}` ({load()})")
    t0 = time.perf_counter()
    for tau in taus:
        subprocess.run(
            ["dvc", "exp", "run", "--queue", "-S", f"methods.kd.tau={tau}"],
            cwd=work,
            env=env(),
            check=True,
            capture_output=True,
        )
    t1 = time.perf_counter()
    subprocess.run(["dvc", "queue", "start", "-j", str(jobs)], cwd=work, env=env(), check=True)
    deadline = time.time() + 3600
    while True:
        status = queue_status(work)
        if not any(w in status for w in ("Queued", "Running")):
            break
        if time.time() > deadline:
            raise SystemExit(f"the queue did not finish in an hour:\n{status}")
        time.sleep(5)
    t2 = time.perf_counter()
    (logs / "b_status.txt").write_text(status)
    done = [line.split()[0] for line in status.splitlines() if "Success" in line]
    print(f"  queued in {t1 - t0:.1f} s; ran in {t2 - t1:.1f} s (polled every 5 s)")
    scratch = len(taus) * a["scratch_students"]
    print(
        f"\n(b) queue ({len(taus)} experiments, {len(done)} succeeded) ÷ {len(taus)} from-scratch "
        f"student-stage runs (estimated: {len(taus)} × the first repro's {a['scratch_students']:.1f} s) "
        f"= {(t2 - t1) / scratch:.3f}; with queueing {(t2 - t0) / scratch:.3f}"
    )
    print(
        f"    per queued experiment ÷ the workspace `dvc exp run` of (a): "
        f"{(t2 - t1) / len(taus) / a['exp']:.2f}x ({load()})"
    )
    if len(done) != len(taus):
        print(f"  NOT every experiment succeeded:\n{status}")
    for name in done:
        text = subprocess.run(
            ["dvc", "queue", "logs", name], cwd=work, env=env(), capture_output=True, text=True
        ).stdout
        (logs / f"b_{name}.log").write_text(text)
        counts = {
            Path(m[1]).name: f"{m[2]}/{m[3]}"
            for line in text.splitlines()
            if (m := COUNTS.match(line.strip()))
        }
        ran = [line.split("'")[1] for line in text.splitlines() if line.startswith("Running")]
        print(f"  {name}: ran {', '.join(ran)}; trained/reused {counts}")


def stage_rows(path: Path) -> dict[tuple, dict]:
    rows = json.loads(path.read_text())
    return {(r["method"], r["tau"], r["alpha"], r["subset_seed"], r["train_seed"]): r for r in rows}


def part_c(work: Path, logs: Path, raw: dict, stages: list[str], workers: int, check: bool):
    print(
        f"\n## (c) student stages from scratch: Dask ({workers} workers × 1 thread) vs local "
        f"(os.cpu_count() = {os.cpu_count()}; {load()})"
    )
    variants = {
        "local, threads=0": {"executor": "local", "threads": 0},
        f"dask, {workers} workers, threads=1": {
            "executor": "dask",
            "threads": 1,
            "dask": {"address": None, "workers": workers},
        },
    }
    if check:
        variants["local, threads=1"] = {"executor": "local", "threads": 1}
    params = work / "params.yaml"
    kept = params.read_text()
    walls: dict[str, float] = {}
    outs: dict[str, Path] = {}
    try:
        for n, (label, student) in enumerate(variants.items()):
            cfg = json.loads(json.dumps(raw))
            cfg["student"].update(student)
            params.write_text(yaml.safe_dump(cfg, sort_keys=False))
            outs[label] = work / "data" / "bench_c" / str(n)
            total = 0.0
            counts = []
            for stage in stages:
                out = outs[label] / stage.replace("@", "_")
                t0 = time.perf_counter()
                res = subprocess.run(
                    student_stage_cmd(raw, stage, str(out.relative_to(work))),
                    cwd=work,
                    env=env(),
                    capture_output=True,
                    text=True,
                )
                total += time.perf_counter() - t0
                (logs / f"c_{n}_{stage}.log").write_text(res.stdout + res.stderr)
                if res.returncode != 0:
                    raise SystemExit(f"{stage} ({label}) failed: {res.stderr[-3000:]}")
                m = [COUNTS.match(line) for line in res.stdout.splitlines()]
                counts += [f"{stage} {x[2]}/{x[3]}" for x in m if x]
            walls[label] = total
            print(f"  {label:28} {total:8.1f} s  (trained/reused: {', '.join(counts)})  {load()}")
    finally:
        params.write_text(kept)
    labels = list(variants)
    print(
        f"\n(c) Dask ({workers} workers, 1 thread each) ÷ local (one process, "
        f"threads=0 → torch's {torch_threads(work)} threads) = "
        f"{walls[labels[1]] / walls[labels[0]]:.3f} (wall of {', '.join(stages)})"
    )
    if check:
        print(f"    local threads=1 ÷ local threads=0 = {walls[labels[2]] / walls[labels[0]]:.3f}")
    for a, b in [(labels[0], labels[1])] + ([(labels[2], labels[1])] if check else []):
        same = diff = 0
        worst = 0.0
        for stage in stages:
            ra = stage_rows(outs[a] / stage.replace("@", "_") / "runs.json")
            rb = stage_rows(outs[b] / stage.replace("@", "_") / "runs.json")
            for k, row in ra.items():
                other = rb[k]
                keep = [f for f in row if f not in NOT_RESULTS]
                if all(row[f] == other[f] for f in keep):
                    same += 1
                else:
                    diff += 1
                    worst = max(worst, abs(row["test_acc"] - other["test_acc"]))
        print(
            f"    rows of '{a}' vs '{b}': {same} identical (every result field), {diff} "
            f"differ (largest |Δ test accuracy| {worst:.4f})"
        )


def torch_threads(work: Path) -> str:
    return subprocess.run(
        ["python", "-c", "import torch; print(torch.get_num_threads())"],
        cwd=work,
        env=env(),
        capture_output=True,
        text=True,
    ).stdout.strip()


def snapshot(rev: str) -> Path:
    """The repository at git revision `rev` (`git archive`), so that a long run measures one
    commit whatever others edit in the workspace meanwhile."""
    out = Path(tempfile.mkdtemp(prefix="kdsweep-sweep-src-"))
    archive = subprocess.run(["git", "archive", rev], cwd=REPO, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return out


def main(
    params: Path = typer.Option(None, help="params of (a)-(c); default: the revision's own"),
    rev: str = typer.Option("HEAD", help="git revision to measure; '': the workspace as it is"),
    quick: bool = typer.Option(False, help="tiny params: a smoke run of every part"),
    reduced: bool = typer.Option(False, help="1/4 of the student steps, a 3-epoch teacher"),
    tau: str = typer.Option("8", help="(a): the new methods.kd.tau"),
    dask_tau: str = typer.Option("", help="(a): the same with the Dask executor at this τ"),
    queue_taus: str = typer.Option("2,3,6,12", help="(b): the queued methods.kd.tau values"),
    jobs: int = typer.Option(1, help="(b): dvc queue start -j"),
    stages: str = typer.Option("", help="(c): student stages, comma-separated; default: all"),
    workers: int = typer.Option(2, help="(c): Dask LocalCluster workers"),
    check_threads: bool = typer.Option(True, help="(c): also local threads=1, rows vs Dask"),
    parts: str = typer.Option("abc", help="which parts to run ((b) and (c) need (a)'s repro)"),
    resume: Path = typer.Option(None, help="the repository of an earlier run: skip (a)"),
) -> None:
    if resume is not None:  # (b) and (c) on the repository (a) left, its baseline checked out
        work, logs = resume, resume.parent / "logs"
        subprocess.run(["git", "checkout", "HEAD", "--", "params.yaml"], cwd=work, check=True)
        raw = yaml.safe_load((work / "params.yaml").read_text())
        a = json.loads((logs / "a.json").read_text())
        print(f"# bench_sweep, resumed in {work}; {load()}")
        student_stages = [n for n in a.get("stages", []) if is_student(n)]
    else:
        source = snapshot(rev) if rev else REPO
        described = subprocess.run(
            ["git", "rev-parse", "--short", rev or "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip() + ("" if rev else " + the workspace's edits")
        params = params or source / "params.yaml"
        raw = yaml.safe_load(params.read_text())
        if quick:
            raw = quick_params(raw)
        elif reduced:
            raw = reduced_params(raw)
        work = temp_repo(yaml.safe_dump(raw, sort_keys=False), source, prefix="kdsweep-sweep-")
        logs = work.parent / "logs"
        logs.mkdir()
        kind = " (--quick)" if quick else " (--reduced)" if reduced else ""
        print(f"# bench_sweep of {described}: {params}{kind} in {work}")
        print(f"# logs in {logs}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {load()}")
        first, _ = part_a(work, logs, tau, dask_tau)
        a = json.loads((logs / "a.json").read_text())
        student_stages = [n for n in first.stages if is_student(n)]
    if "c" in parts:  # before (b): its queue workers may linger a while after the last experiment
        chosen = stages.split(",") if stages else student_stages
        part_c(work, logs, raw, chosen, workers, check_threads)
    if "b" in parts:
        part_b(work, logs, queue_taus.split(","), a, jobs)


if __name__ == "__main__":
    typer.run(main)
