"""A miss returns without waiting for its fill's reply (`session.store._PooledScripts`).

The sync store sends a miss's FILL_SESSION and parks the connection with the
reply unread; the next script call sends its own command behind it and reads
both. What must hold: the fill still lands and is counted, the same thread's
next read is a hit, no connection leaks or is handed out with a reply
pending, a connection closed or broken while parked costs the next call
nothing but a counted cache error, and a forked child never reads its
parent's parked reply.

Each test runs on fakeredis and on the Redis server named by REDIS_URL (the
fail-fast client `get_session_store` builds; skipped when unset): the
`client` and `store` fixtures of tests/session/conftest.py.
"""

from __future__ import annotations

import os
import socket
import threading
import warnings

import pytest
import redis

from session import SessionStore

# fakeredis never times a read out: a reply read on the wrong socket would hang.
pytestmark = pytest.mark.timeout(60)


def needs_a_real_socket(request: pytest.FixtureRequest, why: str) -> None:
    if "real" not in request.node.callspec.id:
        pytest.skip(why)


def in_use(client: redis.Redis) -> int:
    return len(client.connection_pool._in_use_connections)  # type: ignore[attr-defined]


def lent(client: redis.Redis, *stores: SessionStore) -> int:
    """Connections out of the pool, less those the stores keep between calls (all read)."""
    return in_use(client) - sum(len(store._script_io._kept) for store in stores)  # type: ignore[attr-defined]


def cold_store(store: SessionStore, client: redis.Redis, key_prefix: str) -> SessionStore:
    """A second store on the same docstore and client, under a prefix nothing filled yet."""
    return SessionStore(store._docstore, client, key_prefix=key_prefix + "cold:")


def test_a_miss_leaves_its_fill_reply_unread_and_stats_read_it(
    store: SessionStore, client: redis.Redis
) -> None:
    sid = store.create_session(data={"n": 1}).id
    assert store.get_session(sid).data == {"n": 1}  # type: ignore[union-attr]
    # The fill was sent; its connection waits, checked out, for its reply.
    assert lent(client, store) == 1
    stats = store.stats()
    assert (stats["misses"], stats["fills"], stats["cache_errors"]) == (1, 1, 0)
    assert lent(client, store) == 0


def test_the_next_call_reads_behind_the_fill_on_the_same_connection(
    store: SessionStore, client: redis.Redis
) -> None:
    sid = store.create_session(data={"n": 1}).id
    store.get_session(sid)
    created = client.connection_pool._created_connections  # type: ignore[attr-defined]
    # The next read goes behind the fill on the parked connection: a hit, no new connection.
    assert store.get_session(sid).data == {"n": 1}  # type: ignore[union-attr]
    assert client.connection_pool._created_connections == created  # type: ignore[attr-defined]
    assert lent(client, store) == 0
    stats = store.stats()
    assert (stats["hits"], stats["misses"], stats["fills"]) == (1, 1, 1)


def test_a_write_after_a_miss_follows_its_fill(store: SessionStore) -> None:
    sid = store.create_session(data={"n": 1}).id
    store.get_session(sid)
    store.update_session(sid, {"n": 2})
    assert store.get_session(sid).data == {"n": 2}  # type: ignore[union-attr]
    other = SessionStore(store._docstore, store._cache, key_prefix=store.key_prefix)
    assert other.get_session(sid).version == 2  # type: ignore[union-attr]
    assert other.stats()["hits"] == 1


def test_close_reads_and_releases_every_parked_connection(
    store: SessionStore, client: redis.Redis, session_key_prefix: str
) -> None:
    ids = [store.create_session(data={"i": i}).id for i in range(3)]
    cold = cold_store(store, client, session_key_prefix)
    for sid in ids:
        cold.get_session(sid)
    cold.close()
    assert lent(client, store) == 0
    assert cold.stats()["fills"] == 3
    # Every fill landed: a third store on that prefix hits all three.
    again = cold_store(store, client, session_key_prefix)
    assert [again.get_session(sid).data for sid in ids] == [{"i": i} for i in range(3)]  # type: ignore[union-attr]
    assert again.stats()["hits"] == 3


