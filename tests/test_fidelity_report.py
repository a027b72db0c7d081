"""kdsweep.report.fidelity on constructed runs: 5 seeds per group, scores with known means (the
seed noise sums to zero in every group, so each share's point estimate is known exactly)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from kdsweep.config import AnalysisParams
from kdsweep.errors import KdsweepError
from kdsweep.report.fidelity import draw_fidelity, fidelity_section, render_fidelity
from tests.test_report import _summary

SETTINGS = AnalysisParams()  # baseline ce, reference kd, ci 0.95
SEEDS = range(5)
SUBSET_EFFECT = [0.03, -0.02, 0.01, -0.015, -0.005]  # shared by every group: cancels in pairs
NOISE = [0.006, -0.004, 0.002, -0.001, -0.003]  # sums to 0: group means are exact


def _group(
    method: str,
    mean: float,
    *,
    alpha: float = 0.02,
    tau: float | None = 4.0,
    store: str | None = None,
    kind: str | None = None,
    k: int | None = None,
    mode: str | None = None,
    loss: str = "kd",
    val: float | None = None,
    noise: float = 1.0,
    shift: int = 0,
    task: str = "vision",
) -> list[dict[str, Any]]:
    """Five students, one per subset seed; `shift` rotates the noise so groups differ per seed."""
    out = []
    for s in SEEDS:
        score = mean + SUBSET_EFFECT[s] + noise * NOISE[(s + shift) % 5]
        v = (mean if val is None else val) + SUBSET_EFFECT[s]
        metric = {"test_acc": score, "val_acc": v, "test_ppl": None, "val_ppl": None}
        if task == "lm":
            metric = {"test_acc": 0.1, "val_acc": 0.1, "test_ppl": 100 * score, "val_ppl": 100 * v}
        out.append(
            {
                "run_id": f"{method}-{store}-{tau}-{alpha}-{s}",
                "task": task,
                "method": method,
                "loss": "ce" if method == "ce" else loss,
                "lam": None if method == "ce" else 1.0,
                "tau": None if method == "ce" else tau,
                "teacher_id": None if method == "ce" else "main",
                "cache_name": store,
                "cache_kind": kind,
                "k": k,
                "topk_mode": mode,
                "alpha": alpha,
                "subset_seed": s,
                "train_seed": 0,
            }
            | metric
        )
    return out


SUMMARIES = [
    _summary("full", "full", None, 20.0),
    _summary("top4", "topk", 4, 7.0),
    _summary("sampled4", "sampled", 4, 3.0),
]


def _runs(online: bool = True, spread: float = 0.785, alpha: float = 0.02) -> list[dict]:
    """ce 0.60, kd online 0.80, kd on full 0.79, top-4 tail 0.70, top-4 spread `spread`,
    sampled 0.65 (all at τ = 4)."""
    rows = _group("ce", 0.60, alpha=alpha, shift=0)
    if online:
        rows += _group("kd_online", 0.80, alpha=alpha, store="online", kind="online", shift=1)
    rows += _group("kd", 0.79, alpha=alpha, store="full", kind="full", shift=2)
    rows += _group("kd_top4", 0.70, alpha=alpha, store="top4", kind="topk", k=4, mode="tail")
    rows += _group(
        "kd_top4_spread", spread, alpha=alpha, store="top4", kind="topk", k=4, mode="spread"
    )
    rows += _group("kd_s4", 0.65, alpha=alpha, store="sampled4", kind="sampled", k=4, shift=4)
    return rows


def _row(section: dict, store: str, method: str, tau: float | None = 4.0) -> dict:
    (row,) = [
        g
        for g in section["rows"]
        if g["store"] == store and g["method"] == method and g["tau"] == tau
    ]
    return row


def test_shares_against_the_online_reference() -> None:
    sec = fidelity_section(pa.Table.from_pylist(_runs()), SUMMARIES, SETTINGS)
    assert sec["reference"] == {"method": "kd_online", "cache_name": "online", "kind": "online"}
    expected = {("full", "kd"): 0.95, ("top4", "kd_top4"): 0.5, ("sampled4", "kd_s4"): 0.25}
    expected[("top4", "kd_top4_spread")] = 0.925
    assert {(g["store"], g["method"]) for g in sec["rows"]} == set(expected)
    for (store, method), want in expected.items():
        row = _row(sec, store, method)
        (cell,) = row["cells"]
        assert cell["share"] == pytest.approx(want, abs=1e-9)
        assert cell["low"] < cell["share"] < cell["high"]
        assert cell["n"] == 5 and cell["ref_tau"] == 4.0 and cell["tau_matched"]
        assert not row["is_reference"]
    top4 = _row(sec, "top4", "kd_top4")
    assert (top4["kind"], top4["k"], top4["bytes_per_row"], top4["draws"]) == ("topk", 4, 7.0, 1)
    assert top4["topk_mode"] == "tail" and top4["ref_tau_note"] == "4 (same)"


def test_reference_falls_back_to_kd_on_the_full_cache() -> None:
    sec = fidelity_section(_runs(online=False), SUMMARIES, SETTINGS)
    assert sec["reference"] == {"method": "kd", "cache_name": "full", "kind": "cache"}
    assert _row(sec, "full", "kd")["is_reference"]
    assert sec["rows"][0]["store"] == "full"  # the reference comes first
    # (0.70 − 0.60) / (0.79 − 0.60)
    assert _row(sec, "top4", "kd_top4")["cells"][0]["share"] == pytest.approx(0.1 / 0.19)


def test_tau_matched_else_selected_on_validation() -> None:
    """The online reference ran τ = 1 (test 0.70, best validation) and τ = 4 (test 0.80): a
    store's τ = 4 students meet online τ = 4; its τ = 2 students, which the reference did not
    run, meet the reference's τ chosen by VALIDATION score (τ = 1), not by test score."""
    rows = _group("ce", 0.60)
    rows += _group("kd_online", 0.70, tau=1.0, store="online", kind="online", val=0.9, shift=1)
    rows += _group("kd_online", 0.80, tau=4.0, store="online", kind="online", val=0.8, shift=2)
    rows += _group("kd", 0.75, tau=4.0, store="full", kind="full", shift=3)
    rows += _group("kd", 0.65, tau=2.0, store="full", kind="full", shift=4)
    sec = fidelity_section(rows, SUMMARIES, SETTINGS)
    at4, at2 = _row(sec, "full", "kd", 4.0)["cells"][0], _row(sec, "full", "kd", 2.0)["cells"][0]
    assert (at4["ref_tau"], at4["tau_matched"]) == (4.0, True)
    assert at4["share"] == pytest.approx(0.15 / 0.20)
    assert (at2["ref_tau"], at2["tau_matched"]) == (1.0, False)
    assert at2["share"] == pytest.approx(0.05 / 0.10)
    assert _row(sec, "full", "kd", 2.0)["ref_tau_note"] == "1 (val-selected)"
    assert "| 2 | 1 (val-selected) |" in render_fidelity(sec)


