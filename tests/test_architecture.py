"""docs/ARCHITECTURE.md matches the tree, and the tree keeps the shape it describes."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gradlab"
PAGE = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
LIMIT = 600  # lines: a module over this holds more than one job


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def named_on_the_page() -> set[str]:
    """Every module the page names: by its path (`gradlab/pkg/a.py`), or by its file name
    alone (`b.py`) after a path in the same package (`gradlab/pkg/` or `gradlab/pkg/a.py`)."""
    named, package = set(), "gradlab"
    for full, bare in re.findall(r"`(gradlab/[\w/]*(?:\.py)?)`|`(\w+\.py)`", PAGE):
        if full:
            package = full.rstrip("/") if not full.endswith(".py") else full.rsplit("/", 1)[0]
            if full.endswith(".py"):
                named.add(full)
        else:
            named.add(f"{package}/{bare}")
    return named


def test_the_page_names_every_module_and_only_modules_that_exist():
    named = named_on_the_page()
    files = {str(p.relative_to(ROOT)) for p in modules()}
    # a package's face (an __init__.py that only hands names on) need not be named
    faces = {f for f in files if f.endswith("__init__.py")}
    assert files - faces - named == set(), "modules docs/ARCHITECTURE.md does not describe"
    assert named - files == set(), "paths docs/ARCHITECTURE.md names that do not exist"


def test_no_module_over_the_limit():
    long = {str(p.relative_to(ROOT)): n for p in modules()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > LIMIT}
    assert long == {}


def imports(path: Path) -> set[str]:
    """The gradlab modules a file imports, at run time or for type checking alike."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("gradlab"):
                found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("gradlab")}
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_modules_import_each_other():
    """No circle of imports, counting those made only for type checking (farm-studio's rule)."""
    packages = {module_name(p) for p in modules() if p.name == "__init__.py"}
    files = {module_name(p): p for p in modules() if p.name != "__init__.py"}
    edges = {m: {i for i in imports(p) if i in files and i != m} for m, p in files.items()}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            if m == goal:
                return True
            if m not in seen:
                seen.add(m)
                todo += edges[m]
        return False

    assert packages  # the tree was read
    circles = sorted({tuple(sorted((m, n))) for m in files for n in edges[m] if reaches(n, m)})
    assert circles == []


def test_the_layers_import_only_downwards():
    # a layer may import the layers below it and the shared modules, never one above
    above = {"config": {"lab", "train", "readers", "auditing", "cli", "api"},
             "train": {"lab", "readers", "auditing", "cli", "api"},
             "record": {"lab", "train", "readers", "auditing", "cli", "api"},
             "readers": {"lab", "train", "auditing", "cli", "api"},
             "lab": {"readers", "auditing", "cli", "api"}}
    wrong = []
    for p in modules():
        layer = p.relative_to(PACKAGE).parts[0]
        for target in imports(p):
            parts = target.split(".")
            if layer in above and len(parts) > 1 and parts[1] in above[layer]:
                wrong.append(f"{p.relative_to(ROOT)} imports {target}")
    assert wrong == []
