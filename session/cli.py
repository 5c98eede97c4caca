"""`python -m session` / `session-store`: look at sessions and run the store, for operators.

Every command works on the store `open_store()` builds from the environment
(`POSTGRES_CONNECTION_STRING` or `DATABASE_URL`, `DOCSTORE_TABLE`,
`REDIS_URL`, `DOCSTORE_DATA_DIR`, `SESSION_KEY_PREFIX`) and the
`--key-prefix` option.
Results are printed as JSON on stdout (one object per line for lists), except
the demo's narration and the human tables of `stats` and `doctor` (each has
`--json`); errors are one line on stderr, progress bars and counts of the long
commands go to stderr too. Exit status: 0 done, 1 not found / unhealthy / demo
failed / lines rejected by `import` / `doctor` warnings, 2 bad usage
(arguments or a malformed variable), 3 a tier is unavailable (PostgreSQL for
every command, Redis for `check` and `doctor`; the other commands answer from
PostgreSQL when Redis fails, and say so on stderr), 130 interrupted (Ctrl-C:
nothing is left half-written). Logs (stderr) never show a session id; `list`
shows only short hashes of the ids unless asked for them.

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
from pathlib import Path
from typing import IO, Any

import docstore
from docstore.config import MEMORY_URL, TABLE_VARIABLE, URL_VARIABLES
from docstore.postgres import check_table_name

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
    "EXIT_INTERRUPTED",
    "KEY_PREFIX_VARIABLE",
    "DEFAULT_KEY_PREFIX",
]

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it

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
    table = os.environ.get(TABLE_VARIABLE)
    if table:
        _checked(TABLE_VARIABLE, check_table_name, table)
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


def _checked(name: str, check: Callable[[str], object], value: str) -> None:
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


# --------------------------------------------------------------------------- operations


def _progress(args: argparse.Namespace, **options: Any) -> Any:
    """Return a tqdm progress bar on stderr (shown on a terminal, unless --no-progress)."""
    from tqdm import tqdm

    disable = True if args.no_progress else None  # None: only when stderr is a terminal
    return tqdm(file=sys.stderr, disable=disable, dynamic_ncols=True, **options)


def _export(args: argparse.Namespace) -> int:
    from .transfer import atomic_output, export_sessions

    with opened_store(args) as store:
        sessions, _ = store.collections
        total = None
        if not args.include_expired:
            filters = None if args.user is None else {"_session.user_id": args.user}
            total = store.document_store.count(sessions, filters)
        with _progress(args, total=total, unit=" sessions") as bar:
            if args.output in (None, "-"):
                report = export_sessions(
                    store,
                    sys.stdout,
                    user_id=args.user,
                    include_expired=args.include_expired,
                    progress=bar.update,
                )
                sys.stdout.flush()
            else:
                with atomic_output(Path(args.output)) as out:
                    report = export_sessions(
                        store,
                        out,
                        user_id=args.user,
                        include_expired=args.include_expired,
                        progress=bar.update,
                    )
    summary = {"sessions": report.sessions, "messages": report.messages}
    if args.output in (None, "-"):
        # stdout carries the sessions themselves.
        print(f"exported {report.sessions} sessions, {report.messages} messages", file=sys.stderr)
    else:
        _print_json(summary | {"output": args.output})
    return EXIT_OK


def _import(args: argparse.Namespace) -> int:
    from .transfer import Rejection, import_sessions

    def reject(rejection: Rejection) -> None:
        print(f"line {rejection.line}: {rejection.reason}", file=sys.stderr)

    with _input(args.file) as (lines, size), opened_store(args) as store:
        with _progress(args, total=size, unit="B", unit_scale=True) as bar:
            report = import_sessions(
                store,
                lines,
                progress=lambda line: bar.update(len(line.encode("utf-8"))),
                on_reject=reject,
            )
    print(
        f"imported {report.imported} sessions ({report.messages} messages), "
        f"{report.unchanged} already present, {report.rejected} lines rejected",
        file=sys.stderr,
    )
    _print_json(
        {
            "imported": report.imported,
            "messages": report.messages,
            "unchanged": report.unchanged,
            "rejected": report.rejected,
            "rejections": [
                {"line": rejection.line, "reason": rejection.reason}
                for rejection in report.rejections
            ],
        }
    )
    return EXIT_FAILED if report.rejected else EXIT_OK


@contextmanager
def _input(name: str) -> Iterator[tuple[IO[str], int | None]]:
    """Yield the lines to import (a file or stdin) and their size in bytes, if known."""
    if name == "-":
        yield sys.stdin, None
        return
    try:
        handle = open(name, encoding="utf-8", newline="\n")
    except OSError as exc:
        raise UsageError(f"cannot read {name}: {exc.strerror}") from None
    with handle:
        yield handle, os.fstat(handle.fileno()).st_size


def _warm(args: argparse.Namespace) -> int:
    from .ops import warm_cache

    if store_options(args).redis_url is None:
        raise UsageError(
            f"{REDIS_VARIABLE} is not set: warming an in-process cache that is gone when this "
            "command exits does nothing"
        )
    with opened_store(args) as store, _progress(args, total=args.sessions, unit=" sessions") as bar:
        report = warm_cache(store, args.sessions, progress=bar.update)
    _print_json(
        {
            "sessions": report.sessions,
            "fills": report.fills,
            "already_cached": report.already_cached,
        }
    )
    return EXIT_OK


def _stats(args: argparse.Namespace) -> int:
    from .ops import collect_stats

    with opened_store(args) as store:
        found = collect_stats(store)
    if args.json:
        _print_json(found, indent=2)
    else:
        print(_stats_table(found))
    return EXIT_OK


def _size(value: object) -> str:
    if not isinstance(value, int):
        return "?"
    size = float(value)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def _stats_table(found: dict[str, Any]) -> str:
    rows = [
        ("sessions", f"{found['sessions']['live']} live, {found['sessions']['expired']} expired"),
        ("messages", str(found["messages"])),
    ]
    postgres = found["postgres"]
    if postgres is None:
        rows.append(("postgresql", "in-memory docstore"))
    else:
        rows.append(
            (
                "postgresql",
                f"table {postgres['table']} (schema version {postgres['schema_version']}): "
                f"{_size(postgres['table_bytes'])} data, {_size(postgres['indexes_bytes'])} "
                "indexes",
            )
        )
        for name, index in postgres["indexes"].items():
            valid = "" if index["valid"] else "  INVALID"
            rows.append(("  index", f"{name}  {_size(index['bytes'])}{valid}"))
    usage = found["redis"]
    if usage is None:
        rows.append(("redis", "no cache"))
    elif "error" in usage:
        rows.append(("redis", f"unavailable: {usage['error']}"))
    else:
        rows.append(
            (
                "redis",
                f"{usage['keys']} keys under {usage['prefix']!r}, "
                f"{_size(usage['memory_bytes'])} "
                f"(server uses {_size(usage['server_used_memory'])})",
            )
        )
    counters = ", ".join(f"{name} {value}" for name, value in found["store"].items())
    rows.append(("counters", counters))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in rows)


def _doctor(args: argparse.Namespace) -> int:
    from .doctor import diagnose, exit_status

    options = store_options(args)
    findings = diagnose(
        docstore_url=options.docstore_url,
        redis_url=options.redis_url or "",
        key_prefix=options.key_prefix,
    )
    if args.json:
        for finding in findings:
            _print_json(finding.as_json())
    else:
        for finding in findings:
            line = f"{str(finding.severity).upper():<11} {finding.tier:<8} {finding.check}: "
            line += finding.message
            if finding.setting:
                line += f"\n{'':<21}fix: {finding.setting}"
            print(line)
    return exit_status(findings)


def _migrate(args: argparse.Namespace) -> int:
    from docstore.migrations import migrate_dsn

    url = store_options(args).docstore_url
    if url is not None and url.strip() == MEMORY_URL:
        raise UsageError("the in-memory docstore has no schema to migrate")
    if url is None:
        from docstore.embedded import start_embedded

        url = start_embedded()
    report = migrate_dsn(url, args.table, dry_run=args.dry_run)
    _print_json(
        {
            "table": report.table,
            "dry_run": report.dry_run,
            "version_before": report.version_before,
            "version_after": report.version_after,
            "applied": [
                {"version": step.version, "description": step.description}
                for step in report.applied
            ],
        }
    )
    return EXIT_OK


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
        epilog="Exit status: 0 done, 1 not found / unhealthy / demo failed / lines rejected "
        "by import / doctor warnings, 2 bad usage, 3 a tier unavailable, 130 interrupted.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str,
        handler: Callable[[argparse.Namespace], int],
        text: str,
        *,
        takes_id: bool = False,
        example: str,
    ) -> argparse.ArgumentParser:
        epilog = f"example: {example}"
        if takes_id:
            epilog += f"\n\n{_DASH_HINT}"
        sub = commands.add_parser(
            name,
            help=text,
            description=text,
            epilog=epilog,
            parents=[common],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(handler=handler)
        return sub

    run_demo = command(
        "demo",
        _demo,
        "write conversations, read them hot and cold, recover them in a restarted process",
        example="session-store demo --sessions 3 --messages 10",
    )
    run_demo.add_argument("--sessions", type=_positive, default=demo.DEFAULT_SESSIONS)
    run_demo.add_argument("--messages", type=_positive, default=demo.DEFAULT_MESSAGES)
    run_demo.add_argument("--keep", action="store_true", help="keep the demo sessions")
    run_demo.add_argument(
        "--recover", metavar="FILE", help=argparse.SUPPRESS
    )  # the restarted process's half of the demo

    get = command(
        "get",
        _get,
        "print a session as JSON",
        takes_id=True,
        example="session-store get SESSION_ID",
    )
    get.add_argument("session_id", metavar="SESSION_ID")

    messages = command(
        "messages",
        _messages,
        "print a session's messages, oldest first",
        takes_id=True,
        example="session-store messages SESSION_ID --limit 20",
    )
    messages.add_argument("session_id", metavar="SESSION_ID")
    messages.add_argument(
        "--limit", type=_count, help="only the newest N (with --after-seq: the first N after it)"
    )
    messages.add_argument("--after-seq", type=_count, help="only the messages after this seq")

    listing = command(
        "list",
        _list,
        "print a user's live sessions, most recently updated first",
        takes_id=True,
        example="session-store list alice --limit 10",
    )
    listing.add_argument("user_id", metavar="USER_ID")
    listing.add_argument("--limit", type=_count, default=100)
    listing.add_argument(
        "--show-ids", action="store_true", help="print the session ids, not their short hashes"
    )

    purge = command(
        "purge-expired",
        _purge_expired,
        "delete expired sessions and their messages",
        example="session-store purge-expired --batch-size 500",
    )
    purge.add_argument("--batch-size", type=_positive, default=1000)

    command(
        "check",
        _check,
        "reach both tiers and report their health",
        example="REDIS_URL=redis://cache:6379/0 session-store check",
    )

    def progress_option(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--no-progress",
            action="store_true",
            help="no progress bar (it is shown only when stderr is a terminal anyway)",
        )

    export = command(
        "export",
        _export,
        "write sessions with their messages as JSON Lines, one session per line",
        example="session-store export --user alice -o alice.jsonl",
    )
    export.add_argument("-o", "--output", metavar="FILE", help="write here (default: stdout)")
    export.add_argument("--user", metavar="USER_ID", help="only this user's sessions")
    export.add_argument(
        "--include-expired", action="store_true", help="also the sessions that have expired"
    )
    progress_option(export)

    load = command(
        "import",
        _import,
        "read sessions as export writes them; each one is committed whole or not at all, "
        "and importing a file twice changes nothing the second time",
        example="session-store import backup.jsonl",
    )
    load.add_argument("file", metavar="FILE", help="a JSON Lines file, or - for stdin")
    progress_option(load)

    warm = command(
        "warm",
        _warm,
        "load the most recently active sessions and their message tails into Redis",
        example="session-store warm --sessions 5000",
    )
    warm.add_argument("--sessions", type=_count, default=1000, help="how many (default 1000)")
    progress_option(warm)

    stats = command(
        "stats",
        _stats,
        "count sessions and messages, sizes in PostgreSQL and Redis, the store's counters",
        example="session-store stats --json",
    )
    stats.add_argument("--json", action="store_true", help="one JSON object instead of a table")

    doctor = command(
        "doctor",
        _doctor,
        "check PostgreSQL, Redis and the clocks and say what to change; exit 0 healthy, "
        "1 warnings, 3 a tier unreachable",
        example="session-store doctor --json",
    )
    doctor.add_argument("--json", action="store_true", help="one JSON object per finding")

    migrate = command(
        "migrate",
        _migrate,
        "bring the table's schema to this version's (stores also do it when they open it)",
        example="session-store migrate --dry-run",
    )
    migrate.add_argument("--dry-run", action="store_true", help="list the steps, change nothing")
    migrate.add_argument(
        "--table", default="documents", help="the docstore table (default: documents)"
    )
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
    except KeyboardInterrupt:
        # Whatever was in flight was rolled back (import) or removed (export -o).
        print("session-store: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UsageError as exc:
        print(f"session-store: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (SessionError, docstore.DocstoreError) as exc:
        # StoreUnavailable and friends: say what failed, without a traceback.
        print(f"session-store: {exc}", file=sys.stderr)
        return _failure_status(exc)


def _failure_status(exc: Exception) -> int:
    return EXIT_UNAVAILABLE if isinstance(exc, docstore.StoreUnavailable) else EXIT_FAILED
