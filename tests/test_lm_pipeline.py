"""The language track through the stages' functions on conf/track/lm.yaml, shrunk: pydoc corpus,
BPE tokenizer, GPT teacher, full, top-k and sampled token caches, one student stage per store
(students selected on validation), aggregate and report."""

import json
from pathlib import Path

import yaml

from kdsweep.cache.reader import LogitCache
from kdsweep.config import STUDENTS_OF_LABELS, parse_params
from kdsweep.data.prepared import load_prepared, subset_size
from kdsweep.report import write_report
from kdsweep.runs import collect_runs, write_parquet
from tests.conftest import build_upstream, set_teachers, student_stage

REPO = Path(__file__).resolve().parents[1]


def test_tiny_language_pipeline_end_to_end(tmp_path):
    raw = yaml.safe_load((REPO / "conf/track/lm.yaml").read_text())
    # the pydoc topics tokenise in a second; the stdlib corpus of conf/track/lm.yaml in ~20 s
    raw["data"].update(name="pydoc", n_train=48, n_test=12, vocab_size=260, seq_len=8)
    set_teachers(raw, width=16, epochs=1, batch_size=16)
    raw["cache"].update(chunk_rows=16, batch_size=16)
    budget = {"mode": "steps", "value": 3, "select": "best_val", "eval_every": 2}
    raw["student"].update(width=8, budget=budget, batch_size=8)
    raw["subset_seeds"] = [0, 1]
    raw["alphas"] = [0.5, 1.0]
    raw["sweep"] = {
        "methods": ["ce", "kd"],
        "ablation_alphas": [0.5],
        "ablation_methods": ["kd_top16", "kd_sampled16"],
    }
    p = parse_params(raw)
    assert p.data.task == "lm"
    build_upstream(p, tmp_path)
    data = tmp_path / "data"
    assert (data / "prepared/tokenizer.json").exists()
    top = LogitCache(data / "logits" / "top16.zarr")
    seq, vocab = p.data.seq_len, load_prepared(data / "prepared").splits.num_classes
    assert top.attrs["row_shape"] == {"train": [seq], "test": [seq]}  # rows are token positions
    assert top.read("train").tensors["values"].shape == (p.data.n_train, seq, 16)
    full = LogitCache(data / "logits" / "full.zarr").read("train").tensors["logits"]
    assert full.shape == (p.data.n_train, seq, vocab)
    expected = 0
    for store in [*p.cache.stores, None]:
        rows = student_stage(p, tmp_path, store)
        assert rows.exists()
        for m in p.methods_reading(store):
            n = len(p.alphas_of(m)) * len(p.subset_seeds) * len(p.student.train_seeds)
            expected += n * len(p.methods[m].taus)
    table = collect_runs(data / "students", [*p.cache.stores, STUDENTS_OF_LABELS])
    rows = table.to_pylist()
    assert expected > 0 and len(rows) == expected and {r["task"] for r in rows} == {"lm"}
    assert {r["method"] for r in rows} == {*p.sweep.methods, *p.sweep.ablation_methods}
    assert all(r["test_ppl"] > 1 and 0 <= r["agreement"] <= 1 for r in rows)
    # α = fraction of training sequences, of which some validate
    n_train = len(load_prepared(data / "prepared").splits.y_train)
    assert {r["n_train"] + r["n_val"] for r in rows} == {
        subset_size(a, n_train) for r in rows for a in p.alphas_of(r["method"])
    }
    assert all(r["n_val"] > 0 and r["val_ppl"] > 1 for r in rows)
    assert {r["best_step"] for r in rows} <= {2, 3}  # evaluated after step 2 and the last
    write_parquet(table, tmp_path / "runs.parquet")
    write_report(
        tmp_path / "runs.parquet",
        p.analysis,
        tmp_path / "reports",
        data / "summaries",
        list(p.cache.stores),
    )
    report = (tmp_path / "reports/report.md").read_text()
    assert "perplexity" in report and "task lm" in report
    assert "the seeds vary only the students' initialisation and data order" in report
    teacher_ppl = json.loads((data / "teachers/main.json").read_text())["test_ppl"]
    assert f"the teacher's test perplexity is {teacher_ppl:.4g}" in report
