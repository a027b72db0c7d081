"""Students' results → the numbers the report and the metrics file show (DESIGN.md §5, §6).

Pure numpy/scipy + pyarrow (no torch), so `aggregate` and `report` start fast and can run
anywhere. Statistics come from kdsweep.stats; the settings are params.yaml's `analysis:` section
(kdsweep.config.AnalysisParams); which hypothesis a control tests comes from the LOSSES registry.

Two rules keep the numbers honest:
- every selection (a swept method's τ) reads the validation score only, never a test column;
- a control is read only where the reference's gain over the baseline is significant (a share
  of no gain means nothing), and "matches" only from an equivalence test.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from kdsweep.config import AnalysisParams
from kdsweep.errors import KdsweepError
from kdsweep.registry import LOSSES
from kdsweep.stats import (
    data_efficiency_multiplier,
    difference,
    equivalence_p,
    group_rng,
    mean_interval,
    median_multiplier,
    monotone_curve,
    multiplier_interval,
    relative_gain,
    share,
)

HYPOTHESES = ("label_smoothing", "confidence", "dark_knowledge")
"""What KD transfers, after Tang et al. 2020, in the order the report argues it: universal
smoothing, instance-specific confidence, class relationships. A control's loss names the one it
tests (LOSSES[...].hypothesis)."""

PREDICTS_MATCH = {"label_smoothing": True, "confidence": True, "dark_knowledge": False}
"""If the hypothesis explained KD's gain, would its controls recover all of it (match KD), or
fall short of it? (shuffled_dk keeps everything but the class structure: if the structure is
what helps, it falls short.)"""

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


SCORES = {"vision": ("test_acc", "val_acc", True), "lm": ("test_ppl", "val_ppl", False)}
"""Per task: (reported test score, its validation counterpart for selection, higher is better)."""


def primary_score(task: str) -> tuple[str, str, bool]:
    """(test column, validation column, higher_is_better): accuracy for vision, perplexity for
    language models."""
    if task not in SCORES:
        raise KdsweepError(f"unknown task {task!r}: expected one of {sorted(SCORES)}")
    return SCORES[task]


@dataclass(frozen=True)
class Runs:
    """The table as rows with `variant`, `score` (test) and `val` (validation) added."""

    rows: list[dict[str, Any]]
    task: str
    score: str
    val: str
    higher_is_better: bool

    @classmethod
    def from_table(cls, table: pa.Table) -> Runs:
        rows = table.to_pylist()
        tasks = sorted({r["task"] for r in rows})
        if len(tasks) != 1:
            raise KdsweepError(f"the runs mix tasks {tasks}: analyse one task at a time")
        score, val, hib = primary_score(tasks[0])
        for r, v in zip(rows, variant_labels(rows), strict=True):
            if r[score] is None:
                raise KdsweepError(
                    f"run {r['run_id']} ({r['method']}, α={r['alpha']}) has no {score}"
                )
            r["variant"], r["score"], r["val"] = v, r[score], r[val]
        return cls(rows, tasks[0], score, val, hib)

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

    def tau_of(self, variant: str) -> float | None:
        return next(r["tau"] for r in self.rows if r["variant"] == variant)

    def by_alpha(self, variant: str) -> dict[float, list[dict[str, Any]]]:
        out: dict[float, list[dict[str, Any]]] = {}
        for r in self.rows:
            if r["variant"] == variant:
                out.setdefault(r["alpha"], []).append(r)
        return dict(sorted(out.items()))

    def resolve(self, name: str) -> str | None:
        """The variant `name` denotes: itself, a method's only variant, or — for a method with
        several τ — its variant with the best VALIDATION score averaged over the α all of them
        share (the tuned temperature; the report says which). Test scores are never read here.
        None if absent."""
        variants = self.variants()
        if name in variants:
            return name
        cands = self.variants_of(name)
        if len(cands) <= 1:
            return cands[0] if cands else None
        groups = {v: self.by_alpha(v) for v in cands}
        shared = set.intersection(*(set(g) for g in groups.values()))
        if not shared:
            return cands[0]
        missing = [
            r["run_id"] for v in cands for a in shared for r in groups[v][a] if r["val"] is None
        ]
        if missing:
            raise KdsweepError(
                f"{name} sweeps τ but run(s) {missing[:3]} have no {self.val}: a temperature is "
                "selected on the validation split only; re-run the student stages (`dvc repro`)"
            )
        sign = 1.0 if self.higher_is_better else -1.0

        def avg(v: str) -> float:
            return float(np.mean([np.mean([r["val"] for r in groups[v][a]]) for a in shared]))

        return max(cands, key=lambda v: sign * avg(v))

    def same_tau(self, method: str, variant: str) -> str | None:
        """`method`'s variant at `variant`'s τ, if the method swept that τ (a control is compared
        with KD at the temperature it was built at)."""
        tau = self.tau_of(variant)
        return next((v for v in self.variants_of(method) if self.tau_of(v) == tau), None)


def _paired(*groups: Sequence[Mapping[str, Any]]) -> tuple[list[np.ndarray], bool]:
    """Scores of several groups, aligned by (subset_seed, train_seed) when all have the same
    unique seeds (then the subset, the main source of variance, cancels), else left as they are."""
    keyed = [{(r["subset_seed"], r["train_seed"]): r["score"] for r in g} for g in groups]
    unique = all(len(k) == len(g) for k, g in zip(keyed, groups, strict=True))
    if unique and all(k.keys() == keyed[0].keys() for k in keyed):
        seeds = sorted(keyed[0])
        return [np.array([k[s] for s in seeds]) for k in keyed], True
    return [np.array([r["score"] for r in g]) for g in groups], False


# ---------------------------------------------------------------------------------------------
# Summaries


def _mean_or_none(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if r[key] is not None]
    return float(np.mean(vals)) if vals else None


def _summarize(runs: Runs, ci: float) -> list[dict[str, Any]]:
    """One row per (variant, α): n, mean, std and t-interval of the primary score (accuracy for
    vision, perplexity for lm), and mean agreement, test KL, ECE and negative-KL fraction."""
    out = []
    for v in runs.variants():
        for alpha, rows in runs.by_alpha(v).items():
            s = np.array([r["score"] for r in rows])
            mean, lo, hi = mean_interval(s, ci)
            first = rows[0]
            out.append(
                {
                    "variant": v,
                    **{k: first[k] for k in RECIPE},
                    "alpha": alpha,
                    "score_name": runs.score,
                    "n": len(rows),
                    "mean": mean,
                    "std": float(s.std(ddof=1)) if len(s) > 1 else 0.0,
                    "ci_low": lo,
                    "ci_high": hi,
                    **{k: _mean_or_none(rows, k) for k in FIDELITY},
                }
            )
    return out


def _gain_rows(runs: Runs, ref: str | None, base: str | None, ci: float) -> list[dict[str, Any]]:
    """Per α: the reference's relative gain over the baseline, its t-interval, and whether it is
    a significant gain (the interval lies above 0; a loss is not a gain for a control to explain)."""
    if base is None or ref is None:
        return []
    b_by, r_by = runs.by_alpha(base), runs.by_alpha(ref)
    out = []
    for alpha in sorted(set(b_by) & set(r_by)):
        (r, b), paired = _paired(r_by[alpha], b_by[alpha])
        gain, lo, hi = relative_gain(r, b, runs.higher_is_better, paired, ci)
        out.append(
            {"alpha": alpha, "gain": gain, "ci_low": lo, "ci_high": hi, "significant": lo > 0}
            | {"n_ref": len(r), "n_base": len(b), "paired": paired}
            | {"reference": ref, "baseline": base}
        )
    return out


def _multiplier_rows(runs: Runs, s: AnalysisParams) -> list[dict[str, Any]]:
    base, ref = runs.resolve(s.baseline), runs.resolve(s.reference)
    if base is None or ref is None:
        return []
    b_scores = {a: [r["score"] for r in rows] for a, rows in runs.by_alpha(base).items()}
    b_alphas = list(b_scores)
    b_means = [float(np.mean(b_scores[a])) for a in b_alphas]
    weights = [len(b_scores[a]) for a in b_alphas]
    _, fit = monotone_curve(b_alphas, b_means, weights, runs.higher_is_better)
    sign = 1.0 if runs.higher_is_better else -1.0
    out = []
    for alpha, rows in runs.by_alpha(ref).items():
        scores = [r["score"] for r in rows]
        score = float(np.mean(scores))
        mult, censored = data_efficiency_multiplier(
            b_alphas, b_means, score, alpha, runs.higher_is_better, weights
        )
        lo, hi = multiplier_interval(
            b_scores,
            scores,
            alpha,
            runs.higher_is_better,
            s.n_boot,
            s.ci,
            group_rng(s.seed, "multiplier", ref, base, alpha),
        )
        clamped = sign * score < sign * fit[0]  # below the baseline's fit at its smallest α
        out.append(
            {"alpha": alpha, "ref_score": score, "alpha_star": mult * alpha}
            | {"multiplier": mult, "censored": censored, "clamped": clamped}
            | {"ci_low": lo, "ci_high": hi, "ci_high_censored": hi >= b_alphas[-1] / alpha}
        )
    return out


# ---------------------------------------------------------------------------------------------
# Hypothesis controls


def verdict(ci_low: float, ci_high: float, p_equivalent: float, level: float, n_min: int) -> str:
    """The reference's advantage over a control (positive = reference better) → a verdict:
    "matches" only if the equivalence test (TOST) rejects a difference beyond the margin;
    "falls short" / "exceeds" if the t-interval excludes 0; else "inconclusive" (too noisy to
    tell, whatever the interval contains)."""
    if n_min < 2:
        return "undetermined (n<2)"
    if p_equivalent < 1 - level:
        return "matches"
    if ci_low > 0:
        return "falls short"
    if ci_high < 0:
        return "exceeds"
    return "inconclusive"


def _verdict_rows(runs: Runs, s: AnalysisParams) -> list[dict[str, Any]]:
    """Per control variant and α: the reference's advantage over it in score units (positive =
    reference better, whichever way the score points) with its t-interval, the equivalence test,
    the verdict, and the control's share of the reference's gain over the baseline,
    (control − base)/(ref − base) with Fieller's interval, where that gain is significant.

    The reference of a control built at τ is the reference method's variant at that τ when the
    reference swept it, else the (validation-selected) reference."""
    ref_default, base = runs.resolve(s.reference), runs.resolve(s.baseline)
    if ref_default is None:
        return []
    sign = 1.0 if runs.higher_is_better else -1.0
    b_by = runs.by_alpha(base) if base else {}
    out = []
    for method in s.controls:
        for v in (v for v in runs.variants_of(method) if v != ref_default):
            ref = runs.same_tau(s.reference, v) or ref_default
            r_by = runs.by_alpha(ref)
            for alpha, rows in runs.by_alpha(v).items():
                if alpha not in r_by:
                    continue
                (r, c), paired = _paired(r_by[alpha], rows)
                adv, lo, hi = difference(sign * r, sign * c, paired, s.ci)
                p_eq = equivalence_p(r, c, s.equivalence_margin, paired)
                n_min = min(len(r), len(c))
                row = (
                    {"control": v, "method": method, "reference": ref, "alpha": alpha}
                    | {"hypothesis": LOSSES[rows[0]["loss"]].hypothesis}
                    | {"same_tau": runs.tau_of(v) in (None, runs.tau_of(ref))}
                    | {"ref_mean": float(r.mean()), "control_mean": float(c.mean())}
                    | {"advantage": adv, "ci_low": lo, "ci_high": hi, "paired": paired}
                    | {"p_equivalent": p_eq, "n_ref": len(r), "n_control": len(c)}
                    | {"verdict": verdict(lo, hi, p_eq, s.ci, n_min)}
                    | _share(runs, b_by.get(alpha), r_by[alpha], rows, s.ci)
                )
                out.append(row)
    return out


def _share(
    runs: Runs,
    base: Sequence[Mapping[str, Any]] | None,
    ref: Sequence[Mapping[str, Any]],
    control: Sequence[Mapping[str, Any]],
    ci: float,
) -> dict[str, Any]:
    """The control's share of the reference's gain and whether that gain is significant; the
    share needs the three groups paired by seed, and is left out (None) where the gain is not
    significant."""
    none = {"gain_significant": False, "share": None, "share_low": None, "share_high": None}
    if not base:
        return none
    (b, r, c), paired = _paired(base, ref, control)
    sign = 1.0 if runs.higher_is_better else -1.0
    significant = difference(sign * r, sign * b, paired, ci)[1] > 0
    if not (significant and paired):
        return none | {"gain_significant": significant}
    point, lo, hi = share(c, r, b, ci)
    return {"gain_significant": True, "share": point, "share_low": lo, "share_high": hi}


def _outcome(verdicts: Sequence[str], predicts_match: bool) -> str:
    """One α of one hypothesis: its controls' verdicts against what it predicts."""
    recovers = {"matches", "exceeds"}
    if all(v in recovers for v in verdicts):
        return "supported" if predicts_match else "refuted"
    if all(v == "falls short" for v in verdicts):
        return "refuted" if predicts_match else "supported"
    return "inconclusive"


