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
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from leftovers import left_behind

from session.pytest_plugin import REDIS_VARIABLE, RUN_VARIABLE, run_tag, server_url

REAL_SERVER_VARIABLE = "POSTGRES_CONNECTION_STRING"


def pytest_configure(config: pytest.Config) -> None:
    """Tag the names this run creates; subprocesses (pytester, examples) inherit the tag."""
    os.environ[RUN_VARIABLE] = secrets.token_hex(4)


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

    return start_embedded(embedded_data_dir)


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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect contract tests that do not apply to a configuration (instead of skipping)."""
    keep, drop = [], []
    for item in items:
        (drop if _does_not_apply(item) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
