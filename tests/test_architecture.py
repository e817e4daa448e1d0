"""The import contract in pyproject.toml ([tool.importlinter]): `lint-imports` keeps it for the package as it is,
breaks it for a copy with one import against the order, and no module reaches a package module by a name in a
string (`importlib.import_module("aoe_ep....")`, which the contract cannot see)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "aoe_ep"
LINT = shutil.which("lint-imports")

needs_lint = pytest.mark.skipif(LINT is None, reason="import-linter is not installed (pip install -e '.[test]')")


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run(
        [LINT, "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )


@needs_lint
def test_the_package_keeps_the_contract():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


# (module that gains the import, the import): a floor importing one above it, a floor importing its sibling, and a
# module of aoe_ep.moe importing aoe_ep.parallel (only the package file of aoe_ep.moe may).
UPWARD = [
    ("moe/routing.py", "import aoe_ep.train.batches"),
    ("plan/placement.py", "from aoe_ep.eval import loading"),
    ("moe/layer.py", "import aoe_ep.parallel"),
]


@needs_lint
@pytest.mark.parametrize("module, line", UPWARD, ids=[m for m, _ in UPWARD])
def test_an_import_against_the_order_breaks_the_contract(tmp_path, module, line):
    shutil.copytree(PACKAGE, tmp_path / "aoe_ep", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    assert _lint(tmp_path).returncode == 0  # the copy keeps it as it is
    path = tmp_path / "aoe_ep" / module
    path.write_text(path.read_text() + f"\n{line}  # against the order\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout or "broken" in result.stdout


IMPORTERS = {"import_module", "__import__", "find_spec", "spec_from_file_location"}


def _string_imports(tree: ast.Module) -> list[str]:
    """Package module names given as strings to an import function, directly or through a module-level constant."""
    constants = {
        t.id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        for t in node.targets
        if isinstance(t, ast.Name) and isinstance(node.value, ast.Constant)
    }
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name not in IMPORTERS:
            continue
        arg = node.args[0]
        value = arg.value if isinstance(arg, ast.Constant) else constants.get(getattr(arg, "id", None))
        if isinstance(value, str) and value.split(".")[0] == "aoe_ep":
            found.append(value)
    return found


def test_no_module_imports_the_package_by_a_string():
    offenders = {
        str(p.relative_to(ROOT)): names
        for p in sorted(PACKAGE.rglob("*.py"))
        if (names := _string_imports(ast.parse(p.read_text())))
    }
    assert not offenders


def test_the_string_import_check_sees_a_hidden_import():
    hidden = ast.parse('import importlib\nPKG = "aoe_ep.parallel"\n\ndef f():\n    importlib.import_module(PKG)\n')
    assert _string_imports(hidden) == ["aoe_ep.parallel"]
    assert _string_imports(ast.parse('__import__("aoe_ep.train")')) == ["aoe_ep.train"]
    assert _string_imports(ast.parse('importlib.import_module("tokenizers")')) == []
