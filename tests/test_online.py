"""Online KD, the reference caches are measured against: an `online` store holds no training
rows, and its students run the teacher on every batch, on exactly the inputs they see."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdsweep.cache.build import build_cache
from kdsweep.cache.format import CacheError
from kdsweep.cache.reader import LogitCache
from kdsweep.config import ParamsError, parse_params
from kdsweep.data.prepared import load_prepared
from kdsweep.students.fit import train_one
from kdsweep.students.inputs import online_teacher, open_store, student_data
from kdsweep.students.plan import student_jobs
from kdsweep.targets import TeacherTargets, ViewBatches
from tests.conftest import set_teachers, student_stage, tiny_raw


def online_raw(views: int | str = 1) -> dict:
    raw = tiny_raw()
    raw["cache"]["stores"]["online"] = {"teacher": "main", "kind": "online", "views": views}
    raw["methods"] = {
        "ce": {},
        "kd": {"tau": 4},
        "kd_online": {"tau": 4, "cache": "online", "loss": "kd"},
    }
    raw["sweep"] = {"methods": ["ce", "kd", "kd_online"]}
    raw["analysis"] = {"controls": []}
    return raw


def build_online(root: Path, raw: dict) -> None:
    p = parse_params(raw)
    data = root / "data"
    build_cache(
        p,
        "online",
        load_prepared(data / "prepared"),
        data / "teachers" / "main.safetensors",
        data / "logits" / "online.zarr",
        data / "summaries" / "online.json",
    )


def test_online_store_holds_no_training_rows_and_the_teachers_test_logits(workspace):
    build_online(workspace, online_raw())
    store = LogitCache(workspace / "data/logits/online.zarr")
    full = LogitCache(workspace / "data/logits/full.zarr")  # float32 in TINY
    assert store.kind == "online" and set(store.attrs["splits"]) == {"test"}
    assert "train" not in store.root
    assert torch.allclose(
        store.read("test").tensors["logits"], full.read("test").tensors["logits"], atol=1e-5
    )
    summary = json.loads((workspace / "data/summaries/online.json").read_text())
    assert summary["train_bytes_per_row"] == 0 and summary["views"] == 1


def test_online_targets_equal_a_float32_cache_and_the_students_agree(workspace):
    """Without augmentation, the teacher run on a batch gives the float32 cache's rows (to float
    tolerance); a student trained online is the cached-KD student: identical after a few steps,
    equally accurate after the whole (short) budget."""
    raw = online_raw()
    build_online(workspace, raw)
    p = parse_params(raw)
    data = workspace / "data"
    prep = load_prepared(data / "prepared")
    teacher = online_teacher(p, "online", data / "teachers/main.safetensors", prep)
    cached = LogitCache(data / "logits/full.zarr").read("train")
    s = prep.splits
    idx = torch.arange(0, len(s.y_train), 7)
    _, (_, live) = ViewBatches(
        s.x_train, s.y_train, TeacherTargets("online", {}), 0, False, teacher
    )(idx)
    _, (_, rows) = ViewBatches(s.x_train, s.y_train, cached, 0)(idx)
    assert torch.allclose(live.tensors["logits"], rows.tensors["logits"], atol=1e-5)

    # a few steps: the same student either way
    raw["student"]["budget"] = {"mode": "steps", "value": 4}
    few = parse_params(raw)
    on_job = next(j for j in student_jobs(few, "kd_online", "online") if j.alpha == 1.0)
    off_job = next(
        j for j in student_jobs(few, "kd", "full") if j.alpha == 1.0 and j.seed == on_job.seed
    )
    val = (s.x_train[:10], s.y_train[:10])
    on = train_one(
        few,
        on_job,
        student_data(on_job, prep, TeacherTargets("online", {}), 0.1),
        val,
        10,
        torch.device("cpu"),
        False,
        teacher,
    )[0]
    off = train_one(
        few, off_job, student_data(off_job, prep, cached, 0.1), val, 10, torch.device("cpu")
    )[0]
    for a, b in zip(on.parameters(), off.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)

    # the whole budget, through the stages: the same accuracy within seed noise
    online_rows = json.loads(student_stage(p, workspace, "online").read_text())
    full_rows = json.loads(student_stage(p, workspace, "full").read_text())
    kd = {(r["alpha"], r["subset_seed"]): r for r in full_rows if r["method"] == "kd"}
    assert len(online_rows) == len(kd) == 4
    for r in online_rows:
        assert r["cache_kind"] == "online" and r["method"] == "kd_online"
        twin = kd[(r["alpha"], r["subset_seed"])]
        assert r["test_acc"] == pytest.approx(twin["test_acc"], abs=0.02)
        assert r["student_key"] != twin["student_key"]


def test_fresh_views_reach_online_students_and_students_of_labels(workspace):
    """views: fresh gives every step a new augmented view — the teacher labels it on the spot —
    and the students of labels beside it (reference store online) see fresh views too."""
    raw = online_raw("fresh")
    raw["cache"]["reference"] = "online"
    raw["methods"]["kd"]["cache"] = "full"
    build_online(workspace, raw)
    p = parse_params(raw)
    rows = json.loads(student_stage(p, workspace, "online").read_text())
    assert {r["train_path"] for r in rows} == {"stacked"} and len(rows) == 4  # views stack too
    fresh_ce = json.loads(student_stage(p, workspace, None).read_text())
    clean = parse_params(online_raw())
    (workspace / "data/students/labels/runs.json").unlink()
    clean_ce = json.loads(student_stage(clean, workspace, None).read_text())
    assert [r["method"] for r in fresh_ce] == [r["method"] for r in clean_ce] == ["ce"] * 4
    assert all(
        a["student_key"] != b["student_key"] for a, b in zip(fresh_ce, clean_ce, strict=True)
    )
    assert any(a["val_curve"] != b["val_curve"] for a, b in zip(fresh_ce, clean_ce, strict=True))


def test_online_store_refuses_another_teachers_checkpoint(workspace):
    raw = online_raw()
    build_online(workspace, raw)
    data = workspace / "data"
    with pytest.raises(CacheError, match="another teacher"):
        open_store(
            parse_params(raw),
            "online",
            data / "logits/online.zarr",
            load_prepared(data / "prepared"),
            data / "teachers/random_head.safetensors",
        )


@pytest.mark.parametrize(
    ("store", "method", "match"),
    [
        ({"kind": "full", "views": "fresh"}, None, "needs the teacher at every step"),
        ({"kind": "online", "views": 4}, None, "views 1 .clean inputs. or 'fresh'"),
        ({"kind": "full", "draws": 4}, None, "meaningful only for kind 'sampled'"),
        ({"kind": "online"}, {"loss": "ls_matched", "tau": 4}, "reads caches of kind full"),
        ({"kind": "online"}, {"loss": "top1_teacher"}, "reads caches of kind full"),
    ],
)
def test_store_and_method_combinations_are_checked_at_load(store, method, match):
    raw = tiny_raw()
    raw["cache"]["stores"]["x"] = {"teacher": "main", **store}
    if method:
        raw["methods"]["m"] = {**method, "cache": "x"}
    with pytest.raises(ParamsError, match=match):
        parse_params(raw)


def test_views_need_an_augmentation_family():
    raw = tiny_raw()
    raw["data"] = {"name": "pydoc", "n_train": 100, "n_test": 10}
    set_teachers(raw, arch="gpt")
    raw["student"]["arch"] = "gpt"
    raw["cache"]["stores"]["full"]["views"] = 2
    with pytest.raises(ParamsError, match="no\\s+augmentation family"):
        parse_params(raw)
    raw["cache"]["stores"]["full"]["views"] = 1
    set_teachers(raw, augment=True)
    with pytest.raises(ParamsError, match="teachers.main.augment"):
        parse_params(raw)
