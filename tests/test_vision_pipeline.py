"""The vision path through the real stages' functions: CIFAR-100 on disk in torchvision's format
(params/cifar100.yaml shrunk), augmentation-consistent views, and scikit-learn's digits."""

from pathlib import Path

import pytest
import torch
import yaml

from kdsweep import pipeline
from kdsweep.cache import LogitCache
from kdsweep.config import parse_params
from kdsweep.data import load_prepared
from kdsweep.vision import apply_aug
from tests.conftest import tiny_raw
from tests.test_vision import no_md5, write_cifar100  # noqa: F401  (no_md5 is a fixture)

REPO = Path(__file__).resolve().parents[1]


def shrink(raw: dict) -> dict:
    raw["teacher"].update(epochs=1, batch_size=16)
    raw["student"].update(budget={"mode": "steps", "value": 4}, batch_size=8, train_seeds=[0])
    raw["subset_seeds"] = [0]
    raw["cache"].update(chunk_rows=16, batch_size=8)
    return raw


@pytest.mark.usefixtures("no_md5")
def test_cifar100_params_file_runs_on_generated_cifar_data_with_views(tmp_path, monkeypatch):
    write_cifar100(tmp_path / "raw", n_train=120, n_test=20)
    monkeypatch.chdir(tmp_path)
    raw = shrink(yaml.safe_load((REPO / "params/cifar100.yaml").read_text()))
    raw["data"].update(root=str(tmp_path / "raw"), n_train=120, n_test=20)
    raw["teacher"].update(arch="resnet20", width=4)
    raw["student"].update(arch="resnet20", width=4)
    raw["alphas"] = [1.0]
    raw["cache"]["views"] = 2
    raw["cache"]["stores"] = {"full": {"teacher": "main", "kind": "full", "dtype": "float32"}}
    raw["methods"] = {"ce": {}, "kd": {"tau": 4}}
    raw["sweep"] = {"methods": ["ce", "kd"]}
    raw["analysis"] = {"controls": []}
    p = parse_params(raw)
    pipeline.prepare(p)
    pipeline.train_teacher(p)
    pipeline.build_cache(p, "full")
    cache = LogitCache(Path("data/logits/full.zarr"))
    train = cache.read("train").tensors
    assert train["logits"].shape == (120, 2, 100) and train["aug"].shape == (120, 2, 3)
    assert cache.read("test").tensors["logits"].shape == (20, 100)  # the test split has no views
    # the stored outputs are the teacher's outputs for exactly the stored views
    teacher, _ = pipeline.load_teacher(p, "main", load_prepared(Path("data/prepared")))
    x = load_prepared(Path("data/prepared")).splits.x_train[:10]
    for v in range(2):
        with torch.no_grad():
            want = teacher(apply_aug(x, train["aug"][:10, v]))
        assert torch.allclose(train["logits"][:10, v], want, atol=1e-5)
    # a student replays those views: its inputs are the stored views, its targets their rows
    batches = pipeline.Batches(
        x,
        torch.zeros(10, dtype=torch.long),
        pipeline.CacheSplit("full", {"logits": train["logits"][:10], "aug": train["aug"][:10]}),
        seed=0,
    )
    idx = torch.arange(10)
    views = batches.inputs(idx)
    assert torch.equal(views, apply_aug(x, train["aug"][idx, batches.view]))
    assert torch.equal(batches.targets(idx).tensors["logits"], train["logits"][idx, batches.view])
    rows = pipeline.train_students(p, 1.0, ["kd"])
    assert len(rows) == 1 and rows[0]["dataset"] == "cifar100" and 0 <= rows[0]["agreement"] <= 1


def test_digits_pipeline_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = shrink(tiny_raw())
    raw["data"] = {"name": "digits", "n_train": 1200, "n_test": 300, "seed": 0}
    raw["teacher"].update(arch="mlp", width=32, epochs=3)
    raw["student"].update(arch="resnet20", width=4)
    raw["alphas"] = [0.1, 1.0]
    p = parse_params(raw)
    pipeline.prepare(p)
    teacher = pipeline.train_teacher(p)
    assert teacher["main"]["test_acc"] > 0.5  # an MLP learns 8x8 digits in a few epochs
    for name in p.cache.stores:
        pipeline.build_cache(p, name)
    methods = ["ce", "kd", "ls_matched", "kd_top3"]
    assert pipeline.run_student_stage(p, 0.1, methods, Path("data/students/student-0.1")).exists()
    from kdsweep.analysis import collect_runs
    from kdsweep.report import write_report

    table = collect_runs(Path("data/students"))
    assert table.num_rows == 5 and set(table.column("dataset").to_pylist()) == {
        "digits"
    }  # kd: τ ∈ {1, 4}
    from kdsweep.analysis import write_parquet

    write_parquet(table, Path("runs.parquet"))
    write_report(
        Path("runs.parquet"), p.model_dump(by_alias=True), Path("reports"), Path("data/logits")
    )
    report = Path("reports/report.md").read_text()
    assert "dataset **digits**" in report and "ls_matched" in report


@pytest.mark.parametrize("arch", ["vit", "resnet20"])
def test_image_students_train_with_the_generic_loop(arch):
    from kdsweep.models import build_model
    from kdsweep.train import fit

    torch.manual_seed(0)
    m = build_model(arch, (3, 32, 32), 10, 8 if arch == "resnet20" else 32)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    before = [q.clone() for q in m.parameters()]
    fit(
        m,
        x,
        lambda z, i: torch.nn.functional.cross_entropy(z, y[i], reduction="none"),
        2,
        8,
        1e-3,
        0.0,
        0,
    )
    assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters(), strict=True))
