"""`python -m session` / `session-store`: look at sessions and check the store, for operators.

Every command works on the store `get_session_store()` builds from the
environment (`POSTGRES_CONNECTION_STRING` or `DATABASE_URL`, `REDIS_URL`,
`DOCSTORE_DATA_DIR`). Records are printed as JSON (one object per line for
lists). Exit status: 0 done, 1 not found / unhealthy / demo failed, 2 bad
usage, 3 a tier is unavailable. Logs (stderr) never show a session id;
`list` shows only short hashes of the ids unless asked for them.
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import docstore

from . import demo
from .config import describe_backends, get_session_store
from .errors import SessionError
from .models import Message, Session
from .store import short_hash

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_UNAVAILABLE"]

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3


def _session_json(session: Session, *, show_id: bool = True) -> dict[str, Any]:
    identity: dict[str, Any] = (
        {"id": session.id} if show_id else {"id_hash": short_hash(session.id)}
    )
    return identity | {
        "user_id": session.user_id,
        "version": session.version,
        "created_at": session.created_at.isoformat(),
        "updated_at": session.updated_at.isoformat(),
        "expires_at": None if session.expires_at is None else session.expires_at.isoformat(),
        "data": session.data,
    }


def _message_json(message: Message) -> dict[str, Any]:
    return {
        "seq": message.seq,
        "id": message.id,
        "role": message.role,
        "content": message.content,
        "metadata": message.metadata,
        "created_at": message.created_at.isoformat(),
    }


def _print_json(record: dict[str, Any], *, indent: int | None = None) -> None:
    print(json.dumps(record, ensure_ascii=False, indent=indent))


def _not_found(session_id: str) -> int:
    print("no such session (missing or expired)", file=sys.stderr)
    logger.info("session %s not found", short_hash(session_id))
    return EXIT_FAILED


# --------------------------------------------------------------------------- commands


def _get(args: argparse.Namespace) -> int:
    with get_session_store() as store:
        session = store.get_session(args.session_id)
    if session is None:
        return _not_found(args.session_id)
    _print_json(_session_json(session), indent=2)
    return EXIT_OK


def _messages(args: argparse.Namespace) -> int:
    with get_session_store() as store:
        if store.get_session(args.session_id) is None:
            return _not_found(args.session_id)
        found = store.get_messages(args.session_id, limit=args.limit, after_seq=args.after_seq)
    for message in found:
        _print_json(_message_json(message))
    return EXIT_OK


def _list(args: argparse.Namespace) -> int:
    with get_session_store() as store:
        found = store.list_sessions(args.user_id, limit=args.limit)
    for session in found:
        _print_json(_session_json(session, show_id=args.show_ids))
    return EXIT_OK


def _purge_expired(args: argparse.Namespace) -> int:
    with get_session_store() as store:
        purged = store.purge_expired(batch_size=args.batch_size)
    print(f"purged {purged} expired documents")
    return EXIT_OK


def _check(args: argparse.Namespace) -> int:
    """Open the store and look up a session that cannot exist, twice: PostgreSQL, then Redis."""
    backends = describe_backends()
    print(f"PostgreSQL tier: {backends.docstore}")
    print(f"Redis tier:      {backends.cache}")
    started = time.perf_counter()
    try:
        store = get_session_store()
    except (SessionError, docstore.DocstoreError) as exc:
        print(f"PostgreSQL: FAILED to open the store: {exc}")
        return EXIT_FAILED
    with store:
        print(f"store opened in {(time.perf_counter() - started) * 1000:.0f} ms")
        # A fresh random id is never a session: the first lookup misses (a read
        # in PostgreSQL, then a fill), the second is answered by Redis.
        probe = secrets.token_urlsafe(32)
        timings = []
        for _ in range(2):
            started = time.perf_counter()
            try:
                store.get_session(probe)
            except (SessionError, docstore.DocstoreError) as exc:
                print(f"PostgreSQL: FAILED: {exc}")
                return EXIT_FAILED
            timings.append((time.perf_counter() - started) * 1000)
        stats = store.stats()
    print(f"PostgreSQL: ok (lookup through both tiers in {timings[0]:.1f} ms)")
    if stats["cache_errors"] or stats["cache_skipped"] or stats["hits"] != 1:
        print(
            f"Redis: FAILED ({stats['cache_errors']} errors, {stats['hits']} hits; "
            "every call falls back to PostgreSQL)"
        )
        return EXIT_FAILED
    print(f"Redis: ok (cache hit in {timings[1]:.1f} ms)")
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    if args.recover is not None:
        return demo.recover(args.recover)
    return demo.run_demo(sessions=args.sessions, messages=args.messages, keep=args.keep)


# --------------------------------------------------------------------------- parser


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"not an int >= 0: {text!r}")
    return value


def _positive(text: str) -> int:
    value = _count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"not an int >= 1: {text!r}")
    return value


# Ids this library generates never start with "-"; ids from elsewhere may.
_DASH_HINT = "An id that starts with '-' goes after '--', as in: session-store get -- -abc"


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of `python -m session`."""
    parser = argparse.ArgumentParser(
        prog="session-store",
        description="Inspect and check the session store configured by the environment "
        "(POSTGRES_CONNECTION_STRING or DATABASE_URL, REDIS_URL, DOCSTORE_DATA_DIR).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str,
        handler: Callable[[argparse.Namespace], int],
        text: str,
        *,
        takes_id: bool = False,
    ) -> argparse.ArgumentParser:
        epilog = _DASH_HINT if takes_id else None
        sub = commands.add_parser(name, help=text, description=text, epilog=epilog)
        sub.set_defaults(handler=handler)
        return sub

    run_demo = command(
        "demo",
        _demo,
        "write conversations, read them hot and cold, recover them in a restarted process",
    )
    run_demo.add_argument("--sessions", type=_positive, default=demo.DEFAULT_SESSIONS)
    run_demo.add_argument("--messages", type=_positive, default=demo.DEFAULT_MESSAGES)
    run_demo.add_argument("--keep", action="store_true", help="keep the demo sessions")
    run_demo.add_argument(
        "--recover", metavar="FILE", help=argparse.SUPPRESS
    )  # the restarted process's half of the demo

    get = command("get", _get, "print a session as JSON", takes_id=True)
    get.add_argument("session_id", metavar="SESSION_ID")

    messages = command(
        "messages", _messages, "print a session's messages, oldest first", takes_id=True
    )
    messages.add_argument("session_id", metavar="SESSION_ID")
    messages.add_argument(
        "--limit", type=_count, help="only the newest N (with --after-seq: the first N after it)"
    )
    messages.add_argument("--after-seq", type=_count, help="only the messages after this seq")

    listing = command(
        "list", _list, "print a user's live sessions, most recently updated first", takes_id=True
    )
    listing.add_argument("user_id", metavar="USER_ID")
    listing.add_argument("--limit", type=_count, default=100)
    listing.add_argument(
        "--show-ids", action="store_true", help="print the session ids, not their short hashes"
    )

    purge = command("purge-expired", _purge_expired, "delete expired sessions and their messages")
    purge.add_argument("--batch-size", type=_positive, default=1000)

    command("check", _check, "reach both tiers and report their health")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except (SessionError, docstore.DocstoreError) as exc:
        # StoreUnavailable and friends: say what failed, without a traceback.
        print(f"session-store: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE if isinstance(exc, docstore.StoreUnavailable) else EXIT_FAILED