def test_cheapest_store_retaining_90_percent() -> None:
    """top4/spread (7 bytes, 92.5%) is the cheapest at ≥ 90%: sampled4 is cheaper but keeps 25%,
    full keeps more but costs more. With seed noise its interval reaches below 90%; without
    much, the lower end clears 90% too."""
    sec = fidelity_section(_runs(), SUMMARIES, SETTINGS)
    (sentence,) = sec["sentences"]
    assert "cheapest store" in sentence and "`top4` (kd_top4_spread" in sentence
    assert "92%" in sentence or "93%" in sentence
    assert "below 90%" in sentence
    quiet = _runs(spread=0.60)
    for r in quiet:  # identical subset effects in every group: zero-width intervals
        r["test_acc"] = r["val_acc"] + (0.185 if r["method"] == "kd_top4_spread" else 0.0)
    (sentence,) = fidelity_section(quiet, SUMMARIES, SETTINGS)["sentences"]
    assert "`top4` (kd_top4_spread" in sentence and "lower end is ≥ 90% too" in sentence


def test_no_store_retains_90_percent() -> None:
    rows = [r for r in _runs(spread=0.74) if r["method"] != "kd"]
    sec = fidelity_section(rows, SUMMARIES, SETTINGS)
    (sentence,) = sec["sentences"]
    assert "none of the stores" in sentence and "cheapest" not in sentence
    assert "the best is `top4` (kd_top4_spread, τ = 4; 7 bytes/row), with 70%" in sentence


