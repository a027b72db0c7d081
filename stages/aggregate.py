"""DVC stage `aggregate`: every data/students/*/runs.json → data/results/runs.parquet + metrics.json."""

from pathlib import Path
from typing import Any

import yaml

from kdsweep.analysis import collect_runs, summary_metrics, write_json, write_parquet


def load_params() -> dict[str, Any]:
    with open("params.yaml") as f:
        return yaml.safe_load(f)


def main() -> None:
    table = collect_runs(Path("data/students"))
    write_parquet(table, Path("data/results/runs.parquet"))
    write_json(Path("metrics.json"), summary_metrics(table, load_params()))


if __name__ == "__main__":
    main()
