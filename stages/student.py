"""DVC stage `student@<alpha>-<method>`: train every seed of one (α, method) from the cache."""

from pathlib import Path

import typer

from kdsweep import pipeline
from kdsweep.config import load_params


def main(alpha: float, method: str, out_dir: Path) -> None:
    pipeline.run_student_stage(load_params(), alpha, method, out_dir)


if __name__ == "__main__":
    typer.run(main)
