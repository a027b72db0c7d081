"""The report's "By factor" section (issue #25): the reference's gain over the baseline for every
(student configuration, teacher) pair of the runs, against the student/teacher parameter ratio,
the paper's identical-architecture pair marked. The sections above read one pair only
(kdsweep.analysis.Primary); every number here comes from kdsweep.analysis.factor_pairs (one
`analyse` per pair), and this module lays them out, draws three figures and renders
templates/factors.md.j2.

No test of a difference between two pairs' gains is made: the sentences give both intervals and
whether they overlap, never a significance they do not have.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from kdsweep.analysis import FactorPair
from kdsweep.config import AnalysisParams
from kdsweep.report.common import Row, cells, score_label
from kdsweep.report.figures import gain_band, log_alpha_axis, panel_grid, save, score_band
from kdsweep.report.text import render


def pair_rows(pair: FactorPair) -> list[Row]:
    """Per α of the pair: the baseline's and the reference's summary rows, the gain row and the
    multiplier row (each None where the pair has none at that α)."""
    an = pair.analysis
    by = cells(an)
    gains = {g["alpha"]: g for g in an.gains}
    mults = {m["alpha"]: m for m in an.multipliers}
    alphas = sorted({a for _, a in by})
    return [
        {"alpha": a, "base": by.get((an.baseline, a)), "ref": by.get((an.reference, a))}
        | {"gain": gains.get(a), "mult": mults.get(a)}
        for a in alphas
    ]


def _overlap(a: Row, b: Row) -> bool | None:
    """Whether two gains' intervals overlap; None where one has no interval (one seed)."""
    bounds = (a["ci_low"], a["ci_high"], b["ci_low"], b["ci_high"])
    if any(math.isnan(x) for x in bounds):
        return None
    return a["ci_low"] <= b["ci_high"] and b["ci_low"] <= a["ci_high"]


def contrasts(pairs: Sequence[FactorPair]) -> list[Row]:
    """Per teacher that has an identical pair and a smaller student, at each α where both have a
    gain: the smallest-ratio pair's gain, the identical pair's, and whether the intervals
    overlap (a description, not a test of their difference)."""
    out = []
    for teacher in dict.fromkeys(p.teacher for p in pairs):
        mine = [p for p in pairs if p.teacher == teacher]
        same = next((p for p in mine if p.identical), None)
        small = min(mine, key=lambda p: p.ratio)
        if same is None or small.ratio >= same.ratio:
            continue
        g_small, g_same = ({g["alpha"]: g for g in p.analysis.gains} for p in (small, same))
        for a in sorted(g_small.keys() & g_same.keys()):
            out.append(
                {"alpha": a, "teacher": teacher, "small": small, "same": same}
                | {"g_small": g_small[a], "g_same": g_same[a]}
                | {"overlap": _overlap(g_small[a], g_same[a])}
            )
    return out


# ---------------------------------------------------------------------------------------------
# Figures


def _title(p: FactorPair) -> str:
    same = "\n= teacher's architecture" if p.identical else ""
    return f"student {p.student}, teacher {p.teacher} (ratio {p.ratio:.3g}){same}"


def _plot_scores(pairs: Sequence[FactorPair], s: AnalysisParams, path: Path) -> Path:
    """Score vs α of the baseline and the reference, one panel per pair, shared axes."""
    fig, axes = panel_grid(len(pairs), 3, (4.6, 3.6))
    for ax, p in zip(axes, pairs, strict=True):
        an = p.analysis
        for variant, color in ((an.baseline, "grey"), (an.reference, "k")):
            rows = [r for r in an.summary if r["variant"] == variant]
            if rows:
                score_band(ax, rows, color, variant)
        log_alpha_axis(ax)
        ax.set_title(_title(p), fontsize=9)
        ax.set_ylabel(score_label(an))
        ax.legend(fontsize=7)
    fig.suptitle(f"{s.reference} and {s.baseline} per (student, teacher) ({s.ci:.0%} t-intervals)")
    return save(fig, path)


