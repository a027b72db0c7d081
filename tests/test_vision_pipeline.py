"""The vision path through the stages' functions: CIFAR-100 on disk in torchvision's format
(conf/track/cifar100.yaml shrunk) with augmentation-consistent views, and scikit-learn's digits."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from kdsweep.augment import apply_aug
from kdsweep.cache.reader import LogitCache
from kdsweep.config import STUDENTS_OF_LABELS, Params, parse_params
from kdsweep.data.prepared import load_prepared
from kdsweep.io import load_checkpoint
from kdsweep.report import write_report
from kdsweep.runs import collect_runs, write_parquet
from kdsweep.targets import TeacherTargets, ViewBatches
from kdsweep.teacher import teacher_model
from tests.conftest import build_upstream, set_teachers, student_stage, tiny_raw
from tests.test_images import no_md5, write_cifar100  # noqa: F401  (no_md5 is a fixture)

REPO = Path(__file__).resolve().parents[1]


def shrink(raw: dict) -> dict:
    set_teachers(raw, epochs=1, batch_size=16)
    raw["student"].update(budget={"mode": "steps", "value": 4}, batch_size=8, train_seeds=[0])
    raw["subset_seeds"] = [0]
    raw["cache"].update(chunk_rows=16, batch_size=8)
    return raw


def expected_rows(p: Params) -> int:
    swept = [*p.sweep.methods, *p.sweep.ablation_methods]
    per = len(p.subset_seeds) * len(p.student.train_seeds)
    return sum(len(p.alphas_of(m)) * per * len(p.methods[m].taus) for m in swept)


def run_students(p: Params, root: Path) -> list[dict]:
    """Every student stage, as dvc.yaml runs them; the rows the aggregate stage collects."""
    for store in [*p.cache.stores, None]:
        student_stage(p, root, store)
    names = [*p.cache.stores, STUDENTS_OF_LABELS]
    return collect_runs(root / "data/students", names).to_pylist()


@pytest.mark.usefixtures("no_md5")
def test_cifar100_params_file_runs_on_generated_cifar_data_with_views(tmp_path, monkeypatch):
    write_cifar100(tmp_path / "raw", n_train=120, n_test=20)
    raw = shrink(yaml.safe_load((REPO / "conf/track/cifar100.yaml").read_text()))
    raw["data"].update(root=str(tmp_path / "raw"), n_train=120, n_test=20)
    set_teachers(raw, arch="resnet20", width=4)
    raw["student"].update(arch="resnet20", width=4, stacked="off")  # ViewBatches, spied below
    raw["alphas"] = [1.0]
    raw["cache"]["stores"] = {
        "full": {"teacher": "main", "kind": "full", "dtype": "float32", "views": 2}
    }
    raw["methods"] = {"ce": {}, "kd": {"tau": 4}}
    raw["sweep"] = {"methods": ["ce", "kd"]}
    raw["analysis"] = {"controls": []}
    p = parse_params(raw)
    build_upstream(p, tmp_path)
    data = tmp_path / "data"
    cache = LogitCache(data / "logits/full.zarr")
    train = cache.read("train").tensors
    views, n, n_test = p.cache.stores["full"].views, p.data.n_train, p.data.n_test
    assert train["logits"].shape == (n, views, 100) and train["aug"].shape == (n, views, 3)
    assert cache.read("test").tensors["logits"].shape == (n_test, 100)  # no views of the test split
    # the stored outputs are the teacher's outputs for exactly the stored views
    prep = load_prepared(data / "prepared")
    teacher = teacher_model(p.teachers["main"], prep)
    load_checkpoint(teacher, data / "teachers/main.safetensors")
    x = prep.splits.x_train[:10]
    for v in range(views):
        with torch.no_grad():
            want = teacher.eval()(apply_aug(x, train["aug"][:10, v]))
        assert torch.allclose(train["logits"][:10, v], want, atol=1e-5)
    # a student replays those views: its inputs are the stored views, its targets their rows
    rows = TeacherTargets("full", {"logits": train["logits"][:10], "aug": train["aug"][:10]})
    idx = torch.arange(10)
    inputs, (_, t) = ViewBatches(x, torch.zeros(10, dtype=torch.long), rows, seed=0)(idx)
    for i in range(10):
        assert any(
            torch.equal(inputs[i], apply_aug(x[i : i + 1], train["aug"][i : i + 1, v])[0])
            and torch.equal(t.tensors["logits"][i], train["logits"][i, v])
            for v in range(views)
        ), i
    seen = []  # the teacher rows of every student's batches
    init = ViewBatches.__init__

    def spy(self, x, y, t, *args):
        seen.append(t)
        init(self, x, y, t, *args)

    monkeypatch.setattr(ViewBatches, "__init__", spy)
    out = run_students(p, tmp_path)
    # students of labels replay the same cached views as KD's (the reference store's `aug`)
    of_labels = [t for t in seen if t.kind is None]
    assert len(of_labels) == len([r for r in out if r["cache_name"] is None]) == 1
    assert set(of_labels[0].tensors) == {"aug"}
    rows = of_labels[0].tensors["aug"]
    assert rows.shape[1:] == (views, 3) and all((train["aug"] == r).all((1, 2)).any() for r in rows)
    assert len(out) == expected_rows(p) and {r["dataset"] for r in out} == {"cifar100"}
    assert all(0 <= r["agreement"] <= 1 for r in out)
    kd = [r for r in out if r["cache_name"] == "full"]
    assert kd and all(r["train_path"] == "sequential" for r in kd)  # stacked: off
    summary = json.loads((data / "summaries/full.json").read_text())
    assert summary["views"] == views and summary["diagnostic_rows"] == n
    assert 0 <= summary["teacher_view_acc"] <= 1 and summary["soft_targets"]


def test_digits_pipeline_end_to_end(tmp_path):
    raw = shrink(tiny_raw())
    raw["data"] = {"name": "digits", "n_train": 1200, "n_test": 300, "seed": 0}
    set_teachers(raw, arch="mlp", width=32, epochs=3)
    raw["student"].update(arch="resnet20", width=4)
    raw["alphas"] = [0.1, 1.0]
    raw["sweep"]["ablation_methods"] = ["kd_top3", "ls_matched"]
    p = parse_params(raw)
    build_upstream(p, tmp_path)
    teacher = json.loads((tmp_path / "data/teachers/main.json").read_text())
    assert teacher["test_acc"] > 0.5  # an MLP learns 8x8 digits in a few epochs
    rows = run_students(p, tmp_path)
    assert len(rows) == expected_rows(p) and {r["dataset"] for r in rows} == {"digits"}
    write_parquet(
        collect_runs(tmp_path / "data/students", [*p.cache.stores, STUDENTS_OF_LABELS]),
        tmp_path / "runs.parquet",
    )
    report = write_report(
        tmp_path / "runs.parquet",
        p.analysis,
        tmp_path / "reports",
        tmp_path / "data/summaries",
        list(p.cache.stores),
    ).read_text()
    assert "dataset **digits**" in report and "ls_matched" in report