def test_a_parked_connection_closed_meanwhile_costs_the_next_call_nothing(
    store: SessionStore, client: redis.Redis
) -> None:
    first = store.create_session(data={"n": 1}).id
    second = store.create_session(data={"n": 2}).id
    store.get_session(first)
    # The application closes its client's connections (client.close(), a pool
    # reset): the parked reply goes with them.
    client.connection_pool.disconnect()
    assert store.get_session(second).data == {"n": 2}  # type: ignore[union-attr]
    assert store.get_session(second).data == {"n": 2}  # type: ignore[union-attr]
    stats = store.stats()
    assert stats["cache_errors"] == 1  # the first fill's reply, lost
    assert (stats["misses"], stats["hits"]) == (2, 1)
    assert lent(client, store) == 0


def test_a_parked_connection_broken_meanwhile_costs_the_next_call_nothing(
    store: SessionStore, client: redis.Redis, request: pytest.FixtureRequest
) -> None:
    needs_a_real_socket(request, "needs a real socket to break (fakeredis has none)")
    first = store.create_session(data={"n": 1}).id
    second = store.create_session(data={"n": 2}).id
    store.get_session(first)
    (parked,) = client.connection_pool._in_use_connections  # type: ignore[attr-defined]
    parked._sock.shutdown(socket.SHUT_RDWR)
    assert store.get_session(second).data == {"n": 2}  # type: ignore[union-attr]
    assert store.get_session(second).data == {"n": 2}  # type: ignore[union-attr]
    before = store.stats()
    assert 1 <= before["cache_errors"] <= 2  # the fill's reply, and maybe the send behind it
    assert lent(client, store) == 0
    # Redis itself is fine: the copies land again, and the next read hits.
    assert store.get_session(second).data == {"n": 2}  # type: ignore[union-attr]
    after = store.stats()
    assert (after["hits"] - before["hits"], after["cache_errors"]) == (1, before["cache_errors"])


def test_threads_missing_at_once_leak_no_connection(
    store: SessionStore, client: redis.Redis
) -> None:
    ids = [store.create_session(data={"i": i}).id for i in range(64)]
    errors: list[BaseException] = []

    def read(chunk: list[str]) -> None:
        try:
            for sid in chunk:
                assert store.get_session(sid) is not None
                assert store.get_session(sid) is not None
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=read, args=(ids[i::8],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    stats = store.stats()
    assert lent(client, store) == 0
    assert stats["cache_errors"] == 0
    # Each session missed at most once per thread race; every miss that held the
    # lease filled, and the second read of each found its copy.
    assert stats["fills"] == 64
    assert stats["hits"] + stats["misses"] == 128


def test_a_forked_child_never_reads_its_parents_parked_reply(
    store: SessionStore, client: redis.Redis, request: pytest.FixtureRequest
) -> None:
    needs_a_real_socket(request, "needs a socket parent and child share (fakeredis has none)")
    first = store.create_session(data={"n": 1}).id
    second = store.create_session(data={"n": 2}).id
    store.get_session(first)  # parks a connection with the fill's reply unread
    with warnings.catch_warnings():
        # Python 3.12+ warns that forking a process with threads may deadlock:
        # the child below only makes calls of its own and exits.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: its own connection, never the parent's socket
        code = 1
        try:
            code = 0 if store.get_session(second).data == {"n": 2} else 1  # type: ignore[union-attr]
            store.stats()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    stats = store.stats()  # the parent still reads its own reply
    assert (stats["fills"], stats["cache_errors"]) == (1, 0)
    assert store.get_session(first).data == {"n": 1}  # type: ignore[union-attr]
    assert store.stats()["hits"] == 1
