"""Student stages (kdsweep.students.*): one stage per cache store trains every swept method that
reads it, from the cached teacher targets only; stacked training equals sequential training."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

import kdsweep.cache.build
import kdsweep.io
import kdsweep.teacher
from kdsweep.cache.build import build_cache
from kdsweep.cache.format import CacheError
from kdsweep.config import STUDENTS_OF_LABELS, Params, ParamsError, parse_params
from kdsweep.data.prepare import prepare
from kdsweep.data.prepared import load_prepared, subset_size
from kdsweep.data.splits import DataError
from kdsweep.io import CheckpointError
from kdsweep.models import build_model
from kdsweep.models.basic import CNN1D
from kdsweep.registry import LOSSES
from kdsweep.runs import RUN_SCHEMA, collect_runs
from kdsweep.students.inputs import StageInputs, open_store
from kdsweep.students.plan import stack_key, stage_jobs
from kdsweep.students.stage import run_student_stage
from kdsweep.targets import NO_TARGETS
from kdsweep.teacher import teacher_model
from kdsweep.train import NonFiniteLoss, fit
from tests.conftest import set_teachers, student_stage, tiny_raw

ALL_METHODS = list(tiny_raw()["methods"])


def every_method(**student) -> Params:
    """TINY with every method swept: `ce` and `kd` at every α, the rest at the ablation α."""
    raw = tiny_raw()
    rest = [m for m in ALL_METHODS if m not in ("ce", "kd")]
    raw["sweep"] = {"methods": ["ce", "kd"], "ablation_alphas": [0.05], "ablation_methods": rest}
    raw["student"].update(student)
    return parse_params(raw)


def stages(p: Params) -> list[str | None]:
    """Every student stage of `p`, as dvc.yaml lays them out: one per store, then `labels`."""
    return [*p.cache.stores, None]


def expected_rows(p: Params, store: str | None) -> int:
    """Students of the stage of `store`: its methods' α × subset seeds × train seeds × τ."""
    return sum(
        len(p.alphas_of(m))
        * len(p.subset_seeds)
        * len(p.student.train_seeds)
        * len(p.methods[m].taus)
        for m in p.methods_reading(store)
    )


def _train_targets(p: Params, store: str | None, ws: Path):
    prep = load_prepared(ws / "data/prepared")
    if store is None:
        return prep, NO_TARGETS
    path = ws / "data/logits" / f"{store}.zarr"
    checkpoint = ws / "data/teachers" / f"{p.cache.stores[store].teacher}.safetensors"
    return prep, open_store(p, store, path, prep, checkpoint).read("train")


def test_each_store_stage_trains_its_methods_from_the_cache_without_the_teacher(
    workspace, monkeypatch
):
    """Any teacher construction, checkpoint load or teacher-width forward raises: students never
    need one. Every swept method trains in its store's stage (or `labels`), each student once."""
    p = every_method()

    def forbidden(*a, **k):
        raise AssertionError("the student stage touched the teacher")

    monkeypatch.setattr(kdsweep.teacher, "teacher_model", forbidden)
    monkeypatch.setattr(kdsweep.teacher, "train_teacher", forbidden)
    monkeypatch.setattr(kdsweep.io, "load_checkpoint", forbidden)
    monkeypatch.setattr(kdsweep.cache.build, "build_cache", forbidden)
    real_forward = CNN1D.forward

    def guarded_forward(self, x):
        if self.features[0].out_channels == p.teachers["main"].width:
            forbidden()
        return real_forward(self, x)

    monkeypatch.setattr(CNN1D, "forward", guarded_forward)
    n = len(load_prepared(workspace / "data/prepared").splits.y_train)
    all_rows = []
    for store in stages(p):
        rows = json.loads(student_stage(p, workspace, store).read_text())
        assert len(rows) == expected_rows(p, store), store
        assert {r["method"] for r in rows} == set(p.methods_reading(store))
        for method in p.methods_reading(store):
            mine = [r for r in rows if r["method"] == method]
            m = p.methods[method]
            assert {r["alpha"] for r in mine} == set(p.alphas_of(method)), method
            assert {r["subset_seed"] for r in mine} == set(p.subset_seeds)
            if "tau" in LOSSES[m.loss].hyper:
                assert {r["tau"] for r in mine} == set(m.taus)
        for r in rows:
            loss = LOSSES[r["loss"]]
            assert set(r) == set(RUN_SCHEMA.names)
            assert r["cache_name"] == store and r["loss"] == p.methods[r["method"]].loss
            if store is not None:
                assert r["cache_kind"] == p.cache.stores[store].kind
                assert r["teacher_id"] == p.cache.stores[store].teacher
            assert r["n_train"] + r["n_val"] == subset_size(r["alpha"], n)
            assert 0 < r["n_val"] < r["n_train"] and 0.0 <= r["val_acc"] <= 1.0
            assert 0.0 <= r["test_acc"] <= 1.0 and 0.0 <= r["agreement"] <= 1.0
            assert r["test_kl"] >= 0 and r["ece"] >= 0 and r["steps"] == p.student.budget.value
            assert (r["neg_kl_frac"] is None) == (loss.distill is None)
            assert (r["tau"] is None) == ("tau" not in loss.hyper)
        all_rows += rows
    assert sorted({r["method"] for r in all_rows}) == sorted(ALL_METHODS)
    assert len({r["run_id"] for r in all_rows}) == len(all_rows)
    names = [*p.cache.stores, STUDENTS_OF_LABELS]
    assert collect_runs(workspace / "data/students", names).num_rows == len(all_rows)


