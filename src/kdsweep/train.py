"""Training and evaluation: one loop serves teachers and students.

A student sees only its α-subset inputs, labels and the cached teacher rows for them; the
teacher network is never constructed in a student process.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.optim.adam import adam
from tqdm import tqdm

from kdsweep.errors import KdsweepError
from kdsweep.softmax import cross_entropy

# batch(row ids) -> (model inputs, whatever the loss needs of those rows)
BatchFn = Callable[[torch.Tensor], tuple[torch.Tensor, Any]]
LossFn = Callable[[torch.Tensor, Any], torch.Tensor]  # (logits, batch context) -> per-sample


class NonFiniteLoss(KdsweepError):
    """Training diverged: a loss became NaN or inf."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def num_steps(mode: str, value: int, n: int, batch_size: int, min_epochs: int = 0) -> int:
    """Budget in optimizer steps: `steps` is the same for every α, `epochs` scales with the
    subset; either way at least `min_epochs` passes over the n rows."""
    per_epoch = math.ceil(n / min(batch_size, n))
    return max(value if mode == "steps" else value * per_epoch, min_epochs * per_epoch)


class AdamW:
    """AdamW with cosine decay of the learning rate to zero over `steps` steps.

    The update is torch's own (`torch.optim.adam.adam`, its functional form, with decoupled
    weight decay): what `torch.optim.AdamW` + `CosineAnnealingLR` compute, checked step by step in
    tests/test_train.py. Not its fused kernel: that one updates an element in a last partial
    vector of a tensor differently, so a stacked student's weights would depend on its place in
    the stack (tests/test_stack.py). Why not those classes: constructing any `torch.optim.Optimizer` imports
    `torch._dynamo` (about 2.4 s on a 2-core CPU), a fixed cost every stage process paid before
    its first step. AdamW is elementwise, so one instance over stacked parameters [K, ...] is K
    independent optimizers (`stack.fit_stacked`).
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, weight_decay: float, steps: int):
        self.params = list(params)
        self.lr, self.weight_decay, self.steps, self.t = lr, weight_decay, steps, 0
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.state_steps = [torch.zeros(()) for _ in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        pick = lambda xs: [xs[i] for i in live]  # noqa: E731
        adam(
            pick(self.params),
            [self.params[i].grad for i in live],
            pick(self.exp_avg),
            pick(self.exp_avg_sq),
            [],
            pick(self.state_steps),
            decoupled_weight_decay=True,
            amsgrad=False,
            beta1=0.9,
            beta2=0.999,
            lr=self.lr * 0.5 * (1 + math.cos(math.pi * self.t / self.steps)),
            weight_decay=self.weight_decay,
            eps=1e-8,
            maximize=False,
        )
        self.t += 1


class BestVal:
    """The validation curve, and best-validation checkpoint selection (`student.budget.select:
    best_val`), of K students trained together (K = 1 under `fit`): after every `every` steps
    and after the last, each student's mean cross-entropy on its own validation rows
    (log-perplexity for a language model) joins its curve (`curve_of`, the report's evidence
    that the budget is long enough). With `keep_best` each keeps a copy of its state at its
    lowest and gets it back when training ends: a fixed budget lets a small subset overfit far
    past its best (perplexity ~20,000 at α = 0.05 on the language track). Validation rows only,
    never test.

    x, y: each student's validation inputs and labels, [K, n_val, ...] or, for students with
    validation sets of different sizes (a stack across α), lists of K tensors [n_k, ...].
    They are evaluated in chunks of exactly `batch_size` rows per student (a short last chunk,
    or a short set, is padded and the padding left out of the sums), and each student's sum is
    taken over its own rows alone: a student's curve does not depend on which others it is
    evaluated beside. After training, `step` holds each student's chosen step (0: none kept —
    `keep_best` off, or no finite loss).
    """

    def __init__(
        self,
        x: torch.Tensor | list[torch.Tensor],
        y: torch.Tensor | list[torch.Tensor],
        every: int,
        batch_size: int = 256,
        keep_best: bool = True,
    ):
        if every <= 0:
            raise ValueError(f"eval_every must be positive, got {every}")
        if len(x) != len(y):
            raise ValueError(f"{len(x)} students' validation inputs, {len(y)} students' labels")
        self.sizes = [len(v) for v in y]
        if [len(v) for v in x] != self.sizes:
            raise ValueError("each student's validation inputs and labels must have equal rows")
        self.every, self.batch_size, self.keep_best = every, batch_size, keep_best
        padded = -(-max(self.sizes) // batch_size) * batch_size
        self.x, self.y = _pad_rows(x, padded), _pad_rows(y, padded)
        self.loss = torch.full((len(x),), math.inf, dtype=torch.float64)
        self.step = torch.zeros(len(x), dtype=torch.long)
        self.state: list[torch.Tensor] = []
        self.steps: list[int] = []  # the curve: steps evaluated, and each one's losses [K]
        self.losses: list[torch.Tensor] = []

    def due(self, done: int, steps: int) -> bool:
        """Whether to evaluate after `done` of `steps` steps."""
        return done % self.every == 0 or done == steps

    @torch.no_grad()
    def evaluate(self, forward: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Each student's mean validation cross-entropy [K]; forward(x [K, b, ...]) gives the
        K students' logits [K, b, ..., C], in chunks of `batch_size` rows per student."""
        k = len(self.sizes)
        total = torch.zeros(k, dtype=torch.float64, device=self.x.device)
        for i in range(0, self.x.shape[1], self.batch_size):
            z, y = forward(self.x[:, i : i + self.batch_size]), self.y[:, i : i + self.batch_size]
            ce = cross_entropy(z.flatten(0, -2), y.flatten()).view(k, len(y[0]), -1)
            # each student's own rows of the chunk, summed alone (float32, as one student's)
            zero = ce.new_zeros(())
            total += torch.stack(
                [ce[s, : n - i].sum() if n > i else zero for s, n in enumerate(self.sizes)]
            ).double()
        per_row = self.y[0, 0].numel()  # positions of a sequence, else 1
        return total.cpu() / torch.tensor([n * per_row for n in self.sizes], dtype=torch.float64)

    @torch.no_grad()
    def update(self, done: int, losses: torch.Tensor, state: list[torch.Tensor]) -> None:
        """Add `losses` [K] after `done` steps to the curve; with `keep_best`, keep a copy of
        `state` (tensors [K, ...]) for the students whose losses are their lowest so far (NaN
        never is)."""
        self.steps.append(done)
        self.losses.append(losses.double().cpu())
        if not self.keep_best:
            return
        better = losses < self.loss
        self.loss = torch.where(better, losses, self.loss)
        self.step = torch.where(better, done, self.step)
        if not self.state:
            self.state = [s.detach().clone() for s in state]
        for keep, s in zip(self.state, state, strict=True):
            keep.copy_(torch.where(_rows(better, s), s, keep))

    @torch.no_grad()
    def restore(self, state: list[torch.Tensor]) -> None:
        """Write each student's best copy back into `state` (a student without one keeps its own)."""
        if not self.state:
            return
        has = self.step > 0
        for keep, s in zip(self.state, state, strict=True):
            s.copy_(torch.where(_rows(has, s), keep, s))

    def checkpointed(self, k: int) -> bool:
        return bool(self.step[k] > 0)

    def curve_of(self, k: int) -> tuple[list[int], list[float]]:
        """Student k's validation curve: (steps, mean validation cross-entropy at each)."""
        return list(self.steps), [float(v[k]) for v in self.losses]


