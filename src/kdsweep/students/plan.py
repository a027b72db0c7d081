"""Planning a student stage: which students to train (`StudentJob`, `stage_jobs`), which of them
can share a stack (`stack_key`, `plan_stacks`), whether stacking pays on this device, how many fit
in memory at once, and what about this process changes a student's rounding (`machine`)."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdsweep.config import MethodParams, Params, StudentParams
from kdsweep.models import build_model, global_seed, n_params
from kdsweep.registry import ARCHS
from kdsweep.targets import TeacherTargets
from kdsweep.train import num_steps, pick_device

# Largest student (parameter count) for which the stacked path is chosen on a CPU. Measured with
# bench/bench_stack.py (2 cores, batch 128, MNIST-1D shapes, cached KD), stacked/sequential
# samples/s. With vmap's grouped convolutions (before models.stacked; 1 thread, K = 8 / 32):
# cnn1d w8 (0.9k) 1.9/2.4x, w16 (2.5k) 1.8/2.3x, w32 (8k) 1.4/1.4x, w64 (28k) 1.1/1.0x; mlp w32
# (2.7k) 2.5/5.6x, w64 (7k) 2.5/4.2x, w128 (23k) 2.2/2.6x, w256 (79k) 1.2/1.4x; the bound was
# 25,000. With the batched-matmul forward (2 threads, the pipeline's default, K = 8, best of 2,
# a shared machine): cnn1d w64 (28k) 1.41x (K = 20: 1.44x), w80 (43k) 1.30x, w96 (61k) 1.22x,
# w128 (106k) 0.95x; mlp w256 (79k) 1.40x, w512 (289k) 0.73x; 1 thread: cnn1d w64 1.05-1.14x at
# K = 4-16, w16 2.2x at K = 8 and 2.8x at K = 32. At K = 1 stacking costs 0.5-0.8x.
CPU_STACK_MAX_PARAMS = 80_000


@dataclass(frozen=True)
class StudentJob:
    """One student: the recipe, the store it reads (None: labels only), its configuration
    (`student`: a key of `students:`, `st`: that configuration), the subset and the seed."""

    method: str
    m: MethodParams
    tau: float
    alpha: float
    subset_seed: int
    train_seed: int
    store: str | None
    student: str
    st: StudentParams

    @property
    def seed(self) -> int:
        """Initialisation and data-order seed: distinct for every (subset seed, train seed)."""
        return 1000 * self.subset_seed + self.train_seed


def student_jobs(p: Params, method: str, store: str | None) -> list[StudentJob]:
    """Every student of `method` that reads `store`: its student configurations × α × subset
    seeds × train seeds × τ."""
    m = p.methods[method]
    configs = {name: p.student_config(name) for name in p.students_of(method)}
    return [
        StudentJob(method, m, tau, alpha, s, r, store, name, configs[name])
        for name, alpha, s, r, tau in itertools.product(
            configs,
            p.alphas_of(method),
            p.subset_seeds,
            p.student.train_seeds,
            m.taus,
        )
    ]


def stack_key(job: StudentJob, t: TeacherTargets, n_train: int) -> tuple:
    """Students with equal keys can share one stack: equal networks (the configuration's
    architecture and width; the stage fixes the input shape), equal batches, learning rate,
    weight decay, step count and validation schedule (one AdamW, one cosine schedule, one
    evaluation every `eval_every` steps), and targets of the same arrays (`t`: the teacher rows
    of the stage, any number of them; a stage reads one store). Everything else — α (the
    subset and its size), the method and its loss, λ, τ, ε, the top-k tail model, the seeds —
    is per student (`stack.recipe`, `stack.BatchOrder`). `n_train`: the job's training rows;
    the step count of `student.budget` depends on it (`min_epochs`), so students whose budgets
    differ train in separate stacks rather than beside others with their updates masked."""
    st = job.st
    shapes = tuple((n, tuple(v.shape[1:]), v.dtype) for n, v in sorted(t.tensors.items()))
    b = st.budget
    return (
        st.arch,
        st.width,
        min(st.batch_size, n_train),
        student_steps(st, n_train),
        st.lr,
        st.weight_decay,
        b.select,
        b.eval_every,
        t.kind,
        shapes,
    )


def choose_path(
    device: torch.device, model: nn.Module, vmappable: bool, k: int, forced: str
) -> str:
    """Pick "stacked" or "sequential" for K students like `model` on `device`.

    forced "on"/"off" wins. Otherwise ("auto"): on CUDA stacking any K > 1 pays (DESIGN.md §7:
    ~110x for 256 MLPs, ~2.7x for 32 ResNet-20s on an H200); elsewhere only students below
    CPU_STACK_MAX_PARAMS parameters gain, since a bigger one already fills the cores alone, and
    only architectures that ARCHS marks vmappable.
    """
    if forced not in ("on", "off", "auto"):
        raise ValueError(f"stacking must be 'on', 'off' or 'auto', got {forced!r}")
    if forced != "auto":
        return "stacked" if forced == "on" else "sequential"
    if k <= 1:
        return "sequential"
    if device.type == "cuda":
        return "stacked"
    if not vmappable:
        return "sequential"  # e.g. the CPU attention kernel has no vmap rule: it would loop anyway
    size = sum(p.numel() for p in model.parameters())
    return "stacked" if size < CPU_STACK_MAX_PARAMS else "sequential"


# Most students in one stacked group on a CPU (more train one group after another, groups sized
# evenly: 130 students train as 3 groups of 43-44), and the activations one group may hold: a
# stack whose activations leave the caches slows down. Measured with `bench/bench_stack.py
# --sweep` (2-core EPYC, a shared machine, batch 128, cached KD, the matmul forward), stacked
# samples/s as a fraction of the best K — 1 thread, cnn1d w16, K = 8 / 16 / 24 / 32 / 40 / 48 /
# 64 / 128: 0.83 / 0.95 / 0.99 / 1.00 / 0.99 / 0.98 / 0.93 / 0.85; mlp w32, K = 8 / 16 / 32 / 64
# / 128: 0.71 / 0.85 / 0.90 / 1.00 / 1.00; 2 threads, K = 8 / 20 / 40 / 64: cnn1d w16 0.71 /
# 0.93 / 1.00 / 0.98, cnn1d w64 1.00 / 1.00 / 0.94 / 0.83. The w16 CNN's activations (0.29 MB a
# student at batch 128) allow 48 within 16 MB, the w64 CNN's (1.1 MB) 14: both in their best
# range. Rerun the sweep with the pipeline's thread count on a quiet machine before changing them.
STACK_MAX_CPU = 48
STACK_ACTIVATIONS_CPU = 16 << 20


def activation_bytes(model: nn.Module, sample: torch.Tensor, batch_size: int) -> int:
    """float32 bytes of the outputs of `model`'s layers with parameters (its convolutions and
    linear layers: the activations a stack writes per layer) for one batch of one student."""
    total = 0

    def count(mod: nn.Module, inp: tuple, out: Any) -> None:
        nonlocal total
        own = next(mod.parameters(recurse=False), None) is not None
        if isinstance(out, torch.Tensor) and own and not list(mod.children()):
            total += out.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    try:
        with torch.no_grad():
            model(sample[:1].to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    return 4 * total * batch_size


def max_stack(
    device: torch.device, model: nn.Module, sample: torch.Tensor, batch_size: int
) -> int | None:
    """The largest group of students like `model` (inputs like `sample`, batches of
    `batch_size`) trained at once on `device` beyond what memory allows (None: memory alone
    bounds it)."""
    if device.type != "cpu":
        return None
    per = activation_bytes(model, sample, batch_size)
    return max(1, min(STACK_MAX_CPU, STACK_ACTIVATIONS_CPU // max(per, 1)))


# torch.compile of a stacked step pays after this many steps, per device type, measured by
# bench/bench_roofline.py for the default student at the planner's K (compile seconds / seconds
# saved per step); absent: never measured to pay. CPU (2-core EPYC, inductor, 1 thread): the
# compiled step takes 2.03x the eager one for cnn1d w16 at K = 43 and 1.72x for w64 at K = 8,
# after 14-15 s of compiling — never pays: inductor's fused C++ kernels for the ReLU masks and
# the slice/pad gradients run 5-20x slower than ATen's (a ReLU storing its bool mask: 14.7 ms
# against 0.70 ms eager for 1.3M floats), and the matmuls are the same extern calls. CUDA: not
# measured yet (`python bench/bench_roofline.py --device cuda` prints the figure to put here).
COMPILE_BREAK_EVEN: dict[str, int] = {}


def choose_compile(device: torch.device, steps: int, forced: str) -> bool:
    """Whether a stack training `steps` steps compiles its step: forced "on" / "off" wins;
    "auto" compiles where a bench measured compiling to pay within that many steps."""
    if forced not in ("on", "off", "auto"):
        raise ValueError(f"compile must be 'on', 'off' or 'auto', got {forced!r}")
    if forced != "auto":
        return forced == "on"
    break_even = COMPILE_BREAK_EVEN.get(device.type)
    return break_even is not None and steps > break_even


def memory_groups(
    k: int, bytes_per_student: int, budget_bytes: int, max_size: int | None = None
) -> list[range]:
    """Consecutive groups of the K students, each within `budget_bytes` (but at least one
    student) and of at most `max_size` students, sized evenly so that no small remainder group
    wastes a whole pass."""
    per = max(1, budget_bytes // max(bytes_per_student, 1))
    if max_size is not None:
        per = min(per, max(1, max_size))
    return even_split(k, -(-k // per))


def even_split(n: int, parts: int) -> list[range]:
    """range(n) as `parts` consecutive ranges whose sizes differ by at most one."""
    bounds = [n * g // parts for g in range(parts + 1)]
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


@dataclass(frozen=True)
class Stack:
    """The unit of work of a student stage: students (indices into `stage_jobs`) that share a
    `plan.stack_key` and train on one path, "stacked" or "sequential"; `compiled`: a stacked
    path's step runs through `torch.compile` (`choose_compile`)."""

    members: tuple[int, ...]
    path: str
    compiled: bool = False


