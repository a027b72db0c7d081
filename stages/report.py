"""DVC stage `report`: data/results/runs.parquet → reports/report.md, figures and plot data."""

from pathlib import Path

from kdsweep.config import load_params
from kdsweep.errors import explained_errors
from kdsweep.report import write_report

if __name__ == "__main__":
    with explained_errors():
        params = load_params().model_dump(by_alias=True)
        write_report(
            Path("data/results/runs.parquet"), params, Path("reports"), Path("data/logits")
        )
