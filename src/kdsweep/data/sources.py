"""Datasets generated or shipped locally: the offline defaults (registered in DATASETS)."""

from __future__ import annotations

import numpy as np
import torch

from kdsweep.config import DataParams
from kdsweep.data.splits import Splits


def mnist1d(p: DataParams) -> Splits:
    """MNIST-1D generated locally (never its download path): ~14 s for 100k samples on 2 cores."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    total = p.n_train + p.n_test
    args.num_samples = total
    args.train_split = p.n_train / total
    args.seed = p.seed
    d = make_dataset(args)
    as_x = lambda a: torch.from_numpy(np.asarray(a, np.float32)).unsqueeze(1)  # noqa: E731
    as_y = lambda a: torch.from_numpy(np.asarray(a, np.int64))  # noqa: E731
    return Splits(as_x(d["x"]), as_y(d["y"]), as_x(d["x_test"]), as_y(d["y_test"]), 10, p.name)


def digits(p: DataParams) -> Splits:
    """scikit-learn's bundled 8x8 digits (1797 images): a second offline vision dataset."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.from_numpy(np.random.default_rng(p.seed).permutation(len(y)))
    n_test = min(p.n_test, len(y) // 4)
    n_train = min(p.n_train, len(y) - n_test)
    tr, te = perm[n_test : n_test + n_train], perm[:n_test]
    return Splits(x[tr], y[tr], x[te], y[te], 10, p.name)
