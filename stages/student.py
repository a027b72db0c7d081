"""DVC stages `student@<store>` and `labels`: one process trains every student that reads one
cache store (each method × α × seed × τ), or every student of labels only, from the cache —
reusing the rows of its previous output whose content key is unchanged."""

from pathlib import Path

import typer

from kdsweep.config import load_params
from kdsweep.errors import explained_errors
from kdsweep.students.inputs import StageInputs
from kdsweep.students.stage import run_student_stage


def main(
    prepared: Path = typer.Option(..., help="the prepare stage's directory"),
    reference: Path = typer.Option(..., help="the cache.reference store (test agreement, KL)"),
    out: Path = typer.Option(..., help="directory for runs.json"),
    store: str | None = typer.Option(None, help="the store the students read; none: labels only"),
    logits: Path | None = typer.Option(None, help="that store's Zarr path"),
    checkpoint: Path | None = typer.Option(
        None, help="that store's teacher weights (checked against it; online: run every batch)"
    ),
) -> None:
    with explained_errors():
        p = load_params()
        inputs = StageInputs(prepared, reference, store, logits, checkpoint)
        run_student_stage(p, inputs, out)


if __name__ == "__main__":
    typer.run(main)
