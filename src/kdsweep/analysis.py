"""Students' results → the numbers the report and the metrics file show (DESIGN.md §5, §6).

Pure numpy/scipy + pyarrow (no torch), so `aggregate` and `report` start fast and can run
anywhere. Statistics come from kdsweep.stats; the settings are params.yaml's `analysis:` section
(kdsweep.config.AnalysisParams); which hypothesis a control tests comes from the LOSSES registry.

Rules that keep the numbers honest (DESIGN.md §5 reading rules):
- every selection (a swept method's τ) reads the validation score only, never a test column,
  and by default per α on that α's rows (`analysis.select`);
- one named reference per comparison, paired on the seeds every group has (missing seeds are
  listed, never a silent switch to an unpaired test);
- a control is read only where its reference's gain over the baseline is significant (a share
  of no gain means nothing); one significantly below the baseline is *harmful* and supports
  nothing; "matches" only from an equivalence test whose margin is a fraction of that gain;
  Holm within each hypothesis and α; dark knowledge from KD against `ls_matched`;
  "most at small α" only from a test of the difference of shares between α.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from kdsweep.config import AnalysisParams, Params
from kdsweep.errors import KdsweepError
from kdsweep.registry import LOSSES
from kdsweep.stats import (
    data_efficiency_multiplier,
    difference,
    difference_p,
    equivalence_p,
    holm,
    mean_interval,
    median_multiplier,
    monotone_curve,
    multiplier_interval,
    relative_gain,
    seeds_for_equivalence,
    share,
    share_difference,
)

HYPOTHESES = ("label_smoothing", "confidence", "dark_knowledge")
"""What KD transfers, after Tang et al. 2020, in the order the report argues it: universal
smoothing, instance-specific confidence, class relationships. A control's loss names the one it
tests (LOSSES[...].hypothesis)."""

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
    composites: dict[str, dict[float, str]] = field(default_factory=dict)

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
        """A variant's τ (None for a per-α selection: its τ differs between α)."""
        if variant in self.composites:
            return None
        return next(r["tau"] for r in self.rows if r["variant"] == variant)

    def by_alpha(self, variant: str) -> dict[float, list[dict[str, Any]]]:
        """The rows of a variant (or of a per-α selection: its chosen variant's) per α."""
        if variant in self.composites:
            return {a: self.by_alpha(v)[a] for a, v in self.composites[variant].items()}
        out: dict[float, list[dict[str, Any]]] = {}
        for r in self.rows:
            if r["variant"] == variant:
                out.setdefault(r["alpha"], []).append(r)
        return dict(sorted(out.items()))

    def _check_val(self, name: str, rows: Sequence[Mapping[str, Any]]) -> None:
        missing = [r["run_id"] for r in rows if r["val"] is None]
        if missing:
            raise KdsweepError(
                f"{name} sweeps τ but run(s) {missing[:3]} have no {self.val}: a temperature is "
                "selected on the validation split only; re-run the student stages (`dvc repro`)"
            )

    def _val_mean(self, rows: Sequence[Mapping[str, Any]]) -> float:
        sign = 1.0 if self.higher_is_better else -1.0
        return sign * float(np.mean([r["val"] for r in rows]))

    def resolve(self, name: str) -> str | None:
        """The variant `name` denotes with ONE τ for every α: itself, a method's only variant, or
        — for a method with several τ — its variant with the best VALIDATION score averaged over
        the α all of them share (`analysis.select: global`). Test scores are never read here.
        None if absent; an error when the τ variants share no α (nothing to compare them on)."""
        variants = self.variants()
        if name in variants or name in self.composites:
            return name
        cands = self.variants_of(name)
        if len(cands) <= 1:
            return cands[0] if cands else None
        groups = {v: self.by_alpha(v) for v in cands}
        shared = sorted(set.intersection(*(set(g) for g in groups.values())))
        if not shared:
            raise KdsweepError(
                f"{name} sweeps τ ({', '.join(cands)}) but its temperatures share no α: one τ "
                "for every α cannot be chosen on validation; use `analysis.select: per_alpha`"
            )
        for v in cands:
            self._check_val(name, [r for a in shared for r in groups[v][a]])
        return max(
            cands, key=lambda v: float(np.mean([self._val_mean(groups[v][a]) for a in shared]))
        )

    def select(self, name: str, per_alpha: bool = True) -> dict[float, str]:
        """α → the variant of `name` that stands for it there: with `per_alpha`, at each α the
        τ with the best mean VALIDATION score on that α's rows (a method's every swept
        hyper-parameter is its τ: variants differ in nothing else); else `resolve`'s one τ.
        Empty if `name` has no runs."""
        if name in self.variants() or name in self.composites or not per_alpha:
            v = self.resolve(name)
            return {a: v for a in self.by_alpha(v)} if v else {}
        cands = self.variants_of(name)
        out: dict[float, str] = {}
        for alpha in sorted({a for v in cands for a in self.by_alpha(v)}):
            at = {v: self.by_alpha(v)[alpha] for v in cands if alpha in self.by_alpha(v)}
            if len(at) > 1:
                for rows in at.values():
                    self._check_val(name, rows)
                out[alpha] = max(at, key=lambda v: self._val_mean(at[v]))
            else:
                out[alpha] = next(iter(at))
        return out

    def register(self, name: str, per_alpha: bool) -> str | None:
        """The label that stands for method `name` in every table: a variant, or — for a method
        that sweeps τ, selected per α — "name(τ per α)", whose rows at each α are those of the
        variant `select` chose there (kept in `composites`)."""
        sel = self.select(name, per_alpha)
        if not sel:
            return None
        if len(set(sel.values())) == 1 and (not per_alpha or len(self.variants_of(name)) <= 1):
            return next(iter(sel.values()))
        label = f"{name}(τ per α)"
        self.composites[label] = sel
        return label

    def at(self, label: str, alpha: float) -> str | None:
        """The real variant behind `label` at α (itself unless it is a per-α selection)."""
        if label in self.composites:
            return self.composites[label].get(alpha)
        return label if alpha in self.by_alpha(label) else None

    def same_tau(self, method: str, variant: str) -> str | None:
        """`method`'s variant at `variant`'s τ, if the method swept that τ (a control is compared
        with KD at the temperature it was built at)."""
        tau = self.tau_of(variant)
        if tau is None or len(self.variants_of(method)) < 2:
            return None
        return next((v for v in self.variants_of(method) if self.tau_of(v) == tau), None)


