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
        train_bytes_per_row=bytes_per_row,
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
        "fidelity.png",  # the cache fidelity section's bytes against retained share
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
        "## Cache fidelity",
        "### Other controls",
        "## Fidelity and calibration",
        "## Training budget",
        "## Logit caches",
    ):
        assert heading in md
    # the methods are stated beside every kind of interval, with Holm and the margin
    for method in (
        "a mean — Student t",
        "a difference — paired t over the (subset, train) seeds every group has",
        "a relative gain and a control's share of a gain — Fieller's interval",
        "a difference of shares between α — a paired t-interval",
        "the data-efficiency multiplier — a delete-one-seed jackknife t-interval",
        "Holm-adjusted within each hypothesis and α",
        "within a margin of 10% of kd's gain over ce at that α",
        "| 95% CI (paired Fieller) |",
        "| 95% jackknife CI | multiplier (monotone cubic) | 95% jackknife CI |",
    ):
        assert method in md, method
    assert "3 (subset, train) seed pair(s); students per variant and α: 3" in md
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
        r"^\| \*\*median\*\* \|.*\| \*\*≥ [\d.]+\*\* \|  \|  \|  \| censored \(lower bound\) \|$",
        md,
        re.M,
    )
    assert re.search(r"^\| 1 \| kd \| [\d.]+ \| ≥ 1 \| ≥ 1 \| \[1, ≥ 1\] \| ≥ 1 \|", md, re.M)
    # the argument: premise, evidence and conclusion follow the numbers
    assert "**Premise.** kd's gain over ce is significant at α ∈ {0.02, 0.1, 1}." in md
    assert re.search(
        r"At α=0\.02, \*\*ls\*\* recovers \d+% \[\d+%, \d+%\] of kd's gain and falls short of kd",
        md,
    )
    assert "At α=0.02, **ls_matched** recovers" in md
    # dark knowledge: kd against ls_matched, and shuffled_dk against ls_matched
    assert (
        "At α=0.02, fake structure against none: **shuffled_dk** falls short of **ls_matched**"
        in md
    )
    assert re.search(
        r"^\| — \(context\) \| shuffled_dk \| 0\.02 \| kd \|.*\| falls short \|$", md, re.M
    )
    h = analyse(table_of(rows), SETTINGS).hypotheses
    for name in ("label_smoothing", "confidence", "dark_knowledge"):
        assert f"*Conclusion*: the hypothesis is **{h[name]['verdict']}**" in md
    assert "the hypothesis is **refuted** — refuted at every α tested" in md  # ls
    # ls_matched matches kd where the margin (10% of the gain) is within reach, not at α=1
    assert "the hypothesis is **partly supported** — supported at some α only" in md
    assert "a match would need about" in md
    assert 'No difference between α is shown: "most at small α" is not claimed.' in md
    assert "goes missing" not in md
    assert re.search(r"^\| — \| top1_teacher \| 0\.02 \| kd \|.*\| falls short \|$", md, re.M)
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
    rows = synthetic_rows(methods={"ce", "kd", "ls"}, task="lm")
    md, out = _report(tmp_path, rows)
    _figures(md, out)
    assert "## Results: test perplexity (lower is better)" in md
    assert "(base − ref)/base" in md
    assert re.search(r"At α=0\.02, \*\*ls\*\* recovers .* and falls short of kd", md)
    assert "within a margin of 10% of kd's gain over ce at that α" in md
    fixed = SETTINGS.model_copy(update={"equivalence_fraction": None})
    md_fixed, _ = _report(tmp_path / "fixed", rows, settings=fixed)
    assert "within a margin of ±0.01 perplexity" in md_fixed
    gain_csv = (out / "plots" / "gain.csv").read_text().splitlines()
    gains = [float(g["gain"]) for g in csv.DictReader(gain_csv)]
    assert gains[0] > 0  # KD's lower perplexity is a positive gain