def _overall(outcomes: Mapping[float, str]) -> str:
    found = set(outcomes.values())
    if not found:
        return "untested"
    if len(found) == 1:
        return {"supported": "supported", "refuted": "refuted"}.get(found.pop(), "inconclusive")
    if "supported" in found:
        return "partly supported"
    return "refuted where decidable" if "refuted" in found else "inconclusive"


def hypothesis_assessment(verdicts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What the hypothesis controls say about each hypothesis (HYPOTHESES), per α and overall.

    Only α where the reference's gain over the baseline is significant count (elsewhere there
    is no gain to explain). Per α a hypothesis is supported if all its controls' verdicts agree
    with its prediction (PREDICTS_MATCH), refuted if all contradict it, else inconclusive. The
    controls' mean share of the gain per α is carried along, and the α where the most of the
    gain is missing (the smallest share) checks "most at small α"."""
    out: dict[str, Any] = {}
    for h in HYPOTHESES:
        rows = [r for r in verdicts if r["hypothesis"] == h and r["gain_significant"]]
        alphas = sorted({r["alpha"] for r in rows})
        outcomes = {
            a: _outcome([r["verdict"] for r in rows if r["alpha"] == a], PREDICTS_MATCH[h])
            for a in alphas
        }
        with_share = [r for r in rows if r["share"] is not None]
        mean_share = {
            a: float(np.mean([r["share"] for r in with_share if r["alpha"] == a]))
            for a in sorted({r["alpha"] for r in with_share})
        }
        peak = min(mean_share, key=mean_share.__getitem__) if mean_share else None
        out[h] = {
            "controls": sorted({r["control"] for r in rows}),
            "rows": rows,
            "tested_alphas": alphas,
            "outcomes": outcomes,
            "supported_at": [a for a, o in outcomes.items() if o == "supported"],
            "refuted_at": [a for a, o in outcomes.items() if o == "refuted"],
            "verdict": _overall(outcomes),
            "mean_share": mean_share,
            "largest_missing_alpha": peak,
            "largest_at_smallest_alpha": peak is not None and peak == min(mean_share),
        }
    return out


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
    hypotheses: dict[str, Any]

    @property
    def baseline(self) -> str | None:
        return self.runs.resolve(self.settings.baseline)

    @property
    def reference(self) -> str | None:
        return self.runs.resolve(self.settings.reference)


def analyse(table: pa.Table, s: AnalysisParams) -> Analysis:
    runs = Runs.from_table(table)
    verdicts = _verdict_rows(runs, s)
    return Analysis(
        runs,
        s,
        _summarize(runs, s.ci),
        _gain_rows(runs, runs.resolve(s.reference), runs.resolve(s.baseline), s.ci),
        _multiplier_rows(runs, s),
        verdicts,
        hypothesis_assessment(verdicts),
    )


def alpha_key(alpha: float) -> str:
    return f"{alpha:g}"


def _r(x: float | None) -> float | None:
    """Rounded to 5 digits; non-finite values become null (JSON has no NaN)."""
    return round(x, 5) if x is not None and math.isfinite(x) else None


def summary_metrics(table: pa.Table, settings: AnalysisParams) -> dict[str, Any]:
    """The DVC metrics: mean score per variant and α, relative gain, multiplier (with its median
    and whether censoring makes that median a lower bound), the reference's advantage over each
    control and each control's share of the reference's gain (where that gain is significant);
    nested by name then α ("0.02"). Rounded to 5 digits, no NaN."""
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
        shares: dict[str, dict[str, float | None]] = {}
        for v in an.verdicts:
            adv.setdefault(v["control"], {})[alpha_key(v["alpha"])] = _r(v["advantage"])
            if v["share"] is not None:
                shares.setdefault(v["control"], {})[alpha_key(v["alpha"])] = _r(v["share"])
        out["advantage_over_control"] = adv
        if shares:
            out["share_of_gain"] = shares
    return out
