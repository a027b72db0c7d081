"""The project modules a stage script runs: its import closure, computed from the source.

dvc.yaml must list, for each stage, exactly these files (tests/test_deps.py checks it, and
`kdsweep deps <script>` prints them), so that `dvc repro` re-runs a stage whenever code it runs
changes and only then. Edges of the closure:
- every `import kdsweep…` / `from kdsweep… import …` anywhere in a module (function-level too),
  including `from kdsweep.pkg import name` where `name` is a submodule;
- a package's `__init__.py` for every module inside it (Python runs it on import);
- registry loads: a module that calls `<REGISTRY>.load(` depends on the `impl` module of every
  entry of that registry (kdsweep.registry), since which one runs is decided by params;
- package data: a module that loads templates through Jinja2's `PackageLoader` depends on every
  file under its package's `templates/` folder.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from kdsweep import registry

SRC = Path(__file__).resolve().parent  # src/kdsweep
ROOT = SRC.parents[1]  # the repository


def module_path(name: str) -> Path:
    rel = Path(*name.split("."))
    pkg = SRC.parent / rel / "__init__.py"
    return pkg if pkg.exists() else SRC.parent / rel.with_suffix(".py")


def _is_module(name: str) -> bool:
    return module_path(name).exists()


def _imports(path: Path, registry_loads: bool = True) -> set[str]:
    """Project modules `path` imports directly, or (`registry_loads`) loads through a registry."""
    source = path.read_text()
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "kdsweep"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "kdsweep":
                continue
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    for reg in set(re.findall(r"\b([A-Z_]+)\.load\(", source)) if registry_loads else ():
        table = getattr(registry, reg, None)
        if isinstance(table, registry.Registry):
            found |= {e.module for e in table.entries()}
    modules = {m for m in found if _is_module(m)}
    # importing a.b.c runs a/__init__.py and a/b/__init__.py first
    for m in list(modules):
        parts = m.split(".")
        modules |= {".".join(parts[:i]) for i in range(1, len(parts))}
    return modules


def _templates(path: Path) -> set[Path]:
    if "PackageLoader(" not in path.read_text():
        return set()
    return {p for p in (path.parent / "templates").rglob("*") if p.is_file()}


def closure(script: Path, registry_loads: bool = True) -> set[Path]:
    """The project files `script` runs or reads as code (itself included), relative to the
    repository. Without `registry_loads`, only what it imports: the caller adds the impl modules
    of the registry entries one run actually uses (a student's own code version)."""
    seen: set[Path] = {Path(script).resolve()}
    todo = [Path(script).resolve()]
    while todo:
        path = todo.pop()
        seen |= _templates(path)
        for m in _imports(path, registry_loads):
            p = module_path(m)
            if p not in seen:
                seen.add(p)
                todo.append(p)
    return {p.relative_to(ROOT) if p.is_relative_to(ROOT) else p for p in seen}


def sync_dvc_yaml(dvc_yaml: Path = ROOT / "dvc.yaml") -> bool:
    """Rewrite each stage's code deps in `dvc_yaml` to its script's closure (the script first,
    then the rest sorted), leaving every other line as it is; True if the file changed. Run it
    (`kdsweep deps --write`) after changing imports."""
    lines = Path(dvc_yaml).read_text().split("\n")
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^(\s*)- (stages/\S+\.py)$", lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        indent, script = m.groups()
        i += 1
        while i < len(lines) and re.match(r"^\s*- (src|stages)/", lines[i]):
            i += 1
        files = sorted(str(f) for f in closure(ROOT / script) if str(f) != script)
        out += [f"{indent}- {f}" for f in [script, *files]]
    new = "\n".join(out)
    changed = new != Path(dvc_yaml).read_text()
    if changed:
        Path(dvc_yaml).write_text(new)
    return changed


def import_graph() -> dict[str, set[str]]:
    """Every kdsweep module and the project modules it imports (with registry loads)."""
    graph = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        graph[name] = {m for m in _imports(path) if m != name and not name.startswith(m + ".")}
    return graph


def cycles() -> list[list[str]]:
    """Import cycles among the kdsweep modules (registry loads included); [] when there are none."""
    graph, found = import_graph(), []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found
