"""Cache kinds (registered in CACHE_KINDS): one class each, holding everything about the kind —
the arrays it stores, how teacher logits are encoded into them and decoded back, the
distillation term a student computes from them, and the teacher's top-1 class.

Per row (one position of a sequence, one view of an image), for C classes (format version 3):
  full     logits[C]                        float16 | bfloat16 (stored as uint16 bits) | float32
  topk     values[k] (descending logits, in the store's float dtype), indices[k] (smallest
           uint holding C), tail_logsumexp float32: the log-sum-exp of the C − k logits NOT in
           the top-k, from the unrounded float32 logits (−inf when k = C). The (k+1)-bucket
           distribution at τ = 1 is then exact to float32 whatever the tail mass (1e-12 too):
             log p_top  = v − logaddexp(logsumexp(v), tail_logsumexp)
             log p_tail = tail_logsumexp − logaddexp(logsumexp(v), tail_logsumexp)
           (format 2 stored the log-sum-exp over all C classes and recovered the tail as
           log(1 − Σ p_top): catastrophic cancellation against float16 values once the tail
           mass fell below ~1e-2.)
  sampled  indices[R, k] drawn with replacement from softmax(logits / τ_store) (τ_store: the
           root attribute `sample_tau`), duplicates merged, weights[R, k] = draw counts / k (0
           in unused slots): Σ_j w_j·f(c_j) is an unbiased estimate of E_{c~p_T^τ}[f(c)], so the
           student's τ²·CE at τ = τ_store on them estimates τ²·CE(p_T^τ, p_S^τ). R (the root
           attribute `draws`) independent draw sets per row: a student picks one per row per
           step (`TeacherTargets.pick_draws`), so over hundreds of epochs it sees R estimates,
           not one fixed noisy label (format 3 held one set).
  online   no training rows at all — its students run the teacher on every batch — and the
           test split's logits in float32 (agreement and KL when it is the reference store).
Encoding is numpy/torch only: this module knows nothing of Zarr.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch

from kdsweep.errors import KdsweepError
from kdsweep.softmax import log_softmax, softmax
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
    p = softmax(target_logits / tau)
    log_q = log_softmax(student_logits / tau)
    return tau**2 * (torch.special.xlogy(p, p) - p * log_q).sum(-1)


class CacheKind:
    """The interface every kind implements; `arrays` names what it stores, in order."""

    arrays: ClassVar[tuple[str, ...]]
    floats: ClassVar[tuple[str, ...]] = ()  # arrays stored in the store's float dtype
    # arrays with a draw axis [..., R, k] before the last (one set picked per row per step)
    drawn: ClassVar[tuple[str, ...]] = ()

    @staticmethod
    def layout(
        n: int, c: int, row: tuple[int, ...], k: int | None, dtype: str, draws: int = 1
    ) -> Layout:
        raise NotImplementedError

    @staticmethod
    def encode(
        logits: torch.Tensor,
        k: int | None,
        dtype: str,
        gen: torch.Generator,
        tau: float = 1.0,
        draws: int = 1,
    ) -> dict:
        """Teacher logits [B, ..., C] (float32) -> {array name: numpy rows}; `tau` and `draws`:
        the temperature and number of draw sets of a sampled store (the other kinds ignore them)."""
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
        """τ²·KL(p_T^τ ‖ p_S^τ) per row (up to a constant without gradient, for `sampled`);
        `mode` is the method's topk_mode (only `topk` reads it)."""
        raise NotImplementedError

    @staticmethod
    def top1(t: TeacherTargets) -> torch.Tensor:
        """The teacher's most probable class per row."""
        return t.tensors["indices"][..., 0]


class Full(CacheKind):
    arrays = ("logits",)
    floats = ("logits",)

    @staticmethod
    def layout(
        n: int, c: int, row: tuple[int, ...], k: int | None, dtype: str, draws: int = 1
    ) -> Layout:
        return {"logits": ((n, *row, c), float_dtype(dtype))}

    @staticmethod
    def encode(
        logits: torch.Tensor,
        k: int | None,
        dtype: str,
        gen: torch.Generator,
        tau: float = 1.0,
        draws: int = 1,
    ) -> dict:
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


