import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from typer.testing import CliRunner

from kdsweep.cli import app
from tests.conftest import tiny_raw

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_cache_info_and_verify(workspace):
    res = runner.invoke(app, ["cache", "info", "data/logits/top3.zarr"])
    assert res.exit_code == 0, res.output
    assert (
        "compression ratio" in res.output and "topk" in res.output and "bytes per row" in res.output
    )
    res = runner.invoke(app, ["cache", "verify", "data/logits/top3.zarr"])
    assert res.exit_code == 0 and "chunks verified" in res.output
    chunk = workspace / "data/logits/top3.zarr/train/values/c/0/0"
    b = bytearray(chunk.read_bytes())
    b[-6] ^= 0xFF
    chunk.write_bytes(bytes(b))
    res = runner.invoke(app, ["cache", "verify", "data/logits/top3.zarr"])
    assert res.exit_code == 1 and "corrupt" in res.output


def test_cache_info_on_a_missing_store_is_a_clear_error(tmp_path):
    res = runner.invoke(app, ["cache", "info", str(tmp_path / "nope.zarr")])
    assert res.exit_code == 1 and "not found" in res.output


def test_results_filters_by_method_and_alpha(tmp_path):
    rows = [
        {"method": m, "alpha": a, "tau": 4.0, "subset_seed": 0, "test_acc": acc}
        for m, a, acc in [("ce", 0.02, 0.5), ("kd", 0.02, 0.7), ("kd", 1.0, 0.9)]
    ]
    path = tmp_path / "runs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    res = runner.invoke(app, ["results", "--path", str(path), "--method", "kd", "--alpha", "0.02"])
    assert res.exit_code == 0, res.output
    assert "0.7000" in res.output and "0.5000" not in res.output and "0.9000" not in res.output
    assert "1 runs" in res.output


def test_results_filters_by_student_and_teacher_keeping_label_rows(tmp_path):
    rows = [
        {"student": s, "teacher_id": t, "method": m, "alpha": 1.0, "test_acc": acc}
        for s, t, m, acc in [
            ("small", None, "ce", 0.11),
            ("small", "t12", "kd", 0.22),
            ("small", "t30", "kd", 0.33),
            ("same", "t12", "kd", 0.44),
        ]
    ]
    path = tmp_path / "runs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    args = ["results", "--path", str(path), "--student", "small", "--teacher", "t12"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "0.1100" in res.output and "0.2200" in res.output  # CE reads no teacher: kept
    assert "0.3300" not in res.output and "0.4400" not in res.output
    assert "2 runs" in res.output


def test_student_trains_every_method_reading_a_store_in_one_process(workspace):
    raw = tiny_raw()
    raw["sweep"]["methods"] = ["ce", "kd", "ls_matched"]  # kd and ls_matched both read `full`
    (workspace / "params.yaml").write_text(yaml.safe_dump(raw))
    res = runner.invoke(app, ["student", "full", "--out-dir", "out"])
    assert res.exit_code == 0, res.output
    rows = json.loads((workspace / "out/runs.json").read_text())
    # at every α of the main sweep and both subset seeds; kd: τ ∈ {1, 4}
    assert sorted(r["method"] for r in rows) == ["kd"] * 8 + ["ls_matched"] * 4
    assert {(r["alpha"], r["subset_seed"]) for r in rows} == {
        (a, s) for a in (0.05, 1.0) for s in (0, 1)
    }
    assert {r["cache_name"] for r in rows} == {"full"}
    assert {r["tau"] for r in rows if r["method"] == "kd"} == {1.0, 4.0}


def test_student_of_labels_and_of_an_ablation_store(workspace):
    (workspace / "params.yaml").write_text(yaml.safe_dump(tiny_raw()))
    res = runner.invoke(app, ["student", "labels", "--out-dir", "labels"])
    assert res.exit_code == 0, res.output
    rows = json.loads((workspace / "labels/runs.json").read_text())
    assert [r["method"] for r in rows] == ["ce"] * 4 and {r["cache_name"] for r in rows} == {None}
    res = runner.invoke(app, ["student", "top3", "--out-dir", "top3"])
    assert res.exit_code == 0, res.output
    rows = json.loads((workspace / "top3/runs.json").read_text())
    # an ablation method trains at sweep.ablation_alphas only
    assert [(r["method"], r["alpha"], r["k"]) for r in rows] == [("kd_top3", 0.05, 3)] * 2


def test_student_of_an_unknown_store_is_a_clear_error(workspace):
    (workspace / "params.yaml").write_text(yaml.safe_dump(tiny_raw()))
    res = runner.invoke(app, ["student", "top9", "--out-dir", "out"])
    assert res.exit_code == 1
    assert (
        "store 'top9' is not one of cache.stores (full, random_head, sampled4, top3)" in res.output
    )
    assert not (workspace / "out").exists()


def test_deps_lists_the_report_stage_sources():
    res = runner.invoke(app, ["deps", str(ROOT / "stages/report.py")])
    assert res.exit_code == 0, res.output
    files = set(res.output.splitlines())
    assert {
        "stages/report.py",
        "src/kdsweep/report/__init__.py",
        "src/kdsweep/report/figures.py",
        "src/kdsweep/report/text.py",
        "src/kdsweep/analysis.py",
        "src/kdsweep/cache/summary.py",
    } <= files
    # the report reads summaries, never a store, and trains nothing: no torch-side modules
    assert "src/kdsweep/teacher.py" not in files
    assert "src/kdsweep/cache/reader.py" not in files


def test_registry_lists_every_registered_name() -> None:
    from kdsweep.registry import ARCHS, CACHE_KINDS, DATASETS, LOSSES

    res = runner.invoke(app, ["registry"])
    assert res.exit_code == 0, res.output
    for reg in (DATASETS, ARCHS, LOSSES, CACHE_KINDS):
        assert all(name in res.output for name in reg), reg.kind
