import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

from kdsweep.cli import app

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


def test_student_trains_several_methods_in_one_process(workspace):
    import json

    import yaml

    from tests.conftest import tiny_raw

    (workspace / "params.yaml").write_text(yaml.safe_dump(tiny_raw()))
    res = runner.invoke(app, ["student", "0.05", "ce", "kd", "--out-dir", "out"])
    assert res.exit_code == 0, res.output
    rows = json.loads((workspace / "out/runs.json").read_text())
    assert sorted(r["method"] for r in rows) == ["ce"] * 2 + ["kd"] * 4  # kd: τ ∈ {1, 4}
    res = runner.invoke(app, ["student", "0.05", "kdd", "--out-dir", "out2"])
    assert res.exit_code == 1 and "kdd" in res.output and "not in params.yaml" in res.output
    assert not (workspace / "out2").exists()
