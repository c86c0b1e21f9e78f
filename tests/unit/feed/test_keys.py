"""The Redis layout has one owner: ``feed.keys`` spells every key, ``feed/lua/*.lua`` hold the
scripts (each loaded by a store), and nothing else writes a key prefix.

The scan covers the string literals of the product and tooling packages (``feed``, ``fanout``,
``gateway``, ``schemas``, ``bench``, ``infra``; f-strings included, docstrings left out: prose may
describe the layout) and the whole text of every ``.lua`` file. Tests are left out on purpose:
they may pin the layout with literals of their own, as an independent check of it.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.crc import key_slot

from feed import keys, scripts

ROOT = Path(__file__).resolve().parents[3]
PACKAGES = ("feed", "fanout", "gateway", "schemas", "bench", "infra")
LUA = ROOT / "feed" / "lua"
_SENTINEL = "\x00user"


def _prefixes() -> set[str]:
    """The first segment (``tl:``, ``rl:``, ...) of every name a one-argument function of
    ``feed.keys`` builds, and the fixed names (``big-accounts``)."""
    found = {keys.big_accounts}
    for name in keys.__all__:
        value = getattr(keys, name)
        if not callable(value):
            continue
        try:
            built = value(_SENTINEL)
        except TypeError:
            continue  # not a name of one argument (body_pattern)
        if isinstance(built, str) and _SENTINEL in built:
            found.add(built.split(":", 1)[0] + ":")
    return found


PREFIXES = _prefixes()
#: A prefix as the start of a key: not inside a longer word, and followed by a hash tag, a
#: placeholder (``<id>``, ``*``), an id character or the end of the literal.
_PREFIX_RE = re.compile(
    r"(?<![\w.:/-])(?:"
    + "|".join(re.escape(p) for p in sorted(PREFIXES, key=len, reverse=True))
    + r")(?=[{<*\w'\"])"
)


def _python_strings(source: str) -> Iterator[tuple[int, str]]:
    """(line, literal) of every string literal but the docstrings."""
    docstrings = {
        node.body[0].lineno
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
        and isinstance(node.body[0].value.value, str)
    }
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.STRING and token.start[0] not in docstrings:
            yield token.start[0], token.string


def offences(path: Path) -> list[str]:
    """``path:line: literal`` for every key-prefix literal in a ``.py`` file's strings (f-strings
    included, docstrings not) or anywhere in a ``.lua`` file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".lua":
        pieces: Iterator[tuple[int, str]] = iter(enumerate(text.splitlines(), 1))
    else:
        pieces = _python_strings(text)
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return [
        f"{shown}:{line}: {piece.strip()[:80]}"
        for line, piece in pieces
        if _PREFIX_RE.search(piece)
    ]


