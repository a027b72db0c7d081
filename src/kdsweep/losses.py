"""Student losses and the hypothesis-control targets (DESIGN.md §5).

Per sample:  L = λ·τ²·KL(p_T^τ ‖ p_S^τ) + (1−λ)·CE(y, p_S),  p^τ = softmax(z/τ).
The τ→∞ limit of τ²·KL is ½·mean_c((δ_c − δ̄)²) with δ = z_S − z_T: that is `logit_mse`.

Controls never need a teacher forward: they are fixed transformations of the cached teacher
logits (`control_targets`), computed once per student, after which the ordinary KD loss applies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdsweep.cache import CacheSplit

KD_LOSSES = ("kd", "ls_teacher", "ls_matched", "shuffled_dk")


def soft_kl(target_logits: torch.Tensor, student_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """τ²·KL(softmax(t/τ) ‖ softmax(s/τ)) per row; zero-probability targets contribute nothing."""
    p = torch.softmax(target_logits / tau, dim=-1)
    log_q = torch.log_softmax(student_logits / tau, dim=-1)
    return tau**2 * (torch.special.xlogy(p, p) - p * log_q).sum(-1)


def logit_mse(target_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """The τ→∞ limit of τ²·KL: half the mean squared difference of mean-centred logits."""
    d = student_logits - target_logits
    return 0.5 * (d - d.mean(-1, keepdim=True)).pow(2).mean(-1)


def _log1mexp(x: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """log(1 − exp(x)) for x ≤ −eps, stable at both ends (Mächler 2012); −inf at x = 0.

    The student side passes eps > 0 so that its gradient stays finite when its tail is empty.
    """
    x = x.clamp(max=-eps)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def topk_kl(
    values: torch.Tensor,
    indices: torch.Tensor,
    logsumexp: torch.Tensor,
    student_logits: torch.Tensor,
    tau: float,
    mode: str,
) -> torch.Tensor:
    """τ²·KL from a top-k cache, per row.

    renorm: teacher probabilities renormalised over its top-k at τ, student full log-softmax at τ
            gathered at the same classes. Ignores the tail entirely, so the student is never told
            to push tail classes down; biased for every k < C.
    tail:   k+1 buckets — the exact top-k probabilities at τ=1 (from the stored logsumexp) and one
            tail bucket 1 − Σp, computed as log1mexp, then tempered as a (k+1)-class distribution.
            Exact at τ=1; for τ≠1 it tempers the tail *sum* rather than each tail class, which
            under-weights the tail (the bias grows with τ and shrinks as k → C).
    Both equal the full-cache KL when k = C.
    """
    log_q = torch.log_softmax(student_logits / tau, dim=-1)
    q_top = log_q.gather(-1, indices)
    if mode == "renorm":
        p = torch.softmax(values / tau, dim=-1)
        return tau**2 * (torch.special.xlogy(p, p) - p * q_top).sum(-1)
    log_p = values - logsumexp.unsqueeze(-1)
    log_p_tail = _log1mexp(torch.logsumexp(log_p, -1, keepdim=True))
    if (
        indices.shape[-1] == student_logits.shape[-1]
    ):  # k = C: the tail is empty, not rounding noise
        log_p_tail = torch.full_like(log_p_tail, -torch.inf)
    p = torch.softmax(torch.cat([log_p, log_p_tail], -1) / tau, dim=-1)
    q_tail = _log1mexp(torch.logsumexp(q_top, -1, keepdim=True), eps=1e-12)
    log_q_buckets = torch.cat([q_top, q_tail], -1)
    return tau**2 * (torch.special.xlogy(p, p) - p * log_q_buckets).sum(-1)


def sampled_ce(
    indices: torch.Tensor, weights: torch.Tensor, student_logits: torch.Tensor, tau: float
) -> torch.Tensor:
    """τ²·Σ_j w_j·(−log p_S^τ(c_j)): an unbiased estimate of τ²·CE(p_T^τ_sample, p_S^τ).

    It differs from τ²·KL by the teacher's entropy, a constant with no gradient.
    """
    log_q = torch.log_softmax(student_logits / tau, dim=-1)
    return -(tau**2) * (weights * log_q.gather(-1, indices)).sum(-1)


def control_targets(
    loss: str, teacher_logits: torch.Tensor, y: torch.Tensor, epsilon: float, seed: int
) -> torch.Tensor:
    """Teacher-like target logits for each hypothesis control (log-probabilities up to a constant).

    ls_teacher:  log((1−ε)·onehot(y) + ε/C) — uniform smoothing used as a teacher through τ.
    ls_matched:  p(y) = p_T(y|x) (τ=1), the rest spread uniformly: the teacher's target mass with
                 no class-similarity structure.
    shuffled_dk: the teacher's logits with the non-target classes permuted per sample: same target
                 mass and entropy at every τ, class-similarity structure destroyed.
    kd:          the teacher's logits unchanged.
    """
    n, c = teacher_logits.shape
    onehot = F.one_hot(y, c).bool()
    if loss == "kd":
        return teacher_logits
    if loss == "ls_teacher":
        return torch.log(torch.where(onehot, 1 - epsilon + epsilon / c, epsilon / c))
    if loss == "ls_matched":
        p_y = torch.softmax(teacher_logits.double(), -1).gather(-1, y[:, None])
        return torch.log(torch.where(onehot, p_y, (1 - p_y) / (c - 1))).float()
    if loss == "shuffled_dk":
        gen = torch.Generator().manual_seed(seed)
        # non-target columns in natural order, and the same columns in a random order per row
        natural = torch.argsort(onehot.float(), dim=-1, stable=True)[:, : c - 1]
        keys = torch.rand(n, c, generator=gen).masked_fill(onehot, 2.0)
        shuffled = torch.argsort(keys, dim=-1)[:, : c - 1]
        out = teacher_logits.clone()
        out.scatter_(-1, natural, teacher_logits.gather(-1, shuffled))
        return out
    raise ValueError(f"no control targets for loss {loss!r}")


def student_loss(
    loss: str,
    student_logits: torch.Tensor,
    y: torch.Tensor,
    targets: CacheSplit | None,
    lam: float,
    tau: float,
    epsilon: float,
    topk_mode: str = "tail",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample loss for one batch, and the per-sample distillation term (for diagnostics).

    `targets` are the cached teacher rows of this batch, already passed through
    `control_targets` for the controls; `top1_teacher` students get the teacher's argmax as `y`.
    Rows of several positions (a language model's [B, L, V]) are flattened to one per position.
    """
    if student_logits.dim() > 2:
        student_logits, y = student_logits.flatten(0, -2), y.flatten()
        if targets is not None:
            targets = targets.flat_positions()

    def ce() -> torch.Tensor:
        smoothing = epsilon if loss == "ls" else 0.0
        return F.cross_entropy(student_logits, y, reduction="none", label_smoothing=smoothing)

    if loss in ("ce", "ls", "top1_teacher"):
        labels = ce()
        return labels, torch.zeros_like(labels)
    assert targets is not None, f"loss {loss} needs cached teacher targets"
    t = targets.tensors
    if loss == "logit_mse":
        distill = logit_mse(t["logits"], student_logits)
    elif targets.kind == "full":
        distill = soft_kl(t["logits"], student_logits, tau)
    elif targets.kind == "topk":
        distill = topk_kl(t["values"], t["indices"], t["logsumexp"], student_logits, tau, topk_mode)
    else:
        distill = sampled_ce(t["indices"], t["weights"], student_logits, tau)
    if isinstance(lam, float) and lam == 1.0:  # pure distillation: no label term to compute
        return distill, distill.detach()
    return lam * distill + (1 - lam) * ce(), distill.detach()
