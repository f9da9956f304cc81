"""The package tree is its architecture: layers import only downwards, no import cycles, imports at
module top, and ARCHITECTURE.md's diagram names every module. The import rules are checked by
parsing every module with ``ast`` (nothing is imported), so a violation is reported with the file
and line that causes it."""

from __future__ import annotations

import ast
import graphlib
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "moe_utils"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE

# Lowest first. A module may import modules of its own layer or of a layer listed before it.
LAYERS = ("core", "metrics", "arch", "engine", "models", "analysis", "zoo", "publish")
# The package root only carries the version; every layer may read it.
ROOT_LAYER = "core"

# Function-level imports of the package, each with the reason it is not at module top. Only
# start-up cost counts: these load torch (tens of seconds on a busy machine), which the commands
# and pages that do not need it must not pay.
ALLOWED_LOCAL_IMPORTS = {
    ("moe_utils.publish.cli", "moe_utils.zoo.study"): "torch: only `moe-book zoo study` trains",
    ("moe_utils.publish.cli", "moe_utils.zoo.train"): "torch: only `moe-book zoo train` trains",
    ("moe_utils.publish.cli", "moe_utils.publish.coverage"): "torch: only `moe-book coverage` builds models",
    ("moe_utils.publish.plan", "moe_utils.models.loading"): "torch: only a `dtype` parameter needs it",
    # the other commands' handlers: the parser, --help and option errors start without torch
    ("moe_utils.publish.cli", "moe_utils.publish.params"): "pydantic: only `moe-book run` parses -p",
    ("moe_utils.publish.cli", "moe_utils.publish.plan"): "torch via the model ids: only `moe-book run` plans",
    ("moe_utils.publish.cli", "moe_utils.publish.runner"): "papermill: only `moe-book run` executes",
    ("moe_utils.publish.cli", "moe_utils.publish.bookbuild"): "pandas, scipy: only `moe-book build` summarises",
    ("moe_utils.publish.cli", "moe_utils.publish.scaffold"): "only `moe-book init` writes a book",
}


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    imported: str  # dotted module name (a module of the package, never a name inside one)
    line: int
    local: bool  # inside a function body


