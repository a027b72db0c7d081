"""`reports/report.md`, its figures and the DVC plot data, from runs.parquet (DESIGN.md §1, §6).

Every number and every verdict sentence is computed by kdsweep.analysis; this module only lays
them out, so the text can never disagree with the metrics file. Sections whose inputs are absent
(no baseline, no controls, no τ sweep, no cache ablation, no cache summaries) are left out or say
so, so a run with only `ce` and `kd` still gives a complete report.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, PercentFormatter

from kdsweep.analysis import Analysis, analyse, hypothesis_assessment
from kdsweep.cache.summary import read_summaries
from kdsweep.config import AnalysisParams
from kdsweep.io import atomic_write_text
from kdsweep.runs import read_runs
from kdsweep.stats import median_multiplier

Row = dict[str, Any]
ABLATION_KINDS = ("topk", "sampled")


def write_report(
    runs_parquet: Path,
    settings: AnalysisParams,
    out_dir: Path,
    summaries: Path | None = None,
    stores: list[str] = (),
) -> Path:
    """Write out_dir/report.md, out_dir/figures/*.png and out_dir/plots/{accuracy,gain}.csv;
    the cache table comes from the summaries of `stores` in the `summaries` directory."""
    an = analyse(read_runs(runs_parquet), settings)
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    caches = (
        [dataclasses.asdict(c) for c in read_summaries(summaries, list(stores))]
        if summaries
        else []
    )
    figures = {"score": _plot_scores(an, fig_dir / "score_vs_alpha.png")}
    if an.gains:
        figures["gain"] = _plot_gain(an, fig_dir / "relative_gain.png")
    if an.multipliers:
        figures["multiplier"] = _plot_multiplier(an, fig_dir / "multiplier.png")
    if _temperature_families(an.summary):
        figures["tau"] = _plot_temperature(an, fig_dir / "temperature_sweep.png")
    if any(r["cache_kind"] in ABLATION_KINDS for r in an.summary):
        figures["cache"] = _plot_cache(an, caches, fig_dir / "cache_ablation.png")
    _write_plot_data(an, out_dir / "plots")
    path = out_dir / "report.md"
    rel = {k: f"figures/{p.name}" for k, p in figures.items()}
    atomic_write_text(path, _markdown(an, caches, rel))
    return path


# ---------------------------------------------------------------------------------------------
# Grouping helpers


def _variant_order(an: Analysis) -> list[str]:
    """Baseline, reference, then every other variant (by method, then τ)."""
    first = [v for v in (an.baseline, an.reference) if v is not None]
    return first + [v for v in an.runs.variants() if v not in first]


def _cells(an: Analysis) -> dict[tuple[str, float], Row]:
    return {(r["variant"], r["alpha"]): r for r in an.summary}


def _temperature_families(summary: Sequence[Row]) -> dict[tuple[Any, ...], dict[float, list[Row]]]:
    """Students that differ only in τ — same loss, cache, λ and top-k mode, across methods, so
    kd(τ=4) and kd_tau(τ=1, 16) form one sweep — at each α where ≥ 2 distinct τ exist."""
    fams: dict[tuple[Any, ...], dict[float, list[Row]]] = {}
    for r in summary:
        if r["tau"] is not None:
            key = (r["loss"], r["cache_name"], r["lam"], r["topk_mode"])
            fams.setdefault(key, {}).setdefault(r["alpha"], []).append(r)
    out = {}
    for key, by_alpha in fams.items():
        swept = {a: rows for a, rows in by_alpha.items() if len({r["tau"] for r in rows}) > 1}
        if swept:
            out[key] = swept
    return out


def _full_reference(summary: Sequence[Row], r: Row) -> Row | None:
    """The full-cache student with the same loss, λ, τ, teacher and α as an ablation row."""
    keys = ("loss", "lam", "tau", "teacher_id", "alpha")
    for s in summary:
        if s["cache_kind"] == "full" and all(s[k] == r[k] for k in keys):
            return s
    return None


# ---------------------------------------------------------------------------------------------
# Figures


def _score_label(an: Analysis) -> str:
    return "test accuracy" if an.runs.higher_is_better else "test perplexity (lower is better)"


def _save(fig: Figure, path: Path) -> Path:
    """Figures are built without pyplot (no global state, no GUI backend); PNGs render via Agg."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _log_alpha_axis(ax: Axes) -> None:
    ax.set_xscale("log")
    ax.set_xlabel("α (fraction of the training set)")
    ax.grid(True, which="both", alpha=0.3)


def _plot_scores(an: Analysis, path: Path) -> Path:
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    colors = matplotlib.colormaps["tab10"].colors
    for i, v in enumerate(_variant_order(an)):
        rows = [r for r in an.summary if r["variant"] == v]
        a = [r["alpha"] for r in rows]
        main = v in (an.baseline, an.reference)
        c, marker = colors[i % len(colors)], "osD^v"[i // len(colors) % 5]
        ax.plot(
            a, [r["mean"] for r in rows], f"{marker}-", color=c, lw=2.5 if main else 1.2, label=v
        )
        ax.fill_between(
            a, [r["ci_low"] for r in rows], [r["ci_high"] for r in rows], color=c, alpha=0.15
        )
    _log_alpha_axis(ax)
    ax.set_ylabel(_score_label(an))
    ax.set_title(f"{_score_label(an)} vs α ({an.settings.ci:.0%} bootstrap CI over seeds)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(fig, path)


def _plot_gain(an: Analysis, path: Path) -> Path:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    g = an.gains
    a = [x["alpha"] for x in g]
    ax.plot(a, [x["gain"] for x in g], "o-", color="C0", label=f"{an.reference} over {an.baseline}")
    ax.fill_between(a, [x["ci_low"] for x in g], [x["ci_high"] for x in g], color="C0", alpha=0.2)
    ax.axhline(0, color="k", lw=0.8)
    _log_alpha_axis(ax)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylabel("relative gain")
    ax.legend()
    return _save(fig, path)


def _plot_multiplier(an: Analysis, path: Path) -> Path:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    m = an.multipliers
    ax.plot([x["alpha"] for x in m], [x["multiplier"] for x in m], "-", color="C0", alpha=0.6)
    styles = {
        "measured": ("o", "C0", lambda x: not x["censored"] and not x["clamped"]),
        "censored (lower bound)": ("^", "C3", lambda x: x["censored"]),
        "clamped (upper bound)": ("v", "C1", lambda x: x["clamped"]),
    }
    for label, (marker, color, pick) in styles.items():
        pts = [x for x in m if pick(x)]
        if pts:
            xs, ys = [x["alpha"] for x in pts], [x["multiplier"] for x in pts]
            ax.scatter(xs, ys, marker=marker, s=60, color=color, label=label, zorder=3)
    med, lower = median_multiplier([x["multiplier"] for x in m], [x["censored"] for x in m])
    ax.axhline(
        med, color="C2", ls=":", label=f"median {med:.3g}{' (lower bound)' if lower else ''}"
    )
    ax.axhline(1, color="k", lw=0.8)
    _log_alpha_axis(ax)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_ylabel(f"data-efficiency multiplier α*/α ({an.reference} vs {an.baseline})")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _plot_temperature(an: Analysis, path: Path) -> Path:
    fams = _temperature_families(an.summary)
    swept = sorted({a for by_alpha in fams.values() for a in by_alpha})
    panels = sorted({swept[0], swept[-1]})
    fig = Figure(figsize=(6 * len(panels), 4))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, alpha in zip(axes[0], panels, strict=True):
        taus = sorted({r["tau"] for by_alpha in fams.values() for r in by_alpha.get(alpha, [])})
        x_inf = taus[-1] * 4
        for i, (key, by_alpha) in enumerate(fams.items()):
            rows = sorted(by_alpha.get(alpha, []), key=lambda r: r["tau"])
            if rows:
                loss, cache, lam, mode = key
                lam_s = "" if lam is None else f", λ={lam:g}"
                label = f"{loss} ({cache}{', ' + mode if mode else ''}{lam_s})"
                _errorbar(ax, [r["tau"] for r in rows], rows, f"C{i}", "o-", label)
        for r in (r for r in an.summary if r["loss"] == "logit_mse" and r["alpha"] == alpha):
            _errorbar(ax, [x_inf], [r], "k", "s", f"{r['variant']} (τ=∞)")
        base = _cells(an).get((an.baseline, alpha)) if an.baseline else None
        if base:
            ax.axhline(base["mean"], color="grey", ls="--", label=f"{an.baseline}")
        ax.set_xscale("log")
        ticks = [*taus, x_inf]
        ax.set_xticks(ticks, [f"{t:g}" for t in taus] + ["∞"])
        ax.minorticks_off()
        ax.set_xlabel("temperature τ")
        ax.set_ylabel(_score_label(an))
        ax.set_title(f"α = {alpha:g}")
        ax.legend(fontsize=7)
    return _save(fig, path)


