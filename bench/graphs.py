"""Follow graphs for the bench: deterministic, loaded into Cassandra, shared with the peers.

Two shapes (``uniform`` and ``skewed``):

* **uniform** — every user has exactly ``followers`` followers, drawn at random (never the user);
  every activity fans out to the same number of timelines.
* **skewed** — user of rank ``r`` (1-based; user ``u0`` has rank 1) has
  ``max(min_followers, int(top / r ** exponent))`` followers: a Zipf-like (power-law) head with a
  few accounts over 10,000 followers and a long tail.

Follower lists are a pure function of ``(seed, user)``, so the bench process, the workers (through
Cassandra) and the peer's process (through a JSON file) all see the same graph. Only the lists of
users who post are materialised and loaded (the fan-out reads nothing else); :meth:`stats` still
describes the whole graph.

Actor sequences: actors are drawn uniformly at random from all users; on the skewed graph every
"hot" account (over ``hot_threshold`` followers) also posts ``hot_posts`` times, at evenly spaced
positions starting at the first one, so any prefix of the sequence has its share of hot posts.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["FollowGraph", "load_followers", "skewed_graph", "uniform_graph", "user_id"]


def user_id(index: int, prefix: str = "u") -> str:
    """The project's user id of graph user ``index`` (the peer uses the bare integer).

    Each graph has its own prefix, so two graphs loaded into one ``followers`` table never mix.
    """
    return f"{prefix}{index}"


@dataclass
class FollowGraph:
    name: str
    users: int
    counts: list[int]
    seed: int
    hot_threshold: int
    hot_posts: int = 0
    description: str = ""
    prefix: str = "u"
    _cache: dict[int, list[int]] = field(default_factory=dict, repr=False)

    def followers(self, user: int) -> list[int]:
        """Follower indexes of ``user`` (deterministic, cached)."""
        cached = self._cache.get(user)
        if cached is not None:
            return cached
        count = self.counts[user]
        rng = random.Random(self.seed * 1_000_003 + user)
        picked = rng.sample(range(self.users), min(self.users, count + 1))
        result = [f for f in picked if f != user][:count]
        self._cache[user] = result
        return result

    def user(self, index: int) -> str:
        """The project's user id of graph user ``index``."""
        return user_id(index, self.prefix)

    def hot_accounts(self) -> list[int]:
        return [u for u, c in enumerate(self.counts) if c >= self.hot_threshold]

    def actors(self, n: int, seed: int) -> list[int]:
        """``n`` actors: uniform at random, plus the hot accounts' posts spread evenly."""
        rng = random.Random(seed)
        sequence = [rng.randrange(self.users) for _ in range(n)]
        hot = [u for u in self.hot_accounts() for _ in range(self.hot_posts)]
        if hot and n > 0:
            rng.shuffle(hot)
            hot = hot[:n]
            step = n / len(hot)
            for j, user in enumerate(hot):
                sequence[int(j * step)] = user
        return sequence

    def fanout_of(self, actors: Sequence[int]) -> int:
        """Timeline inserts the actor sequence causes (sum of follower counts)."""
        return sum(self.counts[a] for a in actors)

    def stats(self) -> dict[str, Any]:
        ordered = sorted(self.counts)
        edges = sum(ordered)
        return {
            "name": self.name,
            "description": self.description,
            "users": self.users,
            "edges": edges,
            "mean_followers": edges / self.users if self.users else 0.0,
            "median_followers": ordered[len(ordered) // 2] if ordered else 0,
            "p99_followers": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
            if ordered
            else 0,
            "max_followers": ordered[-1] if ordered else 0,
            "accounts_over_10k": sum(1 for c in ordered if c > 10_000),
            "hot_threshold": self.hot_threshold,
            "hot_accounts": len(self.hot_accounts()),
        }

    def write_peer_file(self, path: Path, actors: Sequence[int]) -> None:
        """The graph restricted to ``actors`` as JSON (for the peer's own interpreter)."""
        distinct = sorted(set(actors))
        payload = {
            "name": self.name,
            "users": self.users,
            "actors": list(actors),
            "followers": {str(a): self.followers(a) for a in distinct},
        }
        path.write_text(json.dumps(payload, separators=(",", ":")))


def uniform_graph(users: int, followers: int, seed: int = 1) -> FollowGraph:
    if followers >= users:
        raise ValueError("followers must be fewer than users")
    return FollowGraph(
        name="uniform",
        users=users,
        counts=[followers] * users,
        seed=seed,
        hot_threshold=followers + 1,
        description=f"{users:,} users, {followers} followers each",
        prefix="u",
    )


def skewed_graph(
    users: int,
    top: int,
    exponent: float,
    *,
    min_followers: int = 10,
    hot_threshold: int = 10_000,
    hot_posts: int = 1,
    seed: int = 2,
) -> FollowGraph:
    counts = [
        min(users - 1, max(min_followers, int(top / (rank**exponent))))
        for rank in range(1, users + 1)
    ]
    return FollowGraph(
        name="skewed",
        users=users,
        counts=counts,
        seed=seed,
        hot_threshold=hot_threshold,
        hot_posts=hot_posts,
        description=(
            f"{users:,} users, Zipf-like follower counts (top {top:,}, exponent {exponent}, "
            f"min {min_followers})"
        ),
        prefix="z",
    )


def _rows(
    graph: FollowGraph, actors: Sequence[int], per_batch: int
) -> Iterator[tuple[str, list[str]]]:
    for actor in sorted(set(actors)):
        followers = [graph.user(f) for f in graph.followers(actor)]
        for start in range(0, len(followers), per_batch):
            yield graph.user(actor), followers[start : start + per_batch]


def load_followers(
    session: Any,
    keyspace: str,
    graph: FollowGraph,
    actors: Sequence[int],
    *,
    per_batch: int = 200,
    concurrency: int = 32,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Write the follower lists of ``actors`` into ``<keyspace>.followers``.

    One UNLOGGED batch per ``per_batch`` followers of one user (a single partition: one mutation),
    ``concurrency`` batches in flight. Nothing else is written (no graph-version bumps, no
    ``following`` rows: the fan-out reads only ``followers``).
    """
    from cassandra.concurrent import execute_concurrent
    from cassandra.query import BatchStatement, BatchType

    insert = session.prepare(f"INSERT INTO {keyspace}.followers (user_id, follower) VALUES (?, ?)")
    started = time.perf_counter()
    rows = 0

    def statements() -> Iterator[tuple[Any, Any]]:
        nonlocal rows
        for user, chunk in _rows(graph, actors, per_batch):
            batch = BatchStatement(batch_type=BatchType.UNLOGGED)
            for follower in chunk:
                batch.add(insert, (user, follower))
            rows += len(chunk)
            if progress is not None:
                progress(len(chunk))
            yield batch, None

    execute_concurrent(session, statements(), concurrency=concurrency, raise_on_first_error=True)
    seconds = time.perf_counter() - started
    return {
        "rows": rows,
        "users": len(set(actors)),
        "seconds": seconds,
        "rows_per_s": rows / seconds if seconds > 0 else 0.0,
    }
