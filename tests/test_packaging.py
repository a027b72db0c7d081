"""Declared dependencies match the imports: every third-party package the library, the stages or
the benchmarks import is declared in pyproject.toml, and every declared one is used."""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# import name -> distribution name, where they differ
DIST = {"PIL": "pillow", "yaml": "pyyaml", "sklearn": "scikit-learn"}
# declared but never imported, on purpose
TOOLS = {
    "dvc": "the command the pipeline runs under",
    "numcodecs": "the codec library behind zarr's Blosc/Zstd codecs named in the store format",
    "scipy": "torchvision's SVHN reader loads its .mat files with scipy.io",
    "dask-jobqueue": "the README's recipe for starting a Dask cluster on SLURM/PBS (HPC users)",
    "hydra-core": "what `dvc exp run -S track=<name>` composes params.yaml with (conf/)",
}


def _requirement_name(req: str) -> str:
    for sep in "<>=!~[; ":
        req = req.split(sep)[0]
    return req.lower()


def third_party_imports(paths: list[Path]) -> set[str]:
    found = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    local = {"kdsweep", "common", "tests"}
    return {m for m in found if m not in sys.stdlib_module_names and m not in local}


def test_declared_dependencies_match_the_imports() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    optional = project["optional-dependencies"]
    runtime = [
        *project["dependencies"],
        *(r for g, rs in optional.items() if g != "dev" for r in rs),
    ]
    declared = {_requirement_name(r) for r in runtime}
    code = [*(REPO / "src").rglob("*.py"), *(REPO / "stages").glob("*.py")]
    code += list((REPO / "bench").glob("*.py"))
    used = {DIST.get(m, m).lower() for m in third_party_imports(code)}
    assert not used - declared, f"imported but not declared: {sorted(used - declared)}"
    unused = declared - used - set(TOOLS)
    assert not unused, f"declared but never imported: {sorted(unused)}"