def _errorbar(
    ax: Axes, x: Sequence[float], rows: Sequence[Row], color: Any, fmt: str, label: str
) -> None:
    y = np.array([r["mean"] for r in rows])
    err = np.array(
        [[r["mean"] - r["ci_low"] for r in rows], [r["ci_high"] - r["mean"] for r in rows]]
    )
    ax.errorbar(x, y, yerr=err, fmt=fmt, color=color, capsize=3, label=label)


def _k_axis(ax: Axes, ks: Sequence[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(ks)), [str(k) for k in sorted(set(ks))])
    ax.minorticks_off()
    ax.set_xlabel("k (teacher entries kept per row)")


def _ablation_key(r: Row) -> tuple[Any, ...]:
    return (r["cache_kind"], r["loss"], r["topk_mode"], r["tau"], r["lam"])


def _plot_cache(an: Analysis, caches: Sequence[Row], path: Path) -> Path:
    """One score-vs-k panel per ablation α (full-cache students as black lines), then bytes/row
    vs k; the colour is the cache kind in every panel."""
    abl = [r for r in an.summary if r["cache_kind"] in ABLATION_KINDS]
    color = {kind: f"C{i}" for i, kind in enumerate(ABLATION_KINDS)}
    alphas = sorted({r["alpha"] for r in abl})
    n = len(alphas) + bool(caches)
    fig = Figure(figsize=(5.5 * n, 4))
    axes = fig.subplots(1, n, squeeze=False)[0]
    keys = sorted({_ablation_key(r) for r in abl}, key=repr)
    for ax, alpha in zip(axes, alphas, strict=False):
        refs: dict[str, Row] = {}
        for i, key in enumerate(keys):
            rows = [r for r in abl if r["alpha"] == alpha and _ablation_key(r) == key]
            if rows:
                rows.sort(key=lambda r: r["k"])
                kind, loss, mode, tau, _ = key
                label = f"{loss} {kind}{'/' + mode if mode else ''} τ={tau:g}"
                fmt = "osD^v"[i % 5] + "-"
                _errorbar(ax, [r["k"] for r in rows], rows, color[kind], fmt, label)
                ref = _full_reference(an.summary, rows[0])
                if ref:
                    refs[ref["variant"]] = ref
        for j, ref in enumerate(refs.values()):
            ls = ("--", ":", "-.")[j % 3]
            ax.axhline(ref["mean"], color="k", ls=ls, label=f"full cache: {ref['variant']}")
        _k_axis(ax, [r["k"] for r in abl])
        ax.set_ylabel(_score_label(an))
        ax.set_title(f"score vs k, α = {alpha:g}")
        ax.legend(fontsize=7)
    if caches:
        ax = axes[-1]
        for kind in ABLATION_KINDS:
            pts = sorted((c["k"], c["bytes_per_row"]) for c in caches if c["kind"] == kind)
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", color=color[kind], label=kind)
        for j, c in enumerate(c for c in caches if c["kind"] == "full"):
            ls = ("--", ":", "-.")[j % 3]
            ax.axhline(c["bytes_per_row"], color="k", ls=ls, label=f"full: {c['name']}")
        _k_axis(ax, [c["k"] for c in caches if c["kind"] in ABLATION_KINDS])
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.set_ylabel("bytes per row on disk (compressed)")
        ax.set_title("cache size vs k")
        ax.legend(fontsize=7)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# DVC plot data


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


