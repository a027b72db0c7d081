"""The `prepare` stage's output: the splits fixed once and nested class-balanced α-subsets.

`<prepared>/` (a directory named on the command line by dvc.yaml) holds:
  dataset.safetensors  x_train, y_train, x_test, y_test (the splits, fixed once)
  subsets.safetensors  order_<seed>: a class-interleaved permutation of the training indices per
                       subset seed; the α-subset is its first `subset_size(α, N)` entries, so
                       α=0.02 ⊂ α=0.05 ⊂ … ⊂ α=1 for one seed (nesting by construction).
  tokenizer.json       language track only: the tokenizer that made the tokens.
  meta.json            name, shapes, num_classes, fingerprint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from kdsweep.data.splits import DataError, Splits
from kdsweep.io import atomic_path, atomic_write_json, atomic_write_text


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


def carve_validation(
    subset: torch.Tensor, groups: torch.Tensor | None, fraction: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) rows of a subset; selection (τ, checkpoints) reads only the validation
    rows, never the test split.

    Exactly round(fraction·m) rows validate, so every subset seed of one α keeps the same number
    of training rows (students of one α stack), and every student of one (α, seed) gets the same
    split, whatever its method.
    - Classes (`groups`: each row's class): the rows of lowest score frac((k + g + 1)·φ), k the
      row's rank within its class g and φ the golden ratio — a low-discrepancy sequence per
      class, so each class validates in proportion and the choice barely moves as α grows. A
      rule on positions alone (every k-th row) would alias with the interleaved order's class
      cycle.
    - Token sequences (`groups` None): the subset's last rows, one contiguous block of the token
      stream: windows next to training windows would share their documents and flatter the
      validation perplexity.
    """
    n_val = round(fraction * len(subset))
    if not 0 < n_val < len(subset):
        raise DataError(
            f"a subset of {len(subset)} rows cannot be split into training and validation rows at "
            f"student.val_fraction={fraction}: raise alpha or data.n_train"
        )
    val = torch.zeros(len(subset), dtype=torch.bool)
    if groups is None:
        val[-n_val:] = True
        return subset[~val], subset[val]
    golden = (1 + 5**0.5) / 2
    k = torch.empty(len(subset), dtype=torch.float64)
    for g in groups.unique():
        rows = groups == g
        k[rows] = torch.arange(int(rows.sum()), dtype=torch.float64) + float(g)
    val[torch.argsort(torch.frac((k + 1) * golden), stable=True)[:n_val]] = True
    return subset[~val], subset[val]


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
        atomic_write_text(out / "tokenizer.json", splits.tokenizer_json)
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

    def split(
        self, alpha: float, seed: int, val_fraction: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The α-subset's (train, validation) row ids (`carve_validation`): stratified by class
        for a classifier, a contiguous block of the stream for a language model."""
        idx = self.subset(alpha, seed)
        y = self.splits.y_train
        return carve_validation(idx, y[idx] if y.dim() == 1 else None, val_fraction)


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
