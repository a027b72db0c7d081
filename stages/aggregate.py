"""DVC stage `aggregate`: every <students>/*/runs.json → runs.parquet + the DVC metrics file: the
headline numbers of the primary (student, teacher) pair (kdsweep.analysis.Primary), and the
reference's gain for every pair under `factors`."""

from pathlib import Path

import typer

from kdsweep.analysis import Primary, factor_metrics, factor_pairs, primary_table, summary_metrics
from kdsweep.config import STUDENTS_OF_LABELS, load_params
from kdsweep.errors import explained_errors
from kdsweep.io import atomic_write_json
from kdsweep.runs import collect_runs, write_parquet


def main(
    students: Path = typer.Option(..., help="directory of the student stages' outputs"),
    out: Path = typer.Option(..., help="runs.parquet to write"),
    metrics: Path = typer.Option(..., help="metrics JSON to write"),
) -> None:
    with explained_errors():
        p = load_params()
        table = collect_runs(students, [*p.cache.stores, STUDENTS_OF_LABELS])
        write_parquet(table, out)
        headline = summary_metrics(primary_table(table, Primary.of(p)), p.analysis)
        atomic_write_json(metrics, headline | factor_metrics(factor_pairs(table, p.analysis)))


if __name__ == "__main__":
    typer.run(main)
