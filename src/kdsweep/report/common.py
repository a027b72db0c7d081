"""What the figures and the text both read off an Analysis: the order of the variants, the
summary row of each (variant, α) and the name of the score."""

from __future__ import annotations

from typing import Any

from kdsweep.analysis import Analysis

Row = dict[str, Any]


def variant_order(an: Analysis) -> list[str]:
    """Baseline, reference, then every other variant (by method, then τ)."""
    first = [v for v in (an.baseline, an.reference) if v is not None]
    return first + [v for v in an.runs.variants() if v not in first]


def cells(an: Analysis) -> dict[tuple[str, float], Row]:
    """The summary row of each (variant, α)."""
    return {(r["variant"], r["alpha"]): r for r in an.summary}


def score_label(an: Analysis) -> str:
    return "test accuracy" if an.runs.higher_is_better else "test perplexity (lower is better)"
