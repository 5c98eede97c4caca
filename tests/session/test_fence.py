"""The restart fence deletes only the store's own keys, never another user's of the prefix.

A fence runs when Redis lacks the store's scripts: on first contact with a
Redis (or a new key prefix), after a restart or failover, after SCRIPT FLUSH.
It used to delete every key under the prefix, so `python -m session check`
against a Redis holding `sess:important` deleted it. Each test plants keys
that are not the store's under its prefix (plain strings, hashes, keys with
braces that are not the store's layout, keys with the layout's names but
other contents) and checks they survive, byte for byte.

On fakeredis (a server per test) and on the Redis named by REDIS_URL, under
a key prefix of the test's own; SCRIPT FLUSH only on fakeredis.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime, timezone

import fakeredis
import pytest
import redis

import session.config
from docstore import MemoryDocumentStore
from session import Message, Session, SessionStore
from session.cli import EXIT_OK, main
from session.coherence import (
    FENCE_SEQ,
    FENCE_TAIL,
    FENCE_TOKEN,
    FENCE_VALUE,
    fence_kind,
    new_lease_token,
    session_keys,
)
from session.config import redis_client_from_url
from session.models import SessionState
from session.pytest_plugin import REDIS_VARIABLE, server_url, unique_key_prefix
from session.serializer import TOMBSTONE, encode_message, encode_session

SESSION_ID = "A" * 43


def foreign_keys(prefix: str) -> dict[str, object]:
    """Keys someone else keeps under the store's prefix, with their values."""
    layout = f"{prefix}{{{SESSION_ID}}}"
    return {
        f"{prefix}important": b"another application's data",
        f"{prefix}profile": {b"name": b"carol"},  # a hash
        f"{prefix}{{not-ours}}": b"braces, but no suffix of the layout",
        f"{prefix}{{x}}:t": b"braces, an unknown suffix",
        f"{prefix}other:{{{SESSION_ID}}}:s": TOMBSTONE,  # another namespace nested in ours
        f"{prefix}{{}}:s": TOMBSTONE,  # an empty session id
        f"{prefix}{{{'x' * 256}}}:s": TOMBSTONE,  # longer than any session id
        # The layout's names, holding what the store never writes there:
        f"{prefix}{{b}}:s": b"plain text",
        f"{prefix}{{c}}:s": b"\x92\x00",  # a msgpack array, format version 0
        f"{prefix}{{d}}:s": b"\x92\x63rest",  # ... a format version from the future
        f"{prefix}{{e}}:s": {b"field": b"value"},  # a hash
        f"{prefix}{{f}}:m": [b"plain", b"list"],
        f"{prefix}{{g}}:m": [encode_message(make_message()), b"not ours at the end"],
        f"{prefix}{{h}}:m:seq": b"twelve",
        f"{prefix}{{h2}}:m:seq": b"12:34:2",
        f"{prefix}{{i}}:s:lease": b"not-a-lease-token",
        f"{prefix}{{j}}:m:lease": new_lease_token().upper().encode(),
        f"{layout}:m:seq:backup": b"12",
    }


def own_keys(prefix: str) -> dict[str, object]:
    """Keys in the store's layout holding what the store writes there."""
    keys = session_keys(prefix, SESSION_ID)
    message = encode_message(make_message())
    return {
        keys.value: encode_session(make_state()),
        keys.lease: new_lease_token().encode(),
        keys.tail: [message, message],
        keys.fence: b"2:%d:0" % (2 * len(message)),
        session_keys(prefix, "an-older-library").fence: b"2",  # a bare seq, as before the budget
        keys.tail_lease: new_lease_token().encode(),
        session_keys(prefix, "a-deleted-session").value: TOMBSTONE,
        session_keys(prefix, "a}brace{inside").value: TOMBSTONE,
    }


def make_message() -> Message:
    return Message(SESSION_ID, 1, "m1", "user", "hello", {}, datetime.now(timezone.utc))


def make_state() -> SessionState:
    now = datetime.now(timezone.utc)
    return SessionState(Session(SESSION_ID, "u", {"a": 1}, now, now, None, 3), "conv")


def plant(client: redis.Redis, keys: dict[str, object]) -> None:
    for key, value in keys.items():
        if isinstance(value, bytes):
            client.set(key, value)
        elif isinstance(value, dict):
            client.hset(key, mapping=value)  # type: ignore[arg-type]
        else:
            assert isinstance(value, list)
            client.rpush(key, *value)


def contents(client: redis.Redis, keys: dict[str, object]) -> dict[str, object]:
    """Read back what `plant` wrote (None for a key that is gone)."""
    found: dict[str, object] = {}
    for key in keys:
        kind = client.type(key)
        if kind == b"string":
            found[key] = client.get(key)
        elif kind == b"hash":
            found[key] = client.hgetall(key)
        elif kind == b"list":
            found[key] = client.lrange(key, 0, -1)
        else:
            found[key] = None
    return found


