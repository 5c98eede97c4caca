"""Check a deployment's PostgreSQL and Redis and say what to fix (`session-store doctor`).

Every check yields a `Finding`: a severity, what was found, and the setting
to change. The checks read and never write: the PostgreSQL checks use their
own connection (so that opening a store does not migrate the table first),
the Redis checks only INFO, CONFIG GET, TIME and PING.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from enum import IntEnum
from typing import Any

import psycopg2
import psycopg2.extensions
import redis
from psycopg2 import sql

from docstore.config import MEMORY_URL, URL_VARIABLES
from docstore.migrations import LATEST_VERSION, MIGRATIONS, read_version, table_indexes
from docstore.pool import connect_timeout_seconds
from docstore.postgres import index_name

from .config import REDIS_VARIABLE, redis_client_from_url
from .store import required_indexes

__all__ = [
    "diagnose",
    "Severity",
    "Finding",
    "check_postgres",
    "check_redis",
    "check_clocks",
    "exit_status",
    "MIN_POSTGRES_VERSION",
    "MIN_REDIS_VERSION",
    "CLOCK_SKEW_WARNING",
]

# Older servers lack what the store relies on (jsonb_path_ops GIN, CREATE INDEX
# CONCURRENTLY IF NOT EXISTS, the Lua scripts' commands).
MIN_POSTGRES_VERSION = 130000
MIN_REDIS_VERSION = (6, 2)
# Expiry is decided by PostgreSQL's clock in the docstore and by this host's
# clock for cached copies: beyond this, a session lives on in one tier.
CLOCK_SKEW_WARNING = 1.0
REDIS_LATENCY_WARNING = 0.05
POSTGRES_LATENCY_WARNING = 0.1
_SAMPLES = 5


class Severity(IntEnum):
    """How bad a finding is; the worst one decides the exit status."""

    OK = 0
    INFO = 1
    WARNING = 2
    ERROR = 3
    UNREACHABLE = 4

    def __str__(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Finding:
    """One result of a check."""

    tier: str  # "postgres", "redis" or "clock"
    check: str
    severity: Severity
    message: str
    setting: str | None = None  # what to change, when something should change

    def as_json(self) -> dict[str, Any]:
        """Return the finding as a JSON-ready dict (severity by name)."""
        return asdict(self) | {"severity": str(self.severity)}


def exit_status(findings: Sequence[Finding]) -> int:
    """Return 0 when healthy, 1 with warnings or errors, 3 when a tier is unreachable."""
    worst = max((finding.severity for finding in findings), default=Severity.OK)
    if worst is Severity.UNREACHABLE:
        return 3
    return 1 if worst >= Severity.WARNING else 0


def diagnose(
    *,
    docstore_url: str | None = None,
    redis_url: str | None = None,
    key_prefix: str = "sess:",
    table: str = "documents",
    sessions_collection: str = "sessions",
    messages_collection: str = "messages",
) -> list[Finding]:
    """Check the tiers `get_session_store()` would use with these arguments and the environment."""
    if docstore_url is None:
        docstore_url = next(
            (os.environ[name] for name in URL_VARIABLES if os.environ.get(name)), None
        )
    if docstore_url is None:
        from docstore.embedded import start_embedded

        docstore_url = start_embedded()
    dsn = None if docstore_url.strip() == MEMORY_URL else docstore_url
    indexes = [
        index_name(table, collection, paths, order_by=order_by)
        for collection, paths, order_by in required_indexes(
            sessions_collection, messages_collection
        )
    ]
    findings, postgres_skew = check_postgres(dsn, table=table, required_indexes=indexes)
    if redis_url is None:
        redis_url = os.environ.get(REDIS_VARIABLE) or None
    client = redis_client_from_url(redis_url) if redis_url else None
    try:
        redis_findings, redis_skew = check_redis(
            client, key_prefix=key_prefix, in_process=client is None
        )
    finally:
        if client is not None:
            client.close()
    return findings + redis_findings + check_clocks(postgres_skew, redis_skew)


def _median_seconds(call: Callable[[], object]) -> float:
    samples = []
    for _ in range(_SAMPLES):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def _skew(remote: datetime, sent: float, received: float) -> float:
    """Return remote minus local time, the remote clock read halfway through the round trip."""
    local = datetime.fromtimestamp((sent + received) / 2, timezone.utc)
    return (remote - local).total_seconds()


# --------------------------------------------------------------------------- PostgreSQL


def check_postgres(
    dsn: str | None,
    *,
    table: str = "documents",
    statement_timeout: float = 5.0,
    connect_timeout: float = 5.0,
    required_indexes: Sequence[str] = (),
) -> tuple[list[Finding], float | None]:
    """Check the PostgreSQL tier; return the findings and its clock skew in seconds.

    `dsn` None means the in-memory docstore: nothing to check. The store asks
    for `statement_timeout` on its connections; the check connects the same
    way and verifies the server applies it. `required_indexes` are the names of
    indexes the session store needs besides the table's own.
    """
    if dsn is None:
        return [Finding("postgres", "reachable", Severity.INFO, "in-memory docstore")], None
    findings: list[Finding] = []
    try:
        conn = psycopg2.connect(
            dsn,
            connect_timeout=connect_timeout_seconds(connect_timeout),
            options=f"-c statement_timeout={int(statement_timeout * 1000)}",
            application_name="session doctor",
        )
    except psycopg2.Error as exc:
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return [
            Finding(
                "postgres",
                "reachable",
                Severity.UNREACHABLE,
                f"cannot connect: {message}",
                "POSTGRES_CONNECTION_STRING",
            )
        ], None
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            latency = _median_seconds(lambda: cur.execute("SELECT 1"))
            findings.append(
                Finding(
                    "postgres",
                    "latency",
                    Severity.WARNING if latency > POSTGRES_LATENCY_WARNING else Severity.OK,
                    f"round trip {latency * 1000:.2f} ms (median of {_SAMPLES})",
                    None
                    if latency <= POSTGRES_LATENCY_WARNING
                    else "run the service next to its database",
                )
            )
            sent = time.time()
            cur.execute("SELECT clock_timestamp()")
            received = time.time()
            row = cur.fetchone()
            skew = _skew(row[0], sent, received) if row else None
            cur.execute("SHOW server_version_num")
            row = cur.fetchone()
            version = int(row[0]) if row else 0
            findings.append(_postgres_version(version))
            findings.extend(_statement_timeouts(cur, statement_timeout))
            findings.extend(_schema(conn, table))
            findings.extend(_indexes(cur, table, required_indexes))
        return findings, skew
    except psycopg2.Error as exc:
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        findings.append(
            Finding("postgres", "reachable", Severity.UNREACHABLE, f"connection failed: {message}")
        )
        return findings, None
    finally:
        conn.close()


def _postgres_version(version: int) -> Finding:
    shown = f"{version // 10000}.{version % 10000}"
    if version < MIN_POSTGRES_VERSION:
        return Finding(
            "postgres",
            "version",
            Severity.WARNING,
            f"PostgreSQL {shown} is older than the {MIN_POSTGRES_VERSION // 10000} this is "
            "tested with",
            "upgrade PostgreSQL",
        )
    return Finding("postgres", "version", Severity.OK, f"PostgreSQL {shown}")


def _statement_timeouts(cur: Any, wanted: float) -> list[Finding]:
    cur.execute("SELECT setting::int FROM pg_settings WHERE name = 'statement_timeout'")
    row = cur.fetchone()
    effective_ms = int(row[0]) if row else 0
    if effective_ms == 0:
        return [
            Finding(
                "postgres",
                "statement_timeout",
                Severity.WARNING,
                "the server ignored the statement_timeout the store asks for at connect "
                "(a connection pooler that drops startup options?): a stuck statement "
                "holds its connection until the client's watchdog gives up",
                "let startup options through (PgBouncer: ignore_startup_parameters must not "
                "list options), or ALTER ROLE ... SET statement_timeout = '5s'",
            )
        ]
    return [
        Finding(
            "postgres",
            "statement_timeout",
            Severity.OK,
            f"statement_timeout {effective_ms} ms on the store's connections "
            f"(asked for {wanted:g} s)",
        )
    ]


def _schema(conn: Any, table: str) -> list[Finding]:
    version = read_version(conn, table)
    if version == 0:
        return [
            Finding(
                "postgres",
                "schema",
                Severity.INFO,
                f"table {table!r} does not exist yet; the first store to open it creates it",
            )
        ]
    if version > LATEST_VERSION:
        return [
            Finding(
                "postgres",
                "schema",
                Severity.ERROR,
                f"table {table!r} has schema version {version}, newer than this code's "
                f"{LATEST_VERSION}: stores of this version refuse to open it",
                "upgrade the docstore-session package",
            )
        ]
    if version < LATEST_VERSION:
        pending = ", ".join(str(step.version) for step in MIGRATIONS if step.version > version)
        return [
            Finding(
                "postgres",
                "schema",
                Severity.WARNING,
                f"table {table!r} is at schema version {version}; steps {pending} are pending "
                "(the first store to open it applies them)",
                "python -m session migrate",
            )
        ]
    return [Finding("postgres", "schema", Severity.OK, f"schema version {version} (current)")]


def _indexes(cur: Any, table: str, required: Sequence[str]) -> list[Finding]:
    regclass = sql.Identifier(table).as_string(cur)
    cur.execute(
        "SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE i.indrelid = to_regclass(%s)",
        (regclass,),
    )
    found = dict(cur.fetchall())
    if not found and read_version(cur.connection, table) == 0:
        return []
    expected = table_indexes(table, min(read_version(cur.connection, table), LATEST_VERSION))
    findings = []
    for name in sorted(name for name, valid in found.items() if not valid):
        findings.append(
            Finding(
                "postgres",
                "indexes",
                Severity.ERROR,
                f"index {name} is INVALID (an interrupted concurrent build): it slows every "
                "write and serves no read",
                f"DROP INDEX CONCURRENTLY {name}; then python -m session migrate "
                "(or restart a service that uses the store)",
            )
        )
    missing = [name for name in [*expected, *required] if name not in found]
    if missing:
        findings.append(
            Finding(
                "postgres",
                "indexes",
                Severity.WARNING,
                f"missing indexes: {', '.join(missing)} (queries on them scan the table)",
                "python -m session migrate, then open a SessionStore once (it creates its "
                "own indexes)",
            )
        )
    if not findings:
        findings.append(
            Finding("postgres", "indexes", Severity.OK, f"{len(found)} indexes, all valid")
        )
    return findings


# --------------------------------------------------------------------------- Redis


def check_redis(
    client: redis.Redis | None, *, key_prefix: str, in_process: bool = False
) -> tuple[list[Finding], float | None]:
    """Check the Redis tier; return the findings and its clock skew in seconds."""
    if client is None or in_process:
        what = "in-process fakeredis (REDIS_URL unset): nothing to check"
        return [Finding("redis", "reachable", Severity.INFO, what)], None
    findings: list[Finding] = []
    try:
        latency = _median_seconds(client.ping)
        findings.append(
            Finding(
                "redis",
                "latency",
                Severity.WARNING if latency > REDIS_LATENCY_WARNING else Severity.OK,
                f"round trip {latency * 1000:.2f} ms (median of {_SAMPLES})",
                None if latency <= REDIS_LATENCY_WARNING else "run Redis next to the service",
            )
        )
        sent = time.time()
        seconds, micros = client.time()
        received = time.time()
        skew = _skew(datetime.fromtimestamp(seconds + micros / 1e6, timezone.utc), sent, received)
        info = client.info()
        findings.append(_redis_version(str(info.get("redis_version", "0"))))
        findings.extend(_redis_role(info))
        findings.extend(_eviction(client, info))
        findings.extend(_persistence(client, info))
        findings.extend(_cluster(info, key_prefix))
        return findings, skew
    except (redis.RedisError, OSError) as exc:
        findings.append(
            Finding(
                "redis",
                "reachable",
                Severity.UNREACHABLE,
                f"{type(exc).__name__}: {exc}",
                "REDIS_URL",
            )
        )
        return findings, None


def _redis_version(text: str) -> Finding:
    try:
        version = tuple(int(part) for part in text.split(".")[:2])
    except ValueError:
        version = (0, 0)
    if version < MIN_REDIS_VERSION:
        return Finding(
            "redis",
            "version",
            Severity.WARNING,
            f"Redis {text} is older than {'.'.join(map(str, MIN_REDIS_VERSION))}",
            "upgrade Redis",
        )
    return Finding("redis", "version", Severity.OK, f"Redis {text}")


def _redis_role(info: dict[str, Any]) -> list[Finding]:
    if info.get("role") == "slave":
        return [
            Finding(
                "redis",
                "role",
                Severity.ERROR,
                "REDIS_URL names a replica: every cache write fails (READONLY) and reads "
                "fall back to PostgreSQL",
                "point REDIS_URL at the primary",
            )
        ]
    return []


def _config(client: redis.Redis, name: str) -> str | None:
    """Return a CONFIG GET value, or None where CONFIG is disabled (managed services)."""
    try:
        reply = client.config_get(name)
    except redis.ResponseError:
        return None
    value = reply.get(name) if isinstance(reply, dict) else None
    return value.decode() if isinstance(value, bytes) else value


def _eviction(client: redis.Redis, info: dict[str, Any]) -> list[Finding]:
    policy = _config(client, "maxmemory-policy") or info.get("maxmemory_policy")
    maxmemory = int(info.get("maxmemory", 0) or 0)
    if policy is None:
        return [
            Finding(
                "redis",
                "maxmemory-policy",
                Severity.INFO,
                "cannot read maxmemory-policy (CONFIG disabled?)",
            )
        ]
    if policy == "noeviction":
        return [
            Finding(
                "redis",
                "maxmemory-policy",
                Severity.WARNING,
                "maxmemory-policy is noeviction: once Redis is full every cache write "
                "fails (counted as cache_errors) instead of evicting old copies",
                "CONFIG SET maxmemory-policy allkeys-lru (and in redis.conf)",
            )
        ]
    if policy.startswith("volatile") or policy == "allkeys-random":
        severity = Severity.INFO
    else:
        severity = Severity.OK
    findings = [
        Finding(
            "redis",
            "maxmemory-policy",
            severity,
            f"maxmemory-policy {policy} (every cached key has a TTL, so volatile-* works too)",
        )
    ]
    if maxmemory == 0:
        findings.append(
            Finding(
                "redis",
                "maxmemory",
                Severity.INFO,
                "no maxmemory: Redis grows until the host runs out (every copy expires "
                "within cache_ttl, which bounds it)",
                "CONFIG SET maxmemory <bytes>",
            )
        )
    return findings


def _persistence(client: redis.Redis, info: dict[str, Any]) -> list[Finding]:
    findings = []
    if str(info.get("rdb_last_bgsave_status", "ok")) != "ok":
        findings.append(
            Finding(
                "redis",
                "persistence",
                Severity.WARNING,
                "the last RDB save failed: with stop-writes-on-bgsave-error yes Redis "
                "refuses every write until a save succeeds",
                "fix the save (disk, permissions) or CONFIG SET stop-writes-on-bgsave-error no",
            )
        )
    snapshots = _config(client, "save")
    persisting = [
        what
        for what, on in (
            ("append-only file", int(info.get("aof_enabled", 0) or 0)),
            (f"RDB snapshots (save {snapshots!r})", bool(snapshots)),
        )
        if on
    ]
    if persisting:
        findings.append(
            Finding(
                "redis",
                "persistence",
                Severity.INFO,
                f"Redis persists to disk ({', '.join(persisting)}): not needed for a cache "
                "(PostgreSQL holds the truth; copies reloaded after a restart are dropped by "
                "the store's fence)",
                "appendonly no and save '' to spare the disk",
            )
        )
    if not findings:
        findings.append(Finding("redis", "persistence", Severity.OK, "no persistence (a cache)"))
    return findings


def _cluster(info: dict[str, Any], key_prefix: str) -> list[Finding]:
    if "{" in key_prefix or "}" in key_prefix:
        return [
            Finding(
                "redis",
                "cluster",
                Severity.ERROR,
                f"key prefix {key_prefix!r} holds a brace: it would steal the session id's "
                "hash tag, and the store refuses it",
                "SESSION key prefix without { or }",
            )
        ]
    if int(info.get("cluster_enabled", 0) or 0):
        return [
            Finding(
                "redis",
                "cluster",
                Severity.WARNING,
                "Redis Cluster: each session's keys share the hash tag {session id}, so every "
                "script touches one slot, but the restart fence scans only the node this "
                "client is connected to",
                "use a primary with replicas (Sentinel) rather than Cluster",
            )
        ]
    return []


# --------------------------------------------------------------------------- clocks


def check_clocks(postgres_skew: float | None, redis_skew: float | None) -> list[Finding]:
    """Compare this host's clock with PostgreSQL's and Redis's."""
    findings = []
    for tier, skew in (("postgres", postgres_skew), ("redis", redis_skew)):
        if skew is None:
            continue
        bad = abs(skew) > CLOCK_SKEW_WARNING
        findings.append(
            Finding(
                "clock",
                f"skew {tier}",
                Severity.WARNING if bad else Severity.OK,
                f"{tier} clock is {skew * 1000:+.1f} ms from this host's"
                + (": sessions expire at different moments in each tier" if bad else ""),
                "synchronise the clocks (NTP: chrony or systemd-timesyncd)" if bad else None,
            )
        )
    return findings