def _not_in(indices: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A mask of `like`'s shape: True for the classes NOT listed in `indices` (the tail)."""
    return torch.ones_like(like, dtype=torch.bool).scatter(-1, indices, False)


class TopK(CacheKind):
    arrays = ("values", "indices", "tail_logsumexp")
    floats = ("values",)

    @staticmethod
    def layout(
        n: int, c: int, row: tuple[int, ...], k: int | None, dtype: str, draws: int = 1
    ) -> Layout:
        return {
            "values": ((n, *row, k or 0), float_dtype(dtype)),
            "indices": ((n, *row, k or 0), index_dtype(c)),
            "tail_logsumexp": ((n, *row), np.dtype(np.float32)),
        }

    @staticmethod
    def encode(
        logits: torch.Tensor,
        k: int | None,
        dtype: str,
        gen: torch.Generator,
        tau: float = 1.0,
        draws: int = 1,
    ) -> dict:
        logits = logits.float()
        values, idx = logits.topk(_check_k(k, logits.shape[-1]), dim=-1)
        tail = logits.masked_fill(~_not_in(idx, logits), -torch.inf).logsumexp(-1)  # −inf: k = C
        return {
            "values": to_stored(values, dtype),
            "indices": idx.numpy().astype(index_dtype(logits.shape[-1])),
            "tail_logsumexp": tail.numpy().astype(np.float32),
        }

    @staticmethod
    def distill(t: TeacherTargets, z: torch.Tensor, tau: torch.Tensor | float, mode: str):
        """τ²·KL from a top-k cache, per row. The student's log-probabilities at τ are gathered
        at the teacher's top-k classes; its tail log-mass is the log-sum-exp of its own
        log-probabilities over the other C − k classes (masked, never log(1 − Σ q): exact, and
        its gradient — a softmax over the tail — is finite however small the tail).

        tail:   k+1 buckets — the teacher's top-k logits and its tail log-sum-exp, tempered as a
                (k+1)-class distribution, against the student's top-k and tail log-mass at τ.
                Exact at τ = 1 (it is then the teacher's exact bucket distribution); for τ ≠ 1
                it tempers the tail's *sum*, which under-weights the tail.
        spread: the teacher's tail mass spread evenly over the C − k absent classes before
                tempering (each absent class gets logit tail_logsumexp − log(C − k)): a full
                C-class target, equal to the full-cache KL at every τ when the teacher's tail is
                uniform; the student's absent classes each match 1/(C − k) of that tail.
        renorm: teacher probabilities renormalised over its top-k at τ, student full log-softmax
                at τ gathered at the same classes. Ignores the tail entirely, so the student is
                never told to push tail classes down; biased for every k < C.
        All three equal the full-cache KL when k = C: the tail bucket is then dropped (a fact of
        the shapes, so no branch ever evaluates log 0).
        """
        values, indices = t.tensors["values"], t.tensors["indices"]
        log_q = log_softmax(z / tau)
        q_top = log_q.gather(-1, indices)
        k, c = indices.shape[-1], z.shape[-1]
        if mode == "renorm" or k == c:
            p = softmax(values / tau)
            return tau**2 * (torch.special.xlogy(p, p) - p * q_top).sum(-1)
        tail = t.tensors["tail_logsumexp"].unsqueeze(-1)
        in_tail = _not_in(indices, log_q)
        if mode == "spread":
            # k top classes + (C − k) absent classes of logit tail − log(C − k) each, tempered;
            # the absent classes share one bucket of log-mass (tail − log(C−k))/τ + log(C−k)
            log_n = math.log(c - k)
            buckets = torch.cat([values / tau, (tail - log_n) / tau + log_n], -1)
            p = softmax(buckets)
            q_absent = log_q.masked_fill(~in_tail, 0.0).sum(-1, keepdim=True) / (c - k)
            # Σ_absent p_a·(log p_a − log q_a) with p_a = P_tail/(C − k) for every absent a
            log_q_buckets = torch.cat([q_top, q_absent + log_n], -1)
        else:
            p = softmax(torch.cat([values, tail], -1) / tau)
            q_tail = log_q.masked_fill(~in_tail, -torch.inf).logsumexp(-1, keepdim=True)
            log_q_buckets = torch.cat([q_top, q_tail], -1)
        return tau**2 * (torch.special.xlogy(p, p) - p * log_q_buckets).sum(-1)


class Online(Full):
    """Targets computed by the teacher on every batch (`students.inputs`), shaped as a full
    cache's logits; the store itself holds only the test split's logits (float32)."""


class Sampled(CacheKind):
    arrays = ("indices", "weights")
    drawn = ("indices", "weights")

    @staticmethod
    def layout(
        n: int, c: int, row: tuple[int, ...], k: int | None, dtype: str, draws: int = 1
    ) -> Layout:
        return {
            "indices": ((n, *row, draws, k or 0), index_dtype(c)),
            "weights": ((n, *row, draws, k or 0), np.dtype(np.float32)),
        }

    @staticmethod
    def encode(
        logits: torch.Tensor,
        k: int | None,
        dtype: str,
        gen: torch.Generator,
        tau: float = 1.0,
        draws: int = 1,
    ) -> dict:
        c = logits.shape[-1]
        k = _check_k(k, c)
        logits = logits.unsqueeze(-2).expand(*logits.shape[:-1], draws, c)  # R independent sets
        probs = torch.softmax(logits.double().reshape(-1, c) / tau, dim=-1)
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
        """τ²·Σ_j w_j·(−log p_S^τ(c_j)): an unbiased estimate of τ²·CE(p_T^τ, p_S^τ) when τ is
        the store's own `sample_tau` (config validation makes every student of a sampled store
        train at exactly that τ); it differs from τ²·KL by the teacher's entropy at τ, a
        constant with no gradient. Rows as stored still carry their R draw sets [..., R, k]
        (training picks one per row and step): the term is then the mean of the R estimates."""
        w, i = t.tensors["weights"], t.tensors["indices"]
        log_q = log_softmax(z / tau)
        if w.dim() > z.dim():
            log_q = log_q.unsqueeze(-2).expand(*i.shape[:-1], log_q.shape[-1])
            return -(tau**2) * (w * log_q.gather(-1, i)).sum(-1).mean(-1)
        return -(tau**2) * (w * log_q.gather(-1, i)).sum(-1)

    @staticmethod
    def top1(t: TeacherTargets) -> torch.Tensor:
        """The most drawn class of the first draw set (of rows as stored: [..., R, k])."""
        return t.tensors["indices"][..., 0, 0]
