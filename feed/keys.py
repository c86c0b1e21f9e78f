"""Redis key and channel names: the one module that spells them.

Every per-user key carries the user id as a Redis Cluster hash tag (``{uid}``), so all of one
user's keys live in one slot. No other module (nor any script in ``feed/lua/``) writes a key
prefix: the stores build names here and hand them to the scripts through ``KEYS`` (channels
through ``ARGV``), and ``tests/unit/feed/test_keys.py`` fails on a prefix literal elsewhere.
The groups at the end (:func:`fanout_user_key`, ...) are the per-user or per-activity ``KEYS``
of the multi-user scripts, in the order those scripts read them. One exception, measured: on one
Redis the fan-out declares one key per user and names the user's other keys from its hash tag
(:data:`FANOUT_USER_PREFIXES`); on a cluster it declares all four (:func:`fanout_cluster_keys`).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Self

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

__all__ = [
    "CONTROL_FOLLOWING",
    "DEFAULT",
    "DEFAULT_TENANT",
    "DELETED_BUCKETS",
    "FANOUT_USER_PREFIXES",
    "SCOPE_SEPARATOR",
    "Keyspace",
    "KeyspaceView",
    "active",
    "activity_keys",
    "actor_channel",
    "big_accounts",
    "body",
    "body_pattern",
    "channel",
    "claim",
    "connections",
    "deferred_waiting",
    "deleted",
    "deleted_copies",
    "deleted_on_cluster",
    "deliveries",
    "fanout_cluster_keys",
    "fanout_user_key",
    "following_version",
    "graph_version",
    "idempotency",
    "notify_data",
    "notify_groups",
    "notify_items",
    "notify_keys",
    "notify_pending",
    "of_principal",
    "outbox",
    "presence",
    "principal_actor_channel",
    "principal_channel",
    "principal_of",
    "principal_parts",
    "rate_connect_ip",
    "rate_connect_user",
    "rate_fanout",
    "rate_ingest",
    "rebuilding",
    "remove_user_keys",
    "timeline",
]


def timeline(user: str) -> str:
    """Sorted set: the user's hot timeline (members are order keys, scores all 0)."""
    return f"tl:{{{user}}}"


def presence(user: str) -> str:
    """Hash ``e`` (epoch) / ``s`` (last seq): exists while the user is connected or resumable."""
    return f"on:{{{user}}}"


def deliveries(user: str) -> str:
    """Stream of the user's recent frames, ids ``<seq>-0``: what a resume replays."""
    return f"dl:{{{user}}}"


def channel(user: str) -> str:
    """Pub/Sub channel carrying the user's frames to the gateways where the user is connected."""
    return f"u:{{{user}}}"


def body(activity_id: str) -> str:
    """String: an activity's canonical JSON, stored once however many timelines hold it."""
    return f"a:{activity_id}"


def claim(activity_id: str) -> str:
    """String (the actor, with a short TTL): the id is being created by that actor right now.
    Serialises the first creates of one id across workers until the durable activity row exists
    (``fanout.processor``); deleted once that row is written."""
    return f"c:{activity_id}"


def deleted(activity_id: str) -> str:
    """Exists (TTL ``FEED_BODY_TTL_DAYS``) once the activity was deleted: a cache of the durable
    ``deleted`` flag in Cassandra that the Redis scripts check atomically, so a fan-out, rebuild
    or body re-cache that read the activity before the delete never writes it back."""
    return f"d:{activity_id}"


#: Copies of each deleted marker on a Redis Cluster (:func:`deleted_on_cluster`), one per
#: bucket. A multiple of 3, 4, 6, 8 and 12: each bucket's tag lies in its own 24th of the
#: slots, so masters that split the slots evenly hold as many buckets each.
DELETED_BUCKETS = 24


def _bucket_tags(buckets: int) -> tuple[str, ...]:
    """Per bucket, the first tag ``d<n>`` whose slot lies in the bucket's share of the slots."""
    found: dict[int, str] = {}
    n = 0
    while len(found) < buckets:
        bucket = key_slot(f"d{n}".encode()) * buckets // REDIS_CLUSTER_HASH_SLOTS
        found.setdefault(bucket, f"d{n}")
        n += 1
    return tuple(found[b] for b in range(buckets))


