"""Physical ceilings, measured on the same servers in the same run (INFRA.md's references).

* Redis: ``redis-benchmark -P 64 -t zadd -r 100000`` ops/s against the bench's Redis (pipelined
  ZADD of random members into one sorted set: the most a single Redis core does for this
  command). ``-r`` matters: without it every ZADD rewrites the same member (about 1.8 M/s here,
  not an insert at all); with ``-r 100000`` it gives INFRA.md's ~0.5 M/s.
* Cassandra: rows/s of UNLOGGED batches of 100 rows, one row per partition (the shape of the
  fan-out's timeline rows), through the Python driver with ``execute_concurrent(concurrency=32)``.
  Building the statements is inside the timing, since every client pays for it.
"""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

__all__ = ["CeilingError", "cassandra_batch_ceiling", "find_redis_benchmark", "redis_zadd_ceiling"]


class CeilingError(RuntimeError):
    """A reference could not be measured (tool missing, failed or timed out)."""


def find_redis_benchmark(redis_server: str | Path | None = None) -> str | None:
    """``redis-benchmark`` on PATH, else beside the Redis server binary (or valkey-benchmark)."""
    for name in ("redis-benchmark", "valkey-benchmark"):
        found = shutil.which(name)
        if found:
            return found
    if redis_server is not None:
        for name in ("redis-benchmark", "valkey-benchmark"):
            candidate = Path(redis_server).parent / name
            if candidate.is_file():
                return str(candidate)
    return None


def redis_zadd_ceiling(
    port: int, requests: int, *, redis_server: str | Path | None = None, timeout: float = 120.0
) -> dict[str, Any]:
    """Run ``redis-benchmark -h 127.0.0.1 -p PORT -P 64 -t zadd -r 100000 -n N --csv``; ops/s."""
    binary = find_redis_benchmark(redis_server)
    if binary is None:
        raise CeilingError(
            "redis-benchmark not found (Debian: apt-get install redis-tools or redis-server)"
        )
    # Note the port flag: -p (lower case); -P is the pipeline depth.
    argv = [
        binary,
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-P",
        "64",
        "-t",
        "zadd",
        "-r",
        "100000",
        "-n",
        str(requests),
        "--csv",
    ]
    started = time.perf_counter()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise CeilingError(f"redis-benchmark timed out after {timeout}s") from None
    if done.returncode != 0:
        raise CeilingError(f"redis-benchmark failed ({done.returncode}): {done.stderr[-500:]}")
    ops = _parse_csv(done.stdout, "ZADD")
    return {
        "ops_per_s": ops,
        "requests": requests,
        "seconds": time.perf_counter() - started,
        "command": " ".join(["redis-benchmark", *argv[1:]]),
    }


def _parse_csv(text: str, test: str) -> float:
    for row in csv.reader(io.StringIO(text)):
        if len(row) >= 2 and row[0].strip().upper() == test:
            try:
                return float(row[1])
            except ValueError:
                continue
    raise CeilingError(f"no {test} line in redis-benchmark output: {text[-300:]!r}")


def cassandra_batch_ceiling(
    session: Any, keyspace: str, rows: int, *, batch_rows: int = 100, concurrency: int = 32
) -> dict[str, Any]:
    """Rows/s of UNLOGGED batches (one row per partition) into a table shaped like the timeline."""
    from cassandra.concurrent import execute_concurrent
    from cassandra.query import BatchStatement, BatchType

    table = f"{keyspace}.bench_ceiling"
    session.execute(
        f"CREATE TABLE IF NOT EXISTS {table} (user_id text, ts bigint, id text, actor text, "
        "PRIMARY KEY ((user_id), ts, id)) WITH CLUSTERING ORDER BY (ts DESC, id DESC)",
        timeout=60,
    )
    insert = session.prepare(f"INSERT INTO {table} (user_id, ts, id, actor) VALUES (?, ?, ?, ?)")

    def run(prefix: str, count: int) -> float:
        def statements() -> Any:
            ts = int(time.time() * 1_000_000)
            for start in range(0, count, batch_rows):
                batch = BatchStatement(batch_type=BatchType.UNLOGGED)
                for i in range(start, min(count, start + batch_rows)):
                    batch.add(insert, (f"{prefix}{i}", ts + i, f"{prefix}-a{i}", "ceiling"))
                yield batch, None

        started = time.perf_counter()
        execute_concurrent(
            session, statements(), concurrency=concurrency, raise_on_first_error=True
        )
        return time.perf_counter() - started

    run("w", max(batch_rows, rows // 10))  # warm-up (JIT, connections), not counted
    seconds = run("c", rows)
    session.execute(f"TRUNCATE {table}", timeout=60)
    return {
        "rows_per_s": rows / seconds if seconds > 0 else 0.0,
        "rows": rows,
        "seconds": seconds,
        "batch_rows": batch_rows,
        "concurrency": concurrency,
        "method": "UNLOGGED batches, one row per partition, execute_concurrent through the driver",
    }
