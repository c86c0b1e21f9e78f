"""The lock files agree with pyproject.toml, and the tests run on exactly the locked versions.

``make lock`` (infra/lock.sh) resolves pyproject.toml into requirements/dev.lock and
requirements/runtime.lock; ``infra/setup.sh`` installs dev.lock into the project's .venv, and the
Dockerfile installs runtime.lock. A dependency changed in pyproject.toml without a new lock, a
hand-edited lock, or an environment that drifted from the lock fails here.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from infra.lockstamp import dependency_stamp

ROOT = Path(__file__).resolve().parents[3]
LOCKS = ROOT / "requirements"
PROJECT = "feed-backend"
_PIN = re.compile(
    r"^(?P<name>[A-Za-z0-9._-]+)==(?P<version>[^\s;\\]+)(?:\s*;\s*(?P<marker>[^\\]+))?"
)


def _pins(lock: Path) -> dict[str, list[tuple[Version, Marker | None]]]:
    pins: dict[str, list[tuple[Version, Marker | None]]] = {}
    for line in lock.read_text().splitlines():
        match = _PIN.match(line)
        if match:
            marker = match.group("marker")
            pins.setdefault(canonicalize_name(match.group("name")), []).append(
                (Version(match.group("version")), Marker(marker.strip()) if marker else None)
            )
    return pins


def _applicable(pins: list[tuple[Version, Marker | None]]) -> list[Version]:
    return [v for v, marker in pins if marker is None or marker.evaluate()]


def _declared(extras: tuple[str, ...]) -> list[Requirement]:
    """The project's requirements with ``extras``, self-references (``feed-backend[x]``)
    expanded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = project.get("optional-dependencies", {})
    out: list[Requirement] = []
    todo = list(extras)
    seen: set[str] = set()
    specs = list(project["dependencies"])
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        specs += optional[extra]
    for spec in specs:
        req = Requirement(spec)
        if canonicalize_name(req.name) == PROJECT:
            todo_extras = [e for e in req.extras if e not in seen]
            for extra in todo_extras:
                seen.add(extra)
                out += [Requirement(s) for s in optional[extra]]
            continue
        out.append(req)
    # Nested self-references (dev -> local, bench) are expanded above; drop any left.
    return [r for r in out if canonicalize_name(r.name) != PROJECT]


@pytest.mark.parametrize("name", ["dev", "runtime"])
def test_the_lock_was_made_from_this_pyproject(name: str) -> None:
    text = (LOCKS / f"{name}.lock").read_text()
    stamp = re.search(r"^# pyproject-deps-sha256: (\w+)$", text, re.MULTILINE)
    assert stamp, f"requirements/{name}.lock has no stamp: run `make lock`"
    assert stamp.group(1) == dependency_stamp(), (
        f"pyproject.toml's dependencies changed since requirements/{name}.lock was made: "
        "run `make lock` and commit both files"
    )


@pytest.mark.parametrize(("name", "extras"), [("dev", ("dev",)), ("runtime", ())])
def test_every_declared_dependency_is_pinned_within_its_range(
    name: str, extras: tuple[str, ...]
) -> None:
    pins = _pins(LOCKS / f"{name}.lock")
    problems = []
    for req in _declared(extras):
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        versions = _applicable(pins.get(canonicalize_name(req.name), []))
        if not versions:
            problems.append(f"{req.name} is not in requirements/{name}.lock")
        for version in versions:
            if not req.specifier.contains(version, prereleases=True):
                problems.append(f"{req.name}=={version} is outside pyproject's {req.specifier}")
    assert not problems, problems


def test_runtime_lock_is_the_dev_lock_without_the_dev_tools() -> None:
    dev, runtime = _pins(LOCKS / "dev.lock"), _pins(LOCKS / "runtime.lock")
    for name, pins in runtime.items():
        assert name in dev, f"{name} is in runtime.lock but not in dev.lock"
        assert {v for v, _ in pins} <= {v for v, _ in dev[name]}, (name, pins, dev[name])


def test_every_pin_carries_hashes() -> None:
    for name in ("dev", "runtime"):
        blocks = re.split(r"\n(?=[A-Za-z0-9])", (LOCKS / f"{name}.lock").read_text())
        for block in blocks:
            if _PIN.match(block):
                assert "--hash=sha256:" in block, f"{name}.lock: {block.splitlines()[0]}"


def test_this_environment_has_exactly_the_locked_versions() -> None:
    """``make test`` runs in .venv, installed from dev.lock: every locked package that applies to
    this interpreter is installed at its locked version, whatever the system Python holds."""
    drifted = []
    for name, pins in _pins(LOCKS / "dev.lock").items():
        wanted = _applicable(pins)
        if not wanted:
            continue
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            drifted.append(f"{name} is locked but not installed")
            continue
        if installed not in wanted:
            drifted.append(f"{name} {installed} installed, {wanted[0]} locked")
    assert not drifted, (
        "this environment is not the locked one (run the tests through `make test`): "
        + "; ".join(drifted)
    )
