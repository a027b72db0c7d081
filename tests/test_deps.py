"""dvc.yaml knows all the code each stage runs: its code deps are exactly the import closure of its
script (kdsweep.deps), every params key it declares exists in each params file, and the project
modules import each other without cycles. Static and fast; tests/test_dvc.py checks the same
through `dvc repro` at run time (keys read, modules imported)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from kdsweep import deps

REPO = Path(__file__).resolve().parents[1]
PARAMS_FILES = [
    "params.yaml",
    *sorted(str(p.relative_to(REPO)) for p in REPO.glob("conf/track/*.yaml")),
]


def dvc_stages() -> dict[str, dict]:
    """dvc.yaml's stage definitions (a foreach stage's `do:` body)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: s.get("do", s) for name, s in stages.items()}


def script_of(stage: dict) -> Path:
    return Path(re.match(r"PYTHONPATH=src python (stages/\S+\.py)", stage["cmd"]).group(1))


def code_gaps(stage: dict) -> tuple[set[str], set[str]]:
    """(files the script runs but the stage does not list, files listed that it does not run)."""
    listed = {d for d in stage["deps"] if d.startswith(("src/", "stages/"))}
    runs = {str(p) for p in deps.closure(REPO / script_of(stage))}
    return runs - listed, listed - runs


@pytest.mark.parametrize("name", sorted(dvc_stages()))
def test_stage_lists_exactly_the_code_it_runs(name: str) -> None:
    missing, extra = code_gaps(dvc_stages()[name])
    assert not missing, f"{name}: dvc.yaml does not list {sorted(missing)}, which its script runs"
    assert not extra, f"{name}: dvc.yaml lists {sorted(extra)}, which its script never runs"


def test_removing_a_dep_from_dvc_yaml_is_caught() -> None:
    stage = dict(dvc_stages()["teacher"])
    stage["deps"] = [d for d in stage["deps"] if d != "src/kdsweep/models/vision.py"]
    assert code_gaps(stage) == ({"src/kdsweep/models/vision.py"}, set())


def test_sync_restores_a_removed_dep_and_keeps_the_rest(tmp_path: Path) -> None:
    original = (REPO / "dvc.yaml").read_text()
    broken = tmp_path / "dvc.yaml"
    broken.write_text(original.replace("      - src/kdsweep/models/vision.py\n", "", 1))
    assert broken.read_text() != original
    assert deps.sync_dvc_yaml(broken)
    assert broken.read_text() == original
    assert not deps.sync_dvc_yaml(broken)


def test_deps_are_precise() -> None:
    """Editing the report never re-runs a teacher; editing the cache writer never re-trains it;
    students never run teacher training (online students only load its weights); the report
    never opens a Zarr store."""
    run = {n: {str(p) for p in deps.closure(REPO / script_of(s))} for n, s in dvc_stages().items()}
    assert not {p for p in run["teacher"] if "/report/" in p or "/cache/" in p}
    assert (
        "src/kdsweep/teacher.py" in run["cache"] and "src/kdsweep/cache/writer.py" in run["cache"]
    )
    assert "src/kdsweep/teacher.py" not in run["student"]
    assert not {p for p in run["student"] if p.endswith(("cache/writer.py", "cache/build.py"))}
    assert not {
        p for p in run["report"] if "/cache/" in p and not p.endswith(("summary.py", "__init__.py"))
    }
    assert not {p for p in run["prepare"] if "/models/" in p}


def test_closure_follows_function_level_imports_and_registry_loads(tmp_path: Path) -> None:
    script = tmp_path / "s.py"
    script.write_text("def main():\n    from kdsweep.losses import student_loss\n")
    found = {str(p) for p in deps.closure(script)}
    # losses calls CACHE_KINDS.load and LOSSES.load: every kind and control implementation counts
    assert {"src/kdsweep/losses.py", "src/kdsweep/cache/kinds.py"} <= found
    assert "src/kdsweep/cache/__init__.py" in found  # a package runs its __init__ first


def test_code_is_loaded_only_through_imports_or_registries() -> None:
    """The closure sees `import` statements and `REGISTRY.load(`; any other dynamic import would
    be invisible to DVC."""
    for path in (REPO / "src").rglob("*.py"):
        text = path.read_text()
        if path.name == "registry.py":
            continue
        assert "import_module" not in text and "__import__" not in text, path
        for reg in re.findall(r"\b([A-Za-z_]+)\.load\(", text):
            assert reg.isupper(), f"{path}: `{reg}.load(` is not a registry load"


def test_no_import_cycles() -> None:
    assert deps.cycles() == []
    graph = deps.import_graph()
    assert "kdsweep.teacher" in graph["kdsweep.cache.build"]  # the graph is real, not empty


def _get(raw: dict, key: str) -> dict:
    for part in key.split("."):
        raw = raw[part]
    return raw


def _has_key(raw: dict, key: str) -> bool:
    node = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


@pytest.mark.parametrize("params_file", PARAMS_FILES)
def test_every_tracked_key_is_in_each_params_file(params_file: str) -> None:
    """DVC tracks only keys present in the file (a pydantic default is not enough)."""
    raw = yaml.safe_load((REPO / params_file).read_text())
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    missing = []
    for name, stage in stages.items():
        # a foreach stage: one instance per key of the section it loops over (${key}, ${item.x})
        section = stage.get("foreach", "${}")[2:-1]
        items = _get(raw, section) if section else {None: None}
        for key in stage.get("do", stage).get("params", []):
            if isinstance(key, dict):  # a whole params file (`params.yaml:`), not a key
                continue
            key = key.replace("${cache.reference}", raw["cache"]["reference"])
            for k_, item in items.items():
                k = key.replace("${key}", str(k_))
                for field, value in (item or {}).items():
                    k = k.replace(f"${{item.{field}}}", str(value))
                if not _has_key(raw, k):
                    missing.append(f"{name}: {k}")
    assert not missing, f"{params_file} lacks keys DVC tracks: {missing}"
