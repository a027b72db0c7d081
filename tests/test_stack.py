"""Stacked training is sequential training, K students at a time (kdsweep.students.stack), and
the planning around it (kdsweep.students.plan)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as hs

from kdsweep.augment import SHIFT_SCALE_NOISE
from kdsweep.losses import student_loss
from kdsweep.models import build_model
from kdsweep.models.stacked import conv1d_cl, stacked_forward
from kdsweep.registry import ARCHS, LOSSES
from kdsweep.students import plan
from kdsweep.students.plan import (
    CPU_STACK_MAX_PARAMS,
    STACK_MAX_CPU,
    choose_compile,
    choose_path,
    max_stack,
    memory_groups,
    split_stack,
)
from kdsweep.students.stack import (
    DISTILL_TERMS,
    BatchOrder,
    fit_stacked,
    mixed_loss,
    recipe,
    recipe_hyper,
    stack_subsets,
    stacked_student_loss,
)
from kdsweep.targets import TeacherTargets, ViewBatches
from kdsweep.train import BestVal, NonFiniteLoss, fit

SEEDS = [3, 1007, 2000]
F64 = torch.float64
N, BS, STEPS = 40, 16, 7  # 2 batches per epoch, the last 8 rows dropped: 4 permutations


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny kernels: one thread is fastest, and spares a busy 2-core box the OpenMP contention
    that made these tests 30x slower under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _data(k: int = 3) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(k, N, 1, 40, generator=g, dtype=F64)
    ys = torch.randint(0, 10, (k, N), generator=g)
    logits = 3 * torch.randn(k, N, 10, generator=g, dtype=F64)
    return xs, {"y": ys, "logits": logits}


def _factory(arch: str, width: int):
    return lambda seed: build_model(arch, (1, 40), 10, width).double()


@pytest.mark.parametrize(
    ("arch", "width", "loss", "kind", "best_val", "views"),
    [
        ("mlp", 16, "ce", None, False, None),
        ("mlp", 16, "kd", "full", False, None),
        ("cnn1d", 8, "kd", "full", False, None),
        ("mlp", 16, "ce", None, True, None),
        ("mlp", 16, "kd", "full", True, None),
        ("mlp", 16, "kd", "sampled", False, None),  # R draw sets: one picked per row and step
        ("mlp", 16, "kd", "online", False, None),  # the teacher run on every step's inputs
        ("cnn1d", 8, "kd", "full", False, "cached"),  # each student replays its cached views
        ("mlp", 16, "kd", "sampled", False, "cached"),  # a view, then a draw set of it
        ("mlp", 16, "ce", None, False, "cached"),  # labels on the reference store's views
        ("mlp", 16, "ce", None, False, "fresh"),  # a fresh view per sample and step
        ("cnn1d", 8, "kd", "online", False, "fresh"),  # ... labelled by the teacher there
    ],
)
def test_stacked_equals_sequential_fit(
    arch: str, width: int, loss: str, kind: str | None, best_val: bool, views: str | None
) -> None:
    """Also under best_val selection, where each student of the stack keeps its own best step
    (validation rows of random labels and a high learning rate: they overfit early)."""
    xs, targets = _data()
    teacher, drawn = None, ()
    if kind is None or kind == "online":
        targets = {"y": targets["y"]}
    if kind == "online":
        torch.manual_seed(99)
        teacher = build_model("mlp", (1, 40), 10, 32).double().eval()
    if kind == "sampled":
        g = torch.Generator().manual_seed(5)
        indices = torch.randint(0, 10, (3, N, 5, 4), generator=g)  # R = 5 sets of k = 4 draws
        targets = {
            "y": targets["y"],
            "indices": indices,
            "weights": torch.full(indices.shape, 0.25, dtype=F64),
        }
        drawn = ("indices", "weights")
    aug = None
    if views == "cached":  # 3 views a row: the teacher rows gain a view axis after the row's
        aug = SHIFT_SCALE_NOISE.draw(3 * N, 3, seed=4).view(3, N, 3, 3)
        targets = {
            m: t if m == "y" else torch.stack([t, t.roll(1, 1), t.flip(1)], 2)
            for m, t in targets.items()
        }
    lam, taus = [0.9, 0.5, 1.0], [1.0, 2.0, 4.0]
    hyper = {"lam": torch.tensor(lam, dtype=F64), "tau": torch.tensor(taus, dtype=F64)}
    fn = stacked_student_loss(loss, kind, 0.0)
    xv, yv = _data()[0][:, :12] * 2, torch.flip(_data()[1]["y"][:, :12], [1])  # other rows
    select = BestVal(xv, yv, every=2) if best_val else None
    lr = 0.1 if best_val else 0.01
    out = fit_stacked(
        _factory(arch, width),
        SEEDS,
        xs,
        targets,
        fn,
        hyper,
        STEPS,
        BS,
        lr,
        0.1,
        select=select,
        teacher=teacher,
        drawn=drawn,
        aug=aug,
        fresh=views == "fresh",
    )
    for k, seed in enumerate(SEEDS):
        torch.manual_seed(seed)  # as students.fit.train_one initialises a student
        model = _factory(arch, width)(seed)
        mine = {name: t[k] for name, t in targets.items() if name != "y"}
        mine |= {"aug": aug[k]} if aug is not None else {}
        rows = TeacherTargets(kind, mine)

        def loss_fn(z: torch.Tensor, ctx: tuple, k=k) -> torch.Tensor:
            y, t = ctx
            return student_loss(loss, z, y, t, lam[k], taus[k], 0.0)[0]

        # as train_one feeds `fit`
        batch = ViewBatches(
            xs[k], targets["y"][k], rows, seed, views == "fresh", teacher=teacher, drawn=drawn
        )
        one = BestVal(xv[k : k + 1], yv[k : k + 1], every=2) if select else None
        fit(model, xs[k], loss_fn, STEPS, BS, lr, 0.1, seed, batch=batch, select=one)
        if select is not None:
            assert one.step.item() == select.step[k].item()
        stacked = out.models[k]
        assert not stacked.training
        for (name, a), b in zip(model.named_parameters(), stacked.parameters(), strict=True):
            assert torch.allclose(a, b, rtol=0, atol=1e-10), (name, (a - b).abs().max())
            assert not torch.equal(a, _factory(arch, width)(0).get_parameter(name))
    if select is not None:
        assert select.step.min() < STEPS and len(set(select.step.tolist())) > 1


def test_seed_sets_data_order() -> None:
    """Same initialisation and data for all: only the seed's data order tells students apart."""
    xs, targets = _data()
    xs, targets = xs[:1].expand(4, -1, -1, -1), {"y": targets["y"][:1].expand(4, -1)}

    def same_init(seed: int) -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model("mlp", (1, 40), 10, 8).double()

    hyper = {"lam": torch.zeros(4, dtype=F64), "tau": torch.ones(4, dtype=F64)}
    fn = stacked_student_loss("ce", None, 0.0)
    models = fit_stacked(same_init, [5, 6, 5, 7], xs, targets, fn, hyper, 3, BS, 0.01, 0.0).models
    flat = [torch.cat([p.flatten() for p in m.parameters()]) for m in models]
    assert torch.equal(flat[0], flat[2])
    assert not torch.allclose(flat[0], flat[1]) and not torch.allclose(flat[1], flat[3])


