"""Shared fixtures: a tiny, fully offline MNIST-1D setup that each test can build on."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from kdsweep.cache.build import build_cache
from kdsweep.config import Params, parse_params
from kdsweep.data.prepare import prepare
from kdsweep.data.prepared import load_prepared
from kdsweep.students.inputs import StageInputs
from kdsweep.students.stage import run_student_stage
from kdsweep.teacher import train_teacher

# the teacher, and its random-head variant: the same network, trained alike, head re-initialised
TEACHER = dict(arch="cnn1d", width=16, epochs=2, batch_size=64, lr=0.01, seed=0, device="cpu")

TINY: dict = {
    "data": {"name": "mnist1d", "n_train": 600, "n_test": 200, "seed": 0},
    "alphas": [0.05, 1.0],
    "subset_seeds": [0, 1],
    "teachers": {"main": TEACHER, "random_head": {**TEACHER, "head": "random"}},
    "cache": {
        "codec": {"name": "blosc", "cname": "zstd", "clevel": 5, "shuffle": "shuffle"},
        "chunk_rows": 128,
        "batch_size": 50,
        "aug_seed": 0,
        "reference": "full",
        "stores": {
            "full": {"teacher": "main", "kind": "full", "dtype": "float32"},
            "random_head": {"teacher": "random_head", "kind": "full"},
            "top3": {"teacher": "main", "kind": "topk", "k": 3},
            "sampled4": {"teacher": "main", "kind": "sampled", "k": 4},
        },
    },
    "student": {
        "arch": "cnn1d",
        "width": 8,
        "budget": {"mode": "steps", "value": 20},
        "batch_size": 32,
    },
    "students": {"small": {}},
    "methods": {
        "ce": {},
        "ls": {"epsilon": 0.1},
        "kd": {"lambda": 1.0, "tau": [1, 4]},
        "logit_mse": {"lambda": 1.0},
        "ls_matched": {"tau": 4},
        "shuffled_dk": {"tau": 4},
        "ls_teacher": {"tau": 4},
        "top1_teacher": {},
        "random_head": {"loss": "kd", "tau": 4, "cache": "random_head"},
        "kd_top3": {"loss": "kd", "tau": 4, "cache": "top3"},
        "kd_sampled4": {"loss": "kd", "tau": 1, "cache": "sampled4"},
    },
    "sweep": {"methods": ["ce", "kd"], "ablation_alphas": [0.05], "ablation_methods": ["kd_top3"]},
    "analysis": {"controls": ["ls_matched", "shuffled_dk"]},
}


def tiny_raw() -> dict:
    return copy.deepcopy(TINY)


def set_teachers(raw: dict, **values: object) -> dict:
    """Set `values` on every teacher of `raw` (the trained one and its random-head variant)."""
    for t in raw["teachers"].values():
        t.update(values)
    return raw


@pytest.fixture
def tiny_params() -> Params:
    return parse_params(tiny_raw())


def build_upstream(p: Params, root: Path) -> None:
    """prepare + teacher + every cache store of `p` under `root/data`, laid out as dvc.yaml does."""
    data = root / "data"
    prepare(p.data, p.subset_seeds, data / "prepared")
    prep = load_prepared(data / "prepared")
    for name in p.teachers:
        train_teacher(p, name, prep, data / "teachers" / f"{name}.safetensors")
    for name, store in p.cache.stores.items():
        build_cache(
            p,
            name,
            prep,
            data / "teachers" / f"{store.teacher}.safetensors",
            data / "logits" / f"{name}.zarr",
            data / "summaries" / f"{name}.json",
        )


def student_stage(p: Params, root: Path, store: str | None) -> Path:
    """Run the student stage of `store` (None: `labels`) as dvc.yaml does; the runs.json path."""
    data = root / "data"
    inputs = StageInputs(
        data / "prepared",
        data / "logits" / f"{p.cache.reference}.zarr",
        store,
        data / "logits" / f"{store}.zarr" if store else None,
        data / "teachers" / f"{p.cache.stores[store].teacher}.safetensors" if store else None,
    )
    return run_student_stage(p, inputs, data / "students" / (store or "labels"))


@pytest.fixture(scope="session")
def built_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """prepare + teacher + every cache store of TINY, built once per session in a temp dir."""
    root = tmp_path_factory.mktemp("ws")
    torch.manual_seed(0)
    build_upstream(parse_params(tiny_raw()), root)
    return root


@pytest.fixture
def workspace(built_workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the built workspace, as the current directory."""
    import shutil

    dst = tmp_path / "ws"
    shutil.copytree(built_workspace, dst)
    monkeypatch.chdir(dst)
    return dst
