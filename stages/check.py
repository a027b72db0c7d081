"""DVC stage `check`: validate the whole params.yaml, so that any edit of it — a misspelt section
that no other stage reads included — runs this stage, and an invalid file fails `dvc repro`
before any other stage (every stage is downstream of its output) instead of being "up to date"."""

from pathlib import Path

import typer

from kdsweep.config import load_params
from kdsweep.errors import explained_errors
from kdsweep.io import atomic_write_text


def main(
    out: Path = typer.Option(..., help="the marker to write once params.yaml is valid"),
) -> None:
    with explained_errors():
        load_params()
        atomic_write_text(out, "params.yaml is valid\n")  # constant: downstream stages keep


if __name__ == "__main__":
    typer.run(main)