def test_share_needs_a_significant_reference_gain() -> None:
    rows = [r for r in _runs() if r["method"] != "kd_online"]
    rows += _group("kd_online", 0.601, store="online", kind="online", shift=1)
    sec = fidelity_section(rows, SUMMARIES, SETTINGS)
    for g in sec["rows"]:
        assert g["cells"][0]["share"] is None
        assert g["cells"][0]["status"] == "n/a: reference gain not significant"
    assert sec["sentences"] == ["α = 0.02: n/a: reference gain not significant."]
    assert "n/a: reference gain not significant" in render_fidelity(sec)
    assert draw_fidelity(sec, Path("/nonexistent")) is None


def test_language_model_perplexity_points_down() -> None:
    """Perplexity: ce 100, online kd 60 (τ = 4), full-cache kd 70 → share 0.75; the reference's
    τ for the store's τ = 2 students is the one of LOWEST validation perplexity (τ = 1)."""
    lm = {"task": "lm"}
    rows = _group("ce", 1.00, **lm)
    rows += _group("kd_online", 0.60, store="online", kind="online", val=0.9, shift=1, **lm)
    rows += _group("kd_online", 0.80, tau=1.0, store="online", kind="online", val=0.5, **lm)
    rows += _group("kd", 0.70, store="full", kind="full", shift=2, **lm)
    rows += _group("kd", 0.90, tau=2.0, store="full", kind="full", shift=3, **lm)
    sec = fidelity_section(rows, SUMMARIES, SETTINGS)
    assert sec["score"] == "test_ppl" and not sec["higher_is_better"]
    cell = _row(sec, "full", "kd")["cells"][0]
    assert cell["share"] == pytest.approx(0.75) and cell["low"] < 0.75 < cell["high"]
    cell2 = _row(sec, "full", "kd", 2.0)["cells"][0]
    assert cell2["ref_tau"] == 1.0 and cell2["share"] == pytest.approx(0.5)


def test_markdown_figure_and_draws(tmp_path: Path) -> None:
    sums = [*SUMMARIES[:2], dataclasses.replace(SUMMARIES[2], draws=8)]
    runs = _runs() + _runs(alpha=1.0)
    sec = fidelity_section(runs, sums, SETTINGS)
    assert sec["alphas"] == [0.02, 1.0] and len(sec["sentences"]) == 2
    assert _row(sec, "sampled4", "kd_s4")["draws"] == 8
    md = render_fidelity(sec, "figures/fidelity.png")
    assert md.startswith("\n## Cache fidelity") or md.lstrip().startswith("## Cache fidelity")
    assert "| α = 0.02 | α = 1 |" in md
    assert "| top4 | topk | 4 | float16 | 1 | 1 | kd_top4 (tail) | 4 | 4 (same) | 7 |" in md
    assert "| sampled4 | sampled | 4 | float16 | 1 | 8 |" in md
    assert "50% [" in md and "with the teacher run online" in md and "in test accuracy" in md
    assert "![bytes per row" in md and "(figures/fidelity.png)" in md
    path = draw_fidelity(sec, tmp_path / "figures")
    assert path == tmp_path / "figures" / "fidelity.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert [p.name for p in path.parent.iterdir()] == ["fidelity.png"]  # no temporary left
    assert render_fidelity(fidelity_section(_group("ce", 0.6), sums, SETTINGS)) == ""


def test_duplicate_seeds_are_refused() -> None:
    rows = _runs() + _group("kd_top4", 0.70, store="top4", kind="topk", k=4, mode="tail")
    with pytest.raises(KdsweepError, match="share a \\(subset_seed, train_seed\\)"):
        fidelity_section(rows, SUMMARIES, SETTINGS)
