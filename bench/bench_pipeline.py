"""Wall time of the default `dvc repro` from scratch, per stage, and its overhead share.

Runs the pipeline in a temporary copy of the repository (so the workspace is untouched), stamps
each "Running stage" line as DVC prints it, and splits the wall time into
  work      = teacher training + every student's training loop (recorded by the stages)
  overhead  = everything else: process start-up, imports, data loading, cache writing,
              evaluation, DVC bookkeeping.
The target (issue 7) is overhead ≤ 25% of the wall time. Prints ratios, not bare times.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import typer

REPO = Path(__file__).resolve().parents[1]


def main(params: Path = Path("params.yaml")) -> None:
    work = Path(tempfile.mkdtemp(prefix="kdsweep-pipeline-")) / "repo"
    work.mkdir()
    for item in ("dvc.yaml", "stages", "src", ".dvcignore", ".gitignore"):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work / item)
    shutil.copytree(REPO / ".dvc", work / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    shutil.copy(params, work / "params.yaml")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    t0 = time.perf_counter()
    stamps: list[tuple[float, str]] = []
    proc = subprocess.Popen(["dvc", "repro"], cwd=work, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("Running stage"):
            stamps.append((time.perf_counter(), line.split("'")[1]))
    if proc.wait() != 0:
        raise SystemExit("dvc repro failed")
    wall = time.perf_counter() - t0
    ends = [t for t, _ in stamps[1:]] + [t0 + wall]
    per_group: dict[str, float] = defaultdict(float)
    for (start, name), end in zip(stamps, ends, strict=True):
        per_group[name.split("@")[0]] += end - start
    runs = pq.read_table(work / "data/results/runs.parquet").to_pylist()
    teacher = json.loads((work / "data/teachers/metrics.json").read_text())["train_seconds"]
    student = sum(r["train_seconds"] for r in runs)
    print(f"default dvc repro from scratch in {work}: {len(stamps)} stages, {len(runs)} students")
    print(f"{'stage group':12} {'share of wall':>14}")
    for name, secs in per_group.items():
        print(f"{name:12} {secs / wall:13.1%}")
    work_share = (teacher + student) / wall
    print(f"\ntraining loops (teacher + students): {work_share:6.1%} of wall time")
    print(
        f"overhead (everything else):          {1 - work_share:6.1%} of wall time (target <= 25%)"
    )
    print(f"wall time / 15-minute budget:        {wall / 900:6.2f}")


if __name__ == "__main__":
    typer.run(main)
