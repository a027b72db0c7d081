"""The report's figures (DESIGN.md §6), built on matplotlib Figures without pyplot: no global
state and no GUI backend, so a stage can draw them anywhere; the PNGs render through Agg."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, PercentFormatter

from kdsweep.analysis import Analysis
from kdsweep.cache.summary import CacheSummary
from kdsweep.io import atomic_savefig
from kdsweep.report.common import Row, cells, score_label, variant_order
from kdsweep.stats import median_multiplier

ABLATION_KINDS = ("topk", "sampled")


def draw_figures(an: Analysis, caches: Sequence[CacheSummary], fig_dir: Path) -> dict[str, Path]:
    """The PNGs under `fig_dir` that the runs support, by name: "score" always (small multiples);
    "gain" and "multiplier" with a baseline and a reference; "shares" where a control's share
    of the reference's gain is defined; "tau" with a temperature sweep; "cache" with a
    cache-kind ablation (plus bytes per row when the cache summaries are given)."""
    fig_dir.mkdir(parents=True, exist_ok=True)
    figures = {"score": _plot_scores(an, fig_dir / "score_vs_alpha.png")}
    if an.gains:
        figures["gain"] = _plot_gain(an, fig_dir / "relative_gain.png")
    if an.multipliers:
        figures["multiplier"] = _plot_multiplier(an, fig_dir / "multiplier.png")
    if any(v["share"] is not None for v in an.verdicts):
        figures["shares"] = _plot_shares(an, fig_dir / "control_shares.png")
    if _temperature_families(an.summary):
        figures["tau"] = _plot_temperature(an, fig_dir / "temperature_sweep.png")
    if any(r["cache_kind"] in ABLATION_KINDS for r in an.summary):
        figures["cache"] = _plot_cache(an, caches, fig_dir / "cache_ablation.png")
    if curves := validation_curves(an):
        figures["curves"] = _plot_curves(an, curves, fig_dir / "validation_curves.png")
    return figures


def validation_curves(an: Analysis) -> dict[float, dict[str, tuple[list[int], np.ndarray]]]:
    """Per α, the mean validation curve over seeds of the main-methods panel's variants (the
    baseline and the reference first): (steps, mean validation cross-entropy). Seeds whose
    curves were evaluated at other steps than the variant's first seed are left out."""
    variants = score_panels(an).get("main methods", [])
    out: dict[float, dict[str, tuple[list[int], np.ndarray]]] = {}
    for v in variants:
        for alpha, rows in sorted(an.runs.by_alpha(v).items()):
            steps = rows[0]["val_curve_steps"] or []
            same = [r["val_curve"] for r in rows if r["val_curve_steps"] == steps]
            if steps and same:
                out.setdefault(alpha, {})[v] = (steps, np.mean(same, axis=0))
    return out


def _temperature_families(summary: Sequence[Row]) -> dict[tuple[Any, ...], dict[float, list[Row]]]:
    """Students that differ only in τ — same loss, cache, λ and top-k mode, across methods, so
    kd(τ=4) and kd_tau(τ=1, 16) form one sweep — at each α where ≥ 2 distinct τ exist."""
    fams: dict[tuple[Any, ...], dict[float, list[Row]]] = {}
    for r in summary:
        if r["tau"] is not None and not r["selected"]:  # a per-α selection repeats its rows
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


def save(fig: Figure, path: Path) -> Path:
    """`fig` as a PNG at `path`, laid out tight, written atomically."""
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    return path


def log_alpha_axis(ax: Axes) -> None:
    """α on a log axis (the grid spans two decades), gridded."""
    ax.set_xscale("log")
    ax.set_xlabel("α (fraction of the training set)")
    ax.grid(True, which="both", alpha=0.3)


PANELS = ("main methods", "controls", "cache ablations", "temperature")


