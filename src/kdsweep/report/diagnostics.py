"""Teacher-target diagnostics for the report: per cache store, how accurate the teacher is on the
training rows and cached views its students read, and how soft its targets are at each τ the
students used — with plain warnings where KD cannot work well.

The cache stage measures the numbers (kdsweep.cache.build.teacher_diagnostics) on a grid of τ;
this module reads them from the cache summaries and interpolates them, linearly in log τ, at the
τ found in the runs table, so the cache stage need not depend on the methods.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kdsweep.cache.summary import CacheSummary

NEAR_UNIFORM = 0.95  # mean entropy / log C above this: the softened targets are nearly uniform
VIEW_GAP = 0.10  # teacher accuracy on its cached views this far below its test accuracy: warn


def taus_used(runs: Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
    """The τ students trained at, per store they read (runs of losses without τ add none)."""
    used: dict[str, set[float]] = {}
    for r in runs:
        if r["cache_name"] is not None and r["tau"] is not None:
            used.setdefault(r["cache_name"], set()).add(r["tau"])
    return {store: sorted(taus) for store, taus in used.items()}


def soft_targets_at(c: CacheSummary, tau: float) -> tuple[float, float]:
    """(mean p_T^τ(y), mean entropy / log C) at `tau`, interpolated in log τ on the summary's grid
    (held constant beyond its ends)."""
    grid = np.array(c.soft_targets)
    log_tau = np.log(grid[:, 0])
    return (
        float(np.interp(math.log(tau), log_tau, grid[:, 1])),
        float(np.interp(math.log(tau), log_tau, grid[:, 2])),
    )


def diagnose(caches: Sequence[CacheSummary], runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The report's diagnostics: `stores` (one row per store with diagnostics), `targets` (one
    row per store and τ: τ = 1 and every τ its students used), `warnings` (sentences) and
    `augmented` (whether any store's students see augmented views: cached or fresh)."""
    used = taus_used(runs)
    stores, targets, warnings = [], [], []
    for c in caches:
        if not c.soft_targets:  # a summary written before the cache stage measured them
            continue
        stores.append(c)
        if c.teacher_view_acc is not None and c.teacher_test_acc is not None:
            if c.teacher_view_acc < c.teacher_test_acc - VIEW_GAP:
                warnings.append(
                    f"store `{c.name}`: the teacher is right on only {c.teacher_view_acc:.1%} of "
                    f"its cached training views against {c.teacher_test_acc:.1%} on the clean "
                    "test images, so its students learn from wrong targets; train the teacher on "
                    "the same views (`teacher.augment: true`)."
                )
        for tau in sorted({1.0, *used.get(c.name, [])}):
            p_y, ratio = soft_targets_at(c, tau)
            targets.append(
                {
                    "store": c.name,
                    "tau": tau,
                    "p_target": p_y,
                    "uniform_p": 1 / c.num_classes,
                    "entropy": ratio * math.log(c.num_classes),
                    "entropy_ratio": ratio,
                }
            )
            if ratio > NEAR_UNIFORM and tau in used.get(c.name, []):
                warnings.append(
                    f"store `{c.name}` at τ = {tau:g}: the softened targets are close to uniform "
                    f"(entropy {ratio:.0%} of log C, mean p_T^τ(y) = {p_y:.3f} against "
                    f"1/C = {1 / c.num_classes:.3f}), so a KD student gets little signal from "
                    "them; use a lower τ, or a more confident teacher (longer training)."
                )
    augmented = any(c.views != 1 for c in caches)
    return {"stores": stores, "targets": targets, "warnings": warnings, "augmented": augmented}
