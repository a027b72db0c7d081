"""Cache kinds (registered in CACHE_KINDS): one class each, holding everything about the kind —
the arrays it stores, how teacher logits are encoded into them and decoded back, the
distillation term a student computes from them, and the teacher's top-1 class.

Per row (one position of a sequence, one view of an image), for C classes:
  full     logits[C]                        float16 | bfloat16 (stored as uint16 bits) | float32
  topk     values[k] (descending logits), indices[k] (smallest uint holding C),
           logsumexp float32 (over all C logits at τ=1, so top-k probabilities are exact)
  sampled  indices[k] drawn with replacement from softmax(logits / tau), duplicates merged,
           weights[k] = draw counts / k (0 in unused slots): Σ_j w_j·f(c_j) is an unbiased
           estimate of E_{c~p_T}[f(c)], so the student's CE on them estimates CE(p_T, p_S).
Encoding is numpy/torch only: this module knows nothing of Zarr.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from kdsweep.errors import KdsweepError
from kdsweep.targets import TeacherTargets

Layout = dict[str, tuple[tuple[int, ...], np.dtype]]


def index_dtype(num_classes: int) -> np.dtype:
    for dt in (np.uint8, np.uint16, np.uint32):
        if num_classes - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise KdsweepError(f"{num_classes} classes do not fit a uint32 index")


def float_dtype(dtype: str) -> np.dtype:
    """The on-disk dtype of a float array (bfloat16 as its uint16 bits: numpy has no bfloat16)."""
    return np.dtype({"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}[dtype])


def to_stored(x: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return x.to(getattr(torch, dtype)).numpy()


def from_stored(a: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(np.ascontiguousarray(a)).float()


def soft_kl(target_logits: torch.Tensor, student_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """τ²·KL(softmax(t/τ) ‖ softmax(s/τ)) per row; zero-probability targets contribute nothing."""
    p = torch.softmax(target_logits / tau, dim=-1)
    log_q = torch.log_softmax(student_logits / tau, dim=-1)
    return tau**2 * (torch.special.xlogy(p, p) - p * log_q).sum(-1)


class CacheKind:
    """The interface every kind implements; `arrays` names what it stores, in order."""

    arrays: ClassVar[tuple[str, ...]]
    floats: ClassVar[tuple[str, ...]] = ()  # arrays stored in the store's float dtype

    @staticmethod
    def layout(n: int, c: int, row: tuple[int, ...], k: int | None, dtype: str) -> Layout:
        raise NotImplementedError

    @staticmethod
    def encode(logits: torch.Tensor, k: int | None, dtype: str, gen: torch.Generator) -> dict:
        """Teacher logits [B, ..., C] (float32) -> {array name: numpy rows}."""
        raise NotImplementedError

    @classmethod
    def decode(cls, name: str, a: np.ndarray, dtype: str) -> torch.Tensor:
        if name in cls.floats:
            return from_stored(a, dtype)
        if np.issubdtype(a.dtype, np.integer):
            return torch.from_numpy(a.astype(np.int64))
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    @staticmethod
    def distill(t: TeacherTargets, z: torch.Tensor, tau: torch.Tensor | float, mode: str):
        """τ²·KL(p_T^τ ‖ p_S^τ) per row (up to a constant without gradient, for `sampled`)."""
        raise NotImplementedError

    @staticmethod
    def top1(t: TeacherTargets) -> torch.Tensor:
        """The teacher's most probable class per row."""
        return t.tensors["indices"][..., 0]


class Full(CacheKind):
    arrays = ("logits",)
    floats = ("logits",)

    @staticmethod
    def layout(n: int, c: int, row: tuple[int, ...], k: int | None, dtype: str) -> Layout:
        return {"logits": ((n, *row, c), float_dtype(dtype))}

    @staticmethod
    def encode(logits: torch.Tensor, k: int | None, dtype: str, gen: torch.Generator) -> dict:
        return {"logits": to_stored(logits, dtype)}

    @staticmethod
    def distill(t: TeacherTargets, z: torch.Tensor, tau: torch.Tensor | float, mode: str):
        return soft_kl(t.tensors["logits"], z, tau)

    @staticmethod
    def top1(t: TeacherTargets) -> torch.Tensor:
        return t.tensors["logits"].argmax(-1)


def _check_k(k: int | None, c: int) -> int:
    assert k is not None
    if k > c:
        raise KdsweepError(f"k={k} is larger than the number of classes ({c}): choose k <= {c}")
    return k


