"""`python -m session` / `session-store`: look at sessions and check the store, for operators.

Every command works on the store `open_store()` builds from the environment
(`POSTGRES_CONNECTION_STRING` or `DATABASE_URL`, `REDIS_URL`,
`DOCSTORE_DATA_DIR`, `SESSION_KEY_PREFIX`) and the `--key-prefix` option.
Results are printed as JSON on stdout (one object per line for lists), except
the demo's narration; errors are one line on stderr. Exit status: 0 done,
1 not found / unhealthy / demo failed, 2 bad usage (arguments or a malformed
variable), 3 a tier is unavailable (PostgreSQL for every command, Redis for
`check`; the other commands answer from PostgreSQL when Redis fails, and say
so on stderr). Logs (stderr) never show a session id; `list` shows only short
hashes of the ids unless asked for them.

A new command is a handler `(args) -> exit status` registered in
`build_parser()` with `command(...)`; it opens the store with
`opened_store(args)` and raises `UsageError` for bad input. `main()` turns
errors into the exit statuses above.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import docstore
from docstore.config import MEMORY_URL, URL_VARIABLES

from . import demo
from .config import (
    REDIS_VARIABLE,
    check_key_prefix,
    check_postgres_dsn,
    check_redis_url,
    describe_backends,
    get_session_store,
)
from .errors import SessionError
from .models import Message, Session
from .store import SessionStore, short_hash

__all__ = [
    "main",
    "build_parser",
    "open_store",
    "opened_store",
    "store_options",
    "StoreOptions",
    "UsageError",
    "EXIT_OK",
    "EXIT_FAILED",
    "EXIT_USAGE",
    "EXIT_UNAVAILABLE",
    "KEY_PREFIX_VARIABLE",
    "DEFAULT_KEY_PREFIX",
]

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3

KEY_PREFIX_VARIABLE = "SESSION_KEY_PREFIX"
DEFAULT_KEY_PREFIX = "sess:"


class UsageError(Exception):
    """A bad argument or environment variable: `main()` prints it on one line and exits 2."""


@dataclass(frozen=True)
class StoreOptions:
    """Where the commands' store lives, read from the environment and the options."""

    docstore_url: str | None  # None: the embedded server
    redis_url: str | None  # None: an in-process fakeredis
    key_prefix: str


def store_options(args: argparse.Namespace) -> StoreOptions:
    """Read and check the store's settings; raise UsageError naming a malformed one."""
    docstore_url = None
    for variable in URL_VARIABLES:
        value = os.environ.get(variable)
        if value:
            if value.strip() != MEMORY_URL:
                _checked(variable, check_postgres_dsn, value)
            docstore_url = value
            break
    redis_url = os.environ.get(REDIS_VARIABLE) or None
    if redis_url is not None:
        _checked(REDIS_VARIABLE, check_redis_url, redis_url)
    key_prefix: str | None = getattr(args, "key_prefix", None)
    if key_prefix is not None:
        _checked("--key-prefix", check_key_prefix, key_prefix)
    else:
        key_prefix = os.environ.get(KEY_PREFIX_VARIABLE) or DEFAULT_KEY_PREFIX
        _checked(KEY_PREFIX_VARIABLE, check_key_prefix, key_prefix)
    return StoreOptions(docstore_url=docstore_url, redis_url=redis_url, key_prefix=key_prefix)


def _checked(name: str, check: Callable[[str], None], value: str) -> None:
    try:
        check(value)
    except ValueError as exc:
        # The checks never repeat the value: it may hold a password.
        raise UsageError(f"{name}: {exc}") from None


def open_store(args: argparse.Namespace) -> SessionStore:
    """Return the store the command line names (environment and `--key-prefix`)."""
    options = store_options(args)
    return get_session_store(
        docstore_url=options.docstore_url,
        redis_url=options.redis_url or "",
        key_prefix=options.key_prefix,
    )


@contextmanager
def opened_store(args: argparse.Namespace) -> Iterator[SessionStore]:
    """Open the store for one command; afterwards say on stderr if Redis failed meanwhile."""
    with open_store(args) as store:
        yield store
        stats = store.stats()
    if stats["cache_errors"] or stats["cache_skipped"]:
        # The answer is right (it came from PostgreSQL), so the exit status stands.
        print(
            f"session-store: warning: Redis unavailable ({stats['cache_errors']} failed calls, "
            f"{stats['cache_skipped']} skipped); answered from PostgreSQL",
            file=sys.stderr,
        )


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
    with opened_store(args) as store:
        session = store.get_session(args.session_id)
    if session is None:
        return _not_found(args.session_id)
    _print_json(_session_json(session), indent=2)
    return EXIT_OK


def _messages(args: argparse.Namespace) -> int:
    with opened_store(args) as store:
        if store.get_session(args.session_id) is None:
            return _not_found(args.session_id)
        found = store.get_messages(args.session_id, limit=args.limit, after_seq=args.after_seq)
    for message in found:
        _print_json(_message_json(message))
    return EXIT_OK


