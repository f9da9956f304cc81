"""Packaging: pyproject.toml, environment.yml, constraints.txt, Makefile and CI agree."""

from __future__ import annotations

import importlib
import re
from importlib import metadata
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")


def _name(requirement: str) -> str:
    """Normalised distribution name of a requirement string ('Foo_bar[x]>=1' -> 'foo-bar')."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


@pytest.fixture(scope="module")
def project(repo_root: Path) -> dict:
    return tomllib.loads((repo_root / "pyproject.toml").read_text(encoding="utf-8"))["project"]


@pytest.fixture(scope="module")
def environment(repo_root: Path) -> dict:
    return yaml.safe_load((repo_root / "environment.yml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def constraints(repo_root: Path) -> dict[str, str]:
    pins = {}
    for line in (repo_root / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt must pin exact versions: {line!r}"
            pins[_name(name)] = version
    return pins


def _env_pip(environment: dict) -> list[str]:
    pips = [d["pip"] for d in environment["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pips) == 1, "environment.yml needs exactly one pip section"
    return pips[0]


def test_environment_installs_the_package_with_book_and_test_extras(environment, project) -> None:
    pip = _env_pip(environment)
    editable = [p for p in pip if p.startswith("-e ")]
    assert len(editable) == 1, pip
    extras = set(re.search(r"\[(.*)\]", editable[0]).group(1).split(","))
    assert {"book", "test"} <= extras <= set(project["optional-dependencies"])
    assert "-c constraints.txt" in pip, "pip in the conda env must use the same pins"
    # Anything else pip installs by name must be a dependency declared in pyproject.toml.
    declared = {_name(r) for r in project["dependencies"]}
    for extra in extras:
        declared |= {_name(r) for r in project["optional-dependencies"][extra]}
    for req in pip:
        if not req.startswith("-"):
            assert _name(req) in declared, f"{req} is in environment.yml but not in pyproject.toml"


def test_environment_conda_packages_are_tools_not_python_libraries(environment, project) -> None:
    conda = [d for d in environment["dependencies"] if isinstance(d, str)]
    names = {_name(d) for d in conda}
    assert names <= {"python", "pip", "nodejs"}, names
    python = next(d for d in conda if _name(d) == "python")
    minor = tuple(int(x) for x in re.search(r"(\d+)\.(\d+)", python).groups())
    floor = tuple(int(x) for x in re.search(r">=\s*(\d+)\.(\d+)", project["requires-python"]).groups())
    assert minor >= floor


def test_constraints_pin_every_declared_dependency(project, environment, constraints) -> None:
    extras = set(
        re.search(r"\[(.*)\]", next(p for p in _env_pip(environment) if p.startswith("-e "))).group(1).split(",")
    )
    required = [*project["dependencies"]]
    for extra in extras:
        required += project["optional-dependencies"][extra]
    missing = sorted(_name(r) for r in required if _name(r) not in constraints)
    assert not missing, f"not pinned in constraints.txt: {missing}"
    assert constraints["torch"] == "2.13.0"


def test_installed_versions_match_constraints(project, constraints) -> None:
    """The environment running the tests was installed with the pins (local tags like +cpu aside)."""
    for req in project["dependencies"]:
        name = _name(req)
        installed = metadata.version(name).split("+", 1)[0]
        assert installed == constraints[name], f"{name}: installed {installed}, pinned {constraints[name]}"


def test_console_script_points_at_a_function(project) -> None:
    target = project["scripts"]["moe-book"]
    module, _, attr = target.partition(":")
    assert callable(getattr(importlib.import_module(module), attr))


def test_make_targets_and_ci(repo_root: Path) -> None:
    makefile = (repo_root / "Makefile").read_text(encoding="utf-8")
    for target in ("book", "test", "lab", "clean"):
        assert re.search(rf"^{target}:", makefile, re.M), f"make {target} is missing"
    assert "torch==2.13.0" in makefile and "-c constraints.txt" in makefile
    ci = (repo_root / ".ci" / "run").read_text(encoding="utf-8")
    assert "set -euo pipefail" in ci and "make test" in ci


def test_citation_file_cites_this_version_and_the_paper_of_the_bibliography(repo_root: Path, project) -> None:
    """CITATION.cff (CFF 1.2; `cffconvert --validate` accepts it) agrees with the package and
    with the paper as book/references.bib cites it."""
    from moe_utils import __version__

    cff = yaml.safe_load((repo_root / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software"
    assert cff["version"] == __version__ and cff["license"] == project["license"]
    assert cff["authors"] and all("name" in a or "family-names" in a for a in cff["authors"])
    (paper,) = [r for r in cff["references"] if "Mixture-of-Experts" in r["title"]]
    bib = (repo_root / "book" / "references.bib").read_text(encoding="utf-8")
    entry = bib[bib.index("@inproceedings{lo2025closer") :].split("\n}", 1)[0]
    field = dict(re.findall(r"^\s*(\w+)\s*=\s*\{(.*)\},?\s*$", entry, flags=re.M))
    assert paper["title"] == field["title"] and str(paper["year"]) == field["year"]
    assert paper["collection-title"] == field["booktitle"]
    assert f"{paper['start']}--{paper['end']}" == field["pages"]
    names = [f"{a['family-names']}, {a['given-names']}" for a in paper["authors"]]
    assert " and ".join(names) == field["author"]
    assert any(field["eprint"] in i["value"] for i in paper["identifiers"]) and field["eprint"] in paper["url"]
