"""report.md: the template templates/report.md.j2 rendered with an Analysis (DESIGN.md §6).

The template holds all the wording and lays the numbers out; every number comes from
kdsweep.analysis and kdsweep.stats, so the text can never disagree with the metrics file. This
module only hands them over (`_context`) with a few formatting filters. The template is package
data, found through the installed package (Jinja2's PackageLoader), not through the source tree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined

from kdsweep.analysis import FIDELITY, Analysis
from kdsweep.cache.summary import CacheSummary
from kdsweep.report.common import Row, cells, score_label, variant_order
from kdsweep.report.diagnostics import diagnose
from kdsweep.stats import median_multiplier


def _number(x: float | None, spec: str = ".4g") -> str:
    """format(x, spec) (4 significant digits by default); a dash where there is no value (None,
    or NaN: no interval from a single seed)."""
    return "—" if x is None or not math.isfinite(x) else format(x, spec)


def _alpha_set(alphas: Sequence[float]) -> str:
    return "{" + ", ".join(f"{a:g}" for a in alphas) + "}"


def _half_width(row: Row) -> float:
    return (row["ci_high"] - row["ci_low"]) / 2


def _seed_list(seeds: Sequence[Sequence[Any]]) -> str:
    """Missing (subset, train) seeds: "subset 3 / train 0, …"."""
    return ", ".join(f"subset {s} / train {t}" for s, t in seeds)


def _premises(an: Analysis) -> dict[str, dict[str, list[float]]]:
    """Per reference variant that a hypothesis row reads (its `gain_reference`): the α it is
    tested at and those where its gain over the baseline is significant — one premise per
    reference, so the sentence and the rows it governs never name two different KDs."""
    out: dict[str, dict[str, set[float]]] = {}
    for v in an.verdicts:
        if v["hypothesis"] is None:
            continue
        p = out.setdefault(v["gain_reference"], {"tested": set(), "significant": set()})
        p["tested"].add(v["alpha"])
        if v["gain_significant"]:
            p["significant"].add(v["alpha"])
    return {r: {k: sorted(x) for k, x in p.items()} for r, p in sorted(out.items())}


_ENV = Environment(
    loader=PackageLoader("kdsweep.report"),  # kdsweep/report/templates/
    autoescape=False,  # markdown, not HTML
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)
_ENV.filters |= {
    "fmt": format,  # {{ x|fmt("+.2%") }} is format(x, "+.2%")
    "number": _number,
    "alpha_set": _alpha_set,
    "half_width": _half_width,
    "seed_list": _seed_list,
}


def _context(
    an: Analysis, caches: Sequence[CacheSummary], figures: Mapping[str, str]
) -> dict[str, Any]:
    rows = an.runs.rows
    order = variant_order(an)
    rank = {v: i for i, v in enumerate(order)}
    m = an.multipliers
    return {
        "an": an,
        "settings": an.settings,
        "caches": caches,
        "diagnostics": diagnose(caches, rows),
        "figures": figures,
        "score_label": score_label(an),
        "first_run": rows[0],
        # label-only students carry no teacher: the header names that of the first that has one
        "teacher_run": next((r for r in rows if r["teacher_id"] is not None), rows[0]),
        "n_seed_pairs": len({(r["subset_seed"], r["train_seed"]) for r in rows}),
        "git_revs": sorted({r["git_rev"] for r in rows}),
        "alphas": sorted({r["alpha"] for r in rows}),
        "variants": order,
        "cells": cells(an),
        "median": (
            median_multiplier([x["multiplier"] for x in m], [x["censored"] for x in m])
            if m
            else None
        ),
        "hypotheses": an.hypotheses,
        "premises": (premises := _premises(an)),
        "premise_gaps": any(p["significant"] != p["tested"] for p in premises.values()),
        "control_rows": [v for v in an.verdicts if v["hypothesis"] is None],
        "seeds_per_cell": sorted({r["n"] for r in an.summary}),
        "significant_alphas": [g["alpha"] for g in an.gains if g["significant"]],
        "fidelity_columns": [c for c in FIDELITY if any(r[c] is not None for r in an.summary)],
        "fidelity_rows": sorted(an.summary, key=lambda r: (rank[r["variant"]], r["alpha"])),
        "budget_selects": any(r["best_step"] is not None for r in rows),
        "budget": _budget(rows),
    }


def _budget(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per α: the students' step counts, their mean epochs, and the range of chosen steps."""
    out = []
    for alpha in sorted({r["alpha"] for r in rows}):
        at = [r for r in rows if r["alpha"] == alpha]
        chosen = [r["best_step"] for r in at if r["best_step"] is not None]
        out.append(
            {
                "alpha": alpha,
                "steps": sorted({r["steps"] for r in at}),
                "epochs": sum(r["epochs"] for r in at) / len(at),
                "chosen": f"{min(chosen)}–{max(chosen)}" if chosen else "—",
            }
        )
    return out


def markdown(
    an: Analysis,
    caches: Sequence[CacheSummary],
    figures: Mapping[str, str],
    fidelity: str = "",
    factors: str = "",
) -> str:
    """report.md; `figures` maps the names draw_figures gives to paths relative to the report;
    `fidelity` and `factors`: the Cache fidelity and By factor sections' markdown
    (kdsweep.report.fidelity, kdsweep.report.factors)."""
    sections = {"fidelity_section": fidelity, "factors_section": factors}
    return render("report.md.j2", **_context(an, caches, figures), **sections)


def render(template: str, **context: Any) -> str:
    """A template of templates/ with the report's filters (fmt, number, alpha_set, …)."""
    return _ENV.get_template(template).render(context)
