"""The hash of pyproject.toml's dependency tables, stamped into requirements/*.lock by
``make lock`` (infra/lock.sh) and recomputed by tests/unit/infra/test_lockstamp.py: a change to
the declared dependencies without a new lock fails the tests."""

from __future__ import annotations

import hashlib
import json
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def dependency_stamp(pyproject: Path = ROOT / "pyproject.toml") -> str:
    project = tomllib.loads(pyproject.read_text())["project"]
    declared = {
        "requires-python": project.get("requires-python"),
        "dependencies": sorted(project.get("dependencies", [])),
        "optional-dependencies": {
            name: sorted(deps) for name, deps in project.get("optional-dependencies", {}).items()
        },
    }
    return hashlib.sha256(json.dumps(declared, sort_keys=True).encode()).hexdigest()


if __name__ == "__main__":
    sys.stdout.write(dependency_stamp() + "\n")
