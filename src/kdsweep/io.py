"""Atomic file writes and code-free checkpoint I/O (safetensors + JSON, never pickle)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdsweep.errors import KdsweepError

if TYPE_CHECKING:  # torch is imported where checkpoints are touched, so atomic writes stay light
    import torch


TMP_INFIX = ".tmp"  # atomic_path writes `final` through its sibling `.<final name>.tmp<pid>`
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.tmp(?P<pid>[0-9]+)", re.DOTALL)


def temp_path(final: Path, pid: int | None = None) -> Path:
    """The temporary sibling through which process `pid` (default: this one) writes `final`."""
    final = Path(final)
    return final.with_name(f".{final.name}{TMP_INFIX}{os.getpid() if pid is None else pid}")


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists on this host (a zombie counts as alive until reaped)."""
    if pid <= 0:  # 0 and negative numbers address process groups, not a writer
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, but belongs to another user
        return True
    except OverflowError:
        return False
    return True


def remove_stale_temps(directory: Path, name: str | None = None) -> list[Path]:
    """Remove what killed writers left in `directory`: the `.<name>.tmp<pid>` files (or
    directories) of `atomic_path` whose process `pid` is no longer alive on this host, for the
    file `name` only, or for every name. This process's own temporaries and those of live
    processes are kept. Returns the paths removed.

    Pids are per host: two hosts writing the same file on a shared file system is unsupported.
    """
    removed: list[Path] = []
    try:
        entries = list(Path(directory).iterdir())
    except FileNotFoundError:
        return removed
    for entry in entries:
        m = _TEMP_NAME.fullmatch(entry.name)
        if m is None or (name is not None and m["name"] != name):
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or pid_alive(pid):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `final` only if the block succeeds.

    A killed writer leaves at most its `.<name>.tmp<pid>` behind, never a half-written `final`;
    the next write of `final` removes such leftovers of dead processes (`remove_stale_temps`).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final.parent, final.name)
    tmp = temp_path(final)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def atomic_savefig(fig: Any, path: Path, **kwargs: Any) -> None:
    """`fig.savefig` through a temporary sibling: a full disk or a kill mid-save leaves the old
    figure, never a truncated one. The format comes from `path`'s suffix (the temporary has none)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **kwargs)


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


def checkpoint_meta(path: Path) -> dict[str, str]:
    """The metadata a safetensors checkpoint was saved with (its header only: no weights read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a valid safetensors checkpoint ({err})") from None


def tensors_fingerprint(tensors: dict[str, Any]) -> str:
    """sha256 over named tensors (names, dtypes, shapes, bytes), independent of dict order."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def weights_fingerprint(path: Path) -> str:
    """sha256 over the tensors of a safetensors checkpoint (`tensors_fingerprint`).

    Not over the file: safetensors writes its metadata in no fixed order, so identical weights can
    give different file bytes.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).exists():
        raise CheckpointError(f"checkpoint {path} not found: run `dvc repro teacher` or `dvc pull`")
    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a valid safetensors checkpoint ({err})") from None
    return tensors_fingerprint(state)