def module_name(path: Path, root: Path, package: str) -> str:
    parts = (package, *path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted name -> file of every module of the package (data folders without Python skipped)."""
    return {module_name(p, root, package): p for p in sorted(root.rglob("*.py"))}


def _resolve(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: Path, modules: dict[str, Path], package: str) -> list[Import]:
    """The package modules ``name`` imports, with their line and whether the import is local."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[Import] = []

    def add(target: str, line: int, local: bool) -> None:
        while target and target not in modules:  # a name inside a module: the module itself
            target = target.rpartition(".")[0]
        if target and target != name:
            found.append(Import(name, target, line, local))

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == package:
                        add(alias.name, child.lineno, inner)
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(child, name, path.name == "__init__.py")
                if base.split(".")[0] != package:
                    continue
                for alias in child.names:  # `from pkg import submodule` imports the submodule
                    sub = f"{base}.{alias.name}"
                    add(sub if sub in modules else base, child.lineno, inner)
            visit(child, inner)

    visit(tree, False)
    return found


def all_imports(root: Path, package: str) -> list[Import]:
    modules = package_modules(root, package)
    return [imp for name, path in modules.items() for imp in imports_of(name, path, modules, package)]


def layer_of(module: str, package: str, layers: tuple[str, ...], root_layer: str) -> str:
    parts = module.split(".")
    return root_layer if len(parts) == 1 else parts[1]


def upward_imports(imports: list[Import], package: str, layers: tuple[str, ...], root_layer: str) -> list[str]:
    """Imports of a higher layer, and modules outside every declared layer."""
    problems = []
    rank = {layer: i for i, layer in enumerate(layers)}
    for imp in imports:
        a = layer_of(imp.importer, package, layers, root_layer)
        b = layer_of(imp.imported, package, layers, root_layer)
        for module, layer in ((imp.importer, a), (imp.imported, b)):
            if layer not in rank:
                problems.append(
                    f"{module} is in no declared layer ({layer!r}); put it in one of "
                    f"{', '.join(layers)} or declare the new layer"
                )
        if a in rank and b in rank and rank[b] > rank[a]:
            problems.append(
                f"{imp.importer} (layer {a}) imports {imp.imported} (layer {b}, above it) at line {imp.line}"
            )
    return sorted(set(problems))


def import_cycle(imports: list[Import]) -> list[str] | None:
    """One cycle of module-level and local imports (as a closed path of modules), or None."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        graph.setdefault(imp.importer, set()).add(imp.imported)
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        return list(exc.args[1])
    return None


def local_imports(imports: list[Import], allowed) -> list[str]:
    return sorted(
        f"{imp.importer} imports {imp.imported} inside a function (line {imp.line})"
        for imp in imports
        if imp.local and (imp.importer, imp.imported) not in allowed
    )


# ---- the package -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def package_imports() -> list[Import]:
    return all_imports(PACKAGE_DIR, PACKAGE)


def test_every_module_is_in_a_layer_and_imports_only_downwards(package_imports):
    assert upward_imports(package_imports, PACKAGE, LAYERS, ROOT_LAYER) == []


def test_no_import_cycles(package_imports):
    cycle = import_cycle(package_imports)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_of_the_package_are_at_module_top(package_imports):
    assert local_imports(package_imports, ALLOWED_LOCAL_IMPORTS) == []


def test_the_allow_list_names_only_imports_that_exist(package_imports):
    present = {(imp.importer, imp.imported) for imp in package_imports if imp.local}
    assert set(ALLOWED_LOCAL_IMPORTS) <= present, set(ALLOWED_LOCAL_IMPORTS) - present


def test_layers_are_the_top_level_sub_packages():
    folders = {p.parent.name for p in PACKAGE_DIR.glob("*/__init__.py")}
    assert folders == set(LAYERS)
    assert sorted(p.name for p in PACKAGE_DIR.glob("*.py")) == ["__init__.py"]


# ---- the checks themselves, on a package made to break them ----------------------------------
def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


@pytest.fixture
def fake(tmp_path: Path) -> Path:
    root = tmp_path / "fakepkg"
    _write(
        root,
        {
            "__init__.py": "",
            "low/__init__.py": "",
            "low/a.py": "from fakepkg.low import b\n",
            "low/b.py": "import os\n",
            "high/__init__.py": "",
            "high/c.py": "from ..low.a import thing\n",
        },
    )
    return root


def test_a_clean_fake_package_passes(fake):
    imports = all_imports(fake, "fakepkg")
    assert {(i.importer, i.imported) for i in imports} == {
        ("fakepkg.low.a", "fakepkg.low.b"),
        ("fakepkg.high.c", "fakepkg.low.a"),
    }
    assert upward_imports(imports, "fakepkg", ("low", "high"), "low") == []
    assert import_cycle(imports) is None
    assert local_imports(imports, {}) == []


def test_an_upward_import_is_reported_with_its_line(fake):
    _write(fake, {"low/b.py": "import os\n\nfrom fakepkg.high import c\n"})
    problems = upward_imports(all_imports(fake, "fakepkg"), "fakepkg", ("low", "high"), "low")
    assert problems == ["fakepkg.low.b (layer low) imports fakepkg.high.c (layer high, above it) at line 3"]


def test_a_cycle_hidden_in_a_function_is_found(fake):
    _write(fake, {"low/b.py": "def f():\n    from fakepkg.low.a import x\n    return x\n"})
    imports = all_imports(fake, "fakepkg")
    cycle = import_cycle(imports)
    assert cycle is not None and set(cycle) == {"fakepkg.low.a", "fakepkg.low.b"}
    assert local_imports(imports, {}) == ["fakepkg.low.b imports fakepkg.low.a inside a function (line 2)"]
    assert local_imports(imports, {("fakepkg.low.b", "fakepkg.low.a"): "reason"}) == []


def test_a_module_outside_the_layers_is_reported(fake):
    _write(fake, {"loose.py": "from fakepkg.low import a\n"})
    problems = upward_imports(all_imports(fake, "fakepkg"), "fakepkg", ("low", "high"), "low")
    assert any("fakepkg.loose is in no declared layer" in p for p in problems)


# ---- ARCHITECTURE.md names every module ------------------------------------------------------
ARCHITECTURE_MD = PACKAGE_DIR.parent / "ARCHITECTURE.md"
_LAYER_LINE = re.compile(r"^(?P<layer>[a-z_]+)/\s+(?P<names>.*)$")
_MORE_LINE = re.compile(r"^\s+(\|\s+)?(?P<names>[a-z_].*)$")


def documented_modules(text: str) -> dict[str, set[str]]:
    """Layer -> module names listed in the first code block of ARCHITECTURE.md (the diagram):
    ``layer/  a, b, c  (comment)``, continued on indented lines (after a ``|`` or not)."""
    diagram = text.split("```", 2)[1]
    out: dict[str, set[str]] = {}
    layer = None
    for raw in diagram.splitlines():
        head, more = _LAYER_LINE.match(raw.strip()), _MORE_LINE.match(raw)
        if head:
            layer, names = head["layer"], head["names"]
        elif more and layer:
            names = more["names"]
        else:
            continue
        names = names.split("(", 1)[0]
        out.setdefault(layer, set()).update(n.strip() for n in names.split(",") if n.strip())
    return out


def package_module_names(root: Path) -> dict[str, set[str]]:
    """Layer -> names of its modules (``__init__`` aside)."""
    out: dict[str, set[str]] = {}
    for path in root.glob("*/*.py"):
        if path.stem != "__init__":
            out.setdefault(path.parent.name, set()).add(path.stem)
    return out


def test_architecture_md_names_every_module_and_only_those():
    documented = documented_modules(ARCHITECTURE_MD.read_text(encoding="utf-8"))
    present = package_module_names(PACKAGE_DIR)
    assert set(documented) == set(LAYERS), "the diagram's layers are not the package's"
    problems = []
    for layer in LAYERS:
        for name in sorted(present.get(layer, set()) - documented[layer]):
            problems.append(f"{PACKAGE}/{layer}/{name}.py exists but ARCHITECTURE.md does not name it")
        for name in sorted(documented[layer] - present.get(layer, set())):
            problems.append(f"ARCHITECTURE.md names {layer}/{name}, which does not exist")
    assert problems == []


def test_the_diagram_parser_reads_continuation_lines():
    text = "x\n```\nhigh/   a, b   (top)\n   |    c\n   |\nlow/    d  (bottom)\n        e\n```\n"
    assert documented_modules(text) == {"high": {"a", "b", "c"}, "low": {"d", "e"}}
