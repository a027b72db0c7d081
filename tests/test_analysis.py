"""kdsweep.analysis on hand-made numbers whose right answers are known."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from kdsweep.analysis import (
    Runs,
    analyse,
    hypothesis_assessment,
    summary_metrics,
    verdict,
)
from kdsweep.config import STUDENTS_OF_LABELS, AnalysisParams
from kdsweep.errors import KdsweepError
from kdsweep.runs import RUN_SCHEMA, collect_runs, read_runs, write_parquet
from kdsweep.stats import (
    bootstrap_ci,
    data_efficiency_multiplier,
    median_multiplier,
    relative_gain,
)

SETTINGS = AnalysisParams(
    baseline="ce",
    reference="kd",
    controls=["ls_matched", "shuffled_dk", "top1_teacher"],
    n_boot=400,
    ci=0.95,
    seed=0,
)


def run_row(**kw: Any) -> dict[str, Any]:
    """A complete runs.json row; keyword arguments override the defaults."""
    row: dict[str, Any] = {k: None for k in RUN_SCHEMA.names}
    row |= {
        "run_id": "r",
        "dataset": "mnist1d",
        "task": "vision",
        "teacher_arch": "cnn1d",
        "student_arch": "cnn1d",
        "method": "ce",
        "loss": "ce",
        "alpha": 1.0,
        "n_train": 100,
        "subset_seed": 0,
        "train_seed": 0,
        "budget_mode": "steps",
        "epochs": 1.0,
        "steps": 10,
        "test_acc": 0.5,
        "train_seconds": 1.0,
        "train_path": "sequential",
        "params_hash": "h",
        "git_rev": "g",
    }
    return row | kw


# (method, loss, tau, cache_kind, k): the synthetic students of `synthetic_rows`.
VARIANTS: list[tuple[str, str, float | None, str | None, int | None]] = [
    ("ce", "ce", None, None, None),
    ("ls", "ls", None, None, None),
    ("kd", "kd", 4.0, "full", None),
    ("ls_matched", "ls_matched", 4.0, "full", None),
    ("shuffled_dk", "shuffled_dk", 4.0, "full", None),
    ("top1_teacher", "top1_teacher", None, "full", None),
    ("kd_tau", "kd", 1.0, "full", None),
    ("kd_tau", "kd", 16.0, "full", None),
    ("logit_mse", "logit_mse", None, "full", None),
    ("kd_top2", "kd", 4.0, "topk", 2),
    ("kd_top4", "kd", 4.0, "topk", 4),
    ("kd_sampled4", "kd", 4.0, "sampled", 4),
]
ABLATIONS = {"kd_tau", "logit_mse", "kd_top2", "kd_top4", "kd_sampled4"}


def synthetic_acc(method: str, tau: float | None, k: int | None, alpha: float, seed: int) -> float:
    """CE rises 0.5 → 0.9 over α = 0.01 … 1 (linear in log α); KD is worth +0.15 at α=0.01,
    fading to +0.02 at α=1 (so it beats every CE point there); ls_matched matches KD,
    shuffled_dk falls short by 0.1 at small α, top-k loses a little per missing entry."""
    x = (math.log10(alpha) + 2) / 2  # 0 at α=0.01, 1 at α=1
    ce = 0.5 + 0.4 * x
    kd = ce + 0.15 - 0.13 * x
    acc = {
        "ce": ce,
        "ls": ce + 0.01,
        "kd": kd,
        "ls_matched": kd,
        "shuffled_dk": kd - 0.1 * (1 - x),
        "top1_teacher": ce + 0.02,
        "kd_tau": kd - (0.03 if tau == 1.0 else 0.01),
        "logit_mse": kd - 0.005,
    }.get(method, kd - 0.02 / (k or 1))
    return acc + 0.004 * (seed - 1)


def synthetic_rows(
    alphas: tuple[float, ...] = (0.02, 0.1, 1.0),
    seeds: tuple[int, ...] = (0, 1, 2),
    methods: set[str] | None = None,
    task: str = "vision",
) -> list[dict[str, Any]]:
    rows = []
    for method, loss, tau, kind, k in VARIANTS:
        if methods is not None and method not in methods:
            continue
        for alpha in (alphas[0], alphas[-1]) if method in ABLATIONS else alphas:
            for s in seeds:
                acc = synthetic_acc(method, tau, k, alpha, s)
                score = {"test_acc": acc} if task == "vision" else {"test_ppl": 100 * (1 - acc)}
                rows.append(
                    run_row(
                        run_id=f"{method}-{tau}-{alpha}-{s}",
                        task=task,
                        method=method,
                        loss=loss,
                        tau=tau,
                        lam=1.0 if kind else None,
                        cache_kind=kind,
                        cache_name={
                            "full": "full",
                            "topk": f"top{k}",
                            "sampled": f"sampled{k}",
                        }.get(kind or ""),
                        teacher_id="main" if kind else None,
                        k=k,
                        topk_mode="tail" if kind == "topk" else None,
                        alpha=alpha,
                        subset_seed=s,
                        agreement=acc,
                        test_kl=1 - acc,
                        ece=0.1,
                        neg_kl_frac=0.0 if kind else None,
                    )
                    | score
                )
    return rows


def table_of(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=RUN_SCHEMA)


def write_students(root: Path, rows: list[dict[str, Any]]) -> list[str]:
    """Lay rows out as the student stages do, one stage per store (`<store>/runs.json`, `labels`
    for the students of labels only); the stage names, in order of first appearance."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["cache_name"] or STUDENTS_OF_LABELS, []).append(r)
    for name, g in groups.items():
        (root / name).mkdir(parents=True)
        (root / name / "runs.json").write_text(json.dumps(g))
    return list(groups)


