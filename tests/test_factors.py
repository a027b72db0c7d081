"""Report by factor (issue #25): the primary (student, teacher) pair the main tables read, every
pair's gain, the By factor section and the `factors` metrics, on runs of two student
configurations × two teachers whose relative gains are known."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from kdsweep.analysis import (
    Primary,
    factor_metrics,
    factor_pairs,
    primary_table,
    summary_metrics,
)
from kdsweep.config import AnalysisParams, parse_params
from kdsweep.errors import KdsweepError
from kdsweep.report import write_report
from kdsweep.runs import read_runs, write_parquet
from tests.conftest import tiny_raw
from tests.test_analysis import run_row, table_of, write_students
from tests.test_report import _summary

REPO = Path(__file__).resolve().parents[1]
SETTINGS = AnalysisParams(baseline="ce", reference="kd", controls=["ls"])
ALPHAS = (0.02, 0.2, 1.0)
SEEDS = range(4)
STUDENTS = {"small": (8, 700), "same": (16, 2_500)}  # width, parameters
TEACHER = {"arch": "cnn1d", "width": 16, "params": 2_500}  # both teachers: `same` is identical
STORE = {"main": "full", "random_head": "random_head"}  # teacher → the store kd reads of it
GAIN = {  # kd's relative gain over ce per (student, teacher): disjoint for main, equal for the other
    ("small", "main"): 0.10,
    ("same", "main"): 0.03,
    ("small", "random_head"): -0.05,
    ("same", "random_head"): -0.05,
}
PRIMARY = Primary("small", {"ce": "full", "ls": "full", "kd": "full", "kd_top3": "top3"})


def _acc(student: str, alpha: float, seed: int, key: tuple[Any, ...], gain: float = 0.0) -> float:
    """ce rises with α (the wider student higher); a seed shifts every student alike (its
    subset); each student adds its own noise (sd 0.001)."""
    x = (math.log10(alpha) + 2) / 2
    ce = 0.55 + 0.15 * x + (0.05 if student == "same" else 0.0) + 0.01 * (seed - 1.5)
    noise = np.random.default_rng(zlib.crc32(repr(key).encode())).standard_normal()
    return ce * (1 + gain) + 0.001 * noise


def _row(student: str, method: str, alpha: float, seed: int, teacher: str | None = None, **kw):
    width, params = STUDENTS[student]
    store = kw.pop("cache_name", STORE.get(teacher or ""))
    key = (student, method, store, alpha, seed)
    acc = _acc(student, alpha, seed, key, kw.pop("gain", 0.0))
    t = {"arch": None, "width": None, "params": None} if teacher is None else TEACHER
    return run_row(
        run_id="-".join(map(str, key)),
        student=student,
        student_arch="cnn1d",
        student_width=width,
        student_params=params,
        teacher_id=teacher,
        teacher_arch=t["arch"],
        teacher_width=t["width"],
        teacher_params=t["params"],
        method=method,
        loss=kw.pop("loss", method),
        tau=4.0 if teacher else None,
        lam=1.0 if teacher else None,
        cache_name=store,
        cache_kind="topk" if store == "top3" else "full" if store else None,
        k=3 if store == "top3" else None,
        topk_mode="tail" if store == "top3" else None,
        alpha=alpha,
        subset_seed=seed,
        test_acc=acc,
        val_acc=acc,
        **kw,
    )


def runs(
    students: tuple[str, ...] = ("small", "same"),
    teachers: tuple[str, ...] = ("main", "random_head"),
) -> list[dict[str, Any]]:
    """ce of every student, kd of every student on every teacher's store, ls and kd_top3 (top-3
    store of `main`, α = 0.02) of `small` only."""
    rows = []
    for a in ALPHAS:
        for s in SEEDS:
            for st in students:
                rows.append(_row(st, "ce", a, s))
                rows += [_row(st, "kd", a, s, t, gain=GAIN[(st, t)]) for t in teachers]
            if "small" in students:
                rows.append(_row("small", "ls", a, s, gain=0.002))
            if "small" in students and a == ALPHAS[0]:
                rows.append(_row("small", "kd_top3", a, s, "main", cache_name="top3", loss="kd"))
    return rows


# --- the primary pair ----------------------------------------------------------------------------


def test_primary_table_keeps_the_first_student_and_each_methods_first_store() -> None:
    rows = primary_table(table_of(runs()), PRIMARY).to_pylist()
    assert {r["student"] for r in rows} == {"small"}
    kept = {(r["method"], r["cache_name"]) for r in rows}
    assert kept == {("ce", None), ("ls", None), ("kd", "full"), ("kd_top3", "top3")}
    per_alpha = len(ALPHAS) * len(SEEDS)
    assert len(rows) == 3 * per_alpha + len(SEEDS)  # ce, ls, kd at every α; kd_top3 at one
    # the other teacher's store first: kd's rows follow it
    other = Primary("small", {**PRIMARY.first_store, "kd": "random_head"})
    kd = [r for r in primary_table(table_of(runs()), other).to_pylist() if r["method"] == "kd"]
    assert {r["cache_name"] for r in kd} == {"random_head"} and len(kd) == per_alpha


def test_the_headline_metrics_read_the_primary_pair_only() -> None:
    metrics = summary_metrics(primary_table(table_of(runs()), PRIMARY), SETTINGS)
    for a in ("0.02", "0.2", "1"):
        assert metrics["relative_gain"][a] == pytest.approx(GAIN[("small", "main")], abs=0.005)
    assert metrics["n_runs"] == 3 * len(ALPHAS) * len(SEEDS) + len(SEEDS)


def test_primary_follows_the_order_of_params() -> None:
    raw = tiny_raw()
    raw["students"] = {"same": {"width": 16}, "small": {}}
    raw["methods"]["kd"]["cache"] = ["random_head", "full"]
    p = Primary.of(parse_params(raw))
    assert p.student == "same"
    assert p.first_store["kd"] == "random_head" and p.first_store["kd_top3"] == "top3"
    assert p.first_store["ce"] == "full"  # a method of labels only: cache.reference (never read)


def test_primary_table_refuses_stale_methods_and_an_absent_student() -> None:
    table = table_of(runs())
    with pytest.raises(KdsweepError, match=r"methods \['kd_top3'\] that params.yaml"):
        primary_table(table, Primary("small", {"ce": "full", "ls": "full", "kd": "full"}))
    with pytest.raises(KdsweepError, match="no runs of the primary student 'wide'"):
        primary_table(table, Primary("wide", PRIMARY.first_store))


# --- every pair ------------------------------------------------------------------------------


def test_factor_pairs_finds_every_student_and_teacher() -> None:
    pairs = factor_pairs(table_of(runs()), SETTINGS)
    # sorted by teacher, then parameter ratio
    assert [p.label for p in pairs] == [
        "small/main",
        "same/main",
        "small/random_head",
        "same/random_head",
    ]
    assert [p.store for p in pairs] == ["full", "full", "random_head", "random_head"]
    assert [p.ratio for p in pairs] == [0.28, 1.0, 0.28, 1.0]
    assert [p.identical for p in pairs] == [False, True, False, True]
    for p in pairs:
        an = p.analysis
        assert an.verdicts == []  # controls are read for the primary pair only
        assert [g["alpha"] for g in an.gains] == list(ALPHAS)
        for g in an.gains:  # one student's baseline, one store's reference, paired by seed
            assert (g["n_base"], g["n_ref"], g["n_pairs"]) == (4, 4, 4)
            assert g["gain"] == pytest.approx(GAIN[(p.student, p.teacher)], abs=0.005)
        assert [m["alpha"] for m in an.multipliers] == list(ALPHAS)


def test_factor_pairs_skip_a_student_without_the_reference() -> None:
    rows = [r for r in runs() if not (r["student"] == "same" and r["method"] == "kd")]
    assert [p.label for p in factor_pairs(table_of(rows), SETTINGS)] == [
        "small/main",
        "small/random_head",
    ]


def test_a_teacher_read_through_two_stores_names_each_store() -> None:
    rows = runs(students=("small",), teachers=("main",))
    rows += [
        _row("small", "kd", a, s, "main", cache_name="top3", gain=0.05)
        for a in ALPHAS
        for s in SEEDS
    ]
    pairs = factor_pairs(table_of(rows), SETTINGS)
    assert sorted(p.label for p in pairs) == ["small/main (full)", "small/main (top3)"]


def test_factor_metrics() -> None:
    m = factor_metrics(factor_pairs(table_of(runs()), SETTINGS))
    f = json.loads(json.dumps(m))["factors"]
    assert set(f) == {"small/main", "same/main", "small/random_head", "same/random_head"}
    assert f["same/main"]["identical"] is True and f["small/main"]["identical"] is False
    assert f["small/random_head"]["ratio"] == 0.28 and f["same/random_head"]["ratio"] == 1.0
    assert set(f["small/main"]["gain"]) == {"0.02", "0.2", "1"}
    assert f["small/main"]["gain"]["0.02"] == pytest.approx(0.10, abs=0.005)
    assert f["same/main"]["gain"]["1"] == pytest.approx(0.03, abs=0.005)
    assert factor_metrics([]) == {}


# --- the report section ----------------------------------------------------------------------


def _report(tmp_path: Path, rows: list[dict[str, Any]], primary: Primary | None) -> str:
    write_parquet(table_of(rows), tmp_path / "runs.parquet")
    path = write_report(tmp_path / "runs.parquet", SETTINGS, tmp_path / "out", primary=primary)
    return path.read_text()


FACTOR_FIGURES = ("factors_score.png", "factors_gain.png", "capacity.png")


def test_report_by_factor(tmp_path: Path) -> None:
    md = _report(tmp_path, runs(), PRIMARY)
    section = md[md.index("## By factor") : md.index("## What kd's gain is made of")]
    for name in FACTOR_FIGURES:
        path = tmp_path / "out/figures" / name
        assert f"](figures/{name})" in section
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert "student configuration `small` with each method's first store" in section
    table = [line for line in section.splitlines() if line.startswith("| s")][1:]
    assert len(table) == 4 * len(ALPHAS)  # one row per pair and α
    marked = {line.split(" | ")[0] for line in table}
    assert marked == {"| small", "| same **=**"}  # only the identical student is marked
    assert "| same **=** | random_head (random_head) | 2,500 / 2,500 = 1 | 0.02 |" in section
    small = next(line for line in table if line.startswith("| small | main (full) |"))
    assert "| 700 / 2,500 = 0.28 | 0.02 |" in small and "| kd |" in small
    gain, lo, hi = re.search(
        r"\| ([+-][\d.]+)% \[([+-][\d.]+)%, ([+-][\d.]+)%\] \|", small
    ).groups()
    assert float(lo) < float(gain) < float(hi) and float(gain) == pytest.approx(10, abs=0.5)
    # one sentence per α and teacher: disjoint intervals for main, overlapping for the other
    sentences = [line for line in section.splitlines() if line.startswith("- At α")]
    assert len(sentences) == 2 * len(ALPHAS)
    main = [s for s in sentences if "teacher `main`" in s]
    other = [s for s in sentences if "teacher `random_head`" in s]
    assert len(main) == len(other) == len(ALPHAS)
    assert all("do not overlap (no test of the difference was made" in s for s in main)
    assert all("the intervals overlap; no test" in s for s in other)
    assert "for `small` (0.28 of the teacher's parameters)" in main[0]
    assert "for `same`, the teacher's own architecture" in main[0]
    # the sections above read the primary pair: its gain, its configuration
    assert "teacher cnn1d (`main`), student cnn1d (configuration `small`)" in md
    head = md[md.index("## Relative gain of") : md.index("## Data-efficiency")]
    (gain,) = re.findall(r"^\| 0\.02 \| kd \| ([+-][\d.]+)% \|", head, re.M)
    assert float(gain) == pytest.approx(10, abs=0.5)


def test_a_student_without_the_baseline_still_gets_its_panels(tmp_path: Path) -> None:
    """A configuration that trained kd but no ce (a sweep that gives it kd only) has no gain to
    show: its panel says so, and the report is still written."""
    rows = [r for r in runs() if not (r["student"] == "same" and r["method"] == "ce")]
    md = _report(tmp_path, rows, PRIMARY)
    section = md[md.index("## By factor") : md.index("## What kd's gain is made of")]
    assert "| same **=** | main (full) | 2,500 / 2,500 = 1 | 0.02 | — |" in section  # no ce
    assert "| small | main (full) | 700 / 2,500 = 0.28 | 0.02 | 0.5" in section
    for name in FACTOR_FIGURES:
        assert (tmp_path / "out/figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_pair_has_no_by_factor_section(tmp_path: Path) -> None:
    md = _report(tmp_path, runs(students=("small",), teachers=("main",)), PRIMARY)
    assert "By factor" not in md
    assert not any((tmp_path / "out/figures" / name).exists() for name in FACTOR_FIGURES)
    # the rows of the other pairs are dropped before the main tables: the report is the same
    full = _report(tmp_path / "all", runs(), PRIMARY)
    assert md == full[: full.index("## By factor")] + full[full.index("## What kd's gain") :]


# --- the stages ------------------------------------------------------------------------------


def _stage(cwd: Path, script: str, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, str(REPO / "stages" / script), *args]
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def test_aggregate_and_report_stages_read_the_primary_pair_and_every_factor(
    tmp_path: Path,
) -> None:
    raw = tiny_raw()
    raw["students"] = {"small": {}, "same": {"width": 16}}
    raw["methods"]["kd"] |= {"tau": 4, "cache": ["full", "random_head"]}
    raw["sweep"]["students"] = {"small": "all", "same": ["ce", "kd"]}
    raw["analysis"] = {"baseline": "ce", "reference": "kd", "controls": ["ls"]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    stages = write_students(tmp_path / "students", runs())
    for store in set(raw["cache"]["stores"]) - set(stages):
        (tmp_path / "students" / store).mkdir()
        (tmp_path / "students" / store / "runs.json").write_text("[]")
    _stage(tmp_path, "aggregate.py", "--students", "students", "--out", "runs.parquet",
           "--metrics", "metrics.json")  # fmt: skip
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["relative_gain"]["0.02"] == pytest.approx(0.10, abs=0.005)  # small on full
    assert metrics["n_runs"] == 3 * len(ALPHAS) * len(SEEDS) + len(SEEDS)
    assert set(metrics["factors"]) == set(f"{s}/{t}" for s, t in GAIN)
    assert metrics["factors"]["same/random_head"]["identical"] is True
    assert metrics["factors"]["same/main"]["gain"]["0.2"] == pytest.approx(0.03, abs=0.005)
    for name, kind in (("full", "full"), ("random_head", "full"), ("top3", "topk")):
        _summary(name, kind, 3 if kind == "topk" else None, 10.0).write(
            tmp_path / "summaries" / f"{name}.json"
        )
    _summary("sampled4", "sampled", 4, 1.0).write(tmp_path / "summaries/sampled4.json")
    _stage(tmp_path, "report.py", "--runs", "runs.parquet", "--summaries", "summaries",
           "--out", "reports")  # fmt: skip
    md = (tmp_path / "reports/report.md").read_text()
    assert "student configuration `small` with each method's first store" in md
    assert all((tmp_path / "reports/figures" / name).exists() for name in FACTOR_FIGURES)
    assert read_runs(tmp_path / "runs.parquet").num_rows == len(runs())  # every pair's rows
