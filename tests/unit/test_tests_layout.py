"""The test suite's own layout: shared helpers come from ``tests.support``, never from another
test module (a test module is collected by pytest, and importing it runs its fixtures' module
code a second time and ties two test files together)."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
#: What a test module may import from the ``tests`` package.
ALLOWED = ("tests.support", "tests.conftest")


def _imported_test_modules(path: Path) -> list[str]:
    """``tests.*`` modules ``path`` imports that are neither support nor the conftest."""
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return [
        name
        for name in names
        if name.startswith("tests.")
        and not any(name == ok or name.startswith(ok + ".") for ok in ALLOWED)
    ]


def test_no_test_module_imports_another() -> None:
    files = sorted(TESTS.rglob("*.py"))
    assert len(files) > 40
    found = {
        str(path.relative_to(TESTS)): bad for path in files if (bad := _imported_test_modules(path))
    }
    assert found == {}, f"move the shared helpers into tests/support/: {found}"


def test_support_holds_no_tests() -> None:
    support = TESTS / "support"
    assert (support / "__init__.py").is_file()
    assert not list(support.rglob("test_*.py")), "tests/support/ is for helpers, not tests"