def _log1mexp(x: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """log(1 − exp(x)) for x ≤ −eps, stable at both ends (Mächler 2012); −inf at x = 0.

    The student side passes eps > 0 so that its gradient stays finite when its tail is empty.
    """
    x = x.clamp(max=-eps)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class TopK(CacheKind):
    arrays = ("values", "indices", "logsumexp")
    floats = ("values",)

    @staticmethod
    def layout(n: int, c: int, row: tuple[int, ...], k: int | None, dtype: str) -> Layout:
        return {
            "values": ((n, *row, k or 0), float_dtype(dtype)),
            "indices": ((n, *row, k or 0), index_dtype(c)),
            "logsumexp": ((n, *row), np.dtype(np.float32)),
        }

    @staticmethod
    def encode(logits: torch.Tensor, k: int | None, dtype: str, gen: torch.Generator) -> dict:
        values, idx = logits.topk(_check_k(k, logits.shape[-1]), dim=-1)
        return {
            "values": to_stored(values, dtype),
            "indices": idx.numpy().astype(index_dtype(logits.shape[-1])),
            "logsumexp": logits.logsumexp(-1).numpy().astype(np.float32),
        }

    @staticmethod
    def distill(t: TeacherTargets, z: torch.Tensor, tau: torch.Tensor | float, mode: str):
        """τ²·KL from a top-k cache, per row.

        renorm: teacher probabilities renormalised over its top-k at τ, student full log-softmax
                at τ gathered at the same classes. Ignores the tail entirely, so the student is
                never told to push tail classes down; biased for every k < C.
        tail:   k+1 buckets — the exact top-k probabilities at τ=1 (from the stored logsumexp)
                and one tail bucket 1 − Σp, computed as log1mexp, then tempered as a
                (k+1)-class distribution. Exact at τ=1; for τ≠1 it tempers the tail *sum* rather
                than each tail class, which under-weights the tail.
        Both equal the full-cache KL when k = C.
        """
        values, indices, lse = t.tensors["values"], t.tensors["indices"], t.tensors["logsumexp"]
        log_q = torch.log_softmax(z / tau, dim=-1)
        q_top = log_q.gather(-1, indices)
        if mode == "renorm":
            p = torch.softmax(values / tau, dim=-1)
            return tau**2 * (torch.special.xlogy(p, p) - p * q_top).sum(-1)
        log_p = values - lse.unsqueeze(-1)
        log_p_tail = _log1mexp(torch.logsumexp(log_p, -1, keepdim=True))
        if indices.shape[-1] == z.shape[-1]:  # k = C: the tail is empty, not rounding noise
            log_p_tail = torch.full_like(log_p_tail, -torch.inf)
        p = torch.softmax(torch.cat([log_p, log_p_tail], -1) / tau, dim=-1)
        q_tail = _log1mexp(torch.logsumexp(q_top, -1, keepdim=True), eps=1e-12)
        log_q_buckets = torch.cat([q_top, q_tail], -1)
        return tau**2 * (torch.special.xlogy(p, p) - p * log_q_buckets).sum(-1)


class Sampled(CacheKind):
    arrays = ("indices", "weights")

    @staticmethod
    def layout(n: int, c: int, row: tuple[int, ...], k: int | None, dtype: str) -> Layout:
        return {
            "indices": ((n, *row, k or 0), index_dtype(c)),
            "weights": ((n, *row, k or 0), np.dtype(np.float32)),
        }

    @staticmethod
    def encode(logits: torch.Tensor, k: int | None, dtype: str, gen: torch.Generator) -> dict:
        c = logits.shape[-1]
        k = _check_k(k, c)
        probs = torch.softmax(logits.double().reshape(-1, c), dim=-1)
        draws = torch.multinomial(probs, k, replacement=True, generator=gen)
        counts = torch.zeros_like(probs).scatter_add_(
            1, draws, torch.ones_like(draws, dtype=probs.dtype)
        )
        # keep the distinct draws first (by count, ties by class id), zero weight in unused slots
        w, idx = counts.topk(k, dim=1, sorted=True)
        shape = (*logits.shape[:-1], k)
        return {
            "indices": idx.reshape(shape).numpy().astype(index_dtype(c)),
            "weights": (w / k).reshape(shape).numpy().astype(np.float32),
        }

    @staticmethod
    def distill(t: TeacherTargets, z: torch.Tensor, tau: torch.Tensor | float, mode: str):
        """τ²·Σ_j w_j·(−log p_S^τ(c_j)): an unbiased estimate of τ²·CE(p_T, p_S^τ); it differs
        from τ²·KL by the teacher's entropy, a constant with no gradient."""
        log_q = torch.log_softmax(z / tau, dim=-1)
        return -(tau**2) * (t.tensors["weights"] * log_q.gather(-1, t.tensors["indices"])).sum(-1)
