"""Students' results → one table → the numbers the report shows (DESIGN.md §5, §6).

Pure numpy + pyarrow (no torch), so `aggregate` and `report` start fast and can run anywhere.
All statistics are over seeds: every bootstrap is a percentile bootstrap of a mean, with a
generator derived from (analysis.seed, the group's key), so one group's interval does not change
when other groups are added. With the 2–5 seeds of a sweep these intervals are narrow-ish
(a percentile bootstrap under-covers at small n); they rank effects, they are not exact tests.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdsweep.errors import KdsweepError
from kdsweep.io import atomic_path

_S, _F, _I = pa.string(), pa.float64(), pa.int64()
RUN_SCHEMA = pa.schema(
    [
        ("run_id", _S),
        ("dataset", _S),
        ("task", _S),
        ("teacher_id", _S),
        ("teacher_arch", _S),
        ("student_arch", _S),
        ("method", _S),
        ("loss", _S),
        ("lam", _F),
        ("tau", _F),
        ("epsilon", _F),
        ("cache_name", _S),
        ("cache_kind", _S),
        ("k", _I),
        ("topk_mode", _S),
        ("alpha", _F),
        ("n_train", _I),
        ("subset_seed", _I),
        ("train_seed", _I),
        ("budget_mode", _S),
        ("epochs", _F),
        ("steps", _I),
        ("test_acc", _F),
        ("test_error", _F),
        ("test_ppl", _F),
        ("agreement", _F),
        ("test_kl", _F),
        ("ece", _F),
        ("neg_kl_frac", _F),
        ("train_seconds", _F),
        ("train_path", _S),
        ("params_hash", _S),
        ("git_rev", _S),
    ]
)
"""One row per trained student: the contract between the student stages and the analysis."""

LS_CONTROLS = ("ls_matched", "shuffled_dk")
"""The controls that separate the two explanations of KD (DESIGN.md §5): label smoothing predicts
they match the reference, dark knowledge predicts they fall short (most at small α)."""

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
# Settings


@dataclass(frozen=True)
class AnalysisSettings:
    """The `analysis:` section of params.yaml, with the defaults of kdsweep.config."""

    baseline: str = "ce"
    reference: str = "kd"
    controls: tuple[str, ...] = ()
    n_boot: int = 2000
    ci: float = 0.95
    seed: int = 0


def analysis_settings(params: Mapping[str, Any]) -> AnalysisSettings:
    """Read `params["analysis"]` (validation happens in kdsweep.config; defaults fill gaps)."""
    a = dict(params.get("analysis") or {})
    a["controls"] = tuple(a.get("controls", ()))
    return AnalysisSettings(**a)


# ---------------------------------------------------------------------------------------------
# Collecting and storing runs


def _load_rows(path: Path) -> list[dict[str, Any]]:
    rows = json.loads(path.read_text())
    if not isinstance(rows, list):
        raise KdsweepError(f"{path}: expected a JSON list of run rows, got {type(rows).__name__}")
    expected = set(RUN_SCHEMA.names)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise KdsweepError(f"{path}: row {i} is a {type(row).__name__}, not an object")
        missing, extra = sorted(expected - set(row)), sorted(set(row) - expected)
        if missing or extra:
            raise KdsweepError(
                f"{path}: row {i} is missing key(s) {missing} and has unexpected key(s) {extra}; "
                "the keys must be exactly those of kdsweep.analysis.RUN_SCHEMA"
            )
    return rows


def collect_runs(students_dir: Path) -> pa.Table:
    """Every `<students_dir>/*/runs.json`, in sorted order, as one table of RUN_SCHEMA."""
    files = sorted(Path(students_dir).glob("*/runs.json"))
    tables = []
    for f in files:
        try:
            tables.append(pa.Table.from_pylist(_load_rows(f), schema=RUN_SCHEMA))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
            raise KdsweepError(f"{f}: a value has the wrong type for RUN_SCHEMA ({err})") from None
    table = pa.concat_tables(tables) if tables else RUN_SCHEMA.empty_table()
    if table.num_rows == 0:
        raise KdsweepError(
            f"no student runs under {students_dir} ({len(files)} runs.json file(s)): "
            "run the student stages first (`dvc repro`)"
        )
    return table


def write_parquet(table: pa.Table, path: Path) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_runs(path: Path) -> pa.Table:
    """The runs table at `path`, checked against RUN_SCHEMA (a stale file fails with advice)."""
    table = pq.read_table(path)
    missing = [n for n in RUN_SCHEMA.names if n not in table.column_names]
    if missing:
        raise KdsweepError(f"{path} lacks column(s) {missing}: re-run `dvc repro aggregate`")
    return table.select(RUN_SCHEMA.names).cast(RUN_SCHEMA)


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


# ---------------------------------------------------------------------------------------------
# Bootstrap


def _rng(seed: int, *key: Any) -> np.random.Generator:
    """A generator for one group: depends on the seed and the group's key only."""
    return np.random.default_rng([seed, zlib.crc32(repr(key).encode())])


