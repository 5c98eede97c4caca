"""The end-of-run check for tables and keys left behind (tests/conftest.py, tests/leftovers.py)."""

from __future__ import annotations

import secrets

import pytest
import redis
from leftovers import left_behind

from docstore import PostgresDocumentStore
from session.pytest_plugin import (
    RUN_VARIABLE,
    drop_postgres_tables,
    unique_key_prefix,
    unique_table_name,
)


@pytest.mark.postgres
@pytest.mark.redis
def test_left_behind_lists_the_runs_own_tables_and_keys_only(
    real_dsn: str, redis_server_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ours, theirs = secrets.token_hex(4), secrets.token_hex(4)
    monkeypatch.setenv(RUN_VARIABLE, theirs)
    their_prefix = unique_key_prefix()
    monkeypatch.setenv(RUN_VARIABLE, ours)
    table, prefix = unique_table_name(), unique_key_prefix()
    assert ours in table and ours in prefix and theirs in their_prefix
    client = redis.Redis.from_url(redis_server_url)
    try:
        PostgresDocumentStore(real_dsn, table=table).close()  # creates the table and its _meta
        client.set(f"{prefix}k", b"1")
        client.set(f"{their_prefix}k", b"1")  # another run's, at the same time
        assert left_behind(real_dsn, redis_server_url, ours) == [
            f"key {prefix}k",
            f"table {table}",
            f"table {table}_meta",
        ]
    finally:
        drop_postgres_tables(real_dsn, [table])
        client.delete(f"{prefix}k", f"{their_prefix}k")
        client.close()
    assert left_behind(real_dsn, redis_server_url, ours) == []