_BUCKET_TAGS = _bucket_tags(DELETED_BUCKETS)


def deleted_on_cluster(activity_id: str, bucket: int) -> str:
    """:func:`deleted` on a Redis Cluster, its copy in ``bucket``: ``d:{<bucket tag>}<id>``.
    The marker cannot share its readers' slot (they are many users), so the writers read it
    apart from their scripts (``feed.timelines_cluster``). A delete sets the copy in every one
    of the :data:`DELETED_BUCKETS` buckets, and a reader reads one bucket: a batch's markers are
    one ``MGET`` on one node, whatever the batch, and the readers take the buckets in turn, so
    the nodes share the reads (docs/benchmarks.md). One Redis keeps :func:`deleted`: its
    scripts read the marker atomically, and a rename would hide the markers a rolling upgrade
    finds from the new workers."""
    return f"d:{{{_BUCKET_TAGS[bucket]}}}{activity_id}"


def deleted_copies(activity_id: str) -> list[str]:
    """Every copy of :func:`deleted_on_cluster`: what a delete sets on a Redis Cluster."""
    return [deleted_on_cluster(activity_id, bucket) for bucket in range(DELETED_BUCKETS)]


def graph_version(user: str) -> str:
    """Version of the user's followers, ``<changes>.<random token>`` (``feed.versions``): set
    anew on every change, never repeated (invalidates the workers' follower caches)."""
    return f"gv:{{{user}}}"


def active(user: str) -> str:
    """Exists (with a TTL of ``FEED_ACTIVE_DAYS``) while the user is active: only active users'
    timelines are kept in Redis; the others are written to Cassandra only."""
    return f"seen:{{{user}}}"


def rebuilding(user: str) -> str:
    """Exists while the user's Redis timeline is being rebuilt from Cassandra (reads bypass it)."""
    return f"rb:{{{user}}}"


def following_version(user: str) -> str:
    """Version of whom the user follows, ``<changes>.<random token>`` (``feed.versions``): set
    anew on every change, never repeated (invalidates the gateways' large-followee caches)."""
    return f"fv:{{{user}}}"


def outbox(user: str) -> str:
    """Sorted set: the newest activities of a large account (read-time merge source)."""
    return f"ob:{{{user}}}"


def actor_channel(user: str) -> str:
    """Pub/Sub channel of a large account's new activities, for gateways with followers online."""
    return f"ac:{{{user}}}"


#: Published on a user's channel when whom they follow changed. Gateways act on it (re-read which
#: actor channels to follow) and never forward it to clients: it carries no delivery cursor.
CONTROL_FOLLOWING = b'{"type":"_following"}'

#: Set of the accounts fanned out at read time (more than FEED_FANOUT_LIMIT followers). Sticky.
big_accounts = "big-accounts"


def idempotency(key_digest: str) -> str:
    """String (JSON, with a TTL): the stored answer of an ingest request, by the sha256 hex digest
    of its ``Idempotency-Key`` header (never the key itself)."""
    return f"idem:{key_digest}"


def rate_ingest(token_digest: str) -> str:
    """Hash: the ingest token bucket of one ingest token, by a digest of the token (never the
    token)."""
    return f"rl:ingest:{token_digest}"


def connections() -> str:
    """Sorted set: a tenant's live WebSocket connections across gateways, by connection id,
    scored by when each admission lapses (``feed/lua/conn_admit.lua``): its connection quota."""
    return "conns"


def rate_fanout() -> str:
    """Hash: a tenant's fan-out token bucket (its activities fanned out per second). Hash tag
    ``{q}``: one script reads it with :func:`deferred_waiting` (one slot on a Redis Cluster)."""
    return "rl:fanout:{q}"


def deferred_waiting() -> str:
    """String (a count, with a TTL): a tenant's records waiting in the deferral topic, over its
    fan-out rate (``fanout.quota``): while any wait, its new records go after them."""
    return "defer:waiting:{q}"


