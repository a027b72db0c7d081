"""Top-k and sampled-k caches against the full cache: bytes per row and bias of the KD loss and of
its gradient, per τ, k and tail model, side by side in one run.

Teacher logits are realistic: a small MNIST-1D cnn1d teacher trained here (well under a minute on
2 cores), its logits on its own training rows (confident: the regime where a top-k tail is tiny);
the student is the same network after its first epoch (a student half-way to the teacher).
Everything is seeded: the figures do not depend on the machine's load.
With `--synthetic`, teacher logits are synthetic instead: the top logit 8–20 above the rest.

Printed:
  1. bytes per row, raw and on disk (Zarr, blosc-zstd + shuffle, CRC32C), for full float16,
     top-k (float16 values + uint8 indices + float32 tail log-sum-exp) and sampled-k (uint8
     indices + float32 weights; its size depends on the τ it draws at);
  2. per τ ∈ {1, 4, 16}, per k, for each topk_mode (tail, spread, renorm) and for sampled-k
     (one cache drawn at that τ, as a student would train on, and the mean over `caches`
     independently drawn ones, which shows its bias): the mean absolute difference of
     the per-row loss from full-cache KD (float16 full cache, the reference), and the relative
     L2 error of the gradient of the mean loss w.r.t. the student logits.
For sampled-k the loss is the CE estimate minus the teacher's entropy at τ (a constant without
gradient), so that it estimates the same KL; its errors are its variance, not bias.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import typer

from kdsweep.cache.format import StoreSpec
from kdsweep.cache.reader import LogitCache
from kdsweep.cache.writer import write_cache
from kdsweep.config import DataParams
from kdsweep.data.sources import mnist1d
from kdsweep.models import build_model
from kdsweep.registry import CACHE_KINDS
from kdsweep.targets import TeacherTargets

TAUS = (1.0, 4.0, 16.0)
TOPK = (1, 2, 5)
SAMPLED = (4, 8)
MODES = ("tail", "spread", "renorm")


def train_teacher(n: int, epochs: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(teacher logits, first-epoch student logits) on n MNIST-1D training rows, test acc."""
    splits = mnist1d(DataParams(n_train=n, n_test=2000, seed=0))
    x, y = splits.x_train, splits.y_train
    torch.manual_seed(0)
    model = build_model("cnn1d", tuple(x.shape[1:]), 10, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(0)
    early = None
    t0 = time.perf_counter()
    for epoch in range(epochs):
        for idx in torch.randperm(n, generator=gen).split(128):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch == 0:
            with torch.no_grad():
                early = model(x)
    with torch.no_grad():
        logits = model(x)
        acc = (model(splits.x_test).argmax(1) == splits.y_test).float().mean().item()
    print(
        f"teacher: cnn1d width 32, {epochs} epochs on {n} MNIST-1D rows in "
        f"{time.perf_counter() - t0:.0f} s, test acc {acc:.3f}"
    )
    return logits, early, acc


def synthetic(n: int, c: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t = torch.randn(n, c, generator=g)
    top = torch.randint(0, c, (n,), generator=g)
    t[torch.arange(n), top] += 8 + 12 * torch.rand(n, generator=g)
    return t, t + 2 * torch.randn(n, c, generator=g)


def encoded(
    kind: str, logits: torch.Tensor, k: int | None, tau: float = 1.0, seed: int = 0
) -> TeacherTargets:
    cls = CACHE_KINDS.load(kind)
    arrays = cls.encode(logits, k, "float16", torch.Generator().manual_seed(seed), tau=tau)
    return TeacherTargets(kind, {a: cls.decode(a, v, "float16") for a, v in arrays.items()})


def loss_and_grad(kind: str, t: TeacherTargets, z: torch.Tensor, tau: float, mode: str):
    z = z.clone().requires_grad_()
    loss = CACHE_KINDS.load(kind).distill(t, z, tau, mode)
    (g,) = torch.autograd.grad(loss.mean(), z)
    return loss.detach().double(), g.double()


def main(rows: int = 4000, epochs: int = 20, use_synthetic: bool = False, caches: int = 32) -> None:
    if use_synthetic:
        teacher, student = synthetic(rows)
        print(f"synthetic teacher logits ({rows} rows, 10 classes, top logit 8–20 above)")
    else:
        teacher, student, _ = train_teacher(rows, epochs)
    c = teacher.shape[1]
    p1 = torch.softmax(teacher.double(), -1)
    tail_mass = 1 - p1.topk(5, 1).values.sum(1)
    print(
        f"teacher p(top-1) median {p1.max(1).values.median():.5f}; top-5 tail mass: median "
        f"{tail_mass.median():.2e}, 10th percentile {tail_mass.quantile(0.1):.2e}\n"
    )

    print("## 1. bytes per row (raw, and on disk: Zarr blosc-zstd + shuffle + CRC32C)")
    tmp = Path(tempfile.mkdtemp(prefix="kdsweep-bench-topk-"))
    stores = [("full", None, 1.0)] + [("topk", k, 1.0) for k in TOPK]
    stores += [("sampled", k, tau) for k in SAMPLED for tau in TAUS]
    print(f"{'kind':8} {'k':>2} {'draw τ':>6} {'raw B/row':>9} {'disk B/row':>10} {'vs full':>8}")
    full_disk = None
    for kind, k, tau in stores:
        spec = StoreSpec(kind=kind, dtype="float16", k=k, chunk_rows=8192, sample_tau=tau)
        path = tmp / f"{kind}-{k}-{tau}.zarr"
        write_cache(path, lambda b: b, {"train": teacher}, spec, c, "bench", "bench")
        info = LogitCache(path).info()
        raw = sum(
            int(np.prod(shape[1:])) * dt.itemsize for shape, dt in spec.layout(1, c, ()).values()
        )
        full_disk = full_disk or info["bytes_per_row"]
        shown = f"{tau:6g}" if kind == "sampled" else ""
        print(
            f"{kind:8} {k or '':>2} {shown:>6} {raw:9d} {info['bytes_per_row']:10.2f} "
            f"{info['bytes_per_row'] / full_disk:7.2f}x"
        )

    print(
        "\n## 2. bias against full-cache KD (float16 full cache): mean |Δloss| per row (nats·τ²)"
        " / relative L2 error of the gradient"
    )
    full = encoded("full", teacher, None)
    cols = (*MODES, "sampled", f"sampled×{caches}")
    header = f"{'τ':>4} {'k':>2} " + " ".join(f"{m:>19}" for m in cols)
    print(header)
    for tau in TAUS:
        ref_loss, ref_grad = loss_and_grad("full", full, student, tau, "tail")
        norm = ref_grad.norm()
        pt = torch.softmax(full.tensors["logits"].double() / tau, -1)
        entropy = -(tau**2) * torch.special.xlogy(pt, pt).sum(-1)
        for k in sorted({*TOPK, *SAMPLED}):
            cells = []
            for mode in MODES:
                if k not in TOPK:
                    cells.append(f"{'':>19}")
                    continue
                loss, grad = loss_and_grad("topk", encoded("topk", teacher, k), student, tau, mode)
                dl = (loss - ref_loss).abs().mean().item()
                cells.append(f"{dl:9.2e} / {(grad - ref_grad).norm() / norm:7.3f}")
            if k in SAMPLED:
                t = encoded("sampled", teacher, k, tau=tau)
                loss, grad = loss_and_grad("sampled", t, student, tau, "tail")
                dl = (loss - entropy - ref_loss).abs().mean().item()
                cells.append(f"{dl:9.2e} / {(grad - ref_grad).norm() / norm:7.3f}")
                # the mean over independently drawn caches: what is left is bias (≈ 0) plus
                # the single cache's noise shrunk by √caches
                draws = [
                    loss_and_grad(
                        "sampled", encoded("sampled", teacher, k, tau, s), student, tau, ""
                    )
                    for s in range(1, caches + 1)
                ]
                loss = torch.stack([d[0] for d in draws]).mean(0)
                grad = torch.stack([d[1] for d in draws]).mean(0)
                dl = (loss - entropy - ref_loss).abs().mean().item()
                cells.append(f"{dl:9.2e} / {(grad - ref_grad).norm() / norm:7.3f}")
            else:
                cells.append(f"{'':>19} {'':>19}")
            print(f"{tau:4g} {k:2d} " + " ".join(cells))


if __name__ == "__main__":
    typer.run(main)