# ---------------------------------------------------------------------------------------------
# Markdown


def _f(x: float | None) -> str:
    return "—" if x is None else f"{x:.4g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _alphas(xs: Sequence[float]) -> str:
    return "{" + ", ".join(f"{a:g}" for a in xs) + "}"


def _at(xs: Sequence[float]) -> str:
    return f"at α ∈ {_alphas(xs)}" if xs else "at no α"


def _header(an: Analysis) -> str:
    rows = an.runs.rows
    first = rows[0]
    seeds = sorted({(r["subset_seed"], r["train_seed"]) for r in rows})
    revs = sorted({r["git_rev"] for r in rows})
    lines = [
        "# kdsweep report\n",
        f"- dataset **{first['dataset']}** (task {an.runs.task}), teacher {first['teacher_arch']}, "
        f"student {first['student_arch']}, budget mode {first['budget_mode']}",
        f"- {len(rows)} students, {len(an.runs.variants())} variants, "
        f"α ∈ {_alphas(sorted({r['alpha'] for r in rows}))}, {len(seeds)} (subset, train) seed pairs",
        f"- primary score: {_score_label(an)}; intervals are {an.settings.ci:.0%} percentile "
        f"bootstrap CIs of the mean over seeds ({an.settings.n_boot} resamples, seed {an.settings.seed})",
        f"- baseline **{an.baseline or an.settings.baseline + ' (absent)'}**, reference "
        f"**{an.reference or an.settings.reference + ' (absent)'}**",
        f"- git revision(s): {', '.join(revs)}",
    ]
    if an.reference and an.reference != an.settings.reference:
        lines.append(
            f"- `{an.settings.reference}` sweeps τ: the reference is its variant with the best mean "
            f"score over the shared α, `{an.reference}`"
        )
    return "\n".join(lines) + "\n"