def _seed_key(r: Mapping[str, Any]) -> tuple[Any, Any]:
    return (r["subset_seed"], r["train_seed"])


def _paired(
    *groups: Sequence[Mapping[str, Any]],
) -> tuple[list[np.ndarray], bool, list[tuple[Any, Any]]]:
    """Scores of several groups aligned by (subset_seed, train_seed) on the seeds all of them
    have (then the subset, the main source of variance, cancels), and the seeds left out because
    some group lacks them (reported, never silently turned into an unpaired test). Groups with a
    repeated seed, or with no seed in common, cannot pair: their scores as they are, unpaired."""
    keyed = [{_seed_key(r): r["score"] for r in g} for g in groups]
    if not all(len(k) == len(g) for k, g in zip(keyed, groups, strict=True)):
        return [np.array([r["score"] for r in g]) for g in groups], False, []
    common = set.intersection(*(set(k) for k in keyed))
    if not common:  # no seed in common: nothing to pair (the table says "unpaired")
        return [np.array([r["score"] for r in g]) for g in groups], False, []
    seeds = sorted(common, key=repr)
    missing = sorted(set().union(*(set(k) for k in keyed)) - common, key=repr)
    return [np.array([k[s] for s in seeds]) for k in keyed], True, missing


# ---------------------------------------------------------------------------------------------
# Summaries


def _mean_or_none(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if r[key] is not None]
    return float(np.mean(vals)) if vals else None