def test_report_names_the_tuned_reference_and_single_seed_verdicts(tmp_path: Path) -> None:
    rows = synthetic_rows(methods={"ce", "kd_tau", "ls_matched"}, seeds=(0,))
    settings = AnalysisParams(**SETTINGS.model_dump() | {"reference": "kd_tau"})
    md, _ = _report(tmp_path, rows, settings=settings)
    assert (
        "`kd_tau` sweeps τ; at each α it is represented by the τ with the best mean validation "
        "score there, `kd_tau(τ per α)`" in md
    )
    assert "## Relative gain of kd_tau(τ per α) over ce" in md
    assert "| 0.02 | kd_tau(τ=16) |" in md
    # one seed: no interval, so no significant gain, so nothing for the controls to explain
    assert "| 0.02 | " in md and "| [—, —] | no |" in md
    assert "Not tested" in md and "### 1." not in md
    assert re.search(
        r"^\| confidence \| ls_matched \| 0\.02 \| kd_tau\(τ=16\) \|.*\| undetermined \(n<2\) \|$",
        md,
        re.M,
    )


def test_report_says_when_a_control_is_too_noisy_to_read(tmp_path: Path) -> None:
    rows = synthetic_rows(methods={"ce", "kd", "ls_matched"})
    for r in rows:
        if r["method"] == "ls_matched":
            r["test_acc"] += 0.06 * (r["subset_seed"] - 1)
    md, _ = _report(tmp_path, rows)
    assert "**ls_matched** recovers" in md
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
    rows = synthetic_rows(methods={"ce", "kd", "ls"})
    for r in rows:  # KD clearly below CE at α=1, as a too-small student distilled at full data
        if r["method"] == "kd" and r["alpha"] == 1.0:
            r["test_acc"] = r["val_acc"] = 0.5 + 0.01 * r["subset_seed"]
    md, _ = _report(tmp_path, rows)
    assert re.search(r"^\| 1 \| kd \| -[\d.]+% \| \[-[\d.]+%, -[\d.]+%\] \| worse \|", md, re.M)
    assert re.search(
        r"^\| 0\.02 \| kd \| \+[\d.]+% \| \[\+[\d.]+%, \+[\d.]+%\] \| yes \|", md, re.M
    )
    assert (
        "**Premise.** kd's gain over ce is significant at α ∈ {0.02, 0.1} of {0.02, 0.1, 1}; "
        "elsewhere there is no gain to explain" in md
    )


def test_report_of_a_default_shaped_run(tmp_path: Path) -> None:
    """τ winners that differ per α, a harmful control, KD's gain significant at one α only and
    a missing seed: what the report prints for each."""
    from tests.test_analysis import DEFAULTISH, READ, _controls, world

    rows = [
        r
        for r in world(DEFAULTISH | _controls(20.0))
        if not (r["method"] == "ls" and r["alpha"] == 0.02 and r["subset_seed"] == 2)
    ]
    md, out = _report(tmp_path, rows, settings=READ)
    assert "temperature_sweep.png" in {p.name for p in _figures(md, out)}
    # the τ won per α, and the global choice beside it
    assert "## Temperature selected per α" in md
    assert "One τ for every α (`analysis.select: global`" in md and "would be `kd(τ=20)`" in md
    assert re.search(
        r"^\| 0\.02 \| [\d.]+ \([\d.]+\) \| [\d.]+ \([\d.]+\) \| \*\*τ=20\*\* \|$", md, re.M
    )
    assert re.search(r"^\| 1 \| .* \| \*\*τ=4\*\* \|$", md, re.M)
    assert re.search(r"^\| 1 \| kd\(τ=4\) \| -[\d.]+% \|.*\| worse \|", md, re.M)
    # a harmful control
    assert "**ls_teacher** recovers -" in md and "is **harmful** (significantly below ce" in md
    assert "harmful: ls_teacher at α=0.02" in md
    # one premise per reference; "most at small α" not tested with one α
    assert "kd(τ=20)'s gain over ce is significant at α ∈ {0.02} of {0.02, 1}" in md
    assert '"Most at small α" is not tested' in md
    # the missing seed, beside its row
    assert re.search(
        r"^\| label smoothing \| ls \| 0\.02 \| kd\(τ=20\) \|.*\| 4 \(missing: subset 2 / train 0\) \|",
        md,
        re.M,
    )
    assert "seeds missing: subset 2 / train 0" in md
    # the global choice on request
    glob = READ.model_copy(update={"select": "global"})
    md_glob, _ = _report(tmp_path / "global", rows, settings=glob)
    assert (
        "one τ stands for every α" in md_glob and "## Relative gain of kd(τ=20) over ce" in md_glob
    )