def test_a_store_that_no_swept_method_reads_gives_an_empty_stage(workspace):
    raw = tiny_raw()
    raw["sweep"] = {"methods": ["ce", "kd"]}
    p = parse_params(raw)
    idle = [s for s in p.cache.stores if not p.methods_reading(s)]
    assert idle
    for store in idle:
        assert json.loads(student_stage(p, workspace, store).read_text()) == []


def test_stage_arguments_must_agree_with_the_params(workspace, tiny_params):
    p, data = tiny_params, workspace / "data"
    ref = data / "logits/full.zarr"
    prepared = data / "prepared"
    with pytest.raises(ParamsError, match="not one of cache.stores"):
        run_student_stage(p, StageInputs(prepared, ref, "nope", ref), data / "out")
    with pytest.raises(ParamsError, match="exactly when"):
        run_student_stage(p, StageInputs(prepared, ref, "full", None), data / "out")
    with pytest.raises(ParamsError, match="exactly when"):
        run_student_stage(p, StageInputs(prepared, ref, None, ref), data / "out")


def test_seeds_are_deterministic_on_cpu(workspace, tiny_params):
    """Two from-scratch runs of a stage (nothing to reuse) write the same rows."""
    p, data = tiny_params, workspace / "data"
    inputs = StageInputs(data / "prepared", data / "logits/full.zarr")
    runs = [json.loads(run_student_stage(p, inputs, data / d).read_text()) for d in "ab"]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "train_seconds"} for r in rows]  # noqa: E731
    assert strip(runs[0]) == strip(runs[1])
    assert len(runs[0]) == expected_rows(p, None)
    assert len({(r["test_acc"], r["ece"]) for r in runs[0]}) > 1  # other seeds, other students


def test_student_refuses_a_cache_from_another_teacher(workspace, tiny_params):
    teachers = workspace / "data/teachers"
    shutil.copy(teachers / "random_head.safetensors", teachers / "main.safetensors")
    with pytest.raises(CacheError, match="another teacher"):
        student_stage(tiny_params, workspace, "full")


def test_student_refuses_a_cache_of_another_dataset(workspace, tiny_params):
    raw = tiny_raw()
    raw["data"]["seed"] = 1
    prepare(parse_params(raw).data, tiny_params.subset_seeds, workspace / "data/prepared")
    with pytest.raises(CacheError, match="another dataset"):
        student_stage(tiny_params, workspace, "full")


def test_subset_too_small_for_the_classes_is_refused(workspace):
    raw = tiny_raw()
    raw["alphas"] = [0.01, 1.0]  # 6 of 600 samples < 10 classes
    with pytest.raises(DataError, match="fewer than the 10 classes"):
        student_stage(parse_params(raw), workspace, None)


def test_stacked_stage_matches_the_sequential_one(workspace):
    """student.stacked: on trains each stage's students at once, in one stack per batch size and
    step count across α and methods; the rows match `off` (one student after another), store by
    store."""
    for store in stages(every_method()):
        rows = {}
        for mode in ("on", "off"):
            p = every_method(arch="mlp", width=16, stacked=mode)
            out = student_stage(p, workspace, store)
            rows[mode] = json.loads(out.read_text())
        n = expected_rows(p, store)
        assert n > 0 and len(rows["on"]) == len(rows["off"]) == n, store
        assert [r["train_path"] for r in rows["on"]] == ["stacked"] * n
        assert [r["train_path"] for r in rows["off"]] == ["sequential"] * n
        assert not {r["run_id"] for r in rows["on"]} & {r["run_id"] for r in rows["off"]}
        for a, b in zip(rows["on"], rows["off"], strict=True):
            same = ("method", "alpha", "subset_seed", "tau", "params_hash")
            assert [a[k] for k in same] == [b[k] for k in same]
            assert a["test_acc"] == pytest.approx(b["test_acc"], abs=0.01), a["method"]
            assert a["agreement"] == pytest.approx(b["agreement"], abs=0.01), a["method"]


