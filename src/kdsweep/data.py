"""Datasets, nested class-balanced α-subsets and the dataset fingerprint.

The `prepare` stage writes `data/prepared/`:
  dataset.safetensors  x_train, y_train, x_test, y_test (the splits, fixed once)
  subsets.safetensors  order_<seed>: a class-interleaved permutation of the training indices per
                       subset seed; the α-subset is its first `subset_size(α, N)` entries, so
                       α=0.02 ⊂ α=0.05 ⊂ … ⊂ α=1 for one seed (nesting by construction).
  meta.json            name, shapes, num_classes, fingerprint, subset sizes per α.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from kdsweep.config import DataParams
from kdsweep.errors import KdsweepError
from kdsweep.io import atomic_path, atomic_write_json


class DataError(KdsweepError):
    """A dataset that is missing, corrupt or too small for what was asked."""


@dataclass(frozen=True)
class Splits:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    name: str
    tokenizer_json: str | None = None  # language track: the tokenizer that made the tokens

    @property
    def fingerprint(self) -> str:
        """sha256 over the split contents: a cache built on other data is refused."""
        h = hashlib.sha256(self.name.encode())
        for t in (self.x_train, self.y_train, self.x_test, self.y_test):
            h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()


def _mnist1d(p: DataParams) -> Splits:
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


def _digits(p: DataParams) -> Splits:
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


def _text(p: DataParams) -> Splits:
    """Documents split before tokenisation; the BPE tokenizer is trained on the training documents
    only; x/y are next-token windows of `seq_len`, num_classes is the vocabulary size."""
    from kdsweep import lm

    train_docs, test_docs = lm.split_documents(
        lm.load_documents(p.name, p.path, p.hf_name), p.test_fraction, p.seed
    )
    tok = lm.train_tokenizer(train_docs, p.vocab_size)
    x, y = lm.encode_sequences(tok, train_docs, p.seq_len)
    xt, yt = lm.encode_sequences(tok, test_docs, p.seq_len)
    n, m = min(p.n_train, len(x)), min(p.n_test, len(xt))
    return Splits(
        x[:n], y[:n], xt[:m], yt[:m], tok.get_vocab_size(), p.name, lm.tokenizer_to_json(tok)
    )


def build_splits(p: DataParams) -> Splits:
    if p.name == "mnist1d":
        return _mnist1d(p)
    if p.name == "digits":
        return _digits(p)
    if p.task == "lm":
        return _text(p)
    from kdsweep.vision import torchvision_splits

    return torchvision_splits(p)


def subset_size(alpha: float, n: int) -> int:
    return max(1, int(round(alpha * n)))


def nested_order(y: torch.Tensor, seed: int) -> torch.Tensor:
    """A permutation whose every prefix is class-balanced (stratified).

    Each class's samples are shuffled, then the i-th of n_c samples gets the key (i + u_c) / n_c
    with one random offset u_c per class; sorting by key interleaves the classes so that any prefix
    of length m holds each class in proportion n_c / N, up to one sample.
    """
    rng = np.random.default_rng(seed)
    y_np = y.numpy()
    keys = np.empty(len(y_np))
    for c in np.unique(y_np):
        idx = np.flatnonzero(y_np == c)
        idx = idx[rng.permutation(len(idx))]
        keys[idx] = (np.arange(len(idx)) + rng.uniform()) / len(idx)
    return torch.from_numpy(np.argsort(keys, kind="stable"))


def subset_indices(order: torch.Tensor, alpha: float, min_rows: int) -> torch.Tensor:
    m = subset_size(alpha, len(order))
    if m < min_rows:
        raise DataError(
            f"alpha={alpha} of {len(order)} training samples is {m} samples, fewer than the "
            f"{min_rows} classes: raise alpha or data.n_train"
        )
    return order[:m]


def write_prepared(out: Path, splits: Splits, seeds: list[int]) -> None:
    """Write the splits and subset orders. α plays no part here, so adding an α re-runs no teacher."""
    out.mkdir(parents=True, exist_ok=True)
    n = len(splits.y_train)
    tensors = {
        "x_train": splits.x_train.contiguous(),
        "y_train": splits.y_train.contiguous(),
        "x_test": splits.x_test.contiguous(),
        "y_test": splits.y_test.contiguous(),
    }
    if splits.tokenizer_json is None:
        orders = {f"order_{s}": nested_order(splits.y_train, s) for s in seeds}
    else:  # token-stream prefixes: α-subsets are contiguous documents, the same for every seed
        orders = {f"order_{s}": torch.arange(n) for s in seeds}
        (out / "tokenizer.json").write_text(splits.tokenizer_json)
    with atomic_path(out / "dataset.safetensors") as tmp:
        save_file(tensors, tmp)
    with atomic_path(out / "subsets.safetensors") as tmp:
        save_file(orders, tmp)
    meta = {
        "name": splits.name,
        "num_classes": splits.num_classes,
        "input_shape": list(splits.x_train.shape[1:]),
        "n_train": n,
        "n_test": len(splits.y_test),
        "fingerprint": splits.fingerprint,
    }
    atomic_write_json(out / "meta.json", meta)


@dataclass(frozen=True)
class Prepared:
    splits: Splits
    orders: dict[int, torch.Tensor]
    fingerprint: str

    def subset(self, alpha: float, seed: int) -> torch.Tensor:
        if seed not in self.orders:
            raise DataError(
                f"subset seed {seed} was not prepared (have {sorted(self.orders)}): "
                "re-run the prepare stage"
            )
        # a classifier's subset must hold every class; a language model's needs one sequence
        min_rows = 1 if self.splits.tokenizer_json else self.splits.num_classes
        return subset_indices(self.orders[seed], alpha, min_rows)


def load_prepared(path: Path) -> Prepared:
    """Load what `prepare` wrote; a missing or truncated file gets a DataError saying what to do."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        t = load_file(path / "dataset.safetensors")
        o = load_file(path / "subsets.safetensors")
    except FileNotFoundError as err:
        raise DataError(
            f"prepared dataset incomplete ({err.filename} missing): run `dvc repro prepare`"
        ) from None
    except Exception as err:  # safetensors raises its own error type on truncation
        raise DataError(
            f"prepared dataset in {path} is corrupt ({err}): run `dvc repro -f prepare`"
        ) from None
    tok = path / "tokenizer.json"
    splits = Splits(
        t["x_train"],
        t["y_train"],
        t["x_test"],
        t["y_test"],
        meta["num_classes"],
        meta["name"],
        tok.read_text() if tok.exists() else None,
    )
    if splits.fingerprint != meta["fingerprint"]:
        raise DataError(
            f"prepared dataset in {path} does not match its meta.json: run `dvc repro -f prepare`"
        )
    orders = {int(k.removeprefix("order_")): v for k, v in o.items()}
    return Prepared(splits, orders, meta["fingerprint"])
