"""Wall time of the default `dvc repro` from scratch, per stage, and its overhead share; with
`--baseline REV`, the same pipeline of git revision REV first, side by side in one run.

Runs each pipeline in a temporary copy of the repository (the workspace is untouched), stamps
each "Running stage" line as DVC prints it, and splits the wall time with the stages' own
`kdsweep work:` lines (`kdsweep.io.report_work`) into
  train     = the teacher's and every student's training loop
  cache     = running the teacher over the data into the Zarr stores (forward, compress, write)
  generate  = generating the dataset (MNIST-1D's generator)
  overhead  = everything else: process start-up, imports, data loading, evaluation, writing
              results, DVC's bookkeeping.
Prints ratios, not bare times.
"""

from __future__ import annotations

import os
import resource
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import typer
from common import REPO, dvc_env, temp_repo


def repro(source: Path, params: Path, label: str) -> dict:
    """Run `dvc repro` of `source`'s pipeline on `params`; print and return its time split."""
    work = temp_repo(params.read_text(), source)
    usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu0 = usage0.ru_utime + usage0.ru_stime
    t0 = time.perf_counter()
    stamps: list[tuple[float, str]] = []
    work_s: dict[str, float] = defaultdict(float)
    proc = subprocess.Popen(
        ["dvc", "repro"], cwd=work, env=dvc_env(work / "src"), stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("Running stage"):
            stamps.append((time.perf_counter(), line.split("'")[1]))
        elif line.startswith("kdsweep work:"):
            _, _, what, secs, _ = line.split()
            work_s[what] += float(secs)
    if proc.wait() != 0:
        raise SystemExit(f"dvc repro failed for {label}")
    wall = time.perf_counter() - t0
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = child.ru_utime + child.ru_stime - cpu0
    load = os.getloadavg()[0]
    ends = [t for t, _ in stamps[1:]] + [t0 + wall]
    per_stage = {name: end - start for (start, name), end in zip(stamps, ends, strict=True)}
    per_group: dict[str, float] = defaultdict(float)
    for name, secs in per_stage.items():
        per_group[name.split("@")[0]] += secs
    runs = pq.read_table(work / "data/results/runs.parquet").num_rows
    print(f"\n# {label}: dvc repro from scratch in {work}: {len(stamps)} stages, {runs} students")
    for title, shares in (("stage", per_stage), ("stage group", per_group)):
        print(f"{title:16} {'share of wall':>14}")
        for name, secs in shares.items():
            print(f"{name:16} {secs / wall:13.1%}")
    print(f"{'wall time split':16} {'share of wall':>14}")
    for what in ("train", "cache", "generate"):
        print(f"{what:16} {work_s[what] / wall:13.1%}")
    overhead = 1 - sum(work_s.values()) / wall
    print(f"{'overhead':16} {overhead:13.1%}")
    print(f"wall time / 15-minute budget: {wall / 900:.2f} (load average at the end {load:.1f})")
    # other processes inflate wall time; CPU time far less: on a quiet machine with C cores the
    # pipeline needs at least cpu / C seconds (training runs on every core)
    cores = os.cpu_count() or 1
    print(f"CPU time / ({cores} cores x 15 minutes): {cpu / (cores * 900):.2f}")
    return {"wall": wall, "cpu": cpu, "students": runs, "overhead": overhead, **work_s}


def main(
    params: Path = Path("params.yaml"),
    baseline: str = "",
    baseline_params: Path | None = None,
) -> None:
    """`params` for this revision; `--baseline REV` runs REV first on `--baseline-params` (by
    default REV's own params.yaml when `params` is the workspace's, else `params`): the same
    workload written in each revision's schema."""
    params = params.resolve()
    if not baseline:
        repro(REPO, params, "this revision")
        return
    old = Path(tempfile.mkdtemp(prefix="kdsweep-baseline-"))
    archive = subprocess.run(
        ["git", "archive", baseline], cwd=REPO, capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    own = old / "params.yaml" if params == (REPO / "params.yaml").resolve() else params
    base_params = baseline_params.resolve() if baseline_params else own
    a = repro(old, base_params, f"baseline {baseline}")
    b = repro(REPO, params, "this revision")
    print(f"\n# side by side (this revision / baseline {baseline}, same machine, one run)")
    print(f"wall time:          {b['wall'] / a['wall']:.3f}x")
    print(f"wall per student:   {(b['wall'] / b['students']) / (a['wall'] / a['students']):.3f}x")
    print(f"training loop time: {b['train'] / a['train']:.3f}x")
    print(f"overhead share:     {a['overhead']:.1%} -> {b['overhead']:.1%}")


if __name__ == "__main__":
    typer.run(main)
