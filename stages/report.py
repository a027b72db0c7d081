"""DVC stage `report`: runs.parquet + cache summaries → report.md, figures and plot data; every
section but By factor reads the primary (student, teacher) pair (kdsweep.analysis.Primary)."""

from pathlib import Path

import typer

from kdsweep.analysis import Primary
from kdsweep.config import load_params
from kdsweep.errors import explained_errors
from kdsweep.report import write_report


def main(
    runs: Path = typer.Option(..., help="runs.parquet"),
    summaries: Path = typer.Option(..., help="directory of the cache stages' summaries"),
    out: Path = typer.Option(..., help="report directory"),
) -> None:
    with explained_errors():
        p = load_params()
        write_report(runs, p.analysis, out, summaries, list(p.cache.stores), Primary.of(p))


if __name__ == "__main__":
    typer.run(main)
