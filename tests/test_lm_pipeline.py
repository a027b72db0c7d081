"""The language track through the stages' functions on params/lm.yaml, shrunk: pydoc corpus,
BPE tokenizer, GPT teacher, top-k and sampled token caches, students, aggregate and report."""

from pathlib import Path

import yaml

from kdsweep import pipeline
from kdsweep.analysis import collect_runs, write_parquet
from kdsweep.cache import LogitCache
from kdsweep.config import parse_params
from kdsweep.report import write_report

REPO = Path(__file__).resolve().parents[1]


def test_tiny_language_pipeline_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load((REPO / "params/lm.yaml").read_text())
    raw["data"].update(n_train=48, n_test=12, vocab_size=260, seq_len=8)
    raw["teacher"].update(width=16, epochs=1, batch_size=16)
    raw["cache"].update(chunk_rows=16, batch_size=16)
    raw["student"].update(width=8, budget={"mode": "steps", "value": 3}, batch_size=8)
    raw["subset_seeds"] = [0, 1]
    raw["alphas"] = [0.5, 1.0]
    raw["sweep"] = {
        "methods": ["ce", "kd"],
        "ablation_alphas": [0.5],
        "ablation_methods": ["kd_renorm", "kd_sampled8", "ls"],
    }
    p = parse_params(raw)
    assert p.data.task == "lm"
    pipeline.prepare(p)
    assert (Path("data/prepared/tokenizer.json")).exists()
    pipeline.train_teacher(p)
    for name in p.cache.stores:
        pipeline.build_cache(p, name)
    top = LogitCache(Path("data/logits/top32.zarr"))
    assert top.attrs["row_shape"] == {"train": [8], "test": [8]}  # rows are token positions
    assert top.read("train").tensors["values"].shape == (48, 8, 32)
    for alpha, methods in [
        (0.5, ["ce", "kd", "kd_renorm", "kd_sampled8", "ls"]),
        (1.0, ["ce", "kd"]),
    ]:
        pipeline.run_student_stage(p, alpha, methods, Path(f"data/students/student-{alpha}"))
    table = collect_runs(Path("data/students"))
    rows = table.to_pylist()
    assert len(rows) == 14 and {r["task"] for r in rows} == {"lm"}
    assert all(r["test_ppl"] > 1 and 0 <= r["agreement"] <= 1 for r in rows)
    assert {r["n_train"] for r in rows} == {24, 48}  # α = fraction of training sequences
    write_parquet(table, Path("runs.parquet"))
    write_report(
        Path("runs.parquet"), p.model_dump(by_alias=True), Path("reports"), Path("data/logits")
    )
    report = Path("reports/report.md").read_text()
    assert "perplexity" in report and "task lm" in report
