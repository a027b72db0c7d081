"""DVC stage `report`: data/results/runs.parquet → reports/report.md, figures and plot data."""

from pathlib import Path
from typing import Any

import yaml

from kdsweep.report import write_report


def load_params() -> dict[str, Any]:
    with open("params.yaml") as f:
        return yaml.safe_load(f)


def main() -> None:
    write_report(
        Path("data/results/runs.parquet"), load_params(), Path("reports"), Path("data/logits")
    )


if __name__ == "__main__":
    main()
