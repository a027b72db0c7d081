"""Language track as a user runs it: `dvc exp run -S track=lm`, in a temporary
copy of the repository. Prints the wall time as a share of the track's 15-minute budget (and
the CPU time of every process it ran, which other load on a shared machine inflates less), the
teacher's test perplexity against every student's (the teacher must be clearly better than all
of them), and per α each KD variant's perplexity against the CE students' (ratio < 1: KD helps),
with the validation checkpoint each student ended at.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import typer
from common import REPO, dvc_env, temp_repo

BUDGET_S = 900  # conf/track/lm.yaml must run in 15 minutes on 2 CPU cores


def main(params: Path = REPO / "conf/track/lm.yaml") -> None:
    work = temp_repo(params.read_text(), prefix="kdsweep-lm-")
    t0 = time.perf_counter()
    subprocess.run(["dvc", "repro", "-q"], cwd=work, env=dvc_env(), check=True)
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = usage.ru_utime + usage.ru_stime
    teacher = json.loads((work / "data/teachers/main.json").read_text())
    rows = pq.read_table(work / "data/results/runs.parquet").to_pylist()
    cells: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for r in rows:
        cells[r["method"], r["alpha"]].append(r)
    ce = {
        a: statistics.mean(r["test_ppl"] for r in rs) for (m, a), rs in cells.items() if m == "ce"
    }
    student_s = sum(r["train_seconds"] for r in rows)
    print(f"dvc repro {params.name}: {wall:.0f} s = {wall / BUDGET_S:.2f} of the 15-minute budget")
    print(
        f"  CPU time of all its processes {cpu:.0f} s: at least {cpu / 2:.0f} s of wall time on "
        f"2 free cores ({cpu / 2 / BUDGET_S:.2f} of the budget; other load inflates wall time)"
    )
    print(
        f"  teacher training {teacher['train_seconds']:.0f} s ({teacher['steps']} steps), "
        f"{len(rows)} students {student_s:.0f} s, the rest (prepare, caches, start-up, "
        f"report) {wall - teacher['train_seconds'] - student_s:.0f} s"
    )
    worst = max(r["test_ppl"] for r in rows)
    best = min(r["test_ppl"] for r in rows)
    print(
        f"teacher test perplexity {teacher['test_ppl']:.2f}; students {best:.2f}–{worst:.2f} "
        f"(best student ÷ teacher {best / teacher['test_ppl']:.2f}x)"
    )
    print(f"{'method':14} {'α':>5} {'n':>2} {'test ppl':>9} {'min–max':>17} {'÷ CE':>6} best steps")
    for (m, a), rs in sorted(cells.items(), key=lambda c: (c[0][1], c[0][0] != "ce", c[0][0])):
        ppl = [r["test_ppl"] for r in rs]
        mean = statistics.mean(ppl)
        ratio = f"{mean / ce[a]:.3f}" if a in ce else "—"
        steps = ",".join(str(r["best_step"]) for r in rs)
        print(
            f"{m:14} {a:5g} {len(rs):2} {mean:9.2f} {min(ppl):8.2f}–{max(ppl):8.2f} {ratio:>6} "
            f"{steps} of {rs[0]['steps']}"
        )
    print(f"report: {work / 'reports/report.md'}")


if __name__ == "__main__":
    typer.run(main)
