"""bench.notify's pure helpers: INFO replies into figures, the notification workload, the report.

No servers: the scenario itself runs in tests/integration/bench/test_bench.py (``--quick``).
"""

from __future__ import annotations

import random

import pytest

from bench.notify import (
    command_breakdown,
    command_stats,
    cpu_seconds,
    notify_workload,
    per_entry_us,
    processor_cpu_split,
    ratio,
    stat_delta,
)
from bench.report import render_markdown


def test_cpu_seconds_adds_system_and_user_time() -> None:
    info = {"used_cpu_sys": 1.25, "used_cpu_user": "2.5", "used_cpu_sys_children": 9.0}
    assert cpu_seconds(info) == pytest.approx(3.75)


def test_command_stats_reads_parsed_and_raw_replies() -> None:
    parsed = {
        "cmdstat_evalsha": {"calls": 3, "usec": 40, "usec_per_call": 13.3},
        "cmdstat_ZADD": {"calls": 7, "usec": 9},
        "errorstat_ERR": {"count": 1},
    }
    assert command_stats(parsed) == {"evalsha": (3, 40), "zadd": (7, 9)}
    raw = {"cmdstat_set": "calls=5,usec=11,usec_per_call=2.20,rejected_calls=0"}
    assert command_stats(raw) == {"set": (5, 11)}


def test_stat_delta_counts_a_command_that_first_ran_between_the_two() -> None:
    before = {"evalsha": (3, 40)}
    after = {"evalsha": (10, 140), "hset": (4, 8)}
    assert stat_delta(before, after, "evalsha") == (7, 100)
    assert stat_delta(before, after, "hset") == (4, 8)
    assert stat_delta(before, after, "zadd") == (0, 0)


def test_command_breakdown_is_per_entry_most_time_first_without_info() -> None:
    before = {"evalsha": (1, 10), "info": (1, 5)}
    after = {"evalsha": (3, 110), "expire": (12, 30), "info": (4, 50), "zadd": (2, 60)}
    rows = command_breakdown(before, after, entries=4)
    assert [r["command"] for r in rows] == ["evalsha", "zadd", "expire"]
    assert rows[0]["calls_per_entry"] == pytest.approx(0.5)
    assert rows[0]["usec_per_entry"] == pytest.approx(25)
    assert rows[2]["calls_per_entry"] == pytest.approx(3)
    assert command_breakdown(before, after, entries=4, top=1) == rows[:1]


def test_per_entry_and_ratio_have_no_value_without_a_denominator() -> None:
    assert per_entry_us(0.5, 1_000) == pytest.approx(500)
    assert per_entry_us(0.5, 0) is None
    assert ratio(6.0, 2.0) == pytest.approx(3.0)
    assert ratio(None, 2.0) is None
    assert ratio(1.0, 0.0) is None


def test_the_processor_split_charges_notifications_what_timelines_do_not_explain() -> None:
    without = {"redis_cpu_s": 1.0, "timeline_inserts": 200_000, "notifications": 0}
    with_ = {"redis_cpu_s": 1.5, "timeline_inserts": 100_000, "notifications": 5_000}
    split = processor_cpu_split(without, with_)
    assert split["redis_cpu_us_per_timeline_insert"] == pytest.approx(5.0)
    # 1.5 s - 100,000 x 5 µs = 1.0 s over 5,000 notifications
    assert split["redis_cpu_us_per_notification"] == pytest.approx(200.0)
    assert split["ratio_cpu"] == pytest.approx(40.0)
    assert processor_cpu_split(without, {**with_, "notifications": 0}) == {
        "redis_cpu_us_per_timeline_insert": pytest.approx(5.0)
    }
    assert processor_cpu_split({**without, "timeline_inserts": 0}, with_) == {
        "redis_cpu_us_per_timeline_insert": None
    }