def rate_connect_user(user: str) -> str:
    """Hash: the WebSocket connect token bucket of one user."""
    return f"rl:connect:user:{{{user}}}"


def rate_connect_ip(ip: str) -> str:
    """Hash: the WebSocket connect token bucket of one client address (at most 64 characters)."""
    return f"rl:connect:ip:{ip[:64]}"


def notify_data(user: str) -> str:
    """Hash: the user's notification feed (items, group headers, open groups, actors' newest
    times, the counts, the loaded marker): ``feed/lua/notify.lua`` says what each field holds."""
    return f"nd:{{{user}}}"


def notify_groups(user: str) -> str:
    """Sorted set: the user's notification group ids, scored by their newest activity's time."""
    return f"ng:{{{user}}}"


def notify_items(user: str) -> str:
    """Sorted set (lex): each group's activities in time order (and so its actors)."""
    return f"ni:{{{user}}}"


def notify_pending(user: str) -> str:
    """List: the user's notification mutations not yet confirmed written to Cassandra."""
    return f"np:{{{user}}}"


@functools.lru_cache(maxsize=1 << 14)
def notify_keys(user: str) -> tuple[str, ...]:
    """The ``KEYS`` of ``feed/lua/notify.lua`` for one user, in its order: data, groups, items,
    pending, presence. One slot (the user's hash tag)."""
    return (
        notify_data(user),
        notify_groups(user),
        notify_items(user),
        notify_pending(user),
        presence(user),
    )


def body_pattern() -> str:
    """``SCAN`` pattern matching every activity body key (:func:`body`): for tools and benches."""
    return body("*")


def activity_keys(activity_id: str) -> tuple[str, str]:
    """An activity's (deleted marker, body): its ``KEYS`` in the fan-out, outbox, rebuild and
    body-cache scripts."""
    return deleted(activity_id), body(activity_id)


@functools.lru_cache(maxsize=1 << 16)
def fanout_user_key(user: str) -> bytes:
    """The one ``KEYS`` entry per user of ``feed/lua/fanout.lua``: the user's timeline, encoded
    and cached (the fan-out is the hot path, and a worker fans out to the same followers again
    and again). The script builds the user's other keys from its hash tag and
    :data:`FANOUT_USER_PREFIXES`: see that."""
    return timeline(user).encode()


#: The prefixes ``feed/lua/fanout.lua`` gets in ``ARGV`` to name a user's other keys and channel
#: from the hash tag ``{uid}`` of the timeline key it was given: timeline (the declared key),
#: presence, active marker, delivery stream, channel. All of one user's keys share the tag, so
#: they live in the declared key's slot (also on a Redis Cluster). Declaring all four keys per
#: user in ``KEYS`` instead cost the worker a quarter of its fan-out rate (feed bench fanout,
#: redis_only: docs/benchmarks.md), as every argument is packed, sent and parsed per user.
FANOUT_USER_PREFIXES: tuple[str, ...] = tuple(
    name("").removesuffix("{}") for name in (timeline, presence, active, deliveries, channel)
)


@functools.lru_cache(maxsize=1 << 16)
def fanout_cluster_keys(user: str) -> tuple[bytes, bytes, bytes, bytes]:
    """The four ``KEYS`` per user of ``feed/lua/fanout.lua`` on a Redis Cluster: timeline,
    presence, active marker, delivery stream (its offline-only mode ``u`` declares the first
    three: it never writes the stream). The script names them from the timeline's tag as on
    one Redis, but a cluster must see every key a script touches: while a slot migrates
    (a resharding), a key already moved must send the call to the importing node (``ASK``, or
    ``TRYAGAIN`` while the user's keys are split), not be read as missing on the old one."""
    return (
        timeline(user).encode(),
        presence(user).encode(),
        active(user).encode(),
        deliveries(user).encode(),
    )


def remove_user_keys(user: str) -> tuple[str, str, str]:
    """A user's (timeline, presence, delivery stream): the three ``KEYS`` per user of
    ``feed/lua/remove.lua``."""
    return timeline(user), presence(user), deliveries(user)


