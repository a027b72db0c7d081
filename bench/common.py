"""What the benchmarks share: a temporary copy of the repository to run `dvc repro` in."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def temp_repo(
    params_text: str,
    source: Path = REPO,
    prefix: str = "kdsweep-bench-",
    tracks: dict[str, str] | None = None,
) -> Path:
    """A fresh git repository holding `source`'s pipeline (dvc.yaml, stages, src, DVC config)
    and `params_text` as params.yaml and as its default track (conf/track/default.yaml, what
    `dvc exp run -S` composes from), plus the other `tracks` by name, so a benchmark never
    touches the workspace."""
    work = Path(tempfile.mkdtemp(prefix=prefix)) / "repo"
    work.mkdir()
    for item in ("dvc.yaml", "stages", "src", ".dvcignore", ".gitignore"):
        src = source / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work / item)
    shutil.copytree(source / ".dvc", work / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    (work / "params.yaml").write_text(params_text)
    if (source / "conf/config.yaml").exists():  # revisions before tracks have none
        (work / "conf/track").mkdir(parents=True)
        shutil.copy(source / "conf/config.yaml", work / "conf/config.yaml")
        for name, text in {"default": params_text, **(tracks or {})}.items():
            (work / "conf/track" / f"{name}.yaml").write_text(f"# @package _global_\n{text}")
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    return work


def dvc_env(src: Path | None = None) -> dict[str, str]:
    """The environment for `dvc repro`: this interpreter's tools first; with `src`, that copy
    of the library shadows the installed one (another revision, or a snapshot of this one that
    later edits of the workspace cannot reach)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    if src is not None:
        env["PYTHONPATH"] = str(src)
    return env


def git_commit(work: Path, message: str) -> None:
    """Commit everything in `work` (a `temp_repo`), as `dvc exp run` needs a baseline commit and
    queued experiments see only committed files."""
    for key, value in (("user.email", "bench@example.com"), ("user.name", "bench")):
        subprocess.run(["git", "config", key, value], cwd=work, check=True)
    subprocess.run(["git", "add", "-A"], cwd=work, check=True)
    subprocess.run(["git", "commit", "-qm", message], cwd=work, check=True)
