"""A small chat service written only against the `session` API.

`ChatService.handle` takes one request and returns the response, both plain
dicts (what a web framework would decode from and encode to JSON):

    {"op": "chat", "session_id": "...", "user_id": "u1", "text": "hi", "request_id": "r-17"}
        -> {"session_id": "...", "reply": "...", "history": [{"seq": 1, "role": "user", ...}]}
    {"op": "history", "session_id": "..."}
        -> {"session_id": "...", "history": [...]}

A chat request looks the session up (creating one when it is missing or
expired, whose id the response carries), appends the user's message and the
bot's reply, and returns the conversation. With a `request_id` the two
messages get ids derived from it, so a client that retries a request whose
answer it never got (the service crashed, the connection broke) does not add
them twice. The history is read back from the store, so that it is the same
after a restart, from Redis or from PostgreSQL.

Run as a script, it serves JSON lines: one request per line on stdin, one
response per line on stdout. The store comes from `get_session_store()`, i.e.
from POSTGRES_CONNECTION_STRING / DATABASE_URL and REDIS_URL (with none set:
the embedded PostgreSQL server and an in-process fakeredis):

    echo '{"op": "chat", "user_id": "u1", "text": "hello"}' | python examples/chat_service.py
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from session import (
    InvalidSessionData,
    Message,
    SessionError,
    SessionStore,
    StoreUnavailable,
    get_session_store,
)

__all__ = ["ChatService", "echo_bot", "serve", "main"]

logger = logging.getLogger("chat_service")

# How many messages a response carries (the newest ones).
HISTORY_LIMIT = 50

Bot = Callable[[Sequence[Message]], str]


def echo_bot(history: Sequence[Message]) -> str:
    """Answer the last user message by repeating it."""
    return f"echo: {history[-1].content}" if history else "hello!"


def _message_json(message: Message) -> dict[str, Any]:
    return {"seq": message.seq, "role": message.role, "content": message.content}


class ChatService:
    """Handle chat requests on a SessionStore: one session per conversation."""

    def __init__(self, store: SessionStore, bot: Bot = echo_bot) -> None:
        self._store = store
        self._bot = bot

    def chat(
        self,
        session_id: str | None,
        text: str,
        *,
        user_id: str | None = None,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """Add the user's message and the bot's reply; return the session id and history."""
        session = self._store.get_session(session_id) if session_id else None
        if session is None:
            session = self._store.create_session(user_id, {"turns": 0})
        user_message = self._store.add_message(
            session.id,
            "user",
            text,
            message_id=None if request_id is None else f"{request_id}.user",
        )
        # The bot sees the conversation up to this request's message, also on a retry.
        context = self._store.get_messages(
            session.id, before_seq=user_message.seq + 1, limit=HISTORY_LIMIT
        )
        reply = self._store.add_message(
            session.id,
            "assistant",
            self._bot(context),
            message_id=None if request_id is None else f"{request_id}.assistant",
        )
        return {
            "session_id": session.id,
            "reply": reply.content,
            "history": self.history(session.id)["history"],
        }

    def history(self, session_id: str) -> dict[str, Any]:
        """Return the newest messages of the conversation, oldest first."""
        messages = self._store.get_messages(session_id, limit=HISTORY_LIMIT)
        return {"session_id": session_id, "history": [_message_json(m) for m in messages]}

    def handle(self, request: object) -> dict[str, Any]:
        """Answer one decoded JSON request; errors become `{"error": ...}`."""
        if not isinstance(request, dict):
            return {"error": "a request is a JSON object"}
        op = request.get("op", "chat")
        session_id = request.get("session_id")
        if session_id is not None and not isinstance(session_id, str):
            return {"error": "session_id must be a string"}
        try:
            if op == "chat":
                text = request.get("text")
                request_id = request.get("request_id")
                if not isinstance(text, str):
                    return {"error": "text must be a string"}
                if request_id is not None and not isinstance(request_id, str):
                    return {"error": "request_id must be a string"}
                return self.chat(
                    session_id,
                    text,
                    user_id=request.get("user_id"),
                    request_id=request_id,
                )
            if op == "history":
                if session_id is None:
                    return {"error": "history needs a session_id"}
                return self.history(session_id)
            return {"error": f"unknown op {op!r}"}
        except InvalidSessionData as exc:
            return {"error": f"invalid request: {exc}"}
        except StoreUnavailable:
            logger.warning("the session store is unavailable")
            return {"error": "unavailable, try again"}
        except SessionError as exc:
            # The session vanished between the lookup and the append (deleted, expired).
            return {"error": f"session error: {exc}"}


def serve(service: ChatService, requests: TextIO, responses: TextIO) -> None:
    """Answer JSON-lines requests until the input ends."""
    for line in requests:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
        except json.JSONDecodeError:
            response: dict[str, Any] = {"error": "not JSON"}
        else:
            response = service.handle(request)
        responses.write(json.dumps(response) + "\n")
        responses.flush()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A chat service on the session store.")
    parser.add_argument("--key-prefix", default="sess:", help="Redis key prefix of the sessions")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    with get_session_store(key_prefix=args.key_prefix) as store:
        serve(ChatService(store), sys.stdin, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
