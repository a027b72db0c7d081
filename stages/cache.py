"""DVC stage `cache@<store>`: run the teacher once over both splits into a Zarr store (kdsweep.cache)."""

import typer

from kdsweep import pipeline
from kdsweep.config import load_params


def main(store: str) -> None:
    pipeline.build_cache(load_params(), store)


if __name__ == "__main__":
    typer.run(main)
