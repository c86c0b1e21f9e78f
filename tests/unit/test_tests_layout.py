"""The test suite's own layout.

* Shared helpers come from ``tests.support``, never from another test module (a test module is
  collected by pytest, and importing it runs its fixtures' module code a second time and ties two
  test files together).
* The tests mirror the source: ``tests/unit/<package>/test_<module>.py`` and
  ``tests/integration/<package>/test_<module>.py`` test ``<package>/<module>.py`` (or the
  subpackage ``<package>/<module>/``; ``test_<package>.py`` tests the package's public surface,
  its ``__init__.py``). A documented suffix (:data:`SUFFIXES`) names a second file for the same
  module. Only the files in :data:`NOT_ONE_MODULE` test no single module, each for the reason
  given. ``tests/e2e/`` stays flat: those tests run whole processes, not a module."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
#: The source packages the tests mirror.
PACKAGES = ("feed", "fanout", "gateway", "schemas", "bench", "infra")
#: Test kinds laid out as the source is.
MIRRORED = ("unit", "integration")
#: Suffixes of a second test file for one module: ``test_<module><suffix>.py``.
SUFFIXES = {
    "_fuzz": "generated inputs through one hypothesis harness",
    "_hostile": "hostile values the module must refuse cleanly",
    "_lost_stream": "the session once its delivery stream lost entries",
    "_semantics": "a property against the reference model of tests/support/feed_model.py",
    "_ids": "the processor's ids, ownership and deletes",
    "_redis_loss": "the module once Redis lost its data",
    "_cluster": "the module on a real Redis Cluster",
}
#: Test files that test no single module (path under tests/ -> why).
NOT_ONE_MODULE = {
    "unit/test_tests_layout.py": "checks tests/ itself",
    "unit/test_deploy_files.py": "checks the deployment files (Dockerfile, compose, k8s, Grafana)",
    "unit/gateway/test_private_reach.py": "pins the library internals several gateway modules use",
}
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


def misplaced(tests: Path, root: Path) -> list[str]:
    """Test files under ``tests`` that break the mirror rule against the sources under ``root``,
    each with what is wrong."""
    found: list[str] = []
    for kind in MIRRORED:
        for path in sorted((tests / kind).rglob("test_*.py")):
            rel = path.relative_to(tests)
            if rel.as_posix() in NOT_ONE_MODULE:
                continue
            folder = path.parent.relative_to(tests / kind).parts
            if not folder or folder[0] not in PACKAGES:
                found.append(f"{rel}: not in a package folder ({', '.join(PACKAGES)})")
                continue
            if not (path.parent / "__init__.py").is_file():
                found.append(f"{rel}: its folder has no __init__.py")
            name = path.stem.removeprefix("test_")
            names = {name} | {name.removesuffix(s) for s in SUFFIXES if name.endswith(s)}
            source = root.joinpath(*folder)
            if not any(
                (source / f"{n}.py").is_file()
                or (source / n / "__init__.py").is_file()
                or (n == folder[-1] and (source / "__init__.py").is_file())
                for n in names
            ):
                found.append(f"{rel}: no source module {'/'.join(folder)}/{name}.py")
    e2e = tests / "e2e"
    found += [
        f"{p.relative_to(tests)}: e2e tests stay flat in tests/e2e/"
        for p in sorted(e2e.rglob("test_*.py"))
        if p.parent != e2e
    ]
    return found


def test_the_tests_mirror_the_source() -> None:
    assert misplaced(TESTS, ROOT) == []


def test_the_allow_list_names_files_that_exist() -> None:
    assert [p for p in NOT_ONE_MODULE if not (TESTS / p).is_file()] == []


def test_a_misplaced_test_file_is_reported(tmp_path: Path) -> None:
    src, tests = tmp_path / "src", tmp_path / "tests"
    for rel in ("gateway/__init__.py", "gateway/hub.py", "gateway/routes/__init__.py"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).touch()
    (src / "gateway/routes/feed.py").touch()
    for rel in (
        "unit/gateway/__init__.py",
        "unit/gateway/test_hub.py",  # gateway/hub.py
        "unit/gateway/test_gateway.py",  # the package itself
        "unit/gateway/test_hub_fuzz.py",  # a documented suffix
        "integration/gateway/routes/__init__.py",
        "integration/gateway/routes/test_feed.py",  # gateway/routes/feed.py
        "integration/gateway/routes/test_routes.py",  # the subpackage itself
        "unit/gateway/test_session.py",  # no gateway/session.py
        "unit/gateway/test_hub_extra.py",  # not a documented suffix
        "unit/feed/test_keys.py",  # no feed/, and the folder has no __init__.py
        "unit/test_hub.py",  # not in a package folder
        "integration/fanout/test_processor.py",  # no fanout/
        "e2e/gateway/test_hub.py",  # e2e is flat
    ):
        (tests / rel).parent.mkdir(parents=True, exist_ok=True)
        (tests / rel).touch()
    reported = [line.partition(":")[0] for line in misplaced(tests, src)]
    assert reported == [
        "unit/feed/test_keys.py",
        "unit/feed/test_keys.py",
        "unit/gateway/test_hub_extra.py",
        "unit/gateway/test_session.py",
        "unit/test_hub.py",
        "integration/fanout/test_processor.py",
        "integration/fanout/test_processor.py",
        "e2e/gateway/test_hub.py",
    ]