def test_the_workload_notifies_one_to_three_users_never_the_actor() -> None:
    recipients = [f"r{n}" for n in range(20)]
    actors = [f"a{n}" for n in range(5)] + recipients  # actors may be recipients too
    stream = notify_workload(
        random.Random(1),
        prefix="x",
        activities=2_000,
        recipients=recipients,
        actors=actors,
        hot_posts=3,
        new_share=0.25,
        start_us=1_000,
        step_us=10,
    )
    assert len(stream) == 2_000
    assert len({a.activity_id for a in stream}) == 2_000
    sizes = {len(a.notify) for a in stream}
    assert sizes <= {1, 2, 3} and {1, 2} <= sizes
    for a in stream:
        assert a.actor not in a.notify
        assert len(set(a.notify)) == len(a.notify)
        assert a.notify[0] in a.object  # about a post of its first recipient, the owner
        assert [op.user for op in a.ops()] == list(a.notify)
    assert [a.ts for a in stream[:3]] == [1_000, 1_010, 1_020]
    # Most activities are about an owner's few hot posts (joining groups); a share opens new.
    fresh = sum(1 for a in stream if ":new" in a.object)
    assert 0.18 < fresh / len(stream) < 0.32
    hot = {a.object for a in stream if ":new" not in a.object}
    assert len(hot) <= len(recipients) * 3


def test_the_workload_refuses_empty_pools() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        notify_workload(random.Random(1), prefix="x", activities=1, recipients=[], actors=["a"])


def test_the_report_prints_each_ratio_as_the_quotient_of_its_figures() -> None:
    timeline = {
        "redis_cpu_us_per_entry": 2.0,
        "evalsha_us_per_entry": 2.5,
        "entries_per_script_call": 2_000.0,
        "inserts_per_s": 200_000.0,
        "activities": 100,
        "mean_followers": 50.0,
        "activities_per_batch": 200,
    }
    notes = {
        "redis_cpu_us_per_entry": 3.0,
        "evalsha_us_per_entry": 10.0,
        "entries_per_script_call": 3.0,
        "inserts_per_s": 50_000.0,
        "activities": 300,
        "recipients": 30,
        "activities_per_batch": 500,
        "commands": [
            {"command": "expire", "calls_per_entry": 2.0, "usec_per_entry": 1.5, "usec": 9}
        ],
    }
    notify = {
        "status": "ok",
        "goal_ratio": 2.0,
        "redis_cpu": {
            "timeline": timeline,
            "notify": notes,
            "ratio_cpu": ratio(3.0, 2.0),
            "ratio_evalsha": ratio(10.0, 2.5),
            "ratio_inserts_per_s": ratio(50_000.0, 200_000.0),
        },
        "processor": {
            "batch": 500,
            "rounds": 2,
            "with_notify": {"activities_per_s": 100.0, "notifications_per_s": 180.0},
            "redis_cpu_us_per_timeline_insert": 5.0,
            "redis_cpu_us_per_notification": 200.0,
            "ratio_cpu": 40.0,
        },
        "cold_inserts": {
            "users": 10,
            "groups_per_user": 20,
            "cold": {"seconds": 0.5, "ms_per_user": 50.0},
            "hot": {"seconds": 0.1, "ms_per_user": 10.0},
            "ratio_cold_to_hot": ratio(0.5, 0.1),
        },
        "reads": {
            "http_page": {"p50_ms": 1.5, "p99_ms": 4.25, "samples": 10},
            "counts_in_process": {
                "redis_cpu_us_per_call": 40.0,
                "commands": [{"command": "expire", "calls_per_entry": 6.0, "usec_per_entry": 3}],
            },
        },
    }
    text = render_markdown({"notify": notify})
    assert "| Redis CPU µs (INFO cpu, sys+user) | 2.00 | 3.00 | 1.5x |" in text
    assert "| script µs (commandstats evalsha) | 2.50 | 10.00 | 4x |" in text
    assert "| client inserts/s | 200,000 | 50,000 | 0.25x |" in text
    assert "≤ 2x Redis CPU per entry — met." in text
    assert "| `expire` | 2.00 | 1.50 |" in text
    assert "| with `notify` | 100 | n/a | 180 | n/a |" in text
    assert "5.00 µs per timeline insert" in text and "200.00 µs per" in text
    assert "timeline inserts): 40.0x." in text
    assert "| `GET /v1/notifications` | 1.50 | n/a | 4.25 | n/a | 10 |" in text
    assert "took 0.50 s (50.00 ms a user, loads included)" in text
    assert "0.10 s (10.00 ms a user): 5x." in text
    assert "| counts | 40.0 | n/a | n/a |" in text
    assert "(calls each): `expire` 6.0." in text
    notify["redis_cpu"]["ratio_cpu"] = 2.5
    assert "**not met**" in render_markdown({"notify": notify})
    failed = render_markdown({"notify": {"status": "failed", "error": "boom"}})
    assert "Status: **failed** — boom" in failed
