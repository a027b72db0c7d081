"""`reports/report.md`, its figures and the DVC plot data, from runs.parquet (DESIGN.md §1, §6).

kdsweep.analysis computes every number once; kdsweep.report.figures draws them,
kdsweep.report.text words them (through the template templates/report.md.j2), and this module
writes both, with the plot data DVC reads. Every section but "By factor" (kdsweep.report.factors,
every (student, teacher) pair) reads the primary pair only (kdsweep.analysis.Primary).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdsweep.analysis import Analysis, Primary, analyse, factor_pairs, primary_table
from kdsweep.cache.summary import read_summaries
from kdsweep.config import AnalysisParams
from kdsweep.io import atomic_write_text
from kdsweep.report.factors import factors_markdown
from kdsweep.report.fidelity import draw_fidelity, fidelity_section, render_fidelity
from kdsweep.report.figures import draw_figures
from kdsweep.report.text import markdown
from kdsweep.runs import read_runs


def write_report(
    runs_parquet: Path,
    settings: AnalysisParams,
    out_dir: Path,
    summaries: Path | None = None,
    stores: Sequence[str] = (),
    primary: Primary | None = None,
) -> Path:
    """Write out_dir/report.md, out_dir/figures/*.png and out_dir/plots/{accuracy,gain}.csv;
    the cache table comes from the summaries of `stores` in the `summaries` directory. Every
    section but By factor reads the `primary` pair's rows (None: the runs are one pair)."""
    table = read_runs(runs_parquet)
    main = primary_table(table, primary) if primary else table
    an = analyse(main, settings)
    out_dir = Path(out_dir)
    caches = read_summaries(summaries, list(stores)) if summaries else []
    figures = draw_figures(an, caches, out_dir / "figures")
    _write_plot_data(an, out_dir / "plots")
    path = out_dir / "report.md"
    rel = {name: p.relative_to(out_dir).as_posix() for name, p in figures.items()}
    fidelity = fidelity_section(main, caches, settings)
    figure = draw_fidelity(fidelity, out_dir / "figures")
    fidelity_md = render_fidelity(fidelity, figure and figure.relative_to(out_dir).as_posix())
    pairs = factor_pairs(table, settings)
    factors_md = factors_markdown(pairs, settings, out_dir, primary and primary.student)
    atomic_write_text(path, markdown(an, caches, rel, fidelity_md, factors_md))
    return path


def _csv(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _write_plot_data(an: Analysis, plots_dir: Path) -> None:
    """accuracy.csv (one row per variant and α) and gain.csv (header only without a gain)."""
    acc = [[r["alpha"], r["variant"], r["mean"], r["ci_low"], r["ci_high"]] for r in an.summary]
    atomic_write_text(
        plots_dir / "accuracy.csv", _csv(["alpha", "variant", "score", "ci_low", "ci_high"], acc)
    )
    gain = [[g["alpha"], g["gain"], g["ci_low"], g["ci_high"]] for g in an.gains]
    atomic_write_text(plots_dir / "gain.csv", _csv(["alpha", "gain", "ci_low", "ci_high"], gain))
