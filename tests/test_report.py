"""kdsweep.report on synthetic runs: every section, figure and plot file, and the minimal case."""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from kdsweep.analysis import analyse
from kdsweep.cache.summary import CacheSummary
from kdsweep.config import AnalysisParams
from kdsweep.errors import KdsweepError
from kdsweep.report import write_report
from kdsweep.runs import write_parquet
from tests.test_analysis import SETTINGS, synthetic_rows, table_of


def _summary(name: str, kind: str, k: int | None, bytes_per_row: float) -> CacheSummary:
    return CacheSummary(
        name=name,
        kind=kind,
        k=k,
        dtype="float16",
        teacher="main",
        bytes_on_disk=1234567,
        bytes_per_row=bytes_per_row,
        compression_ratio=1.5,
        teacher_test_acc=0.97 if kind == "full" else None,
        num_rows=50000,
    )


CACHES = [
    _summary("full", "full", None, 20.0),
    _summary("top2", "topk", 2, 4.0),
    _summary("top4", "topk", 4, 7.0),
    _summary("sampled4", "sampled", 4, 1.0),
]
STORES = [c.name for c in CACHES]


def _write_summaries(summaries: Path) -> Path:
    """The cache stages' summaries, as `<summaries>/<store>.json`."""
    for c in CACHES:
        c.write(summaries / f"{c.name}.json")
    return summaries


def _report(
    tmp_path: Path,
    rows: list[dict[str, Any]],
    summaries: Path | None = None,
    stores: Sequence[str] = (),
    settings: AnalysisParams = SETTINGS,
) -> tuple[str, Path]:
    parquet = tmp_path / "runs.parquet"
    write_parquet(table_of(rows), parquet)
    out = tmp_path / "reports"
    path = write_report(parquet, settings, out, summaries, stores)
    assert path == out / "report.md"
    return path.read_text(), out


