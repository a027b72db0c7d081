"""Stacked training: K students of one architecture trained together in one process (DESIGN.md §7).

The K parameter sets are stacked along a new leading dimension (`torch.func.stack_module_state`)
and one `vmap`-ed `functional_call` runs every student's forward and loss at once (on a CPU, the
forward of the small models is batched matrix products instead, `models.stacked`: vmap's grouped
convolutions are slow there). Each student
keeps what makes it itself under `train.fit`: its initialisation (`torch.manual_seed(seed)`
before it is built), its data order (its own `torch.Generator(seed)`, epoch-wise `randperm` of
its own subset, whatever its size), its subset and targets, its per-sample loss with its own
recipe, and its AdamW + cosine state. AdamW is elementwise, so one AdamW over the stacked tensors
*is* K independent AdamWs with a shared lr, weight decay and step count; the summed per-student
mean losses give each student exactly the gradient of its own mean loss. A stacked student
therefore equals its sequential twin up to the rounding of batched kernels (float64, 7 steps:
within 3e-16, see tests/test_stack.py).

One stack holds students of any α, method, τ, λ, ε and seed (`plan.stack_key`): the subsets are
pooled one after another and each student gathers its batch from its own rows by index; the
loss of every student is the same function of per-student numbers (`recipe`, `mixed_loss`):
λ·Σ_t sel_t·distill_t + (1 − λ)·CE_ε, the distillation terms selected one-hot. A term no
student of the stack uses is not computed; one another student uses enters a student's loss
multiplied by an exact zero, which changes no bit of a finite value or gradient — so a
student's row does not depend on which others share its stack (tests/test_stack.py checks this
bit for bit in float32). What a stack's students must share: the network, the batch size, the
learning rate, weight decay and step count (the cosine schedule), and the arrays of their
targets (one store).

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

from kdsweep.losses import logit_mse, student_loss
from kdsweep.models import global_seed
from kdsweep.models.stacked import stacked_forward
from kdsweep.registry import CACHE_KINDS, LOSSES
from kdsweep.softmax import cross_entropy
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
    negative distillation terms (`neg_kl_frac`); `first_step`: the seconds of the first step
    alone (a compiled step's compile time is in it)."""

    models: list[nn.Module]
    seconds: float
    neg_frac: list[float]
    first_step: float = 0.0


# The one-hot selectors of `recipe`: which distillation term a student's loss uses. The top-k
# cache's tail models are separate terms (TopK.distill's `mode`); the other kinds have one.
DISTILL_TERMS = ("kl", "kl_spread", "kl_renorm", "mse")


def recipe(
    loss: str, kind: str | None, lam: float, tau: float, epsilon: float, topk_mode: str = "tail"
) -> dict[str, float]:
    """One student's loss as the numbers `mixed_loss` reads: λ ("lam", 0 without a
    distillation term), τ ("tau", 1 where unused), label smoothing ε ("eps", 0 where unused)
    and a one-hot selector of its distillation term over DISTILL_TERMS."""
    entry = LOSSES[loss]
    term = None
    if entry.distill == "mse":
        term = "mse"
    elif entry.distill == "kl":
        term = f"kl_{topk_mode}" if kind == "topk" and topk_mode != "tail" else "kl"
    return {
        "lam": lam if term else 0.0,
        "tau": tau if term == "kl" or (term or "").startswith("kl_") else 1.0,
        "eps": epsilon if entry.smooth_labels else 0.0,
        **{t: float(t == term) for t in DISTILL_TERMS},
    }


def recipe_hyper(recipes: list[dict[str, float]]) -> dict[str, torch.Tensor]:
    """K students' `recipe`s as `fit_stacked`'s hyper: {name: float64 [K]}."""
    return {h: torch.tensor([r[h] for r in recipes], dtype=torch.float64) for h in recipes[0]}