def _plot_gains(pairs: Sequence[FactorPair], s: AnalysisParams, path: Path) -> Path:
    """Relative gain of the reference over the baseline vs α, one panel per pair."""
    fig, axes = panel_grid(len(pairs), 3, (4.6, 3.6))
    for ax, p in zip(axes, pairs, strict=True):
        if p.analysis.gains:
            gain_band(ax, p.analysis.gains, "C0", f"{s.reference} over {s.baseline}")
            log_alpha_axis(ax)
        else:  # the student trained no baseline: nothing to compare with
            ax.text(0.5, 0.5, f"no {s.baseline} rows", transform=ax.transAxes, ha="center")
        ax.set_title(_title(p), fontsize=9)
        ax.set_ylabel("relative gain")
    fig.suptitle(f"relative gain per (student, teacher) ({s.ci:.0%} Fieller intervals)")
    return save(fig, path)


def _yerr(gains: Sequence[Row]) -> np.ndarray:
    """Error bars of gain rows; none (NaN) where a bound is undefined or unbounded."""
    g = np.array([x["gain"] for x in gains])
    err = np.array([g - [x["ci_low"] for x in gains], [x["ci_high"] for x in gains] - g])
    err[~np.isfinite(err)] = np.nan
    return np.maximum(err, 0.0)


def _plot_capacity(pairs: Sequence[FactorPair], s: AnalysisParams, path: Path) -> Path:
    """The reference's relative gain against the student/teacher parameter ratio (log x): one
    colour per α (its points side by side), one line style per teacher joining its students,
    identical pairs as stars."""
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    alphas = sorted({g["alpha"] for p in pairs for g in p.analysis.gains})
    teachers = list(dict.fromkeys(p.teacher for p in pairs))
    styles = ("-", "--", ":", "-.")
    for i, a in enumerate(alphas):
        for j, teacher in enumerate(teachers):
            pts = [
                (p, g)
                for p in pairs
                if p.teacher == teacher
                for g in p.analysis.gains
                if g["alpha"] == a
            ]
            x = np.array([p.ratio * 1.05**i for p, _ in pts])
            y = np.array([g["gain"] for _, g in pts])
            label = f"α = {a:g}" if j == 0 else None
            ax.plot(x, y, styles[j % 4], color=f"C{i}", lw=1, label=label)
            err = _yerr([g for _, g in pts])
            for identical, marker, ms in ((False, "o", 6), (True, "*", 11)):
                at = np.array([p.identical == identical for p, _ in pts], dtype=bool)
                if at.any():
                    ax.errorbar(x[at], y[at], yerr=err[:, at], fmt=marker, ms=ms,
                                color=f"C{i}", capsize=3)  # fmt: skip
    for j, teacher in enumerate(teachers):
        ax.plot([], [], styles[j % 4], color="grey", label=f"teacher {teacher}")
    ax.plot([], [], "*", ms=11, color="grey", label="= teacher's architecture")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log")
    ratios = sorted({p.ratio for p in pairs})
    ax.set_xticks(ratios, [f"{r:.3g}" for r in ratios])
    ax.minorticks_off()
    ax.set_xlabel("student parameters / teacher parameters")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylabel(f"relative gain of {s.reference} over {s.baseline}")
    ax.set_title(f"gain against capacity ({s.ci:.0%} Fieller intervals)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return save(fig, path)


FIGURES: dict[str, Callable[[Sequence[FactorPair], AnalysisParams, Path], Path]] = {
    "factors_score": _plot_scores,
    "factors_gain": _plot_gains,
    "capacity": _plot_capacity,
}


def factors_markdown(
    pairs: Sequence[FactorPair], s: AnalysisParams, out_dir: Path, primary: str | None = None
) -> str:
    """The section's markdown, its figures written to out_dir/figures/<name>.png (FIGURES);
    empty, with no figure, for fewer than two pairs (one pair is the sections above).
    `primary`: the student configuration the sections above read, named in the text."""
    if len(pairs) < 2:
        return ""
    out_dir = Path(out_dir)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    figures = {
        name: draw(pairs, s, out_dir / "figures" / f"{name}.png").relative_to(out_dir).as_posix()
        for name, draw in FIGURES.items()
    }
    context: dict[str, Any] = {"pairs": [{"pair": p, "rows": pair_rows(p)} for p in pairs]}
    context |= {"contrasts": contrasts(pairs), "figures": figures, "primary": primary}
    return render("factors.md.j2", **context, settings=s)