def _summarize(runs: Runs, ci: float) -> list[dict[str, Any]]:
    """One row per (variant, α): n, mean, std and t-interval of the primary score (accuracy for
    vision, perplexity for lm), and mean agreement, test KL, ECE and negative-KL fraction; a
    per-α selection ("kd(τ per α)") gets rows too, marked `selected`, with the chosen τ."""
    out = []
    for v in [*runs.variants(), *runs.composites]:
        for alpha, rows in runs.by_alpha(v).items():
            s = np.array([r["score"] for r in rows])
            mean, lo, hi = mean_interval(s, ci)
            first = rows[0]
            out.append(
                {
                    "variant": v,
                    **{k: first[k] for k in RECIPE},
                    "alpha": alpha,
                    "selected": v in runs.composites,
                    "chosen": first["variant"],
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


def _tau_rows(runs: Runs, method: str | None, label: str | None) -> list[dict[str, Any]]:
    """Per α, for a method that sweeps τ: each τ's mean validation score and students, the τ
    chosen at that α (the label's variant there) and the one τ `select: global` would take."""
    if method is None or label is None or len(runs.variants_of(method)) < 2:
        return []
    try:
        global_choice = runs.resolve(method) if label in runs.composites else label
    except KdsweepError:
        global_choice = None
    alphas = sorted({a for v in runs.variants_of(method) for a in runs.by_alpha(v)})
    out = []
    for alpha in alphas:
        cands = [
            {"variant": v, "tau": runs.tau_of(v), "n": len(rows), "val": _mean_or_none(rows, "val")}
            | {"test": float(np.mean([r["score"] for r in rows]))}
            for v in runs.variants_of(method)
            if (rows := runs.by_alpha(v).get(alpha))
        ]
        chosen = runs.at(label, alpha)
        out.append(
            {"method": method, "alpha": alpha, "candidates": cands, "chosen": chosen}
            | {"chosen_tau": runs.tau_of(chosen) if chosen else None, "global": global_choice}
        )
    return out


def _gain_rows(runs: Runs, ref: str | None, base: str | None, ci: float) -> list[dict[str, Any]]:
    """Per α: the reference's relative gain over the baseline with Fieller's interval for the
    ratio of seed means, and whether it is a significant gain (the interval lies above 0; a
    loss is not a gain for a control to explain). Paired on the seeds both have; the seeds one
    of them lacks are listed (`missing`)."""
    if base is None or ref is None:
        return []
    b_by, r_by = runs.by_alpha(base), runs.by_alpha(ref)
    out = []
    for alpha in sorted(set(b_by) & set(r_by)):
        (r, b), paired, missing = _paired(r_by[alpha], b_by[alpha])
        gain, lo, hi = relative_gain(r, b, runs.higher_is_better, paired, ci)
        out.append(
            {"alpha": alpha, "gain": gain, "ci_low": lo, "ci_high": hi, "significant": lo > 0}
            | {"n_ref": len(r_by[alpha]), "n_base": len(b_by[alpha]), "paired": paired}
            | {"n_pairs": len(r) if paired else 0, "missing": missing}
            | {"reference": runs.at(ref, alpha), "baseline": runs.at(base, alpha)}
        )
    return out


def _by_seed(rows: Sequence[Mapping[str, Any]]) -> dict[Any, float]:
    """{seed: score}, students of one seed averaged (a seed is the jackknife's unit)."""
    out: dict[Any, list[float]] = {}
    for r in rows:
        out.setdefault(_seed_key(r), []).append(r["score"])
    return {k: float(np.mean(v)) for k, v in out.items()}


def _multiplier_rows(
    runs: Runs, ref: str | None, base: str | None, s: AnalysisParams
) -> list[dict[str, Any]]:
    """Per α of the reference: α* and the multiplier under both interpolations of the baseline's
    isotonic fit in log α (linear; monotone cubic), each with its jackknife interval."""
    if base is None or ref is None:
        return []
    b_seeds = {a: _by_seed(rows) for a, rows in runs.by_alpha(base).items()}
    b_alphas = list(b_seeds)
    b_means = [float(np.mean([r["score"] for r in runs.by_alpha(base)[a]])) for a in b_alphas]
    weights = [len(runs.by_alpha(base)[a]) for a in b_alphas]
    _, fit = monotone_curve(b_alphas, b_means, weights, runs.higher_is_better)
    sign = 1.0 if runs.higher_is_better else -1.0
    out = []
    for alpha, rows in runs.by_alpha(ref).items():
        score = float(np.mean([r["score"] for r in rows]))
        row: dict[str, Any] = {"alpha": alpha, "ref_score": score, "reference": runs.at(ref, alpha)}
        for interp, suffix in (("linear", ""), ("pchip", "_pchip")):
            mult, censored = data_efficiency_multiplier(
                b_alphas, b_means, score, alpha, runs.higher_is_better, weights, interp
            )
            lo, hi, hi_censored = multiplier_interval(
                b_seeds, _by_seed(rows), alpha, runs.higher_is_better, s.ci, interp
            )
            row |= {f"multiplier{suffix}": mult, f"alpha_star{suffix}": mult * alpha}
            row |= {f"ci_low{suffix}": lo, f"ci_high{suffix}": hi}
            row |= {f"ci_high_censored{suffix}": hi_censored}
            if not suffix:
                row["censored"] = censored
        row["clamped"] = bool(
            sign * score < sign * fit[0]
        )  # below the baseline's fit at its smallest α
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------
# Hypothesis controls


def verdict(
    p_diff: float,
    advantage: float,
    p_equivalent: float,
    level: float,
    n_min: int,
    harmful: bool = False,
) -> str:
    """A control against its reference (advantage = reference − control, positive = reference
    better) → a verdict, from (Holm-adjusted) p-values read at `level` (= 1 − ci):
    "harmful" if the control is significantly below the baseline (it then supports nothing);
    "matches" only if the equivalence test (TOST) rejects a difference beyond the margin;
    "falls short" / "exceeds" if the t-test of the difference rejects 0; else "inconclusive"
    (too noisy to tell, whatever the interval contains)."""
    if n_min < 2:
        return "undetermined (n<2)"
    if harmful:
        return "harmful"
    if p_equivalent < level:
        return "matches"
    if p_diff < level:
        return "falls short" if advantage > 0 else "exceeds"
    return "inconclusive"


def _compare(
    runs: Runs,
    s: AnalysisParams,
    control: str,
    ref: str,
    base: str | None,
    gain_ref: str,
    alpha: float,
) -> dict[str, Any]:
    """One comparison at α: control against ONE reference variant (named), with the baseline
    and the reference method's variant whose gain the premise and the share read (`gain_ref`),
    all paired on the seeds every group has (the others listed in `missing`)."""
    c_rows, r_rows = runs.by_alpha(control)[alpha], runs.by_alpha(ref)[alpha]
    b_rows = runs.by_alpha(base).get(alpha) if base else None
    g_rows = runs.by_alpha(gain_ref).get(alpha)
    extra = [b_rows, g_rows] if b_rows and g_rows else []
    arrays, paired, missing = _paired(r_rows, c_rows, *extra)
    r, c = arrays[:2]
    sign = 1.0 if runs.higher_is_better else -1.0
    adv, lo, hi = difference(sign * r, sign * c, paired, s.ci)
    row: dict[str, Any] = (
        {"control": control, "reference": ref, "gain_reference": gain_ref, "alpha": alpha}
        | {"baseline": base, "same_tau": runs.tau_of(control) in (None, runs.tau_of(ref))}
        | {"ref_mean": float(r.mean()), "control_mean": float(c.mean())}
        | {"advantage": adv, "ci_low": lo, "ci_high": hi, "p_diff": difference_p(r, c, paired)}
        | {"paired": paired, "n_ref": len(r_rows), "n_control": len(c_rows)}
        | {"n_pairs": len(r) if paired else 0, "missing": missing}
    )
    none = {"share": None, "share_low": None, "share_high": None}
    if extra:
        b, g = arrays[2:]
        gain_mean = float(g.mean() - b.mean())
        harm, harm_lo, harm_hi = difference(sign * c, sign * b, paired, s.ci)
        row |= {"gain_significant": difference(sign * g, sign * b, paired, s.ci)[1] > 0}
        row |= {"vs_base": harm, "vs_base_low": harm_lo, "vs_base_high": harm_hi}
        row |= {"p_harm": difference_p(c, b, paired)}
        frac = s.equivalence_fraction
        margin = frac * abs(gain_mean) if frac is not None else s.equivalence_margin
        shared = paired and row["gain_significant"] and ref == gain_ref
        point, s_lo, s_hi = share(c, r, b, s.ci) if shared else (None, None, None)
        row |= {"share": point, "share_low": s_lo, "share_high": s_hi}
    else:
        row |= {"gain_significant": False, "vs_base": None, "vs_base_low": None}
        row |= {"vs_base_high": None, "p_harm": math.nan} | none
        margin = s.equivalence_margin
    row["margin"] = margin
    row["p_equivalent"] = equivalence_p(r, c, margin, paired) if margin > 0 else math.nan
    d = r - c if paired else None
    sd = float(np.std(d, ddof=1)) if d is not None and d.size > 1 else math.nan
    row["n_for_match"] = seeds_for_equivalence(sd, margin, 1 - s.ci)
    return row


def _holm_verdicts(rows: list[dict[str, Any]], s: AnalysisParams) -> None:
    """Holm within each family — one hypothesis's comparisons at one α (the other controls are
    a family of their own) — for each test kind, then the verdicts from the adjusted p-values."""
    level = 1 - s.ci
    families: dict[tuple[Any, float], list[dict[str, Any]]] = {}
    for r in rows:
        families.setdefault((r["hypothesis"], r["alpha"]), []).append(r)
    for fam in families.values():
        for key in ("p_diff", "p_equivalent", "p_harm"):
            for r, p in zip(fam, holm([r[key] for r in fam]), strict=True):
                r[f"{key}_holm"] = p
        for r in fam:
            harmful = bool(r["p_harm_holm"] < level and (r["vs_base"] or 0) < 0)
            r["harmful"] = harmful
            n_min = (
                min(r["n_pairs"], r["n_ref"], r["n_control"])
                if r["paired"]
                else min(r["n_ref"], r["n_control"])
            )
            r["verdict"] = verdict(
                r["p_diff_holm"],
                r["advantage"],
                r["p_equivalent_holm"],
                level,
                n_min,
                harmful and r["role"] != "fake_vs_none",
            )
            r["family_size"] = len(fam)


def _verdict_rows(
    runs: Runs, s: AnalysisParams, ref_label: str | None, base_label: str | None
) -> list[dict[str, Any]]:
    """Every comparison the hypothesis section reads, one reference per row (named):

    - each control against the reference: the reference method's variant at the control's τ
      when it swept that τ, else the reference selected at that α (role "control"; the
      controls of the dark-knowledge hypothesis are only "context" there);
    - dark knowledge: the reference against `ls_matched` (the same per-sample confidence with
      and without the teacher's class structure; role "structure") and `shuffled_dk` against
      `ls_matched` (fake structure against none; role "fake_vs_none"), at the same τ and α.

    Verdicts come from Holm-adjusted p-values within each hypothesis and α (`_holm_verdicts`)."""
    if ref_label is None:
        return []
    ref_variants = set(runs.variants_of(s.reference)) | {ref_label}
    out: list[dict[str, Any]] = []
    by_hyp: dict[str | None, list[str]] = {}
    for method in s.controls:
        for v in runs.variants_of(method):
            if v in ref_variants:
                continue
            hyp = LOSSES[runs.by_alpha(v)[min(runs.by_alpha(v))][0]["loss"]].hypothesis
            by_hyp.setdefault(hyp, []).append(v)
            for alpha in runs.by_alpha(v):
                ref = runs.same_tau(s.reference, v) or runs.at(ref_label, alpha)
                if ref is None or alpha not in runs.by_alpha(ref):
                    continue
                base = runs.at(base_label, alpha) if base_label else None
                row = _compare(runs, s, v, ref, base, ref, alpha) | {"method": method}
                dk = hyp == "dark_knowledge"
                out.append(row | {"hypothesis": None if dk else hyp})
                out[-1]["role"] = "context" if dk else "control"
                if hyp == "confidence":
                    out.append(row | {"hypothesis": "dark_knowledge", "role": "structure"})
    for v in by_hyp.get("dark_knowledge", []):
        for alpha in runs.by_alpha(v):
            none = next(
                (
                    w
                    for w in by_hyp.get("confidence", [])
                    if runs.tau_of(w) == runs.tau_of(v) and alpha in runs.by_alpha(w)
                ),
                None,
            )
            gain_ref = runs.same_tau(s.reference, v) or runs.at(ref_label, alpha)
            if none is None or gain_ref is None or alpha not in runs.by_alpha(gain_ref):
                continue
            base = runs.at(base_label, alpha) if base_label else None
            row = _compare(runs, s, v, none, base, gain_ref, alpha)
            method = runs.by_alpha(v)[alpha][0]["method"]
            out.append(row | {"method": method, "hypothesis": "dark_knowledge"})
            out[-1]["role"] = "fake_vs_none"
    _holm_verdicts(out, s)
    return out


def _alpha_contrasts(
    runs: Runs, verdicts: Sequence[Mapping[str, Any]], ci: float
) -> list[dict[str, Any]]:
    """ "Most at small α" as a test: for each decisive comparison (role control or structure)
    with a share at two or more α, the difference of its share at the smallest α and at each
    larger α (share_difference, paired on the seeds all six groups have), with its interval."""
    out = []
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for v in verdicts:
        if v["role"] in ("control", "structure") and v["share"] is not None:
            key = (v["hypothesis"], v["control"], v["reference"], v["baseline"] is not None)
            groups.setdefault(key, []).append(v)
    for (hyp, control, ref, _), rows in groups.items():
        rows = sorted(rows, key=lambda v: v["alpha"])
        small = rows[0]
        for large in rows[1:]:
            sides = [
                [runs.by_alpha(x[k])[x["alpha"]] for k in ("control", "reference", "baseline")]
                for x in (small, large)
            ]
            arrays, paired, missing = _paired(*sides[0], *sides[1])
            if not paired:
                continue
            d, lo, hi = share_difference(tuple(arrays[:3]), tuple(arrays[3:]), ci)
            out.append(
                {"hypothesis": hyp, "control": control, "reference": ref}
                | {"small_alpha": small["alpha"], "large_alpha": large["alpha"]}
                | {"share_small": small["share"], "share_large": large["share"]}
                | {"difference": d, "ci_low": lo, "ci_high": hi, "n_pairs": len(arrays[0])}
                | {"missing": missing}
            )
    return out


def _outcome(h: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """One α of one hypothesis: its decisive comparisons' verdicts against what it predicts.
    Label smoothing / confidence: supported if every control matches (or exceeds) the
    reference, refuted if every one falls short of it or is harmful. Dark knowledge: supported
    if the reference beats `ls_matched` (ls_matched falls short: the class structure adds to
    the same confidence), refuted if ls_matched matches or exceeds it; a harmful ls_matched
    decides nothing. Otherwise inconclusive."""
    verdicts = [r["verdict"] for r in rows if r["role"] in ("control", "structure")]
    if not verdicts:
        return "inconclusive"
    recovers = {"matches", "exceeds"}
    if all(v in recovers for v in verdicts):
        return "refuted" if h == "dark_knowledge" else "supported"
    if h == "dark_knowledge" and all(v == "falls short" for v in verdicts):
        return "supported"
    if h != "dark_knowledge" and all(v in ("falls short", "harmful") for v in verdicts):
        return "refuted"
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


def hypothesis_assessment(
    verdicts: Sequence[Mapping[str, Any]], contrasts: Sequence[Mapping[str, Any]] = ()
) -> dict[str, Any]:
    """What the comparisons say about each hypothesis (HYPOTHESES), per α and overall.

    Only α where the reference's gain over the baseline is significant count (elsewhere there
    is no gain to explain); the rules are `_outcome`'s. The decisive controls' mean share of the
    gain per α is carried along; "most at small α" (dark knowledge: the share `ls_matched`
    recovers is smaller at the smallest α) is True only where a share difference between α
    (`contrasts`) excludes 0 in that direction, False where tested but not shown, None where
    no two α have a share."""
    out: dict[str, Any] = {}
    for h in HYPOTHESES:
        rows = [r for r in verdicts if r["hypothesis"] == h and r["gain_significant"]]
        alphas = sorted({r["alpha"] for r in rows})
        outcomes = {a: _outcome(h, [r for r in rows if r["alpha"] == a]) for a in alphas}
        decisive = [r for r in rows if r["role"] in ("control", "structure")]
        with_share = [r for r in decisive if r["share"] is not None]
        mean_share = {
            a: float(np.mean([r["share"] for r in with_share if r["alpha"] == a]))
            for a in sorted({r["alpha"] for r in with_share})
        }
        tests = [c for c in contrasts if c["hypothesis"] == h]
        small = None if not tests else any(c["ci_high"] < 0 for c in tests)
        out[h] = {
            "controls": sorted({r["control"] for r in rows}),
            "rows": rows,
            "tested_alphas": alphas,
            "outcomes": outcomes,
            "supported_at": [a for a, o in outcomes.items() if o == "supported"],
            "refuted_at": [a for a, o in outcomes.items() if o == "refuted"],
            "harmful": sorted({(r["control"], r["alpha"]) for r in rows if r["harmful"]}),
            "verdict": _overall(outcomes),
            "mean_share": mean_share,
            "alpha_contrasts": tests,
            "most_at_small_alpha": small,
        }
    return out


# ---------------------------------------------------------------------------------------------
# Everything at once


@dataclass(frozen=True)
class Analysis:
    """All numbers of one runs table, computed once for the metrics file and the report.
    `baseline` / `reference` are the labels that stand for the two methods: a variant, or a
    per-α selection such as "kd(τ per α)" (its choice per α in `taus`)."""

    runs: Runs
    settings: AnalysisParams
    summary: list[dict[str, Any]]
    gains: list[dict[str, Any]]
    multipliers: list[dict[str, Any]]
    verdicts: list[dict[str, Any]]
    hypotheses: dict[str, Any]
    baseline: str | None = None
    reference: str | None = None
    taus: list[dict[str, Any]] = field(default_factory=list)
    contrasts: list[dict[str, Any]] = field(default_factory=list)


def analyse(table: pa.Table, s: AnalysisParams) -> Analysis:
    runs = Runs.from_table(table)
    per_alpha = s.select == "per_alpha"
    ref, base = runs.register(s.reference, per_alpha), runs.register(s.baseline, per_alpha)
    verdicts = _verdict_rows(runs, s, ref, base)
    contrasts = _alpha_contrasts(runs, verdicts, s.ci)
    return Analysis(
        runs,
        s,
        _summarize(runs, s.ci),
        _gain_rows(runs, ref, base, s.ci),
        _multiplier_rows(runs, ref, base, s),
        verdicts,
        hypothesis_assessment(verdicts, contrasts),
        base,
        ref,
        _tau_rows(runs, s.reference, ref) + _tau_rows(runs, s.baseline, base),
        contrasts,
    )


# ---------------------------------------------------------------------------------------------
# One (student, teacher) pair for the main tables; every pair for the factors


@dataclass(frozen=True)
class Primary:
    """The one (student, teacher) pair the main tables and the headline metrics read, so that
    adding a student configuration or a teacher leaves their conclusions unchanged: the first
    configuration of `students:` and, for every method, its first store."""

    student: str
    first_store: Mapping[str, str]  # method → the first of `Params.stores_of(method)`

    @classmethod
    def of(cls, p: Params) -> Primary:
        return cls(next(iter(p.students)), {m: p.stores_of(m)[0] for m in p.methods})


def primary_table(table: pa.Table, primary: Primary) -> pa.Table:
    """The primary student's rows that read their method's first store, and its rows of labels
    only (no store). A method params no longer names is an error (stale runs), not dropped."""
    rows = table.to_pylist()
    stale = sorted({r["method"] for r in rows} - set(primary.first_store))
    if stale:
        raise KdsweepError(
            f"the runs hold methods {stale} that params.yaml does not define: run `dvc repro`"
        )
    keep = [
        r["student"] == primary.student
        and r["cache_name"] in (None, primary.first_store[r["method"]])
        for r in rows
    ]
    if not any(keep):
        raise KdsweepError(
            f"no runs of the primary student {primary.student!r} (the first of `students:`): "
            "run `dvc repro`"
        )
    return table.filter(pa.array(keep))


@dataclass(frozen=True)
class FactorPair:
    """One (student configuration, teacher) pair: the baseline's students of that configuration
    and the reference's on that teacher's store, analysed alone."""

    label: str  # "<student>/<teacher>", the store added where the reference read several of it
    student: str
    teacher: str
    store: str
    student_params: int
    teacher_params: int
    identical: bool  # the student has the teacher's architecture and width (the paper's pair)
    analysis: Analysis

    @property
    def ratio(self) -> float:
        """Student parameters over teacher parameters: the capacity axis."""
        return self.student_params / self.teacher_params


def factor_pairs(table: pa.Table, s: AnalysisParams) -> list[FactorPair]:
    """Every student configuration × store the reference read, each analysed (`analyse`: τ
    selected per α on the pair's own validation rows, gains, multipliers) on the baseline rows
    of that student and its reference rows on that store. No control is read: controls train
    for the primary pair only. Sorted by teacher, then parameter ratio."""
    rows = table.to_pylist()
    firsts: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        if r["method"] == s.reference:
            firsts.setdefault((r["student"], r["cache_name"]), r)
    stores = Counter((student, r["teacher_id"]) for (student, _), r in firsts.items())
    alone = s.model_copy(update={"controls": []})
    out = []
    for (student, store), r in firsts.items():
        teacher = r["teacher_id"]
        keep = [
            x["student"] == student
            and (
                x["method"] == s.baseline
                or (x["method"] == s.reference and x["cache_name"] == store)
            )
            for x in rows
        ]
        several = stores[(student, teacher)] > 1
        out.append(
            FactorPair(
                f"{student}/{teacher}" + (f" ({store})" if several else ""),
                student,
                teacher,
                store,
                r["student_params"],
                r["teacher_params"],
                r["student_arch"] == r["teacher_arch"] and r["student_width"] == r["teacher_width"],
                analyse(table.filter(pa.array(keep)), alone),
            )
        )
    return sorted(out, key=lambda p: (p.teacher, p.ratio, p.student))


def alpha_key(alpha: float) -> str:
    return f"{alpha:g}"


def _r(x: float | None) -> float | None:
    """Rounded to 5 digits; non-finite values become null (JSON has no NaN)."""
    return round(x, 5) if x is not None and math.isfinite(x) else None


def summary_metrics(table: pa.Table, settings: AnalysisParams) -> dict[str, Any]:
    """The DVC metrics: mean score per variant and α, the τ selected per α, relative gain,
    multiplier (with its median and whether censoring makes that median a lower bound, and the
    monotone-cubic one), the reference's advantage over each control, each control's share of
    the reference's gain (where that gain is significant) and its verdict; nested by name then
    α ("0.02"). Rounded to 5 digits, no NaN."""
    an = analyse(table, settings)
    score = "acc" if an.runs.higher_is_better else "ppl"
    out: dict[str, Any] = {"n_runs": len(an.runs.rows), score: {}}
    for row in an.summary:
        out[score].setdefault(row["variant"], {})[alpha_key(row["alpha"])] = _r(row["mean"])
    if an.taus:
        out["selected"] = {t["method"]: {} for t in an.taus}
        for t in an.taus:
            out["selected"][t["method"]][alpha_key(t["alpha"])] = t["chosen"]
    if an.gains:
        out["relative_gain"] = {alpha_key(g["alpha"]): _r(g["gain"]) for g in an.gains}
    if an.multipliers:
        m = an.multipliers
        med, lower = median_multiplier([x["multiplier"] for x in m], [x["censored"] for x in m])
        out["multiplier"] = {alpha_key(x["alpha"]): _r(x["multiplier"]) for x in m}
        out["multiplier"] |= {"median": _r(med), "median_is_lower_bound": lower}
        out["multiplier_pchip"] = {alpha_key(x["alpha"]): _r(x["multiplier_pchip"]) for x in m}
    if an.verdicts:
        adv: dict[str, dict[str, float | None]] = {}
        shares: dict[str, dict[str, float | None]] = {}
        verdicts: dict[str, dict[str, str]] = {}
        for v in an.verdicts:
            name = f"{v['control']} vs {v['reference']}"
            if v["hypothesis"]:
                name += f" [{v['hypothesis']}]"
            adv.setdefault(name, {})[alpha_key(v["alpha"])] = _r(v["advantage"])
            verdicts.setdefault(name, {})[alpha_key(v["alpha"])] = v["verdict"]
            if v["share"] is not None:
                shares.setdefault(name, {})[alpha_key(v["alpha"])] = _r(v["share"])
        out["advantage_over_control"] = adv
        out["verdict"] = verdicts
        if shares:
            out["share_of_gain"] = shares
    return out


def factor_metrics(pairs: Sequence[FactorPair]) -> dict[str, Any]:
    """`factors` for the metrics file, so `dvc exp show` shows them: per pair its reference's
    relative gain per α, the parameter ratio and whether it is the identical pair."""
    if not pairs:
        return {}
    return {
        "factors": {
            p.label: {
                "gain": {alpha_key(g["alpha"]): _r(g["gain"]) for g in p.analysis.gains},
                "ratio": _r(p.ratio),
                "identical": p.identical,
            }
            for p in pairs
        }
    }
