"""The capacity model's inputs: per-core figures merged from several bench runs."""

from __future__ import annotations

import json
from pathlib import Path

from bench.capacity import merged_figures, model


def _run(root: Path, name: str, *, quick: bool = False, **sections: object) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"meta": {"quick": quick}, **sections}))


def _fanout(worker: float, redis: float) -> dict[str, object]:
    cpu = {"inserts_per_worker_cpu_s": worker, "inserts_per_redis_cpu_s": redis}
    return {"phases": {"redis_only": {"cpu": cpu}}}


def test_each_figure_comes_from_the_newest_full_run_that_measured_it(tmp_path: Path) -> None:
    _run(tmp_path, "20260101-000000", fanout=_fanout(100.0, 200.0))
    _run(tmp_path, "20260102-000000", fanout=_fanout(300.0, 400.0))
    _run(tmp_path, "20260103-000000", e2e={"deliveries_per_gateway_cpu_s": 5000.0})
    _run(tmp_path, "20260104-000000", quick=True, fanout=_fanout(1.0, 1.0))
    figures, sources, description = merged_figures(tmp_path)
    assert figures["worker_inserts_per_core"] == 300.0
    assert figures["redis_inserts_per_core"] == 400.0
    assert figures["gateway_deliveries_per_core"] == 5000.0
    assert "20260102-000000" in sources["worker_inserts_per_core"]
    assert description is not None and "20260104-000000" not in description
    sized = model(4600, 12000, 75, 300_000, 1_000_000, figures=figures, sources=sources)
    workers = next(c for c in sized["components"] if c["component"] == "fan-out workers")
    assert workers["per_core"] == 300.0


def test_quick_runs_count_when_there_is_no_full_run(tmp_path: Path) -> None:
    _run(tmp_path, "20260104-000000", quick=True, fanout=_fanout(7.0, 9.0))
    figures, sources, _ = merged_figures(tmp_path)
    assert figures["worker_inserts_per_core"] == 7.0
    assert sources["worker_inserts_per_core"].startswith("quick run")


def test_no_results_means_every_figure_is_assumed(tmp_path: Path) -> None:
    assert merged_figures(tmp_path / "missing") == ({}, {}, None)
