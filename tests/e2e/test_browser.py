"""The live page in a real browser: real-time delivery that never loses an item.

Headless Chromium (Debian's ``/usr/bin/chromium``, driven by Playwright; no browser download)
opens the gateway's page as one user, against a real ``feed fanout`` and ``feed gateway``
(processes, ``FEED_DEV_MODE=true`` so the page gets its token from ``/dev/token``) on the test
session's Redis, Kafka-protocol broker and Cassandra:

1. an activity produced to Kafka by someone the user follows appears in the page within 2 s;
2. the gateway is killed (SIGKILL): the page shows it is offline and retries with exponential
   backoff; activities produced meanwhile reach the user's delivery stream;
3. a new gateway starts on the same port: the page reconnects, resumes from its last cursor and
   shows every item exactly once (DOM items counted by activity id; the WebSocket frames the page
   received are recorded too, so a repeat hidden by the page's own de-duplication still fails).

And the notification bell, in two tabs of one user (two pages of one Chromium, each with its own
WebSocket): a Like by another user with ``notify: [user]``, produced to Kafka, shows as an unread
count of 1 on both tabs' badges and as the group in both lists; opening the bell in tab 1 marks
it read, and tab 2's badge clears through the ``notification_counts`` frame, without a reload and
without tab 2 sending a request of its own. A notification that arrives while the gateway is
down (its live frame goes nowhere) shows on the badge after the page reconnects, from the counts
the page refetches then.

Every wait has a deadline (polling, never a bare sleep standing in for a condition).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import os
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from feed import keys
from tests.support.pipeline import Pipeline, shared_env
from tests.support.procs import http_get

pytestmark = pytest.mark.e2e

CHROMIUM = os.environ.get("FEED_TEST_CHROMIUM", "/usr/bin/chromium")
# INFRA.md ("Browsers"): without the background-networking flags Chromium floods the closed
# network with refused connections.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: The issue's bound: a published activity is on screen within this many seconds.
LIVE_BOUND_S = 2.0
#: A notification on both tabs' badges, and a mark's effect on the other tab, within this many
#: seconds (no bound in the issue; generous for a shared test machine).
NOTIFY_BOUND_S = 5.0

# Records what the page's WebSocket does, before any page script runs: when each connection was
# attempted (backoff), and every frame received (a repeat the page hides still counts here).
_RECORDER = """
(() => {
  const Native = window.WebSocket;
  const log = { attempts: [], frames: [] };
  window.__ws = log;
  class Recorded extends Native {
    constructor(url, protocols) {
      super(url, protocols);
      log.attempts.push(performance.now());
      this.addEventListener("message", (event) => {
        try { log.frames.push(JSON.parse(event.data)); } catch (e) { log.frames.push(null); }
      });
    }
  }
  window.WebSocket = Recorded;
})();
"""


def _playwright() -> Any:
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        # Never skipped: `make test` installs it, so its absence is a set-up failure.
        pytest.fail("the playwright package is not installed (pip install -e '.[dev]')")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing (infra/setup.sh installs Debian's chromium)")
    return async_playwright


@pytest.fixture(scope="module")
def live_pipeline(
    stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    env = shared_env(stack_env, "browser", FEED_DEV_MODE="true", FEED_DRAIN_S="2")
    with Pipeline(env, tmp_path_factory.mktemp("browser")).running(stop_timeout=10) as p:
        yield p


@contextlib.asynccontextmanager
async def _browser_pages(tmp_path: Path, count: int) -> AsyncIterator[list[Any]]:
    """``count`` tabs of one Chromium (one profile, so one user's tabs), each recording its
    WebSocket (:data:`_RECORDER`)."""
    async_playwright = _playwright()
    async with async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # a fresh user-data dir per test
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
        )
        try:
            await context.add_init_script(_RECORDER)
            pages = list(context.pages[:count])
            while len(pages) < count:
                pages.append(await context.new_page())
            yield pages
        finally:
            await context.close()


@contextlib.asynccontextmanager
async def _browser_page(tmp_path: Path) -> AsyncIterator[Any]:
    async with _browser_pages(tmp_path, 1) as pages:
        yield pages[0]


async def _until(
    probe: Callable[[], Awaitable[Any]], *, timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll ``probe`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:.1f}s waiting for {what}")
        await asyncio.sleep(interval)


async def _dom_ids(page: Any) -> list[str]:
    ids: list[str] = await page.eval_on_selector_all(
        "#feed li.item", "items => items.map((li) => li.dataset.id)"
    )
    return ids


async def _state(page: Any) -> tuple[str, str]:
    s, text = await page.evaluate(
        "() => [document.getElementById('state').dataset.s,"
        " document.getElementById('state').textContent.trim()]"
    )
    return str(s), str(text)


def _in_stream(pipeline: Pipeline, user: str, activity_ids: set[str]) -> Callable[[], Any]:
    import redis

    client = redis.Redis.from_url(pipeline.settings.redis_url)

    async def probe() -> bool:
        entries = await asyncio.to_thread(client.xrange, keys.deliveries(user))
        frames = [fields[b"f"] for _, fields in entries]
        return all(any(aid.encode() in frame for frame in frames) for aid in activity_ids)

    probe.close = client.close  # type: ignore[attr-defined]
    return probe


async def test_page_shows_every_item_once_across_a_gateway_crash(
    live_pipeline: Pipeline, cassandra: Any, ids: Callable[[str], str], tmp_path: Path
) -> None:
    p = live_pipeline
    s = p.settings
    started = time.monotonic()
    user, actor = ids("viewer"), ids("author")
    p.follow(user, actor)
    ks = s.cassandra_keyspace

    async def followed() -> bool:
        rows = await asyncio.to_thread(
            cassandra.execute, f"SELECT follower FROM {ks}.followers WHERE user_id = %s", (actor,)
        )
        return user in [row.follower for row in rows]

    await _until(followed, timeout=20, what="the follow to be applied")

    async with _browser_page(tmp_path) as page:
        # --- the page, as `user` (the page takes ?user= and fetches a dev token) -------------
        await page.goto(f"{p.gateway_url}/?user={user}", wait_until="domcontentloaded")
        await page.wait_for_selector('#state[data-s="live"]', timeout=15_000)
        assert await page.input_value("#user") == user
        await _until(
            lambda: page.evaluate("() => window.__ws.frames.some((f) => f?.type === 'welcome')"),
            timeout=5,
            what="the welcome frame",
        )

        # --- 1. live: produced to Kafka -> on screen within 2 s --------------------------------
        a1 = ids("a1")
        sent = time.monotonic()
        p.produce(s.topic_activities, actor, p.activity(a1, actor))
        remaining_ms = max(1.0, (LIVE_BOUND_S - (time.monotonic() - sent)) * 1000)
        await page.wait_for_selector(f'#feed li[data-id="{a1}"]', timeout=remaining_ms)
        live_latency = time.monotonic() - sent
        assert live_latency < LIVE_BOUND_S

        # --- 2. the gateway dies; the page shows it and backs off ------------------------------
        attempts_before = await page.evaluate("() => window.__ws.attempts.length")
        p.gateway.kill()  # SIGKILL: no close frame, no goodbye
        killed_at = await page.evaluate("() => performance.now()")
        await page.wait_for_selector('#state[data-s="offline"]', timeout=10_000)
        offline_text = (await _state(page))[1]
        assert re.search(r"retrying in \d+s", offline_text), offline_text

        # Published while no gateway runs: the fan-out still appends to the delivery stream.
        a2, a3 = ids("a2"), ids("a3")
        p.produce(s.topic_activities, actor, p.activity(a2, actor))
        p.produce(s.topic_activities, actor, p.activity(a3, actor))
        probe = _in_stream(p, user, {a2, a3})
        try:
            await _until(probe, timeout=10, what="a2 and a3 in the user's delivery stream")
        finally:
            probe.close()  # type: ignore[attr-defined]
        # Let the page fail at least three reconnects, so the backoff can be checked.
        await _until(
            lambda: page.evaluate(f"() => window.__ws.attempts.length >= {attempts_before + 3}"),
            timeout=15,
            what="three reconnect attempts while the gateway is down",
        )
        assert await _dom_ids(page) == [a1]  # nothing appeared while down

        # --- 3. a new gateway on the same port; the page resumes ------------------------------
        p.gateway.start()
        await asyncio.to_thread(p.gateway.wait_http, f"{p.gateway_url}/healthz", timeout=30)

        async def caught_up() -> bool:
            ids_now = set(await _dom_ids(page))
            state, _ = await _state(page)
            return state == "live" and {a1, a2, a3} <= ids_now

        await _until(caught_up, timeout=30, what="the page to reconnect and show a2, a3")

        # And live again after the resume.
        a4 = ids("a4")
        sent = time.monotonic()
        p.produce(s.topic_activities, actor, p.activity(a4, actor))
        remaining_ms = max(1.0, (LIVE_BOUND_S - (time.monotonic() - sent)) * 1000)
        await page.wait_for_selector(f'#feed li[data-id="{a4}"]', timeout=remaining_ms)

        # --- every item exactly once --------------------------------------------------------
        dom = await _dom_ids(page)
        assert Counter(dom) == Counter({a1: 1, a2: 1, a3: 1, a4: 1}), dom
        assert dom == [a4, a3, a2, a1]  # newest first, in delivery order
        assert await page.text_content("#count") == "4"

        record = await page.evaluate("() => window.__ws")
        frames = [f for f in record["frames"] if f]
        activity_frames = [f for f in frames if f.get("type") == "activity"]
        received = Counter(f["activity"]["id"] for f in activity_frames)
        assert received == Counter({a1: 1, a2: 1, a3: 1, a4: 1}), received
        assert not [f for f in frames if f.get("type") == "reset"]
        # The stream cursors the page saw are consecutive: no gap, no repeat.
        seqs = [int(f["cursor"].rpartition(".")[2]) for f in activity_frames]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
        assert len({f["cursor"].rpartition(".")[0] for f in activity_frames}) == 1
        assert len([f for f in frames if f.get("type") == "welcome"]) == 2

        # --- connection state and backoff ----------------------------------------------------
        state, _ = await _state(page)
        assert state == "live"
        reconnects = int(await page.text_content("#reconnects") or "0")
        assert reconnects >= 3
        attempts = record["attempts"][attempts_before:]
        assert attempts[0] - killed_at < 1000  # the first retry came quickly (250-500 ms)
        # Retry i waits 500 ms * 2^i, jittered to [50 %, 100 %] of that (the page's backoff):
        # the gaps between attempts grow geometrically.
        gaps = [b - a for a, b in itertools.pairwise(attempts)]
        assert len(gaps) >= 3, gaps
        for j, gap in enumerate(gaps):
            retry = j + 1
            assert 250 * 2**retry - 5 <= gap <= 500 * 2**retry + 1000, (retry, gaps)

    assert time.monotonic() - started < 60


async def _badge(page: Any) -> tuple[bool, str]:
    """The bell's badge: (shown, text)."""
    shown, text = await page.evaluate(
        "() => { const b = document.getElementById('bell-count');"
        " return [!b.hidden && getComputedStyle(b).display !== 'none', b.textContent.trim()]; }"
    )
    return bool(shown), str(text)


async def _groups(page: Any) -> list[dict[str, str]]:
    groups: list[dict[str, str]] = await page.eval_on_selector_all(
        "#notif-list li.notif-group",
        "items => items.map((li) => ({id: li.dataset.group, read: li.dataset.read,"
        " text: li.querySelector('.what').textContent}))",
    )
    return groups


async def _frames(page: Any, kind: str) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = await page.evaluate(
        "(kind) => window.__ws.frames.filter((f) => f?.type === kind)", kind
    )
    return frames


async def test_bell_badge_clears_on_the_other_tab_when_one_tab_reads(
    live_pipeline: Pipeline, ids: Callable[[str], str], tmp_path: Path
) -> None:
    p = live_pipeline
    s = p.settings
    user, liker = ids("poster"), ids("liker")
    post = f"post:{ids('post')}"

    async with _browser_pages(tmp_path, 2) as tabs:
        # Every notification request each tab makes (method, path), to show what tab 2 did, and
        # the notification lists each tab received.
        requests: list[list[tuple[str, str]]] = [[], []]
        loaded: list[list[str]] = [[], []]
        for n, tab in enumerate(tabs):
            tab.on("request", functools.partial(_record_request, requests[n]))
            tab.on("response", functools.partial(_record_list, loaded[n]))
        for tab in tabs:
            await tab.goto(f"{p.gateway_url}/?user={user}", wait_until="domcontentloaded")
        for n, tab in enumerate(tabs):
            await tab.wait_for_selector('#state[data-s="live"]', timeout=15_000)
            await _until(
                lambda tab=tab: tab.evaluate(
                    "() => window.__ws.frames.some((f) => f?.type === 'welcome')"
                ),
                timeout=5,
                what=f"tab {n + 1}'s welcome frame",
            )
            # The page loads its notifications after the welcome: wait for that answer, so an
            # empty badge below is the user's state and not a page still loading.
            await _until(
                functools.partial(_nonempty, loaded[n]),
                timeout=5,
                what=f"tab {n + 1}'s notification list",
            )
        for tab in tabs:
            await _until(
                functools.partial(_no_badge_and_empty, tab),
                timeout=5,
                what="a new user's bell to show nothing",
            )
            await tab.evaluate("() => { window.__notReloaded = true; }")

        # --- a Like by another user, to be notified to `user`, produced to Kafka --------------
        like = ids("like")
        sent = time.monotonic()
        p.produce(
            s.topic_activities,
            liker,
            p.activity(like, liker, type="Like", object=post, notify=[user]),
        )

        async def both_show_one() -> bool:
            return all([await _badge(tab) == (True, "1") for tab in tabs])

        await _until(both_show_one, timeout=NOTIFY_BOUND_S, what="both tabs' badges to show 1")
        assert time.monotonic() - sent < NOTIFY_BOUND_S
        for n, tab in enumerate(tabs):
            frames = await _frames(tab, "notification")
            assert len(frames) == 1, (n, frames)
            group = frames[0]["group"]
            assert (group["type"], group["object"], group["actors"]) == ("Like", post, [liker])
            assert (group["actor_count"], group["activity_count"]) == (1, 1)
            assert (group["seen"], group["read"]) == (False, False)
            assert (frames[0]["unseen"], frames[0]["unread"]) == (1, 1)
            listed = await _groups(tab)
            assert [(g["id"], g["read"]) for g in listed] == [(group["id"], "false")], listed
            assert listed[0]["text"] == f"{liker} liked {post}"

        # --- tab 1 opens the bell: it marks everything read ------------------------------------
        tab1, tab2 = tabs
        tab2_before = len(requests[1])
        opened = time.monotonic()
        await tab1.click("#bell")
        assert await tab1.is_visible("#notifs")
        # The panel shows the one group, and no "older" button (its page had no `next`).
        assert await tab1.is_visible("#notif-list li.notif-group")
        assert not await tab1.is_visible("#notif-more")
        assert not await tab1.is_visible("#notif-empty")
        for n, tab in enumerate(tabs):
            await _until(
                functools.partial(_no_badge, tab),
                timeout=NOTIFY_BOUND_S,
                what=f"tab {n + 1}'s badge to clear",
            )
        assert time.monotonic() - opened < NOTIFY_BOUND_S
        assert ("POST", "notifications/read") in requests[0]

        # Tab 2 cleared through the frame: no reload, no request of its own, a counts frame.
        assert await tab2.evaluate("() => window.__notReloaded === true")
        assert requests[1][tab2_before:] == [], requests[1]
        counts = await _frames(tab2, "notification_counts")
        assert counts and counts[-1]["unread"] == 0, counts
        assert [g["read"] for g in await _groups(tab2)] == ["true"]
        assert (await tab2.get_attribute("#bell", "data-unread")) == "0"

    # The server agrees.
    status, body = await asyncio.to_thread(
        http_get,
        f"{p.gateway_url}/v1/notifications/counts",
        headers={"Authorization": f"Bearer {p.token(user)}"},
    )
    assert status == 200, body
    assert json.loads(body)["unread"] == 0


async def test_bell_counts_are_refetched_after_a_reconnect(
    live_pipeline: Pipeline, cassandra: Any, ids: Callable[[str], str], tmp_path: Path
) -> None:
    p = live_pipeline
    s = p.settings
    ks = s.cassandra_keyspace
    user, liker = ids("poster"), ids("liker")
    post = f"post:{ids('post')}"

    async with _browser_page(tmp_path) as tab:
        requests: list[tuple[str, str]] = []
        loaded: list[str] = []
        tab.on("request", functools.partial(_record_request, requests))
        tab.on("response", functools.partial(_record_list, loaded))
        await tab.goto(f"{p.gateway_url}/?user={user}", wait_until="domcontentloaded")
        await tab.wait_for_selector('#state[data-s="live"]', timeout=15_000)
        await _until(functools.partial(_nonempty, loaded), timeout=5, what="the notification list")
        await _until(functools.partial(_no_badge_and_empty, tab), timeout=5, what="no badge")

        # --- the gateway dies; a Like for `user` is applied meanwhile ----------------------------
        p.gateway.kill()
        await tab.wait_for_selector('#state[data-s="offline"]', timeout=10_000)
        like = ids("like")
        p.produce(
            s.topic_activities,
            liker,
            p.activity(like, liker, type="Like", object=post, notify=[user]),
        )

        # The worker applies it to Redis (which publishes the live frame, to no gateway) and
        # then to Cassandra: once it is in Cassandra, the frame is gone for good.
        async def stored() -> bool:
            rows = await asyncio.to_thread(
                cassandra.execute,
                f"SELECT aid FROM {ks}.notify_items WHERE user_id = %s",
                (user,),
            )
            return like in [row.aid for row in rows]

        await _until(stored, timeout=20, what="the like in the user's durable notifications")
        assert await _badge(tab) == (False, "0")
        before = len(requests)

        # --- a new gateway: the page reconnects and refetches the counts ------------------------
        p.gateway.start()
        await asyncio.to_thread(p.gateway.wait_http, f"{p.gateway_url}/healthz", timeout=30)
        await tab.wait_for_selector('#state[data-s="live"]', timeout=30_000)

        async def shows_one() -> bool:
            return await _badge(tab) == (True, "1")

        await _until(shows_one, timeout=NOTIFY_BOUND_S, what="the badge to show 1 after reconnect")
        assert ("GET", "notifications/counts") in requests[before:], requests[before:]
        assert await _frames(tab, "notification") == []  # so the badge came from the refetch
        assert len(await _frames(tab, "welcome")) == 2


async def _no_badge(page: Any) -> bool:
    shown, text = await _badge(page)
    return not shown and text in ("", "0")


async def _no_badge_and_empty(page: Any) -> bool:
    return await _no_badge(page) and await _groups(page) == []


def _record_request(into: list[tuple[str, str]], request: Any) -> None:
    if "/v1/notifications" in request.url:
        into.append((request.method, request.url.partition("/v1/")[2]))


def _record_list(into: list[str], response: Any) -> None:
    if "/v1/notifications?" in response.url and response.status == 200:
        into.append(response.url)


async def _nonempty(items: list[str]) -> bool:
    return bool(items)
