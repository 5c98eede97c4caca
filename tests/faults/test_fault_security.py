"""Security checks under the same roof: ids, hostile cache values, logs, URLs, tenants."""

from __future__ import annotations

import base64
import logging
import os
import pickle
import re
import secrets
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import pytest
import redis
from fault_proxy import FaultProxy, socket_path, tcp_dsn
from fault_redis import RedisProcess
from fault_summary import FaultSummary

import session.protocol
from docstore import MemoryDocumentStore, PostgresDocumentStore, StoreUnavailable
from session import SessionNotFound, SessionStore
from session.coherence import session_keys
from session.config import redis_client_from_url
from session.serializer import FORMAT_VERSION, TOMBSTONE

pytestmark = [pytest.mark.faults, pytest.mark.embedded]

SECRET_DATA = "card-4111-1111-1111-1111"
REDIS_PASSWORD = "redis-pw-" + "x7Q9z" * 3
PG_PASSWORD = "pg-pw-" + "K3v8w" * 3
PACKAGES = [Path(session.__file__).parent, Path(session.__file__).parent.parent / "docstore"]


# -- ids -----------------------------------------------------------------------


def test_session_ids_carry_at_least_128_bits_from_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[int] = []
    real = secrets.token_urlsafe

    def spy(nbytes: int | None = None) -> str:
        asked.append(nbytes or 32)
        return real(nbytes)

    monkeypatch.setattr(session.protocol.secrets, "token_urlsafe", spy)
    store = SessionStore(MemoryDocumentStore())
    created = store.create_session()
    assert min(asked) * 8 >= 128
    assert len(base64.urlsafe_b64decode(created.id + "=" * (-len(created.id) % 4))) * 8 >= 128
    ids = {store.create_session().id for _ in range(2000)}
    assert len(ids) == 2000


def test_a_million_session_ids_do_not_collide() -> None:
    """The generator the store calls (`new_token` of its id size), a million times."""
    size = session.protocol._SESSION_ID_BYTES
    ids = {session.protocol.new_token(size) for _ in range(1_000_000)}
    assert len(ids) == 1_000_000
    assert not any(sid.startswith(("-", "_")) for sid in ids)


def test_rotate_leaves_the_old_id_dead_in_both_tiers(
    make_session_store: Callable[..., SessionStore],
    make_docstore: Callable[..., PostgresDocumentStore],
    redis_process: RedisProcess,
    key_prefix: str,
) -> None:
    store = make_session_store()
    other = make_session_store()  # another process with the old copy in its path
    created = store.create_session(data={"a": 1})
    store.add_message(created.id, "user", "hi", message_id="m1")
    assert other.get_session(created.id) == store.get_session(created.id)
    assert other.get_messages(created.id)
    rotated = store.rotate_session_id(created.id)
    assert rotated.id != created.id
    truth = make_session_store(cached=False, docstore=make_docstore(proxied=False))
    assert truth.get_session(created.id) is None
    cache = redis.Redis(host="127.0.0.1", port=redis_process.port)
    keys = session_keys(key_prefix, created.id)
    assert cache.get(keys.value) in (None, TOMBSTONE)
    assert cache.exists(keys.tail, keys.fence) == 0
    cache.close()
    for reader in (store, other):
        assert reader.get_session(created.id) is None
        assert reader.get_messages(created.id) == []
        assert reader.touch_session(created.id) is False
        with pytest.raises(SessionNotFound):
            reader.update_session(created.id, {"b": 2})
        with pytest.raises(SessionNotFound):
            reader.add_message(created.id, "user", "again")
    assert [m.id for m in other.get_messages(rotated.id)] == ["m1"]


# -- nothing is unpickled; hostile cache values are misses ----------------------