@pytest.fixture(params=["fakeredis", pytest.param("redis", marks=pytest.mark.redis)])
def client(request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    if request.param == "fakeredis":
        cache: redis.Redis = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    else:
        cache = redis_client_from_url(server_url(REDIS_VARIABLE, "real Redis server"))
    yield cache
    cache.close()


@pytest.fixture
def prefix(client: redis.Redis) -> Iterator[str]:
    """A key prefix of this test's own; everything under it is deleted afterwards."""
    name = unique_key_prefix()
    yield name
    keys = list(client.scan_iter(match=f"{name}*", count=1000))
    if keys:
        client.delete(*keys)


def test_first_contact_drops_only_the_stores_own_keys(
    client: redis.Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    foreign, ours = foreign_keys(prefix), own_keys(prefix)
    plant(client, foreign | ours)
    # A new prefix has no scripts in Redis yet: the store fences as it starts.
    with SessionStore(MemoryDocumentStore(), client, key_prefix=prefix) as store:
        stats = store.stats()
    assert stats["cache_fences"] == 1
    assert contents(client, foreign) == foreign
    assert contents(client, ours) == dict.fromkeys(ours)
    assert stats["foreign_keys"] == len(foreign)
    warnings = [r for r in caplog.records if "is shared with something" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING


def test_a_fence_after_script_flush_drops_only_what_the_store_wrote(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    prefix = "sess:"  # the default prefix, as in the report this test comes from
    with SessionStore(MemoryDocumentStore(), client) as store:
        kept = store.create_session("u", {"a": 1})
        for number in range(3):
            store.add_message(kept.id, "user", f"m{number}")
        assert store.get_session(kept.id) is not None
        assert len(store.get_messages(kept.id)) == 3
        gone = store.create_session()
        store.get_session(gone.id)
        store.delete_session(gone.id)  # leaves a tombstone
        written = {key.decode() for key in client.scan_iter(match=f"{prefix}*")}
        keys = session_keys(prefix, kept.id)
        assert {keys.value, keys.tail, keys.fence, session_keys(prefix, gone.id).value} <= written
        foreign = foreign_keys(prefix)
        plant(client, foreign)
        for round_number in (1, 2):
            client.script_flush()  # as after a restart or failover
            assert store.get_session(kept.id) is not None  # fences, then serves
            assert contents(client, foreign) == foreign
            left = {key.decode() for key in client.scan_iter(match=f"{prefix}*")} - set(foreign)
            assert left == {keys.value}, "only the copy the read just filled"
            assert store.stats()["foreign_keys"] == round_number * len(foreign)
        assert store.stats()["cache_fences"] == 3  # at start, then after each flush
    warnings = [r for r in caplog.records if "is shared with something" in r.getMessage()]
    assert len(warnings) == 1, "warned once per store, not per fence"


def test_check_and_demo_leave_another_applications_keys_alone(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The report's case: `DATABASE_URL=memory:// python -m session check` on a Redis
    holding `sess:important`, on the default prefix."""
    server = fakeredis.FakeServer()
    with fakeredis.FakeRedis(server=server) as client:
        foreign = foreign_keys("sess:")
        plant(client, foreign)
        for variable in ("POSTGRES_CONNECTION_STRING", "REDIS_URL", "SESSION_KEY_PREFIX"):
            monkeypatch.delenv(variable, raising=False)
        monkeypatch.setenv("DATABASE_URL", "memory://")
        # The CLI's in-process cache is this (seeded) server.
        monkeypatch.setattr(
            session.config, "_in_process_redis", lambda: fakeredis.FakeRedis(server=server)
        )
        assert main(["check"]) == EXIT_OK
        assert main(["demo", "--sessions", "2", "--messages", "2"]) == EXIT_OK
        client.script_flush()
        assert main(["check"]) == EXIT_OK  # a second fence
        capsys.readouterr()
        assert contents(client, foreign) == foreign


@pytest.mark.redis
def test_check_on_a_real_redis_leaves_foreign_keys_alone(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = server_url(REDIS_VARIABLE, "real Redis server")
    prefix = unique_key_prefix()
    with redis_client_from_url(url) as client:
        foreign = foreign_keys(prefix)
        plant(client, foreign)
        try:
            monkeypatch.delenv("POSTGRES_CONNECTION_STRING", raising=False)
            monkeypatch.setenv("DATABASE_URL", "memory://")
            monkeypatch.setenv("REDIS_URL", url)
            assert main(["check", "--key-prefix", prefix]) == EXIT_OK
            capsys.readouterr()
            assert contents(client, foreign) == foreign
        finally:
            keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
            if keys:
                client.delete(*keys)


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("p:{id}:s", FENCE_VALUE),
        ("p:{id}:s:lease", FENCE_TOKEN),
        ("p:{id}:m", FENCE_TAIL),
        ("p:{id}:m:seq", FENCE_SEQ),
        ("p:{id}:m:lease", FENCE_TOKEN),
        ("p:{a}b}:s", FENCE_VALUE),  # an id may hold a brace
        ("p:{id}", None),
        ("p:{id}:x", None),
        ("p:{}:s", None),
        ("p:id:s", None),
        ("p:x:{id}:s", None),
        ("q:{id}:s", None),
        ("p:{id}:s:lease:x", None),
    ],
)
def test_which_names_are_in_the_layout(name: str, kind: str | None) -> None:
    assert fence_kind("p:", name.encode()) == kind


def test_a_name_that_is_not_utf8_is_not_ours() -> None:
    assert fence_kind("p:", b"p:{\xff}:s") is None


def test_every_key_the_store_writes_is_in_the_fence_layout() -> None:
    # A key added to SessionKeys but not to the fence would be taken for a
    # foreign key and survive a restart, stale.
    keys = session_keys("p:", SESSION_ID)
    assert all(fence_kind("p:", key.encode()) is not None for key in keys.all())
    assert len(set(keys.all())) == len(keys.__dataclass_fields__)
