"""pyproject.toml's dependencies match the code: every third-party module the package imports (at the top of a
file or inside a function) belongs to a declared distribution, the installed versions satisfy the declared
ranges, and the floors leave out the releases with known vulnerabilities."""

from __future__ import annotations

import ast
import sys
from importlib.metadata import PackageNotFoundError, packages_distributions, version
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "distributed_anomaly"


def _declared() -> dict[str, Requirement]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {canonicalize_name(r.name): r for r in map(Requirement, deps)}


def imported_modules(root: Path) -> dict[str, str]:
    """{top-level module: first file importing it} for every absolute import under root, nested ones included."""
    found: dict[str, str] = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def test_every_third_party_import_is_a_declared_dependency() -> None:
    declared = _declared()
    owners = packages_distributions()
    third_party = {m: where for m, where in imported_modules(PACKAGE).items() if m not in sys.stdlib_module_names}
    third_party.pop(PACKAGE.name)
    assert {"torch", "ray", "PIL", "fastapi"} <= set(third_party)  # the scan sees top-level and nested imports
    undeclared = []
    for module, where in sorted(third_party.items()):
        dists = {canonicalize_name(d) for d in owners.get(module, [])}
        assert dists, f"{module} (imported by {where}) is not installed: which distribution provides it?"
        if not dists & set(declared):
            undeclared.append(f"{module} ({where}; distribution {', '.join(sorted(dists))})")
    assert not undeclared, "imported but not in [project] dependencies: " + "; ".join(undeclared)


def test_installed_versions_satisfy_the_declared_ranges() -> None:
    for name, req in _declared().items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            pytest.fail(f"{req} is declared but not installed")
        assert req.specifier.contains(installed, prereleases=True), f"installed {name} {installed} is outside {req}"


@pytest.mark.parametrize(
    ("name", "vulnerable", "fine"),
    [
        ("pillow", ["10.2.0", "10.3.0", "11.2.1"], ["11.3.0", "12.0.0"]),  # CVE-2024-28219, CVE-2025-48379
        ("python-multipart", ["0.0.9", "0.0.17"], ["0.0.18"]),  # CVE-2024-53981
        ("starlette", ["0.40.0", "0.47.1", "0.49.0"], ["0.49.1"]),  # CVE-2024-47874, CVE-2025-54121, -62727
        ("tqdm", ["4.66.2"], ["4.66.3"]),  # CVE-2024-34062
        ("pyarrow", ["14.0.0"], ["15.0.0"]),  # CVE-2023-47248
        ("torch", ["2.14.0", "2.15.0"], ["2.14.1"]),  # the one torch the project is tested with
        ("torchvision", ["0.30.0"], ["0.29.1"]),
    ],
)
def test_floors_exclude_vulnerable_releases(name: str, vulnerable: list[str], fine: list[str]) -> None:
    spec = _declared()[name].specifier
    assert not [v for v in vulnerable if spec.contains(v)], f"{name}{spec} admits a release it must not"
    assert all(spec.contains(v) for v in fine), f"{name}{spec} refuses a release it must admit"