def score_panels(an: Analysis) -> dict[str, list[str]]:
    """The variants of each small multiple, in variant order; panels with nothing of their own
    are left out. Controls: the methods of analysis.controls; cache ablations: top-k / sampled
    students; temperature: the other variants of methods that sweep τ; main: the rest. The
    baseline and the reference appear in every panel, for scale."""
    summary = {r["variant"]: r for r in an.summary}
    swept = {r["method"] for r in an.summary if r["variant"] != r["method"]}

    def panel(v: str) -> str:
        r = summary[v]
        if r["method"] in an.settings.controls:
            return "controls"
        if r["cache_kind"] in ABLATION_KINDS:
            return "cache ablations"
        return "temperature" if r["method"] in swept else "main methods"

    anchors = [v for v in (an.baseline, an.reference) if v is not None]
    out: dict[str, list[str]] = {}
    for v in variant_order(an):
        if v not in anchors:
            out.setdefault(panel(v), []).append(v)
    return {p: anchors + out[p] for p in PANELS if p in out} or {"main methods": anchors}


def panel_grid(n: int, cols: int, size: tuple[float, float]) -> tuple[Figure, list[Axes]]:
    """`n` small multiples sharing both axes, `cols` to a row (each `size` inches), so panels
    compare at a glance; the unused cells of the last row hidden."""
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(size[0] * cols, size[1] * rows))
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def score_band(ax: Axes, rows: Sequence[Row], color: Any, label: str, lw: float = 1.4) -> None:
    """Summary rows of one variant: its mean score over α, its interval shaded."""
    a = [r["alpha"] for r in rows]
    ax.plot(a, [r["mean"] for r in rows], "o-", color=color, lw=lw, ms=4, label=label)
    ax.fill_between(
        a, [r["ci_low"] for r in rows], [r["ci_high"] for r in rows], color=color, alpha=0.15
    )


def gain_band(ax: Axes, gains: Sequence[Row], color: Any, label: str) -> None:
    """Gain rows (analysis' `gains`): the relative gain over α, its interval shaded, the zero
    line (no gain) and a percent axis."""
    a = [g["alpha"] for g in gains]
    ax.plot(a, [g["gain"] for g in gains], "o-", color=color, label=label)
    ax.fill_between(
        a, [g["ci_low"] for g in gains], [g["ci_high"] for g in gains], color=color, alpha=0.2
    )
    ax.axhline(0, color="k", lw=0.8)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))


def _plot_scores(an: Analysis, path: Path) -> Path:
    """Score vs α with its interval: one small multiple per group of variants (score_panels),
    sharing both axes, so no panel carries more than a handful of lines."""
    panels = score_panels(an)
    fig, axes = panel_grid(len(panels), 2, (6, 4))
    colors = matplotlib.colormaps["tab10"].colors
    anchors = {an.baseline: "grey", an.reference: "k"}
    for ax, (name, variants) in zip(axes, panels.items(), strict=True):
        for i, v in enumerate(variants):
            rows = [r for r in an.summary if r["variant"] == v]
            c = anchors.get(v) or colors[i % len(colors)]
            score_band(ax, rows, c, v, lw=2.2 if v in anchors else 1.4)
        log_alpha_axis(ax)
        ax.set_title(name)
        ax.set_ylabel(score_label(an))
        ax.legend(fontsize=7)
    fig.suptitle(f"{score_label(an)} vs α ({an.settings.ci:.0%} t-intervals over seeds)")
    return save(fig, path)


def _plot_curves(
    an: Analysis, curves: dict[float, dict[str, tuple[list[int], np.ndarray]]], path: Path
) -> Path:
    """`validation_curves`: cross-entropy vs step, one panel per α — whether the budget is long
    enough (still falling at the end: more steps would help) or too long (rising: overfitting,
    which `budget.select: best_val` undoes)."""
    fig = Figure(figsize=(3.6 * len(curves), 3.4))
    axes = fig.subplots(1, len(curves), squeeze=False).ravel()
    anchors = {an.baseline: "grey", an.reference: "k"}
    for ax, (alpha, by_variant) in zip(axes, curves.items(), strict=True):
        for i, (v, (steps, loss)) in enumerate(by_variant.items()):
            ax.plot(steps, loss, color=anchors.get(v) or f"C{i}", lw=1.6, label=v)
        ax.set_title(f"α = {alpha:g}")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("validation cross-entropy")
    axes[0].legend(fontsize=7)
    fig.suptitle("validation curves (mean over seeds)")
    return save(fig, path)


