"""The bench's switches: read once, by one module, with errors that name the variable.

:mod:`bench.options` is the bench's only reader of the environment (a bad value stops
``feed bench`` before any server starts); these tests need no servers.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest

from bench import run_bench
from bench.context import plan_for
from bench.gateway import plan_for as gateway_plan_for
from bench.options import (
    FANOUT_PHASES,
    BenchOptions,
    BenchOptionsError,
    client_jwt_secret,
)

BENCH = Path(__file__).resolve().parents[3] / "bench"


def test_unset_or_empty_variables_mean_the_defaults() -> None:
    blank = {name: " " for name in ("FEED_BENCH_BACKLOG", "FEED_BENCH_PHASES", "FEED_BENCH_KEEP")}
    for environ in ({}, blank):
        options = BenchOptions.from_env(environ)
        assert options == BenchOptions()
        assert options.phases is None and options.gateway_rates is None
        assert not options.skip_peers and not options.keep and options.workdir is None


def test_every_switch_is_parsed() -> None:
    options = BenchOptions.from_env(
        {
            "FEED_BENCH_SKIP_PEERS": "1",
            "FEED_BENCH_PROFILE": "true",
            "FEED_BENCH_KEEP": "YES",
            "FEED_BENCH_E2E_HISTORY": "on",
            "FEED_BENCH_WORKDIR": "/tmp/bench-work",
            "FEED_BENCH_BACKLOG": "20000",
            "FEED_BENCH_E2E_RATE": "250",
            "FEED_BENCH_SOAK_S": "30.5",
            "FEED_BENCH_PHASES": "redis_only, history",
            "FEED_BENCH_GATEWAY_RATES": "8000,10000",
            "FEED_BENCH_GATEWAY_SIDES": "peer",
            "FEED_BENCH_GATEWAY_BURN_US": "36.5",
            "FEED_BENCH_TRACING": "0.1",
            "FEED_BENCH_REDIS_CLUSTER": "1",
        }
    )
    assert options.skip_peers and options.profile and options.keep and options.e2e_history
    assert options.redis_cluster
    assert options.workdir == Path("/tmp/bench-work")
    assert options.backlog == 20_000
    assert options.e2e_rate == 250.0
    assert options.soak_s == 30.5
    assert options.phases == frozenset({"redis_only", "history"})
    assert options.gateway_rates == (8000, 10000)
    assert options.gateway_sides == ("peer",)
    assert options.gateway_burn_us == 36.5
    assert options.tracing == 0.1


def test_false_flags_are_false() -> None:
    for raw in ("0", "false", "No", "off"):
        assert BenchOptions.from_env({"FEED_BENCH_SKIP_PEERS": raw}).skip_peers is False


def test_sizes_below_their_floor_are_raised_to_it() -> None:
    options = BenchOptions.from_env(
        {"FEED_BENCH_BACKLOG": "5", "FEED_BENCH_E2E_RATE": "0", "FEED_BENCH_SOAK_S": "1"}
    )
    assert (options.backlog, options.e2e_rate, options.soak_s) == (100, 1.0, 5.0)


@pytest.mark.parametrize(
    ("name", "raw", "says"),
    [
        ("FEED_BENCH_SKIP_PEERS", "maybe", "must be 1/true/yes/on or 0/false/no/off"),
        ("FEED_BENCH_KEEP", "2", "must be 1/true/yes/on or 0/false/no/off"),
        ("FEED_BENCH_BACKLOG", "lots", "must be an integer"),
        ("FEED_BENCH_BACKLOG", "1.5", "must be an integer"),
        ("FEED_BENCH_E2E_RATE", "fast", "must be a number"),
        ("FEED_BENCH_SOAK_S", "inf", "must be a finite number"),
        ("FEED_BENCH_SOAK_S", "nan", "must be a finite number"),
        ("FEED_BENCH_PHASES", "redis_only,warp", "unknown phase(s) warp; known: redis_only,"),
        ("FEED_BENCH_PHASES", ",", "must list phases"),
        ("FEED_BENCH_GATEWAY_RATES", "8000,fast", "must be comma-separated integers"),
        ("FEED_BENCH_GATEWAY_RATES", "8000,0", "must list rates > 0"),
        ("FEED_BENCH_GATEWAY_SIDES", "ours,theirs", "unknown side(s) theirs"),
        ("FEED_BENCH_GATEWAY_SIDES", ",", "must list sides"),
        ("FEED_BENCH_GATEWAY_BURN_US", "lots", "must be a number"),
        ("FEED_BENCH_TRACING", "0", "must be a number above 0 and at most 1"),
        ("FEED_BENCH_TRACING", "1.5", "must be a number above 0 and at most 1"),
        ("FEED_BENCH_TRACING", "some", "must be a number above 0 and at most 1"),
    ],
)
def test_a_bad_value_names_the_variable_and_what_it_accepts(name: str, raw: str, says: str) -> None:
    with pytest.raises(BenchOptionsError) as caught:
        BenchOptions.from_env({name: raw})
    message = str(caught.value)
    assert message.startswith(name), message
    assert says in message, message


def test_the_phase_error_lists_every_known_phase() -> None:
    with pytest.raises(BenchOptionsError) as caught:
        BenchOptions.from_env({"FEED_BENCH_PHASES": "warp"})
    assert str(caught.value).endswith("known: " + ", ".join(FANOUT_PHASES))


def test_children_inherit_the_environment_without_feed_and_otel_variables() -> None:
    environ = {
        "PATH": "/usr/bin",
        "HOME": "/home/u",
        "FEED_REDIS_URL": "redis://elsewhere:1/0",
        "FEED_BENCH_KEEP": "1",
        # the children's tracing is FEED_BENCH_TRACING's alone
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
        "VIRTUAL_ENV": "/venv",
        "PYTHONPATH": "/src",
        "PYTHONHOME": "/py",
    }
    options = BenchOptions.from_env(environ)
    environ["PATH"] = "changed after the read"
    assert options.inherited() == {
        "PATH": "/usr/bin",
        "HOME": "/home/u",
        "VIRTUAL_ENV": "/venv",
        "PYTHONPATH": "/src",
        "PYTHONHOME": "/py",
    }
    install = options.install_env()
    assert install["PATH"] == "/usr/bin"
    assert install["PIP_DISABLE_PIP_VERSION_CHECK"] == "1"
    assert not {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"} & set(install)


def test_the_plans_take_the_overrides() -> None:
    options = BenchOptions.from_env(
        {"FEED_BENCH_BACKLOG": "1234", "FEED_BENCH_E2E_RATE": "77", "FEED_BENCH_SOAK_S": "42"}
    )
    default = plan_for(True, BenchOptions())
    plan = plan_for(True, options)
    assert (plan.backlog, plan.e2e_rates, plan.soak_s) == (1234, (77.0,), 42.0)
    assert plan.backlog != default.backlog and plan.e2e_rates != default.e2e_rates
    assert plan.uniform_users == default.uniform_users
    assert gateway_plan_for(False, (8000,)).rates == (8000,)
    assert gateway_plan_for(False, (8000,)).extra_rates == ()
    assert gateway_plan_for(False).rates == gateway_plan_for(False, None).rates


def test_the_client_secret_is_required_and_never_shown() -> None:
    assert client_jwt_secret({"FEED_JWT_SECRET": "s3cret-value"}) == "s3cret-value"
    for environ in ({}, {"FEED_JWT_SECRET": ""}):
        with pytest.raises(BenchOptionsError, match=r"^FEED_JWT_SECRET is not set"):
            client_jwt_secret(environ)


def test_feed_bench_stops_before_starting_anything_on_a_bad_switch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = argparse.Namespace(scenario="fanout", quick=True, model=False, out=str(tmp_path / "o"))
    status = run_bench(args, {"FEED_BENCH_BACKLOG": "lots"})
    assert status == 2
    err = capsys.readouterr().err
    assert "configuration error: FEED_BENCH_BACKLOG must be an integer, got 'lots'" in err
    assert not (tmp_path / "o").exists(), "no run folder (and no stack) for a bad switch"


def _environ_reads(path: Path) -> list[int]:
    """Lines of ``path`` that touch ``os.environ`` / ``os.getenv`` outside a ``__main__`` block."""
    tree = ast.parse(path.read_text(), str(path))
    main_lines: set[int] = set()
    for statement in tree.body:
        if isinstance(statement, ast.If) and "__main__" in ast.unparse(statement.test):
            main_lines.update(
                range(statement.lineno, (statement.end_lineno or statement.lineno) + 1)
            )
    lines: list[int] = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr in {"environ", "getenv", "environb"}
            and isinstance(node.value, ast.Name)
            and node.value.id == "os"
            and node.lineno not in main_lines
        ):
            lines.append(node.lineno)
        if (
            isinstance(node, ast.ImportFrom)
            and node.module == "os"
            and {alias.name for alias in node.names} & {"environ", "getenv", "environb"}
        ):
            lines.append(node.lineno)
    return lines


def test_no_bench_module_reads_the_environment_itself() -> None:
    """Only entry points read ``os.environ``: ``feed bench`` hands it to :mod:`bench.options`,
    and a load process's ``__main__`` block hands it to its ``main``."""
    modules = sorted(BENCH.glob("*.py"))
    assert len(modules) > 10
    reads = {p.name: lines for p in modules if (lines := _environ_reads(p))}
    assert reads == {}, f"bench modules reading os.environ (file: lines): {reads}"


def test_the_e2e_sweep_takes_its_rates_and_one_history_mode() -> None:
    options = BenchOptions.from_env(
        {"FEED_BENCH_E2E_RATES": "50, 100,250.5", "FEED_BENCH_E2E_HISTORY": "0"}
    )
    assert options.e2e_rates == (50.0, 100.0, 250.5)
    assert options.e2e_history is False
    assert BenchOptions.from_env({}).e2e_history is None  # both, one after the other
    assert plan_for(False, options).e2e_rates == (50.0, 100.0, 250.5)
    assert plan_for(False, BenchOptions()).e2e_rates == (50.0, 100.0, 250.0, 500.0, 750.0)
    for raw in ("fast", "0,100", "nan", ","):
        with pytest.raises(BenchOptionsError, match="FEED_BENCH_E2E_RATES"):
            BenchOptions.from_env({"FEED_BENCH_E2E_RATES": raw})
