"""``python -m bench.writer_cost``: the gateway bench's writer alone, on a real Redis and a real
3-master Redis Cluster that the tool starts and stops itself."""

from __future__ import annotations

import json

import pytest

from bench import writer_cost

pytestmark = pytest.mark.timeout(300)


def test_it_measures_both_topologies_per_activity(capsys: pytest.CaptureFixture[str]) -> None:
    assert writer_cost.main(["--batch", "30", "--batches", "40"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["batch"], out["batches"]) == (30, 40)
    for topology in ("one", "cluster"):
        measured = out[topology]
        assert measured["activities"] == 30 * 40
        assert measured["client_us"] > 0 and measured["redis_us"] > 0
        assert measured["wall_ms_per_batch"] > 0
        # each activity is at least its body's SET and its script call's commands
        assert measured["commands"] >= 2
    for field, ratio in out["cluster_over_one"].items():
        assert ratio == pytest.approx(out["cluster"][field] / out["one"][field], abs=0.01)


def test_bad_arguments_name_the_limit(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        writer_cost.main(["--batch", "0"])
    assert "--batch must be 1..10000" in capsys.readouterr().err
