"""An asyncio chat service over HTTP (FastAPI), written only against `AsyncSessionStore`.

    POST /chat   {"text": "hi", "session_id": "...", "user_id": "u1", "request_id": "r-17"}
        -> 200 {"session_id": "...", "reply": "...", "history": [{"seq": 1, "role": "user", ...}]}
    GET  /sessions/{session_id}/history
        -> 200 {"session_id": "...", "history": [...]}, 404 when there is no such session
    GET  /health -> 200 {"ok": true}

A chat request looks the session up (creating one when it is missing or
expired, whose id the response carries; only `text` is required), appends the
user's message and the bot's reply, and returns the conversation. With a
`request_id` the two messages get ids derived from it, so a client that
retries a request whose answer it never got (the service crashed, the
connection broke) does not add them twice. Every answer is read back from the
store, so it is the same after a restart, from Redis or from PostgreSQL.
Errors: 422 for a request the store refuses, 409 when the session vanished
during the request, 503 while PostgreSQL is unreachable.

Run it (needs the `examples` extra: `pip install -e '.[examples]'`):

    python examples/async_chat_service.py --port 8000
    curl -s localhost:8000/chat -H 'content-type: application/json' -d '{"text": "hello"}'

The store comes from `get_async_session_store()`, i.e. from
POSTGRES_CONNECTION_STRING / DATABASE_URL (and DOCSTORE_TABLE) and REDIS_URL;
with none set, the embedded PostgreSQL server and an in-process fakeredis.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from session import (
    AsyncSessionStore,
    InvalidSessionData,
    Message,
    SessionError,
    StoreUnavailable,
    get_async_session_store,
)

__all__ = ["AsyncChatService", "ChatRequest", "create_app", "echo_bot", "main"]

logger = logging.getLogger("async_chat_service")

# How many messages a response carries (the newest ones).
HISTORY_LIMIT = 50

Bot = Callable[[Sequence[Message]], str]


def echo_bot(history: Sequence[Message]) -> str:
    """Answer the last user message by repeating it."""
    return f"echo: {history[-1].content}" if history else "hello!"


def _message_json(message: Message) -> dict[str, Any]:
    return {"seq": message.seq, "role": message.role, "content": message.content}


class ChatRequest(BaseModel):
    """The body of `POST /chat`."""

    text: str
    session_id: str | None = None
    user_id: str | None = None
    request_id: str | None = None


class AsyncChatService:
    """Handle chat requests on an AsyncSessionStore: one session per conversation."""

    def __init__(self, store: AsyncSessionStore, bot: Bot = echo_bot) -> None:
        self._store = store
        self._bot = bot

    async def chat(self, request: ChatRequest) -> dict[str, Any]:
        """Add the user's message and the bot's reply; return the session id and history."""
        store = self._store
        session = await store.get_session(request.session_id) if request.session_id else None
        if session is None:
            session = await store.create_session(request.user_id, {"turns": 0})
        request_id = request.request_id
        user_message = await store.add_message(
            session.id,
            "user",
            request.text,
            message_id=None if request_id is None else f"{request_id}.user",
        )
        # The bot sees the conversation up to this request's message, also on a retry.
        context = await store.get_messages(
            session.id, before_seq=user_message.seq + 1, limit=HISTORY_LIMIT
        )
        reply = await store.add_message(
            session.id,
            "assistant",
            self._bot(context),
            message_id=None if request_id is None else f"{request_id}.assistant",
        )
        history = await self.history(session.id)
        return {"session_id": session.id, "reply": reply.content, "history": history}

    async def history(self, session_id: str) -> list[dict[str, Any]]:
        """Return the newest messages of the conversation, oldest first."""
        messages = await self._store.get_messages(session_id, limit=HISTORY_LIMIT)
        return [_message_json(message) for message in messages]

    async def exists(self, session_id: str) -> bool:
        """Return whether the session is live."""
        return await self._store.get_session(session_id) is not None


def create_app(store: AsyncSessionStore | None = None, *, key_prefix: str = "sess:") -> FastAPI:
    """Return the service's app: on `store` (left open), else on `get_async_session_store()`.

    The store built here is built at start-up (off the event loop: with no
    variables set that starts the embedded server) and closed at shutdown.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if store is not None:
            yield
            return
        built = await asyncio.to_thread(get_async_session_store, key_prefix=key_prefix)
        app.state.service = AsyncChatService(built)
        try:
            yield
        finally:
            await built.aclose()

    app = FastAPI(title="async chat service", lifespan=lifespan)
    if store is not None:
        app.state.service = AsyncChatService(store)

    def service(request: Request) -> AsyncChatService:
        found: AsyncChatService = request.app.state.service
        return found

    @app.post("/chat")
    async def chat(body: ChatRequest, request: Request) -> dict[str, Any]:
        return await service(request).chat(body)

    @app.get("/sessions/{session_id}/history")
    async def history(session_id: str, request: Request) -> dict[str, Any]:
        chat_service = service(request)
        if not await chat_service.exists(session_id):
            raise HTTPException(status_code=404, detail="no such session")
        return {"session_id": session_id, "history": await chat_service.history(session_id)}

    @app.get("/health")
    async def health() -> dict[str, bool]:
        return {"ok": True}

    @app.exception_handler(SessionError)
    async def session_error(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, InvalidSessionData):
            return JSONResponse({"detail": f"invalid request: {exc}"}, status_code=422)
        if isinstance(exc, StoreUnavailable):
            logger.warning("the session store is unavailable")
            return JSONResponse({"detail": "unavailable, try again"}, status_code=503)
        # The session vanished between the lookup and the append (deleted, expired).
        return JSONResponse({"detail": f"session error: {exc}"}, status_code=409)

    return app


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="An asyncio chat service on the session store.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--key-prefix", default="sess:", help="Redis key prefix of the sessions")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    uvicorn.run(
        create_app(key_prefix=args.key_prefix),
        host=args.host,
        port=args.port,
        log_level="warning",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
