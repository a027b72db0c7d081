"""Stacked vs sequential student training, measured side by side in one run.

For each student and each K, trains the same K students (same seeds, data and cached-KD loss)
once with `stack.fit_stacked` and once one after another with `train.fit`, and prints the ratio
of training samples/s, stacked/sequential (> 1: stacking pays), and the same ratio for the path
`students.plan.choose_path` picks by itself ("auto": the stacked ratio where it stacks, 1.00x where it
trains one after another, which is then the sequential code itself). Absolute samples/s are
printed beside the ratios for context only. The data are random tensors of MNIST-1D shape; the teacher
targets are random full logits, so no pipeline stage has to run first.

With --sweep it measures the stacked path alone at each K (no sequential run): samples/s
against K, as the ratio to the best K of the same student in the same run — the measurement
behind `students.plan.STACK_MAX_CPU` (the largest group trained at once).

  python bench/bench_stack.py --quick
  python bench/bench_stack.py --device cuda --students cnn1d:32,mlp:32,mlp:256
  python bench/bench_stack.py --sweep --ks 8,16,32,64,128 --students cnn1d:16,mlp:32
"""

from __future__ import annotations

import os
import time

import torch
import typer

from kdsweep.losses import student_loss
from kdsweep.models import build_model
from kdsweep.registry import ARCHS
from kdsweep.students.plan import choose_path
from kdsweep.students.stack import fit_stacked, stacked_student_loss
from kdsweep.targets import TeacherTargets
from kdsweep.train import fit

SHAPE, CLASSES, LAM, TAU = (1, 40), 10, 1.0, 4.0


def make_data(k: int, n: int, device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(k, n, *SHAPE, generator=g)
    ys = torch.randint(0, CLASSES, (k, n), generator=g)
    logits = 3 * torch.randn(k, n, CLASSES, generator=g)
    return xs.to(device), {"y": ys.to(device), "logits": logits.to(device)}


def run_sequential(
    arch: str, width: int, xs: torch.Tensor, t: dict[str, torch.Tensor], steps: int, bs: int
) -> float:
    """Seconds for K students trained one after another, as `students.fit.train_one` does."""
    t0 = time.perf_counter()
    for k in range(len(xs)):
        torch.manual_seed(k)
        model = build_model(arch, SHAPE, CLASSES, width).to(xs.device)
        y, rows = t["y"][k], TeacherTargets("full", {"logits": t["logits"][k]})

        def loss_fn(z: torch.Tensor, i: torch.Tensor, y=y, rows=rows) -> torch.Tensor:
            return student_loss("kd", z, y[i], rows.rows(i), LAM, TAU, 0.0)[0]

        fit(model, xs[k], loss_fn, steps, bs, 0.01, 0.0, k)
    _sync(xs.device)
    return time.perf_counter() - t0


def run_stacked(
    arch: str, width: int, xs: torch.Tensor, t: dict[str, torch.Tensor], steps: int, bs: int
) -> float:
    """Seconds for the same K students trained in one stack."""
    k, dev = len(xs), xs.device
    t0 = time.perf_counter()
    fit_stacked(
        lambda _: build_model(arch, SHAPE, CLASSES, width),
        list(range(k)),
        xs,
        t,
        stacked_student_loss("kd", "full", 0.0),
        {
            name: torch.full((k,), v, dtype=torch.float64)
            for name, v in (("lam", LAM), ("tau", TAU))
        },
        steps,
        bs,
        0.01,
        0.0,
    )
    _sync(dev)
    return time.perf_counter() - t0


def _sweep(
    dev: torch.device, students: str, ks: list[int], steps: int, bs: int, n: int, repeat: int
) -> None:
    """Stacked samples/s at each K, and each as a ratio to the best K of its student; the K
    values are interleaved within each repeat, so a change in machine load hits all."""
    print(
        f"device={dev} threads={torch.get_num_threads()} steps={steps} batch={bs} n={n} "
        f"loss=kd(full, τ={TAU})  stacked path only; ratio = samples/s / the best K's "
        f"(best of {repeat})"
    )
    for spec in students.split(","):
        arch, width = spec.split(":")[0], int(spec.split(":")[1])
        warm_x, warm_t = make_data(2, n, dev)
        run_stacked(arch, width, warm_x, warm_t, 5, bs)
        best = {k: float("inf") for k in ks}
        for _ in range(repeat):
            for k in ks:
                xs, t = make_data(k, n, dev)
                best[k] = min(best[k], run_stacked(arch, width, xs, t, steps, bs))
        rate = {k: k * steps * min(bs, n) / best[k] for k in ks}
        top = max(rate.values())
        print(
            f"{spec:<10} "
            + "  ".join(f"K={k}: {rate[k]:,.0f}/s ({rate[k] / top:.2f})" for k in ks),
            flush=True,
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(
    device: str = "cpu",
    students: str = "cnn1d:32,mlp:32",
    ks: str = typer.Option("1,8,32,128", help="comma-separated K values"),
    steps: int = 100,
    batch_size: int = 128,
    n: int = 4000,
    repeat: int = 1,
    threads: int = typer.Option(0, help="torch intra-op threads; 0 keeps torch's default"),
    quick: bool = typer.Option(False, help="20 steps, one repeat: a smoke test, not a number"),
    sweep: bool = typer.Option(False, help="stacked samples/s against K only, no sequential run"),
) -> None:
    dev = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    k_values = [int(v) for v in ks.split(",")]
    if quick:
        steps, repeat = 20, 1
    print(f"load average before: {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)")
    if sweep:
        _sweep(dev, students, k_values, steps, batch_size, n, repeat)
        print(f"load average after: {os.getloadavg()[0]:.1f} (other processes skew CPU numbers)")
        return
    print(
        f"device={dev} threads={torch.get_num_threads()} steps={steps} batch={batch_size} n={n} "
        f"loss=kd(full, τ={TAU})  ratio = samples/s stacked / samples/s sequential (best of "
        f"{repeat})"
    )
    head = ("student", "params", "K", "stacked", "auto", "seq samples/s", "stk samples/s")
    print("{:<10} {:>7} {:>4} {:>8} {:>7} {:>14} {:>14}".format(*head))
    for spec in students.split(","):
        arch, width = spec.split(":")[0], int(spec.split(":")[1])
        probe = build_model(arch, SHAPE, CLASSES, width)
        size = sum(p.numel() for p in probe.parameters())
        warm_x, warm_t = make_data(2, n, dev)
        run_sequential(arch, width, warm_x, warm_t, 5, batch_size)
        run_stacked(arch, width, warm_x, warm_t, 5, batch_size)
        for k in k_values:
            xs, t = make_data(k, n, dev)
            seq, stk = float("inf"), float("inf")
            for _ in range(repeat):  # interleaved, so a change in machine load hits both paths
                seq = min(seq, run_sequential(arch, width, xs, t, steps, batch_size))
                stk = min(stk, run_stacked(arch, width, xs, t, steps, batch_size))
            samples = k * steps * min(batch_size, n)
            auto = (
                seq / stk
                if choose_path(dev, probe, ARCHS[arch].vmappable, k, "auto") == "stacked"
                else 1.0
            )
            print(
                f"{spec:<10} {size:>7} {k:>4} {seq / stk:>7.2f}x {auto:>6.2f}x "
                f"{samples / seq:>14,.0f} {samples / stk:>14,.0f}",
                flush=True,
            )
    print(f"load average after: {os.getloadavg()[0]:.1f} (other processes skew CPU numbers)")


if __name__ == "__main__":
    typer.run(main)