# --- bootstrap --------------------------------------------------------------------------------


def test_bootstrap_constant_and_single_values_give_a_point() -> None:
    rng = np.random.default_rng(0)
    assert bootstrap_ci([0.3, 0.3, 0.3], 500, 0.95, rng) == (0.3, 0.3)
    assert bootstrap_ci([0.7], 500, 0.95, rng) == (0.7, 0.7)


def test_bootstrap_contains_the_mean_and_is_deterministic_per_seed() -> None:
    v = [0.1, 0.4, 0.5, 0.9, 0.2, 0.6]
    lo, hi = bootstrap_ci(v, 2000, 0.95, np.random.default_rng(1))
    assert lo < np.mean(v) < hi
    assert lo > min(v) and hi < max(v)  # an interval of the mean, not of the values
    assert bootstrap_ci(v, 2000, 0.95, np.random.default_rng(1)) == (lo, hi)
    assert bootstrap_ci(v, 2000, 0.95, np.random.default_rng(2)) != (lo, hi)
    lo90, hi90 = bootstrap_ci(v, 2000, 0.90, np.random.default_rng(1))
    assert lo < lo90 and hi90 < hi


# --- data-efficiency multiplier -------------------------------------------------------------

BASE_A, BASE_ACC = [0.01, 0.1, 1.0], [0.5, 0.7, 0.9]


def test_multiplier_at_a_baseline_point_is_exact() -> None:
    m, censored = data_efficiency_multiplier(BASE_A, BASE_ACC, 0.7, 0.01, True)
    assert m == pytest.approx(10.0, rel=1e-12) and not censored


def test_multiplier_interpolates_in_log_alpha() -> None:
    # 0.6 is halfway from 0.5 to 0.7, so α* is halfway between 0.01 and 0.1 in log α: 10^-1.5
    m, censored = data_efficiency_multiplier(BASE_A, BASE_ACC, 0.6, 0.01, True)
    assert m == pytest.approx(10**-1.5 / 0.01, rel=1e-12) and not censored
    # input order does not matter
    m2, _ = data_efficiency_multiplier(BASE_A[::-1], BASE_ACC[::-1], 0.6, 0.01, True)
    assert m2 == pytest.approx(m, rel=1e-12)


