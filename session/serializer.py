"""The cache encoding: msgpack arrays behind a small format-version header.

This is the only module that imports msgpack. Every cached value is an array
whose first element is `FORMAT_VERSION` and whose second is the integer the
Lua scripts compare (a session's version, a message's seq), so the scripts
can read it without decoding the rest (see `coherence.VERSION_OF_LUA`).
Timestamps travel as integer microseconds since the epoch, so a value read
from Redis equals the one read from PostgreSQL. The caller's data (session
data, message metadata) travels as the JSON text the docstore stores, decoded
by orjson: it can only yield JSON values, equal to what a
PostgreSQL read returns, and costs one C-speed parse instead of a Python walk
checking msgpack's output. Nothing is ever unpickled.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgpack
import orjson

from docstore.store import encode_json

from .models import Message, SessionState, from_micros, new_session, new_state, to_micros

__all__ = [
    "FORMAT_VERSION",
    "TOMBSTONE",
    "DecodeError",
    "EncodeError",
    "encode_session",
    "session_patch",
    "decode_session",
    "encode_message",
    "decode_message",
]

# 2: data and metadata as JSON text (1 held them as msgpack maps).
FORMAT_VERSION = 2
_SESSION_FIELDS = 8
_MESSAGE_FIELDS = 7
# Versions and seqs are PostgreSQL bigints: anything larger was not written by a store.
_MAX_BIGINT = 2**63 - 1

# A deleted session: no version in the second slot, so no script ever treats
# it as an older value it may replace.
TOMBSTONE: bytes = msgpack.packb([FORMAT_VERSION, None], use_bin_type=True)
# A session value's array header (eight elements) and format version.
_SESSION_HEAD: bytes = bytes([0x90 + _SESSION_FIELDS]) + msgpack.packb(FORMAT_VERSION)


class DecodeError(ValueError):
    """A cached value that is garbage, of another format version, or of the wrong shape."""


class EncodeError(ValueError):
    """A value msgpack cannot encode (it is then not cached)."""


def _pack(value: list[Any]) -> bytes:
    try:
        packed: bytes = msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(f"cannot encode a cache value: {type(exc).__name__}") from exc
    return packed


def _unpack(raw: object, fields: int) -> list[Any]:
    if not isinstance(raw, bytes):
        raise DecodeError(f"a cached value must be bytes, not {type(raw).__name__}")
    try:
        # raw=False, use_list=True and strict_map_key=True are msgpack's defaults;
        # spelling them out costs a keyword parse per value.
        value = msgpack.unpackb(raw)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise DecodeError(f"not msgpack: {type(exc).__name__}") from exc
    if not isinstance(value, list) or not value:
        raise DecodeError("not a versioned array")
    if value[0] != FORMAT_VERSION or isinstance(value[0], bool):
        # Never echo what was found: it may be someone's data.
        raise DecodeError(f"not format version {FORMAT_VERSION}")
    if len(value) != fields:
        raise DecodeError(f"{len(value)} fields, expected {fields}")
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_text(value: dict[str, Any]) -> str:
    try:
        return encode_json(value)
    except (TypeError, ValueError) as exc:
        raise EncodeError(f"cannot encode a cache value: {type(exc).__name__}") from exc


def _require_dict(text: object) -> dict[str, Any]:
    # orjson parses a session's ~1 KB of data in a third of the time of json's
    # C scanner. It reads integers from 2**63 to 2**64 as ints where the
    # docstore's decoder gives floats; a value this store encoded holds none
    # (the docstore refuses them on the way in and reads them back as floats),
    # and what a forged value holds is still only JSON.
    if not isinstance(text, str):
        raise DecodeError(f"expected JSON text, got {type(text).__name__}")
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise DecodeError("not JSON") from exc
    if not isinstance(value, dict):
        raise DecodeError(f"expected an object, got {type(value).__name__}")
    return value


def encode_session(state: SessionState) -> bytes:
    """Return the cache value of a session."""
    session = state.session
    return _pack(
        [
            FORMAT_VERSION,
            session.version,
            session.user_id,
            state.conversation,
            _json_text(session.data),
            to_micros(session.created_at),
            to_micros(session.updated_at),
            None if session.expires_at is None else to_micros(session.expires_at),
        ]
    )


def session_patch(
    version: int, updated_at: datetime, expires_at: datetime | None
) -> tuple[bytes, bytes]:
    """Return what turns the cached value of a session's previous version into this
    version's, when only these fields changed (an append; see
    `coherence.PATCH_SESSION_LUA`): the array header, format and version, then
    updated and expires. The result is the bytes `encode_session` would give."""
    head = _SESSION_HEAD + _pack_one(version)
    return head, _pack_one(to_micros(updated_at)) + _pack_one(
        None if expires_at is None else to_micros(expires_at)
    )


def _pack_one(value: int | None) -> bytes:
    try:
        packed: bytes = msgpack.packb(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(f"cannot encode a cache value: {type(exc).__name__}") from exc
    return packed


def decode_session(raw: object, session_id: str) -> SessionState:
    """Return the session a cache value holds; raise DecodeError if it holds none."""
    fields = _unpack(raw, _SESSION_FIELDS)
    _, version, user_id, conversation, data, created, updated, expires = fields
    if not _is_int(version) or not 1 <= version <= _MAX_BIGINT:
        raise DecodeError("bad version")
    if not (user_id is None or isinstance(user_id, str)) or not isinstance(conversation, str):
        raise DecodeError("bad user id or conversation")
    if not _is_int(created) or not _is_int(updated) or not (expires is None or _is_int(expires)):
        raise DecodeError("bad timestamps")
    try:
        session = new_session(
            session_id,
            user_id,
            _require_dict(data),
            from_micros(created),
            from_micros(updated),
            None if expires is None else from_micros(expires),
            version,
        )
    except OverflowError as exc:
        raise DecodeError("timestamp out of range") from exc
    return new_state(session, conversation)


def encode_message(message: Message) -> bytes:
    """Return the cache value of a message (its session id is implied by the key)."""
    return _pack(
        [
            FORMAT_VERSION,
            message.seq,
            message.id,
            message.role,
            message.content,
            _json_text(message.metadata),
            to_micros(message.created_at),
        ]
    )


def decode_message(raw: object, session_id: str) -> Message:
    """Return the message a cache value holds; raise DecodeError if it holds none."""
    fields = _unpack(raw, _MESSAGE_FIELDS)
    _, seq, message_id, role, content, metadata, created = fields
    if not _is_int(seq) or not 1 <= seq <= _MAX_BIGINT:
        raise DecodeError("bad seq")
    if not all(isinstance(text, str) for text in (message_id, role, content)):
        raise DecodeError("bad message text")
    if not _is_int(created):
        raise DecodeError("bad timestamp")
    try:
        created_at = from_micros(created)
    except OverflowError as exc:
        raise DecodeError("timestamp out of range") from exc
    return Message(
        session_id=session_id,
        seq=seq,
        id=message_id,
        role=role,
        content=content,
        metadata=_require_dict(metadata),
        created_at=created_at,
    )