class Keyspace:
    """Every name above, for one tenant (``docs/tenants.md``): the ``default`` tenant's are the
    names above, byte for byte (:data:`DEFAULT`); another tenant's are the same names prefixed
    with ``t:<tenant>:`` (``t:acme:tl:{u1}``), so two tenants' user ``u1`` share nothing, and one
    ``SCAN MATCH t:acme:*`` finds all of a tenant's keys. The hash tag stays the user's, so a
    user's keys keep sharing a slot on a Redis Cluster. No default name starts with ``t:``.

    The stores hold one and build every name through it; :meth:`for_tenant` gives each
    tenant's (cached)."""

    __slots__ = ("fanout_cluster_keys", "fanout_prefixes", "fanout_user_key", "prefix")

    def __init__(self, prefix: str = "") -> None:
        #: ``""`` for the default tenant, else ``t:<tenant>:``.
        self.prefix = prefix
        #: :data:`FANOUT_USER_PREFIXES` with this keyspace's prefix.
        self.fanout_prefixes: tuple[str, ...] = tuple(prefix + p for p in FANOUT_USER_PREFIXES)
        # The fan-out's per-user KEYS (:func:`fanout_user_key`, :func:`fanout_cluster_keys`),
        # cached per keyspace as the module's are, and attributes rather than methods: the
        # fan-out calls one per user (its hot path), and the default's are the module's own.
        self.fanout_user_key: Callable[[str], bytes] = (
            fanout_user_key if not prefix else functools.lru_cache(maxsize=1 << 14)(self._user_key)
        )
        self.fanout_cluster_keys: Callable[[str], tuple[bytes, bytes, bytes, bytes]] = (
            fanout_cluster_keys
            if not prefix
            else functools.lru_cache(maxsize=1 << 14)(self._cluster_keys)
        )

    @staticmethod
    @functools.lru_cache(maxsize=1024)
    def for_tenant(tenant: str) -> Keyspace:
        """The tenant's keyspace (``tenant`` already validated: ``feed.tenants``)."""
        return DEFAULT if tenant == DEFAULT_TENANT else Keyspace(f"t:{tenant}:")

    def __repr__(self) -> str:
        return f"Keyspace({self.prefix!r})"

    def timeline(self, user: str) -> str:
        return self.prefix + timeline(user)

    def presence(self, user: str) -> str:
        return self.prefix + presence(user)

    def deliveries(self, user: str) -> str:
        return self.prefix + deliveries(user)

    def channel(self, user: str) -> str:
        return self.prefix + channel(user)

    def body(self, activity_id: str) -> str:
        return self.prefix + body(activity_id)

    def claim(self, activity_id: str) -> str:
        return self.prefix + claim(activity_id)

    def deleted(self, activity_id: str) -> str:
        return self.prefix + deleted(activity_id)

    def deleted_on_cluster(self, activity_id: str, bucket: int) -> str:
        return self.prefix + deleted_on_cluster(activity_id, bucket)

    def deleted_copies(self, activity_id: str) -> list[str]:
        return [self.prefix + name for name in deleted_copies(activity_id)]

    def graph_version(self, user: str) -> str:
        return self.prefix + graph_version(user)

    def active(self, user: str) -> str:
        return self.prefix + active(user)

    def rebuilding(self, user: str) -> str:
        return self.prefix + rebuilding(user)

    def following_version(self, user: str) -> str:
        return self.prefix + following_version(user)

    def outbox(self, user: str) -> str:
        return self.prefix + outbox(user)

    def actor_channel(self, user: str) -> str:
        return self.prefix + actor_channel(user)

    @property
    def big_accounts(self) -> str:
        return self.prefix + big_accounts

    def idempotency(self, key_digest: str) -> str:
        return self.prefix + idempotency(key_digest)

    def rate_ingest(self, token_digest: str) -> str:
        return self.prefix + rate_ingest(token_digest)

    def connections(self) -> str:
        return self.prefix + connections()

    def rate_fanout(self) -> str:
        return self.prefix + rate_fanout()

    def deferred_waiting(self) -> str:
        return self.prefix + deferred_waiting()

    def rate_connect_user(self, user: str) -> str:
        return self.prefix + rate_connect_user(user)

    def notify_data(self, user: str) -> str:
        return self.prefix + notify_data(user)

    def notify_groups(self, user: str) -> str:
        return self.prefix + notify_groups(user)

    def notify_items(self, user: str) -> str:
        return self.prefix + notify_items(user)

    def notify_pending(self, user: str) -> str:
        return self.prefix + notify_pending(user)

    def notify_keys(self, user: str) -> tuple[str, ...]:
        if not self.prefix:
            return notify_keys(user)
        return tuple(self.prefix + k for k in notify_keys(user))

    def body_pattern(self) -> str:
        return self.body("*")

    def activity_keys(self, activity_id: str) -> tuple[str, str]:
        return self.deleted(activity_id), self.body(activity_id)

    def remove_user_keys(self, user: str) -> tuple[str, str, str]:
        return self.timeline(user), self.presence(user), self.deliveries(user)

    def _user_key(self, user: str) -> bytes:
        return self.timeline(user).encode()

    def _cluster_keys(self, user: str) -> tuple[bytes, bytes, bytes, bytes]:
        p = self.prefix.encode()
        return tuple(p + k for k in fanout_cluster_keys(user))  # type: ignore[return-value]