def _list(args: argparse.Namespace) -> int:
    with opened_store(args) as store:
        found = store.list_sessions(args.user_id, limit=args.limit)
    for session in found:
        _print_json(_session_json(session, show_id=args.show_ids))
    return EXIT_OK


def _purge_expired(args: argparse.Namespace) -> int:
    with opened_store(args) as store:
        purged = store.purge_expired(batch_size=args.batch_size)
    _print_json({"purged": purged})
    return EXIT_OK


def _check(args: argparse.Namespace) -> int:
    """Open the store and look up a session that cannot exist, twice: PostgreSQL, then Redis.

    Prints one JSON object: each tier's description, `ok`, timing and error.
    Exit 0 both healthy; 3 a tier unreachable; 1 a tier answered but wrongly.
    """
    options = store_options(args)
    backends = describe_backends(docstore_url=options.docstore_url, redis_url=options.redis_url)
    report: dict[str, Any] = {
        "healthy": False,
        "key_prefix": options.key_prefix,
        "postgres": {"backend": backends.docstore, "ok": False},
        "redis": {"backend": backends.cache, "ok": False},
    }
    postgres, cache = report["postgres"], report["redis"]
    status = EXIT_OK
    started = time.perf_counter()
    try:
        store = open_store(args)
    except (SessionError, docstore.DocstoreError) as exc:
        postgres["error"] = f"cannot open the store: {exc}"
        cache["error"] = "not checked"
        _print_json(report, indent=2)
        return _failure_status(exc)
    with store:
        postgres["open_ms"] = _ms_since(started)
        # A fresh random id is never a session: the first lookup misses (a read
        # in PostgreSQL, then a fill), the second is answered by Redis.
        probe = secrets.token_urlsafe(32)
        timings = []
        for _ in range(2):
            started = time.perf_counter()
            try:
                store.get_session(probe)
            except (SessionError, docstore.DocstoreError) as exc:
                postgres["error"] = str(exc)
                cache["error"] = "not checked"
                _print_json(report, indent=2)
                return _failure_status(exc)
            timings.append(_ms_since(started))
        stats = store.stats()
    postgres.update(ok=True, lookup_ms=timings[0])
    if stats["cache_errors"] or stats["cache_skipped"]:
        cache["error"] = (
            f"unreachable or failing ({stats['cache_errors']} errors); "
            "every call falls back to PostgreSQL"
        )
        status = EXIT_UNAVAILABLE
    elif stats["hits"] != 1:
        cache["error"] = f"answered, but served {stats['hits']} hits where 1 was due"
        status = EXIT_FAILED
    else:
        cache.update(ok=True, hit_ms=timings[1])
    report["healthy"] = status == EXIT_OK
    _print_json(report, indent=2)
    return status


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


def _demo(args: argparse.Namespace) -> int:
    prefix = store_options(args).key_prefix
    if args.recover is not None:
        return demo.recover(args.recover, key_prefix=prefix)
    return demo.run_demo(
        sessions=args.sessions, messages=args.messages, keep=args.keep, key_prefix=prefix
    )


# --------------------------------------------------------------------------- parser


def int_at_least(minimum: int) -> Callable[[str], int]:
    """Return an argparse type: an integer >= `minimum`, with one wording for every option."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


_count = int_at_least(0)
_positive = int_at_least(1)


# Ids this library generates never start with "-"; ids from elsewhere may.
_DASH_HINT = "An id that starts with '-' goes after '--', as in: session-store get -- -abc"


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of `python -m session`."""
    # Options every command takes, before or after the command's name.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--key-prefix",
        default=argparse.SUPPRESS,
        metavar="PREFIX",
        help=f"the store's Redis key prefix (default: ${KEY_PREFIX_VARIABLE}, "
        f"else {DEFAULT_KEY_PREFIX!r})",
    )
    parser = argparse.ArgumentParser(
        prog="session-store",
        parents=[common],
        description="Inspect and check the session store configured by the environment "
        "(POSTGRES_CONNECTION_STRING or DATABASE_URL, REDIS_URL, DOCSTORE_DATA_DIR, "
        f"{KEY_PREFIX_VARIABLE}).",
        epilog="Exit status: 0 done, 1 not found / unhealthy / demo failed, 2 bad usage, "
        "3 a tier unavailable.",
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
        sub = commands.add_parser(
            name, help=text, description=text, epilog=epilog, parents=[common]
        )
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
    except UsageError as exc:
        print(f"session-store: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (SessionError, docstore.DocstoreError) as exc:
        # StoreUnavailable and friends: say what failed, without a traceback.
        print(f"session-store: {exc}", file=sys.stderr)
        return _failure_status(exc)


def _failure_status(exc: Exception) -> int:
    return EXIT_UNAVAILABLE if isinstance(exc, docstore.StoreUnavailable) else EXIT_FAILED
