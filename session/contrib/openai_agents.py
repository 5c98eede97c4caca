"""An OpenAI Agents SDK session kept in a `SessionStore`.

```python
from agents import Agent, Runner
from session.contrib.openai_agents import OpenAIAgentsSession

result = await Runner.run(agent, "Hi", session=OpenAIAgentsSession("user-42"))
```

`OpenAIAgentsSession(session_id, store=None)` implements the SDK's
`agents.memory.Session` protocol: `session_id`, `session_settings`,
`get_items(limit=None)`, `add_items(items)`, `pop_item()`, `clear_session()`.
`session_id` is the application's own conversation key (any non-empty
string); its session in the store is the one whose `user_id` is
`"openai-agents:<session_id>"`, created on the first `add_items` (see
`session.contrib._conversations`). Each item is one message: `content` is
the item's JSON text, `role` its `role` (or its `type`), so an item comes back
exactly as `json.loads(json.dumps(item))`.

`store` is an `AsyncSessionStore` or a `SessionStore`. With an
`AsyncSessionStore` every call is awaited on the event loop, no thread
involved; with a `SessionStore` each call runs in one worker thread
(`asyncio.to_thread`). Either way the loop never blocks on PostgreSQL or
Redis. `store=None` uses one process-wide `get_async_session_store()`,
built when the first such session is constructed and closed (best effort)
when the interpreter exits; its connections belong to the event loop of its
first call, so an application that runs several event loops one after
another (`asyncio.run` per job) passes a store of its own per loop.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, cast

from agents.memory import SessionSettings
from agents.memory.session_settings import resolve_session_limit

from ._conversations import (
    AnyStore,
    Conversation,
    Steps,
    call,
    check_key,
    check_store,
    decode_item,
    default_async_store,
    encode_item,
)

if TYPE_CHECKING:
    from agents.items import TResponseInputItem

__all__ = ["OpenAIAgentsSession", "NAMESPACE"]

logger = logging.getLogger(__name__)

# The `user_id` prefix that marks this adapter's sessions.
NAMESPACE = "openai-agents"
# Messages read per round trip when a window must grow past undecodable messages.
_PAGE = 100


class OpenAIAgentsSession:
    """The Agents SDK's `Session` protocol over a `SessionStore` (see the module docstring)."""

    session_settings: SessionSettings | None = None

    def __init__(
        self,
        session_id: str,
        store: AnyStore | None = None,
        *,
        session_settings: SessionSettings | None = None,
    ) -> None:
        self.session_id = check_key(session_id, "session_id")
        self.session_settings = (
            session_settings if session_settings is not None else (SessionSettings())
        )
        self._conversation = Conversation(
            check_store(store) if store is not None else default_async_store(),
            NAMESPACE,
            self.session_id,
        )

    @property
    def store(self) -> AnyStore:
        """Return the store holding this conversation."""
        return self._conversation.store

    async def get_items(self, limit: int | None = None) -> list[TResponseInputItem]:
        """Return the conversation's items, oldest first; `limit=N` gives the newest N."""
        session_limit = resolve_session_limit(limit, self.session_settings)
        return await self._conversation.arun(self._get_items(session_limit))

    async def add_items(self, items: list[TResponseInputItem]) -> None:
        """Append items in order; an item that is not a JSON object refuses the whole batch."""
        texts = [encode_item(item, index) for index, item in enumerate(items)]
        if texts:
            await self._conversation.arun(self._add_items(texts))

    async def pop_item(self) -> TResponseInputItem | None:
        """Remove and return the newest item; None when the conversation is empty."""
        return await self._conversation.arun(self._pop_item())

    async def clear_session(self) -> None:
        """Remove every item; the conversation key stays usable."""
        await self._conversation.arun(self._clear())

    # -- steps (see _conversations) -------------------------------------------------------

    def _get_items(self, limit: int | None) -> Steps[list[TResponseInputItem]]:
        def read(session_id: str) -> Steps[list[TResponseInputItem]]:
            if limit is None or limit < 0:
                messages = yield from call("get_messages", session_id)
                return self._decode(message.content for message in messages)
            if limit == 0:
                return []
            # The newest `limit` items; a message that holds no item (written by
            # something else) does not count, so read further back past it.
            items: list[TResponseInputItem] = []
            before: int | None = None
            want = limit
            while len(items) < limit:
                page = yield from call("get_messages", session_id, limit=want, before_seq=before)
                items[:0] = self._decode(message.content for message in page)
                if len(page) < want:
                    break
                before = page[0].seq
                want = _PAGE
            return items[-limit:]

        empty: list[TResponseInputItem] = []
        return (yield from self._conversation.read(read, empty))

    def _add_items(self, texts: list[str]) -> Steps[None]:
        remaining = list(texts)

        def append(session_id: str) -> Steps[None]:
            while remaining:
                text = remaining[0]
                item = cast(dict[str, Any], decode_item(text))
                yield from call("add_message", session_id, _role_of(item), text)
                remaining.pop(0)

        yield from self._conversation.write(append)

    def _pop_item(self) -> Steps[TResponseInputItem | None]:
        def pop(session_id: str) -> Steps[TResponseInputItem | None]:
            while True:
                message = yield from call("pop_message", session_id)
                if message is None:
                    return None
                item = decode_item(message.content)
                if item is not None:
                    return cast("TResponseInputItem", item)
                # Not an item of ours: dropped, as the SDK's own sessions drop corrupt rows.
                logger.warning("dropped a message that holds no Agents SDK item")

        return (yield from self._conversation.read(pop, None))

    def _clear(self) -> Steps[int]:
        return (yield from self._conversation.read(lambda sid: call("clear_messages", sid), 0))

    @staticmethod
    def _decode(texts: Any) -> list[TResponseInputItem]:
        items = []
        for text in texts:
            item = decode_item(text)
            if item is not None:
                items.append(cast("TResponseInputItem", item))
        return items


def _role_of(item: dict[str, Any]) -> str:
    """Return what the message's `role` says about the item: its role, else its type."""
    for key in ("role", "type"):
        value = item.get(key)
        if isinstance(value, str) and value:
            return value
    return "item"
