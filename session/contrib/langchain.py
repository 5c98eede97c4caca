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
call and additional kwarg comes back as it went in.

`store` is a `SessionStore` or an `AsyncSessionStore`; `store=None` uses one
process-wide `get_session_store()` (built on first use, closed when the
interpreter exits). The default stays synchronous because LangChain calls
both sides: `invoke` reads `messages` and calls `add_messages`, `ainvoke`
the `a*` methods, and a history must serve whichever the application uses.
- With a `SessionStore`, every method works; the async ones run the store in
  one worker thread per call (`asyncio.to_thread`), so the event loop never
  blocks on PostgreSQL or Redis.
- With an `AsyncSessionStore`, the async methods are awaited on the event
  loop (no thread). The sync ones (`messages`, `add_messages`, `clear`, so
  also `invoke`) raise TypeError naming the async methods to use: an asyncio
  store belongs to its event loop, and blocking on it from sync code would
  deadlock inside that loop. This is how LangChain's own async-only
  histories behave; use `ainvoke`/`astream`, or pass a `SessionStore`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TypeVar

from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import BaseMessage, message_to_dict, messages_from_dict

from ..errors import InvalidSessionData
from ._conversations import (
    AnyStore,
    Conversation,
    Steps,
    call,
    check_key,
    check_store,
    decode_item,
    default_store,
    encode_item,
)

__all__ = ["SessionChatMessageHistory", "NAMESPACE"]

logger = logging.getLogger(__name__)

# The `user_id` prefix that marks this adapter's sessions.
NAMESPACE = "langchain"

T = TypeVar("T")


class SessionChatMessageHistory(BaseChatMessageHistory):
    """LangChain's `BaseChatMessageHistory` over a `SessionStore` (see the module docstring)."""

    def __init__(self, session_id: str, store: AnyStore | None = None) -> None:
        self.session_id = check_key(session_id, "session_id")
        self._conversation = Conversation(
            check_store(store) if store is not None else default_store(),
            NAMESPACE,
            self.session_id,
        )

    @property
    def store(self) -> AnyStore:
        """Return the store holding this conversation."""
        return self._conversation.store

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        """Return every message, oldest first."""
        return self._run(self._conversation.read(self._read, []))

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Append messages in order; one that cannot be stored refuses the whole batch."""
        texts = self._encode(messages)
        if texts:
            self._run(self._conversation.write(lambda sid: self._append(texts, sid)))

    def clear(self) -> None:
        """Remove every message; the conversation key stays usable."""
        self._run(self._clear())

    async def aget_messages(self) -> list[BaseMessage]:
        """Return every message, oldest first, without blocking the event loop."""
        return await self._conversation.arun(self._conversation.read(self._read, []))

    async def aadd_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Append messages without blocking the event loop."""
        texts = self._encode(messages)
        if texts:
            await self._conversation.arun(
                self._conversation.write(lambda sid: self._append(texts, sid))
            )

    async def aclear(self) -> None:
        """Remove every message without blocking the event loop."""
        await self._conversation.arun(self._clear())

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

    def _run(self, steps: Steps[T]) -> T:
        if self._conversation.is_async:
            steps.close()
            raise TypeError(
                "this history's store is an AsyncSessionStore: use aget_messages, "
                "aadd_messages and aclear (ainvoke, astream), or pass a SessionStore"
            )
        return self._conversation.run(steps)

    def _clear(self) -> Steps[int]:
        return (yield from self._conversation.read(lambda sid: call("clear_messages", sid), 0))

    @staticmethod
    def _append(texts: list[tuple[str, str]], session_id: str) -> Steps[None]:
        # On a retry (the session expired meanwhile) only what is left goes to the new one.
        while texts:
            role, text = texts[0]
            yield from call("add_message", session_id, role, text)
            texts.pop(0)

    @staticmethod
    def _read(session_id: str) -> Steps[list[BaseMessage]]:
        found = []
        for stored in (yield from call("get_messages", session_id)):
            data = decode_item(stored.content)
            try:
                if data is None:
                    raise ValueError("not a JSON object")
                found.extend(messages_from_dict([data]))
            except (ValueError, KeyError, TypeError) as exc:
                # Not a message of ours: skipped, never a crash.
                logger.warning("skipped a stored message that is no LangChain message: %s", exc)
        return found