def _plot_shares(an: Analysis, path: Path) -> Path:
    """Each hypothesis control's share of the reference's gain, (control − base)/(ref − base),
    with its Fieller interval, at the α where that gain is significant: 1 recovers all of it."""
    rows = [
        v for v in an.verdicts if v["share"] is not None and v["role"] in ("control", "context")
    ]
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    controls = list(dict.fromkeys(v["control"] for v in rows))
    for i, c in enumerate(controls):
        pts = sorted((v for v in rows if v["control"] == c), key=lambda v: v["alpha"])
        x = [v["alpha"] * 1.04**i for v in pts]  # side by side, not on top of each other
        y = np.array([v["share"] for v in pts])
        err = np.abs(np.array([[v["share_low"] for v in pts], [v["share_high"] for v in pts]]) - y)
        ax.errorbar(x, y, yerr=err, fmt="o-", color=f"C{i}", capsize=3, label=c)
    ax.axhline(1, color="k", lw=0.8, ls="--", label=f"all of {an.reference}'s gain")
    ax.axhline(0, color="grey", lw=0.8, ls=":", label=f"no better than {an.baseline}")
    log_alpha_axis(ax)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylabel(f"share of {an.reference}'s gain over {an.baseline}")
    ax.set_title(f"what the controls recover ({an.settings.ci:.0%} Fieller intervals)")
    ax.legend(fontsize=7)
    return save(fig, path)


def _plot_gain(an: Analysis, path: Path) -> Path:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    gain_band(ax, an.gains, "C0", f"{an.reference} over {an.baseline}")
    log_alpha_axis(ax)
    ax.set_ylabel("relative gain")
    ax.legend()
    return save(fig, path)


def _plot_multiplier(an: Analysis, path: Path) -> Path:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    m = an.multipliers
    ax.plot([x["alpha"] for x in m], [x["multiplier"] for x in m], "-", color="C0", alpha=0.6)
    finite = [x for x in m if math.isfinite(x["ci_low"])]
    lo, hi = [x["ci_low"] for x in finite], [x["ci_high"] for x in finite]
    ax.vlines(
        [x["alpha"] for x in finite],
        lo,
        hi,
        color="C0",
        alpha=0.5,
        label="linear interpolation, jackknife CI",
    )
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
    cubic = [x for x in m if not x["censored"] and not x["clamped"]]
    if cubic:  # the interpolation model's sensitivity: the monotone cubic through the same fit
        xs = [x["alpha"] * 1.06 for x in cubic]
        ax.scatter(xs, [x["multiplier_pchip"] for x in cubic], marker="D", s=30, color="C4")
        finite_c = [x for x in cubic if math.isfinite(x["ci_low_pchip"])]
        ax.vlines(
            [x["alpha"] * 1.06 for x in finite_c],
            [x["ci_low_pchip"] for x in finite_c],
            [x["ci_high_pchip"] for x in finite_c],
            color="C4",
            alpha=0.5,
            label="monotone cubic (PCHIP) interpolation",
        )
    med, lower = median_multiplier([x["multiplier"] for x in m], [x["censored"] for x in m])
    ax.axhline(
        med, color="C2", ls=":", label=f"median {med:.3g}{' (lower bound)' if lower else ''}"
    )
    ax.axhline(1, color="k", lw=0.8)
    log_alpha_axis(ax)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_ylabel(f"data-efficiency multiplier α*/α ({an.reference} vs {an.baseline})")
    ax.legend(fontsize=8)
    return save(fig, path)


