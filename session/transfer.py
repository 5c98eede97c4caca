"""Export and import sessions with their messages, as JSON Lines.

One line per session, its messages in `seq` order inside it:

    {"id": ..., "user_id": ..., "created_at": ..., "updated_at": ..., "expires_at": ...,
     "version": ..., "data": {...}, "conversation": ..., "last_seq": ...,
     "messages": [{"seq": ..., "id": ..., "role": ..., "content": ..., "metadata": {...},
                   "created_at": ...}, ...]}

Timestamps are ISO 8601 in UTC with microseconds; `conversation` is the
session's internal conversation key and `last_seq` the highest seq ever given
out in it (higher than the last message's after a pop), so an import restores
the session exactly: same ids, seqs, message ids, versions and timestamps.

Export walks the table by keyset pages and streams each line as it goes, so
its memory does not grow with the table or with one session's conversation.
Import commits each session with its messages in one transaction: a line is
imported whole or not at all, and importing the same file again changes
nothing (a session already present at the same version is left alone).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import docstore
from docstore import Document
from docstore.store import check_name

from .errors import StoreUnavailable
from .models import RESERVED_KEY, session_state_from_document
from .store import SessionStore, short_hash

__all__ = [
    "ExportReport",
    "ImportReport",
    "Rejection",
    "export_sessions",
    "import_sessions",
    "atomic_output",
    "MAX_KEPT_REJECTIONS",
]

SESSION_PAGE = 100
MESSAGE_PAGE = 1000
# An import of a file full of garbage must not keep every rejection in memory.
MAX_KEPT_REJECTIONS = 1000
_SESSION_FIELDS = (
    "id",
    "user_id",
    "created_at",
    "updated_at",
    "expires_at",
    "version",
    "data",
    "conversation",
    "last_seq",
    "messages",
)
_MESSAGE_FIELDS = ("seq", "id", "role", "content", "metadata", "created_at")


def _json(value: Any) -> str:
    # Sorted keys: the same session exports to the same bytes from every store.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def _timestamp(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="microseconds")


# --------------------------------------------------------------------------- export


@dataclass(frozen=True)
class ExportReport:
    """How many sessions and messages an export wrote."""

    sessions: int
    messages: int


def export_sessions(
    store: SessionStore,
    out: IO[str],
    *,
    user_id: str | None = None,
    include_expired: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ExportReport:
    """Write every session (or `user_id`'s) with its messages to `out`, one line each.

    Sessions go in (created_at, id) order; expired ones only with
    `include_expired`. `progress(n)` is called after each page with the
    number of sessions it wrote.
    """
    documents = store.document_store
    sessions, _ = store.collections
    filters = None if user_id is None else {f"{RESERVED_KEY}.user_id": user_id}
    written_sessions = written_messages = 0
    after: Document | None = None
    while True:
        with store_errors(store):
            page = documents.dump(
                sessions, filters, after=after, limit=SESSION_PAGE, include_expired=include_expired
            )
        for item in page:
            count = _export_one(store, out, item.document, item.counter)
            if count is not None:
                written_sessions += 1
                written_messages += count
        if progress is not None and page:
            progress(len(page))
        if len(page) < SESSION_PAGE:
            return ExportReport(written_sessions, written_messages)
        after = page[-1].document


def _export_one(store: SessionStore, out: IO[str], doc: Document, last_seq: int) -> int | None:
    """Write one session's line, streaming its messages; None if `doc` is not a session."""
    state = session_state_from_document(doc, doc.id)
    if state is None:
        return None
    session = state.session
    head = {
        "id": session.id,
        "user_id": session.user_id,
        "created_at": _timestamp(session.created_at),
        "updated_at": _timestamp(session.updated_at),
        "expires_at": None if session.expires_at is None else _timestamp(session.expires_at),
        "version": session.version,
        "data": session.data,
        "conversation": state.conversation,
        "last_seq": last_seq,
    }
    out.write("{")
    out.write(",".join(f"{_json(name)}:{_json(head[name])}" for name in _SESSION_FIELDS[:-1]))
    out.write(',"messages":[')
    count = 0
    for message in _messages(store, state.conversation, last_seq):
        out.write(("," if count else "") + _json(message))
        count += 1
    out.write("]}\n")
    return count


def _messages(store: SessionStore, conversation: str, last_seq: int) -> Iterator[dict[str, Any]]:
    """Yield the conversation's messages up to `last_seq`, oldest first, a page at a time.

    Messages appended after the session was read have a higher seq and are
    left out, so each line is the session as it was when it was read.
    """
    documents = store.document_store
    _, messages = store.collections
    after_seq = 0
    while after_seq < last_seq:
        with store_errors(store):
            page = documents.query(
                messages,
                {"conv": conversation, "seq": {"$gt": after_seq, "$lte": last_seq}},
                order_by="seq",
                limit=MESSAGE_PAGE,
            )
        for doc in page:
            data = doc.data
            yield {
                "seq": data.get("seq"),
                "id": data.get("message_id"),
                "role": data.get("role"),
                "content": data.get("content"),
                "metadata": data.get("metadata"),
                "created_at": _timestamp(doc.created_at),
            }
        if len(page) < MESSAGE_PAGE:
            return
        after_seq = int(page[-1].data["seq"])


@contextmanager
def atomic_output(path: Path) -> Iterator[IO[str]]:
    """Yield a file that appears at `path` only when the block completes.

    Interrupted (Ctrl-C) or failed, the partial file is removed and whatever
    was at `path` before is left as it was.
    """
    directory = path.resolve().parent
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=directory)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- import