def test_multiplier_is_censored_when_the_reference_beats_every_baseline_point() -> None:
    assert data_efficiency_multiplier(BASE_A, BASE_ACC, 0.95, 0.01, True) == (100.0, True)


def test_multiplier_is_clamped_below_the_smallest_alpha() -> None:
    m, censored = data_efficiency_multiplier(BASE_A, BASE_ACC, 0.4, 0.1, True)
    assert m == pytest.approx(0.1, rel=1e-12) and not censored


def test_multiplier_makes_the_baseline_monotone() -> None:
    # raw curve dips at α=0.2 (0.8 → 0.7); the running max holds 0.8 until α=1, so 0.85 is
    # crossed halfway (in log α) between 0.2 and 1.0, not 3/4 of the way as the raw curve says
    m, _ = data_efficiency_multiplier([0.01, 0.1, 0.2, 1.0], [0.5, 0.8, 0.7, 0.9], 0.85, 0.1, True)
    assert m == pytest.approx(math.sqrt(0.2) / 0.1, rel=1e-12)


def test_multiplier_for_perplexity_lower_is_better() -> None:
    m, censored = data_efficiency_multiplier(BASE_A, [30.0, 20.0, 10.0], 20.0, 0.01, False)
    assert m == pytest.approx(10.0, rel=1e-12) and not censored
    assert data_efficiency_multiplier(BASE_A, [30.0, 20.0, 10.0], 5.0, 0.01, False) == (100.0, True)


def test_median_multiplier_is_a_lower_bound_only_if_a_censored_value_can_move_it() -> None:
    assert median_multiplier([1.0, 2.0, 100.0], [False, False, True]) == (2.0, False)
    assert median_multiplier([1.0, 2.0, 100.0], [True, False, False]) == (2.0, True)
    assert median_multiplier([1.0, 2.0, 3.0, 100.0], [False, False, True, False]) == (2.5, True)


# --- relative gain and verdicts ---------------------------------------------------------------


def _gain(ref: list[float], base: list[float], hib: bool, paired: bool = True) -> tuple[float, ...]:
    rng = np.random.default_rng(0)
    return relative_gain(ref, base, hib, paired=paired, n_boot=500, ci=0.95, rng=rng)


def test_relative_gain_sign_for_accuracy_and_perplexity() -> None:
    assert _gain([0.6], [0.5], True)[0] == pytest.approx(0.2)
    assert _gain([0.4], [0.5], True)[0] == pytest.approx(-0.2)
    assert _gain([8.0], [10.0], False)[0] == pytest.approx(0.2)
    assert _gain([12.0], [10.0], False)[0] == pytest.approx(-0.2)


def test_paired_gain_cancels_the_subset_variance() -> None:
    base = [0.5, 0.6, 0.7]
    ref = [1.2 * b for b in base]
    g, lo, hi = _gain(ref, base, True, paired=True)
    assert (g, lo, hi) == pytest.approx((0.2, 0.2, 0.2))
    _, lo_i, hi_i = _gain(ref, base, True, paired=False)
    assert hi_i - lo_i > 0.1


def test_verdict_thresholds() -> None:
    assert verdict(0.01, 0.05, 3) == "falls short"
    assert verdict(-0.01, 0.05, 3) == "matches"
    assert verdict(-0.05, -0.01, 3) == "exceeds"
    assert verdict(0.01, 0.05, 1) == "undetermined (n<2)"


def _by(rows: list[dict[str, Any]], control: str, alpha: float) -> dict[str, Any]:
    (r,) = [r for r in rows if r["control"] == control and r["alpha"] == alpha]
    return r