def test_inputs_and_targets_must_match_row_for_row() -> None:
    xs, targets = _data()
    fn = stacked_student_loss("ce", None, 0.0)
    hyper = {"lam": torch.zeros(3, dtype=F64), "tau": torch.ones(3, dtype=F64)}
    with pytest.raises(ValueError, match="its own rows"):
        fit_stacked(
            _factory("mlp", 8), SEEDS, xs, {"y": targets["y"][:, :-1]}, fn, hyper, 1, 8, 0.01, 0.0
        )
    with pytest.raises(ValueError, match="float64"):
        fit_stacked(
            _factory("mlp", 8), SEEDS, xs, targets, fn, {"lam": torch.zeros(3)}, 1, 8, 0.01, 0.0
        )
    small = [xs[0][:5], xs[1], xs[2]]  # 5 rows: batches of 5, the others of 8
    with pytest.raises(ValueError, match="one batch size"):
        ys = [targets["y"][0][:5], targets["y"][1], targets["y"][2]]
        fit_stacked(_factory("mlp", 8), SEEDS, small, {"y": ys}, fn, hyper, 1, 8, 0.01, 0.0)


def test_stack_subsets_layout() -> None:
    xs, targets = _data(2)
    parts = [
        (xs[k], targets["y"][k], TeacherTargets("full", {"logits": targets["logits"][k]}))
        for k in range(2)
    ]
    sx, st = stack_subsets(parts)
    assert torch.equal(torch.stack(sx), xs) and torch.equal(torch.stack(st["y"]), targets["y"])
    assert torch.equal(torch.stack(st["logits"]), targets["logits"])
    views = torch.arange(N * 2 * 3).view(N, 2, 3)
    aug = TeacherTargets("full", {"logits": targets["logits"][0], "aug": views})
    _, st = stack_subsets([(xs[0], targets["y"][0], aug)] * 2)  # the views' parameters stack too
    assert torch.equal(torch.stack(st["aug"]), torch.stack([views, views]))
    # subsets of other sizes; a student without a distillation term reads no teacher rows: it
    # gets zeros in the others' arrays, and its labels (a teacher's top-1 per view) keep theirs
    top1 = torch.randint(0, 10, (N - 4, 2))
    _, st = stack_subsets(
        [
            (xs[0], targets["y"][0], aug),
            (xs[1][:-4], top1, TeacherTargets(None, {"aug": views[:-4]})),
        ]
    )
    assert [len(v) for v in st["logits"]] == [N, N - 4] and not st["logits"][1].any()
    assert torch.equal(st["y"][0], targets["y"][0][:, None].expand(N, 2))
    assert torch.equal(st["y"][1], top1)


