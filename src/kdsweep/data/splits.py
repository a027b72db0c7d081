"""The train/test splits every dataset loader returns, and their fingerprint."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from kdsweep.errors import KdsweepError


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
