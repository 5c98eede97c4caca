"""Scripts are packed by hiredis where redis-py would pack the same bytes, and only there.

The stores pack `EVALSHA` themselves (see `session.store._send_evalsha` and
`session.async_store._send_evalsha`). hiredis writes str as UTF-8: a copy
filled through a script must sit under the key the client's own commands
name, whatever encoding the client was given.
"""

from __future__ import annotations

import fakeredis
import pytest

from docstore import AsyncMemoryDocumentStore, MemoryDocumentStore
from session import AsyncSessionStore, SessionStore
from session.coherence import session_keys
from session.serializer import decode_session

PREFIX = "pack-é:"


def test_sync_scripts_fill_the_key_the_clients_commands_name() -> None:
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    store = SessionStore(MemoryDocumentStore(), client, key_prefix=PREFIX)
    sid = store.create_session(data={"n": 1}).id
    store.get_session(sid)
    store.stats()  # reads the fill's reply
    cached = client.get(session_keys(PREFIX, sid).value)
    assert decode_session(cached, sid).session.data == {"n": 1}


@pytest.mark.asyncio
@pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
async def test_async_scripts_fill_the_key_the_clients_commands_name(encoding: str) -> None:
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer(), encoding=encoding)
    async with AsyncSessionStore(AsyncMemoryDocumentStore(), client, key_prefix=PREFIX) as store:
        sid = (await store.create_session(data={"n": 1})).id
        await store.get_session(sid)
    cached = await client.get(session_keys(PREFIX, sid).value)
    assert decode_session(cached, sid).session.data == {"n": 1}
    await client.aclose()