@dataclass(frozen=True)
class Rejection:
    """A line that was not imported, and why."""

    line: int
    reason: str


@dataclass
class ImportReport:
    """What an import did: sessions written, already present, rejected."""

    imported: int = 0
    unchanged: int = 0
    messages: int = 0
    rejected: int = 0
    rejections: list[Rejection] = field(default_factory=list)  # the first MAX_KEPT_REJECTIONS
    lines: int = 0


class _Rejected(Exception):
    """The line cannot be imported; the message is the reason."""


def import_sessions(
    store: SessionStore,
    lines: Iterable[str],
    *,
    progress: Callable[[str], None] | None = None,
    on_reject: Callable[[Rejection], None] | None = None,
) -> ImportReport:
    """Import JSON Lines as `export_sessions` writes them; return what happened.

    Each session is committed with its messages in one transaction. A line
    that cannot be imported (bad JSON, a bad field, an id held by another
    session) is reported through `on_reject` and the rest is still imported.
    `progress(line)` is called after each line. StoreUnavailable propagates:
    what was committed before stays, and importing again is safe.
    """
    report = ImportReport()
    for number, line in enumerate(lines, start=1):
        report.lines = number
        if line.strip():
            try:
                outcome = _import_line(store, line)
            except _Rejected as exc:
                rejection = Rejection(number, str(exc))
                report.rejected += 1
                if len(report.rejections) < MAX_KEPT_REJECTIONS:
                    report.rejections.append(rejection)
                if on_reject is not None:
                    on_reject(rejection)
            else:
                if outcome is None:
                    report.unchanged += 1
                else:
                    report.imported += 1
                    report.messages += outcome
        if progress is not None:
            progress(line)
    return report


def _import_line(store: SessionStore, line: str) -> int | None:
    """Import one line; return its message count, None if it was already there."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise _Rejected(f"bad JSON: {exc}") from None
    session, counter, messages = _documents(store, record)
    documents = store.document_store
    sessions_collection, messages_collection = store.collections
    conversation = record["conversation"]
    try:
        with store_errors(store), documents.transaction():
            existing = documents.read(sessions_collection, session.id)
            if existing is not None:
                _compare(existing, session, conversation)
                return None
            owners = documents.query(
                sessions_collection, {f"{RESERVED_KEY}.conv": conversation}, limit=2
            )
            if any(owner.id != session.id for owner in owners):
                raise _Rejected(
                    "its conversation key belongs to another session (renamed by "
                    "rotate_session_id since the export?)"
                )
            written_meanwhile = documents.restore(session, counter=counter)
            if written_meanwhile is not None:
                # Another import of the same line, say, committed it first.
                _compare(written_meanwhile, session, conversation)
                return None
            # Messages left by an expired or deleted session of this conversation
            # are orphans (no live session holds the key): the imported ones replace them.
            documents.delete_many(messages_collection, {"conv": conversation})
            held = documents.restore_many(messages)
            if held:
                raise _Rejected(f"message document {held[0]!r} is taken")
    except docstore.DocumentExists as exc:
        raise _Rejected(f"a unique value is taken: {exc}") from None
    except docstore.InvalidDocument as exc:
        raise _Rejected(f"bad field: {exc}") from None
    except StoreUnavailable:
        raise
    except docstore.DocstoreError as exc:
        raise _Rejected(f"the docstore refused it: {exc}") from None
    store.evict(session.id)
    return len(messages)


def _compare(existing: Document, session: Document, conversation: str) -> None:
    """Return if `existing` is the session of the line as it was exported, else reject."""
    state = session_state_from_document(existing, existing.id)
    if state is None or state.conversation != conversation:
        raise _Rejected(f"session id {short_hash(session.id)} is taken by a different session")
    if (existing.version, existing.updated_at, existing.created_at) != (
        session.version,
        session.updated_at,
        session.created_at,
    ):
        raise _Rejected(
            f"session {short_hash(session.id)} exists at version {existing.version} "
            f"(the line has version {session.version}); it changed since the export"
        )


@contextmanager
def store_errors(store: SessionStore) -> Iterator[None]:
    """Re-raise a docstore StoreUnavailable as the session package's own."""
    try:
        yield
    except docstore.StoreUnavailable as exc:
        raise StoreUnavailable(str(exc), outcome_unknown=exc.outcome_unknown) from exc


