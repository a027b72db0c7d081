"""Online KD, the authors' way, against kdsweep's cached and stacked KD, side by side in one run.

(a) the authors' way: one process per student (a fresh Python that imports torch, builds the
    teacher from its checkpoint and trains the student with the teacher's forward pass on every
    step: no cache, no stacking);
(b) kdsweep's way: one process runs the teacher once over the training split into a float16
    `full` store (`cache.writer.write_cache`), reads it back, and trains the students of each α
    stacked (`fit_stacked` with `stacked_student_loss("kd", "full", ...)`).
Same grid for both (MNIST-1D, width-64 cnn1d teacher trained briefly here, width-16 cnn1d
students, α × seeds, KD τ = 4, the same steps and batch); the result is the ratio (a)/(b) of the
whole grid's wall time and CPU time (children's `getrusage`: every process either way runs as a
child of this one, so both sides pay their own start-up). The students' mean test accuracy per α
is printed for both, as a check that the two ways train the same students.

(c) per-step cost of online against cached KD for teachers of about 1x, 3x and 10x the student's
multiply-adds (counted from the conv1d/linear layers; the widths are chosen to hit those ratios,
and the actual ratios printed): one student at a time under `train.fit`, with a batch function
that runs the teacher under `torch.no_grad()` against one that indexes cached logits.

Ratios are the result; absolute times are printed beside them for context only.

  python bench/bench_online.py --quick
  python bench/bench_online.py --threads 2 --steps 500
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import typer
from torch import nn

import kdsweep
from kdsweep.io import load_checkpoint, save_checkpoint
from kdsweep.losses import student_loss
from kdsweep.models import build_model
from kdsweep.targets import TeacherTargets
from kdsweep.train import accuracy, fit, predict

SHAPE, CLASSES, TAU, LAM, LR, WD = (1, 40), 10, 4.0, 1.0, 3e-3, 0.0
RESULT = "bench_online result: "  # a worker's one line of JSON for the parent


# ---------------------------------------------------------------------------------------------
# Shared helpers


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model}, {os.cpu_count()} cores, torch {torch.__version__}, python {platform.python_version()}"


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f} (1 min) / {five:.2f} (5 min)"


def macs(model: nn.Module, length: int = SHAPE[1]) -> int:
    """Multiply-adds of one sample's forward pass through the Conv1d and Linear layers, counted
    from their shapes in module order (the order cnn1d and mlp apply them)."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Conv1d):
            (k,), (s,), (p,), (d,) = m.kernel_size, m.stride, m.padding, m.dilation
            length = (length + 2 * p - d * (k - 1) - 1) // s + 1
            total += length * m.out_channels * (m.in_channels // m.groups) * k
        elif isinstance(m, nn.Linear):
            total += m.in_features * m.out_features
    return total


def cnn(width: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("cnn1d", SHAPE, CLASSES, width)


def subset(n: int, alpha: float, seed: int) -> torch.Tensor:
    """Row ids of the α-subset of subset seed `seed` (the same in (a) and (b))."""
    m = max(1, round(alpha * n))
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:m]


def kd(z: torch.Tensor, ctx: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    y, logits = ctx
    return student_loss("kd", z, y, TeacherTargets("full", {"logits": logits}), LAM, TAU, 0.0)[0]


def online_batches(x: torch.Tensor, y: torch.Tensor, teacher: nn.Module) -> Callable:
    def batch(idx: torch.Tensor) -> tuple[torch.Tensor, Any]:
        xb = x[idx]
        with torch.no_grad():
            return xb, (y[idx], teacher(xb))

    return batch


def cached_batches(x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> Callable:
    return lambda idx: (x[idx], (y[idx], logits[idx]))


def load_data(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


# ---------------------------------------------------------------------------------------------
# Workers: each runs as its own process, started by the parent


def worker_online(spec: dict[str, Any]) -> dict[str, Any]:
    """(a) One student, the teacher run on every batch."""
    d = load_data(Path(spec["data"]))
    teacher = cnn(spec["teacher_width"])
    load_checkpoint(teacher, Path(spec["teacher"]))
    teacher.eval()
    idx = subset(len(d["y_train"]), spec["alpha"], spec["seed"])
    x, y = d["x_train"][idx], d["y_train"][idx]
    student = cnn(spec["student_width"], spec["seed"])
    seconds = fit(
        student,
        x,
        kd,
        spec["steps"],
        spec["batch_size"],
        LR,
        WD,
        spec["seed"],
        batch=online_batches(x, y, teacher),
    )
    acc = accuracy(predict(student, d["x_test"]), d["y_test"])
    return {"train_s": seconds, "acc": acc}


def worker_cached(spec: dict[str, Any]) -> dict[str, Any]:
    """(b) The teacher once over the training split into a float16 full store, then every α's
    students stacked from the cached logits."""
    from kdsweep.cache.format import StoreSpec
    from kdsweep.cache.reader import LogitCache
    from kdsweep.cache.writer import write_cache
    from kdsweep.students.stack import fit_stacked, stacked_student_loss

    d = load_data(Path(spec["data"]))
    teacher = cnn(spec["teacher_width"])
    load_checkpoint(teacher, Path(spec["teacher"]))
    teacher.eval()
    t0 = time.perf_counter()
    store = Path(spec["work"]) / "teacher.zarr"
    write_cache(
        store, teacher, {"train": d["x_train"]}, StoreSpec("full", "float16"), CLASSES, "t", "d"
    )
    logits = LogitCache(store).read("train").tensors["logits"]
    cache_s = time.perf_counter() - t0
    train_s, accs = 0.0, {}
    n, seeds = len(d["y_train"]), spec["seeds"]
    for alpha in spec["alphas"]:
        ids = [subset(n, alpha, s) for s in seeds]
        xs = torch.stack([d["x_train"][i] for i in ids])
        targets = {
            "y": torch.stack([d["y_train"][i] for i in ids]),
            "logits": torch.stack([logits[i] for i in ids]),
        }
        hyper = {h: torch.full((len(seeds),), v, dtype=torch.float64) for h, v in (("lam", LAM), ("tau", TAU))}  # fmt: skip
        out = fit_stacked(
            lambda s: cnn(spec["student_width"], s),
            list(seeds),
            xs,
            targets,
            stacked_student_loss("kd", "full", 0.0),
            hyper,
            spec["steps"],
            spec["batch_size"],
            LR,
            WD,
        )
        train_s += out.seconds
        accs[str(alpha)] = [accuracy(predict(m, d["x_test"]), d["y_test"]) for m in out.models]
    return {"cache_s": cache_s, "train_s": train_s, "acc": accs}


WORKERS = {"online": worker_online, "cached": worker_cached}


# ---------------------------------------------------------------------------------------------
# The parent


def child_cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_utime + u.ru_stime


def run_worker(role: str, spec: dict[str, Any], threads: int) -> dict[str, Any]:
    """Run one worker process; its result line parsed."""
    src = str(Path(kdsweep.__file__).resolve().parents[1])  # the kdsweep this process imports
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, __file__, "--role", role, "--spec", json.dumps(spec)]
    cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"worker {role} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT) :])


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, wall seconds, CPU seconds of this process and its children)."""
    c0, p0, t0 = child_cpu(), time.process_time(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, child_cpu() - c0 + time.process_time() - p0


def prepare(
    work: Path, n_train: int, n_test: int, teacher_width: int, teacher_steps: int
) -> tuple[dict[str, torch.Tensor], float]:
    """MNIST-1D into work/data.safetensors; the teacher trained on it (CE) into teacher.safetensors."""
    from safetensors.torch import save_file

    from kdsweep.config import DataParams
    from kdsweep.data.sources import mnist1d

    s = mnist1d(DataParams(name="mnist1d", n_train=n_train, n_test=n_test, seed=0))
    d = {"x_train": s.x_train, "y_train": s.y_train, "x_test": s.x_test, "y_test": s.y_test}
    save_file({k: v.contiguous() for k, v in d.items()}, work / "data.safetensors")
    teacher = cnn(teacher_width)
    y = s.y_train

    def ce(z: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(z, y[i], reduction="none")

    fit(teacher, s.x_train, ce, teacher_steps, 128, LR, WD, 0, desc="teacher")
    save_checkpoint(teacher, work / "teacher.safetensors", {"arch": "cnn1d"})
    return d, accuracy(predict(teacher, s.x_test), s.y_test)


def widths_for(student_width: int, targets: tuple[float, ...]) -> list[int]:
    """Teacher widths whose multiply-adds are closest to each target multiple of the student's."""
    base, cost, w = macs(cnn(student_width)), {}, 1
    while not cost or cost[w - 1] < 2 * max(targets):  # widths up to twice the largest target
        cost[w] = macs(cnn(w)) / base
        w += 1
    return [min(cost, key=lambda w: abs(cost[w] - t)) for t in targets]


def per_step(
    d: dict[str, torch.Tensor],
    student_width: int,
    teacher_widths: list[int],
    steps: int,
    repeat: int,
    batch_size: int,
) -> None:
    """(c): online against cached KD per step, one student at a time under `fit`."""
    x, y = d["x_train"], d["y_train"]
    base = macs(cnn(student_width))
    print(
        f"\n(c) per-step cost, one student (train.fit, batch {batch_size}, {steps} steps, best of "
        f"{repeat}): student cnn1d:{student_width} = {base:,} multiply-adds/sample; random-init "
        "teachers (the cost of a forward pass does not depend on the weights)"
    )
    head = ("teacher", "MACs/student", "online ms/step", "cached ms/step", "online/cached")
    print("{:<12} {:>13} {:>15} {:>15} {:>14}".format(*head))
    for w in teacher_widths:
        teacher = cnn(w, seed=1).eval()
        logits = predict(teacher, x)
        best = {"online": float("inf"), "cached": float("inf")}
        fit(
            cnn(student_width), x, kd, 5, batch_size, LR, WD, 0, batch=online_batches(x, y, teacher)
        )
        for _ in range(repeat):  # interleaved, so a change in machine load hits both
            for way, batch in (
                ("online", online_batches(x, y, teacher)),
                ("cached", cached_batches(x, y, logits)),
            ):
                s = fit(cnn(student_width), x, kd, steps, batch_size, LR, WD, 0, batch=batch)
                best[way] = min(best[way], s)
        on, ca = best["online"] / steps * 1e3, best["cached"] / steps * 1e3
        ratio = macs(teacher) / base
        print(
            f"{'cnn1d:' + str(w):<12} {ratio:>12.2f}x {on:>15.3f} {ca:>15.3f} {on / ca:>13.2f}x",
            flush=True,
        )


def main(
    steps: int = typer.Option(500, help="optimizer steps per student (both ways, and (c))"),
    threads: int = typer.Option(2, help="torch intra-op threads in every process"),
    quick: bool = typer.Option(False, help="tiny grid and few steps: a smoke test, not a number"),
    n_train: int = 10000,
    alphas: str = typer.Option("0.02,0.1,1", help="comma-separated α"),
    seeds: int = typer.Option(5, help="seeds per α (subset seed = train seed)"),
    batch_size: int = 128,
    teacher_width: int = 64,
    student_width: int = 16,
    teacher_steps: int = typer.Option(1000, help="CE steps of the bench's own teacher"),
    repeat: int = typer.Option(3, help="repeats of (c), best of"),
    role: str = typer.Option("", hidden=True),
    spec: str = typer.Option("", hidden=True),
) -> None:
    torch.set_num_threads(threads)
    if role:  # a worker process
        print(RESULT + json.dumps(WORKERS[role](json.loads(spec))), flush=True)
        return
    alpha_list = [float(a) for a in alphas.split(",")]
    n_test = 1000
    if quick:
        steps, n_train, n_test, alpha_list, seeds = 20, 1000, 200, [0.1, 1.0], 1
        teacher_steps, repeat = 20, 1
    print(f"machine: {machine()}")
    print(f"load average before: {load()}")
    work = Path(tempfile.mkdtemp(prefix="kdsweep-bench-online-"))
    d, teacher_acc = prepare(work, n_train, n_test, teacher_width, teacher_steps)
    grid = len(alpha_list) * seeds
    print(
        f"grid: α {alpha_list} × {seeds} seeds = {grid} students, cnn1d:{student_width} from a "
        f"cnn1d:{teacher_width} teacher (test acc {teacher_acc:.3f}, {teacher_steps} CE steps), "
        f"MNIST-1D n_train {n_train}, KD τ={TAU:g}, {steps} steps, batch {batch_size}, "
        f"{threads} torch threads per process"
    )
    common = {"data": str(work / "data.safetensors"), "teacher": str(work / "teacher.safetensors")}
    common |= {"teacher_width": teacher_width, "student_width": student_width}
    common |= {"steps": steps, "batch_size": batch_size}

    def authors() -> list[dict[str, Any]]:
        return [
            run_worker("online", common | {"alpha": a, "seed": s}, threads)
            for a in alpha_list
            for s in range(seeds)
        ]

    def ours() -> dict[str, Any]:
        spec_b = common | {"alphas": alpha_list, "seeds": list(range(seeds)), "work": str(work)}
        return run_worker("cached", spec_b, threads)

    a_out, a_wall, a_cpu = timed(authors)
    b_out, b_wall, b_cpu = timed(ours)
    a_train = sum(r["train_s"] for r in a_out)
    print(
        f"(a) online, one process per student: wall {a_wall:.1f} s, CPU {a_cpu:.1f} s "
        f"(training loops {a_train:.1f} s)"
    )
    print(
        f"(b) cached + stacked, one process:   wall {b_wall:.1f} s, CPU {b_cpu:.1f} s "
        f"(cache write + read {b_out['cache_s']:.1f} s, training loops {b_out['train_s']:.1f} s)"
    )
    print(f"wall-time ratio (a)/(b): {a_wall / b_wall:.2f}x")
    print(f"CPU-time ratio (a)/(b): {a_cpu / b_cpu:.2f}x")
    print(f"training-loop ratio (a)/(b): {a_train / b_out['train_s']:.2f}x")
    for i, alpha in enumerate(alpha_list):
        acc_a = sum(r["acc"] for r in a_out[i * seeds : (i + 1) * seeds]) / seeds
        acc_b = sum(b_out["acc"][str(alpha)]) / seeds
        print(f"mean test accuracy at α={alpha:g}: (a) {acc_a:.3f}  (b) {acc_b:.3f}")
    per_step(d, student_width, widths_for(student_width, (1, 3, 10)), steps, repeat, batch_size)
    print(f"load average after: {load()} (other processes skew CPU numbers)")


if __name__ == "__main__":
    typer.run(main)