def _results(an: Analysis, figures: Mapping[str, str]) -> str:
    alphas = sorted({r["alpha"] for r in an.summary})
    cells = _cells(an)

    def cell(v: str, a: float) -> str:
        r = cells.get((v, a))
        return (
            ""
            if r is None
            else f"{r['mean']:.4g} ± {(r['ci_high'] - r['ci_low']) / 2:.2g} ({r['n']})"
        )

    rows = [[v, *(cell(v, a) for a in alphas)] for v in _variant_order(an)]
    return (
        f"## Results: {_score_label(an)}\n\nmean ± CI half-width (n students) per variant and α.\n\n"
        + _table(["variant", *(f"α={a:g}" for a in alphas)], rows)
        + f"\n![score vs α]({figures['score']})\n"
    )


def _gains(an: Analysis, figures: Mapping[str, str]) -> str:
    if not an.gains:
        return (
            "## Relative gain\n\nNot available: no α at which both the baseline "
            f"({an.settings.baseline}) and the reference ({an.settings.reference}) have runs.\n"
        )
    formula = "(ref − base)/base" if an.runs.higher_is_better else "(base − ref)/base"
    rows = [
        [f"{g['alpha']:g}", f"{g['gain']:+.2%}", f"[{g['ci_low']:+.2%}, {g['ci_high']:+.2%}]"]
        + [f"{g['n_ref']}/{g['n_base']}", "yes" if g["paired"] else "no"]
        for g in an.gains
    ]
    return (
        f"## Relative gain of {an.reference} over {an.baseline}\n\n"
        f"{formula} of the seed means; positive means {an.reference} is better.\n\n"
        + _table(["α", "gain", f"{an.settings.ci:.0%} CI", "n ref/base", "paired by seed"], rows)
        + f"\n![relative gain]({figures['gain']})\n"
    )


