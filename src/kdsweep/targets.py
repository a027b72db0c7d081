"""Teacher targets in memory: what losses and training consume, free of Zarr.

A cache store decodes to `TeacherTargets` (kdsweep.cache.reader); the losses read its tensors by
the names of its cache kind (kdsweep.cache.kinds). `ViewBatches` turns a student's subset into
mini-batches: replaying cached augmented views, drawing fresh ones, running an online teacher
and picking a sampled store's draw set, as the student's store says.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kdsweep.augment import family_for, fresh_views


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


def pick_draw(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """One draw set per row: a [*lead, *row, R, k], d [*lead] (ints < R) -> [*lead, *row, k]."""
    extra = a.dim() - d.dim() - 2  # the row's own dims (positions of a sequence, ...)
    index = d.reshape(*d.shape, *[1] * extra, 1, 1).expand(*a.shape[:-2], 1, a.shape[-1])
    return a.gather(-2, index).squeeze(-2)


class ViewBatches:
    """Each step's inputs, labels and teacher rows for the sampled row ids, in one call.

    With a cache of augmented views (an `aug` array), every sample of a step gets one of its
    cached views at random: the input is that view replayed from its stored parameters and the
    target is the teacher's output for exactly that view — never a fresh augmentation, never a
    transformed target. With `fresh`, every sample gets a fresh view of the data's family
    instead (online students, and students of labels beside them). With a `teacher` (an online
    store), the targets are its logits on exactly the inputs of the step. A sampled store's rows
    carry R draw sets: each sample gets one of them at random, every step.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        t: TeacherTargets,
        seed: int,
        fresh: bool = False,
        teacher: Callable[[torch.Tensor], torch.Tensor] | None = None,
        drawn: tuple[str, ...] = (),
    ):
        self.x, self.y = x, y
        self.aug = t.tensors.get("aug")
        self.t = TeacherTargets(t.kind, {k: v for k, v in t.tensors.items() if k != "aug"})
        self.gen = torch.Generator().manual_seed(seed)
        self.fresh, self.teacher = fresh, teacher
        self.drawn = drawn  # the kind's arrays with a draw axis (CacheKind.drawn)

    def __call__(
        self, idx: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, TeacherTargets]]:
        """(inputs, (labels, teacher rows)) of the rows `idx`."""
        x, y, t = self.x[idx], self.y[idx], self.t.rows(idx)
        if self.aug is not None:
            view = torch.randint(0, self.aug.shape[1], (len(idx),), generator=self.gen)
            view = view.to(idx.device)
            pick = torch.arange(len(idx), device=idx.device)

            def at_view(v: torch.Tensor) -> torch.Tensor:
                return v[pick, view]

            y = at_view(y) if y.dim() == 2 else y
            t = TeacherTargets(t.kind, {k: at_view(v) for k, v in t.tensors.items()})
            x = family_for(x).apply(x, self.aug[idx, view])
        elif self.fresh:
            x = fresh_views(x, self.gen)
        if self.teacher is not None:
            with torch.no_grad():
                t = TeacherTargets(t.kind, {"logits": self.teacher(x).float()})
        if self.drawn:
            r = t.tensors[self.drawn[0]].shape[-2]
            d = torch.randint(0, r, (len(idx),), generator=self.gen).to(idx.device)
            t = TeacherTargets(
                t.kind,
                {k: pick_draw(v, d) if k in self.drawn else v for k, v in t.tensors.items()},
            )
        return x, (y, t)
