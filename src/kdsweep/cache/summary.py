"""The small JSON summary of a cache store that the report reads (`<summaries>/<store>.json`),
so the report never opens a Zarr store. Plain data: no torch, no zarr."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from kdsweep.errors import KdsweepError
from kdsweep.io import atomic_write_json


@dataclass(frozen=True)
class CacheSummary:
    name: str
    kind: str
    k: int | None
    dtype: str
    teacher: str
    bytes_on_disk: int
    bytes_per_row: float
    compression_ratio: float
    teacher_test_acc: float | None
    num_rows: int
    views: int | str = 1  # augmented views per training row (1: clean inputs; "fresh": online)
    draws: int = 1  # draw sets per row of a sampled store
    train_bytes_per_row: float | None = None  # bytes on disk per training row (0: online)
    teacher_test_ppl: float | None = None  # language models: the teacher's test perplexity
    # teacher-target diagnostics (kdsweep.cache.build.teacher_diagnostics), over the first
    # `diagnostic_rows` training rows: accuracy on them clean and on their cached views, and
    # [τ, mean p_T^τ(y), mean entropy / log C] on a grid of τ
    diagnostic_rows: int = 0
    teacher_train_acc: float | None = None
    teacher_view_acc: float | None = None
    num_classes: int | None = None
    soft_targets: list[list[float]] = dataclasses.field(default_factory=list)

    def write(self, path: Path) -> None:
        atomic_write_json(path, dataclasses.asdict(self))


def read_summaries(directory: Path, stores: list[str]) -> list[CacheSummary]:
    """The summaries `<directory>/<store>.json` of `stores` (not those of removed stores)."""
    out = []
    for f in (Path(directory) / f"{s}.json" for s in stores):
        if not f.exists():
            raise KdsweepError(f"cache summary {f} is missing: run `dvc repro`")
        try:
            out.append(CacheSummary(**json.loads(f.read_text())))
        except (TypeError, json.JSONDecodeError) as err:
            raise KdsweepError(
                f"{f} is not a cache summary ({err}): re-run its cache stage"
            ) from None
    return out
