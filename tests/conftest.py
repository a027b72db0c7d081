"""Shared fixtures: a tiny, fully offline MNIST-1D setup that each test can build on."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from kdsweep.config import Params, parse_params

TINY: dict = {
    "data": {"name": "mnist1d", "n_train": 600, "n_test": 200, "seed": 0},
    "alphas": [0.05, 1.0],
    "subset_seeds": [0, 1],
    "teacher": {"arch": "cnn1d", "width": 16, "epochs": 2, "batch_size": 64, "lr": 0.01},
    "cache": {
        "codec": {"name": "blosc", "cname": "zstd", "clevel": 5, "shuffle": "shuffle"},
        "chunk_rows": 128,
        "batch_size": 50,
        "stores": {
            "full": {"teacher": "main", "kind": "full", "dtype": "float32"},
            "random_head": {"teacher": "random_head", "kind": "full"},
            "top3": {"kind": "topk", "k": 3},
            "sampled4": {"kind": "sampled", "k": 4},
        },
    },
    "student": {
        "arch": "cnn1d",
        "width": 8,
        "budget": {"mode": "steps", "value": 20},
        "batch_size": 32,
    },
    "methods": {
        "ce": {},
        "ls": {"epsilon": 0.1},
        "kd": {"lambda": 1.0, "tau": [1, 4]},
        "logit_mse": {},
        "ls_matched": {"tau": 4},
        "shuffled_dk": {"tau": 4},
        "ls_teacher": {"tau": 4},
        "top1_teacher": {},
        "random_head": {"loss": "kd", "tau": 4, "cache": "random_head"},
        "kd_top3": {"loss": "kd", "tau": 4, "cache": "top3"},
        "kd_sampled4": {"loss": "kd", "tau": 1, "cache": "sampled4"},
    },
    "sweep": {"methods": ["ce", "kd"], "ablation_alphas": [0.05], "ablation_methods": ["kd_top3"]},
    "analysis": {"controls": ["ls_matched", "shuffled_dk"], "n_boot": 200},
}


def tiny_raw() -> dict:
    return copy.deepcopy(TINY)


@pytest.fixture
def tiny_params() -> Params:
    return parse_params(tiny_raw())


@pytest.fixture(scope="session")
def built_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """prepare + teacher + every cache store of TINY, built once per session in a temp dir."""
    import os

    from kdsweep import pipeline

    root = tmp_path_factory.mktemp("ws")
    old = os.getcwd()
    os.chdir(root)
    try:
        torch.manual_seed(0)
        p = parse_params(tiny_raw())
        pipeline.prepare(p)
        pipeline.train_teacher(p)
        for name in p.cache.stores:
            pipeline.build_cache(p, name)
    finally:
        os.chdir(old)
    return root


@pytest.fixture
def workspace(built_workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the built workspace, as the current directory."""
    import shutil

    dst = tmp_path / "ws"
    shutil.copytree(built_workspace, dst)
    monkeypatch.chdir(dst)
    return dst
