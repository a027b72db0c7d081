"""Wall time of the default `dvc repro` from scratch, per stage, and its overhead share.

Runs the pipeline in a temporary copy of the repository (so the workspace is untouched), stamps
each "Running stage" line as DVC prints it, and splits the wall time with the stages' own
`kdsweep work:` lines (`pipeline.report_work`) into
  train     = the teacher's and every student's training loop
  cache     = running the teacher over the data into the Zarr stores (forward, compress, write)
  generate  = generating the dataset (MNIST-1D's generator)
  overhead  = everything else: process start-up, imports, data loading, evaluation, writing
              results, DVC's bookkeeping.
The target (issue 7) is overhead ≤ 25% of the wall time; the stricter share (everything but
training) is printed too. Prints ratios, not bare times.
"""

from __future__ import annotations

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
    work_s: dict[str, float] = defaultdict(float)
    proc = subprocess.Popen(["dvc", "repro"], cwd=work, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("Running stage"):
            stamps.append((time.perf_counter(), line.split("'")[1]))
        elif line.startswith("kdsweep work:"):
            _, _, what, secs, _ = line.split()
            work_s[what] += float(secs)
    if proc.wait() != 0:
        raise SystemExit("dvc repro failed")
    wall = time.perf_counter() - t0
    ends = [t for t, _ in stamps[1:]] + [t0 + wall]
    per_stage = {name: end - start for (start, name), end in zip(stamps, ends, strict=True)}
    per_group: dict[str, float] = defaultdict(float)
    for name, secs in per_stage.items():
        per_group[name.split("@")[0]] += secs
    runs = pq.read_table(work / "data/results/runs.parquet").num_rows
    print(f"default dvc repro from scratch in {work}: {len(stamps)} stages, {runs} students")
    for title, shares in (("stage", per_stage), ("stage group", per_group)):
        print(f"{title:16} {'share of wall':>14}")
        for name, secs in shares.items():
            print(f"{name:16} {secs / wall:13.1%}")
    print(f"\n{'wall time split':16} {'share of wall':>14}")
    for what in ("train", "cache", "generate"):
        print(f"{what:16} {work_s[what] / wall:13.1%}")
    overhead = 1 - sum(work_s.values()) / wall
    print(f"{'overhead':16} {overhead:13.1%}  (target <= 25%)")
    print(
        f"{'not training':16} {1 - work_s['train'] / wall:13.1%}  (stricter: cache + generate too)"
    )
    print(f"wall time / 15-minute budget: {wall / 900:.2f}")


if __name__ == "__main__":
    typer.run(main)
