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
    tests/test_train.py. Why not those classes: constructing any `torch.optim.Optimizer` imports
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
) -> float:
    """AdamW with cosine decay over `steps` steps of shuffled mini-batches (epoch-wise permutations).

    The data order depends only on `seed`, so a student is reproducible on its own. `batch(idx)`
    builds a step's inputs and the loss's context (default: `x[idx]` and the row ids `idx`);
    `loss_fn(logits, context)` returns the per-sample loss.
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
                raise NonFiniteLoss(
                    f"{desc}: loss became {loss.item()} at step {step}; lower the learning rate or "
                    "check the cached targets (`kdsweep cache verify`)"
                )
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return time.perf_counter() - t0


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch_size]).float() for i in range(0, len(x), batch_size)])


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy, per position for sequence models."""
    return float((logits.flatten(0, -2).argmax(-1) == y.flatten()).float().mean())
