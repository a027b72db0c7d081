"""Atomic file writes and code-free checkpoint I/O (safetensors + JSON, never pickle)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdsweep.errors import KdsweepError

if TYPE_CHECKING:  # torch is imported where checkpoints are touched, so atomic writes stay light
    import torch


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `final` only if the block succeeds.

    A killed writer leaves at most a `.tmp` file behind, never a half-written `final`.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def report_work(what: str, seconds: float) -> None:
    """Print one `kdsweep work:` line for a stage's real work (generating data, training, running
    the teacher into a cache), so that bench/bench_pipeline.py can tell it from the overhead."""
    print(f"kdsweep work: {what} {seconds:.3f} s", flush=True)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: Path, obj: Any) -> None:
    """Strict JSON (no NaN), so DVC and other readers accept it."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


class CheckpointError(KdsweepError):
    """A checkpoint that is missing, not safetensors, or does not fit the model."""


def save_checkpoint(model: torch.nn.Module, path: Path, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, tmp, metadata=meta)


def load_checkpoint(model: torch.nn.Module, path: Path) -> None:
    """Load weights without executing code: safetensors holds tensors only (a pickle is refused)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} not found: run `dvc repro teacher` or `dvc pull`")
    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is not a valid safetensors checkpoint ({err}); kdsweep never unpickles "
            "checkpoints: re-create it with `dvc repro -f teacher`"
        ) from None
    own = model.state_dict()
    wrong = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    )
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if wrong or missing or extra:
        raise CheckpointError(
            f"{path} does not fit the configured model (check teacher.arch/width in params.yaml): "
            f"shape mismatches {wrong[:5]}, missing {missing[:5]}, unexpected {extra[:5]}"
        )
    model.load_state_dict(state)


def weights_fingerprint(path: Path) -> str:
    """sha256 over the tensors (names, dtypes, shapes, bytes) of a safetensors checkpoint.

    Not over the file: safetensors writes its metadata in no fixed order, so identical weights can
    give different file bytes.
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    h = hashlib.sha256()
    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a valid safetensors checkpoint ({err})") from None
    for name in sorted(state):
        t = state[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