def _plot_temperature(an: Analysis, path: Path) -> Path:
    """Score vs τ at the smallest and largest α swept (one line per family of students that
    differ only in τ), then — where the reference method sweeps τ — every τ's curve over α with
    the τ selected at each α ringed (per α on validation, or the one global τ)."""
    fams = _temperature_families(an.summary)
    swept = sorted({a for by_alpha in fams.values() for a in by_alpha})
    panels = sorted({swept[0], swept[-1]})
    selection = [t for t in an.taus if t["method"] == an.settings.reference]
    fig = Figure(figsize=(6 * (len(panels) + bool(selection)), 4))
    axes = fig.subplots(1, len(panels) + bool(selection), squeeze=False)
    for ax, alpha in zip(axes[0], panels, strict=False):
        _tau_panel(an, ax, fams, alpha)
    if selection:
        _selection_panel(an, axes[0][-1], selection)
    return save(fig, path)


def _tau_panel(
    an: Analysis, ax: Axes, fams: dict[tuple[Any, ...], dict[float, list[Row]]], alpha: float
) -> None:
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
    base = cells(an).get((an.baseline, alpha)) if an.baseline else None
    if base:
        ax.axhline(base["mean"], color="grey", ls="--", label=f"{an.baseline}")
    ax.set_xscale("log")
    ticks = [*taus, x_inf]
    ax.set_xticks(ticks, [f"{t:g}" for t in taus] + ["∞"])
    ax.minorticks_off()
    ax.set_xlabel("temperature τ")
    ax.set_ylabel(score_label(an))
    ax.set_title(f"α = {alpha:g}")
    ax.legend(fontsize=7)


def _selection_panel(an: Analysis, ax: Axes, selection: Sequence[Row]) -> None:
    """Each τ variant of the reference method over α (test score with its interval), the one
    selected at each α ringed, the baseline dashed."""
    by_cell = cells(an)
    variants = [c["variant"] for c in selection[0]["candidates"]]
    variants += [
        c["variant"] for t in selection for c in t["candidates"] if c["variant"] not in variants
    ]
    for i, v in enumerate(variants):
        rows = [by_cell[(v, t["alpha"])] for t in selection if (v, t["alpha"]) in by_cell]
        _errorbar(ax, [r["alpha"] for r in rows], rows, f"C{i}", "o-", v)
    chosen = [by_cell[(t["chosen"], t["alpha"])] for t in selection if t["chosen"]]
    ax.scatter(
        [r["alpha"] for r in chosen],
        [r["mean"] for r in chosen],
        s=220,
        facecolors="none",
        edgecolors="k",
        lw=1.5,
        zorder=4,
        label="selected on validation, "
        + ("per α" if an.settings.select == "per_alpha" else "one τ for every α"),
    )
    if an.baseline:
        base = [r for r in an.summary if r["variant"] == an.baseline]
        ax.plot(
            [r["alpha"] for r in base],
            [r["mean"] for r in base],
            "--",
            color="grey",
            label=an.baseline,
        )
    log_alpha_axis(ax)
    ax.set_ylabel(score_label(an))
    ax.set_title(f"{an.settings.reference}: every τ over α")
    ax.legend(fontsize=7)


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


def _plot_cache(an: Analysis, caches: Sequence[CacheSummary], path: Path) -> Path:
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
        ax.set_ylabel(score_label(an))
        ax.set_title(f"score vs k, α = {alpha:g}")
        ax.legend(fontsize=7)
    if caches:
        ax = axes[-1]
        for kind in ABLATION_KINDS:
            pts = sorted((c.k, c.bytes_per_row) for c in caches if c.kind == kind)
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", color=color[kind], label=kind)
        for j, c in enumerate(c for c in caches if c.kind == "full"):
            ls = ("--", ":", "-.")[j % 3]
            ax.axhline(c.bytes_per_row, color="k", ls=ls, label=f"full: {c.name}")
        _k_axis(ax, [c.k for c in caches if c.kind in ABLATION_KINDS])
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.set_ylabel("bytes per row on disk (compressed)")
        ax.set_title("cache size vs k")
        ax.legend(fontsize=7)
    return save(fig, path)
