"""The report's "Cache fidelity" section (issue #22): per cache store and α, what it costs on
disk (bytes per row) and how much of the reference's gain over the baseline its KD students keep.

Retained share = (score(store's KD) − score(baseline)) / (score(reference) − score(baseline)),
paired by (subset_seed, train_seed), with Fieller's interval (`stats.share`) at `analysis.ci`,
shown only where the reference's gain over the baseline is significant. The reference is the KD
students of a store of kind `online` (the teacher run on every batch) where any ran, else the
students of `analysis.reference` (KD on the full cache). A store's students at τ are compared
with the reference's students at that τ when the reference ran it, else with the reference's τ
selected on the validation rows at that α (never on test). Perplexity works unchanged: the
share is a ratio of two differences, so only the gain's significance and the τ selection
depend on which way the score points.

Plain numpy/pyarrow + matplotlib: no torch, like the rest of the report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from jinja2 import Environment, PackageLoader, StrictUndefined

from kdsweep.analysis import primary_score
from kdsweep.cache.summary import CacheSummary
from kdsweep.config import AnalysisParams
from kdsweep.errors import KdsweepError
from kdsweep.io import atomic_savefig
from kdsweep.stats import difference, share

THRESHOLD = 0.9  # "retains the gain": the cheapest store whose share reaches this is named
ONLINE = "online"
Row = Mapping[str, Any]


def _seeds(rows: Sequence[Row]) -> dict[tuple[int, int], float]:
    return {(r["subset_seed"], r["train_seed"]): r["score"] for r in rows}


def _by_alpha_tau(rows: Sequence[Row]) -> dict[float, dict[float | None, list[Row]]]:
    out: dict[float, dict[float | None, list[Row]]] = {}
    for r in rows:
        out.setdefault(r["alpha"], {}).setdefault(r["tau"], []).append(r)
    return out


def _select(by_tau: Mapping[float | None, Sequence[Row]], sign: float) -> float | None:
    """The τ with the best mean validation score (validation rows only, never test)."""
    if len(by_tau) == 1:
        return next(iter(by_tau))
    missing = [r["run_id"] for rs in by_tau.values() for r in rs if r["val"] is None]
    if missing:
        raise KdsweepError(
            f"the reference sweeps τ but run(s) {missing[:3]} have no validation score: a "
            "temperature is selected on the validation split only; re-run the student stages"
        )
    return max(by_tau, key=lambda t: sign * float(np.mean([r["val"] for r in by_tau[t]])))


def _reference(rows: Sequence[Row], s: AnalysisParams) -> tuple[list[Row], str]:
    """The reference's rows and how it was chosen: the KD students of an `online` store where any
    ran (the `analysis.reference` method among them if it is one, else the first by name), else
    those of `analysis.reference`."""
    named = [r for r in rows if r["method"] == s.reference]
    loss = named[0]["loss"] if named else "kd"
    online = [r for r in rows if r["cache_kind"] == ONLINE and r["loss"] == loss]
    if online:
        methods = sorted({r["method"] for r in online})
        method = s.reference if s.reference in methods else methods[0]
        return [r for r in online if r["method"] == method], ONLINE
    return named, "cache"


def _cell(
    alpha: float,
    store: Sequence[Row],
    ref_by_tau: Mapping[float | None, Sequence[Row]] | None,
    base: Sequence[Row] | None,
    tau: float | None,
    sign: float,
    ci: float,
) -> dict[str, Any]:
    cell: dict[str, Any] = {"alpha": alpha, "share": None, "low": None, "high": None, "n": 0}
    if not ref_by_tau or not base:
        return cell | {"status": "n/a: no reference or baseline students at this α"}
    matched = tau in ref_by_tau
    ref_tau = tau if matched else _select(ref_by_tau, sign)
    cell |= {"ref_tau": ref_tau, "tau_matched": matched}
    c, r, b = _seeds(store), _seeds(ref_by_tau[ref_tau]), _seeds(base)
    groups = ((c, store), (r, ref_by_tau[ref_tau]), (b, base))
    if any(len(keyed) < len(group) for keyed, group in groups):
        raise KdsweepError(
            f"α={alpha:g}: several students share a (subset_seed, train_seed) in one group; "
            "the fidelity table pairs students by seed"
        )
    seeds = sorted(c.keys() & r.keys() & b.keys())
    cell["n"] = len(seeds)
    if len(seeds) < 2:
        return cell | {"status": "n/a: fewer than 2 seed pairs"}
    cv, rv, bv = (np.array([d[k] for k in seeds]) for d in (c, r, b))
    if not difference(sign * rv, sign * bv, True, ci)[1] > 0:
        return cell | {"status": "n/a: reference gain not significant"}
    point, lo, hi = share(cv, rv, bv, ci)
    return cell | {"share": point, "low": lo, "high": hi, "status": "ok"}


def fidelity_section(
    rows: Sequence[Row] | pa.Table, summaries: Sequence[CacheSummary], settings: AnalysisParams
) -> dict[str, Any]:
    """The section's numbers. `rows`: runs.parquet's table (or its rows as dicts); `summaries`:
    the stores' CacheSummary; `settings`: params.yaml's `analysis:` (baseline, reference, ci).

    Returns {"reference": {method, cache_name, kind ("online" | "cache")}, "baseline",
    "alphas", "ci", "threshold", "higher_is_better", "score", "rows": one per (store, method, τ)
    of the reference's loss, λ and teacher — store, kind, k, dtype, views, draws, method, tau,
    bytes_per_row, ref_taus, ref_tau_note, is_reference, cells (one per α: share, low, high, n,
    ref_tau, tau_matched, status) — "sentences" (one per α: the cheapest store retaining
    ≥ THRESHOLD) and "figure_alpha" (the smallest α)}. Empty "rows" where there is no
    reference, baseline or store to compare."""
    rows = rows.to_pylist() if isinstance(rows, pa.Table) else [dict(r) for r in rows]
    tasks = sorted({r["task"] for r in rows})
    if len(tasks) > 1:
        raise KdsweepError(f"the runs mix tasks {tasks}: analyse one task at a time")
    score, val, hib = primary_score(tasks[0] if tasks else "vision")
    for r in rows:
        r["score"], r["val"] = r[score], r[val]
    sign = 1.0 if hib else -1.0
    ref_rows, ref_kind = _reference(rows, settings)
    base_rows = [r for r in rows if r["method"] == settings.baseline]
    out: dict[str, Any] = {
        "reference": None,
        "baseline": settings.baseline,
        "alphas": [],
        "ci": settings.ci,
        "threshold": THRESHOLD,
        "higher_is_better": hib,
        "score": score,
        "rows": [],
        "sentences": [],
        "figure_alpha": None,
    }
    if not ref_rows or not base_rows:
        return out
    ref0 = ref_rows[0]
    out["reference"] = {"method": ref0["method"], "cache_name": ref0["cache_name"]}
    out["reference"]["kind"] = ref_kind
    same = ("loss", "lam", "teacher_id")
    kd = [
        r
        for r in rows
        if r["cache_name"] is not None
        and r["cache_kind"] != ONLINE
        and all(r[key] == ref0[key] for key in same)
    ]
    if not kd:
        return out
    alphas = sorted({r["alpha"] for r in kd})
    ref_at, base_at = _by_alpha_tau(ref_rows), _by_alpha_tau(base_rows)
    info = {s.name: s for s in summaries}
    groups: dict[tuple[str, str, float | None], list[Row]] = {}
    for r in kd:
        groups.setdefault((r["cache_name"], r["method"], r["tau"]), []).append(r)
    for (store, method, tau), grs in sorted(groups.items(), key=lambda kv: repr(kv[0])):
        s = info.get(store)
        is_ref = ref_kind == "cache" and method == ref0["method"]
        at = _by_alpha_tau(grs)
        cells = []
        for a in alphas:
            if a not in at:
                cells.append({"alpha": a, "share": None, "low": None, "high": None, "n": 0})
                cells[-1]["status"] = "—"
                continue
            base = [x for rs in base_at.get(a, {}).values() for x in rs]
            cells.append(_cell(a, at[a][tau], ref_at.get(a), base, tau, sign, settings.ci))
        ref_taus = sorted({c["ref_tau"] for c in cells if "ref_tau" in c}, key=str)
        matched = all(c.get("tau_matched", True) for c in cells)
        out["rows"].append(
            {
                "store": store,
                "kind": s.kind if s else grs[0]["cache_kind"],
                "k": s.k if s else grs[0]["k"],
                "dtype": s.dtype if s else None,
                "views": s.views if s else None,
                "draws": s.draws if s else None,
                "method": method,
                "topk_mode": grs[0]["topk_mode"],
                "tau": tau,
                "bytes_per_row": s.train_bytes_per_row if s else None,  # per training row
                "ref_taus": ref_taus,
                "ref_tau_note": _tau_note(ref_taus, matched, tau),
                "is_reference": is_ref,
                "cells": cells,
            }
        )
    out["rows"].sort(key=lambda g: (not g["is_reference"], -(g["bytes_per_row"] or 0)))
    out["alphas"] = alphas
    out["figure_alpha"] = alphas[0]
    out["sentences"] = [_sentence(out, i, a) for i, a in enumerate(alphas)]
    return out


def _tau_note(ref_taus: Sequence[float | None], matched: bool, tau: float | None) -> str:
    fmt = ", ".join("—" if t is None else f"{t:g}" for t in ref_taus) or "—"
    if matched and ref_taus == [tau]:
        return f"{fmt} (same)"
    return f"{fmt} (val-selected)"


def _pct(x: float | None) -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:.0%}"


def _sentence(section: Mapping[str, Any], i: int, alpha: float) -> str:
    """At α: the cheapest store (fewest bytes/row) whose share's point estimate is ≥ THRESHOLD,
    and whether its interval's lower end is too; else that none is, with the best share."""
    cands = [
        (g, g["cells"][i])
        for g in section["rows"]
        if not g["is_reference"] and g["cells"][i]["share"] is not None
    ]
    head = f"α = {alpha:g}:"
    if not cands:
        statuses = {g["cells"][i]["status"] for g in section["rows"] if not g["is_reference"]}
        why = next(iter(statuses)) if len(statuses) == 1 else "n/a: no share defined"
        return f"{head} {'no store but the reference ran here' if why == '—' else why}."
    t = section["threshold"]

    def name(g: Row, c: Row) -> str:
        tau = "" if g["tau"] is None else f", τ = {g['tau']:g}"
        size = "unknown size" if g["bytes_per_row"] is None else f"{g['bytes_per_row']:,.4g}"
        return (
            f"`{g['store']}` ({g['method']}{tau}; {size} bytes/row), with "
            f"{_pct(c['share'])} [{_pct(c['low'])}, {_pct(c['high'])}]"
        )

    passing = [(g, c) for g, c in cands if c["share"] >= t]
    if passing:
        g, c = min(passing, key=lambda gc: (gc[0]["bytes_per_row"] or math.inf, -gc[1]["share"]))
        sure = c["low"] is not None and math.isfinite(c["low"]) and c["low"] >= t
        tail = (
            f"its interval's lower end is ≥ {t:.0%} too"
            if sure
            else f"but its interval's lower end is below {t:.0%}, so {t:.0%} is not established"
        )
        return (
            f"{head} the cheapest store that retains ≥ {t:.0%} of the reference's gain is "
            f"{name(g, c)}; {tail}."
        )
    g, c = max(cands, key=lambda gc: gc[1]["share"])
    return (
        f"{head} none of the stores retains ≥ {t:.0%} of the reference's gain; the best is "
        f"{name(g, c)}."
    )