def stage_jobs(p: Params, store: str | None) -> list[StudentJob]:
    """Every student of the stage of `store` (None: labels), in a fixed order."""
    return [job for method in p.methods_reading(store) for job in student_jobs(p, method, store)]


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def local_workers(st: StudentParams) -> int:
    """Stacks the local executor trains at once, each in a thread of the stage process with
    `train_threads` torch threads: `student.workers`, else on a CPU one per `threads` cores (one
    per core by default), on a GPU one. Two one-thread stacks side by side beat one two-thread
    stack on a 2-core CPU (bench/bench_roofline.py: the small student's stack spends most of
    its step in kernels too small to split across cores); the stacks of a stage are split so
    that every worker gets some (`plan_stacks`)."""
    if st.executor != "local" or pick_device(st.device).type != "cpu" or st.compile == "on":
        return 1  # torch.compile (dynamo) is not thread-safe: compiled stacks train one by one
    return st.workers or max(1, cpu_cores() // (st.threads or 1))


def train_threads(st: StudentParams) -> int:
    """CPU threads a student trains with: the thread count changes a CPU run's rounding, so it is
    fixed before training and part of the student's key. Default: the local executor's share of
    the cores per worker (`local_workers`), one per Dask worker process (Dask's own default)."""
    if st.executor != "local":
        return st.threads or 1
    return st.threads or max(1, cpu_cores() // local_workers(st))


def machine(p: Params) -> dict[str, Any]:
    """What about this process changes a student's rounding: its device type and, on a CPU,
    its thread count."""
    device = pick_device(p.student.device)
    return {
        "device": device.type,
        "threads": train_threads(p.student) if device.type == "cpu" else None,
    }


def student_steps(st: StudentParams, n: int) -> int:
    """Optimizer steps of a student with n training rows (the budget of `student.budget`)."""
    b = st.budget
    return num_steps(b.mode, b.value, n, st.batch_size, b.min_epochs)


def student_model(
    st: StudentParams, num_classes: int, x: torch.Tensor, seed: int
) -> torch.nn.Module:
    """A fresh student of configuration `st` for inputs like `x`; the seed fixes its
    initialisation."""
    with global_seed(seed):
        return build_model(st.arch, tuple(x.shape[1:]), num_classes, st.width)


def plan_stacks(
    p: Params,
    train: TeacherTargets,
    x: torch.Tensor,
    num_classes: int,
    jobs: list[StudentJob],
    n_train: list[int],
) -> list[Stack]:
    """Group the stage's students into stacks and choose each stack's path on the *whole* stack,
    so that a student's path (and so its row) does not depend on which others are reused;
    then split each into stacks that fit `max_stack` and give every local worker a share
    (`split_stack`), costliest first. `train`: the teacher rows the stage's students read,
    `x`: inputs like theirs, `n_train`: each job's training rows."""
    device = pick_device(p.student.device)
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(stack_key(job, train, n_train[i]), []).append(i)
    workers = local_workers(p.student)
    stacks: list[tuple[int, Stack]] = []
    for members in groups.values():
        st = jobs[members[0]].st
        probe = student_model(st, num_classes, x, seed=0)
        vmappable = ARCHS[st.arch].vmappable
        path = choose_path(device, probe, vmappable, len(members), p.student.stacked)
        steps = student_steps(st, n_train[members[0]])
        compiled = path == "stacked" and choose_compile(device, steps, p.student.compile)
        # students of like subsets side by side: a stack evaluates each member on as many
        # validation rows as its largest subset holds (train.BestVal pads the others)
        members = sorted(members, key=lambda i: n_train[i])
        if path == "stacked":
            most = max_stack(device, probe, x, min(st.batch_size, n_train[members[0]]))
            parts = split_stack(len(members), workers, most, STACK_MIN_SPLIT)
        else:
            parts = split_stack(len(members), workers, None, 1)
        cost = steps * n_params(probe)  # per student, roughly
        stacks += [
            (len(r) * cost, Stack(tuple(members[i] for i in r), path, compiled)) for r in parts
        ]
    # the costliest first: an executor that starts them in this order leaves no long stack last
    return [s for _, s in sorted(stacks, key=lambda cs: -cs[0])]


# The smallest stack a stacked group is split into to give every local worker a share: below
# it a student's step is mostly the fixed cost of its kernels (bench_stack.py --sweep: K = 8
# reaches 0.71-0.83 of the best K's samples/s).
STACK_MIN_SPLIT = 4


def split_stack(n: int, workers: int, most: int | None, smallest: int) -> list[range]:
    """The n students of one stack key as consecutive, evenly sized stacks: at most `most`
    each (None: no bound), and — where each keeps `smallest` students — a multiple of
    `workers` of them, so that no worker idles while the last stack trains (130 students
    under a cap of 48 on two workers: 4 stacks of 32-33, not 3 of 43-44 with the third
    alone). A student's row does not depend on which others share its stack
    (students.stack), so the split changes no row."""
    needed = -(-n // most) if most else 1
    shared = -(-needed // workers) * workers
    return even_split(n, min(shared, max(needed, n // smallest)))