def _sources() -> list[Path]:
    files = [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    files = [p for p in files if "__pycache__" not in p.parts]
    return [p for p in files if p != ROOT / "feed" / "keys.py"] + sorted(LUA.glob("*.lua"))


def test_the_prefixes_are_the_ones_keys_defines() -> None:
    assert {"tl:", "on:", "dl:", "seen:", "rb:", "a:", "d:", "c:", "ob:", "u:", "ac:"} <= PREFIXES
    assert {"gv:", "fv:", "idem:", "rl:", keys.big_accounts} <= PREFIXES


@pytest.mark.parametrize(
    "snippet",
    [
        'k = f"tl:{{{user}}}"',
        "k = 'a:' + aid",
        'match = "a:*"',
        'x = 1\nhelp = "the marker (``d:<id>``)"',
        'BIG = "big-accounts"',
    ],
)
def test_the_scan_finds_a_prefix_literal(tmp_path: Path, snippet: str) -> None:
    bad = tmp_path / "probe.py"
    bad.write_text(snippet + "\n", encoding="utf-8")
    assert offences(bad), snippet
    lua = tmp_path / "probe.lua"
    lua.write_text("redis.call('GET', 'seen:{' .. ARGV[1] .. '}')\n", encoding="utf-8")
    assert offences(lua)


def test_the_scan_leaves_prose_alone() -> None:
    for text in ('"depends on: the caller"', '"a: b"', '"http://x"', '"reason: 12:30"'):
        assert not _PREFIX_RE.search(text), text


def test_no_key_prefix_outside_feed_keys() -> None:
    found = [line for path in _sources() for line in offences(path)]
    assert found == [], "key names belong to feed/keys.py:\n" + "\n".join(found)


def test_every_lua_script_is_loaded_by_a_store() -> None:
    code = "\n".join(
        p.read_text(encoding="utf-8")
        for package in PACKAGES
        for p in (ROOT / package).rglob("*.py")
        if "__pycache__" not in p.parts
    )
    loaded = set(re.findall(r"""source\(\s*["']([a-z0-9_]+)["']\s*\)""", code))
    names = {p.stem for p in LUA.glob("*.lua")}
    assert names, "no scripts found"
    assert names - loaded == set(), "scripts no store loads"
    assert loaded - names == set(), "scripts loaded but missing"
    for name in names:
        assert scripts.source(name).strip()


def test_every_lua_script_documents_its_keys_and_reads_keys_only_through_keys() -> None:
    for path in LUA.glob("*.lua"):
        text = path.read_text(encoding="utf-8")
        assert "KEYS" in text.split("\nlocal", 1)[0], f"{path.name}: no KEYS layout at its top"
        # Every key argument of redis.call is a KEYS entry or a local bound to one: no
        # concatenation builds a name.
        assert not re.search(r"redis\.call\('[A-Z]+',\s*'[^']*'\s*\.\.", text), path.name


def test_the_script_key_groups_match_the_names() -> None:
    user = "u-1"
    assert keys.fanout_user_key(user) == keys.timeline(user).encode()
    # fanout.lua names a user's other keys from the declared timeline key's hash tag
    tag = keys.timeline(user)[len(keys.FANOUT_USER_PREFIXES[0]) :]
    assert tag == "{" + user + "}"
    named = (keys.timeline, keys.presence, keys.active, keys.deliveries, keys.channel)
    assert [prefix + tag for prefix in keys.FANOUT_USER_PREFIXES] == [n(user) for n in named]
    assert keys.remove_user_keys(user) == (
        keys.timeline(user),
        keys.presence(user),
        keys.deliveries(user),
    )
    assert keys.activity_keys("a-1") == (keys.deleted("a-1"), keys.body("a-1"))
    pattern = keys.body_pattern()
    assert pattern.endswith("*") and keys.body("a-1").startswith(pattern[:-1])


def test_keys_share_a_hash_tag_per_user() -> None:
    names = [keys.timeline("u1"), keys.presence("u1"), keys.deliveries("u1"), keys.channel("u1")]
    assert all("{u1}" in n for n in names)
    assert len(set(names)) == 4
    assert keys.body("a-1") == "a:a-1"


def test_a_users_notification_keys_and_channel_are_in_one_cluster_slot() -> None:
    from redis.crc import key_slot

    for user in ("u1", "alice", "ü-42", "x" * 128):
        names = [*keys.notify_keys(user), keys.channel(user)]
        assert len(set(names)) == len(names)
        assert len({key_slot(n.encode()) for n in names}) == 1, names
    assert keys.notify_keys("u1") == (
        keys.notify_data("u1"),
        keys.notify_groups("u1"),
        keys.notify_items("u1"),
        keys.notify_pending("u1"),
        keys.presence("u1"),
    )


def test_the_default_tenants_keyspace_is_the_module_names_byte_for_byte() -> None:
    user, activity = "u1", "a1"
    k = keys.Keyspace.for_tenant(keys.DEFAULT_TENANT)
    assert k is keys.DEFAULT and k.prefix == ""
    for name in (
        "timeline",
        "presence",
        "deliveries",
        "channel",
        "graph_version",
        "active",
        "rebuilding",
        "following_version",
        "outbox",
        "actor_channel",
        "rate_connect_user",
        "notify_data",
        "notify_groups",
        "notify_items",
        "notify_pending",
        "notify_keys",
        "remove_user_keys",
        "fanout_user_key",
        "fanout_cluster_keys",
    ):
        assert getattr(k, name)(user) == getattr(keys, name)(user), name
    for name in (
        "body",
        "claim",
        "deleted",
        "deleted_copies",
        "idempotency",
        "rate_ingest",
        "activity_keys",
    ):
        assert getattr(k, name)(activity) == getattr(keys, name)(activity), name
    assert k.deleted_on_cluster(activity, 3) == keys.deleted_on_cluster(activity, 3)
    assert k.big_accounts == keys.big_accounts
    assert k.fanout_prefixes == keys.FANOUT_USER_PREFIXES


def test_a_tenants_names_are_prefixed_and_keep_the_users_hash_tag() -> None:
    k = keys.Keyspace.for_tenant("acme")
    assert k.timeline("u1") == "t:acme:" + keys.timeline("u1")
    assert k.fanout_user_key("u1") == b"t:acme:" + keys.fanout_user_key("u1")
    assert k.fanout_cluster_keys("u1") == tuple(
        b"t:acme:" + name for name in keys.fanout_cluster_keys("u1")
    )
    assert k.notify_keys("u1") == tuple("t:acme:" + n for n in keys.notify_keys("u1"))
    assert k.big_accounts == "t:acme:" + keys.big_accounts
    assert all(p.startswith("t:acme:") for p in k.fanout_prefixes)
    assert key_slot(k.timeline("u1").encode()) == key_slot(keys.timeline("u1").encode())
    # no default name starts with the tenants' prefix: a tenant's keys are found by t:<id>:*
    assert not any(
        getattr(keys, n)("x").startswith("t:")
        for n in ("timeline", "presence", "body", "claim", "deleted", "idempotency", "outbox")
    )
    assert keys.Keyspace.for_tenant("acme") is k


def test_a_clusters_deleted_marker_has_a_copy_in_each_bucket_spread_over_the_slots() -> None:
    buckets = keys.DELETED_BUCKETS
    ids = [f"act-{n}" for n in range(100)]
    # each bucket's copies share one slot (one MGET reads a batch's markers in a bucket)
    slots = [
        {key_slot(keys.deleted_on_cluster(a, b).encode()) for a in ids} for b in range(buckets)
    ]
    assert all(len(s) == 1 for s in slots)
    bucket_slots = [s.pop() for s in slots]
    assert len(set(bucket_slots)) == buckets
    # each bucket's slot lies in its own share of the slot space: 3, 4, 6, 8 or 12 masters
    # that split the slots evenly hold as many buckets each (so the reads, which take the
    # buckets in turn, spread evenly)
    assert [s * buckets // 16384 for s in bucket_slots] == list(range(buckets))
    for masters in (3, 4, 6, 8, 12):
        per_master = [0] * masters
        for s in bucket_slots:
            per_master[s * masters // 16384] += 1
        assert per_master == [buckets // masters] * masters, masters
    # a delete sets every copy
    assert keys.deleted_copies("a1") == [keys.deleted_on_cluster("a1", b) for b in range(buckets)]
    assert len(set(keys.deleted_copies("a1"))) == buckets
    # a tenant's markers: prefixed, in the same buckets (the tag is the bucket's)
    acme = keys.Keyspace.for_tenant("acme")
    assert acme.deleted_copies("a1") == ["t:acme:" + n for n in keys.deleted_copies("a1")]
    tenant = acme.deleted_on_cluster("a1", 5)
    assert key_slot(tenant.encode()) == key_slot(keys.deleted_on_cluster("a1", 5).encode())
    # never the one-Redis name: its scripts read that one atomically
    assert keys.deleted("a1") not in keys.deleted_copies("a1")
