"""The `prepare` stage: build the splits once, from the dataset's registered loader (DATASETS),
and write them with their nested subset orders (kdsweep.data.prepared)."""

from __future__ import annotations

import time
from pathlib import Path

from kdsweep.config import DataParams
from kdsweep.data.prepared import write_prepared
from kdsweep.data.splits import Splits
from kdsweep.io import report_work
from kdsweep.registry import DATASETS


def build_splits(p: DataParams) -> Splits:
    """The splits of `data.name`, from its registered loader."""
    return DATASETS.load(p.name)(p)


def prepare(p: DataParams, subset_seeds: list[int], out: Path) -> None:
    """The `prepare` stage: build the splits once and write them with their subset orders."""
    t0 = time.perf_counter()
    splits = build_splits(p)
    report_work("generate", time.perf_counter() - t0)
    write_prepared(out, splits, subset_seeds)
