"""DVC stage `aggregate`: every data/students/*/runs.json → data/results/runs.parquet + metrics.json."""

from pathlib import Path

from kdsweep.analysis import collect_runs, summary_metrics, write_parquet
from kdsweep.config import load_params
from kdsweep.errors import explained_errors
from kdsweep.io import atomic_write_json

if __name__ == "__main__":
    with explained_errors():
        params = load_params().model_dump(by_alias=True)
        table = collect_runs(Path("data/students"))
        write_parquet(table, Path("data/results/runs.parquet"))
        atomic_write_json(Path("metrics.json"), summary_metrics(table, params))
