"""Hypothesis-control targets (DESIGN.md §5), after Tang et al. 2020, who split what KD transfers
into universal smoothing, instance-specific confidence and class relationships. Each control is
a fixed transformation of the cached teacher logits, registered in LOSSES as its `impl`,
computed once per student, after which the ordinary KD loss applies. Controls never need a
teacher forward.

Every control is built AT THE TRAINING τ: a target distribution q is fixed at τ and returned as
the logits τ·log q, so that the KD loss's softmax(z/τ) gives back exactly q. (A control built at
τ=1 and then tempered would not have the mass it claims at the loss temperature.)

Signature of every transform: (teacher logits [N, C], labels [N], epsilon, seed, tau) -> target
logits [N, C]. The rows are the student's whole subset (ls_teacher averages over them). Work is
done in float64; distributions come back in at least float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def identity(
    logits: torch.Tensor, y: torch.Tensor, epsilon: float, seed: int, tau: float
) -> torch.Tensor:
    """The teacher's logits unchanged (every loss that is not a control)."""
    return logits


def _target_and_rest(logits: torch.Tensor, y: torch.Tensor, tau: float) -> tuple[torch.Tensor, ...]:
    """(onehot, log p_T^τ(y|x), log of the non-target mass at τ), per row, in float64. The rest
    is a log-sum-exp of the non-target log-probabilities, exact even when p(y) rounds to 1."""
    onehot = F.one_hot(y, logits.shape[-1]).bool()
    log_p = torch.log_softmax(logits.double() / tau, -1)
    log_y = log_p.gather(-1, y[:, None])
    log_rest = torch.logsumexp(log_p.masked_fill(onehot, -math.inf), -1, keepdim=True)
    return onehot, log_y, log_rest


def _as_logits(log_q: torch.Tensor, tau: float, like: torch.Tensor) -> torch.Tensor:
    """τ·log q, so that softmax(·/τ) = q, in the input's dtype promoted to at least float32."""
    return (tau * log_q).to(torch.promote_types(like.dtype, torch.float32))


def ls_teacher(
    logits: torch.Tensor, y: torch.Tensor, epsilon: float, seed: int, tau: float
) -> torch.Tensor:
    """Input-independent smoothing matched to the teacher: q = 1−ε̄ on y and ε̄/(C−1) elsewhere,
    ε̄ the teacher's mean non-target mass at τ over these rows (so the student sees the
    teacher's average confidence, and nothing per sample). `epsilon` is not read."""
    onehot, _, log_rest = _target_and_rest(logits, y, tau)
    eps = log_rest.exp().mean()
    c = logits.shape[-1]
    log_q = torch.where(onehot, torch.log1p(-eps), torch.log(eps / (c - 1)))
    return _as_logits(log_q, tau, logits)


def ls_matched(
    logits: torch.Tensor, y: torch.Tensor, epsilon: float, seed: int, tau: float
) -> torch.Tensor:
    """q(y) = p_T^τ(y|x) per sample, the rest spread uniformly: the teacher's instance-specific
    confidence at τ with no class-similarity structure (the most entropy that mass allows)."""
    onehot, log_y, log_rest = _target_and_rest(logits, y, tau)
    c = logits.shape[-1]
    log_q = torch.where(onehot, log_y, log_rest - math.log(c - 1))
    return _as_logits(log_q, tau, logits)


def shuffled_dk(
    logits: torch.Tensor, y: torch.Tensor, epsilon: float, seed: int, tau: float
) -> torch.Tensor:
    """The teacher's logits with the non-target classes permuted per sample: same target mass
    and entropy at every τ (so `tau` is not read), class-similarity structure destroyed."""
    n, c = logits.shape
    onehot = F.one_hot(y, c).bool()
    gen = torch.Generator().manual_seed(seed)
    # non-target columns in natural order, and the same columns in a random order per row
    natural = torch.argsort(onehot.float(), dim=-1, stable=True)[:, : c - 1]
    keys = torch.rand(n, c, generator=gen).masked_fill(onehot, 2.0)
    shuffled = torch.argsort(keys, dim=-1)[:, : c - 1]
    out = logits.clone()
    out.scatter_(-1, natural, logits.gather(-1, shuffled))
    return out
