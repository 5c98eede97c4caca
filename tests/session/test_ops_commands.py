"""The operator commands end to end: export, import, warm, stats, doctor, migrate.

Each command runs through `main(argv)` in this process, on a store of the
test's own: a memory docstore + fakeredis, the embedded PostgreSQL server +
fakeredis, or the real servers (a fresh table and key prefix, removed after).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import fakeredis
import psycopg2
import pytest
import redis
from faults.fault_redis import free_port, redis_server_path
from postgres_tables import drop_tables, unique_table

import session.cli
from docstore import Document, DocumentStore, MemoryDocumentStore, PostgresDocumentStore
from docstore.migrations import MIGRATIONS, migrate_dsn
from session import SessionStore
from session.cli import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    build_parser,
    main,
)
from session.config import redis_client_from_url
from session.models import RESERVED_KEY

SERVER_VARIABLES = ("POSTGRES_CONNECTION_STRING", "DATABASE_URL", "REDIS_URL")


@dataclass
class Deployment:
    """One docstore table and one Redis namespace; `open()` builds a store on them."""

    documents: Callable[[], DocumentStore]
    cache: Callable[[], redis.Redis]
    prefix: str
    dsn: str | None
    redis_url: str | None

    def open(
        self,
        *,
        cached: bool = True,
        docstore_url: str | None = None,
        redis_url: str | None = None,
        key_prefix: str | None = None,
    ) -> SessionStore:
        """Build a store (the command line's URL and prefix arguments are this deployment's)."""
        return SessionStore(
            self.documents(),
            self.cache() if cached else None,
            key_prefix=self.prefix,
            # A memory docstore is shared by every store of the test: not closed with one.
            owns_docstore=self.dsn is not None,
            owns_cache=cached,
        )


@pytest.fixture(
    params=[
        "memory",
        pytest.param("embedded", marks=pytest.mark.embedded),
        pytest.param("real", marks=(pytest.mark.postgres, pytest.mark.redis)),
    ]
)
def deployment(request: pytest.FixtureRequest) -> Iterator[Deployment]:
    prefix = f"t{uuid.uuid4().hex[:12]}:"
    if request.param == "memory":
        memory = MemoryDocumentStore()
        server = fakeredis.FakeServer()
        yield Deployment(
            lambda: memory,
            lambda: fakeredis.FakeRedis(server=server),
            prefix,
            None,
            None,
        )
        return
    if request.param == "embedded":
        dsn: str = request.getfixturevalue("embedded_dsn")
        server = fakeredis.FakeServer()
        cache: Callable[[], redis.Redis] = lambda: fakeredis.FakeRedis(server=server)  # noqa: E731
        redis_url = None
    else:
        dsn = request.getfixturevalue("real_dsn")
        redis_url = request.getfixturevalue("redis_url")
        url = redis_url
        cache = lambda: redis_client_from_url(url)  # noqa: E731
    table = unique_table()
    try:
        yield Deployment(
            lambda: PostgresDocumentStore(dsn, table=table), cache, prefix, dsn, redis_url
        )
    finally:
        drop_tables(dsn, [table, f"{table}_meta"])
        if redis_url is not None:
            client = redis_client_from_url(redis_url)
            keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()


@pytest.fixture
def commands(deployment: Deployment, monkeypatch: pytest.MonkeyPatch) -> Deployment:
    """Point every command's `get_session_store()` at the test's deployment."""
    for variable in SERVER_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    if deployment.redis_url is not None:
        monkeypatch.setenv("REDIS_URL", deployment.redis_url)
    else:
        monkeypatch.setenv("REDIS_URL", "redis://fake-for-warm")  # warm refuses an unset one
    monkeypatch.setattr(session.cli, "get_session_store", deployment.open)
    return deployment


def past(seconds: float) -> datetime:
    return datetime.now(timezone.utc) - timedelta(seconds=seconds)


def populate(store: SessionStore) -> dict[str, str]:
    """Write sessions of two users (one expired) and return their ids by name."""
    alice = store.create_session("alice", {"theme": "dark", "name": "Ålice ✓"})
    for n in range(5):
        store.add_message(alice.id, "user", f"hello {n}", metadata={"n": n}, message_id=f"m{n}")
    short = store.create_session("alice", {"ttl": True}, ttl=3600)
    store.add_message(short.id, "assistant", "hi")
    bob = store.create_session("bob", {})
    anonymous = store.create_session(None, {"nested": {"a": [1, 2.5, None, "x"]}})
    for n in range(3):
        store.add_message(anonymous.id, "user", "ü" * n)
    sessions, _ = store.collections
    expired = Document(
        "expired-session",
        sessions,
        {"old": 1, RESERVED_KEY: {"user_id": "alice", "conv": "expired-conv"}},
        past(7200),
        past(7200),
        3,
        past(3600),
    )
    store.document_store.restore(expired, counter=0)
    return {"alice": alice.id, "short": short.id, "bob": bob.id, "anonymous": anonymous.id}


def export(tmp_path: Path, *args: str) -> bytes:
    target = tmp_path / f"export-{uuid.uuid4().hex}.jsonl"
    assert main(["export", "--no-progress", "-o", str(target), *args]) == EXIT_OK
    return target.read_bytes()


def lines_of(data: bytes) -> list[dict[str, object]]:
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


# --------------------------------------------------------------------------- export / import


def test_export_writes_one_line_per_live_session_with_its_messages(
    commands: Deployment, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with commands.open() as store:
        ids = populate(store)
        alice_messages = store.get_messages(ids["alice"])
    records = {record["id"]: record for record in lines_of(export(tmp_path))}
    assert set(records) == set(ids.values())  # the expired one left out
    alice = records[ids["alice"]]
    assert alice["user_id"] == "alice" and alice["data"] == {"theme": "dark", "name": "Ålice ✓"}
    assert alice["last_seq"] == 5 and alice["version"] == 6
    assert [message["id"] for message in alice["messages"]] == [f"m{n}" for n in range(5)]  # type: ignore[index]
    assert alice["messages"][2] == {  # type: ignore[index]
        "seq": 3,
        "id": "m2",
        "role": "user",
        "content": "hello 2",
        "metadata": {"n": 2},
        "created_at": alice_messages[2].created_at.isoformat(timespec="microseconds"),
    }
    assert json.loads(capsys.readouterr().out)["sessions"] == 4
    everything = lines_of(export(tmp_path, "--include-expired"))
    assert "expired-session" in {record["id"] for record in everything}
    only_alice = lines_of(export(tmp_path, "--user", "alice"))
    assert {record["id"] for record in only_alice} == {ids["alice"], ids["short"]}


def test_export_to_stdout(commands: Deployment, capsys: pytest.CaptureFixture[str]) -> None:
    with commands.open() as store:
        populate(store)
    assert main(["export", "--no-progress"]) == EXIT_OK
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 4
    assert "exported 4 sessions, 9 messages" in captured.err


def test_round_trip_into_an_empty_table_gives_the_same_bytes(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for variable in SERVER_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(session.cli, "get_session_store", deployment.open)
    with deployment.open() as store:
        ids = populate(store)
    first = export(tmp_path, "--include-expired")
    source = tmp_path / "first.jsonl"
    source.write_bytes(first)
    # An empty second deployment of the same kind.
    if deployment.dsn is None:
        empty = MemoryDocumentStore()
        target = Deployment(
            lambda: empty,
            deployment.cache,
            deployment.prefix + "2:",
            None,
            None,
        )
        tables: list[str] = []
    else:
        table = unique_table()
        tables = [table, f"{table}_meta"]
        dsn = deployment.dsn
        target = Deployment(
            lambda: PostgresDocumentStore(dsn, table=table),
            deployment.cache,
            deployment.prefix + "2:",
            dsn,
            deployment.redis_url,
        )
    try:
        monkeypatch.setattr(session.cli, "get_session_store", target.open)
        assert main(["import", "--no-progress", str(source)]) == EXIT_OK
        assert export(tmp_path, "--include-expired") == first
        # Twice: nothing changes the second time.
        assert main(["import", "--no-progress", str(source)]) == EXIT_OK
        assert export(tmp_path, "--include-expired") == first
        with target.open() as store:
            messages = store.get_messages(ids["alice"])
            assert [(m.seq, m.id) for m in messages] == [(n + 1, f"m{n}") for n in range(5)]
            # The append counter came along: the next message continues the sequence.
            assert store.add_message(ids["alice"], "user", "again").seq == 6
    finally:
        if tables and deployment.dsn is not None:
            drop_tables(deployment.dsn, tables)


def test_import_reports_every_rejected_line_and_imports_the_rest(
    commands: Deployment, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with commands.open() as store:
        ids = populate(store)
    good = lines_of(export(tmp_path))
    with commands.open() as store:
        for session_id in ids.values():
            store.delete_session(session_id)
        taken = store.create_session("mallory", {})
    alice = next(record for record in good if record["id"] == ids["alice"])
    bob = next(record for record in good if record["id"] == ids["bob"])
    anonymous = next(record for record in good if record["id"] == ids["anonymous"])
    broken_message = dict(alice, messages=[*alice["messages"], {"seq": 9}])  # type: ignore[list-item]
    too_long = dict(
        anonymous,
        messages=[dict(anonymous["messages"][0], id="x" * 300)],  # type: ignore[index]
    )
    clash = dict(bob, id=taken.id)
    lines = [
        json.dumps(bob),  # 1: imported
        "{not json",  # 2
        json.dumps(broken_message),  # 3: a bad field in a message
        json.dumps(dict(bob, version="one")),  # 4
        json.dumps(clash),  # 5: the id is another session's
        "",  # 6: blank lines are skipped
        json.dumps(too_long),  # 7: the docstore refuses its message: nothing of it is written
        json.dumps(dict(bob, extra=1)),  # 8
    ]
    source = tmp_path / "mixed.jsonl"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["import", "--no-progress", str(source)]) == EXIT_FAILED
    captured = capsys.readouterr()
    err = captured.err
    summary = json.loads(captured.out)
    assert (summary["imported"], summary["rejected"]) == (1, 6)
    assert [item["line"] for item in summary["rejections"]] == [2, 3, 4, 5, 7, 8]
    assert "line 2: bad JSON" in err
    assert "line 3: bad field: the messages[5] lacks 'id'" in err
    assert "line 4: bad field 'version'" in err
    assert "line 5: session id" in err and "taken by a different session" in err
    assert "line 7: bad field" in err and "longer than" in err
    assert "line 8: bad field" in err and "'extra'" in err
    assert "line 1:" not in err and "line 6:" not in err
    assert "imported 1 sessions (0 messages), 0 already present, 6 lines rejected" in err
    with commands.open() as store:
        assert store.get_session(ids["bob"]) is not None
        assert store.get_session(ids["anonymous"]) is None  # nothing half-written
        assert store.get_session(ids["alice"]) is None
        assert store.get_session(taken.id).user_id == "mallory"  # type: ignore[union-attr]


def test_two_imports_of_one_file_at_once_import_each_session_once(
    deployment: Deployment, tmp_path: Path
) -> None:
    from session.transfer import export_sessions, import_sessions

    with deployment.open() as store:
        populate(store)
        out = io.StringIO()
        export_sessions(store, out)
        lines = out.getvalue().splitlines(keepends=True)
        for record in lines_of(out.getvalue().encode()):
            store.delete_session(str(record["id"]))
    stores = [deployment.open() for _ in range(2)]
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            reports = list(pool.map(lambda store: import_sessions(store, lines), stores))
    finally:
        for store in stores:
            store.close()
    assert sum(report.imported for report in reports) == len(lines)
    assert sum(report.unchanged for report in reports) == len(lines)
    assert all(report.rejected == 0 for report in reports)


def test_import_refuses_a_conversation_another_session_holds(
    commands: Deployment, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with commands.open() as store:
        ids = populate(store)
    exported = export(tmp_path, "--user", "bob")
    with commands.open() as store:
        store.rotate_session_id(ids["bob"])  # same conversation, new id
    source = tmp_path / "bob.jsonl"
    source.write_bytes(exported)
    assert main(["import", "--no-progress", str(source)]) == EXIT_FAILED
    assert "conversation key belongs to another session" in capsys.readouterr().err


def test_import_shows_a_session_a_stale_tombstone_hid(commands: Deployment, tmp_path: Path) -> None:
    with commands.open() as store:
        ids = populate(store)
    exported = export(tmp_path, "--user", "bob")
    with commands.open() as store:
        store.delete_session(ids["bob"])  # leaves a tombstone in Redis
        assert store.get_session(ids["bob"]) is None
    source = tmp_path / "bob.jsonl"
    source.write_bytes(exported)
    assert main(["import", "--no-progress", str(source)]) == EXIT_OK
    with commands.open() as store:
        restored = store.get_session(ids["bob"])
        assert restored is not None and restored.user_id == "bob"


def test_interrupted_import_leaves_no_half_written_session(
    commands: Deployment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with commands.open() as store:
        ids = populate(store)
    exported = export(tmp_path, "--user", "alice")
    with commands.open() as store:
        for session_id in ids.values():
            store.delete_session(session_id)
    source = tmp_path / "alice.jsonl"
    source.write_bytes(exported)
    opened = commands.open

    def interrupting(**options: object) -> SessionStore:
        store = opened()
        documents = store.document_store
        original = documents.restore_many

        def restore_many(batch: list[Document]) -> list[str]:
            # Ctrl-C after the session row and some of its messages were written.
            original(batch[:2])
            raise KeyboardInterrupt

        monkeypatch.setattr(documents, "restore_many", restore_many)
        return store

    monkeypatch.setattr(session.cli, "get_session_store", interrupting)
    assert main(["import", "--no-progress", str(source)]) == EXIT_INTERRUPTED
    with commands.open() as store:
        assert all(store.get_session(session_id) is None for session_id in ids.values())
        assert store.document_store.count(store.collections[1]) == 0


def test_interrupted_export_leaves_the_previous_file(
    commands: Deployment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with commands.open() as store:
        populate(store)
    target = tmp_path / "backup.jsonl"
    target.write_text("the previous backup\n")

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("session.transfer._export_one", interrupted)
    assert main(["export", "--no-progress", "-o", str(target)]) == EXIT_INTERRUPTED
    assert target.read_text() == "the previous backup\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["backup.jsonl"]


def test_import_of_a_missing_file_is_a_usage_error(
    commands: Deployment, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["import", str(tmp_path / "nope.jsonl")]) == EXIT_USAGE
    assert "cannot read" in capsys.readouterr().err


# --------------------------------------------------------------------------- warm and stats


def test_warm_fills_the_most_recently_active_sessions(
    commands: Deployment, capsys: pytest.CaptureFixture[str]
) -> None:
    with commands.open(cached=False) as store:  # written without touching Redis
        created = [store.create_session("u", {"n": n}) for n in range(5)]
        for session_ in created:
            store.add_message(session_.id, "user", "hello")
        store.update_session(created[0].id, {"active": True})  # now the most recent
    assert main(["warm", "--no-progress", "--sessions", "2"]) == EXIT_OK
    # Two sessions, each its copy and its tail installed.
    assert json.loads(capsys.readouterr().out) == {"sessions": 2, "fills": 4, "already_cached": 0}
    assert main(["warm", "--no-progress", "--sessions", "2"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out) == {"sessions": 2, "fills": 0, "already_cached": 2}
    with commands.open() as store:
        assert store.get_session(created[0].id) is not None
        assert store.get_messages(created[4].id) != []
        assert store.get_session(created[1].id) is not None
        stats = store.stats()
    # created[0] and created[4] came from Redis (session and tail); created[1] did not.
    assert (stats["hits"], stats["misses"]) == (2, 1)
    assert (stats["message_hits"], stats["message_misses"]) == (1, 0)


def test_warm_without_redis_url_is_a_usage_error(
    commands: Deployment, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("REDIS_URL")
    assert main(["warm"]) == EXIT_USAGE
    assert "REDIS_URL is not set" in capsys.readouterr().err


def test_stats_counts_sessions_messages_sizes_and_keys(
    commands: Deployment, capsys: pytest.CaptureFixture[str]
) -> None:
    with commands.open() as store:
        ids = populate(store)
        store.get_session(ids["alice"])  # a cached copy under the prefix
    capsys.readouterr()
    assert main(["stats", "--json"]) == EXIT_OK
    found = json.loads(capsys.readouterr().out)
    assert found["sessions"] == {"live": 4, "expired": 1}
    assert found["messages"] == 9
    assert found["redis"]["keys"] >= 1 and found["redis"]["prefix"] == commands.prefix
    assert set(found["store"]) >= {"hits", "misses", "cache_errors", "breaker_open"}
    if commands.dsn is None:
        assert found["postgres"] is None
    else:
        postgres = found["postgres"]
        assert postgres["schema_version"] == MIGRATIONS[-1].version
        assert postgres["table_bytes"] > 0 and postgres["indexes_bytes"] > 0
        assert all(index["valid"] for index in postgres["indexes"].values())
        assert any(name.endswith("_pkey") for name in postgres["indexes"])
    assert main(["stats"]) == EXIT_OK
    table = capsys.readouterr().out
    assert "4 live, 1 expired" in table and "keys under" in table


# --------------------------------------------------------------------------- migrate


@pytest.fixture(
    params=[
        pytest.param("embedded", marks=pytest.mark.embedded),
        pytest.param("real", marks=pytest.mark.postgres),
    ]
)
def dsn(request: pytest.FixtureRequest) -> str:
    value: str = request.getfixturevalue(
        "embedded_dsn" if request.param == "embedded" else "real_dsn"
    )
    return value


@pytest.fixture
def table(dsn: str) -> Iterator[str]:
    name = unique_table()
    yield name
    drop_tables(dsn, [name, f"{name}_meta"])


def test_migrate_command(
    dsn: str, table: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for variable in SERVER_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("POSTGRES_CONNECTION_STRING", dsn)
    migrate_dsn(dsn, table, steps=MIGRATIONS[:1])
    assert main(["migrate", "--dry-run", "--table", table]) == EXIT_OK
    planned = json.loads(capsys.readouterr().out)
    pending = [step.version for step in MIGRATIONS[1:]]
    assert planned["dry_run"] and [step["version"] for step in planned["applied"]] == pending
    assert planned["version_after"] == 1
    assert main(["migrate", "--table", table]) == EXIT_OK
    done = json.loads(capsys.readouterr().out)
    assert (done["version_before"], done["version_after"]) == (1, MIGRATIONS[-1].version)
    assert main(["migrate", "--table", table]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["applied"] == []
    monkeypatch.setenv("POSTGRES_CONNECTION_STRING", "memory://")
    assert main(["migrate"]) == EXIT_USAGE


# --------------------------------------------------------------------------- doctor


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Start redis-server processes of the test's own with extra settings; return their URLs.

    Never CONFIG SET on the shared server: each test configures its own.
    """
    if redis_server_path() is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but redis-server is not on PATH")
        pytest.skip("redis-server is not on PATH (apt-get install redis-server)")
    started: list[subprocess.Popen[bytes]] = []

    def start(*settings: str) -> str:
        port = free_port()
        process = subprocess.Popen(
            [
                str(redis_server_path()),
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(tmp_path),
                "--loglevel",
                "warning",
                *settings,
            ],  # fmt: skip
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started.append(process)
        client = redis.Redis(port=port, socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)  # polling a starting process, with a deadline
        finally:
            client.close()
        return f"redis://127.0.0.1:{port}/0"

    yield start
    for process in started:
        process.terminate()
        process.wait(timeout=10)


def run_doctor(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, **env: str
) -> tuple[int, list[dict[str, str]]]:
    for variable in SERVER_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    status = main(["doctor", "--json"])
    return status, [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def finding(findings: list[dict[str, str]], check: str) -> list[dict[str, str]]:
    return [item for item in findings if item["check"] == check]


def test_doctor_finds_a_noeviction_redis_and_says_what_to_set(
    dsn: str,
    private_redis: Callable[..., str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = private_redis("--maxmemory-policy", "noeviction", "--maxmemory", "100mb")
    status, findings = run_doctor(
        capsys, monkeypatch, POSTGRES_CONNECTION_STRING=dsn, REDIS_URL=url
    )
    policy = finding(findings, "maxmemory-policy")
    assert [item["severity"] for item in policy] == ["warning"]
    assert "allkeys-lru" in policy[0]["setting"]
    assert status == EXIT_FAILED


def test_doctor_is_healthy_on_a_well_set_deployment(
    dsn: str,
    table: str,
    private_redis: Callable[..., str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from session.doctor import Severity, diagnose, exit_status

    url = private_redis("--maxmemory-policy", "allkeys-lru", "--maxmemory", "100mb")
    store = SessionStore(PostgresDocumentStore(dsn, table=table), owns_docstore=True)
    store.close()  # the table at the current version, with the store's indexes
    findings = diagnose(docstore_url=dsn, redis_url=url, table=table)
    bad = [item for item in findings if item.severity >= Severity.WARNING]
    assert bad == []
    assert exit_status(findings) == 0
    assert {item.check for item in findings} >= {
        "latency",
        "version",
        "statement_timeout",
        "schema",
        "indexes",
        "maxmemory-policy",
        "persistence",
        "skew postgres",
        "skew redis",
    }


def test_doctor_finds_an_old_schema_and_an_invalid_index(
    dsn: str, table: str, private_redis: Callable[..., str]
) -> None:
    from session.doctor import Severity, diagnose

    url = private_redis("--maxmemory-policy", "allkeys-lru")
    migrate_dsn(dsn, table, steps=MIGRATIONS[:1])
    conn = psycopg2.connect(dsn, connect_timeout=10)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(
                f"INSERT INTO \"{table}\" (collection, id, data) VALUES ('c', 'a', '{{}}'),"
                " ('c', 'b', '{}')"
            )
            # A unique index built concurrently over duplicates fails and stays INVALID.
            with pytest.raises(psycopg2.errors.UniqueViolation):
                cur.execute(f'CREATE UNIQUE INDEX CONCURRENTLY "{table}_bad" ON "{table}" (data)')
    finally:
        conn.close()
    findings = diagnose(docstore_url=dsn, redis_url=url, table=table)
    schema = [item for item in findings if item.check == "schema"]
    assert (
        schema[0].severity is Severity.WARNING and schema[0].setting == "python -m session migrate"
    )
    invalid = [item for item in findings if item.check == "indexes" and "INVALID" in item.message]
    assert (
        invalid and invalid[0].severity is Severity.ERROR and f"{table}_bad" in invalid[0].message
    )


def test_doctor_reports_persistence_and_a_replica(private_redis: Callable[..., str]) -> None:
    from session.doctor import Severity, check_redis

    primary = private_redis("--appendonly", "yes", "--maxmemory-policy", "allkeys-lru")
    port = primary.rsplit(":", 1)[1].split("/")[0]
    replica = private_redis("--replicaof", "127.0.0.1", port)
    for url, expected in ((primary, "persistence"), (replica, "role")):
        client = redis_client_from_url(url)
        try:
            findings, skew = check_redis(client, key_prefix="sess:")
        finally:
            client.close()
        assert skew is not None and abs(skew) < 1
        if expected == "persistence":
            found = [item for item in findings if item.check == "persistence"]
            assert [item.severity for item in found] == [Severity.INFO]
            assert "append-only file" in found[0].message
        else:
            found = [item for item in findings if item.check == "role"]
            assert found and found[0].severity is Severity.ERROR
            assert "primary" in (found[0].setting or "")


def test_doctor_exits_3_when_a_tier_is_unreachable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    closed = free_port()
    status, findings = run_doctor(
        capsys,
        monkeypatch,
        POSTGRES_CONNECTION_STRING="memory://",
        REDIS_URL=f"redis://127.0.0.1:{closed}/0",
    )
    assert status == EXIT_UNAVAILABLE
    assert [item["severity"] for item in finding(findings, "reachable")][-1] == "unreachable"
    status, findings = run_doctor(
        capsys,
        monkeypatch,
        POSTGRES_CONNECTION_STRING=f"postgresql://postgres@127.0.0.1:{closed}/x?connect_timeout=1",
    )
    assert status == EXIT_UNAVAILABLE
    assert finding(findings, "reachable")[0]["tier"] == "postgres"


def test_clock_skew_beyond_a_second_is_a_warning() -> None:
    from session.doctor import Severity, check_clocks

    findings = check_clocks(2.5, -0.01)
    assert [item.severity for item in findings] == [Severity.WARNING, Severity.OK]
    assert "NTP" in (findings[0].setting or "")


# --------------------------------------------------------------------------- help


def test_every_command_has_help_with_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    commands = next(
        action
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    names = sorted(commands.choices)
    assert {"export", "import", "warm", "stats", "doctor", "migrate", "get", "check"} <= set(names)
    for name in names:
        with pytest.raises(SystemExit) as exited:
            main([name, "--help"])
        assert exited.value.code == 0
        out = capsys.readouterr().out
        example = out.split("example: ", 1)[-1].splitlines()[0]
        assert "session-store " + name in example, name
