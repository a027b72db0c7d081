"""DVC stage `cache@<store>`: run the store's teacher once over both splits into a Zarr store
(kdsweep.teacher.build_cache) and write its summary for the report.

Also runs under `torchrun --nproc-per-node N stages/cache.py <store> …`: each rank writes
disjoint whole chunks of the same store; rank 0 finalises it once all ranks are done.
"""

from pathlib import Path

import typer

from kdsweep.cache.build import build_cache
from kdsweep.config import load_params
from kdsweep.data.prepared import load_prepared
from kdsweep.distributed import process_group
from kdsweep.errors import explained_errors


def main(
    store: str = typer.Argument(..., help="a key of cache.stores"),
    prepared: Path = typer.Option(..., help="the prepare stage's directory"),
    checkpoint: Path = typer.Option(..., help="the store's teacher checkpoint"),
    out: Path = typer.Option(..., help="the Zarr store to write"),
    summary: Path = typer.Option(..., help="the JSON summary to write"),
) -> None:
    with explained_errors(), process_group() as (rank, world):
        build_cache(
            load_params(), store, load_prepared(prepared), checkpoint, out, summary, rank, world
        )


if __name__ == "__main__":
    typer.run(main)