def _pad_rows(rows: torch.Tensor | list[torch.Tensor], n: int) -> torch.Tensor:
    """K students' rows [n_k, ...] as one tensor [K, n, ...], zero-padded at the end."""
    if isinstance(rows, torch.Tensor) and rows.shape[1] == n:
        return rows
    out = rows[0].new_zeros((len(rows), n, *rows[0].shape[1:]))
    for k, r in enumerate(rows):
        out[k, : len(r)] = r
    return out


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-student mask [K] shaped to broadcast over `like` [K, ...], on its device."""
    return mask.to(like.device).view(-1, *[1] * (like.dim() - 1))


@contextmanager
def flushed_denormals() -> Iterator[None]:
    """Flush denormal floats to zero for the block, then restore IEEE behaviour (the flag is
    process-wide). Students on tiny subsets drive their loss towards zero, and denormals then
    make CPU arithmetic several times slower (measured ~1.4x on a 600-step α=0.02 student)."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def fit(
    model: nn.Module,
    x: torch.Tensor,
    loss_fn: LossFn,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    desc: str = "train",
    batch: BatchFn | None = None,
    select: BestVal | None = None,
) -> float:
    """AdamW with cosine decay over `steps` steps of shuffled mini-batches (epoch-wise permutations).

    The data order depends only on `seed`, so a student is reproducible on its own. `batch(idx)`
    builds a step's inputs and the loss's context (default: `x[idx]` and the row ids `idx`);
    `loss_fn(logits, context)` returns the per-sample loss. With `select` (K = 1) the model ends
    at its best validation checkpoint; a non-finite loss after one ends training there.
    On CUDA the forward pass runs under bf16 autocast, and image models use channels_last
    (the layout cuDNN's convolutions are fastest in). Returns the training wall time in seconds.
    """
    n = len(x)
    bs = min(batch_size, n)
    gen = torch.Generator().manual_seed(seed)
    opt = AdamW(model.parameters(), lr, weight_decay, steps)
    cuda = x.device.type == "cuda"
    layout = torch.channels_last if cuda and x.dim() == 4 else torch.contiguous_format
    if layout is torch.channels_last:
        model.to(memory_format=layout)
    model.train()
    t0 = time.perf_counter()
    state = [t[None] for t in (*model.parameters(), *model.buffers())]  # K = 1 views
    perm, pos = torch.randperm(n, generator=gen), 0
    with flushed_denormals():
        for step in tqdm(range(steps), desc=desc, disable=None, leave=False, mininterval=1.0):
            if pos + bs > n:
                perm, pos = torch.randperm(n, generator=gen), 0
            idx = perm[pos : pos + bs].to(x.device)
            pos += bs
            inputs, context = batch(idx) if batch else (x[idx], idx)
            with torch.autocast(x.device.type, torch.bfloat16, enabled=cuda):
                z = model(inputs.contiguous(memory_format=layout))
            loss = loss_fn(z.float(), context).mean()
            if not torch.isfinite(loss):
                if select is not None and select.checkpointed(0):
                    break
                raise NonFiniteLoss(
                    f"{desc}: loss became {loss.item()} at step {step}; lower the learning rate or "
                    "check the cached targets (`kdsweep cache verify`)"
                )
            opt.zero_grad()
            loss.backward()
            opt.step()
            if select is not None and select.due(step + 1, steps):
                model.eval()
                select.update(step + 1, select.evaluate(lambda xb: model(xb[0])[None]), state)
                model.train()
    if select is not None:
        select.restore(state)
    model.eval()
    return time.perf_counter() - t0


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """The model's float32 outputs on the CPU, batches moved to wherever the model lives."""
    model.eval()
    weight = next(model.parameters(), None)
    device = x.device if weight is None else weight.device
    return torch.cat(
        [
            model(x[i : i + batch_size].to(device)).float().cpu()
            for i in range(0, len(x), batch_size)
        ]
    )


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy, per position for sequence models."""
    return float((logits.flatten(0, -2).argmax(-1) == y.flatten()).float().mean())
