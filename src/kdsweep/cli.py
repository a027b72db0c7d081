"""`kdsweep`: the command for people. Stages and CLI call the same library functions."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from kdsweep.cache.format import CacheError
from kdsweep.cache.reader import LogitCache

app = typer.Typer(
    help="Knowledge distillation vs dataset size, from cached teacher logits.", no_args_is_help=True
)
cache_app = typer.Typer(help="Inspect and verify logit caches.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
console = Console(soft_wrap=True)  # long paths and messages stay on one line


def _open(path: Path) -> LogitCache:
    try:
        return LogitCache(path)
    except CacheError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(1) from None


@cache_app.command("info")
def cache_info(path: Path) -> None:
    """Attributes, array shapes, bytes on disk, bytes per row and compression ratio of a store."""
    info = _open(path).info()
    t = Table(title=str(path), show_header=False)
    for k, v in info["attributes"].items():
        t.add_row(k, json.dumps(v))
    for k, (shape, dtype) in info["arrays"].items():
        t.add_row(f"array {k}", f"{shape} {dtype}")
    t.add_row("bytes on disk", f"{info['bytes_on_disk']:,}")
    t.add_row("bytes per row", f"{info['bytes_per_row']:.2f}")
    t.add_row("bytes per training row", f"{info['train_bytes_per_row']:.2f}")
    t.add_row("compression ratio", f"{info['compression_ratio']:.2f}x")
    console.print(t)


@cache_app.command("verify")
def cache_verify(path: Path) -> None:
    """Re-read every chunk and check it against its stored CRC32C checksum."""
    cache = _open(path)
    try:
        counts = cache.verify()
    except CacheError as err:
        console.print(f"[red]corrupt:[/red] {err}")
        raise typer.Exit(1) from None
    console.print(
        f"[green]ok[/green]: {sum(counts.values())} chunks verified in {len(counts)} arrays"
    )


@app.command()
def results(
    path: Path = Path("data/results/runs.parquet"),
    method: list[str] = typer.Option(None, help="Only these methods (repeatable)."),
    alpha: list[float] = typer.Option(None, help="Only these alphas (repeatable)."),
    student: list[str] = typer.Option(None, help="Only these student configurations."),
    teacher: list[str] = typer.Option(None, help="Only these teachers (label-only rows stay)."),
    columns: str = "student,teacher_id,method,alpha,tau,subset_seed,test_acc,agreement,test_kl,"
    "ece,train_seconds",
) -> None:
    """Print runs.parquet as a table, filtered by method, alpha, student and teacher."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from kdsweep.errors import KdsweepError
    from kdsweep.runs import read_table

    try:
        tbl = read_table(path)
    except KdsweepError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(1) from None
    if method:
        tbl = tbl.filter(pc.is_in(tbl["method"], value_set=pa.array(method)))
    if alpha:
        tbl = tbl.filter(pc.is_in(tbl["alpha"], value_set=pa.array(alpha, "float64")))
    if student:
        tbl = tbl.filter(pc.is_in(tbl["student"], value_set=pa.array(student)))
    if teacher:
        mask = pc.or_kleene(
            pc.is_in(tbl["teacher_id"], value_set=pa.array(teacher)), pc.is_null(tbl["teacher_id"])
        )
        tbl = tbl.filter(mask)
    cols = [c for c in columns.split(",") if c in tbl.column_names]
    t = Table()
    for c in cols:
        t.add_column(c)
    for row in tbl.select(cols).sort_by([(c, "ascending") for c in cols[:3]]).to_pylist():
        t.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()))
    console.print(t)
    console.print(f"{tbl.num_rows} runs")


@app.command()
def student(
    store: str = typer.Argument(
        ..., help="a key of cache.stores, or 'labels' for label-only methods"
    ),
    out_dir: Path = Path("data/students/manual"),
    params: Path = Path("params.yaml"),
    data: Path = Path("data"),
) -> None:
    """Train, by hand and in one process, every student that reads STORE exactly as its stage
    does, from the pipeline's outputs under DATA."""
    from kdsweep.config import load_params
    from kdsweep.errors import explained_errors
    from kdsweep.students.inputs import StageInputs
    from kdsweep.students.stage import run_student_stage

    with explained_errors():
        p = load_params(params)
        spec = p.cache.stores.get(store)  # an unknown store: run_student_stage says so
        inputs = StageInputs(
            data / "prepared",
            data / "logits" / f"{p.cache.reference}.zarr",
            None if store == "labels" else store,
            None if store == "labels" else data / "logits" / f"{store}.zarr",
            data / "teachers" / f"{spec.teacher}.safetensors" if spec else None,
        )
        out = run_student_stage(p, inputs, out_dir)
    console.print(f"wrote {out}")


@app.command()
def registry() -> None:
    """Every extension point and its registered names: what params.yaml may name."""
    from kdsweep.registry import ARCHS, CACHE_KINDS, DATASETS, LOSSES

    for reg in (DATASETS, ARCHS, LOSSES, CACHE_KINDS):
        t = Table(title=reg.kind)
        t.add_column("name")
        t.add_column("what")
        t.add_column("code")
        for e in reg.entries():
            t.add_row(e.name, e.doc, e.impl)
        console.print(t)


@app.command()
def deps(
    script: Path | None = typer.Argument(None, help="a stage script, e.g. stages/student.py"),
    write: bool = typer.Option(False, help="rewrite every stage's code deps in dvc.yaml"),
) -> None:
    """The project source files a stage script runs (what dvc.yaml must list as its deps);
    `--write` puts each stage's closure into dvc.yaml after an import changed."""
    from kdsweep.deps import closure, sync_dvc_yaml

    if write:
        console.print("dvc.yaml updated" if sync_dvc_yaml() else "dvc.yaml already up to date")
    if script is not None:
        for path in sorted(closure(script)):
            console.print(str(path))


if __name__ == "__main__":
    app()
