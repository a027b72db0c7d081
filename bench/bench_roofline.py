"""Roofline of student training: this machine's fp32 matmul peak and the GFLOP/s that training
achieves as the pipeline runs it, measured side by side in one run with one torch thread count.

Students: the default (cnn1d width 16, batch 128, MNIST-1D inputs [1, 40], 10 classes) and a 4x
wider one (width 64), each on the path and at the stack size the planner picks for the default
params.yaml (`students.plan`: `stack_key`, `choose_path`, `split_stack` under `max_stack`; the
size that trains the most of its students), with as many stacks side by side as the local
executor trains at once (`plan.local_workers`, each with `plan.train_threads` threads: on this
2-core CPU two stacks of one thread each) — and, beside it, one stack with all the threads (how
the pipeline ran before), eager and compiled (`torch.compile` of the stacked step, whose compile
seconds are printed beside it, with the steps after which it would pay; compiled stacks train
one at a time, `plan.local_workers`).
A student the planner trains sequentially is also measured stacked (as `student.stacked: on`
would), marked "forced", which is where its compiled figure comes from.

FLOPs per sample: 2 × the multiply-adds of every Conv1d and Linear of the forward pass (from the
layers' shapes), × 3 for forward + backward (the gradients with respect to inputs and to
weights). ReLU, the loss, AdamW and the batch gathering are not counted: they are part of what
the achieved rate loses. The headline is achieved / peak.

  python bench/bench_roofline.py                    # CPU, about 2 minutes
  python bench/bench_roofline.py --device cuda
  python bench/bench_roofline.py --profile          # + torch.profiler's top ops, default stack
                                                    #   (model set-up included, data not)
"""

from __future__ import annotations

import functools
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import typer
from torch import nn

from kdsweep.config import load_params
from kdsweep.data.prepared import subset_size
from kdsweep.models import build_model
from kdsweep.registry import ARCHS
from kdsweep.students.plan import (
    STACK_MIN_SPLIT,
    choose_path,
    local_workers,
    max_stack,
    split_stack,
    stack_key,
    stage_jobs,
    student_model,
    train_threads,
)
from kdsweep.students.stack import fit_stacked, mixed_loss, recipe, recipe_hyper
from kdsweep.targets import TeacherTargets
from kdsweep.train import fit

REPO = Path(__file__).resolve().parents[1]
SHAPE, CLASSES, BATCH, ROWS = (1, 40), 10, 128, 4000


def matmul_peak(device: torch.device, seconds: float) -> float:
    """fp32 GFLOP/s of torch.matmul on large square matrices (best of two sizes)."""
    best = 0.0
    for n in (2048, 4096) if device.type == "cpu" else (8192, 16384):
        a, b = (torch.randn(n, n, device=device) for _ in range(2))
        a @ b
        _sync(device)
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 2:
            a @ b
            reps += 1
            _sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9)
    return best


