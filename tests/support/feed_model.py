"""The reference model of feed semantics, and the random operation sequences it is checked with.

:class:`Model` computes what every timeline must be from the final state only (who follows whom,
which posts exist, which are deleted): it is independent of the order of delivery. ``ops`` draws
sequences of follow, unfollow, post (with ``to``), delete, duplicate and no-op deliveries over
``USERS`` users, starting with a dense follow graph. The integration test applies them through the
Processor, the end-to-end test through Kafka; both compare every feed with the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from hypothesis import strategies as st

from feed.cursor import order_key

__all__ = ["T0", "USERS", "Model", "ops"]

USERS = 6
T0 = datetime(2026, 11, 1, tzinfo=UTC)


@dataclass
class Model:
    """What every timeline must be: order-independent, so it only needs the final state."""

    following: set[tuple[int, int]] = field(default_factory=set)
    posts: dict[str, tuple[int, int, frozenset[int]]] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)

    def timeline(self, user: int) -> list[str]:
        visible = [
            (order_key(ts, aid), aid)
            for aid, (actor, ts, to) in self.posts.items()
            if aid not in self.deleted and ((user, actor) in self.following or user in to)
        ]
        return [aid for _, aid in sorted(visible, reverse=True)]


initial_follows = st.lists(
    st.tuples(st.just("follow"), st.integers(0, USERS - 1), st.integers(0, USERS - 1)),
    min_size=8,
    max_size=20,
)
more_ops = st.lists(
    st.one_of(
        st.tuples(st.just("follow"), st.integers(0, USERS - 1), st.integers(0, USERS - 1)),
        st.tuples(st.just("unfollow"), st.integers(0, USERS - 1), st.integers(0, USERS - 1)),
        st.tuples(
            st.just("post"),
            st.integers(0, USERS - 1),
            st.frozensets(st.integers(0, USERS - 1), max_size=2),
            st.integers(0, 5),
        ),
        st.tuples(st.just("delete"), st.integers(0, 30)),
        st.tuples(st.just("dup"), st.integers(0, 30)),
        # a second create of a posted id by its actor, re-stamped and changed: a no-op
        st.tuples(st.just("redup"), st.integers(0, 30), st.integers(0, 5)),
        # another actor creates a posted id (id_conflict) or deletes it (forbidden): no-ops
        st.tuples(st.just("steal"), st.integers(0, 30), st.integers(0, USERS - 1)),
        st.tuples(st.just("xdelete"), st.integers(0, 30), st.integers(0, USERS - 1)),
        # a delete of an id before its actor creates it (not_found), then the create: delivered
        st.tuples(
            st.just("delete_then_post"),
            st.integers(0, USERS - 1),
            st.frozensets(st.integers(0, USERS - 1), max_size=2),
            st.integers(0, 5),
        ),
    ),
    min_size=1,
    max_size=25,
)
#: A dense follow graph first (so that, with a tiny limit, most posting actors are big), then
#: everything interleaved.
ops = st.builds(lambda a, b: a + b, initial_follows, more_ops)
