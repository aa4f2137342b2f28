"""The house rules of the code (support/__init__.py, README.md "What is here"): no import circle anywhere in the
project's own code, imports inside functions included; support/ never imports a script of the repository's root;
inside support/ each package imports only the ones listed below it in support/__init__.py's docstring; at most 12
modules directly in support/ and none over 400 lines. Read from the source with `ast`, nothing imported: ~0.2 s."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

SUPPORT = REPO / "support"
MAX_LINES = 400  # the brief's "no file over ~400 lines"
MAX_TOP_MODULES = 12  # issue 30: "at most ~12 modules directly in support/"


def project_files() -> list[Path]:
    """The project's own Python: the root's scripts, support/, tests/ and benchmarks/."""
    folders = [REPO, SUPPORT, REPO / "tests", REPO / "benchmarks"]
    return sorted({path for folder in folders for path in (folder.rglob if folder == SUPPORT else folder.glob)("*.py")})


def imported_names(tree: ast.AST) -> list[tuple[str, int]]:
    """Every module name an `import`, a `from ... import` (each imported name too: it may be a submodule) or an
    `importlib.import_module("literal")` names, anywhere in the file (inside functions too), with its line."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.module, node.lineno))
            found += [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.args[0].value, node.lineno))
    return found


def resolve(name: str, importer: Path) -> list[Path]:
    """The project files that importing `name` from `importer` runs: the module and its packages' __init__.py (a
    name that is no project module, such as torch or a class imported from a module, resolves to nothing). A bare
    name means the root's script first (pytest and the benchmarks put the root first on sys.path: benchmarks/ has a
    cka.py of its own), then a file beside the importer in tests/ or benchmarks/."""
    parts = name.split(".")
    if parts[0] == "support":
        files = [SUPPORT.joinpath(*parts[1:i], "__init__.py") for i in range(1, len(parts) + 1)]
        files += [SUPPORT.joinpath(*parts[1:-1], parts[-1] + ".py")] if len(parts) > 1 else []
        return [path for path in files if path.is_file()]
    if len(parts) == 1:
        for folder in [REPO] + ([importer.parent] if importer.parent.name in ("tests", "benchmarks") else []):
            if (folder / f"{name}.py").is_file():
                return [folder / f"{name}.py"]
    return []


def import_graph() -> dict[Path, dict[Path, int]]:
    """file -> {file it imports: the line of the first such import}."""
    graph: dict[Path, dict[Path, int]] = {}
    for path in project_files():
        edges = graph.setdefault(path, {})
        for name, line in imported_names(ast.parse(path.read_text(), str(path))):
            for target in resolve(name, path):
                if target != path:
                    edges.setdefault(target, line)
    return graph


def circles(graph: dict[Path, dict[Path, int]]) -> list[list[Path]]:
    """The strongly connected components of more than one file (Tarjan's algorithm, iterative)."""
    index: dict[Path, int] = {}
    low: dict[Path, int] = {}
    stack: list[Path] = []
    on_stack: set[Path] = set()
    found: list[list[Path]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph.get(child, {}))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


def name(path: Path) -> str:
    return str(path.relative_to(REPO))


def test_no_import_circle_in_the_project() -> None:
    graph = import_graph()
    found = circles(graph)
    described = []
    for component in found:
        members = set(component)
        described.append(", ".join(f"{name(a)}:{line} -> {name(b)}" for a in sorted(component)
                                   for b, line in graph[a].items() if b in members))
    assert not found, "import circles (file:line -> what it imports):\n" + "\n".join(described)


def test_support_imports_no_script_of_the_root() -> None:
    graph = import_graph()
    upward = [f"{name(a)}:{line} imports {name(b)}" for a, edges in graph.items() if SUPPORT in a.parents
              for b, line in edges.items() if b.parent == REPO]
    assert not upward, "support/ must not import the root's scripts (train.py's \"What you change\" is the only " \
                       "seam):\n" + "\n".join(upward)