def train_flops(model: nn.Module, shape: tuple[int, ...]) -> int:
    """Training FLOPs per sample: 3 × 2 × the forward's multiply-adds of Conv1d and Linear."""
    macs = 0

    def count(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(mod, nn.Conv1d):
            macs += out[0].numel() * mod.in_channels // mod.groups * mod.kernel_size[0]
        elif isinstance(mod, nn.Linear):
            macs += mod.in_features * mod.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    with torch.no_grad():
        model(torch.zeros(1, *shape))
    for h in hooks:
        h.remove()
    return 3 * 2 * macs


def planned(width: int, device: torch.device) -> tuple[str, Counter]:
    """The path and the stack sizes (stack size -> students trained at it) the planner picks
    for the default params.yaml's students of `width`, over every student stage."""
    p = load_params(REPO / "params.yaml")
    sizes: Counter = Counter()
    path = "sequential"
    n_all = p.data.n_train
    for store in [*p.cache.stores, None]:
        kind = p.cache.stores[store].kind if store else None
        t = TeacherTargets(kind, {})
        groups: dict[tuple, int] = {}
        for job in stage_jobs(p, store):
            if job.st.width != width:
                continue
            m = subset_size(job.alpha, n_all)
            n = m - round(p.student.val_fraction * m)
            key = stack_key(job, t, n)
            groups[key] = groups.get(key, 0) + 1
            probe_st = job.st
        for k in groups.values():
            probe = student_model(probe_st, CLASSES, torch.zeros(1, *SHAPE), 0)
            path = choose_path(device, probe, ARCHS[probe_st.arch].vmappable, k, "auto")
            if path == "stacked":
                most = max_stack(device, probe, torch.zeros(1, *SHAPE), BATCH)
                for g in split_stack(k, local_workers(p.student), most, STACK_MIN_SPLIT):
                    sizes[len(g)] += len(g)
            else:
                sizes[1] += k
    return path, sizes


def placement() -> tuple[int, int]:
    """(stacks at once, torch threads each) of the default params' local student stages."""
    p = load_params(REPO / "params.yaml")
    return local_workers(p.student), train_threads(p.student)


@functools.cache
def _data(k: int, device: torch.device) -> tuple[list, dict]:
    """K students' random rows of MNIST-1D shape and random full-cache logits (made once per K,
    outside every timing and profile)."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(ROWS, *SHAPE, generator=g).to(device) for _ in range(k)]
    ys = [torch.randint(0, CLASSES, (ROWS,), generator=g).to(device) for _ in range(k)]
    logits = [(3 * torch.randn(ROWS, CLASSES, generator=g)).to(device) for _ in range(k)]
    return xs, {"y": ys, "logits": logits}


def run_stacked(
    width: int,
    k: int,
    steps: int,
    device: torch.device,
    compiled: bool,
    workers: int = 1,
    threads: int = 0,
) -> tuple[float, float]:
    """(seconds per step after the first, seconds of the first step) of `workers` stacks of K
    default-recipe KD students each, trained side by side in threads of this process with
    `threads` torch threads (0: as set), as the local executor runs a stage's stacks; the
    slowest stack's figures."""
    if threads:
        torch.set_num_threads(threads)
    if workers == 1:
        return _one_stack(width, k, steps, device, compiled)
    with ThreadPoolExecutor(workers) as pool:
        runs = list(
            pool.map(lambda _: _one_stack(width, k, steps, device, compiled), range(workers))
        )
    return max(r[0] for r in runs), max(r[1] for r in runs)


def _one_stack(
    width: int, k: int, steps: int, device: torch.device, compiled: bool
) -> tuple[float, float]:
    xs, targets = _data(k, device)
    hyper = recipe_hyper([recipe("kd", "full", 1.0, 4.0, 0.0)] * k)
    res = fit_stacked(
        lambda _: build_model("cnn1d", SHAPE, CLASSES, width),
        list(range(k)),
        xs,
        targets,
        mixed_loss("full", hyper),
        hyper,
        steps,
        BATCH,
        0.01,
        0.0,
        compiled=compiled,
    )
    _sync(device)
    return (res.seconds - res.first_step) / (steps - 1), res.first_step


def run_sequential(width: int, steps: int, device: torch.device) -> float:
    """Seconds per step of one student trained alone (train.fit, as students.fit.train_one)."""
    xs, targets = _data(1, device)
    logits = targets["logits"][0]
    model = build_model("cnn1d", SHAPE, CLASSES, width).to(device)

    def loss_fn(z: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(logits[i] / 4, -1)
        return 16 * (torch.special.xlogy(p, p) - p * torch.log_softmax(z / 4, -1)).sum(-1)

    fit(model, xs[0], loss_fn, 3, BATCH, 0.01, 0.0, 0)  # warm
    seconds = fit(model, xs[0], loss_fn, steps, BATCH, 0.01, 0.0, 0)
    _sync(device)
    return seconds / steps


def _steps(per_step: float, seconds: float) -> int:
    return max(5, int(seconds / max(per_step, 1e-6)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(
    device: str = typer.Option("cpu", help="cpu | cuda"),
    seconds: float = typer.Option(4.0, help="seconds per measurement"),
    threads: int = typer.Option(0, help="torch intra-op threads; 0 keeps torch's default"),
    profile: bool = typer.Option(False, help="torch.profiler's top ops of the default stack"),
) -> None:
    dev = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    print(f"load average before: {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)")
    peak = matmul_peak(dev, seconds)
    print(
        f"device={dev} threads={torch.get_num_threads()}: fp32 matmul peak {peak:,.0f} GFLOP/s "
        f"(torch.matmul, large square matrices)"
    )
    cores = torch.get_num_threads()
    workers, each = placement() if dev.type == "cpu" else (1, cores)
    print(
        f"the pipeline's placement: {workers} stack(s) side by side, {each} thread(s) each "
        f"(plan.local_workers, plan.train_threads); beside it: 1 stack, {cores} threads"
    )
    head = (
        "student",
        "path",
        "K",
        "stacks",
        "mode",
        "samples/s",
        "GFLOP/s",
        "of peak",
        "compile s",
    )
    line = "{:<10} {:<17} {:>4} {:>6} {:<9} {:>10} {:>8} {:>8} {:>10}"
    print(line.format(*head))
    headline = None
    for width in (16, 64):
        path, sizes = planned(width, dev)
        flops = train_flops(build_model("cnn1d", SHAPE, CLASSES, width), SHAPE)
        k = sizes.most_common(1)[0][0] if sizes else 32
        planned_sizes = ", ".join(f"{n} at K={kk}" for kk, n in sorted(sizes.items()))
        print(f"cnn1d w{width}: {flops:,} FLOP per sample; planner: {path}, {planned_sizes}")
        rows = []
        if path == "sequential":
            torch.set_num_threads(cores)
            step = run_sequential(width, 5, dev)
            step = run_sequential(width, _steps(step, seconds), dev)
            rows.append(("sequential", 1, 1, "eager", step, None))
            k = max(8, max((kk for kk in sizes if kk > 1), default=8))
        label = "stacked" if path == "stacked" else "stacked (forced)"
        step, _ = run_stacked(width, k, 4, dev, False, workers, each)
        eager, first_eager = run_stacked(width, k, _steps(step, seconds), dev, False, workers, each)
        rows.append((label, k, workers, "eager", eager, None))
        if workers > 1:  # the same stack alone with every thread, as before local workers
            one, first_one = run_stacked(width, k, _steps(eager, seconds), dev, False, 1, cores)
            rows.append(("one stack", k, 1, "eager", one, None))
        # compiled stacks train one at a time with every thread (plan.local_workers): against
        # that placement's eager step
        base, first_base = (one, first_one) if workers > 1 else (eager, first_eager)
        compiled, first_compiled = run_stacked(width, k, _steps(base, seconds), dev, True, 1, cores)
        rows.append(("one stack", k, 1, "compiled", compiled, first_compiled - first_base))
        for where, kk, n, mode, per_step, compile_s in rows:
            rate = n * kk * BATCH / per_step
            gflops = rate * flops / 1e9
            extra = f"{compile_s:>10.1f}" if compile_s is not None else ""
            print(
                line.format(
                    "w" + str(width),
                    where,
                    kk,
                    n,
                    mode,
                    f"{rate:,.0f}",
                    f"{gflops:.1f}",
                    f"{gflops / peak:.1%}",
                    extra,
                ),
                flush=True,
            )
            if width == 16 and where == label and mode == "eager" and path == "stacked":
                headline = (where, kk, n, gflops)
        saved = base - compiled
        verdict = (
            f"pays after {(first_compiled - first_base) / saved:,.0f} steps"
            if saved > 0
            else "never pays"
        )
        print(
            f"  compiled / eager step time {compiled / base:.2f}x at K={k}: compiling {verdict}"
            f" (plan.COMPILE_BREAK_EVEN['{dev.type}'] for the default student)"
        )
        if workers > 1:
            print(
                f"  {workers} stacks side by side / one stack: {one / eager * workers:.2f}x the samples/s"
            )
    if headline:
        where, kk, n, gflops = headline
        print(
            f"HEADLINE: default student as the pipeline runs it ({n} {where} stack(s) of K={kk} "
            f"side by side, {each} thread(s) each, eager): {gflops:.1f} GFLOP/s = "
            f"{gflops / peak:.1%} of the matmul peak ({peak:,.0f})"
        )
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        k = planned(16, dev)[1].most_common(1)[0][0]
        _data(k, dev)
        activities = [ProfilerActivity.CPU] + (
            [ProfilerActivity.CUDA] if dev.type == "cuda" else []
        )
        with torch_profile(activities=activities) as prof:
            run_stacked(16, k, 20, dev, False, 1, each)  # one stack of the pipeline's
        sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=15))
    print(f"load average after: {os.getloadavg()[0]:.1f} (other processes skew CPU numbers)")


if __name__ == "__main__":
    typer.run(main)
