"""The sync store keeps the connections its scripts ran on (`session.store._PooledScripts`).

A script call takes a connection the store kept from an earlier call instead
of checking one out of the client's pool and releasing it afterwards. What
must hold: consecutive calls skip the pool; a kept connection that the server
closed meanwhile is replaced before the call is sent (not charged to the
call as a cache error, even on a client that never retries); a bounded pool
keeps half its connections for the application; `close()`, a dropped store
and a forked child give back or leave alone what the store kept.

Each test runs on fakeredis and on the Redis server named by REDIS_URL
(skipped when unset), except those that need a real socket: the `client`
and `store` fixtures of tests/session/conftest.py.
"""

from __future__ import annotations

import gc
import os
import threading
import warnings
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from docstore import MemoryDocumentStore
from session import SessionStore

pytestmark = pytest.mark.timeout(60)


def in_use(client: redis.Redis) -> int:
    return len(client.connection_pool._in_use_connections)  # type: ignore[attr-defined]


def kept(store: SessionStore) -> list[Any]:
    return store._script_io._kept  # type: ignore[attr-defined,no-any-return]


def count_checkouts(client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    pool = client.connection_pool
    calls = [0]
    real = pool.get_connection

    def get_connection(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(pool, "get_connection", get_connection)
    return calls


def test_consecutive_calls_skip_the_pool(
    store: SessionStore, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    sid = store.create_session(data={"n": 1}).id
    store.get_session(sid)
    store.stats()  # reads the fill's reply: its connection is kept too
    checkouts = count_checkouts(client, monkeypatch)
    for n in range(2, 12):
        assert store.get_session(sid).version == n - 1  # type: ignore[union-attr]
        store.update_session(sid, {"n": n})
    assert checkouts[0] == 0
    assert len(kept(store)) == 1
    assert in_use(client) == 1
    assert store.stats()["cache_errors"] == 0


def test_a_kept_connection_the_server_closed_is_replaced_before_the_call(
    client: redis.Redis, session_key_prefix: str, request: pytest.FixtureRequest
) -> None:
    if "real" not in request.node.callspec.id:
        pytest.skip("needs a real server to close a connection (fakeredis has none)")
    # A client that never retries: only the check before sending can save the call.
    never_retries = redis.Redis(
        connection_pool=redis.ConnectionPool(
            **{
                **client.connection_pool.connection_kwargs,
                "retry": Retry(NoBackoff(), 0),
            }
        )
    )
    try:
        store = SessionStore(MemoryDocumentStore(), never_retries, key_prefix=session_key_prefix)
        sid = store.create_session(data={"n": 1}).id
        store.get_session(sid)
        assert store.get_session(sid).data == {"n": 1}  # type: ignore[union-attr]
        (conn,) = kept(store)
        conn.send_command("CLIENT", "ID")
        connection_id = conn.read_response()
        assert client.client_kill_filter(_id=connection_id) == 1
        while any(int(c["id"]) == connection_id for c in client.client_list()):
            pass  # Redis closes a killed client's socket a moment after replying
        # The server closed it (as a restart would); the store notices before sending.
        for _ in range(3):
            assert store.get_session(sid).data == {"n": 1}  # type: ignore[union-attr]
        stats = store.stats()
        assert (stats["cache_errors"], stats["hits"]) == (0, 4)
        store.close()
    finally:
        never_retries.close()


def test_close_gives_back_every_kept_connection(store: SessionStore, client: redis.Redis) -> None:
    ids = [store.create_session(data={"i": i}).id for i in range(16)]
    start = threading.Barrier(4)
    errors: list[BaseException] = []

    def read(chunk: list[str]) -> None:
        try:
            start.wait()
            for _ in range(5):
                for sid in chunk:
                    assert store.get_session(sid) is not None
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=read, args=(ids[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    store.stats()
    assert 1 <= len(kept(store)) <= 4
    assert in_use(client) == len(kept(store))
    store.close()
    assert in_use(client) == 0
    assert kept(store) == []


def test_a_bounded_pool_keeps_half_its_connections_for_the_application(
    client: redis.Redis, session_key_prefix: str
) -> None:
    pool = redis.BlockingConnectionPool(
        max_connections=4,
        timeout=2,
        **client.connection_pool.connection_kwargs,
    )
    pool.connection_class = client.connection_pool.connection_class
    bounded = redis.Redis(connection_pool=pool)
    try:
        store = SessionStore(MemoryDocumentStore(), bounded, key_prefix=session_key_prefix)
        ids = [store.create_session(data={"i": i}).id for i in range(8)]
        errors: list[BaseException] = []
        start = threading.Barrier(4)

        def read(sid: str) -> None:
            try:
                start.wait()
                for _ in range(20):
                    assert store.get_session(sid) is not None
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=read, args=(ids[i],)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        store.stats()
        assert len(kept(store)) <= 2
        # The application still gets two connections at once from its own pool.
        first, second = pool.get_connection(), pool.get_connection()
        pool.release(first)
        pool.release(second)
        store.close()
        assert pool.pool.full()  # every connection back in the queue
    finally:
        bounded.close()


def test_a_dropped_store_gives_back_its_kept_connections(
    client: redis.Redis, session_key_prefix: str
) -> None:
    store = SessionStore(MemoryDocumentStore(), client, key_prefix=session_key_prefix)
    sid = store.create_session(data={"n": 1}).id
    store.get_session(sid)
    store.get_session(sid)
    assert in_use(client) == 1
    del store
    with warnings.catch_warnings():
        # The store sits in a reference cycle; collecting it may also finalize
        # sockets other tests left to the collector.
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    assert in_use(client) == 0


def test_a_forked_child_leaves_its_parents_kept_connection_alone(
    store: SessionStore, client: redis.Redis, request: pytest.FixtureRequest
) -> None:
    if "real" not in request.node.callspec.id:
        pytest.skip("needs a socket parent and child share (fakeredis has none)")
    sid = store.create_session(data={"n": 1}).id
    store.get_session(sid)
    store.get_session(sid)
    (parents,) = kept(store)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: hits on a connection of its own
        code = 1
        try:
            ok = all(store.get_session(sid).data == {"n": 1} for _ in range(5))  # type: ignore[union-attr]
            code = 0 if ok and parents not in kept(store) else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # Had the child written on the parent's socket, this reply would be the child's.
    for _ in range(5):
        assert store.get_session(sid).data == {"n": 1}  # type: ignore[union-attr]
    assert kept(store) == [parents]
    assert store.stats()["cache_errors"] == 0