@pytest.mark.parametrize("task", ["vision", "lm"])
def test_verdicts_on_synthetic_controls(task: str) -> None:
    settings = AnalysisParams(reference="kd", controls=["ls_matched", "shuffled_dk"], n_boot=500)
    rows = analyse(table_of(synthetic_rows(task=task)), settings).verdicts
    assert {(r["control"], r["alpha"]) for r in rows} == {
        (c, a) for c in ("ls_matched", "shuffled_dk") for a in (0.02, 0.1, 1.0)
    }
    assert _by(rows, "ls_matched", 0.02)["verdict"] == "matches"  # identical scores
    short = _by(rows, "shuffled_dk", 0.02)
    assert short["verdict"] == "falls short" and short["advantage"] > 0 and short["paired"]
    assert _by(rows, "shuffled_dk", 1.0)["verdict"] == "matches"  # the gap closes at α=1


def test_a_control_better_than_the_reference_exceeds_it() -> None:
    rows = synthetic_rows(methods={"kd", "ls_matched"})
    for r in rows:
        if r["method"] == "ls_matched":
            r["test_acc"] += 0.05
    settings = AnalysisParams(reference="kd", controls=["ls_matched"], n_boot=500)
    (v, *_) = analyse(table_of(rows), settings).verdicts
    assert v["verdict"] == "exceeds" and v["advantage"] == pytest.approx(-0.05)


def test_hypothesis_assessment_reads_the_verdicts() -> None:
    an = analyse(table_of(synthetic_rows()), SETTINGS)
    h = hypothesis_assessment(an.verdicts)
    assert h["controls"] == ["ls_matched", "shuffled_dk"]  # top1_teacher is not an LS control
    assert h["tested_alphas"] == [0.02, 0.1, 1.0]
    # shuffled_dk falls short at small α but ls_matched matches there, so neither explanation
    # holds at every α; only at α=1 do both controls match
    assert h["label_smoothing"] == {"supported_at": [1.0], "verdict": "partly supported"}
    assert h["dark_knowledge"]["supported_at"] == []
    assert h["dark_knowledge"]["verdict"] == "not supported"
    assert h["dark_knowledge"]["largest_shortfall_alpha"] == 0.02
    assert h["dark_knowledge"]["largest_at_smallest_alpha"]


# --- tables, variants, summaries ----------------------------------------------------------------


def test_variants_label_temperature_sweeps_only() -> None:
    runs = Runs.from_table(table_of(synthetic_rows()))
    v = runs.variants()
    assert "kd_tau(τ=1)" in v and "kd_tau(τ=16)" in v and "kd" in v and "kd_tau" not in v


def test_summarize_groups_by_variant_and_alpha() -> None:
    summary = analyse(table_of(synthetic_rows()), AnalysisParams(n_boot=500)).summary
    by = {(r["variant"], r["alpha"]): r for r in summary}
    ce = by[("ce", 0.1)]
    assert ce["n"] == 3 and ce["score_name"] == "test_acc"
    assert ce["mean"] == pytest.approx(synthetic_acc("ce", None, None, 0.1, 1))
    assert ce["std"] == pytest.approx(0.004)
    assert ce["ci_low"] < ce["mean"] < ce["ci_high"]
    assert ce["agreement"] == pytest.approx(ce["mean"]) and ce["neg_kl_frac"] is None
    assert ("kd_tau(τ=16)", 0.1) not in by and ("kd_tau(τ=16)", 1.0) in by


def test_summarize_uses_perplexity_for_language_models() -> None:
    table = table_of(synthetic_rows(task="lm", methods={"ce"}))
    summary = analyse(table, AnalysisParams(n_boot=100)).summary
    assert {r["score_name"] for r in summary} == {"test_ppl"}
    assert summary[0]["mean"] == pytest.approx(100 * (1 - synthetic_acc("ce", None, None, 0.02, 1)))


def test_mixed_tasks_are_refused() -> None:
    rows = [run_row(), run_row(task="lm", test_ppl=10.0)]
    with pytest.raises(KdsweepError, match="mix tasks"):
        Runs.from_table(table_of(rows))


