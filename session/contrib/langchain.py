"""A LangChain chat message history kept in a `SessionStore`.

```python
from langchain_core.runnables.history import RunnableWithMessageHistory
from session.contrib.langchain import SessionChatMessageHistory

chain = RunnableWithMessageHistory(runnable, SessionChatMessageHistory)
chain.invoke(inputs, config={"configurable": {"session_id": "user-42"}})
```

`SessionChatMessageHistory(session_id, store=None)` is a
`BaseChatMessageHistory`: `messages`, `add_messages`, `clear` and the async
`aget_messages`, `aadd_messages`, `aclear`. `session_id` is the application's
own conversation key (any non-empty string); its session in the store is the
one whose `user_id` is `"langchain:<session_id>"`, created on the first write
(see `session.contrib._conversations`). Each message is one stored message:
`content` is LangChain's own dict of it (`message_to_dict`) as JSON, `role`
its type (`human`, `ai`, `system`, `tool`, ...), so every message type, tool
call and additional kwarg comes back as it went in. `store` defaults to one
process-wide `get_session_store()`.

The async methods run the synchronous store in a worker thread
(`asyncio.to_thread`): the event loop never blocks on PostgreSQL or Redis.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import BaseMessage, message_to_dict, messages_from_dict

from ..errors import InvalidSessionData
from ..store import SessionStore
from ._conversations import (
    Conversation,
    call_store,
    check_key,
    decode_item,
    default_store,
    encode_item,
    is_async_store,
)

__all__ = ["SessionChatMessageHistory", "NAMESPACE"]

logger = logging.getLogger(__name__)

# The `user_id` prefix that marks this adapter's sessions.
NAMESPACE = "langchain"


class SessionChatMessageHistory(BaseChatMessageHistory):
    """LangChain's `BaseChatMessageHistory` over a `SessionStore` (see the module docstring)."""

    def __init__(self, session_id: str, store: SessionStore | None = None) -> None:
        self.session_id = check_key(session_id, "session_id")
        if store is not None and is_async_store(store):
            raise TypeError("pass a SessionStore (the asyncio store is not supported yet)")
        self._conversation = Conversation(
            store if store is not None else default_store(), NAMESPACE, self.session_id
        )

    @property
    def store(self) -> SessionStore:
        """Return the store holding this conversation."""
        return self._conversation.store

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        """Return every message, oldest first."""
        return self._conversation.read(self._read, [])

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Append messages in order; one that cannot be stored refuses the whole batch."""
        texts = self._encode(messages)
        if texts:
            self._conversation.write(functools.partial(self._append, texts))

    def clear(self) -> None:
        """Remove every message; the conversation key stays usable."""
        self._conversation.read(self.store.clear_messages, 0)

    async def aget_messages(self) -> list[BaseMessage]:
        """Return every message, oldest first, without blocking the event loop."""
        return await call_store(lambda: self.messages)

    async def aadd_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Append messages without blocking the event loop."""
        texts = self._encode(messages)
        if texts:
            await call_store(
                lambda: self._conversation.write(functools.partial(self._append, texts))
            )

    async def aclear(self) -> None:
        """Remove every message without blocking the event loop."""
        await call_store(self.clear)

    # -- helpers --------------------------------------------------------------------

    @staticmethod
    def _encode(messages: Sequence[BaseMessage]) -> list[tuple[str, str]]:
        """Return (role, JSON text) per message; raise before anything is written."""
        encoded = []
        for index, message in enumerate(messages):
            if not isinstance(message, BaseMessage):
                raise InvalidSessionData(
                    f"item {index} is a {type(message).__name__}, not a LangChain message"
                )
            encoded.append((message.type, encode_item(message_to_dict(message), index)))
        return encoded

    def _append(self, texts: list[tuple[str, str]], session_id: str) -> None:
        # On a retry (the session expired meanwhile) only what is left goes to the new one.
        while texts:
            role, text = texts[0]
            self.store.add_message(session_id, role, text)
            texts.pop(0)

    def _read(self, session_id: str) -> list[BaseMessage]:
        found = []
        for stored in self.store.get_messages(session_id):
            data = decode_item(stored.content)
            try:
                if data is None:
                    raise ValueError("not a JSON object")
                found.extend(messages_from_dict([data]))
            except (ValueError, KeyError, TypeError) as exc:
                # Not a message of ours: skipped, never a crash.
                logger.warning("skipped a stored message that is no LangChain message: %s", exc)
        return found
