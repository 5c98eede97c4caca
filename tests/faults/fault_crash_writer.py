"""An application process that dies between a commit and its cache update.

`python fault_crash_writer.py DSN TABLE REDIS_URL KEY_PREFIX CACHE_TTL SESSION_ID`
updates the session; once PostgreSQL has committed it prints COMMITTED and
waits, so the test can kill -9 it before the Redis step runs.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from docstore import PostgresDocumentStore
from session import SessionStore
from session.config import redis_client_from_url


def main(dsn: str, table: str, redis_url: str, key_prefix: str, cache_ttl: str, sid: str) -> None:
    store = SessionStore(
        PostgresDocumentStore(dsn, table=table),
        redis_client_from_url(redis_url),
        key_prefix=key_prefix,
        cache_ttl=float(cache_ttl),
    )

    def die_here(*args: Any) -> None:
        print("COMMITTED", flush=True)
        threading.Event().wait()  # until the test kills this process

    store._refresh_session = die_here  # type: ignore[method-assign]
    store.update_session(sid, {"n": 1})


if __name__ == "__main__":
    main(*sys.argv[1:7])
