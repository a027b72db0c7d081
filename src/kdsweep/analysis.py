"""Students' results → the numbers the report and the metrics file show (DESIGN.md §5, §6).

Pure numpy + pyarrow (no torch), so `aggregate` and `report` start fast and can run anywhere.
Statistics come from kdsweep.stats; the settings are params.yaml's `analysis:` section
(kdsweep.config.AnalysisParams); which controls test a hypothesis comes from the LOSSES registry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from kdsweep.config import AnalysisParams
from kdsweep.errors import KdsweepError
from kdsweep.registry import LOSSES
from kdsweep.stats import (
    bootstrap_ci,
    data_efficiency_multiplier,
    group_rng,
    median_multiplier,
    relative_gain,
    two_sample,
)

HYPOTHESIS_ROLES = ("confidence", "dark_knowledge")
"""Controls whose losses play these roles (LOSSES[...].hypothesis) separate the two explanations
of KD (DESIGN.md §5): label smoothing predicts they match the reference, dark knowledge predicts
they fall short (most at small α)."""

FIDELITY = ("agreement", "test_kl", "ece", "neg_kl_frac")
RECIPE = (
    "method",
    "loss",
    "lam",
    "tau",
    "teacher_id",
    "cache_name",
    "cache_kind",
    "k",
    "topk_mode",
)


# ---------------------------------------------------------------------------------------------
# Variants and scores


def variant_label(method: str, tau: float | None, swept: bool) -> str:
    """A method's name, with its τ when the method sweeps several temperatures."""
    return f"{method}(τ={tau:g})" if swept and tau is not None else method