def layers() -> list[str]:
    """support/__init__.py's list of its packages and shared modules, top first: `training/`, ..., `atomic.py`."""
    doc = ast.get_docstring(ast.parse((SUPPORT / "__init__.py").read_text())) or ""
    packages = re.findall(r"^    (\w+)/ ", doc, re.M)
    shared = re.search(r"^    ((?:\w+\.py, )+\w+\.py): ", doc, re.M)
    assert packages and shared, "support/__init__.py's docstring no longer lists its packages and shared modules"
    return packages + [module.removesuffix(".py") for module in shared.group(1).split(", ")]


def unit(path: Path) -> str:
    """The package (or top-level module) of support/ that a file belongs to."""
    return path.relative_to(SUPPORT).parts[0].removesuffix(".py")


def test_every_package_of_support_is_placed_in_the_documented_order() -> None:
    placed = set(layers())
    present = {unit(path) for path in SUPPORT.rglob("*.py")} - {"__init__"}
    assert present == placed, f"support/__init__.py lists {sorted(placed)}, support/ holds {sorted(present)}"


def test_packages_of_support_import_only_those_below_them() -> None:
    order = {unit_name: rank for rank, unit_name in enumerate(layers())}
    upward = []
    for a, edges in import_graph().items():
        if SUPPORT not in a.parents or a.parent == SUPPORT and a.name == "__init__.py":
            continue
        for b, line in edges.items():
            if SUPPORT in b.parents and not (b.parent == SUPPORT and b.name == "__init__.py"):
                if unit(a) != unit(b) and order[unit(b)] < order[unit(a)]:
                    upward.append(f"{name(a)}:{line} imports {name(b)} ({unit(b)} is above {unit(a)})")
    assert not upward, "upward imports inside support/ (support/__init__.py lists the order):\n" + "\n".join(upward)


def test_support_is_a_few_modules_and_packages_each_saying_what_it_owns() -> None:
    top = sorted(path.name for path in SUPPORT.glob("*.py"))
    assert len(top) <= MAX_TOP_MODULES, f"{len(top)} modules directly in support/ ({', '.join(top)}): group them"
    for package in sorted(path.parent for path in SUPPORT.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
        assert "Imports:" in doc and "ust not import" in doc, \
            f"{name(package)}/__init__.py must say what it owns, what it imports and what it must not import"


@pytest.mark.parametrize("folder", ["support", "."])
def test_no_module_is_over_400_lines(folder: str) -> None:
    paths = SUPPORT.rglob("*.py") if folder == "support" else REPO.glob("*.py")
    long = [f"{name(path)}: {n} lines" for path in paths if (n := len(path.read_text().splitlines())) > MAX_LINES]
    assert not long, f"over {MAX_LINES} lines: split by concern:\n" + "\n".join(long)


def test_git_ignores_no_file_of_the_code() -> None:
    """A module that .gitignore matches never reaches a clone, CI or a Copier project (`data/` once ignored
    support/data/ whole: its __init__.py was missing from every copy)."""
    ignored = subprocess.run(["git", "ls-files", "--cached", "--others", "--ignored", "--exclude-standard", "--",
                              "*.py", "*.sh", "*.toml", "*.jinja", "*.md"], cwd=REPO, capture_output=True, text=True,
                             check=True)
    names = [line for line in ignored.stdout.splitlines() if not line.startswith(("runs/", ".venv/"))]
    assert not names, f".gitignore hides files of the project: {names}; anchor its patterns (/data/, not data/)"


def test_each_moved_module_has_its_new_place_and_its_changelog_row() -> None:
    """support.MOVED answers an old import with the new place: that place must exist, the old module must not (the
    finder is asked only when no file answers), and CHANGELOG.md's v0.3.0 table must say the same."""
    from support import MOVED

    changelog = (REPO / "CHANGELOG.md").read_text()
    def module_file(dotted: str) -> Path:
        return REPO.joinpath(*dotted.split(".")).with_suffix(".py")

    for old, new in MOVED.items():
        assert not module_file(old).exists(), f"{old} is a module again: MovedModules' one line never comes"
        for place in new.split(" and "):
            assert module_file(place).is_file(), f"MOVED sends {old} to {place}, which does not exist"
        row = f"| `{old}` | `{new.replace(' and ', '` and `')}` |"
        assert row in changelog, f"CHANGELOG.md's v0.3.0 table lacks: {row}"