def mixed_loss(kind: str | None, hyper: dict[str, torch.Tensor]) -> StackedLossFn:
    """The stacked loss of students of any recipe (`recipe`) reading targets of cache kind
    `kind` (None: labels only): per sample, d = Σ_t sel_t·distill_t and λ·d + (1 − λ)·CE_ε,
    as `losses.student_loss` computes each alone. CE_ε is `softmax.cross_entropy` with the
    student's own label smoothing: one cross-entropy per distinct ε of the stack, selected
    one-hot (ε a Python float, as a lone student's: an ε tensor of the stack would round
    differently).

    `hyper` (the stack's, [K]) decides only which terms are computed at all: a term is left
    out when every student's weight of it is zero (no distillation selector set, λ = 1 for
    all, an ε no student has), which gives the very same values — adding an exact zero
    changes no bit of a finite value or gradient — so a student's loss does not depend on its
    stack.
    """
    used = [t for t in DISTILL_TERMS if bool((hyper[t] != 0).any())]
    with_ce = bool((hyper["lam"] != 1).any())
    epsilons = sorted(set(hyper["eps"].tolist()))
    kl = CACHE_KINDS.load(kind).distill if kind and any(t != "mse" for t in used) else None

    def fn(
        z: torch.Tensor, t: dict[str, torch.Tensor], h: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        y = t["y"]
        rows = TeacherTargets(kind, {name: v for name, v in t.items() if name != "y"})
        if z.dim() > 2:  # a language model's positions: one row each, as student_loss does
            z, y, rows = z.flatten(0, -2), y.flatten(), rows.flat_positions()
        d = z.new_zeros(z.shape[:-1])
        for term in used:
            if term == "mse":
                value = logit_mse(rows.tensors["logits"], z)
            else:
                value = kl(rows, z, h["tau"], term.removeprefix("kl_") if "_" in term else "tail")
            d = d + h[term] * value
        if not with_ce:
            return h["lam"] * d, d.detach()
        ce = d.new_zeros(())
        for eps in epsilons:
            this = cross_entropy(z, y, eps)
            ce = ce + (h["eps"] == eps).to(this.dtype) * this if len(epsilons) > 1 else this
        return h["lam"] * d + (1 - h["lam"]) * ce, d.detach()

    return fn


class BatchOrder:
    """Each step's row ids of K students into their pooled subsets: student k's rows are
    `offset[k] + range(sizes[k])`, shuffled epoch by epoch with its own generator exactly as
    `train.fit` shuffles a lone student's (an epoch's last partial batch is dropped), so
    students of different subset sizes start their epochs at different steps. Ids are drawn
    `window` steps at a time: [K, bs] per step, on `device`."""

    def __init__(
        self,
        sizes: list[int],
        bs: int,
        seeds: list[int],
        device: torch.device,
        window: int = 64,
    ):
        self.sizes, self.bs, self.window, self.device = sizes, bs, window, device
        self.offsets = [sum(sizes[:k]) for k in range(len(sizes))]
        self.gens = [torch.Generator().manual_seed(s) for s in seeds]
        self.pending = [torch.empty(0, dtype=torch.long) for _ in sizes]
        self.ids, self.used = torch.empty(0), window

    def _more(self, k: int, need: int) -> torch.Tensor:
        n, parts, have = self.sizes[k], [self.pending[k]], len(self.pending[k])
        while have < need:  # whole epochs: the batches `fit` takes from one permutation
            perm = torch.randperm(n, generator=self.gens[k])[: n // self.bs * self.bs]
            parts.append(perm + self.offsets[k])
            have += len(perm)
        ids = torch.cat(parts)
        self.pending[k] = ids[need:]
        return ids[:need]

    def __call__(self) -> torch.Tensor:
        if self.used == self.window:
            need = self.window * self.bs
            self.ids = torch.stack([self._more(k, need) for k in range(len(self.sizes))])
            self.ids = self.ids.view(len(self.sizes), self.window, self.bs).to(self.device)
            self.used = 0
        self.used += 1
        return self.ids[:, self.used - 1]


def _pool(
    xs: torch.Tensor | list[torch.Tensor], targets: dict[str, torch.Tensor | list[torch.Tensor]]
) -> tuple[list[int], torch.Tensor, dict[str, torch.Tensor]]:
    """(sizes, pooled inputs [Σn, ...], pooled targets {name: [Σn, ...]}) of K students' rows,
    given as [K, n, ...] tensors or lists of K tensors [n_k, ...]."""
    sizes = [len(x) for x in xs]
    for name, t in targets.items():
        if [len(v) for v in t] != sizes:
            raise ValueError(
                f"target {name!r} holds {[len(v) for v in t]} rows per student, but the inputs "
                f"hold {sizes}: each student's targets must be its own rows"
            )
    cat = lambda t: t.flatten(0, 1) if isinstance(t, torch.Tensor) else torch.cat(list(t))  # noqa: E731
    return sizes, cat(xs), {name: cat(t) for name, t in targets.items()}


def _take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t[idx] for row ids idx [K, bs]: the same rows, gathered 2-3x faster than by advanced
    indexing (index_select copies whole rows)."""
    return t.index_select(0, idx.flatten()).view(*idx.shape, *t.shape[1:])


def fit_stacked(
    model_factory: Callable[[int], nn.Module],
    seeds: list[int],
    xs: torch.Tensor | list[torch.Tensor],
    targets: dict[str, torch.Tensor | list[torch.Tensor]],
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
    aug: torch.Tensor | list[torch.Tensor] | None = None,
    fresh: bool = False,
    compiled: bool = False,
) -> StackedFit:
    """Train K = len(seeds) students at once; student k is the one `train.fit` would train with
    `seed=seeds[k]` on inputs `xs[k]` and targets `{name: t[k]}` (and `select` its validation
    rows: each student ends at its own best checkpoint; one whose loss turns non-finite after
    its first checkpoint trains on uselessly beside the others and ends there too).

    xs: [K, n, ...] or a list of K subsets [n_k, ...] of any sizes whose batches are equal
    (min(batch_size, n_k) the same for all: subsets of at least `batch_size` rows); every
    target likewise, row for row; hyper: {name: float64 [K]} per-student scalars (τ, λ, the
    `recipe`) handed to `loss_fn` as 0-d tensors.
    teacher (an online store's network), drawn (the targets with a draw axis [n, R, k]),
    aug ([n, V, 3] per student: the parameters of each student's cached views; its targets then
    carry the view axis) and fresh: what each step shows and targets, built by
    `targets.step_rows` from each student's own generator — the same function
    `targets.ViewBatches` builds a lone student's steps with.
    compiled: the step's forward and loss run through `torch.compile` (their compile time is
    part of the stack's seconds); rounding then differs from eager by float tolerance.
    The global RNG is seeded with `seeds[k]` right before `model_factory(seeds[k])` (under
    `models.global_seed`: no other thread draws meanwhile), as `train_one` does before
    `build_model`. On CUDA the forward runs under bf16 autocast, as in `fit`.
    """
    k = len(seeds)
    if len(xs) != k:
        raise ValueError(f"xs holds {len(xs)} students' inputs for {k} seeds")
    if aug is not None:
        targets = {**targets, "aug": aug}
    sizes, pool_x, pool = _pool(xs, targets)
    pool_aug = pool.pop("aug", None)
    batches = {min(batch_size, n) for n in sizes}
    if len(batches) != 1:
        raise ValueError(
            f"students with subsets of {sorted(set(sizes))} rows take batches of {sorted(batches)}"
            f" rows: one stack needs one batch size (subsets of at least {batch_size} rows)"
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
    device = pool_x.device
    hyper = {name: h.to(device) for name, h in hyper.items()}
    models = []
    for seed in seeds:
        with global_seed(seed):
            models.append(model_factory(seed).to(device))
    params, buffers = stack_module_state(models)
    state = [*params.values(), *buffers.values()]
    base = copy.deepcopy(models[0]).to("meta")
    base.train()

    def forward(p: dict, b: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(base, (p, b), (x,))

    # on a CPU, the batched-matmul forward where the model has one (models.stacked)
    fast = stacked_forward(base) if device.type == "cpu" else None
    forward_k = vmap(forward) if fast is None else (lambda p, b, x: fast(p, x))
    loss_k = vmap(loss_fn)

    def train_loss(
        p: dict, xb: torch.Tensor, batch: dict[str, torch.Tensor], h: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each student's mean loss [K] and per-sample distillation terms."""
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            z = forward_k(p, buffers, xb)
        per_sample, distill = loss_k(z.float(), batch, h)
        return per_sample.mean(1), distill

    step_loss = torch.compile(train_loss, dynamic=False) if compiled else train_loss
    bs = batches.pop()
    order = BatchOrder(sizes, bs, seeds, device)
    draw_gens = [torch.Generator().manual_seed(s) for s in seeds]  # ViewBatches' own stream
    opt = AdamW(params.values(), lr, weight_decay, steps)
    neg = torch.zeros(k, device=device)
    terms, first = 0, 0.0
    t0 = time.perf_counter()
    with flushed_denormals():  # as `train.fit` does
        for step in tqdm(range(steps), desc=desc, disable=None, leave=False, mininterval=1.0):
            idx = order()
            xb, batch = step_rows(
                _take(pool_x, idx),
                {m: _take(t, idx) for m, t in pool.items()},
                draw_gens,
                _take(pool_aug, idx) if pool_aug is not None else None,
                fresh,
                teacher,
                drawn,
            )
            loss, distill = step_loss(params, xb, batch, hyper)
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
            if step == 0:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                first = time.perf_counter() - t0
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
    return StackedFit(models, seconds, (neg / max(terms, 1)).tolist(), first)


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
) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]]]:
    """K students' (x, y, teacher rows), as `students.inputs.student_data` returns them, as
    `fit_stacked`'s xs and targets: lists of K tensors, one subset each, of any sizes (the
    views' parameters, when the rows have some, as the target "aug": `fit_stacked` takes them
    as its `aug`).

    Students of one store share its arrays, except those without a distillation term, which
    read none: their rows get zeros in the others' arrays (finite, and multiplied by their zero
    selectors), and labels without the view axis of the others' (a teacher's top-1 per view)
    are repeated along it."""
    names = sorted({name for _, _, t in parts for name in t.tensors})
    like = {name: next(t.tensors[name] for _, _, t in parts if name in t.tensors) for name in names}
    xs = [x for x, _, _ in parts]
    ys = [y for _, y, _ in parts]
    views = max(y.dim() for y in ys)
    if views > 1:
        v = next(y.shape[1] for y in ys if y.dim() > 1)
        ys = [y if y.dim() > 1 else y[:, None].expand(len(y), v).contiguous() for y in ys]
    targets = {"y": ys}
    for name in names:
        targets[name] = [
            t.tensors[name]
            if name in t.tensors
            else like[name].new_zeros((len(x), *like[name].shape[1:]))
            for x, _, t in parts
        ]
    return xs, targets