def _multipliers(an: Analysis, figures: Mapping[str, str]) -> str:
    if not an.multipliers:
        return (
            "## Data-efficiency multiplier\n\nNot available: the baseline "
            f"({an.settings.baseline}) or the reference ({an.settings.reference}) has no runs.\n"
        )
    m = an.multipliers

    def note(x: Row) -> str:
        return (
            "censored (lower bound)"
            if x["censored"]
            else "clamped (upper bound)"
            if x["clamped"]
            else ""
        )

    def bound(x: Row) -> str:
        return "≥ " if x["censored"] else "≤ " if x["clamped"] else ""

    rows = [
        [f"{x['alpha']:g}", _f(x["ref_score"]), f"{bound(x)}{x['alpha_star']:.4g}"]
        + [f"{bound(x)}{x['multiplier']:.3g}", note(x)]
        for x in m
    ]
    med, lower = median_multiplier([x["multiplier"] for x in m], [x["censored"] for x in m])
    rows.append(
        ["**median**", "", "", f"**{'≥ ' if lower else ''}{med:.3g}**"]
        + ["censored (lower bound)" if lower else ""]
    )
    return (
        f"## Data-efficiency multiplier\n\nα* is where the {an.baseline} curve (made monotone, "
        f"interpolated linearly in log α) reaches {an.reference}'s mean score at α; the multiplier "
        f"α*/α is how much more data {an.baseline} needs. Censored: {an.reference} beats every "
        f"{an.baseline} point, so α* is at least the largest α. Clamped: {an.reference} is worse "
        f"than {an.baseline} at its smallest α, so α* is at most that α.\n\n"
        + _table(["α", f"{an.reference} score", "α*", "multiplier", "note"], rows)
        + f"\n![multiplier]({figures['multiplier']})\n"
    )


_PHRASE = {
    "falls short": "falls short of",
    "matches": "matches",
    "exceeds": "exceeds",
    "undetermined (n<2)": "cannot be compared (fewer than 2 students) with",
}


def _sentence(v: Row, ci: float) -> str:
    return (
        f"At α={v['alpha']:g}, **{v['control']} {_PHRASE[v['verdict']]} {v['reference']}**: "
        f"advantage of {v['reference']} = {v['advantage']:+.3g} ({ci:.0%} CI "
        f"[{v['ci_low']:+.3g}, {v['ci_high']:+.3g}], {v['relative_advantage']:+.1%} of the control; "
        f"n={v['n_ref']} vs {v['n_control']}, {'paired by seed' if v['paired'] else 'unpaired'})."
    )


def _verdict_table(an: Analysis, rows: Sequence[Row]) -> str:
    body = [
        [v["control"], f"{v['alpha']:g}", _f(v["ref_mean"]), _f(v["control_mean"])]
        + [f"{v['advantage']:+.3g}", f"[{v['ci_low']:+.3g}, {v['ci_high']:+.3g}]", v["verdict"]]
        for v in rows
    ]
    head = [
        "control",
        "α",
        an.reference or "",
        "control",
        "advantage",
        f"{an.settings.ci:.0%} CI",
        "verdict",
    ]
    return (
        _table(head, body)
        + "\n"
        + "\n".join(f"- {_sentence(v, an.settings.ci)}" for v in rows)
        + "\n"
    )


