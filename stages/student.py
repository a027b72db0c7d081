"""DVC stage `student@<alpha>-<method>`: train every seed of one (α, method) from the cache."""

from pathlib import Path

import typer

from kdsweep import pipeline
from kdsweep.config import load_params
from kdsweep.errors import explained_errors


def main(alpha: float, method: str, out_dir: Path) -> None:
    with explained_errors():
        pipeline.run_student_stage(load_params(), alpha, method, out_dir)


if __name__ == "__main__":
    typer.run(main)
