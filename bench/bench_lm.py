"""Language track: cache bytes per token (top-k vs full float16) and student perplexity vs k.

Runs params/lm.yaml through `dvc repro` in a temporary copy of the repository with stores top-k for
k ∈ {8, 32, 128}, sampled-k for k ∈ {8, 32} and full float16 logits, all from one GPT teacher on
the pydoc corpus, then trains one KD student per store next to a CE student (α = 1, one seed).
Prints ratios: bytes per token relative to full float16, perplexity relative to the CE student.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import typer
import yaml
from common import dvc_env, temp_repo

from kdsweep.config import parse_params

REPO = Path(__file__).resolve().parents[1]
TOPK, SAMPLED = (8, 32, 128), (8, 32)


def main(n_train: int = 800, steps: int = 300, teacher_epochs: int = 4) -> None:
    raw = yaml.safe_load((REPO / "params/lm.yaml").read_text())
    raw["data"].update(n_train=n_train, n_test=200)
    raw["teacher"]["epochs"] = teacher_epochs
    raw["student"]["budget"] = {"mode": "steps", "value": steps}
    raw["subset_seeds"], raw["alphas"] = [0], [1.0]
    stores = {"full": {"teacher": "main", "kind": "full", "dtype": "float16"}}
    stores |= {f"top{k}": {"teacher": "main", "kind": "topk", "k": k} for k in TOPK}
    stores |= {f"sampled{k}": {"teacher": "main", "kind": "sampled", "k": k} for k in SAMPLED}
    raw["cache"].update(stores=stores, reference="full")
    raw["methods"] = {"ce": {}} | {
        f"kd_{name}": {"loss": "kd", "tau": 1, "cache": name} for name in stores
    }
    raw["sweep"] = {"methods": list(raw["methods"])}
    raw["analysis"] = {"baseline": "ce", "reference": "kd_full"}
    p = parse_params(raw)  # fail here, not after the pipeline, on invalid params
    work = temp_repo(yaml.safe_dump(raw), prefix="kdsweep-lm-")
    subprocess.run(["dvc", "repro", "-q"], cwd=work, env=dvc_env(), check=True)
    per_token = {
        name: json.loads((work / "data/summaries" / f"{name}.json").read_text())["bytes_per_row"]
        / p.data.seq_len
        for name in stores
    }
    rows = pq.read_table(work / "data/results/runs.parquet").to_pylist()
    ppl = {r["method"]: r["test_ppl"] for r in rows}
    print(
        f"GPT teacher on pydoc: {n_train} training sequences of {p.data.seq_len} tokens, vocabulary {p.data.vocab_size}"
    )
    print(f"{'store':10} {'bytes/token':>11} {'vs full fp16':>12} {'student ppl / CE ppl':>21}")
    for name in stores:
        print(
            f"{name:10} {per_token[name]:11.1f} {per_token[name] / per_token['full']:11.3f}x "
            f"{ppl[f'kd_{name}'] / ppl['ce']:20.3f}x"
        )
    print(f"(CE student perplexity {ppl['ce']:.1f}; ratios < 1 mean the KD student is better)")


if __name__ == "__main__":
    typer.run(main)