def _hypotheses(an: Analysis) -> str:
    ref = an.reference or an.settings.reference
    sign = "higher" if an.runs.higher_is_better else "lower"
    intro = (
        f"Advantage = {ref}'s score minus the control's, signed so that positive means {ref} is "
        f"better ({sign} {an.runs.score}). Verdicts come from the {an.settings.ci:.0%} CI of the "
        "advantage: above 0 → the control *falls short*, containing 0 → it *matches*, below 0 → it "
        "*exceeds*.\n"
    )
    ls_rows = [v for v in an.verdicts if v["hypothesis_control"]]
    other = [v for v in an.verdicts if not v["hypothesis_control"]]
    wanted = "controls whose loss tests a hypothesis (kdsweep.registry.LOSSES)"
    out = ["## Hypothesis controls\n\n" + intro]
    if not ls_rows:
        out.append(
            "### Label smoothing vs dark knowledge\n\nNot tested: no runs of "
            f"{wanted} that are listed in analysis.controls, or no {ref} runs at their α.\n"
        )
    else:
        h = hypothesis_assessment(an.verdicts)
        names = ", ".join(h["controls"])
        ls, dk = h["label_smoothing"], h["dark_knowledge"]
        tested = h["tested_alphas"]
        out.append(
            "### Hypothesis: label smoothing\n\n"
            f"Prediction: if label smoothing explained {ref}'s gain, {names} would match {ref} at "
            "every α.\n\n"
            f"**Verdict: {ls['verdict']}** — the controls all match {ref} "
            f"{_at(ls['supported_at'])} of the {len(tested)} α tested {_alphas(tested)}.\n\n"
            + _verdict_table(an, ls_rows)
        )
        peak = dk["largest_shortfall_alpha"]
        where = (
            f"The mean relative shortfall is largest at α={peak:g} "
            f"({dk['mean_relative_shortfall'][peak]:+.1%}), "
            + (
                "the smallest α tested."
                if dk["largest_at_smallest_alpha"]
                else f"not at the smallest α tested ({tested[0]:g})."
            )
        )
        out.append(
            "### Hypothesis: dark knowledge\n\n"
            f"Prediction: if the teacher's class-similarity structure (dark knowledge) explained "
            f"{ref}'s gain, {names} would fall short of {ref}, most at small α.\n\n"
            f"**Verdict: {dk['verdict']}** — the controls all fall short "
            f"{_at(dk['supported_at'])} of the {len(tested)} α tested. {where}\n"
        )
    if other:
        out.append("### Other controls\n\n" + _verdict_table(an, other))
    return "\n".join(out)


def _fidelity(an: Analysis) -> str:
    cols = [
        c
        for c in ("agreement", "test_kl", "ece", "neg_kl_frac")
        if any(r[c] is not None for r in an.summary)
    ]
    if not cols:
        return ""
    names = {
        "agreement": "agreement",
        "test_kl": "KL(T‖S)",
        "ece": "ECE",
        "neg_kl_frac": "negative-KL fraction",
    }
    order = {v: i for i, v in enumerate(_variant_order(an))}
    rows = [
        [r["variant"], f"{r['alpha']:g}", str(r["n"]), *(_f(r[c]) for c in cols)]
        for r in sorted(an.summary, key=lambda r: (order[r["variant"]], r["alpha"]))
    ]
    return (
        "## Fidelity and calibration\n\nMeans over seeds: top-1 agreement with the teacher and "
        "KL(teacher‖student) on the test split, expected calibration error; the negative-KL "
        "fraction counts training samples whose truncated top-k KL went below 0.\n\n"
        + _table(["variant", "α", "n", *(names[c] for c in cols)], rows)
    )


def _ablation(figures: Mapping[str, str]) -> str:
    if "tau" not in figures and "cache" not in figures:
        return ""
    out = ["## Ablations\n"]
    if "tau" in figures:
        out.append(
            "Temperature sweep (smallest and largest α swept; `logit_mse` drawn at τ=∞):\n\n"
            f"![temperature sweep]({figures['tau']})\n"
        )
    if "cache" in figures:
        out.append(
            "Cache-kind ablation (top-k / sampled against the full cache, dashed):\n\n"
            f"![cache ablation]({figures['cache']})\n"
        )
    return "\n".join(out)


def _caches(caches: Sequence[Row]) -> str:
    if not caches:
        return ""
    rows = [
        [c["name"], c["kind"], str(c["k"] if c["k"] is not None else "—"), c["dtype"], c["teacher"]]
        + [f"{c['bytes_on_disk']:,}", f"{c['bytes_per_row']:.4g}", f"{c['compression_ratio']:.3g}x"]
        + [_f(c.get("teacher_test_acc")), f"{c['num_rows']:,}"]
        for c in caches
    ]
    head = [
        "store",
        "kind",
        "k",
        "dtype",
        "teacher",
        "bytes",
        "bytes/row",
        "compression",
        "teacher acc",
        "rows",
    ]
    return "## Logit caches\n\n" + _table(head, rows)


def _markdown(an: Analysis, caches: Sequence[Row], figures: Mapping[str, str]) -> str:
    parts = [
        _header(an),
        _results(an, figures),
        _gains(an, figures),
        _multipliers(an, figures),
        _hypotheses(an),
        _fidelity(an),
        _ablation(figures),
        _caches(caches),
    ]
    return "\n".join(p for p in parts if p)
