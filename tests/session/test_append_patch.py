"""An append patches the cached session in Redis instead of re-encoding it.

`add_message` without a `message_id` bumps the session by exactly one
version and changes nothing else of it but `updated_at` and the expiry, so
WRITE_MESSAGE patches a cached copy of the version before (the docstore does
not even send the session's data back). What must hold: the patched copy is
byte for byte what encoding the session afresh gives, whatever sizes its
fields have; a copy older than the version before, or one the patch does not
understand, is deleted, never patched into a wrong state; an append with the
caller's `message_id` (maybe a retry) keeps the full path.

Each test runs on fakeredis and on the Redis server named by REDIS_URL
(skipped when unset): the `client` and `store` fixtures of conftest.py.
"""

from __future__ import annotations

import msgpack
import pytest
import redis

from docstore import MemoryDocumentStore
from session import SessionStore
from session.coherence import session_keys
from session.models import session_state_from_document
from session.serializer import FORMAT_VERSION, encode_session


def cached(store: SessionStore, client: redis.Redis, session_id: str) -> bytes | None:
    store.stats()  # reads the replies of fills still in flight
    return client.get(session_keys(store.key_prefix, session_id).value)  # type: ignore[return-value]


def encoded_now(store: SessionStore, session_id: str) -> bytes:
    """What encoding the session as the docstore holds it gives."""
    doc = store.document_store.read("sessions", session_id)
    assert doc is not None
    state = session_state_from_document(doc, session_id)
    assert state is not None
    return encode_session(state)


@pytest.mark.parametrize(
    ("user_id", "data", "ttl"),
    [
        (None, {}, None),
        ("u", {"n": 1}, 600.0),
        ("ü" * 40, {"short": "x" * 20}, None),  # str8 user id
        ("u", {"long": "y" * 300}, 3600.0),  # str16 data
        ("u", {"longer": "z" * 70_000}, None),  # str32 data
    ],
)
def test_the_patched_copy_is_what_a_fresh_encoding_gives(
    client: redis.Redis, session_key_prefix: str, user_id: str | None, data: dict, ttl: float | None
) -> None:
    store = SessionStore(
        MemoryDocumentStore(), client, key_prefix=session_key_prefix, session_ttl=ttl
    )
    sid = store.create_session(user_id=user_id, data=data).id
    store.get_session(sid)  # cached at version 1
    # Past 127 the version's encoding grows (fixint to uint8): still patched exactly.
    for n in range(130):
        store.add_message(sid, "user", f"m{n}")
        value = cached(store, client, sid)
        assert value is not None, n
        assert value == encoded_now(store, sid), n
    before = store.stats()
    session = store.get_session(sid)
    assert session is not None and session.version == 131
    assert store.stats()["hits"] == before["hits"] + 1
    store.close()


def test_a_copy_older_than_the_version_before_is_deleted(
    client: redis.Redis, session_key_prefix: str
) -> None:
    docs = MemoryDocumentStore()
    store = SessionStore(docs, client, key_prefix=session_key_prefix)
    sid = store.create_session(data={"n": 1}).id
    store.get_session(sid)  # version 1 cached
    # A write that never reached Redis (a store without a cache): version 2.
    SessionStore(docs, None).update_session(sid, {"n": 2})
    store.add_message(sid, "user", "hi")  # version 3; the copy says 1
    assert cached(store, client, sid) is None  # not patched into "version 3 with n=1"
    session = store.get_session(sid)
    assert session is not None and (session.version, session.data) == (3, {"n": 2})
    store.close()


def test_a_copy_the_patch_does_not_understand_is_deleted(
    store: SessionStore, client: redis.Redis
) -> None:
    sid = store.create_session(data={"n": 1}).id
    store.get_session(sid)
    created = store.get_session(sid)
    assert created is not None
    # Version 1, but a float where the creation time belongs: not a value this
    # store wrote, so the append must not splice it.
    odd = msgpack.packb([FORMAT_VERSION, 1, None, "c", "{}", 1.5, 0, None], use_bin_type=True)
    client.set(session_keys(store.key_prefix, sid).value, odd)
    store.add_message(sid, "user", "hi")
    assert cached(store, client, sid) is None
    session = store.get_session(sid)
    assert session is not None and (session.version, session.data) == (2, {"n": 1})


def test_an_append_with_the_callers_id_keeps_the_full_path(
    store: SessionStore, client: redis.Redis
) -> None:
    sid = store.create_session(data={"n": 1}).id
    store.get_session(sid)
    first = store.add_message(sid, "user", "hi", message_id="m-1")
    assert cached(store, client, sid) == encoded_now(store, sid)
    # The retry finds the stored message; the session is not bumped again.
    again = store.add_message(sid, "user", "hi", message_id="m-1")
    assert again == first
    assert cached(store, client, sid) == encoded_now(store, sid)
    session = store.get_session(sid)
    assert session is not None and session.version == 2


def test_a_retry_after_another_write_is_never_patched(
    client: redis.Redis, session_key_prefix: str
) -> None:
    """A retry's parent may be past the version before by any write: patching the
    copy of that version would label the older data with the newer version."""
    docs = MemoryDocumentStore()
    store = SessionStore(docs, client, key_prefix=session_key_prefix)
    elsewhere = SessionStore(docs, None)  # writes that never reach this Redis
    sid = store.create_session(data={"n": 1}).id
    first = elsewhere.add_message(sid, "user", "hi", message_id="m-1")  # version 2
    assert store.get_session(sid).version == 2  # type: ignore[union-attr]  # cached: n=1
    elsewhere.update_session(sid, {"n": 2})  # version 3; the copy still says 2
    assert store.add_message(sid, "user", "hi", message_id="m-1") == first  # the retry
    session = store.get_session(sid)
    assert session is not None and (session.version, session.data) == (3, {"n": 2})
    store.close()
