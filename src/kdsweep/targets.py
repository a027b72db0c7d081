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

from kdsweep.augment import family_for


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


def step_rows(
    x: torch.Tensor,
    batch: dict[str, torch.Tensor],
    gens: list[torch.Generator],
    aug: torch.Tensor | None = None,
    fresh: bool = False,
    teacher: Callable[[torch.Tensor], torch.Tensor] | None = None,
    drawn: tuple[str, ...] = (),
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One step's inputs and targets for K students at once (`ViewBatches` is K = 1, a stack
    of `stack.fit_stacked` any K), so a stacked student sees what it would see alone.

    x [K, bs, ...]: each student's rows; batch {name: [K, bs, ...]}: their labels ("y") and
    teacher rows; gens: each student's own generator, drawn from in this order — the view of
    each sample (`aug` [K, bs, V, 3]: its cached views' parameters; the teacher rows then carry
    the view axis) or a fresh view (`fresh`), then a sampled store's draw set (`drawn`: the
    arrays with a draw axis). With a `teacher` (an online store) the targets are its logits on
    exactly the inputs shown, one forward pass for all K. Views are applied to all K·bs rows at
    once: the families work row by row, so batching changes no value."""
    k, bs = x.shape[:2]

    def each(draw: Callable[[torch.Generator], torch.Tensor]) -> torch.Tensor:
        return torch.stack([draw(g) for g in gens]).to(x.device)

    def show(params: torch.Tensor) -> torch.Tensor:
        return family_for(x[0]).apply(x.flatten(0, 1), params.flatten(0, 1)).view_as(x)

    if aug is not None:
        view = each(lambda g: torch.randint(0, aug.shape[2], (bs,), generator=g))
        rows = torch.arange(k, device=x.device)[:, None]
        cols = torch.arange(bs, device=x.device)[None, :]
        batch = {
            m: v[rows, cols, view] if m != "y" or v.dim() == 3 else v for m, v in batch.items()
        }
        x = show(aug[rows, cols, view])
    elif fresh:
        family = family_for(x[0])
        x = show(each(lambda g: family.draw(bs, 1, g)[:, 0]))
    if drawn:
        r = batch[drawn[0]].shape[-2]
        d = each(lambda g: torch.randint(0, r, (bs,), generator=g))
        batch = batch | {m: pick_draw(batch[m], d) for m in drawn}
    if teacher is not None:
        with torch.no_grad():
            z = teacher(x.flatten(0, 1)).float()
        batch = batch | {"logits": z.view(k, bs, *z.shape[1:])}
    return x, batch


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
        aug = None if self.aug is None else self.aug[idx][None]
        rows = {"y": y[None], **{k: v[None] for k, v in t.tensors.items()}}
        x, rows = step_rows(x[None], rows, [self.gen], aug, self.fresh, self.teacher, self.drawn)
        y = rows.pop("y")[0]
        return x[0], (y, TeacherTargets(t.kind, {k: v[0] for k, v in rows.items()}))
