"""DVC stage `teacher@<name>`: train teacher `name` of `teachers:` on the full training split
(kdsweep.teacher).

Also runs under `torchrun --nproc-per-node N stages/teacher.py …` (DistributedDataParallel).
"""

from pathlib import Path

import typer

from kdsweep.config import ParamsError, load_params
from kdsweep.data.prepared import load_prepared
from kdsweep.distributed import process_group
from kdsweep.errors import explained_errors
from kdsweep.teacher import train_teacher


def main(
    name: str = typer.Argument(..., help="the teacher, a key of teachers: in params.yaml"),
    prepared: Path = typer.Option(..., help="the prepare stage's directory"),
    out: Path = typer.Option(..., help="its checkpoint (.safetensors; metrics beside it, .json)"),
) -> None:
    with explained_errors(), process_group() as (rank, world):
        p = load_params()
        if name not in p.teachers:
            raise ParamsError(f"teacher {name!r} is not one of teachers ({', '.join(p.teachers)})")
        train_teacher(p, name, load_prepared(prepared), out, rank, world)


if __name__ == "__main__":
    typer.run(main)
