"""Stacked training: K students of one architecture trained together in one process (DESIGN.md §7).

The K parameter sets are stacked along a new leading dimension (`torch.func.stack_module_state`)
and one `vmap`-ed `functional_call` runs every student's forward and loss at once. Each student
keeps what makes it itself under `train.fit`: its initialisation (`torch.manual_seed(seed)`
before it is built), its data order (its own `torch.Generator(seed)`, epoch-wise `randperm`), its
subset and targets, its per-sample loss with its own hyper-parameters, and its AdamW + cosine
state. AdamW is elementwise, so one AdamW over the stacked tensors *is* K independent AdamWs with
a shared lr and weight decay; the summed per-student mean losses give each student exactly the
gradient of its own mean loss. A stacked student therefore equals its sequential twin up to the
rounding of batched kernels (float64, 7 steps: within 3e-16, see tests/test_stack.py).

Whether stacking pays depends on the device and the student's size (`plan.choose_path`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from tqdm import tqdm

from kdsweep.losses import student_loss
from kdsweep.targets import TeacherTargets, step_rows
from kdsweep.train import AdamW, BestVal, NonFiniteLoss, flushed_denormals

# (logits [bs, C], this student's target rows {name: [bs, ...]}, its hyper-parameters {name: 0-d})
#   -> (per-sample loss [bs], per-sample distillation term [bs]), like `losses.student_loss`.
# Called under vmap: pure tensor code, no side effects, no data-dependent Python branches.
StackedLossFn = Callable[
    [torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]],
    tuple[torch.Tensor, torch.Tensor],
]


@dataclass
class StackedFit:
    """The K trained students (ordinary modules, eval mode, in `seeds` order) and what `fit`'s
    caller records per student: the wall time of the whole stack and each student's fraction of
    negative distillation terms (`neg_kl_frac`)."""

    models: list[nn.Module]
    seconds: float
    neg_frac: list[float]


def fit_stacked(
    model_factory: Callable[[int], nn.Module],
    seeds: list[int],
    xs: torch.Tensor,
    targets: dict[str, torch.Tensor],
    loss_fn: StackedLossFn,
    hyper: dict[str, torch.Tensor],
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    desc: str = "stacked",
    select: BestVal | None = None,
    teacher: Callable[[torch.Tensor], torch.Tensor] | None = None,
    drawn: tuple[str, ...] = (),
    aug: torch.Tensor | None = None,
    fresh: bool = False,
) -> StackedFit:
    """Train K = len(seeds) students at once; student k is the one `train.fit` would train with
    `seed=seeds[k]` on inputs `xs[k]` and targets `{name: t[k]}` (and `select` its validation
    rows: each student ends at its own best checkpoint; one whose loss turns non-finite after
    its first checkpoint trains on uselessly beside the others and ends there too).

    xs: [K, n, ...] and every target [K, n, ...] (one stage instance shares α, hence n);
    hyper: {name: float64 [K]} per-student scalars (τ, λ) handed to `loss_fn` as 0-d tensors.
    teacher (an online store's network), drawn (the targets with a draw axis [K, n, R, k]),
    aug ([K, n, V, 3]: the parameters of each student's cached views; its targets then carry
    the view axis) and fresh: what each step shows and targets, built by `targets.step_rows`
    from each student's own generator — the same function `targets.ViewBatches` builds a lone
    student's steps with.
    The global RNG is seeded with `seeds[k]` right before `model_factory(seeds[k])`, as `train_one`
    does before `build_model`. On CUDA the forward runs under bf16 autocast, as in `fit`.
    """
    k, n = len(seeds), xs.shape[1]
    if xs.shape[0] != k:
        raise ValueError(f"xs holds {xs.shape[0]} students' inputs for {k} seeds")
    for name, t in targets.items():
        if tuple(t.shape[:2]) != (k, n):
            raise ValueError(
                f"target {name!r} is shaped {tuple(t.shape)}, expected ({k}, {n}, ...): all "
                "students of one stack must have subsets of the same size (one α)"
            )
    for name, h in hyper.items():
        if h.dtype != torch.float64:  # fit's losses see Python floats: doubles
            raise ValueError(
                f"hyper-parameter {name!r} is {h.dtype}; build it as float64 from the Python "
                "floats, or λ = 0.9 rounds differently from `fit`"
            )
        if tuple(h.shape) != (k,):
            raise ValueError(
                f"hyper-parameter {name!r} is shaped {tuple(h.shape)}, expected ({k},)"
            )
    device = xs.device
    hyper = {name: h.to(device) for name, h in hyper.items()}
    models = []
    for seed in seeds:
        torch.manual_seed(seed)
        models.append(model_factory(seed).to(device))
    params, buffers = stack_module_state(models)
    state = [*params.values(), *buffers.values()]
    base = copy.deepcopy(models[0]).to("meta")
    base.train()

    def forward(p: dict, b: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(base, (p, b), (x,))

    forward_k, loss_k = vmap(forward), vmap(loss_fn)
    bs = min(batch_size, n)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    draw_gens = [torch.Generator().manual_seed(s) for s in seeds]  # ViewBatches' own stream
    opt = AdamW(params.values(), lr, weight_decay, steps)
    rows = torch.arange(k, device=device)[:, None]
    neg = torch.zeros(k, device=device)
    terms = 0
    t0 = time.perf_counter()

    def new_perm() -> torch.Tensor:
        return torch.stack([torch.randperm(n, generator=g) for g in gens]).to(device)

    perm, pos = new_perm(), 0
    with flushed_denormals():  # as `train.fit` does
        for step in tqdm(range(steps), desc=desc, disable=None, leave=False, mininterval=1.0):
            if pos + bs > n:
                perm, pos = new_perm(), 0
            idx = perm[:, pos : pos + bs]
            pos += bs
            xb, batch = step_rows(
                xs[rows, idx],
                {m: t[rows, idx] for m, t in targets.items()},
                draw_gens,
                aug[rows, idx] if aug is not None else None,
                fresh,
                teacher,
                drawn,
            )
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                z = forward_k(params, buffers, xb)
            per_sample, distill = loss_k(z.float(), batch, hyper)
            loss = per_sample.mean(1)
            finite = torch.isfinite(loss).tolist()
            if not all(
                ok or (select is not None and select.checkpointed(i)) for i, ok in enumerate(finite)
            ):
                bad = [s for s, ok in zip(seeds, finite, strict=True) if not ok]
                raise NonFiniteLoss(
                    f"{desc}: the loss of the students with seeds {bad} became non-finite at step "
                    f"{step}; lower the learning rate or check the cached targets "
                    "(`kdsweep cache verify`)"
                )
            opt.zero_grad()
            loss.sum().backward()
            opt.step()
            neg += (distill.detach() < 0).flatten(1).sum(1)
            terms += distill[0].numel()
            if select is not None and select.due(step + 1, steps):
                base.eval()
                select.update(
                    step + 1, select.evaluate(lambda x: forward_k(params, buffers, x)), state
                )
                base.train()
    if select is not None:
        select.restore(state)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        for i, model in enumerate(models):
            for name, p in params.items():
                model.get_parameter(name).copy_(p[i])
            model.eval()
    return StackedFit(models, seconds, (neg / max(terms, 1)).tolist())


def stacked_student_loss(
    loss: str, kind: str | None, epsilon: float, topk_mode: str = "tail"
) -> StackedLossFn:
    """`losses.student_loss` as a StackedLossFn: targets hold the labels as "y" and the cached
    teacher rows under the cache's own names; hyper holds "lam" and "tau"."""

    def fn(
        z: torch.Tensor, t: dict[str, torch.Tensor], h: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = TeacherTargets(kind, {name: v for name, v in t.items() if name != "y"})
        return student_loss(loss, z, t["y"], rows, h["lam"], h["tau"], epsilon, topk_mode)

    return fn


def stack_subsets(
    parts: list[tuple[torch.Tensor, torch.Tensor, TeacherTargets]],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stack each student's (x, y, teacher rows), as `train.student_data` returns them, into
    `fit_stacked`'s xs and targets (the views' parameters, when the rows have some, as the
    target "aug": `fit_stacked` takes them as its `aug`)."""
    sizes = {len(x) for x, _, _ in parts}
    if len(sizes) != 1:
        raise ValueError(f"stacked students need subsets of one size (one α), got sizes {sizes}")
    xs = torch.stack([x for x, _, _ in parts])
    targets = {"y": torch.stack([y for _, y, _ in parts])}
    for name in parts[0][2].tensors:
        targets[name] = torch.stack([t.tensors[name] for _, _, t in parts])
    return xs, targets