def variant_labels(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The variant of each row: a method is swept if its rows (at any α) carry several τ."""
    taus: dict[str, set[float]] = {}
    for r in rows:
        if r["tau"] is not None:
            taus.setdefault(r["method"], set()).add(r["tau"])
    swept = {m for m, t in taus.items() if len(t) > 1}
    return [variant_label(r["method"], r["tau"], r["method"] in swept) for r in rows]


def primary_score(task: str) -> tuple[str, bool]:
    """(column, higher_is_better): accuracy for vision, perplexity for language models."""
    scores = {"vision": ("test_acc", True), "lm": ("test_ppl", False)}
    if task not in scores:
        raise KdsweepError(f"unknown task {task!r}: expected one of {sorted(scores)}")
    return scores[task]


@dataclass(frozen=True)
class Runs:
    """The table as rows with `variant` and `score` added, plus what the score means."""

    rows: list[dict[str, Any]]
    task: str
    score: str
    higher_is_better: bool

    @classmethod
    def from_table(cls, table: pa.Table) -> Runs:
        rows = table.to_pylist()
        tasks = sorted({r["task"] for r in rows})
        if len(tasks) != 1:
            raise KdsweepError(f"the runs mix tasks {tasks}: analyse one task at a time")
        score, hib = primary_score(tasks[0])
        for r, v in zip(rows, variant_labels(rows), strict=True):
            if r[score] is None:
                raise KdsweepError(
                    f"run {r['run_id']} ({r['method']}, α={r['alpha']}) has no {score}"
                )
            r["variant"], r["score"] = v, r[score]
        return cls(rows, tasks[0], score, hib)

    def variants(self) -> list[str]:
        """Sorted by method, then τ."""
        key = {
            r["variant"]: (r["method"], -math.inf if r["tau"] is None else r["tau"])
            for r in self.rows
        }
        return sorted(key, key=key.__getitem__)

    def variants_of(self, method: str) -> list[str]:
        methods = {r["variant"]: r["method"] for r in self.rows}
        return [v for v in self.variants() if methods[v] == method]

    def by_alpha(self, variant: str) -> dict[float, list[dict[str, Any]]]:
        out: dict[float, list[dict[str, Any]]] = {}
        for r in self.rows:
            if r["variant"] == variant:
                out.setdefault(r["alpha"], []).append(r)
        return dict(sorted(out.items()))

    def resolve(self, name: str) -> str | None:
        """The variant `name` denotes: itself, a method's only variant, or — for a method with
        several τ — its variant with the best score averaged over the α all of them share
        (the tuned temperature; the report says which one was used). None if absent."""
        variants = self.variants()
        if name in variants:
            return name
        cands = self.variants_of(name)
        if len(cands) <= 1:
            return cands[0] if cands else None
        groups = {v: self.by_alpha(v) for v in cands}
        shared = set.intersection(*(set(g) for g in groups.values()))
        sign = 1.0 if self.higher_is_better else -1.0

        def avg(v: str) -> float:
            return float(np.mean([np.mean([r["score"] for r in groups[v][a]]) for a in shared]))

        return max(cands, key=lambda v: sign * avg(v)) if shared else cands[0]


def _pair(
    ref: Sequence[Mapping[str, Any]], other: Sequence[Mapping[str, Any]]
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Scores of two groups, aligned by (subset_seed, train_seed) when both have the same unique
    seeds (then the subset, the main source of variance, cancels), else left independent."""

    def keyed(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[int, int], float]:
        return {(r["subset_seed"], r["train_seed"]): r["score"] for r in rows}

    kr, ko = keyed(ref), keyed(other)
    if len(kr) == len(ref) and len(ko) == len(other) and kr.keys() == ko.keys():
        keys = sorted(kr)
        return np.array([kr[k] for k in keys]), np.array([ko[k] for k in keys]), True
    return (np.array([r["score"] for r in ref]), np.array([r["score"] for r in other]), False)


# ---------------------------------------------------------------------------------------------
# Summaries


def _mean_or_none(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if r[key] is not None]
    return float(np.mean(vals)) if vals else None


def _summarize(runs: Runs, n_boot: int, ci: float, seed: int) -> list[dict[str, Any]]:
    """One row per (variant, α): n, mean, std and bootstrap CI of the primary score (accuracy
    for vision, perplexity for lm), plus mean agreement, test KL, ECE and negative-KL fraction."""
    out = []
    for v in runs.variants():
        for alpha, rows in runs.by_alpha(v).items():
            s = np.array([r["score"] for r in rows])
            lo, hi = bootstrap_ci(s, n_boot, ci, group_rng(seed, v, alpha))
            first = rows[0]
            out.append(
                {
                    "variant": v,
                    **{k: first[k] for k in RECIPE},
                    "alpha": alpha,
                    "score_name": runs.score,
                    "n": len(rows),
                    "mean": float(s.mean()),
                    "std": float(s.std(ddof=1)) if len(s) > 1 else 0.0,
                    "ci_low": lo,
                    "ci_high": hi,
                    **{k: _mean_or_none(rows, k) for k in FIDELITY},
                }
            )
    return out


def _gain_rows(runs: Runs, s: AnalysisParams) -> list[dict[str, Any]]:
    base, ref = runs.resolve(s.baseline), runs.resolve(s.reference)
    if base is None or ref is None:
        return []
    b_by, r_by = runs.by_alpha(base), runs.by_alpha(ref)
    out = []
    for alpha in sorted(set(b_by) & set(r_by)):
        r, b, paired = _pair(r_by[alpha], b_by[alpha])
        rng = group_rng(s.seed, "gain", ref, base, alpha)
        gain, lo, hi = relative_gain(
            r, b, runs.higher_is_better, paired=paired, n_boot=s.n_boot, ci=s.ci, rng=rng
        )
        out.append(
            {"alpha": alpha, "gain": gain, "ci_low": lo, "ci_high": hi, "n_ref": len(r)}
            | {"n_base": len(b), "paired": paired, "reference": ref, "baseline": base}
        )
    return out


def _multiplier_rows(runs: Runs, s: AnalysisParams) -> list[dict[str, Any]]:
    base, ref = runs.resolve(s.baseline), runs.resolve(s.reference)
    if base is None or ref is None:
        return []
    b_alphas, b_scores = zip(
        *(
            (a, float(np.mean([r["score"] for r in rows])))
            for a, rows in runs.by_alpha(base).items()
        ),
        strict=True,
    )
    sign = 1.0 if runs.higher_is_better else -1.0
    out = []
    for alpha, rows in runs.by_alpha(ref).items():
        score = float(np.mean([r["score"] for r in rows]))
        mult, censored = data_efficiency_multiplier(
            b_alphas, b_scores, score, alpha, runs.higher_is_better
        )
        clamped = sign * score < sign * b_scores[0]  # by_alpha sorts α, so [0] is the smallest
        out.append(
            {"alpha": alpha, "ref_score": score, "alpha_star": mult * alpha}
            | {"multiplier": mult, "censored": censored, "clamped": clamped}
        )
    return out


# ---------------------------------------------------------------------------------------------
# Hypothesis controls


def verdict(ci_low: float, ci_high: float, n_min: int) -> str:
    """The reference's advantage over a control (positive = reference better) → a verdict."""
    if n_min < 2:
        return "undetermined (n<2)"
    if ci_low > 0:
        return "falls short"
    if ci_high < 0:
        return "exceeds"
    return "matches"


def _verdict_rows(runs: Runs, s: AnalysisParams) -> list[dict[str, Any]]:
    """Per control variant and α: the reference's advantage over it in score units (positive =
    reference better, whichever way the score points), its bootstrap CI, and the verdict:
    "falls short" (CI > 0), "matches" (CI ∋ 0), "exceeds" (CI < 0), "undetermined (n<2)"."""
    ref = runs.resolve(s.reference)
    if ref is None:
        return []
    r_by = runs.by_alpha(ref)
    sign = 1.0 if runs.higher_is_better else -1.0
    out = []
    for method in s.controls:
        for v in (v for v in runs.variants_of(method) if v != ref):
            for alpha, rows in runs.by_alpha(v).items():
                if alpha not in r_by:
                    continue
                r, c, paired = _pair(r_by[alpha], rows)
                adv, lo, hi = two_sample(
                    r,
                    c,
                    lambda x, y: sign * (x - y),
                    paired,
                    s.n_boot,
                    s.ci,
                    group_rng(s.seed, "verdict", ref, v, alpha),
                )
                out.append(
                    {"control": v, "method": method, "reference": ref, "alpha": alpha}
                    | {"ref_mean": float(r.mean()), "control_mean": float(c.mean())}
                    | {"advantage": adv, "ci_low": lo, "ci_high": hi, "paired": paired}
                    | {"relative_advantage": adv / abs(float(c.mean()))}
                    | {"n_ref": len(r), "n_control": len(c)}
                    | {"verdict": verdict(lo, hi, min(len(r), len(c)))}
                    | {"hypothesis_control": LOSSES[rows[0]["loss"]].hypothesis in HYPOTHESIS_ROLES}
                )
    return out


def _alpha_set(
    rows: Sequence[Mapping[str, Any]], pred: Callable[[Mapping[str, Any]], bool]
) -> list[float]:
    """The α at which every row satisfies `pred`."""
    alphas = sorted({r["alpha"] for r in rows})
    return [a for a in alphas if all(pred(r) for r in rows if r["alpha"] == a)]


def _overall(supported: Sequence[float], tested: Sequence[float]) -> str:
    if not tested:
        return "untested"
    if len(supported) == len(tested):
        return "supported"
    return "partly supported" if supported else "not supported"


def hypothesis_assessment(verdicts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What the hypothesis controls' verdicts say about each explanation, per α and overall.

    Only α where every present LS control was compared count. Label smoothing is supported at α
    if all of them match the reference; dark knowledge if all fall short. The dark-knowledge
    prediction "most at small α" is checked by where the mean relative shortfall peaks."""
    rows = [r for r in verdicts if r["hypothesis_control"]]
    controls = sorted({r["control"] for r in rows})
    tested = [
        a
        for a in sorted({r["alpha"] for r in rows})
        if {r["control"] for r in rows if r["alpha"] == a} == set(controls)
    ]
    rows = [r for r in rows if r["alpha"] in tested]
    ls = _alpha_set(rows, lambda r: r["verdict"] == "matches")
    dk = _alpha_set(rows, lambda r: r["verdict"] == "falls short")
    shortfall = {
        a: float(np.mean([r["relative_advantage"] for r in rows if r["alpha"] == a]))
        for a in tested
    }
    peak = max(shortfall, key=shortfall.__getitem__) if shortfall else None
    return {
        "controls": controls,
        "tested_alphas": tested,
        "label_smoothing": {"supported_at": ls, "verdict": _overall(ls, tested)},
        "dark_knowledge": {
            "supported_at": dk,
            "verdict": _overall(dk, tested),
            "mean_relative_shortfall": shortfall,
            "largest_shortfall_alpha": peak,
            "largest_at_smallest_alpha": peak is not None and peak == tested[0],
        },
    }


# ---------------------------------------------------------------------------------------------
# Everything at once


@dataclass(frozen=True)
class Analysis:
    """All numbers of one runs table, computed once for the metrics file and the report."""

    runs: Runs
    settings: AnalysisParams
    summary: list[dict[str, Any]]
    gains: list[dict[str, Any]]
    multipliers: list[dict[str, Any]]
    verdicts: list[dict[str, Any]]

    @property
    def baseline(self) -> str | None:
        return self.runs.resolve(self.settings.baseline)

    @property
    def reference(self) -> str | None:
        return self.runs.resolve(self.settings.reference)


def analyse(table: pa.Table, s: AnalysisParams) -> Analysis:
    runs = Runs.from_table(table)
    return Analysis(
        runs,
        s,
        _summarize(runs, s.n_boot, s.ci, s.seed),
        _gain_rows(runs, s),
        _multiplier_rows(runs, s),
        _verdict_rows(runs, s),
    )


def alpha_key(alpha: float) -> str:
    return f"{alpha:g}"


def _r(x: float | None) -> float | None:
    """Rounded to 5 digits; non-finite values become null (JSON has no NaN)."""
    return round(x, 5) if x is not None and math.isfinite(x) else None


def summary_metrics(table: pa.Table, settings: AnalysisParams) -> dict[str, Any]:
    """The DVC metrics: mean score per variant and α, relative gain, multiplier (with its median
    and whether censoring makes that median a lower bound) and the reference's advantage over
    each control; nested by name then α ("0.02"). Rounded to 5 digits, no NaN."""
    an = analyse(table, settings)
    score = "acc" if an.runs.higher_is_better else "ppl"
    out: dict[str, Any] = {"n_runs": len(an.runs.rows), score: {}}
    for row in an.summary:
        out[score].setdefault(row["variant"], {})[alpha_key(row["alpha"])] = _r(row["mean"])
    if an.gains:
        out["relative_gain"] = {alpha_key(g["alpha"]): _r(g["gain"]) for g in an.gains}
    if an.multipliers:
        m = an.multipliers
        med, lower = median_multiplier([x["multiplier"] for x in m], [x["censored"] for x in m])
        out["multiplier"] = {alpha_key(x["alpha"]): _r(x["multiplier"]) for x in m}
        out["multiplier"] |= {"median": _r(med), "median_is_lower_bound": lower}
    if an.verdicts:
        adv: dict[str, dict[str, float | None]] = {}
        for v in an.verdicts:
            adv.setdefault(v["control"], {})[alpha_key(v["alpha"])] = _r(v["advantage"])
        out["advantage_over_control"] = adv
    return out