# ---------------------------------------------------------------------------------------------
# Markdown and figure


def _cell_text(c: Mapping[str, Any]) -> str:
    if c["share"] is None:
        return c["status"]
    return f"{_pct(c['share'])} [{_pct(c['low'])}, {_pct(c['high'])}]"


_ENV = Environment(
    loader=PackageLoader("kdsweep.report"),  # kdsweep/report/templates/
    autoescape=False,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)
_ENV.filters |= {"cell": _cell_text, "pct": _pct, "fmt": format}


def render_fidelity(section: Mapping[str, Any], figure: str | None = None) -> str:
    """The section as markdown (templates/fidelity.md.j2); `figure` is the path of
    `draw_fidelity`'s PNG relative to the report (no image link without it). Empty when the
    section has no rows."""
    if not section["rows"]:
        return ""
    return _ENV.get_template("fidelity.md.j2").render(fidelity=section, figure=figure)


def draw_fidelity(section: Mapping[str, Any], out_dir: Path) -> Path | None:
    """`out_dir/fidelity.png`: bytes per row (log x) against the retained share at the smallest
    α, one point per store and method (its interval as bars), dashed lines at THRESHOLD and 100%.
    None (and no file) where no share is defined there. Written atomically."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter, NullFormatter, PercentFormatter

    alpha = section["figure_alpha"]
    pts = [
        (g, g["cells"][0])
        for g in section["rows"]
        if not g["is_reference"]
        and g["cells"][0]["share"] is not None
        and (g["bytes_per_row"] or 0) > 0
    ]
    if alpha is None or not pts:
        return None
    fig = Figure(figsize=(9.5, 4.5))
    ax = fig.subplots()
    for i, (g, c) in enumerate(pts):
        lo, hi = c["low"], c["high"]
        err = None
        if lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi):
            err = [[c["share"] - lo], [hi - c["share"]]]
        tau = "" if g["tau"] is None else f" τ={g['tau']:g}"
        label = f"{g['store']} ({g['method']}{tau})"
        ax.errorbar([g["bytes_per_row"]], [c["share"]], yerr=err, fmt="osD^v<>p"[i % 8],
                    color=f"C{i % 10}", capsize=3, label=label)  # fmt: skip
    t = section["threshold"]
    ax.axhline(t, color="grey", ls="--", lw=0.9, label=f"{t:.0%} of the gain")
    ax.axhline(1.0, color="k", ls="--", lw=0.9, label="all of the reference's gain")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("bytes per training row on disk (compressed; views and draw sets included)")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ref = section["reference"]
    ax.set_ylabel(f"share of {ref['method']}'s gain over {section['baseline']}")
    ax.set_title(f"cache fidelity at α = {alpha:g} ({section['ci']:.0%} Fieller intervals)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "fidelity.png"
    atomic_savefig(fig, path, dpi=120)
    return path
