"""What a test run left behind on the shared servers, judged by the run's own names.

Every table and key prefix the suite creates carries the run's tag
(`session.pytest_plugin.unique_table_name` / `unique_key_prefix`), so runs of
other people against the same servers at the same time never count as ours.
"""

from __future__ import annotations

import psycopg2
import redis

from session.config import redis_client_from_url
from session.pytest_plugin import run_key_pattern, run_table_pattern

__all__ = ["left_behind"]


def left_behind(dsn: str | None, redis_url: str | None, tag: str) -> list[str]:
    """Return the tables and Redis keys named by run `tag` that exist now, sorted."""
    found: list[str] = []
    if dsn:
        conn = psycopg2.connect(dsn, connect_timeout=10)
        try:
            with conn.cursor() as cur:
                # Tables, sequences, views...: anything in the catalog under the run's names.
                cur.execute(
                    "SELECT relname FROM pg_class WHERE relname LIKE %s AND relkind <> 'i'",
                    (run_table_pattern(tag),),
                )
                found += [f"table {name}" for (name,) in cur.fetchall()]
        finally:
            conn.close()
    if redis_url:
        client: redis.Redis = redis_client_from_url(redis_url)
        try:
            keys = client.scan_iter(match=run_key_pattern(tag), count=1000)
            found += [f"key {key.decode('utf-8', 'replace')}" for key in keys]
        finally:
            client.close()
    return sorted(found)