def test_a_stage_s_students_share_a_stack_across_alpha_and_methods(workspace):
    """Every student of a stage with one configuration, batch size and step count shares a
    stack, whatever its α, method, loss, λ, τ, ε or seed (the store fixes the target arrays);
    another batch size (a subset smaller than a batch), another step count (`min_epochs` on a
    larger subset) or another configuration is another stack."""
    raw = tiny_raw()
    raw["alphas"] = [0.1, 1.0]
    raw["sweep"] = {"methods": ALL_METHODS}
    p = parse_params(raw)
    prep = load_prepared(workspace / "data/prepared")
    vf = p.student.val_fraction

    def keys(p: Params, store: str | None) -> dict:
        t = _train_targets(p, store, workspace)[1]
        out: dict = {}
        for job in stage_jobs(p, store):
            n = len(prep.split(job.alpha, job.subset_seed, vf)[0])
            out.setdefault(stack_key(job, t, n), set()).add((job.method, job.alpha))
        return out

    full = keys(p, "full")
    assert len(full) == 1  # kd at both τ, the controls, logit_mse, top1_teacher; both α
    (members,) = full.values()
    assert {m for m, _ in members} == set(p.methods_reading("full"))
    assert {a for _, a in members} == {0.1, 1.0}
    assert len(keys(p, None)) == 1  # ce and ls (ε per student)
    assert len(keys(p, "top3")) == 1
    # a budget of min_epochs: α = 1 trains more steps than α = 0.1, in its own stack
    raw["student"]["budget"] = {"mode": "steps", "value": 20, "min_epochs": 5}
    assert len(keys(parse_params(raw), "full")) == 2
    # a subset smaller than a batch takes smaller batches: its own stack
    raw["student"]["budget"] = {"mode": "steps", "value": 20}
    raw["alphas"] = [0.05, 1.0]  # 30 rows, 27 to train on, batches of 32
    assert len(keys(parse_params(raw), "full")) == 2
    raw["alphas"] = [0.1, 1.0]
    raw["students"] = {"small": {}, "wide": {"width": 12}}
    assert len(keys(parse_params(raw), "full")) == 2


# ---------------------------------------------------------------------------------------------
# The teacher checkpoint behind the stores: loaded as tensors only, and only if it fits


def _build_full(p: Params, ws: Path) -> None:
    data = ws / "data"
    build_cache(
        p,
        "full",
        load_prepared(data / "prepared"),
        data / "teachers/main.safetensors",
        data / "logits/again.zarr",
        data / "summaries/again.json",
    )


def test_pickled_checkpoint_is_refused_without_running_it(workspace, tiny_params, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (workspace / "data/teachers/main.safetensors").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="not a valid safetensors checkpoint"):
        _build_full(tiny_params, workspace)
    assert not marker.exists()


def test_checkpoint_with_wrong_shapes_is_refused(workspace):
    raw = tiny_raw()
    set_teachers(raw, width=32)
    with pytest.raises(CheckpointError, match="does not fit the configured model"):
        _build_full(parse_params(raw), workspace)


def test_the_cache_stage_runs_the_saved_teacher(workspace, tiny_params):
    """The store holds the outputs of the checkpoint's weights, not of a fresh model."""
    from kdsweep.cache.reader import LogitCache
    from kdsweep.io import load_checkpoint

    prep = load_prepared(workspace / "data/prepared")
    model = teacher_model(tiny_params.teachers["main"], prep)
    load_checkpoint(model, workspace / "data/teachers/main.safetensors")
    with torch.no_grad():
        want = model.eval()(prep.splits.x_test[:20])
    got = LogitCache(workspace / "data/logits/full.zarr").read("test").tensors["logits"][:20]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    shutil.rmtree(workspace / "data/logits/full.zarr")
    with pytest.raises(CacheError, match="not found"):
        student_stage(tiny_params, workspace, None)  # the reference store is gone


def test_nan_loss_stops_with_a_clear_error():
    m = build_model("mlp", (1, 40), 10, 8)
    x = torch.randn(50, 1, 40)
    with pytest.raises(NonFiniteLoss, match="loss became nan"):
        fit(m, x, lambda z, i: z.sum(-1) * float("nan"), 3, 16, 0.01, 0.0, 0)


def test_a_missing_teacher_checkpoint_is_explained(workspace: Path, tiny_params: Params) -> None:
    prep = load_prepared(workspace / "data" / "prepared")
    store = workspace / "data" / "logits" / "full.zarr"
    with pytest.raises(CheckpointError, match="not found: run `dvc repro teacher` or `dvc pull`"):
        open_store(tiny_params, "full", store, prep, workspace / "missing.safetensors")