# ---------------------------------------------------------------------------------------------
# One stack across α and methods: each student is the one it would be alone


def _mixed(kind: str) -> tuple[list[dict], list[int]]:
    """Students of one store's stage with subsets of other sizes (one batch size) and other
    recipes: (loss, λ, τ, ε, top-k mode) each, and their subset sizes."""
    if kind == "topk":
        cases = [("kd", 1.0, 2.0, 0.0, "tail"), ("kd", 0.7, 4.0, 0.0, "spread")]
        cases += [("kd", 1.0, 1.0, 0.0, "renorm")]
    else:
        cases = [
            ("kd", 0.9, 2.0, 0.0, "tail"),
            ("ce", 1.0, 1.0, 0.0, "tail"),
            ("ls", 1.0, 1.0, 0.1, "tail"),
            ("logit_mse", 0.5, 1.0, 0.0, "tail"),
            ("top1_teacher", 1.0, 1.0, 0.0, "tail"),  # no teacher rows: zeros in the stack
            ("kd", 1.0, 4.0, 0.0, "tail"),
        ]
    sizes = [40, 24, 56, 33, 17, 48][: len(cases)]
    return [dict(zip(("loss", "lam", "tau", "eps", "mode"), c, strict=True)) for c in cases], sizes


def _student_rows(kind: str, size: int, seed: int, dtype=F64) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 1, 40, generator=g, dtype=dtype)
    y = torch.randint(0, 10, (size,), generator=g)
    logits = 3 * torch.randn(size, 10, generator=g, dtype=dtype)
    if kind == "topk":
        values, indices = logits.topk(3, -1)
        tail = logits.scatter(-1, indices, -torch.inf).logsumexp(-1)
        rows = {"values": values, "indices": indices, "tail_logsumexp": tail}
    else:
        rows = {"logits": logits}
    xv = torch.randn(size // 3, 1, 40, generator=g, dtype=dtype)  # validation rows
    yv = torch.randint(0, 10, (size // 3,), generator=g)
    return x, y, TeacherTargets(kind, rows), (xv, yv)


def _train_mixed(arch, kind, members, recipes, sizes, steps, lr, dtype, best_val, compiled=False):
    """The students `members` (indices into recipes/sizes) trained in one stack, as
    students.fit._fit_stack does: (models, validation selection)."""
    parts, vals = [], []
    for i in members:
        x, y, t, v = _student_rows(kind, sizes[i], seed=i, dtype=dtype)
        if LOSSES[recipes[i]["loss"]].distill is None:
            if recipes[i]["loss"] == "top1_teacher":
                y = t.tensors["logits"].argmax(-1)
            t = TeacherTargets(None, {})
        parts.append((x, y, t))
        vals.append(v)
    xs, targets = stack_subsets(parts)
    hyper = recipe_hyper(
        [
            recipe(r["loss"], kind, r["lam"], r["tau"], r["eps"], r["mode"])
            for r in (recipes[i] for i in members)
        ]
    )
    select = BestVal(*zip(*vals, strict=True), every=3, batch_size=4, keep_best=best_val)
    width = 8 if arch == "cnn1d" else 16
    out = fit_stacked(
        lambda seed: build_model(arch, (1, 40), 10, width).to(dtype),
        [100 + i for i in members],
        xs,
        targets,
        mixed_loss(kind, hyper),
        hyper,
        steps,
        BS,
        lr,
        0.1,
        select=select,
        compiled=compiled,
    )
    return out, select


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([q.detach().flatten() for q in model.parameters()])


@pytest.mark.parametrize(("kind", "best_val"), [("full", False), ("full", True), ("topk", False)])
def test_a_stack_across_alpha_and_methods_equals_each_student_alone(kind, best_val) -> None:
    """Subsets of other sizes (each student starts its epochs at its own steps), CE, label
    smoothing, KD at its λ and τ, logit MSE, teacher labels, top-k tail models: one stack,
    each student what `fit` trains with `losses.student_loss` alone (float64), and each keeps
    its own best step on its own validation rows (of other sizes too)."""
    recipes, sizes = _mixed(kind)
    lr = 0.1 if best_val else 0.01
    members = list(range(len(recipes)))
    out, select = _train_mixed("mlp", kind, members, recipes, sizes, STEPS, lr, F64, best_val)
    for i, r in enumerate(recipes):
        x, y, t, (xv, yv) = _student_rows(kind, sizes[i], seed=i)
        if LOSSES[r["loss"]].distill is None:
            y = t.tensors["logits"].argmax(-1) if r["loss"] == "top1_teacher" else y
            t = TeacherTargets(None, {})
        torch.manual_seed(100 + i)
        model = build_model("mlp", (1, 40), 10, 16).double()

        def loss_fn(z: torch.Tensor, ctx: tuple, r=r) -> torch.Tensor:
            y, t = ctx
            return student_loss(r["loss"], z, y, t, r["lam"], r["tau"], r["eps"], r["mode"])[0]

        one = BestVal(xv[None], yv[None], every=3, batch_size=4, keep_best=best_val)
        batch = ViewBatches(x, y, t, 100 + i)
        fit(model, x, loss_fn, STEPS, BS, lr, 0.1, 100 + i, batch=batch, select=one)
        diff = (_flat(model) - _flat(out.models[i])).abs().max()
        assert diff < 1e-12, (r, diff)
        assert one.step.item() == select.step[i].item()
        want, got = one.curve_of(0), select.curve_of(i)
        assert want[0] == got[0]
        assert want[1] == pytest.approx(got[1], rel=1e-12, abs=1e-12)
    if best_val:
        assert len(set(select.step.tolist())) > 1


def test_a_student_s_row_does_not_depend_on_its_stack() -> None:
    """float32, the CNN: student 0 trained beside other students (other α, methods, terms,
    stack sizes) is bit for bit the same student, validation curve included — so a reused row
    equals a from-scratch one whatever the stack it was trained in (kdsweep.students.reuse)."""
    recipes, sizes = _mixed("full")
    steps, f32 = 9, torch.float32
    runs = [
        [0, 1, 2, 3, 4, 5],  # every term
        [0, 5],  # pure KD beside it: no CE, no smoothing, no MSE computed
        [3, 0, 1],  # another position in the stack
        [3, 1, 0],  # the last: its head bias ends the stacked tensor, past its whole vectors
        [0, 0],  # a stack of one trains beside a copy of itself (students.fit)
    ]
    first = None
    for members in runs:
        out, select = _train_mixed("cnn1d", "full", members, recipes, sizes, steps, 0.05, f32, True)
        i = members.index(0)
        got = (_flat(out.models[i]), select.curve_of(i), int(select.step[i]), out.neg_frac[i])
        if first is None:
            first = got
            continue
        assert torch.equal(got[0], first[0]), members
        assert got[1:] == first[1:], members


def test_a_compiled_stack_trains_the_eager_students() -> None:
    """student.compile: the step through torch.compile (inductor) trains the students eager
    mode trains, to float32 tolerance (it rounds differently: the key records it)."""
    recipes, sizes = _mixed("full")
    runs = [
        _train_mixed("mlp", "full", [0, 1, 2, 3], recipes, sizes, 5, 0.01, torch.float32, False, c)
        for c in (False, True)
    ]
    (eager, select_e), (compiled, select_c) = runs
    for a, b in zip(eager.models, compiled.models, strict=True):
        torch.testing.assert_close(_flat(a), _flat(b), rtol=1e-4, atol=1e-5)
    for i in range(4):
        assert select_e.curve_of(i)[1] == pytest.approx(select_c.curve_of(i)[1], rel=1e-4)


def test_batch_order_is_each_student_s_own_epochs() -> None:
    """Each student's batches are `fit`'s: its own permutations of its own rows, an epoch's last
    partial batch dropped, whatever the other students' subset sizes."""
    sizes, bs, seeds = [10, 4, 7], 4, [3, 8, 5]
    order = BatchOrder(sizes, bs, seeds, torch.device("cpu"), window=3)
    got = torch.stack([order() for _ in range(8)], 1)  # [K, steps, bs]
    offset = 0
    for k, n in enumerate(sizes):
        gen, want = torch.Generator().manual_seed(seeds[k]), []
        perm, pos = torch.randperm(n, generator=gen), 0
        for _ in range(8):
            if pos + bs > n:
                perm, pos = torch.randperm(n, generator=gen), 0
            want.append(perm[pos : pos + bs] + offset)
            pos += bs
        assert torch.equal(got[k], torch.stack(want)), k
        offset += n


def test_recipe_selects_one_term() -> None:
    assert recipe("kd", "full", 0.5, 4.0, 0.1) == {
        "lam": 0.5,
        "tau": 4.0,
        "eps": 0.0,
        "kl": 1.0,
        "kl_spread": 0.0,
        "kl_renorm": 0.0,
        "mse": 0.0,
    }
    assert recipe("kd", "topk", 1.0, 2.0, 0.1, "renorm")["kl_renorm"] == 1.0
    assert recipe("kd", "full", 1.0, 2.0, 0.1, "renorm")["kl"] == 1.0  # one tail model only
    ls = recipe("ls", None, 1.0, 1.0, 0.1)
    assert ls["lam"] == 0.0 and ls["eps"] == 0.1 and not any(ls[t] for t in DISTILL_TERMS)
    assert recipe("logit_mse", "full", 0.5, 1.0, 0.1)["mse"] == 1.0


def test_non_finite_loss_names_the_student() -> None:
    xs, targets = _data()
    xs[1, :, 0, 0] = float("nan")

    def ce(z: torch.Tensor, t: dict, h: dict) -> tuple[torch.Tensor, torch.Tensor]:
        loss = F.cross_entropy(z, t["y"], reduction="none")
        return loss, torch.zeros_like(loss)

    with pytest.raises(NonFiniteLoss, match=r"\[1007\]"):
        fit_stacked(_factory("mlp", 8), SEEDS, xs, {"y": targets["y"]}, ce, {}, 2, BS, 0.01, 0.0)


@pytest.mark.parametrize(
    ("k", "per_student", "budget", "sizes"),
    [
        (10, 1, 4, [3, 3, 4]),
        (8, 1, 4, [4, 4]),
        (5, 100, 10, [1, 1, 1, 1, 1]),  # a student over budget still trains, alone
        (3, 1, 1000, [3]),
        (1, 5, 5, [1]),
    ],
)
def test_memory_groups(k: int, per_student: int, budget: int, sizes: list[int]) -> None:
    groups = memory_groups(k, per_student, budget)
    assert [len(g) for g in groups] == sizes
    assert [i for g in groups for i in g] == list(range(k))


@given(
    n=hs.integers(1, 200),
    workers=hs.integers(1, 8),
    most=hs.one_of(hs.none(), hs.integers(1, 60)),
    smallest=hs.integers(1, 8),
)
def test_split_stack_gives_every_worker_a_share_within_the_cap(n, workers, most, smallest):
    parts = split_stack(n, workers, most, smallest)
    sizes = [len(r) for r in parts]
    assert [i for r in parts for i in r] == list(range(n))  # consecutive, each student once
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    needed = 1 if most is None else -(-n // most)
    assert len(parts) >= needed and (most is None or max(sizes) <= most)
    if len(parts) > needed:  # split further only into stacks of at least `smallest`
        assert min(sizes) >= smallest
    if -(-needed // workers) * workers * smallest <= n:  # possible: no worker idles at the end
        assert len(parts) % workers == 0
    assert len(parts) >= min(workers, n // smallest, n)


def test_local_workers_share_the_cores_and_compiled_stacks_train_alone(monkeypatch) -> None:
    monkeypatch.setattr(plan, "cpu_cores", lambda: 4)
    cpu = plan.StudentParams(device="cpu")
    assert (plan.local_workers(cpu), plan.train_threads(cpu)) == (4, 1)
    two = cpu.model_copy(update={"threads": 2})
    assert (plan.local_workers(two), plan.train_threads(two)) == (2, 2)
    three = cpu.model_copy(update={"workers": 3})
    assert (plan.local_workers(three), plan.train_threads(three)) == (3, 1)
    compiled = cpu.model_copy(update={"compile": "on"})  # dynamo is not thread-safe
    assert (plan.local_workers(compiled), plan.train_threads(compiled)) == (1, 4)
    dask = cpu.model_copy(update={"executor": "dask"})
    assert (plan.local_workers(dask), plan.train_threads(dask)) == (1, 1)


def test_concurrent_builds_draw_their_own_seeds() -> None:
    """The local executor builds students in several threads at once: `models.global_seed`
    keeps each build's seed to itself (without its lock, another thread's `manual_seed`
    between a seed and its draws changes the weights)."""
    from concurrent.futures import ThreadPoolExecutor

    config = plan.StudentParams(arch="mlp", width=64)
    x = torch.zeros(1, 1, 40)

    def build(seed: int) -> torch.Tensor:
        return torch.cat(
            [q.flatten() for q in plan.student_model(config, 10, x, seed).parameters()]
        )

    seeds = list(range(60)) * 2
    alone = [build(s) for s in seeds]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(build, seeds))
    assert all(torch.equal(a, b) for a, b in zip(alone, together, strict=True))


def test_choose_path() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    small = build_model("mlp", (1, 40), 10, 32)
    big = build_model("cnn1d", (1, 40), 10, 128)
    assert sum(p.numel() for p in small.parameters()) < CPU_STACK_MAX_PARAMS
    assert sum(p.numel() for p in big.parameters()) >= CPU_STACK_MAX_PARAMS
    assert choose_path(cpu, small, True, 8, "auto") == "stacked"
    assert choose_path(cpu, big, True, 8, "auto") == "sequential"
    assert choose_path(cpu, small, True, 1, "auto") == "sequential"
    assert choose_path(cpu, small, False, 8, "auto") == "sequential"  # no vmap rule on a CPU
    assert choose_path(cuda, big, True, 8, "auto") == "stacked"
    assert choose_path(cuda, small, False, 8, "auto") == "stacked"
    assert choose_path(cuda, big, True, 1, "auto") == "sequential"
    assert choose_path(cpu, big, True, 8, "on") == "stacked"
    assert choose_path(cuda, small, True, 8, "off") == "sequential"
    with pytest.raises(ValueError):
        choose_path(cpu, small, True, 8, "yes")


@pytest.mark.parametrize("arch", [a for a in ARCHS if not ARCHS[a].vmappable])
def test_attention_students_stay_sequential_on_cpu(arch: str) -> None:
    """Architectures ARCHS marks not vmappable (the CPU attention kernel) train one at a time on
    a CPU whatever their size, and stack on CUDA."""
    rank = ARCHS[arch].input_rank
    shape, classes = ((8,), 260) if rank == 1 else ((3, 8, 8), 10)
    model, vmappable = build_model(arch, shape, classes, 8), ARCHS[arch].vmappable
    assert choose_path(torch.device("cpu"), model, vmappable, 4, "auto") == "sequential"
    assert choose_path(torch.device("cuda"), model, vmappable, 4, "auto") == "stacked"


# ---------------------------------------------------------------------------------------------
# The batched-matmul forward of the small models (kdsweep.models.stacked)


class _Convs(torch.nn.Module):
    SEQUENTIAL = ("features", "head")

    def __init__(self, k: int, stride: int, padding: int, length: int, bias: bool):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv1d(2, 3, k, stride=stride, padding=padding, bias=bias),
            torch.nn.ReLU(),
            torch.nn.Conv1d(3, 4, k, stride=stride, padding=padding, bias=bias),
            torch.nn.Flatten(),
        )
        out = length
        for _ in range(2):
            out = (out + 2 * padding - k) // stride + 1
        self.head = torch.nn.Linear(4 * out, 5, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@pytest.mark.parametrize(
    ("k", "stride", "padding", "length", "bias"),
    [(3, 2, 1, 20, True), (5, 2, 2, 21, True), (3, 1, 1, 9, False), (4, 3, 0, 17, True)],
)
def test_the_matmul_forward_is_vmap_s(k, stride, padding, length, bias) -> None:
    """Values and gradients of K stacked convolutional students (odd lengths, stride 1 and 3,
    no padding, no bias) equal vmap's over `functional_call` (float64)."""
    models = [_Convs(k, stride, padding, length, bias).double() for _ in range(3)]
    params, buffers = torch.func.stack_module_state(models)
    base = _Convs(k, stride, padding, length, bias).to("meta")
    fast = stacked_forward(base)
    x = torch.randn(3, 6, 2, length, dtype=F64)
    want = torch.func.vmap(lambda p, b, x: torch.func.functional_call(base, (p, b), (x,)))(
        params, buffers, x
    )
    got = fast(params, x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
    grads = [torch.autograd.grad(z.square().sum(), list(params.values())) for z in (want, got)]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    h = x.transpose(2, 3).contiguous().requires_grad_()  # an inner layer: the gradient path
    w, b_ = params["features.0.weight"], params.get("features.0.bias")
    ref = torch.func.vmap(lambda h, w, b: F.conv1d(h, w, b, stride, padding))(
        h.transpose(2, 3), w, b_ if bias else torch.zeros(3, 3, dtype=F64)
    )
    torch.testing.assert_close(conv1d_cl(h, w, b_, stride, padding), ref.transpose(2, 3))


def test_the_matmul_forward_covers_the_small_models_only() -> None:
    for arch in ("cnn1d", "mlp"):
        assert stacked_forward(build_model(arch, (1, 40), 10, 8)) is not None
    assert stacked_forward(build_model("resnet20", (3, 8, 8), 10, 8)) is None
    assert stacked_forward(build_model("gpt", (8,), 260, 8)) is None


def test_a_student_s_matmul_forward_does_not_depend_on_k() -> None:
    """float32: one student's logits and gradients, bit for bit, beside 1 or 40 others."""
    torch.manual_seed(0)
    models = [build_model("cnn1d", (1, 40), 10, 16) for _ in range(41)]
    x = torch.randn(41, 128, 1, 40)
    fast = stacked_forward(models[0])
    out = []
    for k in (2, 41):
        params, _ = torch.func.stack_module_state(models[:k])
        z = fast(params, x[:k])
        grads = torch.autograd.grad(z.square().sum(), list(params.values()))
        out.append((z[0], [g[0] for g in grads]))
    assert torch.equal(out[0][0], out[1][0])
    assert all(torch.equal(a, b) for a, b in zip(out[0][1], out[1][1], strict=True))


def test_choose_compile() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert not choose_compile(cpu, 10**6, "auto")  # measured never to pay on a CPU
    assert choose_compile(cpu, 10, "on") and not choose_compile(cuda, 10**6, "off")
    with pytest.raises(ValueError):
        choose_compile(cpu, 10, "yes")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(plan.COMPILE_BREAK_EVEN, "cuda", 400)
        assert choose_compile(cuda, 1500, "auto") and not choose_compile(cuda, 300, "auto")


def test_memory_groups_respect_the_stack_size_cap() -> None:
    assert [len(g) for g in memory_groups(130, 1, 10**9, STACK_MAX_CPU)] == [43, 43, 44]
    assert [len(g) for g in memory_groups(10, 1, 4, 3)] == [2, 3, 2, 3]
    x = torch.zeros(1, 1, 40)
    small, wide = (build_model("cnn1d", (1, 40), 10, w) for w in (16, 64))
    assert max_stack(torch.device("cpu"), small, x, 128) == STACK_MAX_CPU
    assert max_stack(torch.device("cpu"), wide, x, 128) == 14  # its activations: 1.1 MB
    assert max_stack(torch.device("cuda"), wide, x, 128) is None
