"""kdsweep.analysis on hand-made numbers whose right answers are known."""

from __future__ import annotations

import json
import math
import zlib
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

SETTINGS = AnalysisParams(
    baseline="ce",
    reference="kd",
    controls=["ls", "ls_matched", "shuffled_dk", "top1_teacher"],
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
        "val_curve_steps": [5, 10],
        "val_curve": [1.0, 0.8],
        "n_val": 10,
        "val_acc": 0.5,
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
    fading to +0.02 at α=1 (so it beats every CE point there); ls recovers +0.005 of it,
    ls_matched matches KD, shuffled_dk falls short by 0.1 at small α, top-k loses a little per
    missing entry. Each seed shifts every method alike (its subset), plus a student's own noise
    (sd 0.002, fixed per student)."""
    x = (math.log10(alpha) + 2) / 2  # 0 at α=0.01, 1 at α=1
    ce = 0.5 + 0.4 * x
    kd = ce + 0.15 - 0.13 * x
    acc = {
        "ce": ce,
        "ls": ce + 0.005,
        "kd": kd,
        "ls_matched": kd,
        "shuffled_dk": kd - 0.1 * (1 - x),
        "top1_teacher": ce + 0.02,
        "kd_tau": kd - (0.03 if tau == 1.0 else 0.01),
        "logit_mse": kd - 0.005,
    }.get(method, kd - 0.02 / (k or 1))
    noise = np.random.default_rng(zlib.crc32(repr((method, tau, k, alpha, seed)).encode()))
    return acc + 0.004 * (seed - 1) + 0.002 * noise.standard_normal()


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
                score = (
                    {"test_acc": acc, "val_acc": acc}
                    if task == "vision"
                    else {"test_ppl": 100 * (1 - acc), "val_ppl": 100 * (1 - acc)}
                )
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
                        val_curve_steps=[5, 10],
                        val_curve=[2.5 - acc, 2.0 - 1.5 * acc],
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


# --- controls, verdicts and hypotheses ----------------------------------------------------------


def test_verdict_needs_equivalence_to_match() -> None:
    assert verdict(0.01, 0.05, 0.3, 0.95, 5) == "falls short"
    assert verdict(-0.05, -0.01, 0.3, 0.95, 5) == "exceeds"
    assert verdict(-0.003, 0.004, 0.01, 0.95, 5) == "matches"
    # the interval contains 0 but equivalence is not shown: too noisy to tell
    assert verdict(-0.05, 0.05, 0.4, 0.95, 5) == "inconclusive"
    # significant but within the margin: equivalent for the question asked
    assert verdict(0.001, 0.004, 0.01, 0.95, 5) == "matches"
    assert verdict(0.01, 0.05, 0.01, 0.95, 1) == "undetermined (n<2)"


def _by(rows: list[dict[str, Any]], control: str, alpha: float) -> dict[str, Any]:
    (r,) = [r for r in rows if r["control"] == control and r["alpha"] == alpha]
    return r


@pytest.mark.parametrize("task", ["vision", "lm"])
def test_verdicts_on_synthetic_controls(task: str) -> None:
    margin = 0.01 if task == "vision" else 1.0  # accuracy, or perplexity (100·(1 − acc))
    settings = AnalysisParams(
        controls=["ls_matched", "shuffled_dk"], n_boot=100, equivalence_margin=margin
    )
    rows = analyse(table_of(synthetic_rows(task=task)), settings).verdicts
    assert {(r["control"], r["alpha"]) for r in rows} == {
        (c, a) for c in ("ls_matched", "shuffled_dk") for a in (0.02, 0.1, 1.0)
    }
    same = _by(rows, "ls_matched", 0.02)  # the same mean, own noise: equivalent within ±margin
    assert same["verdict"] == "matches" and same["p_equivalent"] < 0.05
    short = _by(rows, "shuffled_dk", 0.02)
    assert short["verdict"] == "falls short" and short["advantage"] > 0 and short["paired"]
    assert short["share"] == pytest.approx(1 - 0.085 / 0.1305, abs=0.05)
    assert short["share_low"] < short["share"] < short["share_high"]
    assert _by(rows, "shuffled_dk", 1.0)["verdict"] == "matches"  # the gap closes at α=1
    assert all(r["gain_significant"] and r["hypothesis"] for r in rows)


def test_too_noisy_a_control_is_inconclusive_not_a_match() -> None:
    rows = synthetic_rows(methods={"ce", "kd", "ls_matched"})
    rng = np.random.default_rng(0)
    for r in rows:
        if r["method"] == "ls_matched":
            r["test_acc"] += rng.normal(0, 0.05)
    settings = AnalysisParams(controls=["ls_matched"], n_boot=100)
    verdicts = analyse(table_of(rows), settings).verdicts
    for v in verdicts:
        assert v["ci_low"] < 0 < v["ci_high"]  # the old reading: "matches"
        assert v["verdict"] == "inconclusive"


def test_a_control_better_than_the_reference_exceeds_it() -> None:
    rows = synthetic_rows(methods={"kd", "ls_matched"})
    for r in rows:
        if r["method"] == "ls_matched":
            r["test_acc"] += 0.05
    settings = AnalysisParams(reference="kd", controls=["ls_matched"], n_boot=500)
    (v, *_) = analyse(table_of(rows), settings).verdicts
    assert v["verdict"] == "exceeds" and v["advantage"] == pytest.approx(-0.05, abs=0.01)
    assert v["share"] is None and not v["gain_significant"]  # no ce: no gain to share


def test_controls_are_read_only_where_kds_gain_is_significant() -> None:
    rows = synthetic_rows(methods={"ce", "kd", "shuffled_dk"})
    for r in rows:
        if r["method"] == "kd" and r["alpha"] == 0.1:  # KD no better than CE at α=0.1
            r["test_acc"] = synthetic_acc("ce", None, None, 0.1, r["subset_seed"])
    an = analyse(table_of(rows), SETTINGS)
    v = _by(an.verdicts, "shuffled_dk", 0.1)
    assert not v["gain_significant"] and v["share"] is None
    assert not next(g for g in an.gains if g["alpha"] == 0.1)["significant"]
    assert an.hypotheses["dark_knowledge"]["tested_alphas"] == [0.02, 1.0]


def test_a_control_is_compared_with_kd_at_its_own_tau() -> None:
    rows = synthetic_rows(methods={"ce", "kd_tau"}, alphas=(0.02, 1.0))
    for r in synthetic_rows(methods={"shuffled_dk"}, alphas=(0.02, 1.0)):
        for tau in (1.0, 16.0):
            rows.append(r | {"method": "shuffled_dk", "tau": tau, "run_id": f"{r['run_id']}{tau}"})
    an = analyse(table_of(rows), AnalysisParams(reference="kd_tau", controls=["shuffled_dk"]))
    refs = {(v["control"], v["reference"], v["same_tau"]) for v in an.verdicts}
    assert refs == {
        ("shuffled_dk(τ=1)", "kd_tau(τ=1)", True),
        ("shuffled_dk(τ=16)", "kd_tau(τ=16)", True),
    }


def test_hypothesis_assessment_reads_the_verdicts() -> None:
    an = analyse(table_of(synthetic_rows()), SETTINGS)
    h = an.hypotheses
    assert h == hypothesis_assessment(an.verdicts)
    assert set(h) == {"label_smoothing", "confidence", "dark_knowledge"}
    # ls recovers a fixed +0.005 of a gain that fades from 0.13 to 0.02: it falls short of KD
    # at every α, so universal smoothing does not explain KD's gain
    ls = h["label_smoothing"]
    assert ls["controls"] == ["ls"] and ls["tested_alphas"] == [0.02, 0.1, 1.0]
    assert ls["refuted_at"] == [0.02, 0.1, 1.0] and ls["verdict"] == "refuted"
    # ls_matched (the teacher's per-sample confidence, no structure) matches KD everywhere
    conf = h["confidence"]
    assert conf["supported_at"] == [0.02, 0.1, 1.0] and conf["verdict"] == "supported"
    # shuffled_dk falls short at small α (structure matters there) but not at α=1
    dk = h["dark_knowledge"]
    assert dk["supported_at"] == [0.02, 0.1] and dk["refuted_at"] == [1.0]
    assert dk["verdict"] == "partly supported"
    assert dk["largest_missing_alpha"] == 0.02 and dk["largest_at_smallest_alpha"]
    assert dk["mean_share"][0.02] < dk["mean_share"][0.1] < 0.6 < dk["mean_share"][1.0]
    # top1_teacher tests no hypothesis
    assert all("top1_teacher" not in x["controls"] for x in h.values())


# --- tables, variants, summaries ----------------------------------------------------------------


def test_variants_label_temperature_sweeps_only() -> None:
    runs = Runs.from_table(table_of(synthetic_rows()))
    v = runs.variants()
    assert "kd_tau(τ=1)" in v and "kd_tau(τ=16)" in v and "kd" in v and "kd_tau" not in v


def test_summarize_groups_by_variant_and_alpha() -> None:
    summary = analyse(table_of(synthetic_rows()), AnalysisParams(n_boot=500)).summary
    by = {(r["variant"], r["alpha"]): r for r in summary}
    ce = by[("ce", 0.1)]
    accs = [synthetic_acc("ce", None, None, 0.1, s) for s in (0, 1, 2)]
    assert ce["n"] == 3 and ce["score_name"] == "test_acc"
    assert ce["mean"] == pytest.approx(np.mean(accs))
    assert ce["std"] == pytest.approx(np.std(accs, ddof=1))
    half = 4.302652729911275 * ce["std"] / math.sqrt(3)  # Student t_{0.975, 2}
    assert (ce["ci_low"], ce["ci_high"]) == pytest.approx((ce["mean"] - half, ce["mean"] + half))
    assert ce["agreement"] == pytest.approx(ce["mean"]) and ce["neg_kl_frac"] is None
    assert ("kd_tau(τ=16)", 0.1) not in by and ("kd_tau(τ=16)", 1.0) in by


def test_summarize_uses_perplexity_for_language_models() -> None:
    table = table_of(synthetic_rows(task="lm", methods={"ce"}))
    summary = analyse(table, AnalysisParams(n_boot=100)).summary
    assert {r["score_name"] for r in summary} == {"test_ppl"}
    accs = [synthetic_acc("ce", None, None, 0.02, s) for s in (0, 1, 2)]
    assert summary[0]["mean"] == pytest.approx(100 * (1 - np.mean(accs)))


def test_mixed_tasks_are_refused() -> None:
    rows = [run_row(), run_row(task="lm", test_ppl=10.0)]
    with pytest.raises(KdsweepError, match="mix tasks"):
        Runs.from_table(table_of(rows))


def test_reference_with_several_taus_resolves_to_the_best_on_validation() -> None:
    rows = synthetic_rows(methods={"ce", "kd_tau"})
    runs = Runs.from_table(table_of(rows))
    assert runs.resolve("kd_tau") == "kd_tau(τ=16)"  # 0.01 below kd vs 0.03 for τ=1
    assert runs.resolve("kd_tau(τ=1)") == "kd_tau(τ=1)"
    assert runs.resolve("kd") is None
    # validation says τ=1, test says τ=16: the validation score decides
    for r in rows:
        if r["tau"] == 1.0:
            r["val_acc"] += 0.05
    assert Runs.from_table(table_of(rows)).resolve("kd_tau") == "kd_tau(τ=1)"
    an = analyse(table_of(rows), AnalysisParams(reference="kd_tau"))
    assert an.reference == "kd_tau(τ=1)" and an.gains[0]["reference"] == "kd_tau(τ=1)"


class GuardedRow(dict):
    """A run row that fails the test if selection reads a test score."""

    def __getitem__(self, key: str) -> Any:
        assert key not in ("score", "test_acc", "test_ppl", "test_error"), key
        return super().__getitem__(key)


def test_selection_never_reads_a_test_column() -> None:
    runs = Runs.from_table(table_of(synthetic_rows(methods={"ce", "kd_tau"})))
    guarded = Runs([GuardedRow(r) for r in runs.rows], "vision", "test_acc", "val_acc", True)
    assert guarded.resolve("kd_tau") == runs.resolve("kd_tau") == "kd_tau(τ=16)"
    with pytest.raises(AssertionError, match="score"):
        guarded.rows[0]["score"]  # the guard works


def test_selection_without_validation_scores_is_refused() -> None:
    rows = synthetic_rows(methods={"kd_tau"})
    rows[0]["val_acc"] = None
    with pytest.raises(KdsweepError, match="no val_acc: a temperature is selected on the valid"):
        Runs.from_table(table_of(rows)).resolve("kd_tau")


def test_summary_metrics_are_json_and_carry_the_headline_numbers() -> None:
    m = summary_metrics(table_of(synthetic_rows()), SETTINGS)
    json.dumps(m, allow_nan=False)
    assert m["n_runs"] == len(synthetic_rows())
    mean = np.mean([synthetic_acc("ce", None, None, 0.1, s) for s in (0, 1, 2)])
    assert m["acc"]["ce"]["0.1"] == round(mean, 5)
    assert m["relative_gain"]["0.02"] > 0
    # KD at α=1 beats every CE point: censored at max(α)/α = 1
    assert m["multiplier"]["1"] == 1.0 and m["multiplier"]["0.02"] > 1
    assert set(m["multiplier"]) == {"0.02", "0.1", "1", "median", "median_is_lower_bound"}
    assert m["multiplier"]["median_is_lower_bound"] is True  # the censored 1.0 is the smallest
    assert m["advantage_over_control"]["shuffled_dk"]["0.02"] > 0.05
    assert 0.2 < m["share_of_gain"]["shuffled_dk"]["0.02"] < 0.5
    assert m["share_of_gain"]["ls_matched"]["1"] == pytest.approx(1, abs=0.3)


def test_multiplier_rows_flag_censored_and_clamped_with_intervals() -> None:
    rows = synthetic_rows(methods={"ce", "kd"})
    for r in rows:
        if r["method"] == "kd" and r["alpha"] == 0.02:
            r["test_acc"] -= 0.3  # worse than CE at the smallest α: α* clamped to 0.02
    m = {x["alpha"]: x for x in analyse(table_of(rows), SETTINGS).multipliers}
    assert m[0.02]["clamped"] and not m[0.02]["censored"]
    assert m[0.02]["multiplier"] == pytest.approx(1.0)
    assert m[1.0]["censored"] and not m[1.0]["clamped"] and m[1.0]["ci_high_censored"]
    mid = m[0.1]
    assert not mid["censored"] and not mid["clamped"] and mid["multiplier"] > 1
    assert mid["ci_low"] <= mid["multiplier"] <= mid["ci_high"] and not mid["ci_high_censored"]


def test_summary_metrics_without_the_baseline() -> None:
    m = summary_metrics(table_of(synthetic_rows(methods={"kd"})), SETTINGS)
    assert set(m) == {"n_runs", "acc"}


def test_analysis_params_defaults_and_bounds() -> None:
    s = AnalysisParams()
    assert (s.baseline, s.reference, s.controls) == ("ce", "kd", [])
    assert (s.n_boot, s.ci, s.seed, s.equivalence_margin) == (2000, 0.95, 0, 0.01)
    bad_settings = ({"ci": 1.0}, {"ci": 0.0}, {"n_boot": 0}, {"equivalence_margin": 0})
    for bad in (*bad_settings, {"n_bootstrap": 10}):
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
    rows = synthetic_rows(methods={"ce", "kd", "ls_matched", "shuffled_dk"})
    for r in rows:
        if r["method"] in ("ls_matched", "shuffled_dk") and r["alpha"] == 0.1:
            r["test_acc"] -= 0.08
    h = analyse(table_of(rows), SETTINGS).hypotheses
    dk = h["dark_knowledge"]
    assert dk["supported_at"] == [0.02, 0.1] and dk["verdict"] == "partly supported"
    assert dk["largest_missing_alpha"] == 0.1 and not dk["largest_at_smallest_alpha"]
    assert (
        h["confidence"]["refuted_at"] == [0.1] and h["confidence"]["verdict"] == "partly supported"
    )
