"""An application process whose circuit breaker is open while Redis is healthy.

`python fault_breaker_writer.py DSN TABLE REDIS_PORT KEY_PREFIX SESSION_ID`
reaches Redis through a proxy of its own, cuts it for one call (its breaker,
threshold 1 and a cool-down of an hour, opens), restores it, then updates the
session and appends a message. It prints `WROTE <version> <message id>` and
exits: nothing it left pending can be delivered later.
"""

from __future__ import annotations

import sys
from pathlib import Path

from docstore import PostgresDocumentStore
from session import SessionStore
from session.config import redis_client_from_url

# After the library: tests/ holds directories named like its packages.
sys.path.append(str(Path(__file__).resolve().parent.parent))

from tcp_proxy import TcpProxy  # noqa: E402


def main(dsn: str, table: str, redis_port: str, key_prefix: str, session_id: str) -> None:
    with TcpProxy(("127.0.0.1", int(redis_port))) as proxy:
        cache = redis_client_from_url(f"redis://127.0.0.1:{proxy.port}/0")
        docstore = PostgresDocumentStore(dsn, table=table)
        store = SessionStore(
            docstore, cache, key_prefix=key_prefix, breaker_threshold=1, breaker_cooldown=3600
        )
        proxy.cut()
        store.get_session(session_id)  # fails: the breaker opens
        proxy.resume()
        if store.stats()["breaker_open"] != 1:
            sys.exit("the breaker did not open")
        updated = store.update_session(session_id, {"n": 2})
        message = store.add_message(session_id, "user", "hi", message_id="after-outage")
        print(f"WROTE {updated.version} {message.id}", flush=True)
        store.close()
        cache.close()
        docstore.close()


if __name__ == "__main__":
    main(*sys.argv[1:6])
