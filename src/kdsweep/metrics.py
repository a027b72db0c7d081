"""Test metrics of a trained model: accuracy, perplexity, calibration, and fidelity to the
teacher (top-1 agreement, KL) from the teacher's cached test outputs (DESIGN.md §6)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdsweep.softmax import cross_entropy, log_softmax, softmax
from kdsweep.train import accuracy


def expected_calibration_error(logits: torch.Tensor, y: torch.Tensor, bins: int = 15) -> float:
    """Standard top-label ECE with equal-width confidence bins."""
    conf, pred = softmax(logits).max(-1)
    correct = (pred == y).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.float().mean() * (conf[m].mean() - correct[m].mean()).abs()
    return float(ece)


def evaluate(
    logits: torch.Tensor,
    y: torch.Tensor,
    teacher_top1: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
) -> dict[str, float | None]:
    """Test accuracy, perplexity and calibration, per position for sequence models; agreement
    with the teacher's top-1 and KL(teacher‖student) when the teacher's test outputs are given
    (logits only from a full cache)."""
    z, y = logits.flatten(0, -2), y.flatten()
    acc = accuracy(z, y)
    out: dict[str, float | None] = {
        "test_acc": acc,
        "test_error": 1 - acc,
        "test_ppl": math.exp(float(cross_entropy(z, y).mean())),
        "ece": expected_calibration_error(z, y),
        "agreement": None,
        "test_kl": None,
    }
    if teacher_top1 is not None:
        out["agreement"] = float((z.argmax(-1) == teacher_top1.flatten()).float().mean())
    if teacher_logits is not None:
        teacher = teacher_logits.flatten(0, -2)
        out["test_kl"] = float(
            F.kl_div(
                log_softmax(z),
                log_softmax(teacher),
                log_target=True,
                reduction="batchmean",
            )
        )
    return out
