"""One trained student = one `RunRecord`: the row the student stages write (runs.json) and the
pyarrow schema of runs.parquet are both this dataclass, so they cannot disagree.

Plain data, no torch: `aggregate` and `report` start fast.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kdsweep.errors import KdsweepError
from kdsweep.io import atomic_path


@dataclass(frozen=True)
class RunRecord:
    """One student: its recipe, data, budget, test metrics, cost and provenance."""

    run_id: str
    dataset: str
    task: str
    teacher_id: str | None  # the teacher of the store it reads (None: labels only)
    teacher_arch: str | None
    teacher_width: int | None
    teacher_params: int | None
    student: str  # its configuration, a key of `students:`
    student_arch: str
    student_width: int
    student_params: int
    method: str
    loss: str
    lam: float | None
    tau: float | None
    epsilon: float | None
    cache_name: str | None
    cache_kind: str | None
    k: int | None
    topk_mode: str | None
    alpha: float
    n_train: int
    subset_seed: int
    train_seed: int
    budget_mode: str
    epochs: float
    steps: int
    best_step: int | None  # the chosen checkpoint's step under budget.select best_val
    val_curve_steps: list[int]  # the validation curve: every budget.eval_every steps and the last
    val_curve: list[float]  # mean validation cross-entropy at each of those steps
    n_val: int  # validation rows carved from the subset (selection reads val_*, never test_*)
    val_acc: float
    val_ppl: float | None
    test_acc: float
    test_error: float
    test_ppl: float | None
    agreement: float | None
    test_kl: float | None
    ece: float
    neg_kl_frac: float | None
    train_seconds: float
    train_path: str
    params_hash: str
    git_rev: str
    student_key: str  # content key: a stage reuses a row whose key it already has

    def row(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _arrow_type(hint: Any) -> pa.DataType:
    """str -> string, int -> int64, float -> float64, list[X] -> list of X; `X | None` is X,
    nullable."""
    if typing.get_origin(hint) is list:
        return pa.list_(_arrow_type(typing.get_args(hint)[0]))
    base = (
        [a for a in typing.get_args(hint) if a is not type(None)]
        if isinstance(hint, types.UnionType)
        else [hint]
    )
    return {str: pa.string(), int: pa.int64(), float: pa.float64()}[base[0]]


_HINTS = typing.get_type_hints(RunRecord)
RUN_SCHEMA = pa.schema(
    [(f.name, _arrow_type(_HINTS[f.name])) for f in dataclasses.fields(RunRecord)]
)


def _load_rows(path: Path) -> list[dict[str, Any]]:
    stage = "labels" if path.parent.name == "labels" else f"student@{path.parent.name}"
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise KdsweepError(
            f"{path} is not valid JSON ({err}): re-create it with `dvc repro -f {stage}` "
            f"(or `dvc pull {stage}`)"
        ) from None
    if not isinstance(rows, list):
        raise KdsweepError(f"{path}: expected a JSON list of run rows, got {type(rows).__name__}")
    expected = set(RUN_SCHEMA.names)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise KdsweepError(f"{path}: row {i} is a {type(row).__name__}, not an object")
        missing, extra = sorted(expected - set(row)), sorted(set(row) - expected)
        if missing or extra:
            raise KdsweepError(
                f"{path}: row {i} is missing key(s) {missing} and has unexpected key(s) {extra}; "
                "the keys must be exactly the fields of kdsweep.runs.RunRecord"
            )
    return rows


def collect_runs(students_dir: Path, stages: list[str]) -> pa.Table:
    """`<students_dir>/<stage>/runs.json` of each student stage, in order, as one table of
    RUN_SCHEMA. Only the stages of the current params: a folder left by a removed store is stale."""
    files = [Path(students_dir) / s / "runs.json" for s in stages]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise KdsweepError(f"student results {missing} are missing: run `dvc repro`")
    tables = []
    for f in files:
        try:
            tables.append(pa.Table.from_pylist(_load_rows(f), schema=RUN_SCHEMA))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
            raise KdsweepError(f"{f}: a value has the wrong type for RUN_SCHEMA ({err})") from None
    table = pa.concat_tables(tables) if tables else RUN_SCHEMA.empty_table()
    if table.num_rows == 0:
        raise KdsweepError(
            f"no student runs under {students_dir} ({len(files)} runs.json file(s)): "
            "no method of the sweep trains a student (`sweep.methods`)"
        )
    return table


def write_parquet(table: pa.Table, path: Path) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_table(path: Path) -> pa.Table:
    """The Parquet file at `path`, as it is; a missing or corrupt file is a KdsweepError."""
    if not Path(path).exists():
        raise KdsweepError(f"{path} not found: run `dvc repro` (or `dvc repro aggregate`)")
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise KdsweepError(
            f"{path} is not a readable Parquet file ({err}): re-create it with "
            "`dvc repro -f aggregate`"
        ) from None


def read_runs(path: Path) -> pa.Table:
    """The runs table at `path`, checked against RUN_SCHEMA (a stale file fails with advice)."""
    table = read_table(path)
    missing = [n for n in RUN_SCHEMA.names if n not in table.column_names]
    if missing:
        raise KdsweepError(f"{path} lacks column(s) {missing}: re-run `dvc repro aggregate`")
    return table.select(RUN_SCHEMA.names).cast(RUN_SCHEMA)