def test_reference_with_several_taus_resolves_to_the_best() -> None:
    runs = Runs.from_table(table_of(synthetic_rows(methods={"ce", "kd_tau"})))
    assert runs.resolve("kd_tau") == "kd_tau(τ=16)"  # 0.01 below kd vs 0.03 for τ=1
    assert runs.resolve("kd_tau(τ=1)") == "kd_tau(τ=1)"
    assert runs.resolve("kd") is None


def test_summary_metrics_are_json_and_carry_the_headline_numbers() -> None:
    m = summary_metrics(table_of(synthetic_rows()), SETTINGS)
    json.dumps(m, allow_nan=False)
    assert m["n_runs"] == len(synthetic_rows())
    assert m["acc"]["ce"]["0.1"] == round(synthetic_acc("ce", None, None, 0.1, 1), 5)
    assert m["relative_gain"]["0.02"] > 0
    # KD at α=1 beats every CE point: censored at max(α)/α = 1
    assert m["multiplier"]["1"] == 1.0 and m["multiplier"]["0.02"] > 1
    assert set(m["multiplier"]) == {"0.02", "0.1", "1", "median", "median_is_lower_bound"}
    assert m["multiplier"]["median_is_lower_bound"] is True  # the censored 1.0 is the smallest
    assert m["advantage_over_control"]["shuffled_dk"]["0.02"] > 0.05


def test_multiplier_rows_flag_censored_and_clamped() -> None:
    rows = synthetic_rows(methods={"ce", "kd"})
    for r in rows:
        if r["method"] == "kd" and r["alpha"] == 0.02:
            r["test_acc"] -= 0.3  # worse than CE at the smallest α: α* clamped to 0.02
    m = {x["alpha"]: x for x in analyse(table_of(rows), SETTINGS).multipliers}
    assert m[0.02]["clamped"] and not m[0.02]["censored"]
    assert m[0.02]["multiplier"] == pytest.approx(1.0)
    assert m[1.0]["censored"] and not m[1.0]["clamped"]
    assert not m[0.1]["censored"] and not m[0.1]["clamped"] and m[0.1]["multiplier"] > 1


def test_summary_metrics_without_the_baseline() -> None:
    m = summary_metrics(table_of(synthetic_rows(methods={"kd"})), SETTINGS)
    assert set(m) == {"n_runs", "acc"}


def test_analysis_params_defaults_and_bounds() -> None:
    s = AnalysisParams()
    assert (s.baseline, s.reference, s.controls) == ("ce", "kd", [])
    assert (s.n_boot, s.ci, s.seed) == (2000, 0.95, 0)
    for bad in ({"ci": 1.0}, {"ci": 0.0}, {"n_boot": 0}, {"n_bootstrap": 10}):
        with pytest.raises(ValidationError):
            AnalysisParams(**bad)


def test_analyse_follows_its_settings() -> None:
    table = table_of(synthetic_rows(methods={"ce", "kd", "shuffled_dk"}))
    an = analyse(table, SETTINGS)
    assert (an.baseline, an.reference) == ("ce", "kd")
    assert {v["control"] for v in an.verdicts} == {"shuffled_dk"}
    # swapping the roles turns the gain around; no control listed means no verdicts
    swapped = analyse(table, AnalysisParams(baseline="kd", reference="ce"))
    assert swapped.verdicts == []
    gain = {g["alpha"]: g["gain"] for g in an.gains}
    for g in swapped.gains:
        assert g["gain"] < 0 < gain[g["alpha"]]
    # a narrower interval at a lower confidence level
    narrow = analyse(table, AnalysisParams(**SETTINGS.model_dump() | {"ci": 0.5}))
    for wide_row, narrow_row in zip(an.summary, narrow.summary, strict=True):
        assert (
            wide_row["ci_high"] - wide_row["ci_low"] > narrow_row["ci_high"] - narrow_row["ci_low"]
        )


# --- collecting runs ---------------------------------------------------------------------------


