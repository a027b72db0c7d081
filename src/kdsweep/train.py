"""Training and evaluation: one loop serves teachers and students.

A student sees only its α-subset inputs, labels and the cached teacher rows for them; the
teacher network is never constructed in a student process.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from kdsweep.cache import CacheSplit
from kdsweep.errors import KdsweepError

LossFn = Callable[
    [torch.Tensor, torch.Tensor], torch.Tensor
]  # (logits, batch row ids) -> per-sample


class NonFiniteLoss(KdsweepError):
    """Training diverged: a loss became NaN or inf."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def num_steps(mode: str, value: int, n: int, batch_size: int) -> int:
    """Budget in optimizer steps: `steps` is the same for every α, `epochs` scales with the subset."""
    return value if mode == "steps" else value * math.ceil(n / min(batch_size, n))


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
    inputs: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """AdamW with cosine decay over `steps` steps of shuffled mini-batches (epoch-wise permutations).

    The data order depends only on `seed`, so a student is reproducible on its own. `inputs(idx)`
    replaces `x[idx]` when a batch is built from more than the rows (a replayed augmented view).
    On CUDA the forward pass runs under bf16 autocast, and image models use channels_last
    (the layout cuDNN's convolutions are fastest in). Returns the training wall time in seconds.
    """
    # students on tiny subsets drive their loss towards zero; denormal floats then make CPU
    # arithmetic several times slower (measured ~1.4x on a 600-step α=0.02 student)
    torch.set_flush_denormal(True)
    n = len(x)
    bs = min(batch_size, n)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    cuda = x.device.type == "cuda"
    layout = torch.channels_last if cuda and x.dim() == 4 else torch.contiguous_format
    if layout is torch.channels_last:
        model.to(memory_format=layout)
    model.train()
    t0 = time.perf_counter()
    perm, pos = torch.randperm(n, generator=gen), 0
    for step in tqdm(range(steps), desc=desc, disable=None, leave=False, mininterval=1.0):
        if pos + bs > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + bs].to(x.device)
        pos += bs
        batch = (inputs(idx) if inputs else x[idx]).contiguous(memory_format=layout)
        with torch.autocast(x.device.type, torch.bfloat16, enabled=cuda):
            z = model(batch)
        loss = loss_fn(z.float(), idx).mean()
        if not torch.isfinite(loss):
            raise NonFiniteLoss(
                f"{desc}: loss became {loss.item()} at step {step}; lower the learning rate or "
                "check the cached targets (`kdsweep cache verify`)"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return time.perf_counter() - t0


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch_size]).float() for i in range(0, len(x), batch_size)])


def expected_calibration_error(logits: torch.Tensor, y: torch.Tensor, bins: int = 15) -> float:
    """Standard top-label ECE with equal-width confidence bins."""
    conf, pred = torch.softmax(logits, -1).max(-1)
    correct = (pred == y).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.float().mean() * (conf[m].mean() - correct[m].mean()).abs()
    return float(ece)


def evaluate(
    logits: torch.Tensor, y: torch.Tensor, reference: CacheSplit | None
) -> dict[str, float | None]:
    """Test accuracy, perplexity and calibration, per position for sequence models; agreement
    with the teacher (top-1) and KL(teacher‖student) from the reference cache's test split
    (KL only when that cache holds full logits)."""
    z, y = logits.flatten(0, -2), y.flatten()
    acc = float((z.argmax(-1) == y).float().mean())
    out: dict[str, float | None] = {
        "test_acc": acc,
        "test_error": 1 - acc,
        "test_ppl": math.exp(float(F.cross_entropy(z, y))),
        "ece": expected_calibration_error(z, y),
        "agreement": None,
        "test_kl": None,
    }
    if reference is None:
        return out
    t = reference.tensors
    if reference.kind == "full":
        teacher = t["logits"].flatten(0, -2)
        top1 = teacher.argmax(-1)
        out["test_kl"] = float(
            F.kl_div(
                torch.log_softmax(z, -1),
                torch.log_softmax(teacher, -1),
                log_target=True,
                reduction="batchmean",
            )
        )
    else:
        top1 = t["indices"].flatten(0, -2)[:, 0]
    out["agreement"] = float((z.argmax(-1) == top1).float().mean())
    return out
