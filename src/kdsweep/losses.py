"""Student losses (DESIGN.md §5), assembled from a LOSSES registry entry.

Per sample:  L = λ·distill(p_T, z_S, τ) + (1−λ)·CE(y, p_S),  where distill is τ²·KL(p_T^τ ‖ p_S^τ)
computed by the cache kind the targets came from (kdsweep.cache.kinds), or `logit_mse`, its
τ→∞ limit: ½·mean_c((δ_c − δ̄)²) with δ = z_S − z_T. Losses without a distillation term are
cross-entropy on the true labels (smoothed by ε for `ls`) or on the teacher's top-1.
"""

from __future__ import annotations

import torch

from kdsweep.registry import CACHE_KINDS, LOSSES
from kdsweep.softmax import cross_entropy
from kdsweep.targets import TeacherTargets


def logit_mse(target_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """The τ→∞ limit of τ²·KL: half the mean squared difference of mean-centred logits."""
    d = student_logits - target_logits
    return 0.5 * (d - d.mean(-1, keepdim=True)).pow(2).mean(-1)


def distill_term(
    loss: str, targets: TeacherTargets, z: torch.Tensor, tau: torch.Tensor | float, mode: str
) -> torch.Tensor:
    """The per-row distillation term of `loss` from the cached targets."""
    if LOSSES[loss].distill == "mse":
        return logit_mse(targets.tensors["logits"], z)
    return CACHE_KINDS.load(targets.kind).distill(targets, z, tau, mode)


def student_loss(
    loss: str,
    student_logits: torch.Tensor,
    y: torch.Tensor,
    targets: TeacherTargets,
    lam: torch.Tensor | float,
    tau: torch.Tensor | float,
    epsilon: float,
    topk_mode: str = "tail",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample loss for one batch, and the per-sample distillation term (for diagnostics).

    `targets` are the cached teacher rows of this batch, already transformed by the loss's
    control (`kdsweep.controls`); students of teacher labels get the teacher's argmax as `y`.
    Rows of several positions (a language model's [B, L, V]) are flattened to one per position.
    """
    entry = LOSSES[loss]
    if student_logits.dim() > 2:
        student_logits, y = student_logits.flatten(0, -2), y.flatten()
        targets = targets.flat_positions()
    smoothing = epsilon if entry.smooth_labels else 0.0
    if entry.distill is None:
        labels = cross_entropy(student_logits, y, smoothing)
        return labels, torch.zeros_like(labels)
    distill = distill_term(loss, targets, student_logits, tau, topk_mode)
    if isinstance(lam, float) and lam == 1.0:  # pure distillation: no label term to compute
        return distill, distill.detach()
    ce = cross_entropy(student_logits, y, smoothing)
    return lam * distill + (1 - lam) * ce, distill.detach()