def test_collect_runs_and_parquet_round_trip(tmp_path: Path) -> None:
    rows = synthetic_rows(methods={"ce", "kd", "kd_top2"})
    stages = write_students(tmp_path / "students", rows)
    assert stages == ["labels", "full", "top2"]
    table = collect_runs(tmp_path / "students", stages[::-1])
    assert table.schema == RUN_SCHEMA and table.num_rows == len(rows)
    # stages are read in the order given, each stage's rows in file order
    methods = table.column("method").to_pylist()
    assert methods == ["kd_top2"] * 6 + ["kd"] * 9 + ["ce"] * 9
    out = tmp_path / "results" / "runs.parquet"
    write_parquet(table, out)
    assert read_runs(out).equals(table)
    assert [p.name for p in out.parent.iterdir()] == ["runs.parquet"]  # no temp file left


def test_collect_runs_reads_only_the_stages_it_is_given(tmp_path: Path) -> None:
    stages = write_students(tmp_path, synthetic_rows(methods={"ce", "kd"}))
    (tmp_path / "removed_store").mkdir()  # left behind by a store no longer in params.yaml
    (tmp_path / "removed_store" / "runs.json").write_text(json.dumps([run_row(run_id="stale")]))
    table = collect_runs(tmp_path, stages)
    assert "stale" not in table.column("run_id").to_pylist()
    assert collect_runs(tmp_path, ["labels"]).num_rows == 9
    with pytest.raises(KdsweepError, match=r"top3/runs\.json'\] are missing: run `dvc repro`"):
        collect_runs(tmp_path, [*stages, "top3"])


def test_collect_runs_names_the_file_and_the_missing_key(tmp_path: Path) -> None:
    rows = synthetic_rows(methods={"ce"})
    del rows[-1]["test_kl"]
    stages = write_students(tmp_path, rows)
    with pytest.raises(
        KdsweepError, match=r"labels/runs\.json: row 8 is missing key\(s\) \['test_kl'\]"
    ):
        collect_runs(tmp_path, stages)


def test_collect_runs_names_an_unexpected_key_and_a_bad_type(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "runs.json").write_text(json.dumps([run_row(extra=1)]))
    with pytest.raises(KdsweepError, match=r"unexpected key\(s\) \['extra'\]"):
        collect_runs(tmp_path, ["a"])
    (tmp_path / "a" / "runs.json").write_text(json.dumps([run_row(test_acc="high")]))
    with pytest.raises(KdsweepError, match="a/runs.json: a value has the wrong type"):
        collect_runs(tmp_path, ["a"])


def test_collect_runs_without_runs_fails_clearly(tmp_path: Path) -> None:
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "runs.json").write_text("[]")
    with pytest.raises(KdsweepError, match="no student runs"):
        collect_runs(tmp_path, ["labels"])
    with pytest.raises(KdsweepError, match="no student runs"):
        collect_runs(tmp_path, [])


def test_read_runs_refuses_a_stale_file(tmp_path: Path) -> None:
    write_parquet(table_of([run_row()]).drop_columns(["ece"]), tmp_path / "r.parquet")
    with pytest.raises(KdsweepError, match=r"lacks column\(s\) \['ece'\]"):
        read_runs(tmp_path / "r.parquet")


def test_hypothesis_assessment_when_the_shortfall_peaks_at_a_larger_alpha() -> None:
    rows = synthetic_rows(methods={"kd", "ls_matched", "shuffled_dk"})
    for r in rows:
        if r["method"] in ("ls_matched", "shuffled_dk") and r["alpha"] == 0.1:
            r["test_acc"] -= 0.2
    h = hypothesis_assessment(analyse(table_of(rows), SETTINGS).verdicts)
    dk = h["dark_knowledge"]
    assert dk["supported_at"] == [0.1] and dk["verdict"] == "partly supported"
    assert dk["largest_shortfall_alpha"] == 0.1 and not dk["largest_at_smallest_alpha"]
