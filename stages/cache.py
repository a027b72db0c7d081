"""DVC stage `cache@<store>`: run the teacher once over both splits into a Zarr store (kdsweep.cache).

Also runs under `torchrun --nproc-per-node N stages/cache.py <store>`: each rank writes disjoint
whole chunks of the same store; rank 0 finalises it once all ranks are done.
"""

import typer

from kdsweep import pipeline
from kdsweep.config import load_params
from kdsweep.distributed import process_group
from kdsweep.errors import explained_errors


def main(store: str) -> None:
    with explained_errors(), process_group() as (rank, world):
        pipeline.build_cache(load_params(), store, rank, world)


if __name__ == "__main__":
    typer.run(main)
