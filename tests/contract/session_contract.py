"""The behaviour every SessionStore configuration shares, written once.

A test class inherits `SessionStoreContract` and provides two fixtures:

- `cache`: the `redis.Redis` client the stores under test use (None: no cache);
- `outage`: an `Outage` that takes that Redis away and brings it back, or None
  when the configuration cannot simulate one;
- `cleanup_cache` (optional): the client that deletes the test's keys
  afterwards, when `cache` itself may be cut off by an outage.

The docstore comes from the `session_docstore` fixture (tests/session/conftest.py),
so the same suite runs on the memory store and, parametrized, on PostgreSQL.
Every test works in its own collections and under its own Redis key prefix,
and removes both afterwards. A class without a cache sets `has_cache = False`
and the tests that need one are deselected (tests/conftest.py).
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol, cast

import pytest
import redis
from redis.crc import key_slot

import docstore
from contract.docstore_contract import wait_until
from session import (
    InvalidSessionData,
    Message,
    Session,
    SessionError,
    SessionNotFound,
    SessionStore,
    StoreUnavailable,
    VersionConflict,
)
from session.coherence import session_keys
from session.pytest_plugin import unique_key_prefix
from session.serializer import TOMBSTONE, decode_message, decode_session, encode_message

__all__ = [
    "SessionStoreContract",
    "Outage",
    "DocstoreProxy",
    "FakeClock",
    "wait_until",
    "reference_window",
]

THREADS = 8
# The docstore's clock (PostgreSQL's now()) may differ a little from ours.
CLOCK_TOLERANCE = timedelta(seconds=30)


# --------------------------------------------------------------------------- helpers


class Outage(Protocol):
    """Takes the Redis of a test away (`down`) and brings it back (`up`)."""

    def down(self) -> None: ...

    def up(self) -> None: ...


class FakeClock:
    """A wall clock that starts now and moves only when told to."""

    def __init__(self) -> None:
        self._now = time.time()
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds


class DocstoreProxy:
    """Wrap a DocumentStore: count calls, inject failures, run hooks around them.

    `fail[name]` is an exception raised instead of calling `name`;
    `after[name]` is called with the result once `name` has returned (it may
    block, to hold the caller right there).
    """

    def __init__(self, inner: docstore.DocumentStore) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()
        self.fail: dict[str, BaseException] = {}
        self.after: dict[str, Callable[..., None]] = {}
        self.jitter = 0.0
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name.startswith("_") or not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.calls[name] += 1
            failure = self.fail.get(name)
            if failure is not None:
                raise failure
            if self.jitter:
                time.sleep(random.random() * self.jitter)
            result = attr(*args, **kwargs)
            if self.jitter:
                time.sleep(random.random() * self.jitter)
            hook = self.after.get(name)
            if hook is not None:
                hook(result, *args, **kwargs)
            return result

        return call

    def reset(self) -> None:
        with self._lock:
            self.calls.clear()

    def total_calls(self) -> int:
        with self._lock:
            return sum(self.calls.values())

    def pause_after_once(
        self, name: str, collection: str
    ) -> tuple[threading.Event, threading.Event]:
        """Hold the next `name` call on `collection` after it returns; return (reached, go)."""
        reached, go = threading.Event(), threading.Event()
        fired = threading.Event()

        def hook(result: Any, *args: Any, **kwargs: Any) -> None:
            if args and args[0] == collection and not fired.is_set():
                fired.set()
                reached.set()
                assert go.wait(10), "the test never released the paused call"

        self.after[name] = hook
        return reached, go


@contextmanager
def paused_fill(
    proxy: DocstoreProxy, collection: str, read: Callable[[], Session | None]
) -> Iterator[dict[str, Session | None]]:
    """Run `read` in a thread held right after its docstore read; release it on leaving.

    The block runs while the reader holds what it read (and its fill lease);
    afterwards the yielded dict holds the reader's answer under "value".
    """
    reached, go = proxy.pause_after_once("read", collection)
    results: dict[str, Session | None] = {}
    thread = threading.Thread(target=lambda: results.update(value=read()))
    thread.start()
    try:
        assert reached.wait(10)
        yield results
    finally:
        go.set()
        thread.join(10)


def reference_window(
    messages: list[Message],
    *,
    after_seq: int | None = None,
    before_seq: int | None = None,
    limit: int | None = None,
) -> list[Message]:
    """Return what get_messages must answer, computed the plain way."""
    chosen = [
        message
        for message in messages
        if (after_seq is None or message.seq > after_seq)
        and (before_seq is None or message.seq < before_seq)
    ]
    if limit is None:
        return chosen
    if limit == 0:
        return []
    return chosen[:limit] if after_seq is not None else chosen[-limit:]


def _run_threads(*targets: Callable[[], None]) -> None:
    """Run the targets at once; re-raise the first exception any of them raised."""
    with ThreadPoolExecutor(max_workers=len(targets)) as pool:
        futures = [pool.submit(target) for target in targets]
        for future in futures:
            future.result(timeout=120)


RICH_DATA: dict[str, Any] = {
    "text": "unicode ✓ 🎉 \u00e9",
    "int": 2**62,
    "negative": -5,
    "float": 1.5,
    "tiny": 1e-300,
    "true": True,
    "none": None,
    "list": [1, [2, {"x": 3}], "s"],
    "nested": {"deep": {"deeper": []}},
    "empty": {},
    "": "empty key",
}


# --------------------------------------------------------------------------- the suite


# Every write that slides a session's idle lifetime (docs/session.md, "Expiry").
# rotate_session_id moves the session but keeps its expiry.
SLIDING_WRITES: dict[str, Callable[[SessionStore, str], object]] = {
    "update_session": lambda store, session_id: store.update_session(session_id, {"a": 1}),
    "touch_session": lambda store, session_id: store.touch_session(session_id),
    "add_message": lambda store, session_id: store.add_message(session_id, "user", "hi"),
    "pop_message": lambda store, session_id: store.pop_message(session_id),
    "clear_messages": lambda store, session_id: store.clear_messages(session_id),
}


class SessionStoreContract:
    """Every guarantee of API.md's session section, and of docs/session.md."""

    # -- fixtures ------------------------------------------------------------

    @pytest.fixture
    def cache(self) -> redis.Redis | None:
        raise NotImplementedError("a test class provides the `cache` fixture")

    @pytest.fixture
    def outage(self) -> Outage | None:
        return None

    @pytest.fixture
    def cleanup_cache(self, cache: redis.Redis | None) -> redis.Redis | None:
        """Return the client that deletes the test's keys afterwards: one no outage touches.

        A class whose outage cuts the `cache` client off (a proxy) overrides this
        with a direct client, so that a test failing mid-outage leaks nothing.
        """
        return cache

    @pytest.fixture
    def key_prefix(self, cleanup_cache: redis.Redis | None) -> Iterator[str]:
        prefix = unique_key_prefix()
        yield prefix
        if cleanup_cache is not None:
            # Only this test's keys, never a flush. A Redis error here is the
            # test's error: the keys it names would stay behind.
            keys = list(cleanup_cache.scan_iter(match=f"{prefix}*", count=1000))
            if keys:
                cleanup_cache.delete(*keys)

    @pytest.fixture
    def collections(self, session_docstore: docstore.DocumentStore) -> Iterator[tuple[str, str]]:
        suffix = uuid.uuid4().hex[:10]
        names = (f"sessions_{suffix}", f"messages_{suffix}")
        yield names
        for name in names:
            session_docstore.delete_collection(name)

    @pytest.fixture
    def make_store(
        self,
        session_docstore: docstore.DocumentStore,
        cache: redis.Redis | None,
        key_prefix: str,
        collections: tuple[str, str],
    ) -> Iterator[Callable[..., SessionStore]]:
        """Return a factory of stores sharing this test's collections and key prefix."""
        stores: list[SessionStore] = []
        default_cache = cache

        def make(
            *,
            docstore: Any = None,
            cache: Any = "default",
            **kwargs: Any,
        ) -> SessionStore:
            store = SessionStore(
                session_docstore if docstore is None else docstore,
                default_cache if cache == "default" else cache,
                key_prefix=key_prefix,
                sessions_collection=collections[0],
                messages_collection=collections[1],
                **kwargs,
            )
            stores.append(store)
            return store

        yield make
        for store in stores:
            store.close()

    @pytest.fixture
    def store(self, make_store: Callable[..., SessionStore]) -> SessionStore:
        return make_store()

    # A class without a cache sets `has_cache = False`: tests/conftest.py then
    # deselects the tests needing one, so reaching these checks is a set-up error.

    @pytest.fixture
    def needs_cache(self, cache: redis.Redis | None) -> redis.Redis:
        if cache is None:
            pytest.fail(f"{type(self).__name__} has no cache but does not set has_cache = False")
        return cache

    @pytest.fixture
    def needs_outage(self, outage: Outage | None) -> Outage:
        if outage is None:
            pytest.fail(f"{type(self).__name__} has a cache but no `outage` fixture")
        return outage

    # -- helpers -------------------------------------------------------------

    @staticmethod
    def snapshot(cache: redis.Redis | None, key_prefix: str) -> dict[bytes, Any]:
        """Return every key under the prefix with its value (lists as lists)."""
        if cache is None:
            return {}
        found: dict[bytes, Any] = {}
        for key in cache.scan_iter(match=f"{key_prefix}*", count=1000):
            kind = cache.type(key)
            found[key] = cache.lrange(key, 0, -1) if kind == b"list" else cache.get(key)
        return found

    @staticmethod
    def docs_in(session_docstore: docstore.DocumentStore, collection: str) -> int:
        return session_docstore.count(collection)

    # -- create / get ----------------------------------------------------------

    def test_create_then_get(self, store: SessionStore) -> None:
        created = store.create_session("alice", {"cart": [1, 2]})
        assert created.user_id == "alice"
        assert created.data == {"cart": [1, 2]}
        assert created.version == 1
        assert created.expires_at is None
        assert created.created_at.tzinfo is not None
        assert created.created_at.utcoffset() == timedelta(0)
        assert abs(created.created_at - datetime.now(timezone.utc)) < CLOCK_TOLERANCE
        assert created.updated_at == created.created_at
        assert store.get_session(created.id) == created
        assert store.get_session(created.id) == created  # again, from the cache if there is one

    def test_create_defaults(self, store: SessionStore) -> None:
        created = store.create_session()
        assert created.user_id is None
        assert created.data == {}
        assert store.get_session(created.id) == created

    def test_ids_are_unguessable_and_distinct(self, store: SessionStore) -> None:
        ids = {store.create_session().id for _ in range(50)}
        assert len(ids) == 50
        for session_id in ids:
            # secrets.token_urlsafe(32): 256 bits, 43 URL-safe characters.
            assert len(session_id) >= 43
            assert set(session_id) <= set(
                "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
            )

    def test_get_missing(self, store: SessionStore) -> None:
        assert store.get_session("no-such-session") is None
        assert store.get_session("no-such-session") is None  # also once "missing" is cached

    @pytest.mark.parametrize("session_id", ["", "x" * 300, "a\x00b", "\ud800"])
    def test_impossible_ids_are_missing(self, store: SessionStore, session_id: str) -> None:
        assert store.get_session(session_id) is None
        assert store.get_messages(session_id) == []
        assert store.touch_session(session_id) is False
        assert store.delete_session(session_id) is False
        with pytest.raises(SessionNotFound):
            store.update_session(session_id, {"a": 1})
        with pytest.raises(SessionNotFound):
            store.add_message(session_id, "user", "hi")
        with pytest.raises(SessionNotFound):
            store.rotate_session_id(session_id)

    @pytest.mark.parametrize("session_id", [None, 42, b"bytes"])
    def test_non_string_ids_are_refused(self, store: SessionStore, session_id: Any) -> None:
        with pytest.raises(InvalidSessionData):
            store.get_session(session_id)
        with pytest.raises(InvalidSessionData):
            store.update_session(session_id, {})

    def test_create_with_ttl(self, store: SessionStore) -> None:
        created = store.create_session(ttl=60)
        assert created.expires_at is not None
        expected = datetime.now(timezone.utc) + timedelta(seconds=60)
        assert abs(created.expires_at - expected) < CLOCK_TOLERANCE
        assert store.get_session(created.id) == created

    # -- update ------------------------------------------------------------------

    def test_update_merges_and_bumps_version(self, store: SessionStore) -> None:
        created = store.create_session("u", {"a": 1, "b": 2})
        store.get_session(created.id)  # cached at version 1
        updated = store.update_session(created.id, {"b": 3, "c": [4]})
        assert updated.data == {"a": 1, "b": 3, "c": [4]}
        assert updated.version == 2
        assert updated.updated_at >= created.updated_at
        assert updated.created_at == created.created_at
        assert updated.user_id == "u"
        assert store.get_session(created.id) == updated

    def test_update_expected_version(self, store: SessionStore) -> None:
        created = store.create_session(data={"n": 0})
        updated = store.update_session(created.id, {"n": 1}, expected_version=1)
        assert updated.version == 2
        with pytest.raises(VersionConflict) as caught:
            store.update_session(created.id, {"n": 2}, expected_version=1)
        assert isinstance(caught.value, docstore.VersionConflict)
        assert isinstance(caught.value, SessionError)
        assert store.get_session(created.id) == updated

    def test_update_missing(self, store: SessionStore) -> None:
        with pytest.raises(SessionNotFound) as caught:
            store.update_session("missing", {"a": 1})
        assert isinstance(caught.value, LookupError)
        assert isinstance(caught.value, SessionError)

    def test_get_changes_nothing(self, store: SessionStore) -> None:
        created = store.create_session(data={"a": 1})
        for _ in range(3):
            assert store.get_session(created.id) == created

    # -- bad input ---------------------------------------------------------------

    @pytest.mark.parametrize(
        "data",
        [
            ["not", "a", "dict"],
            {"_session": "reserved"},
            {1: "non-str key"},
            {"v": {1, 2}},
            {"v": object()},
            {"v": float("nan")},
            {"v": 2**70},
            {"v": "nul\x00"},
            {"v": "x" * 1_100_000},
        ],
        ids=["list", "reserved", "int-key", "set", "object", "nan", "huge-int", "nul", "too-big"],
    )
    def test_bad_data_writes_nothing(
        self,
        store: SessionStore,
        session_docstore: docstore.DocumentStore,
        collections: tuple[str, str],
        cache: redis.Redis | None,
        key_prefix: str,
        data: Any,
    ) -> None:
        existing = store.create_session("u", {"a": 1})
        store.get_session(existing.id)
        before_cache = self.snapshot(cache, key_prefix)
        before_docs = self.docs_in(session_docstore, collections[0])
        with pytest.raises(InvalidSessionData) as caught:
            store.update_session(existing.id, data)
        assert isinstance(caught.value, ValueError)
        with pytest.raises(InvalidSessionData):
            store.create_session("u", data)
        assert self.docs_in(session_docstore, collections[0]) == before_docs
        assert self.snapshot(cache, key_prefix) == before_cache
        assert store.get_session(existing.id) == existing

    @pytest.mark.parametrize(
        "arguments",
        [
            {"user_id": 5},
            {"ttl": -1},
            {"ttl": 0},
            {"ttl": "60"},
            {"ttl": float("inf")},
        ],
    )
    def test_bad_create_arguments(
        self,
        store: SessionStore,
        session_docstore: docstore.DocumentStore,
        collections: tuple[str, str],
        arguments: dict[str, Any],
    ) -> None:
        with pytest.raises(InvalidSessionData):
            store.create_session(**arguments)
        assert self.docs_in(session_docstore, collections[0]) == 0

    @pytest.mark.parametrize(
        "arguments",
        [
            {"role": 1, "content": "x"},
            {"role": "user", "content": None},
            {"role": "user", "content": "x", "metadata": ["list"]},
            {"role": "user", "content": "x", "metadata": {"v": {1}}},
            {"role": "user", "content": "x", "metadata": {"v": float("inf")}},
            {"role": "user", "content": "nul\x00"},
            {"role": "user", "content": "x", "message_id": ""},
            {"role": "user", "content": "x", "message_id": 7},
            {"role": "user", "content": "x", "message_id": "m" * 255},
            {"role": "user", "content": "x" * 1_100_000},
        ],
    )
    def test_bad_message_writes_nothing(
        self,
        store: SessionStore,
        session_docstore: docstore.DocumentStore,
        collections: tuple[str, str],
        cache: redis.Redis | None,
        key_prefix: str,
        arguments: dict[str, Any],
    ) -> None:
        existing = store.create_session("u")
        store.add_message(existing.id, "user", "first")
        current = store.get_session(existing.id)
        store.get_messages(existing.id)
        before_cache = self.snapshot(cache, key_prefix)
        before_docs = self.docs_in(session_docstore, collections[1])
        extra = {k: v for k, v in arguments.items() if k not in ("role", "content")}
        with pytest.raises(InvalidSessionData):
            store.add_message(existing.id, arguments["role"], arguments["content"], **extra)
        assert self.docs_in(session_docstore, collections[1]) == before_docs
        assert self.snapshot(cache, key_prefix) == before_cache
        assert store.get_session(existing.id) == current

    @pytest.mark.parametrize(
        "arguments",
        [{"limit": -1}, {"limit": True}, {"after_seq": "1"}, {"before_seq": -2}, {"limit": 1.5}],
    )
    def test_bad_message_window(self, store: SessionStore, arguments: dict[str, Any]) -> None:
        created = store.create_session()
        with pytest.raises(InvalidSessionData):
            store.get_messages(created.id, **arguments)

    def test_bad_touch_ttl(self, store: SessionStore) -> None:
        created = store.create_session()
        with pytest.raises(InvalidSessionData):
            store.touch_session(created.id, ttl=-5)
        assert store.get_session(created.id) == created

    # -- touch / expiry --------------------------------------------------------

    def test_touch_slides_expiry(self, make_store: Callable[..., SessionStore]) -> None:
        store = make_store(session_ttl=600)
        created = store.create_session()
        assert created.expires_at is not None
        store.get_session(created.id)
        assert store.touch_session(created.id, ttl=3600) is True
        touched = store.get_session(created.id)
        assert touched is not None
        assert touched.version == created.version + 1
        assert touched.expires_at is not None
        assert touched.expires_at - created.expires_at > timedelta(seconds=2000)
        assert store.touch_session(created.id) is True  # back to session_ttl
        again = store.get_session(created.id)
        assert again is not None and again.expires_at is not None
        expected = datetime.now(timezone.utc) + timedelta(seconds=600)
        assert abs(again.expires_at - expected) < CLOCK_TOLERANCE

    def test_touch_without_ttl_bumps_version(self, store: SessionStore) -> None:
        created = store.create_session()
        assert store.touch_session(created.id) is True
        touched = store.get_session(created.id)
        assert touched is not None
        assert touched.version == 2
        assert touched.expires_at is None

    def test_update_with_ttl_sets_the_expiry_in_the_same_step(
        self, make_store: Callable[..., SessionStore]
    ) -> None:
        clock = FakeClock()
        store = make_store(session_ttl=600, clock=clock)
        created = store.create_session(data={"a": 1})
        updated = store.update_session(created.id, {"a": 2}, ttl=5)
        assert updated.version == created.version + 1
        assert updated.expires_at is not None
        assert abs((updated.expires_at - updated.updated_at).total_seconds() - 5) < 1
        assert store.get_session(created.id) == updated
        clock.advance(6)
        assert store.get_session(created.id) is None
        with pytest.raises(InvalidSessionData):
            store.update_session(created.id, {"a": 3}, ttl=0)

    def test_touch_missing(self, store: SessionStore) -> None:
        assert store.touch_session("missing") is False

    @pytest.mark.parametrize("write", sorted(SLIDING_WRITES))
    def test_writes_slide_the_idle_lifetime(
        self,
        make_store: Callable[..., SessionStore],
        session_docstore: docstore.DocumentStore,
        write: str,
    ) -> None:
        """The write moves the expiry to `session_ttl` from the docstore's now, in both tiers.

        The session's lifetime is first cut to 50 s, so an expiry the write did not
        move stays about 950 s short of the mark. The memory docstore runs on
        the injected clock, which moves between the writes: each new expiry is
        exact. PostgreSQL takes its own now(): there it is checked within
        CLOCK_TOLERANCE, still far closer than an unmoved expiry could be.
        """
        clock = FakeClock()
        backing, tolerance = session_docstore, CLOCK_TOLERANCE
        if isinstance(session_docstore, docstore.MemoryDocumentStore):
            backing, tolerance = docstore.MemoryDocumentStore(clock=clock), timedelta(0)

        def docstore_now() -> datetime:
            if tolerance:
                return datetime.now(timezone.utc)
            return datetime.fromtimestamp(clock(), timezone.utc)

        store = make_store(docstore=backing, session_ttl=1000, clock=clock)
        plain = make_store(docstore=backing, cache=None, clock=clock)
        created = store.create_session()
        for number in range(2):  # something to pop or clear
            store.add_message(created.id, "user", f"m{number}")
        assert store.touch_session(created.id, ttl=50)
        shortened = store.get_session(created.id)
        assert shortened is not None
        previous = shortened.expires_at
        assert previous is not None
        for _ in range(2):
            clock.advance(20)
            store.get_session(created.id)  # a cached copy the write must refresh
            SLIDING_WRITES[write](store, created.id)
            expected = docstore_now() + timedelta(seconds=1000)
            for reader in (store, plain):
                slid = reader.get_session(created.id)
                assert slid is not None and slid.expires_at is not None
                assert abs(slid.expires_at - expected) <= tolerance, f"{write} did not slide it"
            assert slid.expires_at > previous
            if not tolerance:
                # Moved by exactly the time that passed, or from 50 s to 1000 s.
                assert slid.expires_at - previous in (
                    timedelta(seconds=20),
                    timedelta(seconds=970),
                )
            previous = slid.expires_at

    def test_expired_session_is_gone_from_both_tiers(
        self, make_store: Callable[..., SessionStore], cache: redis.Redis | None
    ) -> None:
        clock = FakeClock()
        store = make_store(session_ttl=100, clock=clock)
        created = store.create_session("u", {"a": 1})
        store.add_message(created.id, "user", "hi")
        assert store.get_session(created.id) is not None  # cached now
        assert len(store.get_messages(created.id)) == 1
        clock.advance(101)
        assert store.get_session(created.id) is None
        assert store.get_messages(created.id) == []
        assert store.list_sessions("u") == []
        plain = make_store(cache=None, session_ttl=100, clock=clock)
        assert plain.get_session(created.id) is None

    def test_real_expiry(
        self, make_store: Callable[..., SessionStore], cache: redis.Redis | None, key_prefix: str
    ) -> None:
        store = make_store(session_ttl=1.0)
        plain = make_store(cache=None)
        created = store.create_session(data={"a": 1})
        store.add_message(created.id, "user", "hi")
        assert store.get_session(created.id) is not None
        if cache is not None:
            pttl = cache.pttl(session_keys(key_prefix, created.id).value)
            assert 0 < pttl <= 1000  # the copy never outlives the session
        wait_until(lambda: store.get_session(created.id) is None, what="the session to expire")
        assert plain.get_session(created.id) is None
        assert store.get_messages(created.id) == []
        assert store.touch_session(created.id) is False
        with pytest.raises(SessionNotFound):
            store.update_session(created.id, {"a": 2})
        with pytest.raises(SessionNotFound):
            store.add_message(created.id, "user", "late")

    def test_cache_entry_lives_at_most_cache_ttl(
        self, make_store: Callable[..., SessionStore], needs_cache: redis.Redis, key_prefix: str
    ) -> None:
        store = make_store(cache_ttl=30)
        created = store.create_session()
        store.get_session(created.id)
        pttl = needs_cache.pttl(session_keys(key_prefix, created.id).value)
        assert 0 < pttl <= 30_000

    def test_purge_expired_removes_messages(
        self,
        make_store: Callable[..., SessionStore],
        session_docstore: docstore.DocumentStore,
        collections: tuple[str, str],
    ) -> None:
        store = make_store()
        short = store.create_session(ttl=1.0)
        long = store.create_session()
        for text in ("a", "b"):
            store.add_message(short.id, "user", text)
            store.add_message(long.id, "user", text)
        wait_until(lambda: store.get_session(short.id) is None, what="the session to expire")
        purged = store.purge_expired(batch_size=1)
        assert purged == 3  # the session and its two messages
        assert self.docs_in(session_docstore, collections[1]) == 2
        assert [m.content for m in store.get_messages(long.id)] == ["a", "b"]
        assert store.purge_expired() == 0

    def test_purge_expired_sweeps_orphans_only_when_asked(
        self,
        make_store: Callable[..., SessionStore],
        session_docstore: docstore.DocumentStore,
        collections: tuple[str, str],
    ) -> None:
        # A session the docstore purged by itself leaves its messages behind;
        # the routine purge does not look for them (its cost follows what
        # expired), the orphan sweep does.
        store = make_store()
        short = store.create_session(ttl=1.0)
        long = store.create_session()
        store.add_message(short.id, "user", "orphan")
        store.add_message(long.id, "user", "kept")
        wait_until(lambda: store.get_session(short.id) is None, what="the session to expire")
        assert session_docstore.purge_expired(collections[0]) == 1
        assert store.purge_expired() == 0
        assert self.docs_in(session_docstore, collections[1]) == 2
        assert store.purge_expired(orphans=True) == 1
        assert self.docs_in(session_docstore, collections[1]) == 1
        assert [m.content for m in store.get_messages(long.id)] == ["kept"]

    # -- delete ------------------------------------------------------------------

    def test_delete(
        self,
        store: SessionStore,
        session_docstore: docstore.DocumentStore,
        collections: tuple[str, str],
    ) -> None:
        created = store.create_session(data={"a": 1})
        other = store.create_session()
        store.add_message(created.id, "user", "hi")
        store.add_message(other.id, "user", "kept")
        assert store.get_session(created.id) is not None
        assert store.get_messages(created.id) != []
        assert store.delete_session(created.id) is True
        assert store.get_session(created.id) is None
        assert store.get_messages(created.id) == []
        assert self.docs_in(session_docstore, collections[1]) == 1
        assert store.delete_session(created.id) is False
        assert store.touch_session(created.id) is False
        with pytest.raises(SessionNotFound):
            store.add_message(created.id, "user", "late")
        assert len(store.get_messages(other.id)) == 1

    def test_delete_missing(self, store: SessionStore) -> None:
        assert store.delete_session("missing") is False

    # -- rotate ------------------------------------------------------------------

    def test_rotate(self, store: SessionStore) -> None:
        created = store.create_session("u", {"a": 1})
        store.add_message(created.id, "user", "one", message_id="m1")
        before = store.get_session(created.id)
        assert before is not None
        assert store.get_messages(created.id) != []  # both cached
        rotated = store.rotate_session_id(created.id)
        assert rotated.id != created.id
        assert rotated.data == {"a": 1}
        assert rotated.user_id == "u"
        assert rotated.version == before.version + 1
        assert rotated.created_at == created.created_at
        assert store.get_session(created.id) is None
        assert store.get_messages(created.id) == []
        assert store.get_session(rotated.id) == rotated
        assert [m.content for m in store.get_messages(rotated.id)] == ["one"]
        with pytest.raises(SessionNotFound):
            store.update_session(created.id, {"a": 2})
        with pytest.raises(SessionNotFound):
            store.rotate_session_id(created.id)
        # The conversation continues under the new id; a retried message_id is found.
        retried = store.add_message(rotated.id, "user", "again", message_id="m1")
        assert (retried.seq, retried.content) == (1, "one")
        assert store.add_message(rotated.id, "user", "two").seq == 2
        assert [m.seq for m in store.get_messages(rotated.id)] == [1, 2]

    def test_rotate_missing(self, store: SessionStore) -> None:
        with pytest.raises(SessionNotFound):
            store.rotate_session_id("missing")

    # -- list ----------------------------------------------------------------------

    def test_list_sessions_most_recent_first(self, store: SessionStore) -> None:
        first = store.create_session("u")
        second = store.create_session("u")
        third = store.create_session("u")
        store.create_session("someone-else")
        time.sleep(0.002)  # distinct updated_at even on a coarse clock
        store.update_session(second.id, {"x": 1})
        time.sleep(0.002)
        store.add_message(first.id, "user", "hi")
        listed = store.list_sessions("u")
        assert [s.id for s in listed] == [first.id, second.id, third.id]
        assert listed[0] == store.get_session(first.id)
        assert [s.id for s in store.list_sessions("u", limit=2)] == [first.id, second.id]
        assert store.list_sessions("u", limit=0) == []
        assert store.list_sessions("nobody") == []

    def test_list_sessions_keyset_paging(self, store: SessionStore) -> None:
        created = {store.create_session("pager").id for _ in range(7)}
        seen: list[Session] = []
        after: Session | None = None
        while True:
            page = store.list_sessions("pager", limit=3, after=after)
            if not page:
                break
            seen.extend(page)
            after = page[-1]
        assert {s.id for s in seen} == created
        assert len(seen) == 7
        keys = [(-s.updated_at.timestamp(), s.id) for s in seen]
        assert keys == sorted(keys)
        by_pair = store.list_sessions("pager", limit=3, after=(seen[2].updated_at, seen[2].id))
        assert by_pair == seen[3:6]

    def test_list_sessions_skips_expired(self, make_store: Callable[..., SessionStore]) -> None:
        clock = FakeClock()
        store = make_store(clock=clock)
        store.create_session("u", ttl=50)
        kept = store.create_session("u", ttl=500)
        clock.advance(100)
        assert [s.id for s in store.list_sessions("u")] == [kept.id]

    def test_list_sessions_bad_input(self, store: SessionStore) -> None:
        with pytest.raises(InvalidSessionData):
            store.list_sessions(5)  # type: ignore[arg-type]
        with pytest.raises(InvalidSessionData):
            store.list_sessions("u", limit=-1)
        with pytest.raises(InvalidSessionData):
            store.list_sessions("u", after="cursor")  # type: ignore[arg-type]

    # -- messages ----------------------------------------------------------------

    def test_add_message(self, store: SessionStore) -> None:
        created = store.create_session()
        first = store.add_message(created.id, "user", "hello", metadata={"lang": "en"})
        assert first.session_id == created.id
        assert (first.seq, first.role, first.content, first.metadata) == (
            1,
            "user",
            "hello",
            {"lang": "en"},
        )
        assert first.id
        assert abs(first.created_at - datetime.now(timezone.utc)) < CLOCK_TOLERANCE
        second = store.add_message(created.id, "assistant", "hi!", message_id="reply-1")
        assert (second.seq, second.id) == (2, "reply-1")
        assert store.get_messages(created.id) == [first, second]
        session = store.get_session(created.id)
        assert session is not None
        assert session.version == 3  # every append bumps the session
        assert session.updated_at >= created.updated_at

    def test_generated_message_ids_are_distinct(self, store: SessionStore) -> None:
        created = store.create_session()
        ids = {store.add_message(created.id, "user", str(i)).id for i in range(20)}
        assert len(ids) == 20

    def test_add_message_missing_session(self, store: SessionStore) -> None:
        with pytest.raises(SessionNotFound):
            store.add_message("missing", "user", "hi")

    def test_add_message_retry_returns_stored(self, store: SessionStore) -> None:
        created = store.create_session()
        stored = store.add_message(created.id, "user", "original", message_id="m-1")
        version = cast(Session, store.get_session(created.id)).version
        retried = store.add_message(created.id, "user", "changed", message_id="m-1")
        assert retried == stored
        assert store.get_messages(created.id) == [stored]
        assert cast(Session, store.get_session(created.id)).version == version
        assert store.add_message(created.id, "user", "next").seq == 2

    def test_same_message_id_in_two_sessions(self, store: SessionStore) -> None:
        one, two = store.create_session(), store.create_session()
        assert store.add_message(one.id, "user", "a", message_id="same").seq == 1
        assert store.add_message(two.id, "user", "b", message_id="same").content == "b"

    def test_concurrent_appends_get_distinct_seqs(
        self, make_store: Callable[..., SessionStore]
    ) -> None:
        stores = [make_store() for _ in range(2)]
        created = stores[0].create_session()
        per_thread = 15
        results: list[Message] = []
        lock = threading.Lock()

        def append(index: int) -> Callable[[], None]:
            def run() -> None:
                for i in range(per_thread):
                    message = stores[index % 2].add_message(created.id, "user", f"{index}-{i}")
                    with lock:
                        results.append(message)

            return run

        _run_threads(*(append(index) for index in range(THREADS)))
        seqs = sorted(message.seq for message in results)
        assert seqs == list(range(1, THREADS * per_thread + 1))
        listed = stores[1].get_messages(created.id)
        assert [m.seq for m in listed] == seqs
        assert sorted(listed, key=lambda m: m.seq) == sorted(results, key=lambda m: m.seq)

    def test_concurrent_retries_append_once(self, make_store: Callable[..., SessionStore]) -> None:
        store = make_store()
        created = store.create_session()
        results: list[Message] = []
        lock = threading.Lock()

        def retry() -> None:
            message = store.add_message(created.id, "user", "once", message_id="idem")
            with lock:
                results.append(message)

        _run_threads(*([retry] * THREADS))
        assert len({(m.seq, m.id) for m in results}) == 1
        assert len(store.get_messages(created.id)) == 1

    @pytest.mark.parametrize("tail_size", [0, 5, 100])
    def test_message_windows(
        self, make_store: Callable[..., SessionStore], cache: redis.Redis | None, tail_size: int
    ) -> None:
        store = make_store(tail_size=tail_size)
        plain = make_store(cache=None)
        # Each window twice from the store (a miss, then what the first read cached)
        # and once from PostgreSQL; without a cache, once is all there is to read.
        readers = [store, store, plain] if cache is not None else [store]
        created = store.create_session()
        everything = [store.add_message(created.id, "user", f"m{i}") for i in range(12)]
        assert store.get_messages(created.id) == everything
        values = (None, 0, 1, 5, 7, 11, 12, 20)
        limits = (None, 0, 1, 3, 5, 100)
        for after_seq in values:
            for before_seq in values:
                for limit in limits:
                    window = {"after_seq": after_seq, "before_seq": before_seq, "limit": limit}
                    expected = reference_window(everything, **window)
                    for reader in readers:
                        assert reader.get_messages(created.id, **window) == expected, window

    def test_newest_n_then_page_backwards(self, make_store: Callable[..., SessionStore]) -> None:
        store = make_store(tail_size=4)
        created = store.create_session()
        everything = [store.add_message(created.id, "user", f"m{i}") for i in range(10)]
        pages: list[list[Message]] = []
        page = store.get_messages(created.id, limit=3)
        while page:
            pages.append(page)
            page = store.get_messages(created.id, limit=3, before_seq=page[0].seq)
        assert [m for page in reversed(pages) for m in page] == everything
        forward: list[Message] = []
        after = 0
        while chunk := store.get_messages(created.id, limit=4, after_seq=after):
            forward.extend(chunk)
            after = chunk[-1].seq
        assert forward == everything

    def test_tail_follows_appends(self, make_store: Callable[..., SessionStore]) -> None:
        store = make_store(tail_size=3)
        created = store.create_session()
        everything = []
        for i in range(8):
            everything.append(store.add_message(created.id, "user", f"m{i}"))
            assert store.get_messages(created.id, limit=2) == everything[-2:]
            assert store.get_messages(created.id) == everything

    def test_get_messages_of_missing_session(self, store: SessionStore) -> None:
        assert store.get_messages("missing") == []
        assert store.get_messages("missing", limit=5) == []

    # -- pop_message / clear_messages ------------------------------------------------

    def test_pop_message_removes_the_newest(self, store: SessionStore) -> None:
        created = store.create_session(data={"a": 1})
        added = [
            store.add_message(created.id, "user", f"m{i}", metadata={"i": i}) for i in range(3)
        ]
        before = cast(Session, store.get_session(created.id))
        assert store.pop_message(created.id) == added[2]
        assert store.get_messages(created.id) == added[:2]
        after = cast(Session, store.get_session(created.id))
        assert after.version == before.version + 1
        assert after.updated_at >= before.updated_at
        assert after.data == {"a": 1}
        assert store.pop_message(created.id) == added[1]
        assert store.pop_message(created.id) == added[0]
        assert store.get_messages(created.id) == []
        # An empty conversation pops nothing; the call still counts as a change.
        assert store.pop_message(created.id) is None
        assert cast(Session, store.get_session(created.id)).version == after.version + 3

    def test_seq_is_never_reused_after_pop_or_clear(self, store: SessionStore) -> None:
        created = store.create_session()
        for i in range(3):
            store.add_message(created.id, "user", f"m{i}")
        store.pop_message(created.id)
        fourth = store.add_message(created.id, "user", "after pop")
        assert fourth.seq == 4
        assert [m.seq for m in store.get_messages(created.id)] == [1, 2, 4]
        assert [m.seq for m in store.get_messages(created.id, limit=2)] == [2, 4]
        assert [m.seq for m in store.get_messages(created.id, after_seq=2)] == [4]
        assert store.clear_messages(created.id) == 3
        assert store.add_message(created.id, "user", "after clear").seq == 5

    def test_a_removed_message_id_appends_anew(self, store: SessionStore) -> None:
        created = store.create_session()
        first = store.add_message(created.id, "user", "first", message_id="turn-1")
        assert store.pop_message(created.id) == first
        again = store.add_message(created.id, "user", "again", message_id="turn-1")
        assert (again.seq, again.id, again.content) == (2, "turn-1", "again")
        assert store.add_message(created.id, "user", "retry", message_id="turn-1") == again
        assert store.clear_messages(created.id) == 1
        third = store.add_message(created.id, "user", "third", message_id="turn-1")
        assert (third.seq, third.content) == (3, "third")
        assert store.get_messages(created.id) == [third]

    def test_clear_messages_keeps_the_session(self, store: SessionStore) -> None:
        created = store.create_session("u", {"a": 1})
        for i in range(5):
            store.add_message(created.id, "user", f"m{i}")
        before = cast(Session, store.get_session(created.id))
        assert store.clear_messages(created.id) == 5
        assert store.get_messages(created.id) == []
        assert store.get_messages(created.id, limit=3) == []
        after = cast(Session, store.get_session(created.id))
        assert (after.user_id, after.data, after.version) == ("u", {"a": 1}, before.version + 1)
        assert store.clear_messages(created.id) == 0
        assert cast(Session, store.get_session(created.id)).version == before.version + 2
        assert store.pop_message(created.id) is None

    def test_pop_and_clear_of_a_missing_session(self, store: SessionStore) -> None:
        gone = store.create_session()
        store.add_message(gone.id, "user", "hi")
        store.delete_session(gone.id)
        rotated_from = store.create_session()
        store.add_message(rotated_from.id, "user", "hi")
        rotated = store.rotate_session_id(rotated_from.id)
        for session_id in ("missing", "", "x" * 300, gone.id, rotated_from.id):
            with pytest.raises(SessionNotFound):
                store.pop_message(session_id)
            with pytest.raises(SessionNotFound):
                store.clear_messages(session_id)
        for bad in (None, 5, b"bytes"):
            with pytest.raises(InvalidSessionData):
                store.pop_message(bad)  # type: ignore[arg-type]
            with pytest.raises(InvalidSessionData):
                store.clear_messages(bad)  # type: ignore[arg-type]
        # The conversation moved with the rotation.
        assert store.pop_message(rotated.id) is not None

    def test_pop_and_clear_of_an_expired_session(
        self, make_store: Callable[..., SessionStore]
    ) -> None:
        store = make_store(session_ttl=1.0)
        created = store.create_session()
        store.add_message(created.id, "user", "hi")
        assert len(store.get_messages(created.id)) == 1  # session and tail cached
        wait_until(lambda: store.get_session(created.id) is None, what="the session to expire")
        with pytest.raises(SessionNotFound):
            store.pop_message(created.id)
        with pytest.raises(SessionNotFound):
            store.clear_messages(created.id)

    def test_pop_and_clear_slide_the_idle_lifetime(
        self, make_store: Callable[..., SessionStore]
    ) -> None:
        store = make_store(session_ttl=600)
        created = store.create_session(ttl=5)
        store.add_message(created.id, "user", "a")
        store.add_message(created.id, "user", "b")
        for remove in (store.pop_message, store.clear_messages):
            store.touch_session(created.id, ttl=5)
            remove(created.id)
            session = cast(Session, store.get_session(created.id))
            assert session.expires_at is not None
            assert session.expires_at - session.updated_at > timedelta(seconds=500)

    def test_pop_and_clear_answer_alike_from_both_tiers(
        self, make_store: Callable[..., SessionStore]
    ) -> None:
        store = make_store(tail_size=4)
        plain = make_store(cache=None)
        created = store.create_session()
        for i in range(6):
            store.add_message(created.id, "user", f"m{i}")
        for round_ in range(3):
            for window in ({}, {"limit": 2}, {"limit": 5}, {"after_seq": 1}, {"before_seq": 5}):
                for _ in range(2):  # the second read is served by the tail when it can be
                    assert store.get_messages(created.id, **window) == plain.get_messages(
                        created.id, **window
                    ), (round_, window)
            assert store.get_session(created.id) == plain.get_session(created.id)
            store.pop_message(created.id)
            store.add_message(created.id, "user", f"after pop {round_}")
        store.clear_messages(created.id)
        assert store.get_messages(created.id, limit=3) == plain.get_messages(created.id) == []

    def test_no_reader_sees_a_popped_or_cleared_message(
        self, make_store: Callable[..., SessionStore], needs_cache: redis.Redis
    ) -> None:
        writer, reader = make_store(), make_store()
        created = writer.create_session()
        added = [writer.add_message(created.id, "user", f"m{i}") for i in range(5)]
        assert reader.get_messages(created.id, limit=3) == added[-3:]
        assert reader.get_messages(created.id, limit=3) == added[-3:]  # from the tail
        assert reader.stats()["message_hits"] >= 1
        popped = writer.pop_message(created.id)
        assert popped == added[-1]
        assert reader.get_messages(created.id, limit=3) == added[-4:-1]
        assert reader.get_messages(created.id) == added[:-1]
        assert reader.get_session(created.id) == writer.get_session(created.id)
        assert writer.clear_messages(created.id) == 4
        assert reader.get_messages(created.id, limit=3) == []
        assert reader.get_messages(created.id) == []
        newer = writer.add_message(created.id, "user", "new")
        assert reader.get_messages(created.id, limit=3) == [newer]

    def test_pop_during_tail_fill_does_not_resurrect(
        self,
        make_store: Callable[..., SessionStore],
        session_docstore: docstore.DocumentStore,
        collections: tuple[str, str],
        needs_cache: redis.Redis,
    ) -> None:
        proxy = DocstoreProxy(session_docstore)
        reader = make_store(docstore=proxy)
        writer = make_store()
        created = writer.create_session()
        added = [writer.add_message(created.id, "user", f"m{i}") for i in range(3)]
        reader.get_session(created.id)  # the session is cached; the tail is not
        reached, go = proxy.pause_after_once("query", collections[1])
        results: dict[str, list[Message]] = {}
        thread = threading.Thread(target=lambda: results.update(r=reader.get_messages(created.id)))
        thread.start()
        assert reached.wait(10)  # the reader holds all three, read under its tail lease
        assert writer.pop_message(created.id) == added[-1]
        go.set()
        thread.join(10)
        assert results["r"] == added  # it read before the pop: fine to answer that
        assert reader.get_messages(created.id) == added[:-1]
        assert reader.get_messages(created.id, limit=1) == added[1:2]

    def test_a_late_append_update_cannot_bring_a_popped_message_back(
        self,
        make_store: Callable[..., SessionStore],
        session_docstore: docstore.DocumentStore,
        collections: tuple[str, str],
        needs_cache: redis.Redis,
    ) -> None:
        """An append whose cache update arrives after a pop of its message and a refill."""
        proxy = DocstoreProxy(session_docstore)
        appender = make_store(docstore=proxy)
        other = make_store()
        created = other.create_session()
        first = other.add_message(created.id, "user", "first")
        assert other.get_messages(created.id) == [first]  # session and tail cached
        appender.get_session(created.id)  # the appender knows the conversation key
        reached, go = proxy.pause_after_once("append", collections[1])
        results: dict[str, Message] = {}
        thread = threading.Thread(
            target=lambda: results.update(m=appender.add_message(created.id, "user", "second"))
        )
        thread.start()
        try:
            assert reached.wait(10)  # committed; its cache update not sent yet
            popped = other.pop_message(created.id)
            assert popped is not None and popped.content == "second"
            # A reader refills the tail: [first], its fence at seq 1.
            assert other.get_messages(created.id) == [first]
        finally:
            go.set()
            thread.join(10)
        assert results["m"] == popped
        for store in (other, appender):
            assert store.get_messages(created.id) == [first]
            assert store.get_messages(created.id, limit=1) == [first]

    def test_concurrent_pops_never_return_the_same_message(
        self, make_store: Callable[..., SessionStore]
    ) -> None:
        stores = [make_store() for _ in range(2)]
        created = stores[0].create_session()
        total = 40
        added = [stores[0].add_message(created.id, "user", f"m{i}") for i in range(total)]
        stores[1].get_messages(created.id)  # a cached tail for the pops to keep right
        lock = threading.Lock()
        popped: list[Message] = []
        empty_pops = [0]

        def popper(index: int) -> Callable[[], None]:
            def run() -> None:
                while True:
                    message = stores[index % 2].pop_message(created.id)
                    with lock:
                        if message is None:
                            empty_pops[0] += 1
                            return
                        popped.append(message)

            return run

        _run_threads(*(popper(index) for index in range(THREADS)))
        assert sorted(popped, key=lambda m: m.seq) == added
        assert len({m.seq for m in popped}) == total
        for store in stores:
            assert store.get_messages(created.id) == []
            assert store.get_messages(created.id, limit=5) == []
        session = cast(Session, stores[1].get_session(created.id))
        assert session.version == 1 + total + total + empty_pops[0]
        assert stores[0].add_message(created.id, "user", "next").seq == total + 1

    def test_pops_racing_appends_lose_and_resurrect_nothing(
        self,
        make_store: Callable[..., SessionStore],
        session_docstore: docstore.DocumentStore,
        needs_cache: redis.Redis,
        key_prefix: str,
    ) -> None:
        """Every appended message ends up popped once or still stored, never both, never
        twice; no read that starts after a pop returned shows the popped message."""
        proxy = DocstoreProxy(session_docstore)
        proxy.jitter = 0.002
        stores = [make_store(docstore=proxy, tail_size=8, lease_wait=0.01) for _ in range(3)]
        created = stores[0].create_session()
        keys = session_keys(key_prefix, created.id)
        lock = threading.Lock()
        appended: list[Message] = []
        popped: list[Message] = []
        resurrected: list[int] = []
        stop = threading.Event()

        def appender(index: int) -> Callable[[], None]:
            def run() -> None:
                for i in range(15):
                    message = stores[index % 3].add_message(created.id, "user", f"{index}.{i}")
                    with lock:
                        appended.append(message)

            return run

        def popper(index: int) -> Callable[[], None]:
            def run() -> None:
                for _ in range(12):
                    message = stores[index % 3].pop_message(created.id)
                    if message is not None:
                        with lock:
                            popped.append(message)

            return run

        def reader(index: int) -> Callable[[], None]:
            def run() -> None:
                while not stop.is_set():
                    with lock:
                        gone = {message.seq for message in popped}
                    messages = stores[index % 3].get_messages(created.id, limit=4)
                    resurrected.extend(m.seq for m in messages if m.seq in gone)
                    assert [m.seq for m in messages] == sorted({m.seq for m in messages})

            return run

        def evictor() -> None:
            while not stop.is_set():
                needs_cache.delete(keys.tail, keys.fence)
                time.sleep(random.random() * 0.005)

        def writers() -> None:
            try:
                _run_threads(
                    *(appender(index) for index in range(3)),
                    *(popper(index) for index in range(2)),
                )
            finally:
                stop.set()

        _run_threads(writers, evictor, *(reader(index) for index in range(3)))
        assert resurrected == []
        popped_seqs = [m.seq for m in popped]
        assert len(popped_seqs) == len(set(popped_seqs))
        remaining = stores[1].get_messages(created.id)
        assert sorted(popped_seqs + [m.seq for m in remaining]) == sorted(m.seq for m in appended)
        assert remaining == sorted(
            (m for m in appended if m.seq not in set(popped_seqs)), key=lambda m: m.seq
        )
        plain = make_store(cache=None)
        for window in ({}, {"limit": 4}, {"limit": 1}):
            assert stores[2].get_messages(created.id, **window) == plain.get_messages(
                created.id, **window
            )

    # -- both tiers answer the same ------------------------------------------------

    def test_cache_and_docstore_answer_alike(self, make_store: Callable[..., SessionStore]) -> None:
        store = make_store()
        plain = make_store(cache=None)
        created = store.create_session("ü", RICH_DATA)
        store.add_message(created.id, "user", "✓ text", metadata=RICH_DATA)
        store.add_message(created.id, "assistant", "", metadata={})
        for _ in range(2):  # the second round is served from the cache
            assert store.get_session(created.id) == plain.get_session(created.id)
            assert store.get_messages(created.id) == plain.get_messages(created.id)
            assert store.get_messages(created.id, limit=1) == plain.get_messages(
                created.id, limit=1
            )
        updated = store.update_session(created.id, {"more": [1.25]})
        assert store.get_session(created.id) == updated == plain.get_session(created.id)

    # -- cache behaviour -----------------------------------------------------------

    def test_miss_then_hit(self, store: SessionStore, needs_cache: redis.Redis) -> None:
        created = store.create_session()
        before = store.stats()
        store.get_session(created.id)
        store.get_session(created.id)
        after = store.stats()
        assert after["misses"] - before["misses"] == 1
        assert after["hits"] - before["hits"] == 1
        assert after["fills"] - before["fills"] == 1
        assert after["cache_errors"] == 0

    def test_no_cache_counts_misses(
        self, make_store: Callable[..., SessionStore], cache: redis.Redis | None
    ) -> None:
        store = make_store(cache=None)
        created = store.create_session()
        store.get_session(created.id)
        stats = store.stats()
        assert stats["hits"] == 0 and stats["misses"] == 1 and stats["cache_errors"] == 0

    def test_hit_touches_docstore_not_at_all(
        self,
        make_store: Callable[..., SessionStore],
        session_docstore: docstore.DocumentStore,
        needs_cache: redis.Redis,
    ) -> None:
        proxy = DocstoreProxy(session_docstore)
        store = make_store(docstore=proxy)
        created = store.create_session(data={"a": 1})
        for i in range(5):
            store.add_message(created.id, "user", f"m{i}")
        store.get_session(created.id)
        # A cold read caches what it read: read everything once, and every window is a hit.
        store.get_messages(created.id)
        proxy.reset()
        before = store.stats()
        assert store.get_session(created.id) is not None
        assert len(store.get_messages(created.id, limit=3)) == 3
        assert len(store.get_messages(created.id)) == 5
        assert len(store.get_messages(created.id, after_seq=2)) == 3
        assert proxy.total_calls() == 0
        after = store.stats()
        assert after["hits"] - before["hits"] == 4
        assert after["message_hits"] - before["message_hits"] == 3

    def test_writes_cost_one_docstore_call(
        self,
        make_store: Callable[..., SessionStore],
        session_docstore: docstore.DocumentStore,
        cache: redis.Redis | None,
    ) -> None:
        proxy = DocstoreProxy(session_docstore)
        store = make_store(docstore=proxy)
        created = store.create_session()
        store.get_session(created.id)
        proxy.reset()
        store.update_session(created.id, {"a": 1})
        assert dict(proxy.calls) == {"update": 1}
        proxy.reset()
        store.add_message(created.id, "user", "hi")
        # The session (for its conversation key) is a cache hit; without a cache, a read.
        expected = {"append": 1} if cache is not None else {"read": 1, "append": 1}
        assert dict(proxy.calls) == expected
        proxy.reset()
        store.pop_message(created.id)
        assert dict(proxy.calls) == {"pop_child": 1}  # the conversation key is known now
        proxy.reset()
        store.clear_messages(created.id)
        assert dict(proxy.calls) == {"delete_children": 1}

    def test_refill_after_eviction(
        self, store: SessionStore, needs_cache: redis.Redis, key_prefix: str
    ) -> None:
        created = store.create_session()
        store.get_session(created.id)
        needs_cache.delete(*session_keys(key_prefix, created.id).all())
        before = store.stats()
        assert store.get_session(created.id) == created
        assert store.get_session(created.id) == created
        after = store.stats()
        assert (after["misses"] - before["misses"], after["hits"] - before["hits"]) == (1, 1)

    def test_writer_never_installs_into_absent_key(
        self, store: SessionStore, needs_cache: redis.Redis, key_prefix: str
    ) -> None:
        created = store.create_session()
        store.update_session(created.id, {"a": 1})
        store.touch_session(created.id)
        keys = session_keys(key_prefix, created.id)
        assert needs_cache.exists(keys.value) == 0
        # add_message reads the session first (a reader's fill), but never creates the tail.
        store.add_message(created.id, "user", "hi")
        assert needs_cache.exists(keys.tail, keys.fence) == 0

    def test_keys_share_one_cluster_slot(
        self, store: SessionStore, needs_cache: redis.Redis, key_prefix: str
    ) -> None:
        created = store.create_session()
        store.add_message(created.id, "user", "hi")
        store.get_session(created.id)
        store.get_messages(created.id)
        keys = list(needs_cache.scan_iter(match=f"{key_prefix}*"))
        assert len(keys) >= 3
        assert all(created.id.encode() in key for key in keys)
        assert len({key_slot(key) for key in keys}) == 1
        odd_keys = session_keys(key_prefix, "x}{y").all()
        assert len({key_slot(key.encode()) for key in odd_keys}) == 1

    @pytest.mark.parametrize(
        "garbage",
        [b"\xc1 not msgpack", b"\x92\x00\x05", b"\x93\x01\x05\xa1x", b"", b"\x92\x01\xc0"[:2]],
        ids=["not-msgpack", "old-format", "wrong-shape", "empty", "truncated"],
    )
    def test_undecodable_value_is_a_miss(
        self, store: SessionStore, needs_cache: redis.Redis, key_prefix: str, garbage: bytes
    ) -> None:
        created = store.create_session(data={"a": 1})
        store.get_session(created.id)
        value_key = session_keys(key_prefix, created.id).value
        needs_cache.set(value_key, garbage)
        before = store.stats()
        assert store.get_session(created.id) == created
        after = store.stats()
        assert after["decode_errors"] - before["decode_errors"] == 1
        assert after["misses"] - before["misses"] == 1
        assert decode_session(needs_cache.get(value_key), created.id).session == created
        assert store.get_session(created.id) == created
        assert store.stats()["hits"] - after["hits"] == 1

    def test_wrong_type_value_is_a_miss(
        self, store: SessionStore, needs_cache: redis.Redis, key_prefix: str
    ) -> None:
        created = store.create_session(data={"a": 1})
        keys = session_keys(key_prefix, created.id)
        needs_cache.rpush(keys.value, b"a list, not a string")
        assert store.get_session(created.id) == created
        assert store.stats()["decode_errors"] == 1
        assert store.stats()["cache_errors"] == 0
        assert store.get_session(created.id) == created

    def test_undecodable_tail_is_a_miss(
        self, store: SessionStore, needs_cache: redis.Redis, key_prefix: str
    ) -> None:
        created = store.create_session()
        everything = [store.add_message(created.id, "user", f"m{i}") for i in range(3)]
        assert store.get_messages(created.id) == everything
        keys = session_keys(key_prefix, created.id)
        needs_cache.lset(keys.tail, 1, b"\xc1garbage")  # type: ignore[arg-type]
        assert store.get_messages(created.id) == everything
        assert store.stats()["decode_errors"] == 1
        assert store.get_messages(created.id) == everything
        needs_cache.set(keys.fence, b"not a number")
        assert store.get_messages(created.id) == everything
        needs_cache.set(keys.tail, b"a string, not a list")
        assert store.get_messages(created.id) == everything
        assert store.stats()["cache_errors"] == 0

    @pytest.mark.flushes_redis_scripts
    def test_scripts_reload_after_a_flush(
        self, store: SessionStore, needs_cache: redis.Redis, key_prefix: str
    ) -> None:
        created = store.create_session()
        message = store.add_message(created.id, "user", "hi")
        assert store.get_messages(created.id) == [message]  # the tail and its fence are cached
        cached = store.get_session(created.id)
        keys = session_keys(key_prefix, created.id)
        needs_cache.script_flush()  # as after a Redis restart or failover
        assert store.get_session(created.id) == cached
        # The restart fence dropped every key of the session, the tail's included.
        assert needs_cache.exists(keys.tail, keys.fence) == 0
        assert store.get_messages(created.id) == [message]
        assert store.update_session(created.id, {"a": 1}).version == 3
        assert store.stats()["cache_errors"] == 0

    def test_tombstone_answers_after_delete(
        self, store: SessionStore, needs_cache: redis.Redis, key_prefix: str
    ) -> None:
        created = store.create_session()
        store.get_session(created.id)
        store.delete_session(created.id)
        assert needs_cache.get(session_keys(key_prefix, created.id).value) == TOMBSTONE
        before = store.stats()
        assert store.get_session(created.id) is None
        assert store.stats()["hits"] - before["hits"] == 1

    def test_lease_waiter_gets_the_fill(
        self,
        make_store: Callable[..., SessionStore],
        session_docstore: docstore.DocumentStore,
        collections: tuple[str, str],
        needs_cache: redis.Redis,
    ) -> None:
        proxy = DocstoreProxy(session_docstore)
        filler = make_store(docstore=proxy)
        # Far longer than the test needs: the waiter must not give up on a slow machine.
        waiter = make_store(docstore=proxy, lease_wait=30.0)
        created = filler.create_session(data={"a": 1})
        reached, go = proxy.pause_after_once("read", collections[0])
        results: dict[str, Session | None] = {}
        filling = threading.Thread(target=lambda: results.update(f=filler.get_session(created.id)))
        filling.start()
        assert reached.wait(10)  # the filler holds the lease, its read not yet installed
        proxy.reset()
        waiting = threading.Thread(target=lambda: results.update(w=waiter.get_session(created.id)))
        waiting.start()
        # Release the filler only once the waiter has met the lease, however long that takes.
        wait_until(lambda: waiter.stats()["lease_waits"] == 1, what="the waiter to meet the lease")
        go.set()
        filling.join(30)
        waiting.join(60)
        assert not waiting.is_alive()
        assert results["f"] == created
        assert results["w"] == created  # waited for the filler
        assert proxy.calls["read"] == 0
        stats = waiter.stats()
        assert (stats["lease_waits"], stats["lease_timeouts"], stats["hits"]) == (1, 0, 1)

    def test_lease_waiter_gives_up(
        self,
        make_store: Callable[..., SessionStore],
        session_docstore: docstore.DocumentStore,
        collections: tuple[str, str],
        needs_cache: redis.Redis,
    ) -> None:
        proxy = DocstoreProxy(session_docstore)
        filler = make_store(docstore=proxy)
        waiter = make_store(lease_wait=0.02)
        created = filler.create_session(data={"a": 1})
        with paused_fill(proxy, collections[0], lambda: filler.get_session(created.id)):
            assert waiter.get_session(created.id) == created  # read the docstore instead
            stats = waiter.stats()
            assert (stats["lease_waits"], stats["lease_timeouts"], stats["fills"]) == (1, 1, 0)

    # -- coherence -------------------------------------------------------------

    def test_classic_race_cannot_install_a_stale_value(
        self,
        make_store: Callable[..., SessionStore],
        session_docstore: docstore.DocumentStore,
        collections: tuple[str, str],
        needs_cache: redis.Redis,
        key_prefix: str,
    ) -> None:
        """A reader loads v1, pauses; a writer commits v2; the reader's v1 must not land."""
        proxy = DocstoreProxy(session_docstore)
        reader = make_store(docstore=proxy)
        writer = make_store()
        created = writer.create_session(data={"n": 1})
        with paused_fill(proxy, collections[0], lambda: reader.get_session(created.id)) as results:
            # The reader holds v1, read under its lease.
            updated = writer.update_session(created.id, {"n": 2})
        assert results["value"] == created  # it may answer what it read: it started first
        assert reader.stats()["fills_refused"] == 1
        raw = needs_cache.get(session_keys(key_prefix, created.id).value)
        assert raw is None or decode_session(raw, created.id).session == updated
        assert reader.get_session(created.id) == updated
        assert writer.get_session(created.id) == updated

    def test_writer_replaces_an_older_copy(
        self, make_store: Callable[..., SessionStore], needs_cache: redis.Redis, key_prefix: str
    ) -> None:
        """A fill that lands before the writer's script runs is replaced by it."""
        one, two = make_store(), make_store()
        created = one.create_session(data={"n": 1})
        assert one.get_session(created.id) == created
        assert one.stats()["fills"] == 1  # (a miss does not wait for its fill's reply)
        updated = two.update_session(created.id, {"n": 2})
        raw = needs_cache.get(session_keys(key_prefix, created.id).value)
        assert decode_session(raw, created.id).session == updated
        assert one.get_session(created.id) == updated

    def test_delete_during_fill_does_not_resurrect(
        self,
        make_store: Callable[..., SessionStore],
        session_docstore: docstore.DocumentStore,
        collections: tuple[str, str],
        needs_cache: redis.Redis,
    ) -> None:
        proxy = DocstoreProxy(session_docstore)
        reader = make_store(docstore=proxy)
        writer = make_store()
        created = writer.create_session(data={"n": 1})
        with paused_fill(proxy, collections[0], lambda: reader.get_session(created.id)):
            assert writer.delete_session(created.id) is True
        assert reader.get_session(created.id) is None
        assert writer.get_session(created.id) is None

    def test_rotate_during_fill_does_not_resurrect(
        self,
        make_store: Callable[..., SessionStore],
        session_docstore: docstore.DocumentStore,
        collections: tuple[str, str],
        needs_cache: redis.Redis,
    ) -> None:
        proxy = DocstoreProxy(session_docstore)
        reader = make_store(docstore=proxy)
        writer = make_store()
        created = writer.create_session(data={"n": 1})
        with paused_fill(proxy, collections[0], lambda: reader.get_session(created.id)):
            rotated = writer.rotate_session_id(created.id)
        assert reader.get_session(created.id) is None
        assert reader.get_session(rotated.id) == rotated

    def test_append_during_tail_fill_is_not_lost(
        self,
        make_store: Callable[..., SessionStore],
        session_docstore: docstore.DocumentStore,
        collections: tuple[str, str],
        needs_cache: redis.Redis,
    ) -> None:
        proxy = DocstoreProxy(session_docstore)
        reader = make_store(docstore=proxy)
        writer = make_store()
        created = writer.create_session()
        first = writer.add_message(created.id, "user", "one")
        reader.get_session(created.id)  # the session is cached; the tail is not
        reached, go = proxy.pause_after_once("query", collections[1])
        results: dict[str, list[Message]] = {}
        thread = threading.Thread(target=lambda: results.update(r=reader.get_messages(created.id)))
        thread.start()
        assert reached.wait(10)  # the reader holds [one], read under its tail lease
        second = writer.add_message(created.id, "user", "two")
        go.set()
        thread.join(10)
        assert results["r"] == [first]
        assert reader.get_messages(created.id) == [first, second]
        assert reader.get_messages(created.id, limit=1) == [second]

    def test_no_stale_reads_under_concurrency(
        self,
        make_store: Callable[..., SessionStore],
        session_docstore: docstore.DocumentStore,
        key_prefix: str,
        needs_cache: redis.Redis,
    ) -> None:
        """Once update_session returned version v, no read that starts later sees less."""
        proxy = DocstoreProxy(session_docstore)
        proxy.jitter = 0.002
        stores = [make_store(docstore=proxy, lease_wait=0.01) for _ in range(3)]
        created = stores[0].create_session(data={"n": 0})
        keys = session_keys(key_prefix, created.id)
        lock = threading.Lock()
        returned = [created.version]
        stale: list[tuple[int, int]] = []
        stop = threading.Event()

        def exercised() -> bool:
            totals = Counter[str]()
            for store in stores:
                totals.update(store.stats())
            return totals["fills"] > 0 and totals["hits"] > 0

        def writer(index: int) -> Callable[[], None]:
            def run() -> None:
                # 40 writes each, and on until the race has seen fills and hits (new
                # connections are slow to open at first: a short run may see none).
                for i in range(400):
                    if i >= 40 and (index or exercised()):
                        break
                    session = stores[index % 3].update_session(created.id, {"n": i})
                    with lock:
                        returned[0] = max(returned[0], session.version)

            return run

        def reader(index: int) -> Callable[[], None]:
            def run() -> None:
                while not stop.is_set():
                    with lock:
                        floor = returned[0]
                    session = stores[index % 3].get_session(created.id)
                    assert session is not None
                    if session.version < floor:
                        stale.append((session.version, floor))

            return run

        def evictor() -> None:
            # Force fills all the time, so that fills race the writers.
            while not stop.is_set():
                needs_cache.delete(keys.value)
                time.sleep(random.random() * 0.003)

        def writers() -> None:
            try:
                _run_threads(*(writer(index) for index in range(3)))
            finally:
                stop.set()

        _run_threads(writers, evictor, *(reader(index) for index in range(5)))
        assert stale == []
        final = stores[1].get_session(created.id)
        assert final is not None and final.version == returned[0]
        totals = Counter[str]()
        for store in stores:
            totals.update(store.stats())
        assert totals["fills"] > 0 and totals["hits"] > 0
        assert totals["cache_errors"] == 0

    def test_no_stale_messages_under_concurrency(
        self,
        make_store: Callable[..., SessionStore],
        session_docstore: docstore.DocumentStore,
        key_prefix: str,
        needs_cache: redis.Redis,
    ) -> None:
        """Once add_message returned seq s, no later get_messages misses it."""
        proxy = DocstoreProxy(session_docstore)
        proxy.jitter = 0.002
        stores = [make_store(docstore=proxy, tail_size=8, lease_wait=0.01) for _ in range(3)]
        created = stores[0].create_session()
        keys = session_keys(key_prefix, created.id)
        lock = threading.Lock()
        returned = [0]
        stale: list[tuple[int, int]] = []
        stop = threading.Event()

        def appender(index: int) -> Callable[[], None]:
            def run() -> None:
                for i in range(25):
                    message = stores[index % 3].add_message(created.id, "user", f"{index}.{i}")
                    with lock:
                        returned[0] = max(returned[0], message.seq)

            return run

        def reader(index: int) -> Callable[[], None]:
            def run() -> None:
                while not stop.is_set():
                    with lock:
                        floor = returned[0]
                    messages = stores[index % 3].get_messages(created.id, limit=3)
                    last = messages[-1].seq if messages else 0
                    if last < floor:
                        stale.append((last, floor))
                    assert [m.seq for m in messages] == list(
                        range(last - len(messages) + 1, last + 1)
                    )

            return run

        def evictor() -> None:
            while not stop.is_set():
                needs_cache.delete(keys.tail, keys.fence)
                time.sleep(random.random() * 0.005)

        def appenders() -> None:
            try:
                _run_threads(*(appender(index) for index in range(3)))
            finally:
                stop.set()

        _run_threads(appenders, evictor, *(reader(index) for index in range(4)))
        assert stale == []
        everything = stores[2].get_messages(created.id)
        assert [m.seq for m in everything] == list(range(1, 76))

    # -- the tail's byte budget -------------------------------------------------------

    @staticmethod
    def cached_tail(
        cache: redis.Redis, key_prefix: str, session_id: str, *settle: SessionStore
    ) -> list[Message]:
        """Return the cached tail of a session, checking it against its budget's rules.

        The tail's bytes are measured in Redis (the values' lengths, and on a
        real server MEMORY USAGE too) and must match what the fence records.
        The stores in `settle` first read the replies of fills they sent (a cold
        read returns before its fill's reply; `stats()` reads it), so the fills
        have run when this client looks.
        """
        for store in settle:
            store.stats()
        keys = session_keys(key_prefix, session_id)
        entries = cache.lrange(keys.tail, 0, -1)
        fence = cache.get(keys.fence)
        tail = [decode_message(entry, session_id) for entry in entries]
        if fence is None:
            return tail
        last, recorded, _ = (int(part) for part in fence.split(b":"))
        assert recorded == sum(len(entry) for entry in entries)
        assert [m.seq for m in tail] == list(range(last - len(tail) + 1, last + 1))
        return tail

    @staticmethod
    def assert_within_budget(
        cache: redis.Redis, key_prefix: str, session_id: str, budget: int
    ) -> None:
        keys = session_keys(key_prefix, session_id)
        assert sum(len(entry) for entry in cache.lrange(keys.tail, 0, -1)) <= budget
        try:
            used = cache.memory_usage(keys.tail, samples=0)
        except redis.ResponseError:
            return  # fakeredis has no MEMORY USAGE; the values' lengths are measured above
        # Redis's own overhead comes on top of the values: an allocator size
        # class (at most a quarter more) and a few dozen bytes per key and entry.
        assert used is None or used <= budget * 1.25 + 1024

    @staticmethod
    def newest_that_fit(messages: list[Message], budget: int, count: int) -> list[Message]:
        """Return the newest run of messages whose encoded sizes fit the budget."""
        fitting: list[Message] = []
        used = 0
        for message in reversed(messages):
            size = len(encode_message(message))
            if len(fitting) >= count or used + size > budget:
                break
            fitting.insert(0, message)
            used += size
        return fitting

    def test_tail_keeps_the_newest_messages_that_fit(
        self, make_store: Callable[..., SessionStore], needs_cache: redis.Redis, key_prefix: str
    ) -> None:
        budget = 2048
        store = make_store(tail_bytes=budget, tail_size=10)
        created = store.create_session()
        assert store.get_messages(created.id) == []  # caches the empty tail
        everything: list[Message] = []
        sizes = random.Random(15).choices([10, 200, 700, 1500, 1900, 3000], k=40)
        for i, size in enumerate(sizes):
            everything.append(store.add_message(created.id, "user", f"{i}:" + "x" * size))
            self.assert_within_budget(needs_cache, key_prefix, created.id, budget)
            # An append trims the tail to the newest that fit, instead of growing it.
            tail = self.cached_tail(needs_cache, key_prefix, created.id, store)
            assert tail == self.newest_that_fit(everything, budget, 10)
            for limit in (1, 3, 12):
                assert store.get_messages(created.id, limit=limit) == everything[-limit:]
        assert store.get_messages(created.id) == everything
        self.assert_within_budget(needs_cache, key_prefix, created.id, budget)

    @pytest.mark.parametrize("budget", [0, 300, 5000])
    def test_reads_are_correct_across_the_budget_edge(
        self,
        make_store: Callable[..., SessionStore],
        cache: redis.Redis | None,
        key_prefix: str,
        budget: int,
    ) -> None:
        store = make_store(tail_bytes=budget, tail_size=100)
        created = store.create_session()
        everything = [
            store.add_message(created.id, "user", f"m{i}" + "y" * (i * 37 % 400)) for i in range(12)
        ]
        keys = session_keys(key_prefix, created.id)
        values = (None, 0, 5, 11, 20)
        for after_seq in values:
            for before_seq in values:
                for limit in (None, 0, 1, 3, 100):
                    window = {"after_seq": after_seq, "before_seq": before_seq, "limit": limit}
                    expected = reference_window(everything, **window)
                    if cache is not None:
                        cache.delete(keys.tail, keys.fence)  # cold: this window fills the tail
                    assert store.get_messages(created.id, **window) == expected, window
                    assert store.get_messages(created.id, **window) == expected, window
                    if cache is not None:
                        self.assert_within_budget(cache, key_prefix, created.id, budget)
                        self.cached_tail(cache, key_prefix, created.id, store)

    def test_huge_message_is_served_from_the_docstore(
        self,
        make_store: Callable[..., SessionStore],
        session_docstore: docstore.DocumentStore,
        collections: tuple[str, str],
        needs_cache: redis.Redis,
        key_prefix: str,
    ) -> None:
        proxy = DocstoreProxy(session_docstore)
        store = make_store(docstore=proxy, tail_bytes=1024)
        created = store.create_session()
        small = store.add_message(created.id, "user", "small")
        assert store.get_messages(created.id) == [small]
        huge = store.add_message(created.id, "tool", "z" * 5000)
        assert self.cached_tail(needs_cache, key_prefix, created.id, store) == []
        needs_cache.delete(*session_keys(key_prefix, created.id).all())
        for _ in range(2):  # cold, then again with the (empty) tail cached
            proxy.reset()
            assert store.get_messages(created.id, limit=1) == [huge]
            # One docstore read of the messages (with the session's, when cold).
            assert proxy.calls["query"] + proxy.calls["read_with"] == 1
            assert self.cached_tail(needs_cache, key_prefix, created.id, store) == []
        after = store.add_message(created.id, "assistant", "after")
        proxy.reset()
        assert store.get_messages(created.id, limit=1) == [after]
        assert proxy.total_calls() == 0  # served from the tail, which restarts after the huge one
        assert store.get_messages(created.id) == [small, huge, after]
        assert self.cached_tail(needs_cache, key_prefix, created.id, store) == [after]

    def test_cold_read_costs_what_it_returns(
        self,
        make_store: Callable[..., SessionStore],
        session_docstore: docstore.DocumentStore,
        collections: tuple[str, str],
        needs_cache: redis.Redis,
        key_prefix: str,
    ) -> None:
        proxy = DocstoreProxy(session_docstore)
        returned: list[int] = []
        proxy.after["query"] = lambda result, *args, **kwargs: returned.append(len(result))
        proxy.after["read_with"] = lambda result, *args, **kwargs: returned.append(len(result[1]))
        store = make_store(docstore=proxy, tail_bytes=4096)
        created = store.create_session()
        everything = [store.add_message(created.id, "tool", "w" * 3000) for _ in range(20)]
        needs_cache.delete(*session_keys(key_prefix, created.id).all())
        assert store.get_messages(created.id, limit=3) == everything[-3:]
        assert returned == [3]  # not the tail's count limit of messages
        assert self.cached_tail(needs_cache, key_prefix, created.id, store) == everything[-1:]
        # A later append trims instead of growing, and the hot read still answers.
        everything.append(store.add_message(created.id, "tool", "v" * 3000))
        assert self.cached_tail(needs_cache, key_prefix, created.id, store) == everything[-1:]
        returned.clear()
        assert store.get_messages(created.id, limit=1) == everything[-1:]
        assert returned == []

    def test_short_cold_read_grows_the_tail_on_demand(
        self,
        make_store: Callable[..., SessionStore],
        needs_cache: redis.Redis,
        key_prefix: str,
    ) -> None:
        store = make_store(tail_size=6)
        created = store.create_session()
        everything = [store.add_message(created.id, "user", f"m{i}") for i in range(10)]
        needs_cache.delete(*session_keys(key_prefix, created.id).all())
        assert store.get_messages(created.id, limit=2) == everything[-2:]
        assert self.cached_tail(needs_cache, key_prefix, created.id, store) == everything[-2:]
        assert store.get_messages(created.id, limit=4) == everything[-4:]
        assert self.cached_tail(needs_cache, key_prefix, created.id, store) == everything[-4:]
        assert store.get_messages(created.id) == everything
        assert self.cached_tail(needs_cache, key_prefix, created.id, store) == everything[-6:]
        before = store.stats()["message_hits"]
        assert store.get_messages(created.id, limit=6) == everything[-6:]
        assert store.stats()["message_hits"] == before + 1

    def test_cold_read_caches_the_session_and_the_tail(
        self,
        make_store: Callable[..., SessionStore],
        session_docstore: docstore.DocumentStore,
        needs_cache: redis.Redis,
        key_prefix: str,
    ) -> None:
        proxy = DocstoreProxy(session_docstore)
        store = make_store(docstore=proxy)
        created = store.create_session(data={"a": 1})
        everything = [store.add_message(created.id, "user", f"m{i}") for i in range(4)]
        needs_cache.delete(*session_keys(key_prefix, created.id).all())
        proxy.reset()
        before = store.stats()
        assert store.get_messages(created.id, limit=2) == everything[-2:]
        # The session and its newest messages in one docstore step (one statement).
        assert dict(proxy.calls) == {"read_with": 1}
        assert store.stats()["fills"] - before["fills"] == 2  # the session and its tail
        proxy.reset()
        session = store.get_session(created.id)
        assert session is not None and session.version == 5
        assert store.get_messages(created.id, limit=2) == everything[-2:]
        assert proxy.total_calls() == 0

    def test_no_stale_messages_across_the_budget_edge(
        self,
        make_store: Callable[..., SessionStore],
        session_docstore: docstore.DocumentStore,
        key_prefix: str,
        needs_cache: redis.Redis,
    ) -> None:
        """Appends around the budget's size never let a later read miss a returned seq."""
        budget = 1500
        proxy = DocstoreProxy(session_docstore)
        proxy.jitter = 0.002
        stores = [make_store(docstore=proxy, tail_bytes=budget, lease_wait=0.01) for _ in range(3)]
        created = stores[0].create_session()
        keys = session_keys(key_prefix, created.id)
        lock = threading.Lock()
        returned = [0]
        stale: list[tuple[int, int]] = []
        stop = threading.Event()

        def appender(index: int) -> Callable[[], None]:
            def run() -> None:
                sizes = random.Random(index).choices([50, 400, 900, 1400, 2000], k=20)
                for i, size in enumerate(sizes):
                    text = f"{index}.{i}:" + "s" * size
                    message = stores[index % 3].add_message(created.id, "user", text)
                    with lock:
                        returned[0] = max(returned[0], message.seq)

            return run

        def reader(index: int) -> Callable[[], None]:
            def run() -> None:
                while not stop.is_set():
                    with lock:
                        floor = returned[0]
                    messages = stores[index % 3].get_messages(created.id, limit=1 + index)
                    last = messages[-1].seq if messages else 0
                    if last < floor:
                        stale.append((last, floor))
                    assert [m.seq for m in messages] == list(
                        range(last - len(messages) + 1, last + 1)
                    )
                    assert (
                        sum(len(entry) for entry in needs_cache.lrange(keys.tail, 0, -1)) <= budget
                    )

            return run

        def evictor() -> None:
            while not stop.is_set():
                needs_cache.delete(keys.tail, keys.fence)
                time.sleep(random.random() * 0.01)

        def appenders() -> None:
            try:
                _run_threads(*(appender(index) for index in range(3)))
            finally:
                stop.set()

        _run_threads(appenders, evictor, *(reader(index) for index in range(3)))
        assert stale == []
        everything = stores[2].get_messages(created.id)
        assert [m.seq for m in everything] == list(range(1, 61))
        assert stores[1].get_messages(created.id, limit=4) == everything[-4:]
        self.assert_within_budget(needs_cache, key_prefix, created.id, budget)
        self.cached_tail(needs_cache, key_prefix, created.id, *stores)

    # -- Redis failures ------------------------------------------------------------

    def test_redis_down_everything_still_works(
        self, make_store: Callable[..., SessionStore], needs_outage: Outage
    ) -> None:
        store = make_store()
        created = store.create_session("u", {"a": 1})
        store.get_session(created.id)
        needs_outage.down()
        try:
            assert store.get_session(created.id) == created
            updated = store.update_session(created.id, {"a": 2})
            assert store.get_session(created.id) == updated
            message = store.add_message(created.id, "user", "hi")
            assert store.get_messages(created.id) == [message]
            assert store.touch_session(created.id) is True
            other = store.create_session("u")
            assert [s.id for s in store.list_sessions("u")] == [other.id, created.id]
            rotated = store.rotate_session_id(created.id)
            assert store.get_session(rotated.id) is not None
            assert store.delete_session(other.id) is True
            assert store.get_session(other.id) is None
            store.add_message(rotated.id, "user", "two")
            assert store.pop_message(rotated.id) is not None
            assert store.clear_messages(rotated.id) == 1
            assert store.get_messages(rotated.id) == []
            stats = store.stats()
            assert stats["cache_errors"] >= 1
            assert stats["cache_errors"] + stats["cache_skipped"] >= 8
        finally:
            needs_outage.up()

    def test_stale_copy_is_removed_once_redis_is_back(
        self, make_store: Callable[..., SessionStore], needs_outage: Outage
    ) -> None:
        clock = FakeClock()
        store = make_store(clock=clock)
        created = store.create_session(data={"n": 1})
        gone = store.create_session()
        store.get_session(created.id)
        store.get_session(gone.id)  # both cached
        needs_outage.down()
        try:
            updated = store.update_session(created.id, {"n": 2})
            store.delete_session(gone.id)
        finally:
            needs_outage.up()
        clock.advance(60)  # past the breaker's cool-down
        assert store.get_session(created.id) == updated
        assert store.get_session(gone.id) is None
        assert store.stats()["invalidations_pending"] == 0

    def test_pop_while_redis_is_down_is_not_served_once_it_is_back(
        self, make_store: Callable[..., SessionStore], needs_outage: Outage
    ) -> None:
        clock = FakeClock()
        store = make_store(clock=clock)
        created = store.create_session()
        cleared = store.create_session()
        added = [store.add_message(created.id, "user", f"m{i}") for i in range(3)]
        store.add_message(cleared.id, "user", "x")
        assert store.get_messages(created.id) == added  # cached tails
        assert len(store.get_messages(cleared.id)) == 1
        needs_outage.down()
        try:
            assert store.pop_message(created.id) == added[-1]
            assert store.clear_messages(cleared.id) == 1
            assert store.get_messages(created.id) == added[:-1]
            assert store.get_messages(cleared.id) == []
        finally:
            needs_outage.up()
        clock.advance(60)  # past the breaker's cool-down
        assert store.get_messages(created.id) == added[:-1]
        assert store.get_messages(created.id, limit=1) == added[1:2]
        assert store.get_messages(cleared.id) == []
        assert store.stats()["invalidations_pending"] == 0

    def test_a_write_behind_an_open_breaker_still_reaches_a_healthy_redis(
        self, make_store: Callable[..., SessionStore], needs_outage: Outage
    ) -> None:
        """One store's breaker is still open from an outage that is over; another store
        (another process, as far as the protocol knows) reads: it must see every write
        the first one returned, never the copy cached before it."""
        writer = make_store(clock=FakeClock(), breaker_threshold=1, breaker_cooldown=3600)
        reader = make_store()
        updated = writer.create_session("u", {"n": 1})
        touched = writer.create_session("u")
        appended = writer.create_session("u")
        deleted = writer.create_session("u")
        for session in (updated, touched, appended, deleted):
            assert reader.get_session(session.id) == session  # cached
        assert reader.get_messages(appended.id) == []  # the tail too
        needs_outage.down()
        try:
            assert writer.get_session(updated.id) == updated  # fails: the breaker opens
        finally:
            needs_outage.up()
        assert writer.stats()["breaker_open"] == 1  # and stays open: its clock never moves
        new_version = writer.update_session(updated.id, {"n": 2})
        assert reader.get_session(updated.id) == new_version
        assert writer.touch_session(touched.id) is True
        current = reader.get_session(touched.id)
        assert current is not None and current.version == touched.version + 1
        message = writer.add_message(appended.id, "user", "hi")
        assert reader.get_messages(appended.id) == [message]
        assert writer.pop_message(appended.id) == message
        assert reader.get_messages(appended.id) == []
        assert writer.delete_session(deleted.id) is True
        assert reader.get_session(deleted.id) is None
        # The writes found Redis answering, so the breaker closed and reads use it again.
        stats = writer.stats()
        assert (stats["breaker_open"], stats["invalidations_pending"]) == (0, 0)

    def test_an_outage_costs_a_call_at_most_one_failed_redis_call(
        self, make_store: Callable[..., SessionStore], needs_outage: Outage
    ) -> None:
        """Reads skip Redis once the breaker is open; a write still tries it once (it
        must, in case Redis is back), but never twice in one call."""
        creator = make_store()
        session = creator.create_session()
        store = make_store(clock=FakeClock(), breaker_threshold=1, breaker_cooldown=3600)
        needs_outage.down()
        try:
            # The conversation key is unknown: the lookup fails, then the append
            # does not try Redis again.
            store.add_message(session.id, "user", "hi")
            assert store.stats()["cache_errors"] == 1
            assert store.get_session(session.id) is not None
            assert store.get_messages(session.id) != []
            assert store.stats()["cache_errors"] == 1  # reads skipped
            store.update_session(session.id, {"n": 1})
            assert store.stats()["cache_errors"] == 2  # the write tried, once
            assert store.stats()["invalidations_pending"] == 1
        finally:
            needs_outage.up()

    def test_pending_invalidations_go_before_a_later_write(
        self, make_store: Callable[..., SessionStore], needs_outage: Outage
    ) -> None:
        """A copy this store could not invalidate is removed before its next write
        reaches Redis, even while its breaker would still skip reads."""
        writer = make_store(clock=FakeClock(), breaker_threshold=1, breaker_cooldown=3600)
        reader = make_store()
        stale = writer.create_session(data={"n": 1})
        other = writer.create_session(data={"n": 1})
        assert reader.get_session(stale.id) == stale
        needs_outage.down()
        try:
            missed = writer.update_session(stale.id, {"n": 2})  # Redis down: remembered
        finally:
            needs_outage.up()
        assert writer.stats()["invalidations_pending"] == 1
        writer.update_session(other.id, {"n": 2})  # drains the pending one first
        assert writer.stats()["invalidations_pending"] == 0
        assert reader.get_session(stale.id) == missed

    def test_circuit_breaker(
        self,
        make_store: Callable[..., SessionStore],
        needs_outage: Outage,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        clock = FakeClock()
        store = make_store(clock=clock, breaker_threshold=3, breaker_cooldown=2.0)
        created = store.create_session()
        caplog.set_level(logging.WARNING, logger="session.store")
        needs_outage.down()
        try:
            for _ in range(3):
                assert store.get_session(created.id) == created
            assert store.stats()["cache_errors"] == 3
            assert store.stats()["breaker_open"] == 1
            for _ in range(5):  # skipped: no timeout paid
                assert store.get_session(created.id) == created
            stats = store.stats()
            assert (stats["cache_errors"], stats["cache_skipped"]) == (3, 5)
            clock.advance(2.5)
            assert store.get_session(created.id) == created  # a probe, which fails
            assert store.stats()["cache_errors"] == 4
            assert store.stats()["breaker_open"] == 1
        finally:
            needs_outage.up()
        clock.advance(2.5)
        assert store.get_session(created.id) == created
        assert store.stats()["breaker_open"] == 0
        assert store.get_session(created.id) == created
        assert store.stats()["hits"] >= 1
        failures = [r for r in caplog.records if "call failed" in r.getMessage()]
        recoveries = [r for r in caplog.records if "recovered" in r.getMessage()]
        assert (len(failures), len(recoveries)) == (1, 1)
        assert all(created.id not in record.getMessage() for record in caplog.records)

    # -- PostgreSQL failures -------------------------------------------------------

    def test_docstore_down_writes_fail_hits_serve(
        self,
        make_store: Callable[..., SessionStore],
        session_docstore: docstore.DocumentStore,
        cache: redis.Redis | None,
        key_prefix: str,
    ) -> None:
        proxy = DocstoreProxy(session_docstore)
        store = make_store(docstore=proxy)
        created = store.create_session(data={"n": 1})
        other = store.create_session()
        store.add_message(created.id, "user", "hi")
        current = store.get_session(created.id)
        messages = store.get_messages(created.id)
        before_cache = self.snapshot(cache, key_prefix)
        failing = ("create", "read", "read_with", "update", "append", "delete", "rename", "query")
        for name in failing:
            proxy.fail[name] = docstore.StoreUnavailable("the database is down")
        proxy.fail["transaction"] = docstore.StoreUnavailable("the database is down")
        with pytest.raises(StoreUnavailable) as caught:
            store.update_session(created.id, {"n": 2})
        assert isinstance(caught.value, docstore.StoreUnavailable)
        with pytest.raises(StoreUnavailable):
            store.add_message(created.id, "user", "lost")
        with pytest.raises(StoreUnavailable):
            store.create_session()
        with pytest.raises(StoreUnavailable):
            store.delete_session(created.id)
        with pytest.raises(StoreUnavailable):
            store.rotate_session_id(created.id)
        with pytest.raises(StoreUnavailable):
            store.touch_session(created.id)
        proxy.fail["pop_child"] = docstore.StoreUnavailable("the database is down")
        proxy.fail["delete_children"] = docstore.StoreUnavailable("the database is down")
        with pytest.raises(StoreUnavailable):
            store.pop_message(created.id)
        with pytest.raises(StoreUnavailable):
            store.clear_messages(created.id)
        assert self.snapshot(cache, key_prefix) == before_cache
        if cache is not None:
            assert store.get_session(created.id) == current  # a hit still serves
            assert store.get_messages(created.id) == messages
        with pytest.raises(StoreUnavailable):
            store.get_session(other.id)  # a miss cannot
        proxy.fail.clear()
        assert store.get_session(created.id) == current

    def test_unknown_outcome_drops_the_copy(
        self,
        make_store: Callable[..., SessionStore],
        session_docstore: docstore.DocumentStore,
        needs_cache: redis.Redis,
        key_prefix: str,
    ) -> None:
        proxy = DocstoreProxy(session_docstore)
        store = make_store(docstore=proxy)
        created = store.create_session(data={"n": 1})
        store.get_session(created.id)
        proxy.fail["update"] = docstore.StoreUnavailable("lost during COMMIT", outcome_unknown=True)
        with pytest.raises(StoreUnavailable) as caught:
            store.update_session(created.id, {"n": 2})
        assert caught.value.outcome_unknown
        assert needs_cache.exists(session_keys(key_prefix, created.id).value) == 0
        store.add_message(created.id, "user", "hi")
        assert len(store.get_messages(created.id)) == 1  # session and tail cached
        keys = session_keys(key_prefix, created.id)
        for name, remove in (
            ("pop_child", store.pop_message),
            ("delete_children", store.clear_messages),
        ):
            proxy.fail[name] = docstore.StoreUnavailable("lost", outcome_unknown=True)
            with pytest.raises(StoreUnavailable):
                remove(created.id)
            assert needs_cache.exists(keys.value, keys.tail, keys.fence) == 0
            assert len(store.get_messages(created.id)) == 1  # refilled

    # -- lifecycle -------------------------------------------------------------

    def test_close_leaves_passed_in_clients_open(
        self,
        make_store: Callable[..., SessionStore],
        session_docstore: docstore.DocumentStore,
        collections: tuple[str, str],
        cache: redis.Redis | None,
    ) -> None:
        with make_store() as store:
            store.create_session()
        assert session_docstore.count(collections[0]) == 1
        if cache is not None:
            assert cache.ping()