#: The ``default`` tenant's id (``feed.tenants.DEFAULT``: defined here, as the stores need it and
#: ``feed.tenants`` builds on this module).
DEFAULT_TENANT = "default"
#: Between a tenant's id and a value in a Cassandra partition key (``feed.cql.TenantPartitions``)
#: and in the gateway's principals. No valid id holds it (ids refuse every control character:
#: ``schemas.activity``), so a scoped value can never be forged from an id.
SCOPE_SEPARATOR = "\x1f"
#: The ``default`` tenant's keyspace: the module's names.
DEFAULT = Keyspace()


def of_principal(principal: str) -> tuple[Keyspace, str]:
    """A gateway principal's (keyspace, user id): a user id for the ``default`` tenant, else
    ``<tenant>\x1f<user>`` (``gateway.tenancy``; no valid id holds the separator)."""
    if SCOPE_SEPARATOR not in principal:
        return DEFAULT, principal
    tenant, _, user = principal.partition(SCOPE_SEPARATOR)
    return Keyspace.for_tenant(tenant), user


def principal_parts(principal: str) -> tuple[str, str]:
    """A gateway principal's (tenant, id): ``("default", principal)`` without a separator."""
    if SCOPE_SEPARATOR not in principal:
        return DEFAULT_TENANT, principal
    tenant, _, value = principal.partition(SCOPE_SEPARATOR)
    return tenant, value


def principal_of(tenant: str, value: str) -> str:
    """The principal of ``value`` (a user or actor id) in ``tenant``: :func:`principal_parts`
    undone."""
    return value if tenant == DEFAULT_TENANT else tenant + SCOPE_SEPARATOR + value


def principal_actor_channel(principal: str) -> str:
    """The actor channel of a large account's principal (:func:`of_principal`)."""
    if SCOPE_SEPARATOR not in principal:
        return actor_channel(principal)
    k, actor = of_principal(principal)
    return k.actor_channel(actor)


def principal_channel(principal: str) -> str:
    """The Pub/Sub channel of a gateway principal (:func:`of_principal`)."""
    if SCOPE_SEPARATOR not in principal:
        return channel(principal)
    k, user = of_principal(principal)
    return k.channel(user)


class KeyspaceView:
    """A store that names its keys through ``self._k`` (the ``default`` tenant's unless it is a
    :meth:`for_tenant` view). A view shares everything else (client, scripts, settings)."""

    _k: Keyspace = DEFAULT

    def for_tenant(self, tenant: str) -> Self:
        """The same store, for ``tenant``'s keys (``tenant`` already validated)."""
        view = copy.copy(self)
        view._k = Keyspace.for_tenant(tenant)
        return view