def _figures(md: str, out: Path) -> list[Path]:
    """The figures report.md links to; each must exist and be a non-trivial PNG."""
    paths = [out / p for p in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000, p
    return paths


def test_full_report(tmp_path: Path) -> None:
    rows = synthetic_rows()
    md, out = _report(tmp_path, rows, _write_summaries(tmp_path / "summaries"), STORES)
    names = {p.name for p in _figures(md, out)}
    assert names == {
        "score_vs_alpha.png",
        "relative_gain.png",
        "multiplier.png",
        "control_shares.png",
        "temperature_sweep.png",
        "cache_ablation.png",
        "validation_curves.png",
    }
    # the budget is stated per α, with the curves that show it
    assert "ends at its last step (`budget.select: last`)" in md
    assert re.search(r"^\| 0\.02 \| 10 \| 1 \|$", md, re.M)
    for heading in (
        "## Results: test accuracy",
        "## Relative gain of kd over ce",
        "## Data-efficiency multiplier",
        "## What kd's gain is made of",
        "### 1. Universal smoothing (the label-smoothing hypothesis)",
        "### 2. Instance-specific confidence",
        "### 3. Class relationships (dark knowledge)",
        "### Other controls",
        "## Fidelity and calibration",
        "## Training budget",
        "## Logit caches",
    ):
        assert heading in md
    # the methods are stated: t-intervals, TOST with its margin, seeds, bootstrap
    assert "95% Student t-intervals over seeds (scipy.stats)" in md
    assert "equivalent within ±0.01 accuracy by two one-sided t-tests (TOST, level 0.05)" in md
    assert (
        "3 (subset, train) seed pair(s); students per variant and α: 3" in md
        and "(400 resamples, seed 0)" in md
    )
    # results row: ce at α=0.1 over 3 seeds
    assert re.search(
        r"^\| ce \| 0\.\d+ ± [\d.e-]+ \(3\) \| 0\.[67]\d* ± [\d.e-]+ \(3\) \|", md, re.M
    )
    assert "| kd_tau(τ=16) |" in md
    # KD beats every CE point at α=1: censored there (and the smallest multiplier, 1, so the
    # median is a lower bound too), not at α=0.02
    assert re.search(r"^\| 1 \|.*\| censored \(lower bound\) \|$", md, re.M)
    assert re.search(r"^\| 0\.02 \|.*\| \[[\d.]+, [\d.]+\] \|  \|$", md, re.M)
    assert re.search(
        r"^\| \*\*median\*\* \|.*\| \*\*≥ [\d.]+\*\* \|  \| censored \(lower bound\) \|$", md, re.M
    )
    assert re.search(r"^\| 1 \| [\d.]+ \| ≥ 1 \| ≥ 1 \| \[1, ≥ 1\] \|", md, re.M)
    # the argument: premise, evidence and conclusion follow the numbers
    assert "**Premise.** kd's gain over ce is significant at α ∈ {0.02, 0.1, 1}." in md
    assert re.search(
        r"At α=0\.02, \*\*shuffled_dk\*\* recovers \d+% \[\d+%, \d+%\] of kd's gain and falls short of kd",
        md,
    )
    assert re.search(
        r"At α=1, \*\*shuffled_dk\*\* recovers \d+% \[\d+%, \d+%\] of kd's gain and matches kd", md
    )
    assert "At α=0.02, **ls_matched** recovers" in md
    h = analyse(table_of(rows), SETTINGS).hypotheses
    for name in ("label_smoothing", "confidence", "dark_knowledge"):
        assert f"*Conclusion*: the hypothesis is **{h[name]['verdict']}**" in md
    assert "the hypothesis is **refuted** — refuted at every α tested" in md  # ls
    assert "the hypothesis is **supported** — supported at every α tested" in md  # ls_matched
    assert (
        "the largest part of kd's gain goes missing at α=0.02" in md
        and "the smallest α tested, as" in md
    )
    assert re.search(r"^\| top1_teacher \| 0\.02 \|.*\| falls short \|$", md, re.M)  # other
    # one row per store, every field of its summary
    assert "| full | full | — | float16 | main | 1,234,567 | 20 | 1.5x | 0.97 | 50,000 |" in md
    assert "| top2 | topk | 2 | float16 | main | 1,234,567 | 4 | 1.5x | — | 50,000 |" in md
    assert md.index("| full | full |") < md.index("| top2 | topk |") < md.index("| sampled4 |")
    acc = list(csv.DictReader((out / "plots" / "accuracy.csv").read_text().splitlines()))
    assert len(acc) == len({(r["method"], r["tau"], r["alpha"]) for r in rows})
    assert set(acc[0]) == {"alpha", "variant", "score", "ci_low", "ci_high"}
    gain = list(csv.DictReader((out / "plots" / "gain.csv").read_text().splitlines()))
    assert [float(g["alpha"]) for g in gain] == [0.02, 0.1, 1.0]
    assert all(float(g["ci_low"]) <= float(g["gain"]) <= float(g["ci_high"]) for g in gain)


def test_minimal_report_with_only_ce_and_kd(tmp_path: Path) -> None:
    md, out = _report(tmp_path, synthetic_rows(methods={"ce", "kd"}), tmp_path / "absent", [])
    names = {p.name for p in _figures(md, out)}
    assert names == {
        "score_vs_alpha.png",
        "relative_gain.png",
        "multiplier.png",
        "validation_curves.png",
    }
    assert "Not tested" in md and "### Hypothesis:" not in md and "## Logit caches" not in md
    assert not (out / "figures" / "temperature_sweep.png").exists()
    assert "## Relative gain of kd over ce" in md


def test_report_without_the_baseline(tmp_path: Path) -> None:
    md, out = _report(tmp_path, synthetic_rows(methods={"kd", "ls"}))
    assert "Not available: no α at which both the baseline (ce) and the reference (kd)" in md
    assert "Not available: the baseline (ce) or the reference (kd) has no runs." in md
    assert "baseline **ce (absent)**" in md
    assert (out / "plots" / "gain.csv").read_text() == "alpha,gain,ci_low,ci_high\n"


def test_report_for_language_models_uses_perplexity(tmp_path: Path) -> None:
    rows = synthetic_rows(methods={"ce", "kd", "shuffled_dk"}, task="lm")
    md, out = _report(tmp_path, rows)
    _figures(md, out)
    assert "## Results: test perplexity (lower is better)" in md
    assert "(base − ref)/base" in md
    assert re.search(r"At α=0\.02, \*\*shuffled_dk\*\* recovers .* and falls short of kd", md)
    assert "equivalent within ±0.01 perplexity" in md
    gain_csv = (out / "plots" / "gain.csv").read_text().splitlines()
    gains = [float(g["gain"]) for g in csv.DictReader(gain_csv)]
    assert gains[0] > 0  # KD's lower perplexity is a positive gain


def test_report_names_the_tuned_reference_and_single_seed_verdicts(tmp_path: Path) -> None:
    rows = synthetic_rows(methods={"ce", "kd_tau", "ls_matched"}, seeds=(0,))
    settings = AnalysisParams(**SETTINGS.model_dump() | {"reference": "kd_tau"})
    md, _ = _report(tmp_path, rows, settings=settings)
    assert "`kd_tau` sweeps τ: the reference is its variant with the best mean **validation**" in md
    assert "## Relative gain of kd_tau(τ=16) over ce" in md
    # one seed: no interval, so no significant gain, so nothing for the controls to explain
    assert "| 0.02 | " in md and "| [—, —] | no |" in md
    assert "Not tested" in md and "### 1." not in md
    assert re.search(
        r"^\| ls_matched \(vs kd_tau\(τ=16\)\) \|.*\| undetermined \(n<2\) \|$", md, re.M
    )


def test_report_says_when_a_control_is_too_noisy_to_read(tmp_path: Path) -> None:
    rows = synthetic_rows(methods={"ce", "kd", "shuffled_dk"})
    for r in rows:
        if r["method"] == "shuffled_dk":
            r["test_acc"] += 0.06 * (r["subset_seed"] - 1) + 0.085 * (r["alpha"] < 0.5)
    md, _ = _report(tmp_path, rows)
    assert "**shuffled_dk** recovers" in md
    assert "cannot be told apart from (nor shown equivalent to) kd" in md
    assert "the hypothesis is **inconclusive** — not decided by these seeds" in md


def test_report_shows_the_summaries_of_the_listed_stores_only(tmp_path: Path) -> None:
    summaries = _write_summaries(tmp_path / "summaries")  # top4 was removed from params.yaml
    md, _ = _report(tmp_path, synthetic_rows(methods={"ce", "kd"}), summaries, ["full", "top2"])
    assert "## Logit caches" in md and "| top2 | topk |" in md and "| top4 |" not in md


def test_report_refuses_a_missing_summary(tmp_path: Path) -> None:
    summaries = _write_summaries(tmp_path / "summaries")
    rows = synthetic_rows(methods={"ce", "kd"})
    with pytest.raises(KdsweepError, match=r"top8\.json is missing: run `dvc repro`"):
        _report(tmp_path, rows, summaries, ["full", "top8"])


def test_report_marks_a_significant_loss_as_worse_not_as_a_gain(tmp_path: Path) -> None:
    rows = synthetic_rows(methods={"ce", "kd", "shuffled_dk"})
    for r in rows:  # KD clearly below CE at α=1, as a too-small student distilled at full data
        if r["method"] == "kd" and r["alpha"] == 1.0:
            r["test_acc"] = r["val_acc"] = 0.5 + 0.01 * r["subset_seed"]
    md, _ = _report(tmp_path, rows)
    assert re.search(r"^\| 1 \| -[\d.]+% \| \[-[\d.]+%, -[\d.]+%\] \| worse \|", md, re.M)
    assert re.search(r"^\| 0\.02 \| \+[\d.]+% \| \[\+[\d.]+%, \+[\d.]+%\] \| yes \|", md, re.M)
    assert "**Premise.** kd's gain over ce is significant at α ∈ {0.02, 0.1}" in md
