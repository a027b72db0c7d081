"""Teacher targets in memory: what losses and training consume, free of Zarr.

A cache store decodes to `TeacherTargets` (kdsweep.cache.reader); the losses read its tensors by
the names of its cache kind (kdsweep.cache.kinds). `ViewBatches` turns a student's subset into
mini-batches, replaying cached augmented views when the store has them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdsweep.augment import apply_aug


@dataclass(frozen=True)
class TeacherTargets:
    """The cached teacher outputs of some rows, as float32/int64 tensors named by their kind's
    arrays (`logits`; `values`, `indices`, `tail_logsumexp`; `indices`, `weights`; and `aug` when
    the store holds augmented views). An empty `tensors` means labels only."""

    kind: str | None
    tensors: dict[str, torch.Tensor]

    def rows(self, idx: torch.Tensor) -> TeacherTargets:
        return TeacherTargets(self.kind, {k: v[idx] for k, v in self.tensors.items()})

    def flat_positions(self) -> TeacherTargets:
        """One row per position: [B, L, k] -> [B·L, k] and per-position scalars [B, L] -> [B·L]."""
        return TeacherTargets(self.kind, {k: v.flatten(0, 1) for k, v in self.tensors.items()})

    def to(self, device: torch.device | str) -> TeacherTargets:
        return TeacherTargets(self.kind, {k: v.to(device) for k, v in self.tensors.items()})


NO_TARGETS = TeacherTargets(None, {})


class ViewBatches:
    """Each step's inputs, labels and teacher rows for the sampled row ids, in one call.

    With a cache of augmented views (an `aug` array), every sample of a step gets one of its
    cached views at random: the input is that view replayed from its stored parameters and the
    target is the teacher's output for exactly that view — never a fresh augmentation, never a
    transformed target.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, t: TeacherTargets, seed: int):
        self.x, self.y = x, y
        self.aug = t.tensors.get("aug")
        self.t = TeacherTargets(t.kind, {k: v for k, v in t.tensors.items() if k != "aug"})
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(
        self, idx: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, TeacherTargets]]:
        """(inputs, (labels, teacher rows)) of the rows `idx`."""
        x, y, t = self.x[idx], self.y[idx], self.t.rows(idx)
        if self.aug is None:
            return x, (y, t)
        view = torch.randint(0, self.aug.shape[1], (len(idx),), generator=self.gen).to(idx.device)
        pick = torch.arange(len(idx), device=idx.device)

        def at_view(v: torch.Tensor) -> torch.Tensor:
            return v[pick, view]

        y = at_view(y) if y.dim() == 2 else y
        t = TeacherTargets(t.kind, {k: at_view(v) for k, v in t.tensors.items()})
        return apply_aug(x, self.aug[idx, view]), (y, t)
