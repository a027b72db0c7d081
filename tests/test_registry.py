"""Every registered extension works as its entry says (kdsweep.registry), and params validation
(kdsweep.config) refuses what the registries do not allow, naming the key, without torch.

Parametrised over the registries: a new architecture, dataset or loss is tested here by
registering it, with no edit to this file."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

from kdsweep.config import DataParams, ParamsError, parse_params
from kdsweep.data.prepare import build_splits
from kdsweep.errors import KdsweepError
from kdsweep.losses import student_loss
from kdsweep.models import build_model, reinit_head
from kdsweep.registry import (
    ARCHS,
    CACHE_KINDS,
    DATASETS,
    HYPER,
    LOSSES,
    Arch,
    Dataset,
    Loss,
)
from kdsweep.targets import NO_TARGETS, TeacherTargets
from kdsweep.train import fit
from tests.conftest import TINY, set_teachers, tiny_raw

REPO = Path(__file__).resolve().parents[1]
BATCH, CLASSES, SEQ = 3, 7, 8
# an input of each rank the registry knows (None: an architecture that takes any shape)
SHAPES: dict[int | None, tuple[int, ...]] = {1: (SEQ,), 2: (2, 20), 3: (3, 16, 16), None: (2, 20)}
FIXED_WIDTH = {"resnet18": 64}  # architectures whose width is not free
WIDTH = 8


def _build(name: str, shape: tuple[int, ...] | None = None) -> nn.Module:
    shape = shape or SHAPES[ARCHS[name].input_rank]
    return build_model(name, shape, CLASSES, FIXED_WIDTH.get(name, WIDTH))


def _inputs(name: str, n: int = BATCH, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = SHAPES[ARCHS[name].input_rank]
    if ARCHS[name].input_rank == 1:  # token ids
        return torch.randint(0, CLASSES, (n, *shape), generator=g)
    return torch.randn(n, *shape, generator=g)


def _out_shape(name: str, n: int = BATCH) -> tuple[int, ...]:
    return (n, SEQ, CLASSES) if ARCHS[name].input_rank == 1 else (n, CLASSES)


# ---------------------------------------------------------------------------------------------
# Architectures


@pytest.mark.parametrize("name", list(ARCHS))
def test_arch_builds_for_its_input_rank_with_a_linear_head(name: str):
    entry = ARCHS[name]
    assert isinstance(entry, Arch) and callable(ARCHS.load(name))
    torch.manual_seed(0)
    model = _build(name)
    x = _inputs(name)
    out = model(x)
    assert out.shape == _out_shape(name) and out.dtype == torch.float32
    assert isinstance(model.head, nn.Linear) and model.head.out_features == CLASSES
    with torch.no_grad():  # `.head` is the last layer: the random_head control replaces it alone
        before = model(x)
        body = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
        reinit_head(model, seed=1)
        assert not torch.allclose(model(x), before)
        after = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
        assert all(torch.equal(body[k], after[k]) for k in body)


@pytest.mark.parametrize("name", list(ARCHS))
def test_arch_keeps_no_running_statistics(name: str):
    """GroupNorm/LayerNorm only: a student in a vmap stack normalises exactly as it would alone,
    and train and eval mode compute the same function."""
    model = _build(name)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert not any(getattr(m, "track_running_stats", False) for m in model.modules())
    assert not any("running" in b or "num_batches" in b for b, _ in model.named_buffers())
    assert len(model.state_dict()) == len(dict(model.named_parameters())) + len(
        dict(model.named_buffers())
    )
    x = _inputs(name)
    with torch.no_grad():
        assert torch.equal(model.train()(x), model.eval()(x))


@pytest.mark.parametrize("name", [a for a in ARCHS if ARCHS[a].input_rank is not None])
def test_arch_refuses_an_input_of_another_rank(name: str):
    rank = ARCHS[name].input_rank
    other = SHAPES[2 if rank != 2 else 3]
    with pytest.raises(KdsweepError, match=f"arch {name} takes inputs of rank {rank}"):
        _build(name, other)


def test_rank_free_arch_takes_any_shape():
    for name in (a for a in ARCHS if ARCHS[a].input_rank is None):
        for shape in ((40,), (1, 40), (3, 8, 8)):
            assert _build(name, shape)(torch.randn(2, *shape)).shape == (2, CLASSES)


# On CPU, vmap runs fused attention one model at a time (CUDA has batching rules for it).
@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("name", list(ARCHS))
def test_arch_stacks_under_vmap_like_each_model_alone(name: str):
    """The stacked training path: K students' parameters stacked (stack_module_state), one
    vmap-ed functional_call. Outputs and gradients equal each model's own, in float64.

    vmappable=False only says stacking does not pay on a CPU (no vmap rule for the attention
    kernel: it loops); the result must still be right, since on CUDA every architecture stacks."""
    assert isinstance(ARCHS[name].vmappable, bool)
    k = 2 if name == "resnet18" else 3  # 11M parameters each: two are enough
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        models.append(_build(name).double())
    xs = torch.stack([_inputs(name, seed=s) for s in range(k)])
    if xs.is_floating_point():
        xs = xs.double()
    y = torch.randint(0, CLASSES, _out_shape(name)[:-1])
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def loss(p: dict, b: dict, x: torch.Tensor) -> torch.Tensor:
        z = functional_call(base, (p, b), (x,))
        return F.cross_entropy(z.flatten(0, -2), y.flatten())

    out = vmap(lambda p, b, x: functional_call(base, (p, b), (x,)))(params, buffers, xs)
    grads = vmap(grad(loss))(params, buffers, xs)
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m(xs[i]), rtol=1e-9, atol=1e-10)
        m.zero_grad()
        F.cross_entropy(m(xs[i]).flatten(0, -2), y.flatten()).backward()
        for pname, p in m.named_parameters():
            torch.testing.assert_close(grads[pname][i], p.grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", list(ARCHS))
def test_arch_trains_with_the_generic_loop(name: str):
    torch.manual_seed(0)
    model = _build(name)
    x, y = _inputs(name, n=8), torch.randint(0, CLASSES, _out_shape(name, 8)[:-1])
    before = [q.clone() for q in model.parameters()]

    def loss_fn(z: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(z.flatten(0, -2), y[i].flatten(), reduction="none")

    fit(model, x, loss_fn, 2, 4, 1e-3, 0.0, seed=0)
    assert all(torch.isfinite(q).all() for q in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_resnet_depths_and_grayscale_inputs():
    def convs(m: nn.Module) -> int:
        return sum(isinstance(c, nn.Conv2d) and c.kernel_size == (3, 3) for c in m.modules())

    assert convs(build_model("resnet20", (3, 32, 32), 10, 4)) + 1 == 20  # + the head
    assert convs(build_model("resnet56", (3, 32, 32), 10, 4)) + 1 == 56
    for arch, width in (("resnet20", 4), ("vit", 8)):
        out = build_model(arch, (1, 28, 28), 10, width)(torch.randn(2, 1, 28, 28))
        assert out.shape == (2, 10)


def test_unknown_arch_and_bad_widths_are_explained():
    with pytest.raises(KdsweepError, match=", ".join(ARCHS)):
        build_model("vgg11", (3, 32, 32), 10, 16)
    with pytest.raises(KdsweepError, match="width: 64"):
        build_model("resnet18", (3, 32, 32), 10, 16)
    with pytest.raises(KdsweepError, match="divisible by its 4 heads"):
        build_model("vit", (3, 32, 32), 10, 10)
    with pytest.raises(KdsweepError, match="divisible by the patch size"):
        build_model("vit", (3, 30, 30), 10, 8)


# ---------------------------------------------------------------------------------------------
# Datasets


@pytest.mark.parametrize("name", list(DATASETS))
def test_dataset_impl_resolves(name: str):
    entry = DATASETS[name]
    assert isinstance(entry, Dataset) and callable(DATASETS.load(name))
    assert entry.task in ("vision", "lm") and (entry.task == "lm") == (entry.input_rank == 1)
    # some architecture takes its inputs, so params for it can validate
    assert any(a.input_rank in (None, entry.input_rank) for a in ARCHS.entries())


OFFLINE = [d.name for d in DATASETS.entries() if not d.needs_root and not d.downloads]


@pytest.mark.parametrize("name", OFFLINE)
def test_offline_dataset_builds_tiny_splits_of_its_input_rank(name: str, tmp_path: Path):
    entry = DATASETS[name]
    extra: dict[str, Any] = {}
    if name == "textfile":
        f = tmp_path / "corpus.txt"
        f.write_text("\n\n".join(f"Document {i}: the quick brown fox {i}." * 5 for i in range(30)))
        extra["path"] = str(f)
    p = DataParams(name=name, n_train=16, n_test=4, vocab_size=300, seq_len=SEQ, **extra)
    s = build_splits(p)
    assert s.name == name and len(s.y_train) == 16 and len(s.y_test) == 4
    assert s.x_train.dim() - 1 == entry.input_rank == s.x_test.dim() - 1
    assert s.x_train.shape[1:] == s.x_test.shape[1:]
    assert 0 <= int(s.y_train.min()) and int(s.y_train.max()) < s.num_classes
    if entry.task == "lm":
        assert s.y_train.shape == s.x_train.shape == (16, SEQ) and s.tokenizer_json
        assert int(s.x_train.max()) < s.num_classes <= 300
    else:
        assert s.x_train.is_floating_point() and s.tokenizer_json is None
    # and an architecture of that rank trains on it
    arch = next(a for a in ARCHS if ARCHS[a].input_rank == entry.input_rank)
    z = build_model(arch, tuple(s.x_train.shape[1:]), s.num_classes, 8)(s.x_train[:2])
    assert z.shape[-1] == s.num_classes


# ---------------------------------------------------------------------------------------------
# Losses and cache kinds


@pytest.mark.parametrize("name", list(CACHE_KINDS))
def test_cache_kind_impl_resolves(name: str):
    kind = CACHE_KINDS.load(name)
    assert kind.arrays and callable(kind.encode) and callable(kind.distill)


@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_entry_is_consistent(name: str):
    loss = LOSSES[name]
    assert isinstance(loss, Loss)
    transform = LOSSES.load(name)
    assert callable(transform)
    assert set(loss.hyper) <= set(HYPER) and set(loss.kinds) <= set(CACHE_KINDS)
    assert loss.distill in (None, "kl", "mse") and loss.labels in ("true", "teacher")
    if loss.smooth_labels:
        assert "epsilon" in loss.hyper
    if loss.distill is not None:
        assert "lambda" in loss.hyper and (loss.distill == "mse") == ("tau" not in loss.hyper)
    if loss.is_control:  # KD on transformed targets
        assert loss.distill == "kl" and loss.hypothesis is not None
    if loss.hypothesis is not None:  # a control, or plain label smoothing (its own control)
        assert loss.is_control or loss.smooth_labels
    # needs a teacher exactly when it reads the teacher's outputs in some form
    reads = loss.distill is not None or loss.labels == "teacher" or loss.is_control
    assert loss.needs_teacher == reads
    # the transform of the cached logits keeps their shape; the identity keeps them as they are
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(6, CLASSES, generator=g), torch.arange(6) % CLASSES
    out = transform(logits, y, 0.1, 0, 4.0)
    assert out.shape == logits.shape and torch.isfinite(out).all()
    assert torch.equal(out, logits) != loss.is_control


@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_reads_the_teacher_exactly_when_it_says_so(name: str):
    """A loss that needs no teacher computes on labels alone (NO_TARGETS); one that distils
    cannot. Params route it to no store, or to one."""
    loss = LOSSES[name]
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, CLASSES, generator=g, requires_grad=True)
    y = torch.arange(5) % CLASSES
    if loss.distill is None:
        total, term = student_loss(name, z, y, NO_TARGETS, 1.0, 1.0, 0.1)
        assert total.shape == (5,) and torch.isfinite(total).all() and not term.any()
    else:
        with pytest.raises((KdsweepError, KeyError)):
            student_loss(name, z, y, NO_TARGETS, 0.5, 2.0, 0.1)
        targets = TeacherTargets("full", {"logits": torch.randn(5, CLASSES, generator=g)})
        total, _ = student_loss(name, z, y, targets, 0.5, 2.0, 0.1)
        assert total.shape == (5,) and torch.isfinite(total).all()
    raw = tiny_raw()
    raw["methods"]["m"] = {"loss": name}
    p = parse_params(raw)
    assert p.methods["m"].uses_teacher == loss.needs_teacher
    assert (p.stores_or_none("m") == [None]) != loss.needs_teacher


# ---------------------------------------------------------------------------------------------
# Params validation against the registries


def _set(raw: dict, path: tuple, value: Any) -> dict:
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return raw


def _refused(raw: dict, *fragments: str) -> str:
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    msg = str(err.value)
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


@pytest.mark.parametrize(
    "path,value,fragments",
    [
        (("student", "arch"), "vgg11", ["student.arch", "'vgg11'", "resnet20"]),
        (("teachers", "main", "arch"), "vgg11", ["teachers.main.arch", "'vgg11'"]),
        (("data", "name"), "imagenet21k", ["data.name", "'imagenet21k'", "mnist1d"]),
        (("methods", "kd", "loss"), "kl", ["methods.kd.loss", "'kl'", "logit_mse"]),
        (("methods", "distill"), {}, ["methods.distill: unknown method"]),
        (("cache", "stores", "top3", "kind"), "dense", ["cache.stores.top3", "'dense'", "topk"]),
        (("cache", "stores", "full", "teacher"), "other", ["cache.stores.full", "'other'"]),
        (("methods", "kd", "cache"), "nope", ["methods.kd.cache", "'nope'", "random_head"]),
        (("cache", "reference"), "nope", ["cache.reference", "'nope'"]),
        (("methods", "ce", "tau"), 4, ["methods.ce", "'ce' does not use ['tau']"]),
        (("methods", "logit_mse", "tau"), 4, ["methods.logit_mse", "['tau']"]),
        (("methods", "ls", "lambda"), 0.5, ["methods.ls", "['lambda']"]),
        (("methods", "kd", "epsilon"), 0.2, ["methods.kd", "['epsilon']"]),
        (("alphas",), [0.05, 1.0, 0.05], ["alphas", "['0.05']", "more than once"]),
        (("subset_seeds",), [0, 1, 0], ["subset_seeds", "more than once"]),
        (("student", "train_seeds"), [3, 3], ["student.train_seeds", "more than once"]),
        (("methods", "kd", "tau"), [4, 4], ["methods.kd.tau", "more than once"]),
        (("sweep", "methods"), ["ce", "kd", "ce"], ["sweep.methods", "['ce']", "more than once"]),
        (("sweep", "ablation_methods"), ["kd_top3"] * 2, ["sweep.ablation_methods"]),
        (("sweep", "ablation_alphas"), [0.05, 0.05], ["sweep.ablation_alphas", "more than once"]),
        (("analysis", "controls"), ["ls_matched"] * 2, ["analysis.controls", "more than once"]),
        (("cache", "stores", "labels"), {"teacher": "main"}, ["'labels'"]),
        (("cache", "stores", "full", "k"), 3, ["cache.stores.full", "k=3 is meaningless"]),
        (
            ("methods", "kd_sampled4", "tau"),
            4,
            ["methods.kd_sampled4.tau", "cache.stores.sampled4.tau=1", "tau: 1"],
        ),
        (
            ("cache", "stores", "sampled4", "tau"),
            4.0,
            ["methods.kd_sampled4.tau", "cache.stores.sampled4.tau=4"],
        ),
        (("cache", "stores", "full", "tau"), 4.0, ["cache.stores.full", "tau", "only"]),
        (("cache", "stores", "sampled4", "tau"), 0, ["cache.stores.sampled4.tau"]),
        (("methods", "kd_top3", "topk_mode"), "spreed", ["methods.kd_top3.topk_mode", "spread"]),
        # from the old pipeline tests: out-of-range values and names
        (("alphas",), [0.0, 0.5], ["alphas: every alpha must lie in (0, 1]"]),
        (("alphas",), [1.5], ["alphas: every alpha must lie in (0, 1]"]),
        (("methods", "kd", "tau"), -1.0, ["methods.kd.tau"]),
        (("methods", "kd", "lambda"), 1.5, ["methods.kd.lambda"]),
        (("methods", "kd", "lambda"), "high", ["methods.kd.lambda"]),
        (("student", "budget", "mode"), "minutes", ["student.budget.mode"]),
        (("student", "widht"), 3, ["student.widht: unknown key"]),
        (("cache", "stores", "top3", "k"), None, ["cache.stores.top3", "needs k"]),
        (("teachers", "main", "epochs"), 0, ["teachers.main.epochs"]),
        (("sweep", "methods"), ["ce", "kdd"], ["sweep.methods names ['kdd']"]),
        (("sweep", "methods"), [], ["sweep.methods must not be empty"]),
        (("sweep", "ablation_methods"), [], ["must both be set or both be empty"]),
        (("analysis", "controls"), ["ce", "nope"], ["analysis.controls", "'nope'"]),
        (("analysis", "baseline"), "nope", ["analysis.baseline", "'nope'"]),
    ],
    ids=lambda v: ".".join(map(str, v)) if isinstance(v, tuple) else None,
)
def test_invalid_params_name_the_key(path: tuple, value: Any, fragments: list[str]):
    _refused(_set(tiny_raw(), path, value), *fragments)


def test_missing_required_sections_and_keys_are_named():
    raw = tiny_raw()
    del raw["cache"]
    _refused(raw, "cache: Field required")
    raw = tiny_raw()
    del raw["cache"]["stores"]["full"]["teacher"]
    _refused(raw, "cache.stores.full.teacher: Field required")


def _fits(arch: str, data: str) -> bool:
    return ARCHS[arch].input_rank in (None, DATASETS[data].input_rank)


@pytest.mark.parametrize("data", list(DATASETS))
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("role", ["teacher", "student"])
def test_arch_must_fit_the_dataset_input_rank(role: str, arch: str, data: str):
    raw = tiny_raw()
    raw["data"]["name"] = data
    if DATASETS[data].needs_root:
        raw["data"]["root"] = "data/raw"  # never read: validation happens before any work
    fits = next(a for a in ARCHS if _fits(a, data))
    set_teachers(raw, arch=arch if role == "teacher" else fits)
    raw["student"]["arch"] = arch if role == "student" else fits
    key = "teachers.main" if role == "teacher" else "student"
    if _fits(arch, data):
        parse_params(raw)
    else:
        msg = _refused(raw, f"{key}.arch={arch!r}", f"data.name={data!r}")
        assert f"rank {DATASETS[data].input_rank}" in msg
        assert all(a in msg for a in ARCHS if _fits(a, data))  # names the ones that fit


def test_cnn1d_on_digits_is_refused():
    raw = tiny_raw()
    raw["data"]["name"] = "digits"
    _refused(
        raw, "teachers.main.arch='cnn1d' takes inputs of rank 2", "data.name='digits' has rank 3"
    )


HYPER_VALUES = {"lambda": 0.5, "tau": 2, "epsilon": 0.2, "topk_mode": "renorm"}


@pytest.mark.parametrize("hyper", HYPER)
@pytest.mark.parametrize("loss", list(LOSSES))
def test_a_method_may_set_only_the_hyper_parameters_its_loss_reads(loss: str, hyper: str):
    raw = tiny_raw()
    raw["methods"]["m"] = {"loss": loss, hyper: HYPER_VALUES[hyper]}
    if hyper in LOSSES[loss].hyper:
        parse_params(raw)
    else:
        _refused(raw, "methods.m", f"{loss!r} does not use [{hyper!r}]")


@pytest.mark.parametrize("kind", list(CACHE_KINDS))
@pytest.mark.parametrize("teacher", list(TINY["teachers"]))
def test_every_registered_kind_and_teacher_is_a_valid_store(kind: str, teacher: str):
    raw = tiny_raw()
    store = {"teacher": teacher, "kind": kind, **({"k": 2} if CACHE_KINDS[kind].needs_k else {})}
    raw["cache"]["stores"]["extra"] = store
    assert parse_params(raw).cache.stores["extra"].kind == kind
    if CACHE_KINDS[kind].needs_k:
        del store["k"]
        _refused(raw, "cache.stores.extra", "needs k")


def test_methods_reading_partition_the_sweep_into_student_stages():
    """Each swept method trains once per store it reads, in that store's stage (a method of
    labels only: in `labels`), and nowhere else."""
    raw = tiny_raw()
    raw["methods"]["kd"]["cache"] = ["full", "random_head"]  # a method on two teachers
    p = parse_params(raw)
    stages = [*p.cache.stores, None]
    swept = [*p.sweep.methods, *p.sweep.ablation_methods]
    seen = [(m, s) for s in stages for m in p.methods_reading(s)]
    assert sorted(seen, key=str) == sorted(
        [(m, s) for m in swept for s in p.stores_or_none(m)], key=str
    )
    assert ("kd", "full") in seen and ("kd", "random_head") in seen
    for m in swept:
        assert p.alphas_of(m) == (p.alphas if m in p.sweep.methods else p.sweep.ablation_alphas)


DEFAULT = yaml.safe_load((REPO / "params.yaml").read_text())


def _leaves(node: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for key, value in node.items():
        if isinstance(value, dict) and value:
            out += _leaves(value, (*prefix, key))
        else:
            out.append((*prefix, key))
    return out


@pytest.mark.parametrize("path", _leaves(DEFAULT), ids=lambda p: ".".join(map(str, p)))
def test_every_params_key_refuses_a_wrong_type_by_name(path: tuple):
    """Each leaf of the default params.yaml, given a value of the wrong type, is named."""
    raw = _set(copy.deepcopy(DEFAULT), path, {"not": "a valid value"})
    _refused(raw, ".".join(map(str, path)))


@pytest.mark.parametrize("section", [k for k, v in DEFAULT.items() if isinstance(v, dict)])
def test_unknown_keys_are_refused_in_every_section(section: str):
    """A misspelt key is named (in `methods`, a new name that is not a recipe is refused)."""
    raw = copy.deepcopy(DEFAULT)
    raw[section]["typo_key"] = 1
    raw["typo_section"] = 1
    _refused(raw, f"{section}.typo_key:", "typo_section: unknown key")


@pytest.mark.parametrize(
    "params",
    ["params.yaml", *sorted(str(f.relative_to(REPO)) for f in REPO.glob("conf/track/*.yaml"))],
)
def test_loading_and_validating_params_does_not_import_torch(params: str):
    code = (
        "import sys\n"
        "from kdsweep.config import load_params\n"
        f"p = load_params({params!r})\n"
        "assert p.methods and p.cache.stores and p.data.task\n"
        "for m in p.methods:\n"
        "    p.stores_or_none(m), p.alphas_of(m), p.students_of(m)\n"
        "for s in [*p.cache.stores, None]:\n"
        "    p.methods_reading(s)\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr[-2000:]
