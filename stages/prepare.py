"""DVC stage `prepare`: build the splits and nested subset orders (kdsweep.data.prepared)."""

from pathlib import Path

import typer

from kdsweep.config import load_params
from kdsweep.data.prepare import prepare
from kdsweep.errors import explained_errors


def main(out: Path = typer.Option(..., help="the prepared-data directory to write")) -> None:
    with explained_errors():
        p = load_params()
        prepare(p.data, p.subset_seeds, out)


if __name__ == "__main__":
    typer.run(main)
