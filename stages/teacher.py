"""DVC stage `teacher`: train the teacher on the full training split (kdsweep.teacher).

Also runs under `torchrun --nproc-per-node N stages/teacher.py …` (DistributedDataParallel).
"""

from pathlib import Path

import typer

from kdsweep.config import load_params
from kdsweep.data.prepared import load_prepared
from kdsweep.distributed import process_group
from kdsweep.errors import explained_errors
from kdsweep.teacher import train_teacher


def main(
    prepared: Path = typer.Option(..., help="the prepare stage's directory"),
    out: Path = typer.Option(..., help="directory for the checkpoints and metrics.json"),
) -> None:
    with explained_errors(), process_group() as (rank, world):
        train_teacher(load_params(), load_prepared(prepared), out, rank, world)


if __name__ == "__main__":
    typer.run(main)
