"""DVC stages `student@<alpha>` and `ablation@<alpha>`: one process trains every student of one α
for the methods of its group (`sweep.methods` or `sweep.ablation_methods`), from the cache."""

from pathlib import Path
from typing import Literal

import typer

from kdsweep import pipeline
from kdsweep.config import load_params
from kdsweep.errors import explained_errors


def main(alpha: float, group: Literal["main", "ablation"], out_dir: Path) -> None:
    with explained_errors():
        p = load_params()
        methods = p.sweep.methods if group == "main" else p.sweep.ablation_methods
        pipeline.run_student_stage(p, alpha, methods, out_dir)


if __name__ == "__main__":
    typer.run(main)