# --------------------------------------------------------------------------- validation


def _documents(store: SessionStore, record: object) -> tuple[Document, int, list[Document]]:
    """Return the session document, its counter and its message documents, or reject."""
    if not isinstance(record, dict):
        raise _Rejected(f"bad JSON: a line must be an object, not {type(record).__name__}")
    _fields(record, _SESSION_FIELDS, "session")
    session_id = _name(record, "id")
    user_id = record["user_id"]
    if user_id is not None and not isinstance(user_id, str):
        raise _Rejected("bad field 'user_id': must be a string or null")
    data = record["data"]
    if not isinstance(data, dict):
        raise _Rejected("bad field 'data': must be an object")
    if RESERVED_KEY in data:
        raise _Rejected(f"bad field 'data': the key {RESERVED_KEY!r} is reserved for the store")
    conversation = _name(record, "conversation")
    version = _int(record, "version", 1)
    last_seq = _int(record, "last_seq", 0)
    created_at = _moment(record, "created_at")
    updated_at = _moment(record, "updated_at")
    expires_at = None if record["expires_at"] is None else _moment(record, "expires_at")
    raw_messages = record["messages"]
    if not isinstance(raw_messages, list):
        raise _Rejected("bad field 'messages': must be a list")
    sessions_collection, messages_collection = store.collections
    body = {**data, RESERVED_KEY: {"user_id": user_id, "conv": conversation}}
    session = Document(
        session_id, sessions_collection, body, created_at, updated_at, version, expires_at
    )
    messages: list[Document] = []
    previous = 0
    for index, raw in enumerate(raw_messages):
        where = f"messages[{index}]"
        if not isinstance(raw, dict):
            raise _Rejected(f"bad field '{where}': must be an object")
        _fields(raw, _MESSAGE_FIELDS, where)
        seq = _int(raw, "seq", 1, where)
        if seq <= previous or seq > last_seq:
            raise _Rejected(
                f"bad field '{where}.seq': {seq} is not above the previous message's "
                f"({previous}) and at most last_seq ({last_seq})"
            )
        previous = seq
        message_id = _name(raw, "id", where)
        for name in ("role", "content"):
            if not isinstance(raw[name], str):
                raise _Rejected(f"bad field '{where}.{name}': must be a string")
        if not isinstance(raw["metadata"], dict):
            raise _Rejected(f"bad field '{where}.metadata': must be an object")
        created = _moment(raw, "created_at", where)
        message_body = {
            "conv": conversation,
            "message_id": message_id,
            "role": raw["role"],
            "content": raw["content"],
            "metadata": raw["metadata"],
            "parent": session_id,
            "seq": seq,
        }
        messages.append(
            Document(
                f"{conversation}.{message_id}",
                messages_collection,
                message_body,
                created,
                created,
                1,
            )
        )
    return session, last_seq, messages


def _fields(record: dict[str, Any], names: tuple[str, ...], what: str) -> None:
    missing = [name for name in names if name not in record]
    unknown = sorted(set(record) - set(names))
    if missing:
        raise _Rejected(f"bad field: the {what} lacks {', '.join(map(repr, missing))}")
    if unknown:
        raise _Rejected(f"bad field: the {what} has unknown {', '.join(map(repr, unknown))}")


def _name(record: dict[str, Any], name: str, where: str = "") -> str:
    label = f"{where}.{name}" if where else name
    try:
        return check_name(label, record[name])
    except docstore.InvalidDocument as exc:
        raise _Rejected(f"bad field '{label}': {exc}") from None


def _int(record: dict[str, Any], name: str, low: int, where: str = "") -> int:
    value = record[name]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < 2**63:
        label = f"{where}.{name}" if where else name
        raise _Rejected(f"bad field '{label}': must be an integer >= {low}, not {value!r}")
    return value


def _moment(record: dict[str, Any], name: str, where: str = "") -> datetime:
    value = record[name]
    label = f"{where}.{name}" if where else name
    try:
        moment = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        moment = None
    if moment is None or moment.utcoffset() is None:
        raise _Rejected(f"bad field '{label}': must be an ISO 8601 time with a UTC offset")
    return moment.astimezone(timezone.utc)
