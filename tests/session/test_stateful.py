"""A SessionStore against a plain in-memory model, under random flushes and outages of Redis.

Hypothesis drives random operations on a store (memory docstore + its own
fakeredis server) and on a plain model (a `ModelSession` per live id), and
compares every answer: versions, data, messages, errors. Between operations
it may flush Redis or take it away and bring it back; with one store in
play, neither may ever change an answer.
Every read is also compared with a store that has no cache at all, on the
same docstore: what a read returns must not depend on the tier it came from.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import fakeredis
import hypothesis.strategies as st
import pytest
import redis
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)
from postgres_tables import postgres_store_factory
from tcp_proxy import TcpProxy

from docstore import DocumentStore, MemoryDocumentStore
from session import Message, Session, SessionNotFound, SessionStore, VersionConflict
from session.config import redis_client_from_url

# Each example on the real servers costs tens of round trips per step: keep CI short.
REAL_SERVER_EXAMPLES = 10

USERS = ("alice", "bob", None)
MESSAGE_IDS = (None, "m1", "m2", "m3")

# JSON text the docstore accepts: no NUL, no lone surrogates.
texts = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=5)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(texts, children, max_size=3),
    max_leaves=6,
)
user_data = st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), json_values, max_size=3)
metadata = st.dictionaries(st.sampled_from(["k", "lang"]), json_scalars, max_size=2)
counts = st.none() | st.integers(min_value=0, max_value=6)


@dataclass
class ModelMessage:
    seq: int
    id: str
    role: str
    content: str
    metadata: dict[str, Any]


@dataclass
class ModelSession:
    user_id: str | None
    data: dict[str, Any]
    version: int = 1
    expires: bool = False
    messages: list[ModelMessage] = field(default_factory=list)
    last_seq: int = 0  # the highest seq ever given out: pops and clears never lower it


def window(
    messages: list[ModelMessage], limit: int | None, after: int | None, before: int | None
) -> list[ModelMessage]:
    """Return what get_messages must answer, the plain way (see docs/session.md)."""
    chosen = [
        message
        for message in messages
        if (after is None or message.seq > after) and (before is None or message.seq < before)
    ]
    if limit is None:
        return chosen
    if limit == 0:
        return []
    return chosen[:limit] if after is not None else chosen[-limit:]


class Backends:
    """What a machine runs on: a docstore and a Redis it may flush and take away."""

    docstore: DocumentStore
    cache: redis.Redis
    key_prefix: str
    collections: tuple[str, str]

    def flush(self) -> None:
        raise NotImplementedError

    def down(self) -> None:
        raise NotImplementedError

    def up(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class FakeBackends(Backends):
    """A memory docstore and a fakeredis server of their own."""

    def __init__(self) -> None:
        self.docstore: DocumentStore = MemoryDocumentStore()
        self._server = fakeredis.FakeServer()
        self.cache: redis.Redis = fakeredis.FakeRedis(server=self._server)
        self.key_prefix = "sess:"
        self.collections = ("sessions", "messages")

    def flush(self) -> None:
        self.cache.flushall()

    def down(self) -> None:
        self._server.connected = False

    def up(self) -> None:
        self._server.connected = True

    def close(self) -> None:
        self.up()
        self.cache.close()
        self.docstore.close()


class SessionMachine(RuleBasedStateMachine):
    ids = Bundle("ids")
    make_backends: Callable[[], Backends] = FakeBackends

    def __init__(self) -> None:
        super().__init__()
        self.backends = type(self).make_backends()
        self.redis_is_up = True
        self.model: dict[str, ModelSession] = {}
        self.store: SessionStore | None = None
        self.plain: SessionStore | None = None

    @initialize(
        target=ids,
        tail_size=st.sampled_from([0, 1, 3, 100]),
        # Budgets that hold a message or two, or none of the longer ones.
        tail_bytes=st.sampled_from([0, 120, 400, 256 * 1024]),
    )
    def build(self, tail_size: int, tail_bytes: int) -> str:
        backends = self.backends
        places = {
            "key_prefix": backends.key_prefix,
            "sessions_collection": backends.collections[0],
            "messages_collection": backends.collections[1],
        }
        # A short cool-down, so that runs probe a half-open breaker often. One
        # thread: a lease held by another reader can only be a failed fill's leftover.
        self.store = SessionStore(
            backends.docstore,
            backends.cache,
            tail_size=tail_size,
            tail_bytes=tail_bytes,
            breaker_cooldown=0.001,
            lease_wait=0,
            **places,
        )
        self.plain = SessionStore(backends.docstore, None, ensure_indexes=False, **places)
        return self.new_session("alice", {"a": 1})

    def teardown(self) -> None:
        for store in (self.store, self.plain):
            if store is not None:
                store.close()
        self.backends.close()

    @property
    def sut(self) -> SessionStore:
        assert self.store is not None
        return self.store

    @property
    def uncached(self) -> SessionStore:
        assert self.plain is not None
        return self.plain

    # -- checks ------------------------------------------------------------------

    def check_session(self, session_id: str, got: Session | None) -> None:
        expected = self.model.get(session_id)
        if expected is None:
            assert got is None
            return
        assert got is not None
        assert got.id == session_id
        assert got.user_id == expected.user_id
        assert got.data == expected.data
        assert got.version == expected.version
        assert (got.expires_at is not None) == expected.expires
        assert got.updated_at >= got.created_at

    def check_message(self, session_id: str, got: Message, expected: ModelMessage) -> None:
        assert got.session_id == session_id
        assert (got.seq, got.id, got.role, got.content, got.metadata) == (
            expected.seq,
            expected.id,
            expected.role,
            expected.content,
            expected.metadata,
        )

    # -- sessions ----------------------------------------------------------------

    @rule(target=ids, user_id=st.sampled_from(USERS), data=user_data)
    def create(self, user_id: str | None, data: dict[str, Any]) -> str:
        return self.new_session(user_id, data)

    def new_session(self, user_id: str | None, data: dict[str, Any]) -> str:
        created = self.sut.create_session(user_id, data)
        self.model[created.id] = ModelSession(user_id, dict(data))
        self.check_session(created.id, created)
        return created.id

    @rule(target=ids)
    def bogus_id(self) -> str:
        return f"never-created-{uuid.uuid4().hex}"

    @rule(session_id=ids)
    def get(self, session_id: str) -> None:
        got = self.sut.get_session(session_id)
        self.check_session(session_id, got)
        assert got == self.uncached.get_session(session_id)

    @rule(session_id=ids, data=user_data, guard=st.sampled_from(["none", "current", "stale"]))
    def update(self, session_id: str, data: dict[str, Any], guard: str) -> None:
        expected = self.model.get(session_id)
        version = None
        if guard != "none":
            known = expected.version if expected is not None else 1
            version = known if guard == "current" else known - 1
        if expected is None:
            try:
                self.sut.update_session(session_id, data, expected_version=version)
            except SessionNotFound:
                return
            raise AssertionError("update_session of a missing session did not raise")
        if guard == "stale":
            try:
                self.sut.update_session(session_id, data, expected_version=version)
            except VersionConflict:
                return
            raise AssertionError("a stale expected_version did not raise VersionConflict")
        updated = self.sut.update_session(session_id, data, expected_version=version)
        expected.data.update(data)
        expected.version += 1
        self.check_session(session_id, updated)

    @rule(session_id=ids, ttl=st.sampled_from([None, 3600]))
    def touch(self, session_id: str, ttl: int | None) -> None:
        expected = self.model.get(session_id)
        assert self.sut.touch_session(session_id, ttl) is (expected is not None)
        if expected is not None:
            expected.version += 1
            expected.expires = expected.expires or ttl is not None

    @rule(session_id=ids)
    def delete(self, session_id: str) -> None:
        assert self.sut.delete_session(session_id) is (session_id in self.model)
        self.model.pop(session_id, None)

    @rule(target=ids, session_id=ids)
    def rotate(self, session_id: str) -> Any:
        expected = self.model.pop(session_id, None)
        if expected is None:
            try:
                self.sut.rotate_session_id(session_id)
            except SessionNotFound:
                return multiple()
            raise AssertionError("rotate_session_id of a missing session did not raise")
        rotated = self.sut.rotate_session_id(session_id)
        assert rotated.id != session_id
        expected.version += 1
        self.model[rotated.id] = expected
        self.check_session(rotated.id, rotated)
        return rotated.id

    @rule(user_id=st.sampled_from(["alice", "bob"]), limit=st.integers(0, 4))
    def list_sessions(self, user_id: str, limit: int) -> None:
        listed = self.sut.list_sessions(user_id, limit=limit)
        mine = {sid for sid, session in self.model.items() if session.user_id == user_id}
        assert len(listed) == min(limit, len(mine))
        assert {session.id for session in listed} <= mine
        for session in listed:
            self.check_session(session.id, session)
        keys = [(session.updated_at, session.id) for session in listed]
        assert [moment for moment, _ in keys] == sorted((m for m, _ in keys), reverse=True)
        if limit >= len(mine):
            assert {session.id for session in listed} == mine

    # -- messages ----------------------------------------------------------------

    @rule(
        session_id=ids,
        message_id=st.sampled_from(MESSAGE_IDS),
        role=st.sampled_from(["user", "assistant"]),
        content=texts,
        meta=metadata,
    )
    def add_message(
        self,
        session_id: str,
        message_id: str | None,
        role: str,
        content: str,
        meta: dict[str, Any],
    ) -> None:
        expected = self.model.get(session_id)
        if expected is None:
            try:
                self.sut.add_message(
                    session_id, role, content, metadata=meta, message_id=message_id
                )
            except SessionNotFound:
                return
            raise AssertionError("add_message to a missing session did not raise")
        got = self.sut.add_message(session_id, role, content, metadata=meta, message_id=message_id)
        stored = [m for m in expected.messages if message_id is not None and m.id == message_id]
        if stored:
            # A retry: the stored message comes back, nothing is appended or bumped.
            self.check_message(session_id, got, stored[0])
            return
        expected.last_seq += 1
        appended = ModelMessage(expected.last_seq, got.id, role, content, dict(meta))
        self.check_message(session_id, got, appended)
        if message_id is not None:
            assert got.id == message_id
        expected.messages.append(appended)
        expected.version += 1

    @rule(session_id=ids)
    def pop_message(self, session_id: str) -> None:
        expected = self.model.get(session_id)
        if expected is None:
            try:
                self.sut.pop_message(session_id)
            except SessionNotFound:
                return
            raise AssertionError("pop_message of a missing session did not raise")
        got = self.sut.pop_message(session_id)
        expected.version += 1
        if not expected.messages:
            assert got is None
            return
        assert got is not None
        self.check_message(session_id, got, expected.messages.pop())

    @rule(session_id=ids)
    def clear_messages(self, session_id: str) -> None:
        expected = self.model.get(session_id)
        if expected is None:
            try:
                self.sut.clear_messages(session_id)
            except SessionNotFound:
                return
            raise AssertionError("clear_messages of a missing session did not raise")
        assert self.sut.clear_messages(session_id) == len(expected.messages)
        expected.messages.clear()
        expected.version += 1

    @rule(session_id=ids, limit=counts, after_seq=counts, before_seq=counts)
    def get_messages(
        self,
        session_id: str,
        limit: int | None,
        after_seq: int | None,
        before_seq: int | None,
    ) -> None:
        got = self.sut.get_messages(
            session_id, limit=limit, after_seq=after_seq, before_seq=before_seq
        )
        expected = self.model.get(session_id)
        wanted = [] if expected is None else window(expected.messages, limit, after_seq, before_seq)
        assert len(got) == len(wanted)
        for message, model_message in zip(got, wanted, strict=True):
            self.check_message(session_id, message, model_message)
        plain = self.uncached.get_messages(
            session_id, limit=limit, after_seq=after_seq, before_seq=before_seq
        )
        assert got == plain

    # -- Redis misbehaving -------------------------------------------------------

    @precondition(lambda self: self.redis_is_up)
    @rule()
    def flush_redis(self) -> None:
        self.backends.flush()

    @precondition(lambda self: self.redis_is_up)
    @rule()
    def redis_down(self) -> None:
        self.backends.down()
        self.redis_is_up = False

    @precondition(lambda self: not self.redis_is_up)
    @rule()
    def redis_up(self) -> None:
        self.backends.up()
        self.redis_is_up = True

    @rule(session_id=consumes(ids))
    def forget(self, session_id: str) -> None:
        """Stop using an id (keeps the bundle small), without touching the store."""

    @invariant()
    def stats_are_counts(self) -> None:
        if self.store is not None:
            assert all(value >= 0 for value in self.sut.stats().values())


SessionMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSessionMachine = SessionMachine.TestCase


# -- the same machine on the real servers ------------------------------------------


class RealServerBackends(Backends):
    """The PostgreSQL and Redis named by the environment, shared with other users.

    Every example works in the test's own collections (emptied afterwards) and
    under its own key prefix; a flush deletes that prefix's keys (what FLUSHALL
    does to this store, without touching anyone else's), and an outage cuts
    the TCP proxy the client reaches Redis through.
    """

    def __init__(
        self, docstore: DocumentStore, redis_url: str, collections: tuple[str, str]
    ) -> None:
        parts = urlsplit(redis_url)
        self._proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 6379))
        self._proxy.start()
        userinfo, _, _ = parts.netloc.rpartition("@")
        netloc = f"{userinfo}@" if userinfo else ""
        proxied = parts._replace(netloc=f"{netloc}{self._proxy.host}:{self._proxy.port}")
        self.docstore = docstore
        self.cache = redis_client_from_url(urlunsplit(proxied))
        self._direct = redis_client_from_url(redis_url)
        self.key_prefix = f"t{uuid.uuid4().hex[:12]}:"
        self.collections = collections

    def flush(self) -> None:
        keys = list(self._direct.scan_iter(match=f"{self.key_prefix}*", count=1000))
        if keys:
            self._direct.delete(*keys)

    def down(self) -> None:
        self._proxy.cut()

    def up(self) -> None:
        self._proxy.resume()

    def close(self) -> None:
        self.flush()
        self._direct.close()
        self.cache.close()
        self._proxy.stop()
        for collection in self.collections:
            self.docstore.delete_collection(collection)


@pytest.mark.postgres
@pytest.mark.redis
def test_session_machine_on_real_servers(real_dsn: str, redis_url: str) -> None:
    """A few examples on PostgreSQL and Redis: what a plain dict model cannot see in fakes."""
    collections = (f"sessions_{uuid.uuid4().hex[:10]}", f"messages_{uuid.uuid4().hex[:10]}")
    with postgres_store_factory(real_dsn) as make:
        docstore = make()

        class RealServerMachine(SessionMachine):
            make_backends = staticmethod(  # type: ignore[assignment]
                lambda: RealServerBackends(docstore, redis_url, collections)
            )

        run_state_machine_as_test(
            RealServerMachine,
            settings=settings(
                max_examples=REAL_SERVER_EXAMPLES,
                stateful_step_count=30,
                deadline=None,
                database=None,
                # No shrinking: on these servers it takes minutes; the failing steps still print.
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
