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
    ci=0.95,
)


def run_row(**kw: Any) -> dict[str, Any]:
    """A complete runs.json row; keyword arguments override the defaults."""
    row: dict[str, Any] = {k: None for k in RUN_SCHEMA.names}
    row |= {
        "run_id": "r",
        "dataset": "mnist1d",
        "task": "vision",
        "teacher_arch": "cnn1d",
        "teacher_width": 64,
        "teacher_params": 40_000,
        "student": "small",
        "student_arch": "cnn1d",
        "student_width": 16,
        "student_params": 2_500,
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
    # verdict(p of the difference, advantage, TOST p, level, n, harmful)
    assert verdict(0.01, 0.03, 0.3, 0.05, 5) == "falls short"
    assert verdict(0.01, -0.03, 0.3, 0.05, 5) == "exceeds"
    assert verdict(0.6, 0.001, 0.01, 0.05, 5) == "matches"
    # no difference shown and equivalence not shown: too noisy to tell
    assert verdict(0.6, 0.001, 0.4, 0.05, 5) == "inconclusive"
    # significant but within the margin: equivalent for the question asked
    assert verdict(0.01, 0.002, 0.01, 0.05, 5) == "matches"
    assert verdict(0.01, 0.03, 0.01, 0.05, 1) == "undetermined (n<2)"
    # a control below the baseline is harmful, whatever else holds
    assert verdict(0.01, 0.03, 0.3, 0.05, 5, harmful=True) == "harmful"
    assert verdict(0.6, 0.0, 0.01, 0.05, 5, harmful=True) == "harmful"


def _by(
    rows: list[dict[str, Any]], control: str, alpha: float, role: str | None = None
) -> dict[str, Any]:
    """The one comparison of `control` at α (with `role`, or the control's row against KD)."""
    roles = {role} if role else {"control", "context"}
    (r,) = [
        r for r in rows if r["control"] == control and r["alpha"] == alpha and r["role"] in roles
    ]
    return r


@pytest.mark.parametrize("task", ["vision", "lm"])
def test_verdicts_on_synthetic_controls(task: str) -> None:
    margin = 0.01 if task == "vision" else 1.0  # accuracy, or perplexity (100·(1 − acc))
    settings = AnalysisParams(
        controls=["ls_matched", "shuffled_dk"],
        equivalence_margin=margin,
        equivalence_fraction=None,
    )
    rows = analyse(table_of(synthetic_rows(task=task)), settings).verdicts
    assert {(r["control"], r["reference"], r["role"]) for r in rows if r["alpha"] == 0.02} == {
        ("ls_matched", "kd", "control"),
        ("ls_matched", "kd", "structure"),
        ("shuffled_dk", "kd", "context"),
        ("shuffled_dk", "ls_matched", "fake_vs_none"),
    }
    same = _by(rows, "ls_matched", 0.02)  # the same mean, own noise: equivalent within ±margin
    assert same["verdict"] == "matches" and same["p_equivalent"] < 0.05
    short = _by(rows, "shuffled_dk", 0.02)
    assert short["verdict"] == "falls short" and short["advantage"] > 0 and short["paired"]
    assert short["share"] == pytest.approx(1 - 0.085 / 0.1305, abs=0.05)
    assert short["share_low"] < short["share"] < short["share_high"]
    assert _by(rows, "shuffled_dk", 1.0)["verdict"] == "matches"  # the gap closes at α=1
    assert all(r["gain_significant"] for r in rows)
    assert {r["hypothesis"] for r in rows if r["control"] == "shuffled_dk"} == {
        None,  # against KD: context only
        "dark_knowledge",  # against ls_matched: fake structure against none
    }


def test_too_noisy_a_control_is_inconclusive_not_a_match() -> None:
    rows = synthetic_rows(methods={"ce", "kd", "ls_matched"})
    rng = np.random.default_rng(0)
    for r in rows:
        if r["method"] == "ls_matched":
            r["test_acc"] += rng.normal(0, 0.05)
    settings = AnalysisParams(controls=["ls_matched"])
    verdicts = analyse(table_of(rows), settings).verdicts
    for v in verdicts:
        assert v["ci_low"] < 0 < v["ci_high"]  # the old reading: "matches"
        assert v["verdict"] == "inconclusive"


def test_a_control_better_than_the_reference_exceeds_it() -> None:
    rows = synthetic_rows(methods={"kd", "ls_matched"})
    for r in rows:
        if r["method"] == "ls_matched":
            r["test_acc"] += 0.05
    settings = AnalysisParams(reference="kd", controls=["ls_matched"])
    (v, *_) = analyse(table_of(rows), settings).verdicts
    assert v["verdict"] == "exceeds" and v["advantage"] == pytest.approx(-0.05, abs=0.01)
    assert v["share"] is None and not v["gain_significant"]  # no ce: no gain to share


def test_controls_are_read_only_where_kds_gain_is_significant() -> None:
    rows = synthetic_rows(methods={"ce", "kd", "ls"})
    for r in rows:
        if r["method"] == "kd" and r["alpha"] == 0.1:  # KD no better than CE at α=0.1
            r["test_acc"] = synthetic_acc("ce", None, None, 0.1, r["subset_seed"])
    an = analyse(table_of(rows), SETTINGS)
    v = _by(an.verdicts, "ls", 0.1)
    assert not v["gain_significant"] and v["share"] is None
    assert not next(g for g in an.gains if g["alpha"] == 0.1)["significant"]
    assert an.hypotheses["label_smoothing"]["tested_alphas"] == [0.02, 1.0]


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
    an = analyse(
        table_of(synthetic_rows()), SETTINGS.model_copy(update={"equivalence_fraction": None})
    )
    h = an.hypotheses
    assert h == hypothesis_assessment(an.verdicts, an.contrasts)
    assert set(h) == {"label_smoothing", "confidence", "dark_knowledge"}
    # ls recovers a fixed +0.005 of a gain that fades from 0.13 to 0.02: it falls short of KD
    # at every α, so universal smoothing does not explain KD's gain
    ls = h["label_smoothing"]
    assert ls["controls"] == ["ls"] and ls["tested_alphas"] == [0.02, 0.1, 1.0]
    assert ls["refuted_at"] == [0.02, 0.1, 1.0] and ls["verdict"] == "refuted"
    # ls_matched (the teacher's per-sample confidence, no structure) matches KD everywhere
    conf = h["confidence"]
    assert conf["supported_at"] == [0.02, 0.1, 1.0] and conf["verdict"] == "supported"
    # so the class structure adds nothing to the same confidence: dark knowledge is refuted,
    # although shuffled_dk falls short of KD at small α (that gap is the harm of a wrong
    # structure: shuffled_dk falls short of ls_matched too)
    dk = h["dark_knowledge"]
    assert dk["refuted_at"] == [0.02, 0.1, 1.0] and dk["verdict"] == "refuted"
    assert _by(an.verdicts, "shuffled_dk", 0.02)["verdict"] == "falls short"
    assert _by(an.verdicts, "shuffled_dk", 0.02, "fake_vs_none")["verdict"] == "falls short"
    assert dk["mean_share"] == pytest.approx(conf["mean_share"])  # ls_matched's share of KD's
    assert dk["most_at_small_alpha"] is False  # tested (shares at 3 α), nothing shown
    # top1_teacher tests no hypothesis
    assert all("top1_teacher" not in x["controls"] for x in h.values())


# --- tables, variants, summaries ----------------------------------------------------------------


def test_variants_label_temperature_sweeps_only() -> None:
    runs = Runs.from_table(table_of(synthetic_rows()))
    v = runs.variants()
    assert "kd_tau(τ=1)" in v and "kd_tau(τ=16)" in v and "kd" in v and "kd_tau" not in v


def test_summarize_groups_by_variant_and_alpha() -> None:
    summary = analyse(table_of(synthetic_rows()), AnalysisParams()).summary
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
    summary = analyse(table, AnalysisParams()).summary
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
    an = analyse(table_of(rows), AnalysisParams(reference="kd_tau", select="global"))
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
    assert m["advantage_over_control"]["shuffled_dk vs kd"]["0.02"] > 0.05
    assert 0.2 < m["share_of_gain"]["shuffled_dk vs kd"]["0.02"] < 0.5
    assert m["share_of_gain"]["ls_matched vs kd [confidence]"]["1"] == pytest.approx(1, abs=0.3)
    assert m["verdict"]["shuffled_dk vs ls_matched [dark_knowledge]"]["0.02"] == "falls short"


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
    assert (s.ci, s.equivalence_margin) == (0.95, 0.01)
    assert (s.select, s.equivalence_fraction) == ("per_alpha", 0.1)
    bad_settings = (
        {"ci": 1.0},
        {"ci": 0.0},
        {"n_boot": 100},  # nothing resamples: no bootstrap size
        {"equivalence_margin": 0},
        {"equivalence_fraction": 0},
        {"equivalence_fraction": 1.0},
        {"select": "best"},
    )
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
    an = analyse(table_of(rows), SETTINGS)
    h = an.hypotheses
    dk = h["dark_knowledge"]
    # ls_matched falls short of KD only at α=0.1: the structure adds there, not at 0.02
    assert dk["supported_at"] == [0.1] and dk["refuted_at"] == [0.02]
    assert dk["verdict"] == "partly supported"
    # the share missing is larger at 0.1 than at 0.02: "most at small α" is not printed
    (c,) = [
        c for c in an.contrasts if c["hypothesis"] == "dark_knowledge" and c["large_alpha"] == 0.1
    ]
    assert c["difference"] > 0 and c["ci_low"] > 0
    assert dk["most_at_small_alpha"] is False
    assert h["confidence"]["refuted_at"] == [0.1]


# --- the reading rules of issue #23, on default-shaped worlds ----------------------------------


def world(
    means: dict[tuple[str, str, float | None], dict[float, float]],
    seeds: int = 5,
    sd_subset: float = 0.02,
    sd_own: float = 0.01,
    val: dict[tuple[str, str, float | None], dict[float, float]] | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Students of (method, loss, τ) with the given mean test accuracy per α (`val`: their
    validation accuracy where it differs), 5 nested-subset seeds: a subset effect per seed and
    α shared by every method, plus each student's own noise."""
    rng = np.random.default_rng(seed)
    alphas = sorted({a for m in means.values() for a in m})
    subset = {a: rng.normal(0, sd_subset, seeds) for a in alphas}
    rows = []
    for (method, loss, tau), by_alpha in means.items():
        for alpha, mean in by_alpha.items():
            for s in range(seeds):
                acc = mean + subset[alpha][s] + rng.normal(0, sd_own)
                v = acc + ((val or {}).get((method, loss, tau), {}).get(alpha, mean) - mean)
                rows.append(
                    run_row(
                        run_id=f"{method}-{tau}-{alpha}-{s}",
                        method=method,
                        loss=loss,
                        tau=tau,
                        lam=None if loss == "ce" else 1.0,
                        cache_kind=None if loss == "ce" else "full",
                        cache_name=None if loss == "ce" else "full",
                        alpha=alpha,
                        subset_seed=s,
                        test_acc=acc,
                        val_acc=v,
                    )
                )
    return rows


CE = {0.02: 0.367, 0.2: 0.852, 1.0: 0.910}
KD20 = {0.02: 0.681, 0.2: 0.848, 1.0: 0.853}
KD4 = {0.02: 0.546, 0.2: 0.865, 1.0: 0.883}
DEFAULTISH = {("ce", "ce", None): CE, ("kd", "kd", 20.0): KD20, ("kd", "kd", 4.0): KD4}
READ = AnalysisParams(controls=["ls", "ls_teacher", "ls_matched", "shuffled_dk"])


def test_tau_is_selected_per_alpha_on_validation_and_globally_on_request() -> None:
    an = analyse(table_of(world(DEFAULTISH)), READ)
    assert an.reference == "kd(τ per α)"
    chosen = {t["alpha"]: t["chosen_tau"] for t in an.taus}
    assert chosen == {0.02: 20.0, 0.2: 4.0, 1.0: 4.0}  # τ 20 wins only at the smallest α
    assert {t["global"] for t in an.taus} == {"kd(τ=20)"}  # the mean over α: τ 20
    gains = {g["alpha"]: g for g in an.gains}
    assert gains[1.0]["reference"] == "kd(τ=4)"
    assert gains[1.0]["gain"] == pytest.approx(KD4[1.0] / CE[1.0] - 1, abs=0.01)
    mult = {m["alpha"]: m for m in an.multipliers}
    assert mult[0.2]["reference"] == "kd(τ=4)" and mult[0.2]["multiplier"] > 1
    # the selection reads validation, not test: swap the validation ranking at α=0.2
    val = {("kd", "kd", 20.0): {0.2: 0.90}}
    flipped = analyse(table_of(world(DEFAULTISH, val=val)), READ)
    assert {t["alpha"]: t["chosen_tau"] for t in flipped.taus}[0.2] == 20.0
    # one τ for every α
    glob = analyse(table_of(world(DEFAULTISH)), READ.model_copy(update={"select": "global"}))
    assert glob.reference == "kd(τ=20)"
    assert {g["reference"] for g in glob.gains} == {"kd(τ=20)"}
    assert {t["chosen"] for t in glob.taus} == {"kd(τ=20)"}


def test_global_selection_without_a_shared_alpha_is_refused() -> None:
    rows = world({("kd", "kd", 20.0): {0.02: 0.68}, ("kd", "kd", 4.0): {1.0: 0.88}})
    with pytest.raises(KdsweepError, match="share no α"):
        Runs.from_table(table_of(rows)).resolve("kd")
    per = Runs.from_table(table_of(rows)).select("kd")
    assert per == {0.02: "kd(τ=20)", 1.0: "kd(τ=4)"}


def _controls(at_tau: float) -> dict[tuple[str, str, float | None], dict[float, float]]:
    """Default-shaped controls at α 0.02 and 1 (gain of KD τ=20 at 0.02: 0.314): ls_teacher
    significantly below CE (harmful), ls about CE, ls_matched 45% of the gain, shuffled_dk
    below CE (a wrong structure hurts)."""
    gain = KD20[0.02] - CE[0.02]
    return {
        ("ls", "ls", None): {0.02: CE[0.02] + 0.01, 1.0: CE[1.0]},
        ("ls_teacher", "ls_teacher", at_tau): {0.02: CE[0.02] - 0.06, 1.0: CE[1.0] - 0.03},
        ("ls_matched", "ls_matched", at_tau): {0.02: CE[0.02] + 0.45 * gain, 1.0: 0.88},
        ("shuffled_dk", "shuffled_dk", at_tau): {0.02: CE[0.02] - 0.05, 1.0: 0.85},
    }


def test_a_harmful_control_supports_nothing_and_dark_knowledge_reads_ls_matched() -> None:
    an = analyse(table_of(world(DEFAULTISH | _controls(20.0))), READ)
    lt = _by(an.verdicts, "ls_teacher", 0.02)
    assert lt["reference"] == "kd(τ=20)" and lt["harmful"] and lt["verdict"] == "harmful"
    assert lt["vs_base_high"] < 0
    h = an.hypotheses
    assert h["label_smoothing"]["outcomes"] == {0.02: "refuted"}  # falls short + harmful
    assert ("ls_teacher", 0.02) in h["label_smoothing"]["harmful"]
    # shuffled_dk is below CE: harmful against KD, and it falls short of ls_matched (fake
    # structure against none) — neither is what decides dark knowledge
    assert _by(an.verdicts, "shuffled_dk", 0.02)["verdict"] == "harmful"
    fake = _by(an.verdicts, "shuffled_dk", 0.02, "fake_vs_none")
    assert fake["reference"] == "ls_matched" and fake["verdict"] == "falls short"
    # KD beats ls_matched (the same confidence without the structure): supported at 0.02
    structure = _by(an.verdicts, "ls_matched", 0.02, "structure")
    assert structure["verdict"] == "falls short" and structure["share"] == pytest.approx(
        0.45, abs=0.1
    )
    assert h["dark_knowledge"]["outcomes"] == {0.02: "supported"}
    # KD (τ=4, selected at α=1) is worse than CE at 1: only α=0.02 is read, so "most at small
    # α" cannot be tested
    assert not next(g for g in an.gains if g["alpha"] == 1.0)["significant"]
    assert h["dark_knowledge"]["tested_alphas"] == [0.02]
    assert h["dark_knowledge"]["most_at_small_alpha"] is None and an.contrasts == []


def test_a_harmful_ls_matched_cannot_support_dark_knowledge() -> None:
    means = DEFAULTISH | _controls(20.0)
    means[("ls_matched", "ls_matched", 20.0)] = {0.02: CE[0.02] - 0.06}
    an = analyse(table_of(world(means)), READ)
    structure = _by(an.verdicts, "ls_matched", 0.02, "structure")
    assert structure["advantage"] > 0.3 and structure["verdict"] == "harmful"
    assert an.hypotheses["dark_knowledge"]["outcomes"] == {0.02: "inconclusive"}


def test_most_at_small_alpha_needs_a_significant_difference_of_shares() -> None:
    # KD's gain significant at 0.02 and 0.2; ls_matched recovers 30% at 0.02, 90% at 0.2
    ce = {0.02: 0.367, 0.2: 0.80}
    kd = {0.02: 0.681, 0.2: 0.86}
    lsm = {a: ce[a] + share * (kd[a] - ce[a]) for a, share in ((0.02, 0.3), (0.2, 0.9))}
    means = {("ce", "ce", None): ce, ("kd", "kd", 20.0): kd}
    means[("ls_matched", "ls_matched", 20.0)] = lsm
    an = analyse(table_of(world(means, sd_own=0.005)), READ)
    dk = an.hypotheses["dark_knowledge"]
    assert dk["tested_alphas"] == [0.02, 0.2]
    (c,) = dk["alpha_contrasts"]
    assert c["difference"] == pytest.approx(-0.6, abs=0.1) and c["ci_high"] < 0
    assert dk["most_at_small_alpha"] is True
    # the same shares at both α: tested, not shown
    lsm_flat = {a: ce[a] + 0.5 * (kd[a] - ce[a]) for a in ce}
    flat_world = world(means | {("ls_matched", "ls_matched", 20.0): lsm_flat}, seed=1)
    flat = analyse(table_of(flat_world), READ)
    assert flat.hypotheses["dark_knowledge"]["most_at_small_alpha"] is False


def test_a_missing_seed_is_reported_and_the_rest_stay_paired() -> None:
    rows = world(DEFAULTISH | _controls(20.0))
    rows = [
        r
        for r in rows
        if not (r["method"] == "ls_matched" and r["alpha"] == 0.02 and r["subset_seed"] == 3)
    ]
    an = analyse(table_of(rows), READ)
    v = _by(an.verdicts, "ls_matched", 0.02)
    assert v["paired"] and v["n_pairs"] == 4 and v["missing"] == [(3, 0)]
    assert v["n_control"] == 4 and v["n_ref"] == 5 and v["share"] is not None
    # the others keep all five seeds
    assert (
        _by(an.verdicts, "ls", 0.02)["n_pairs"] == 5
        and _by(an.verdicts, "ls", 0.02)["missing"] == []
    )


def test_holm_adjusts_within_a_hypothesis_and_alpha() -> None:
    an = analyse(table_of(world(DEFAULTISH | _controls(20.0))), READ)
    ls_family = [
        v for v in an.verdicts if v["hypothesis"] == "label_smoothing" and v["alpha"] == 0.02
    ]
    assert {v["family_size"] for v in ls_family} == {2}
    for v in ls_family:
        assert v["p_diff_holm"] >= v["p_diff"] and v["p_equivalent_holm"] >= v["p_equivalent"]
    smallest = min(ls_family, key=lambda v: v["p_diff"])
    assert smallest["p_diff_holm"] == pytest.approx(min(1.0, 2 * smallest["p_diff"]))


def test_the_equivalence_margin_is_a_fraction_of_the_gain_and_says_the_seeds_a_match_needs() -> (
    None
):
    means = DEFAULTISH | {("ls_matched", "ls_matched", 20.0): {0.02: KD20[0.02] - 0.005}}
    an = analyse(table_of(world(means, sd_own=0.03)), READ)
    v = _by(an.verdicts, "ls_matched", 0.02)
    gain = v["ref_mean"] - np.mean(
        [
            r["test_acc"]
            for r in world(means, sd_own=0.03)
            if r["method"] == "ce" and r["alpha"] == 0.02
        ]
    )
    assert v["margin"] == pytest.approx(0.1 * gain, rel=1e-6)
    # paired SD ~0.04 against a margin ~0.03: no match at 5 seeds, and the report can say
    # how many seeds one would need
    assert v["verdict"] == "inconclusive" and v["n_for_match"] > 5
    precise = analyse(table_of(world(means, sd_own=0.002)), READ)
    w = _by(precise.verdicts, "ls_matched", 0.02)
    assert w["verdict"] == "matches" and w["n_for_match"] <= 5
