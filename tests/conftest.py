"""Shared fixtures: PostgreSQL servers to test against, and stores on uniquely named tables.

- `embedded_dsn`: one embedded PostgreSQL server per test session, its data in
  a temporary directory.
- `real_dsn`: the server named by POSTGRES_CONNECTION_STRING. Unset, the tests
  that need it are skipped, except when CI is set: then they fail, so that CI
  can never pass without having run them.

Each `PostgresDocumentStore` a test builds gets its own table
(`unique_table()`), each test its own key prefix (`unique_key_prefix()`);
the test drops exactly those afterwards, never anything else. The names carry
this run's tag (`$DOCSTORE_SESSION_TEST_RUN`, set below), and with real
servers configured the run fails if any table or key so named is left over
at its end (`nothing_left_behind`).

`--real-servers-only` (CI's second suite, `.ci/run`) keeps only the tests that
can reach the servers the service variables name: a test that runs the same
without them (memory stores, fakeredis, the embedded server, a private
redis-server) already ran in the first suite, so it is deselected there.

Under pytest-xdist (`-n`, in pyproject's addopts) the tests marked `serial`,
those that bound how long a call may take under a fault, run alone: the
other workers wait for them (`serial_lock.RunLock`).
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
from leftovers import left_behind
from serial_lock import RunLock

from session.pytest_plugin import REDIS_VARIABLE, RUN_VARIABLE, run_tag, server_url

REAL_SERVER_VARIABLE = "POSTGRES_CONNECTION_STRING"
REAL_SERVERS_ONLY = "--real-servers-only"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        REAL_SERVERS_ONLY,
        action="store_true",
        help="run only the tests that can reach the servers named by "
        f"{REAL_SERVER_VARIABLE} and {REDIS_VARIABLE} (both must be set); the others run "
        "alike without them, in a run without the variables",
    )


# The directory of the run's `RunLock`, made by the xdist controller for its workers.
_LOCK_VARIABLE = "DOCSTORE_SESSION_TEST_LOCKS"
_RUN_LOCK = pytest.StashKey[RunLock]()


def pytest_configure(config: pytest.Config) -> None:
    """Tag the names this run creates; subprocesses (pytester, examples) inherit the tag."""
    os.environ[RUN_VARIABLE] = secrets.token_hex(4)
    if hasattr(config, "workerinput"):  # an xdist worker: join the controller's lock
        directory = os.environ.get(_LOCK_VARIABLE)
        if directory:
            config.stash[_RUN_LOCK] = RunLock(Path(directory))
    elif getattr(config.option, "numprocesses", None):  # the controller of workers
        os.environ[_LOCK_VARIABLE] = tempfile.mkdtemp(prefix="docstore-session-locks-")


def pytest_unconfigure(config: pytest.Config) -> None:
    lock = config.stash.get(_RUN_LOCK, None)
    if lock is not None:
        lock.close()
    elif not hasattr(config, "workerinput") and os.environ.get(_LOCK_VARIABLE):
        shutil.rmtree(os.environ.pop(_LOCK_VARIABLE), ignore_errors=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    lock = item.config.stash.get(_RUN_LOCK, None)
    if lock is None:
        return (yield)
    with lock.hold(alone=item.get_closest_marker("serial") is not None):
        return (yield)


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """With real servers: fail the run if a table or Redis key it created is still there.

    Only this run's names count (other runs share the servers at the same time).
    Set up before any other fixture of the session, so torn down after all of them.
    """
    dsn = os.environ.get(REAL_SERVER_VARIABLE) or None
    redis_url = os.environ.get(REDIS_VARIABLE) or None
    tag = run_tag()
    before = set(left_behind(dsn, redis_url, tag))
    yield
    left = [name for name in left_behind(dsn, redis_url, tag) if name not in before]
    if left:
        shown = ", ".join(left[:20]) + (f" and {len(left) - 20} more" if len(left) > 20 else "")
        pytest.fail(f"this test run left {len(left)} tables/keys behind: {shown}", pytrace=False)


@pytest.fixture(scope="session")
def embedded_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("embedded") / "pgdata"


@pytest.fixture(scope="session")
def embedded_dsn(embedded_data_dir: Path) -> str:
    """Start (once per session) the embedded server in a temporary directory."""
    from docstore.embedded import start_embedded

    dsn = start_embedded(embedded_data_dir)
    # A server of this session's own, thrown away with it. fsync only protects
    # against the machine crashing, which no test does: every commit is still
    # written to the kernel before it returns, so a killed client or server
    # loses nothing (unlike synchronous_commit = off, left on).
    conn = psycopg2.connect(dsn, connect_timeout=10)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("ALTER SYSTEM SET fsync = off")
            cur.execute("SELECT pg_reload_conf()")
    finally:
        conn.close()
    return dsn


@pytest.fixture(scope="session")
def real_dsn() -> str:
    return server_url(REAL_SERVER_VARIABLE, "real PostgreSQL server")


# Contract parameters that size the cached tail (its length, its byte budget).
_CACHE_ONLY_PARAMETERS = ("tail_size", "budget")


def _does_not_apply(item: pytest.Item) -> bool:
    cls = getattr(item, "cls", None)
    flushes = item.get_closest_marker("flushes_redis_scripts") is not None
    if getattr(cls, "only_flushes_redis_scripts", False):
        # A class on a server of its own, for what a shared one must not see.
        return not flushes
    if getattr(cls, "shares_redis_server", False):
        # SCRIPT FLUSH would flush every user's scripts on a shared server.
        return flushes
    if not getattr(cls, "has_cache", True):
        fixtures = getattr(item, "fixturenames", ())
        if "needs_cache" in fixtures or "needs_outage" in fixtures:
            return True
        # These only shape what the cache holds: without one, every value repeats 0.
        callspec = getattr(item, "callspec", None)
        params = {} if callspec is None else callspec.params
        return any(params.get(name, 0) != 0 for name in _CACHE_ONLY_PARAMETERS)
    return False


# Fixtures that hand a test the servers the service variables name (directly,
# or, like `postgres_docstore_of_the_run`, when the variables are set).
_SERVICE_FIXTURES = frozenset(
    {
        "real_dsn",
        "redis_url",
        "real_postgres_docstore",
        "postgres_docstore_of_the_run",
        # session.pytest_plugin's
        "postgres_url",
        "postgres_docstore",
        "redis_server_url",
        "real_redis",
        "real_session_store",
    }
)
# Values of the backend parametrizations (`backend`, `deployment`, `dsn`, ...)
# that name no real server.
_SERVERLESS_BACKENDS = frozenset({"memory", "embedded", "embedded+fakeredis"})
# Tests with none of the above that are known to run alike with and without the
# variables. tests/faults/: the embedded server and private redis-server
# processes (tests/faults/conftest.py); the memory docstores; the SessionStore
# contract on the memory docstore with fakeredis, no cache, a private server.
_SERVERLESS_NODES = (
    "tests/faults/",
    "tests/docstore/test_memory_store.py::",
    "tests/docstore/test_async_memory_store.py::",
    "tests/session/test_session_store.py::TestFakeRedis::",
    "tests/session/test_session_store.py::TestNoCache::",
    "tests/session/test_session_store.py::TestPrivateRedisServer::",
)


def _runs_alike_without_servers(item: pytest.Item) -> bool:
    """Whether `item` provably never reaches a server the service variables name.

    Only what is known counts: anything marked for the real servers, or using a
    fixture that hands them out, or not recognised here, can reach them.
    """
    if item.get_closest_marker("postgres") or item.get_closest_marker("redis"):
        return False
    if _SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ())):
        return False
    if item.get_closest_marker("no_real_servers") is not None:
        return True
    if item.get_closest_marker("embedded") is not None:
        return True  # the embedded server in place of the real one
    callspec = getattr(item, "callspec", None)
    if callspec is not None and any(
        isinstance(value, str) and value in _SERVERLESS_BACKENDS
        for value in callspec.params.values()
    ):
        return True
    return item.nodeid.startswith(_SERVERLESS_NODES)


# Tests that bound how long a call may take (or how long a stale copy may
# last) under a fault: they run alone under xdist (marked `serial` here; a test
# elsewhere can carry the marker itself).
_SERIAL_NODES = (
    "tests/faults/test_fault_postgres.py::",
    "tests/faults/test_fault_redis.py::",
    "tests/faults/test_fault_pop.py::",
    "tests/faults/test_fault_process.py::",
    "tests/faults/test_history_checker.py::",
    "tests/docstore/test_postgres_faults.py::",
    "tests/docstore/test_async_postgres_faults.py::",
)
_SERIAL_TESTS = ("test_stalled_redis_never_stalls_a_call_for_long",)


def _check_real_servers_only(config: pytest.Config) -> None:
    missing = [v for v in (REAL_SERVER_VARIABLE, REDIS_VARIABLE) if not os.environ.get(v)]
    if missing:
        raise pytest.UsageError(
            f"{REAL_SERVERS_ONLY} needs the servers to test against: {', '.join(missing)} unset"
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect contract tests that do not apply to a configuration (instead of skipping).

    With `--real-servers-only`, deselect too the tests that run alike without servers.
    """
    real_only = config.getoption(REAL_SERVERS_ONLY)
    if real_only:
        _check_real_servers_only(config)
    keep, drop = [], []
    for item in items:
        if item.nodeid.startswith(_SERIAL_NODES) or getattr(item, "originalname", "") in (
            _SERIAL_TESTS
        ):
            item.add_marker(pytest.mark.serial)
        not_here = _does_not_apply(item) or (real_only and _runs_alike_without_servers(item))
        (drop if not_here else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