def _interval(boot: np.ndarray, ci: float) -> tuple[float, float]:
    lo, hi = np.quantile(boot, [(1 - ci) / 2, (1 + ci) / 2])
    return float(lo), float(hi)


def bootstrap_ci(
    values: Sequence[float], n_boot: int, ci: float, rng: np.random.Generator
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean; a single value gives (value, value)."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    idx = rng.integers(0, v.size, size=(n_boot, v.size))
    return _interval(v[idx].mean(axis=1), ci)


def _two_sample(
    a: np.ndarray,
    b: np.ndarray,
    stat: Callable[[np.ndarray, np.ndarray], np.ndarray],
    paired: bool,
    n_boot: int,
    ci: float,
    rng: np.random.Generator,
) -> tuple[float, float, float]:
    """stat(mean a, mean b) and its bootstrap interval, resampling pairs jointly if `paired`."""
    if paired and a.size != b.size:
        raise ValueError(f"paired samples need equal sizes, got {a.size} and {b.size}")
    ia = rng.integers(0, a.size, size=(n_boot, a.size))
    ib = ia if paired else rng.integers(0, b.size, size=(n_boot, b.size))
    point = float(stat(np.asarray(a.mean()), np.asarray(b.mean())))
    return (point, *_interval(stat(a[ia].mean(axis=1), b[ib].mean(axis=1)), ci))


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


def relative_gain(
    ref_scores: Sequence[float],
    base_scores: Sequence[float],
    higher_is_better: bool,
    *,
    paired: bool,
    n_boot: int,
    ci: float,
    rng: np.random.Generator,
) -> tuple[float, float, float]:
    """(gain, ci_low, ci_high) of the reference over the baseline, positive when it helps:
    (ref − base)/base for accuracy, (base − ref)/base for perplexity, on the seed means."""
    sign = 1.0 if higher_is_better else -1.0
    return _two_sample(
        np.asarray(ref_scores, dtype=float),
        np.asarray(base_scores, dtype=float),
        lambda r, b: sign * (r - b) / b,
        paired,
        n_boot,
        ci,
        rng,
    )


# ---------------------------------------------------------------------------------------------
# Summaries


def _mean_or_none(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if r[key] is not None]
    return float(np.mean(vals)) if vals else None


def _summarize(runs: Runs, n_boot: int, ci: float, seed: int) -> list[dict[str, Any]]:
    out = []
    for v in runs.variants():
        for alpha, rows in runs.by_alpha(v).items():
            s = np.array([r["score"] for r in rows])
            lo, hi = bootstrap_ci(s, n_boot, ci, _rng(seed, v, alpha))
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


def summarize(table: pa.Table, n_boot: int, ci: float, seed: int) -> list[dict[str, Any]]:
    """One row per (variant, α): n, mean, std and bootstrap CI of the primary score (accuracy
    for vision, perplexity for lm), plus mean agreement, test KL, ECE and negative-KL fraction."""
    return _summarize(Runs.from_table(table), n_boot, ci, seed)


def _gain_rows(runs: Runs, s: AnalysisSettings) -> list[dict[str, Any]]:
    base, ref = runs.resolve(s.baseline), runs.resolve(s.reference)
    if base is None or ref is None:
        return []
    b_by, r_by = runs.by_alpha(base), runs.by_alpha(ref)
    out = []
    for alpha in sorted(set(b_by) & set(r_by)):
        r, b, paired = _pair(r_by[alpha], b_by[alpha])
        rng = _rng(s.seed, "gain", ref, base, alpha)
        gain, lo, hi = relative_gain(
            r, b, runs.higher_is_better, paired=paired, n_boot=s.n_boot, ci=s.ci, rng=rng
        )
        out.append(
            {"alpha": alpha, "gain": gain, "ci_low": lo, "ci_high": hi, "n_ref": len(r)}
            | {"n_base": len(b), "paired": paired, "reference": ref, "baseline": base}
        )
    return out


def data_efficiency_multiplier(
    base_alphas: Sequence[float],
    base_scores: Sequence[float],
    ref_score: float,
    alpha: float,
    higher_is_better: bool,
) -> tuple[float, bool]:
    """(α*/α, censored): how much more data the baseline needs to reach `ref_score`.

    The baseline curve is made monotone (running best as α grows, so a noisy dip never creates
    a second crossing) and interpolated linearly in log α; α* is its first crossing of
    `ref_score`. Two ends cannot be measured:
    - ref_score beats every baseline point: censored=True and the multiplier is
      max(base_alphas)/α, a *lower bound* (the baseline never gets there on this grid);
    - ref_score is worse than the baseline's smallest-α point: α* is clamped to min(base_alphas)
      (censored=False), so the multiplier is then an *upper bound*; we clamp rather than
      extrapolate because a slope below the grid is unknown.
    """
    a = np.asarray(base_alphas, dtype=float)
    order = np.argsort(a)
    a = a[order]
    sign = 1.0 if higher_is_better else -1.0
    curve = np.maximum.accumulate(sign * np.asarray(base_scores, dtype=float)[order])
    target = sign * ref_score
    if target > curve[-1]:
        return float(a[-1] / alpha), True
    i = int(np.argmax(curve >= target))
    if i == 0 or curve[i] == target:
        return float(a[i] / alpha), False
    t = (target - curve[i - 1]) / (curve[i] - curve[i - 1])
    log_star = math.log(a[i - 1]) + t * (math.log(a[i]) - math.log(a[i - 1]))
    return math.exp(log_star) / alpha, False


def median_multiplier(values: Sequence[float], censored: Sequence[bool]) -> tuple[float, bool]:
    """(median, is_lower_bound): censored values are lower bounds, and raising a value can move
    the median only if it ranks at or below the (upper) middle, so only those flag it. Clamped
    values (upper bounds, see data_efficiency_multiplier) are taken at face value."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        raise ValueError("median_multiplier needs at least one value")
    order = np.argsort(v, kind="stable")
    low_half = order[: v.size // 2 + 1]
    return float(np.median(v)), bool(np.asarray(censored, dtype=bool)[low_half].any())


def _multiplier_rows(runs: Runs, s: AnalysisSettings) -> list[dict[str, Any]]:
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


def _verdict_rows(runs: Runs, s: AnalysisSettings) -> list[dict[str, Any]]:
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
                adv, lo, hi = _two_sample(
                    r,
                    c,
                    lambda x, y: sign * (x - y),
                    paired,
                    s.n_boot,
                    s.ci,
                    _rng(s.seed, "verdict", ref, v, alpha),
                )
                out.append(
                    {"control": v, "method": method, "reference": ref, "alpha": alpha}
                    | {"ref_mean": float(r.mean()), "control_mean": float(c.mean())}
                    | {"advantage": adv, "ci_low": lo, "ci_high": hi, "paired": paired}
                    | {"relative_advantage": adv / abs(float(c.mean()))}
                    | {"n_ref": len(r), "n_control": len(c)}
                    | {"verdict": verdict(lo, hi, min(len(r), len(c)))}
                    | {"hypothesis_control": method in LS_CONTROLS}
                )
    return out


def hypothesis_verdicts(
    table: pa.Table, reference: str, controls: Sequence[str], n_boot: int, ci: float, seed: int
) -> list[dict[str, Any]]:
    """Per control variant and α: the reference's advantage over it in score units (positive =
    reference better, whichever way the score points), its bootstrap CI, and the verdict:
    "falls short" (CI > 0), "matches" (CI ∋ 0), "exceeds" (CI < 0), "undetermined (n<2)"."""
    s = AnalysisSettings(
        reference=reference, controls=tuple(controls), n_boot=n_boot, ci=ci, seed=seed
    )
    return _verdict_rows(Runs.from_table(table), s)


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
    """What the LS_CONTROLS verdicts say about each explanation, per α and overall.

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
    settings: AnalysisSettings
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


def analyse(table: pa.Table, params: Mapping[str, Any]) -> Analysis:
    runs, s = Runs.from_table(table), analysis_settings(params)
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


def summary_metrics(table: pa.Table, params: Mapping[str, Any]) -> dict[str, Any]:
    """The DVC metrics: mean score per variant and α, relative gain, multiplier (with its median
    and whether censoring makes that median a lower bound) and the reference's advantage over
    each control; nested by name then α ("0.02"). Rounded to 5 digits, no NaN."""
    an = analyse(table, params)
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
