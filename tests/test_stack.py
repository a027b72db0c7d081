"""Stacked training is sequential training, K students at a time (kdsweep.students.stack), and
the planning around it (kdsweep.students.plan)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdsweep.augment import SHIFT_SCALE_NOISE
from kdsweep.losses import student_loss
from kdsweep.models import build_model
from kdsweep.registry import ARCHS
from kdsweep.students.plan import CPU_STACK_MAX_PARAMS, choose_path, memory_groups
from kdsweep.students.stack import fit_stacked, stack_subsets, stacked_student_loss
from kdsweep.targets import NO_TARGETS, TeacherTargets, ViewBatches
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


def test_subsets_must_share_size() -> None:
    xs, targets = _data()
    fn = stacked_student_loss("ce", None, 0.0)
    hyper = {"lam": torch.zeros(3, dtype=F64), "tau": torch.ones(3, dtype=F64)}
    with pytest.raises(ValueError, match="same size"):
        fit_stacked(
            _factory("mlp", 8), SEEDS, xs, {"y": targets["y"][:, :-1]}, fn, hyper, 1, 8, 0.01, 0.0
        )
    with pytest.raises(ValueError, match="float64"):
        fit_stacked(
            _factory("mlp", 8), SEEDS, xs, targets, fn, {"lam": torch.zeros(3)}, 1, 8, 0.01, 0.0
        )
    with pytest.raises(ValueError, match="one size"):
        stack_subsets(
            [(xs[0], targets["y"][0], NO_TARGETS), (xs[1][:-1], targets["y"][1][:-1], NO_TARGETS)]
        )


def test_stack_subsets_layout() -> None:
    xs, targets = _data(2)
    parts = [
        (xs[k], targets["y"][k], TeacherTargets("full", {"logits": targets["logits"][k]}))
        for k in range(2)
    ]
    sx, st = stack_subsets(parts)
    assert torch.equal(sx, xs) and torch.equal(st["y"], targets["y"])
    assert torch.equal(st["logits"], targets["logits"])
    views = torch.arange(N * 2 * 3).view(N, 2, 3)
    aug = TeacherTargets("full", {"logits": targets["logits"][0], "aug": views})
    _, st = stack_subsets([(xs[0], targets["y"][0], aug)] * 2)  # the views' parameters stack too
    assert torch.equal(st["aug"], torch.stack([views, views]))


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


def test_choose_path() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    small = build_model("mlp", (1, 40), 10, 32)
    big = build_model("cnn1d", (1, 40), 10, 64)
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