class Exploit:
    """Unpickled, runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


# "pickle" is built per test (a marker file in the test's tmp_path): see hostile_value.
HOSTILE: dict[str, bytes | None] = {
    "pickle": None,
    "msgpack-ext": msgpack.packb(msgpack.ExtType(42, b"payload")),
    "msgpack-bin": msgpack.packb([FORMAT_VERSION, 99, b"bytes", b"x", {}, 0, 0, None]),
    "msgpack-huge-version": msgpack.packb([FORMAT_VERSION, 2**63, None, "c", {}, 0, 0, None]),
    "msgpack-nested": b"\x91" * 100_000 + b"\xc0",
    "msgpack-map": msgpack.packb({"version": 1}),
    "random-bytes": secrets.token_bytes(200),
    "truncated": msgpack.packb([FORMAT_VERSION, 5, "user", "conv", {"a": 1}])[:-3],
    "non-json-data": msgpack.packb([FORMAT_VERSION, 99, None, "c", {"a": b"\x00"}, 0, 0, None]),
    "non-str-keys": msgpack.packb([FORMAT_VERSION, 99, None, "c", {1: 2}, 0, 0, None]),
    "timestamp-overflow": msgpack.packb([FORMAT_VERSION, 99, None, "c", {}, 2**62, 0, None]),
}


def test_no_module_imports_pickle() -> None:
    for package in PACKAGES:
        for path in package.rglob("*.py"):
            text = path.read_text()
            assert not re.search(r"^\s*(import|from)\s+(c?pickle|marshal|shelve)\b", text, re.M), (
                path
            )
            assert "pickle.loads" not in text and "Unpickler" not in text, path


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_cache_value_is_a_miss(
    make_session_store: Callable[..., SessionStore],
    redis_process: RedisProcess,
    key_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    name: str,
) -> None:
    marker = tmp_path / "pwned-by-session-cache"
    hostile = HOSTILE[name]
    if hostile is None:
        hostile = pickle.dumps(Exploit(marker))
        # The payload is live: unpickling it does create the marker.
        pickle.loads(hostile)
        assert marker.exists()
        marker.unlink()

    def refuse(*args: object, **kwargs: object) -> object:
        raise AssertionError("something unpickled a cache value")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    store = make_session_store()
    created = store.create_session(data={"a": 1})
    store.add_message(created.id, "user", "hi", message_id="m1")
    cache = redis.Redis(host="127.0.0.1", port=redis_process.port)
    keys = session_keys(key_prefix, created.id)
    session_now = store.get_session(created.id)
    assert session_now is not None
    cache.set(keys.value, hostile)
    assert store.get_session(created.id) == session_now
    assert store.stats()["decode_errors"] >= 1
    # The hostile tail entry: the messages still come from PostgreSQL.
    store.get_messages(created.id)
    cache.rpush(keys.tail, hostile)
    assert [m.id for m in store.get_messages(created.id)] == ["m1"]
    cache.close()
    assert not marker.exists()


# -- logs, reprs and errors ---------------------------------------------------------


@pytest.fixture
def password_redis(redis_server_available: None, tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path / "redis-pw", password=REDIS_PASSWORD).start()
    yield server
    server.stop()


def test_logs_reprs_and_errors_hold_no_secrets(
    embedded_dsn: str,
    pg_proxy: FaultProxy,
    pg_table: str,
    password_redis: RedisProcess,
    key_prefix: str,
    caplog: pytest.LogCaptureFixture,
    fault_summary: FaultSummary,
) -> None:
    caplog.set_level(logging.DEBUG)
    dsn = tcp_dsn(embedded_dsn, pg_proxy.port) + f" password={PG_PASSWORD}"
    texts: list[str] = []
    with FaultProxy(("127.0.0.1", password_redis.port)) as redis_proxy:
        cache = redis_client_from_url(f"redis://:{REDIS_PASSWORD}@127.0.0.1:{redis_proxy.port}/0")
        docstore = PostgresDocumentStore(dsn, table=pg_table, connect_timeout=1)
        store = SessionStore(docstore, cache, key_prefix=key_prefix)
        texts += [repr(store), repr(docstore), repr(cache), str(store), str(docstore)]
        created = store.create_session("alice", {"card": SECRET_DATA})
        store.add_message(created.id, "user", SECRET_DATA)
        store.get_session(created.id)
        cache.set(session_keys(key_prefix, created.id).value, b"garbage")
        store.get_session(created.id)  # a decode error, logged
        fault_summary.add_fault("redis connection cut")
        redis_proxy.cut()  # Redis failures, logged
        for _ in range(5):
            store.update_session(created.id, {"card": SECRET_DATA})
        redis_proxy.resume()
        fault_summary.add_fault("postgres connection cut")
        pg_proxy.cut()  # PostgreSQL failures, raised
        for call in (
            lambda: store.update_session(created.id, {"card": SECRET_DATA}),
            lambda: store.add_message(created.id, "user", SECRET_DATA),
            lambda: PostgresDocumentStore(dsn, table=pg_table, connect_timeout=1),
        ):
            with pytest.raises(StoreUnavailable) as raised:
                call()
            texts += [str(raised.value), repr(raised.value), str(raised.value.__cause__)]
        pg_proxy.resume()
        store.delete_session(created.id)
        store.close()
        docstore.close()
        cache.close()
    texts += [record.getMessage() for record in caplog.records]
    texts += [caplog.text]
    everything = "\n".join(texts)
    assert created.id not in everything
    assert SECRET_DATA not in everything
    assert REDIS_PASSWORD not in everything
    assert PG_PASSWORD not in everything


# -- TLS parameters are passed through ------------------------------------------------


def test_rediss_url_gives_a_tls_client() -> None:
    client = redis_client_from_url("rediss://127.0.0.1:1/0?ssl_cert_reqs=required")
    assert client.connection_pool.connection_class is redis.SSLConnection
    client.close()


def test_sslmode_in_the_dsn_reaches_libpq(embedded_dsn: str, pg_table: str) -> None:
    """The embedded server speaks no TLS: sslmode=require fails, sslmode=disable works."""
    with FaultProxy(socket_path(embedded_dsn)) as proxy:
        dsn = tcp_dsn(embedded_dsn, proxy.port)
        with pytest.raises(StoreUnavailable, match="SSL"):
            PostgresDocumentStore(dsn + " sslmode=require", table=pg_table, connect_timeout=1)
        PostgresDocumentStore(dsn + " sslmode=disable", table=pg_table).close()


# -- tenants ------------------------------------------------------------------------


def test_two_tenants_on_one_redis_do_not_see_each_other(
    make_session_store: Callable[..., SessionStore],
    redis_process: RedisProcess,
) -> None:
    tenant_a = make_session_store(key_prefix="tenant-a:", sessions_collection="a_sessions")
    tenant_b = make_session_store(key_prefix="tenant-b:", sessions_collection="b_sessions")
    session_a = tenant_a.create_session(data={"who": "a"})
    session_b = tenant_b.create_session(data={"who": "b"})
    tenant_a.get_session(session_a.id)
    tenant_b.get_session(session_b.id)
    cache = redis.Redis(host="127.0.0.1", port=redis_process.port)
    keys_a = {key.decode() for key in cache.scan_iter(match="tenant-a:*")}
    keys_b = {key.decode() for key in cache.scan_iter(match="tenant-b:*")}
    assert keys_a and keys_b
    assert all(session_a.id in key for key in keys_a)
    assert all(session_b.id in key for key in keys_b)
    assert tenant_a.get_session(session_b.id) is None
    assert tenant_b.get_session(session_a.id) is None
    keys_a = {key.decode() for key in cache.scan_iter(match="tenant-a:*")}
    # One tenant fencing after a script flush leaves the other's keys alone...
    cache.script_flush()
    assert tenant_b.get_session(session_b.id) == session_b
    assert {key.decode() for key in cache.scan_iter(match="tenant-a:*")} == keys_a
    # ...and the other tenant, whose scripts are its own, fences its namespace too.
    assert tenant_a.get_session(session_a.id) == session_a
    assert tenant_a.stats()["cache_fences"] >= 1
    cache.close()
